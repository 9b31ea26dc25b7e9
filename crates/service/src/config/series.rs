//! The `[[series]]` tables: indicator series computed beside the SMA of
//! `[sma]`, each its own keyspace with its own output channel.

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};

use serde::Deserialize;

use super::{ConfigError, RedisSettings};
use crate::names::{SMA_SERIES, StreamName};
use crate::series::{Kind, Spec, timed::MAX_POINTS};

/// One `[[series]]` table, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesSettings {
    /// On every result and what clients name: 1–32 of `[A-Za-z0-9._-]`.
    pub name: String,
    /// `sma`, `ema`, `candles` or `ticker`.
    pub kind: SeriesKind,
    /// `sma`: a count of prices (`50`) or a time (`"5m"`); `ticker`: a time.
    #[serde(default)]
    pub window: Option<Window>,
    /// `ema`: the span N (alpha = 2 / (N + 1)).
    #[serde(default)]
    pub span: Option<u32>,
    /// `candles`: the bucket length (`"1m"`).
    #[serde(default)]
    pub interval: Option<String>,
    /// `ticker`: the bucket length (default: a 1440th of the window).
    #[serde(default)]
    pub step: Option<String>,
    /// `candles`: an open candle's updates at most once per this many
    /// milliseconds of event time; 0 sends every one.
    #[serde(default = "default_update_ms")]
    pub update_ms: u64,
    /// The Redis channel results are published on (`{symbol}` makes one per
    /// symbol); default: the series' name.
    #[serde(default)]
    pub channel: Option<String>,
    /// Time-based kinds: how far behind a key's newest `ts` a quote may
    /// still be taken, in milliseconds.
    #[serde(default = "default_lateness_ms")]
    pub lateness_ms: u64,
    /// Time-based kinds: a quote whose `ts` is more than this ahead of the
    /// bridge's clock is refused, in milliseconds.
    #[serde(default = "default_max_future_ms")]
    pub max_future_ms: u64,
    /// `sma` by time: the most points a key keeps.
    #[serde(default = "default_max_points")]
    pub max_points: usize,
}

impl SeriesSettings {
    /// A table naming `name` and `kind`, every other key at its default
    /// (what a file that writes only those two would give).
    #[must_use]
    pub fn new(name: &str, kind: SeriesKind) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            window: None,
            span: None,
            interval: None,
            step: None,
            update_ms: default_update_ms(),
            channel: None,
            lateness_ms: default_lateness_ms(),
            max_future_ms: default_max_future_ms(),
            max_points: default_max_points(),
        }
    }
}

fn default_update_ms() -> u64 {
    2_000
}

fn default_lateness_ms() -> u64 {
    5_000
}

fn default_max_future_ms() -> u64 {
    60_000
}

fn default_max_points() -> usize {
    MAX_POINTS
}

/// The kinds a `[[series]]` table may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeriesKind {
    /// A simple moving average, by count or by time.
    Sma,
    /// An exponential moving average.
    Ema,
    /// OHLCV candles.
    Candles,
    /// Rolling statistics over a long window.
    Ticker,
}

/// A window: a count of prices, or a duration.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Window {
    /// A count.
    Count(u64),
    /// A duration, e.g. `"5m"`.
    Time(String),
}

/// A series ready to compute: what it is, and where its results go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    /// The computation.
    pub spec: Spec,
    /// The output channel; `{symbol}` is replaced per symbol.
    pub channel: String,
    /// A `ts` more than this ahead of the clock is refused (time-based kinds).
    pub max_future_ms: u64,
}

/// `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"1d"` (or a bare number of
/// milliseconds) in milliseconds.
#[must_use]
pub fn parse_duration_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let amount: u64 = digits.parse().ok()?;
    let unit_ms = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    amount.checked_mul(unit_ms)
}

/// The longest window or interval a series may have: a year.
const MAX_SPAN_MS: u64 = 366 * 86_400_000;

fn defaults_fail(message: String) -> ConfigError {
    ConfigError::Invalid {
        key: "websocket.default_series",
        message,
    }
}

fn fail(message: String) -> ConfigError {
    ConfigError::Invalid {
        key: "series",
        message,
    }
}

fn duration(name: &str, what: &str, text: &str) -> Result<NonZeroU64, ConfigError> {
    parse_duration_ms(text)
        .filter(|ms| (1..=MAX_SPAN_MS).contains(ms))
        .and_then(NonZeroU64::new)
        .ok_or_else(|| {
            fail(format!(
                "series {name:?}: {what} {text:?} is not a duration from 1ms to 366d (e.g. \"500ms\", \"30s\", \"5m\", \"1h\", \"1d\")"
            ))
        })
}

impl SeriesSettings {
    /// The series this table describes, or what is wrong with it.
    fn series(&self) -> Result<Series, ConfigError> {
        let name = self.name.as_str();
        let valid_name = (1..=32).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid_name || name == "sma" {
            return Err(fail(format!(
                "series name {name:?} must be 1-32 characters of [A-Za-z0-9._-] and not \"sma\" (the [sma] section's own series)"
            )));
        }
        let missing = |what: &str| {
            fail(format!(
                "series {name:?} (kind {:?}) needs `{what}`",
                self.kind
            ))
        };
        let kind = match self.kind {
            SeriesKind::Sma => match self.window.as_ref().ok_or_else(|| missing("window"))? {
                Window::Count(count) => Kind::Sma {
                    window: usize::try_from(*count)
                        .ok()
                        .filter(|c| (1..=crate::protocol::MAX_WINDOW).contains(c))
                        .and_then(NonZeroUsize::new)
                        .ok_or_else(|| {
                            fail(format!(
                                "series {name:?}: a window of {count} prices is outside 1..={}",
                                crate::protocol::MAX_WINDOW
                            ))
                        })?,
                },
                Window::Time(text) => Kind::TimeSma {
                    window_ms: duration(name, "window", text)?,
                    max_points: if (1..=MAX_POINTS).contains(&self.max_points) {
                        self.max_points
                    } else {
                        return Err(fail(format!(
                            "series {name:?}: max_points must be between 1 and {MAX_POINTS}"
                        )));
                    },
                },
            },
            SeriesKind::Ema => Kind::Ema {
                span: self.span.ok_or_else(|| missing("span")).and_then(|span| {
                    NonZeroU32::new(span)
                        .filter(|s| s.get() <= 100_000)
                        .ok_or_else(|| fail(format!("series {name:?}: span must be 1..=100000")))
                })?,
            },
            SeriesKind::Candles => Kind::Candles {
                interval_ms: duration(
                    name,
                    "interval",
                    self.interval
                        .as_deref()
                        .ok_or_else(|| missing("interval"))?,
                )?,
                update_ms: self.update_ms,
            },
            SeriesKind::Ticker => {
                let window = match self.window.as_ref().ok_or_else(|| missing("window"))? {
                    Window::Time(text) => duration(name, "window", text)?,
                    Window::Count(_) => {
                        return Err(fail(format!(
                            "series {name:?}: a ticker's window is a time, e.g. \"24h\""
                        )));
                    }
                };
                let step = match &self.step {
                    Some(text) => duration(name, "step", text)?,
                    None => crate::series::rolling::Rolling::default_step(window),
                };
                // A bucket leaving the window re-sums the buckets kept
                // (see series::rolling): at most 10,000 of them.
                if step > window || window.get() / step.get() > 10_000 {
                    return Err(fail(format!(
                        "series {name:?}: the step must be at most the window, and at least a 10000th of it"
                    )));
                }
                Kind::Ticker {
                    window_ms: window,
                    step_ms: step,
                }
            }
        };
        Ok(Series {
            spec: Spec {
                name: name.into(),
                kind,
                lateness_ms: self.lateness_ms,
            },
            channel: self.channel.clone().unwrap_or_else(|| name.to_owned()),
            max_future_ms: self.max_future_ms,
        })
    }
}

/// Every `[[series]]` table as a series, checked against each other and
/// against `[redis]`.
pub fn resolve(
    tables: &[SeriesSettings],
    redis: &RedisSettings,
) -> Result<Vec<Series>, ConfigError> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    // On a cluster each series' channel is partitioned as the output is
    // (`name.{p}`): no `{symbol}`, and no brace of its own, which would move
    // the slot away from the partition's.
    let on_cluster = !redis.cluster_nodes.is_empty();
    let mut seen: Vec<&str> = Vec::new();
    let mut series = Vec::with_capacity(tables.len());
    for table in tables {
        let one = table.series()?;
        if seen.contains(&table.name.as_str()) {
            return Err(fail(format!("series {:?} is named twice", table.name)));
        }
        seen.push(&table.name);
        let channel = one.channel.as_str();
        let pattern = channel.contains(['*', '?', '[']);
        // Gateways take every channel the output's `{symbol}` template
        // matches for SMA results: a series must not publish on one.
        let in_output = redis
            .output
            .split_once("{symbol}")
            .is_some_and(|(before, after)| {
                let sample = channel.replace("{symbol}", "X");
                sample.starts_with(before) && sample.ends_with(after)
            });
        let clashes = channel == redis.output
            || in_output
            || channel == redis.rejected
            || channel.starts_with(&redis.direct_prefix)
            || redis.input.iter().any(|input| input == channel)
            || series.iter().any(|s: &Series| s.channel == channel);
        if on_cluster && channel.contains(['{', '}']) {
            return Err(fail(format!(
                "series {:?}: channel {channel:?} may not hold braces or {{symbol}} on a Redis Cluster, where each series' channel is split into redis.partitions channels NAME.{{p}}",
                table.name
            )));
        }
        if channel.is_empty() || pattern || clashes {
            return Err(fail(format!(
                "series {:?}: channel {channel:?} must be a plain channel name of its own (not redis.output or one its {{symbol}} matches, redis.input, redis.rejected, a direct channel or another series')",
                table.name
            )));
        }
        series.push(one);
    }
    Ok(series)
}

/// The series sockets and event streams may name: `sma` (the `[sma]`
/// section's own, whose keys are plain symbols) and every `[[series]]`;
/// and what a socket subscribes to when it does not say.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// `sma`, then each `[[series]]` in configuration order.
    served: Vec<String>,
    /// `websocket.default_series`.
    defaults: Vec<String>,
    /// `websocket.default_symbols`.
    default_symbols: Vec<String>,
    /// `websocket.default_symbols` in `websocket.default_series`.
    initial: Vec<String>,
}

impl Catalog {
    /// The series `series` serves, with `defaults` for a socket that names
    /// none and `default_symbols` subscribed in them at connection.
    pub fn new(
        series: &[Series],
        defaults: &[String],
        default_symbols: &[String],
    ) -> Result<Self, ConfigError> {
        let served: Vec<String> = std::iter::once(SMA_SERIES.to_owned())
            .chain(series.iter().map(|s| s.spec.name.to_string()))
            .collect();
        let mut catalog = Self {
            served,
            defaults: Vec::new(),
            default_symbols: default_symbols.to_vec(),
            initial: Vec::new(),
        };
        if defaults.is_empty() {
            return Err(defaults_fail(
                "must name at least one series (\"sma\" is the [sma] section's)".into(),
            ));
        }
        if let Some(unknown) = defaults.iter().find(|name| !catalog.serves(name)) {
            return Err(defaults_fail(format!(
                "names {unknown:?}, which is not served: expected one of {:?}",
                catalog.served
            )));
        }
        catalog.defaults = defaults.to_vec();
        catalog.initial = catalog
            .subscriptions(default_symbols, None)
            .map_err(|message| ConfigError::Invalid {
                key: "websocket.default_symbols",
                message,
            })?;
        Ok(catalog)
    }

    /// Every series served, `sma` first: what the welcome lists.
    #[must_use]
    pub fn served(&self) -> &[String] {
        &self.served
    }

    /// What a new socket subscribes to (before its entitlements).
    #[must_use]
    pub fn initial(&self) -> &[String] {
        &self.initial
    }

    /// `websocket.default_symbols`, in no series yet.
    #[must_use]
    pub fn default_symbols(&self) -> &[String] {
        &self.default_symbols
    }

    fn serves(&self, name: &str) -> bool {
        self.served.iter().any(|served| served == name)
    }

    /// The subscription entries `symbols` names in `series` (absent: the
    /// socket's default series): `AAPL` in `candles.1m` is
    /// `AAPL@candles.1m`, in `sma` plain `AAPL`; an entry that names its
    /// series already (`AAPL@ema.20`) stands as it is. Unsorted. The error
    /// names a series that is not served.
    pub fn subscriptions(
        &self,
        symbols: &[String],
        series: Option<&[String]>,
    ) -> Result<Vec<String>, String> {
        let series = series.unwrap_or(&self.defaults);
        if let Some(unknown) = series.iter().find(|name| !self.serves(name)) {
            return Err(format!(
                "unknown series {unknown:?}: this bridge serves {:?}",
                self.served
            ));
        }
        let mut entries = Vec::with_capacity(symbols.len() * series.len());
        for symbol in symbols {
            let name = StreamName::split(symbol);
            if let Some(own) = name.series {
                if !self.serves(own) || own == SMA_SERIES {
                    return Err(format!(
                        "unknown series {own:?} in {symbol:?}: this bridge serves {:?} (the sma's keys are plain symbols)",
                        self.served
                    ));
                }
                entries.push(symbol.clone());
                continue;
            }
            for series in series {
                let series = (series != SMA_SERIES).then_some(series.as_str());
                entries.push(StreamName { series, ..name }.joined());
            }
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn catalog_of(defaults: &[&str]) -> Result<Catalog, ConfigError> {
        let candles = SeriesSettings {
            interval: Some("1m".into()),
            ..SeriesSettings::new("candles.1m", SeriesKind::Candles)
        };
        Catalog::new(&[candles.series()?], &names(defaults), &names(&["*"]))
    }

    #[test]
    fn subscriptions_name_keys_in_each_series() {
        let catalog = catalog_of(&["sma"]).expect("valid");
        assert_eq!(catalog.served(), ["sma", "candles.1m"]);
        assert_eq!(catalog.initial(), ["*"]);
        let both = names(&["sma", "candles.1m"]);
        assert_eq!(
            catalog.subscriptions(&names(&["AAPL", "*"]), Some(&both)),
            Ok(names(&["AAPL", "AAPL@candles.1m", "*", "*@candles.1m"]))
        );
        assert_eq!(
            catalog.subscriptions(&names(&["MSFT@candles.1m", "TSLA"]), None),
            Ok(names(&["MSFT@candles.1m", "TSLA"]))
        );
        let unknown = catalog.subscriptions(&names(&["A"]), Some(&names(&["ema.9"])));
        assert!(unknown.is_err_and(|e| e.contains("unknown series \"ema.9\"")));
        assert!(catalog.subscriptions(&names(&["A@sma"]), None).is_err());
        let defaults = catalog_of(&["candles.1m"]).expect("valid");
        assert_eq!(defaults.initial(), ["*@candles.1m"]);
        assert!(catalog_of(&["ema.9"]).is_err(), "a default must be served");
        assert!(catalog_of(&[]).is_err());
    }

    #[test]
    fn durations_read_with_their_units() {
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("30s"), Some(30_000));
        assert_eq!(parse_duration_ms("5m"), Some(300_000));
        assert_eq!(parse_duration_ms("24h"), Some(86_400_000));
        assert_eq!(parse_duration_ms("1d"), Some(86_400_000));
        assert_eq!(parse_duration_ms("1500"), Some(1_500));
        for bad in ["", "m", "5 minutes", "-1s", "1.5m", "99999999999999999999d"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
    }
}
