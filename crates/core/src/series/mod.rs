//! Indicators beyond the moving average of `crate::sma`, each a pure,
//! synchronous computation over one key's quotes: no I/O, no clock.
//!
//! [`Spec`] names one configured series and its kind; [`State`] is one
//! key's state of it, which takes a [`Input`] per quote and yields what the
//! series publishes for it ([`Output`]), written out by [`Output::encode`].

pub mod candles;
pub mod ema;
pub mod rolling;
pub mod timed;
pub mod total;

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};

use serde::{Deserialize, Serialize};

use self::candles::{Bar, Candles, CandlesState, Pushed};
use self::ema::{Ema, EmaState};
use self::rolling::{Rolling, RollingPushed, RollingState, Ticker};
use self::timed::{TimeMean, TimePushed, TimeSma, TimeSmaState};
use crate::decimal::Decimal;
use crate::frame::BarState;
use crate::sma::{Average, SmaWindow, WindowState};

/// What a series computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The mean of the key's last `window` prices.
    Sma {
        /// Prices per mean.
        window: NonZeroUsize,
    },
    /// The mean of the key's prices over the last `window_ms` of event time.
    TimeSma {
        /// The window, in milliseconds.
        window_ms: NonZeroU64,
        /// At most this many points a key.
        max_points: usize,
    },
    /// The exponential moving average of span `span`, as pandas computes it.
    Ema {
        /// The span.
        span: NonZeroU32,
    },
    /// OHLCV candles of `interval_ms`.
    Candles {
        /// The bucket length, in milliseconds.
        interval_ms: NonZeroU64,
        /// An open candle's updates go out at most once per this much event
        /// time (0: on every quote); a closed candle always goes out.
        update_ms: u64,
    },
    /// Rolling statistics over `window_ms`, in steps of `step_ms`.
    Ticker {
        /// The window, in milliseconds.
        window_ms: NonZeroU64,
        /// The bucket length, in milliseconds.
        step_ms: NonZeroU64,
    },
}

/// One configured series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Its name: on every result, and what clients subscribe to.
    pub name: Box<str>,
    /// What it computes.
    pub kind: Kind,
    /// How far behind the key's newest `ts` a quote may be and still be
    /// taken by a time-based kind.
    pub lateness_ms: u64,
}

impl Spec {
    /// Whether the kind goes by event time (and so refuses late quotes).
    #[must_use]
    pub fn is_timed(&self) -> bool {
        !matches!(self.kind, Kind::Sma { .. } | Kind::Ema { .. })
    }

    /// A key's state of this series, before its first quote.
    #[must_use]
    pub fn start(&self) -> State {
        match self.kind {
            Kind::Sma { window } => State::Sma(SmaWindow::new(window)),
            Kind::TimeSma {
                window_ms,
                max_points,
            } => State::TimeSma(TimeSma::new(window_ms, self.lateness_ms, max_points)),
            Kind::Ema { span } => State::Ema(Ema::new(span)),
            Kind::Candles { interval_ms, .. } => State::Candles {
                candles: Candles::new(interval_ms),
                last_update: None,
            },
            Kind::Ticker { window_ms, step_ms } => {
                State::Ticker(Rolling::new(window_ms, step_ms, self.lateness_ms))
            }
        }
    }
}

/// One quote, as the series read it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Input {
    /// Event time, Unix milliseconds.
    pub ts: u64,
    /// The price.
    pub price: f64,
    /// The price as the decimal it was written as, if exact.
    pub decimal: Option<Decimal>,
    /// The volume and its decimal, if the quote had one.
    pub volume: Option<(f64, Option<Decimal>)>,
}

/// One key's state of one series.
#[derive(Debug, Clone)]
pub enum State {
    /// See [`Kind::Sma`].
    Sma(SmaWindow),
    /// See [`Kind::TimeSma`].
    TimeSma(TimeSma),
    /// See [`Kind::Ema`].
    Ema(Ema),
    /// See [`Kind::Candles`].
    Candles {
        /// The candles.
        candles: Candles,
        /// The `ts` of the open candle's last update that went out.
        last_update: Option<u64>,
    },
    /// See [`Kind::Ticker`].
    Ticker(Rolling),
}

/// What a key's state of a series keeps, for persisting it (durable stream
/// mode saves it in the batch's MULTI/EXEC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SavedState {
    /// A count SMA's window.
    Sma(WindowState),
    /// A time SMA's points.
    TimeSma(TimeSmaState),
    /// An EMA's value.
    Ema(EmaState),
    /// Candles: the open one, and the last update sent.
    Candles {
        /// The candles.
        candles: CandlesState,
        /// The `ts` of the open candle's last update that went out.
        last_update: Option<u64>,
    },
    /// A ticker's buckets.
    Ticker(RollingState),
}

impl State {
    /// When the feed's progress closes this state's open candle, should its
    /// key go quiet: the candle's end plus `lateness_ms` of event time.
    /// `None` for other kinds, and while no candle is open.
    #[must_use]
    pub fn closes_at(&self, spec: &Spec) -> Option<u64> {
        match self {
            State::Candles { candles, .. } => candles
                .open()
                .map(|bar| bar.end_ms.saturating_add(spec.lateness_ms)),
            _ => None,
        }
    }

    /// Closes the open candle if the feed's event time `feed_ms` is past
    /// [`State::closes_at`]: its key went quiet while the feed went on. A
    /// quote for that bucket is late from then on.
    pub fn close_quiet(&mut self, spec: &Spec, feed_ms: u64) -> Option<Output> {
        let State::Candles {
            candles,
            last_update,
        } = self
        else {
            return None;
        };
        let bar = candles.close_before(feed_ms.checked_sub(spec.lateness_ms)?)?;
        // The key's next candle is a new one, and goes out at once.
        *last_update = None;
        Some(Output::Candle(bar))
    }

    /// Everything needed to continue this state elsewhere bit for bit.
    #[must_use]
    pub fn save(&self) -> SavedState {
        match self {
            State::Sma(window) => SavedState::Sma(window.state()),
            State::TimeSma(window) => SavedState::TimeSma(window.state()),
            State::Ema(ema) => SavedState::Ema(ema.state()),
            State::Candles {
                candles,
                last_update,
            } => SavedState::Candles {
                candles: candles.state(),
                last_update: *last_update,
            },
            State::Ticker(rolling) => SavedState::Ticker(rolling.state()),
        }
    }
}

impl Spec {
    /// A key's state of this series continuing from `saved`; a state saved
    /// for another kind (the configuration changed) starts afresh.
    #[must_use]
    pub fn restore(&self, saved: SavedState) -> State {
        match (self.kind, saved) {
            (Kind::Sma { window }, SavedState::Sma(state)) => {
                State::Sma(SmaWindow::restore(window, state))
            }
            (
                Kind::TimeSma {
                    window_ms,
                    max_points,
                },
                SavedState::TimeSma(state),
            ) => State::TimeSma(TimeSma::restore(
                window_ms,
                self.lateness_ms,
                max_points,
                state,
            )),
            (Kind::Ema { span }, SavedState::Ema(state)) => State::Ema(Ema::restore(span, state)),
            (
                Kind::Candles { interval_ms, .. },
                SavedState::Candles {
                    candles,
                    last_update,
                },
            ) => State::Candles {
                candles: Candles::restore(interval_ms, candles),
                last_update,
            },
            (Kind::Ticker { window_ms, step_ms }, SavedState::Ticker(state)) => State::Ticker(
                Rolling::restore(window_ms, step_ms, self.lateness_ms, state),
            ),
            _ => self.start(),
        }
    }
}

/// What one quote made a series publish.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A count SMA.
    Sma(Average),
    /// A time SMA.
    TimeSma(TimeMean),
    /// An EMA.
    Ema(f64),
    /// A candle, open or closed.
    Candle(Bar),
    /// A ticker.
    Ticker(Ticker),
}

/// What one quote did to a series of a key.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outputs {
    /// What goes out, in order (a closed candle before the next open one).
    pub results: Vec<Output>,
    /// The quote was late for this series and left out.
    pub late: bool,
}

impl State {
    /// Takes one quote.
    pub fn push(&mut self, spec: &Spec, input: &Input) -> Outputs {
        let mut outputs = Outputs::default();
        match self {
            State::Sma(window) => {
                let average = window.push(input.price, input.decimal);
                outputs.results.push(Output::Sma(average));
            }
            State::TimeSma(window) => match window.push(input.ts, input.price, input.decimal) {
                TimePushed::Mean(mean) => outputs.results.push(Output::TimeSma(mean)),
                TimePushed::Late => outputs.late = true,
            },
            State::Ema(ema) => outputs.results.push(Output::Ema(ema.push(input.price))),
            State::Candles {
                candles,
                last_update,
            } => {
                let update_ms = match spec.kind {
                    Kind::Candles { update_ms, .. } => update_ms,
                    _ => 0,
                };
                match candles.push(input) {
                    Pushed::Taken { closed, open } => {
                        let opened = closed.is_some() || last_update.is_none();
                        if let Some(closed) = closed {
                            outputs.results.push(Output::Candle(closed));
                        }
                        // A new candle always shows; an open one's updates
                        // at most once per `update_ms` of event time.
                        let due = opened
                            || last_update
                                .is_none_or(|last| input.ts >= last.saturating_add(update_ms));
                        if due {
                            *last_update = Some(input.ts);
                            outputs.results.push(Output::Candle(open.clone()));
                        }
                    }
                    Pushed::Late => outputs.late = true,
                }
            }
            State::Ticker(rolling) => {
                match rolling.push(input.ts, input.price, input.decimal, input.volume) {
                    RollingPushed::Ticker(ticker) => outputs.results.push(Output::Ticker(ticker)),
                    RollingPushed::Late => outputs.late = true,
                }
            }
        }
        outputs
    }
}

/// Where a result stands and whose it is: the parts every result carries.
#[derive(Debug, Clone, Copy)]
pub struct Position<'a> {
    /// The key's symbol.
    pub symbol: &'a str,
    /// The client code of a private key.
    pub client: Option<&'a str>,
    /// The triggering quote's `ts`.
    pub ts: u64,
    /// The result's position in its series key's sequence.
    pub seq: u64,
    /// The run of that sequence.
    pub epoch: &'a str,
}

impl Output {
    /// Whether the result is a candle, and a closed one: what conflation,
    /// rate limits and closed-only subscriptions go by.
    #[must_use]
    pub fn bar_state(&self) -> BarState {
        match self {
            Output::Candle(bar) if bar.closed => BarState::Closed,
            Output::Candle(_) => BarState::Open,
            _ => BarState::NotABar,
        }
    }

    /// The result as published: one JSON object naming the series.
    #[must_use]
    pub fn encode(&self, spec: &Spec, price: f64, at: &Position<'_>) -> String {
        let series = &*spec.name;
        let json = match (self, spec.kind) {
            (Output::Sma(average), Kind::Sma { window }) => serde_json::to_string(&SmaFrame {
                symbol: at.symbol,
                series,
                price,
                sma: average.mean,
                window: window.get(),
                count: average.count,
                exact: exactness(average.exact),
                tail: Tail::of(at),
            }),
            (Output::TimeSma(mean), Kind::TimeSma { window_ms, .. }) => {
                serde_json::to_string(&TimeSmaFrame {
                    symbol: at.symbol,
                    series,
                    price,
                    sma: mean.mean,
                    window_ms: window_ms.get(),
                    count: mean.count,
                    complete: mean.complete,
                    exact: exactness(mean.exact),
                    tail: Tail::of(at),
                })
            }
            (Output::Ema(value), Kind::Ema { span }) => serde_json::to_string(&EmaFrame {
                symbol: at.symbol,
                series,
                price,
                ema: *value,
                span: span.get(),
                tail: Tail::of(at),
            }),
            (Output::Candle(bar), Kind::Candles { interval_ms, .. }) => {
                let volume = bar.volume();
                let vwap = bar.vwap();
                serde_json::to_string(&CandleFrame {
                    symbol: at.symbol,
                    series,
                    interval_ms: interval_ms.get(),
                    start: bar.start_ms,
                    end: bar.end_ms,
                    open: bar.open,
                    high: bar.high,
                    low: bar.low,
                    close: bar.close,
                    volume: volume.value,
                    trades: bar.trades,
                    vwap: vwap.map(|v| v.value),
                    closed: bar.closed,
                    exact: exactness(volume.exact && vwap.is_none_or(|v| v.exact)),
                    tail: Tail::of(at),
                })
            }
            (Output::Ticker(ticker), Kind::Ticker { window_ms, .. }) => {
                serde_json::to_string(&TickerFrame {
                    symbol: at.symbol,
                    series,
                    window_ms: window_ms.get(),
                    from: ticker.from_ms,
                    open: ticker.open,
                    high: ticker.high,
                    low: ticker.low,
                    last: ticker.last,
                    change: ticker.change.value,
                    volume: ticker.volume.value,
                    trades: ticker.trades,
                    exact: exactness(ticker.change.exact && ticker.volume.exact),
                    tail: Tail::of(at),
                })
            }
            // A state always yields its own kind's output.
            _ => Ok(String::new()),
        };
        json.unwrap_or_default()
    }
}

/// `Some(false)` when a figure is not exact: the member is written only then.
fn exactness(exact: bool) -> Option<bool> {
    (!exact).then_some(false)
}

/// The members every result ends with.
#[derive(Serialize)]
struct Tail<'a> {
    ts: u64,
    seq: u64,
    epoch: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a str>,
}

impl<'a> Tail<'a> {
    fn of(at: &Position<'a>) -> Self {
        Self {
            ts: at.ts,
            seq: at.seq,
            epoch: at.epoch,
            client: at.client,
        }
    }
}

#[derive(Serialize)]
struct SmaFrame<'a> {
    symbol: &'a str,
    series: &'a str,
    price: f64,
    sma: f64,
    window: usize,
    count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    exact: Option<bool>,
    #[serde(flatten)]
    tail: Tail<'a>,
}

#[derive(Serialize)]
struct TimeSmaFrame<'a> {
    symbol: &'a str,
    series: &'a str,
    price: f64,
    sma: f64,
    window_ms: u64,
    count: usize,
    complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    exact: Option<bool>,
    #[serde(flatten)]
    tail: Tail<'a>,
}

#[derive(Serialize)]
struct EmaFrame<'a> {
    symbol: &'a str,
    series: &'a str,
    price: f64,
    ema: f64,
    span: u32,
    #[serde(flatten)]
    tail: Tail<'a>,
}

#[derive(Serialize)]
struct CandleFrame<'a> {
    symbol: &'a str,
    series: &'a str,
    interval_ms: u64,
    start: u64,
    end: u64,
    open: f64,
    high: f64,
    low: f64,
    close: f64,
    volume: f64,
    trades: u64,
    vwap: Option<f64>,
    closed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    exact: Option<bool>,
    #[serde(flatten)]
    tail: Tail<'a>,
}

#[derive(Serialize)]
struct TickerFrame<'a> {
    symbol: &'a str,
    series: &'a str,
    window_ms: u64,
    from: u64,
    open: f64,
    high: f64,
    low: f64,
    last: f64,
    change: f64,
    volume: f64,
    trades: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    exact: Option<bool>,
    #[serde(flatten)]
    tail: Tail<'a>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, kind: Kind) -> Spec {
        Spec {
            name: name.into(),
            kind,
            lateness_ms: 5_000,
        }
    }

    fn input(ts: u64, price: &str, volume: Option<&str>) -> Input {
        Input {
            ts,
            price: price.parse().expect("a number"),
            decimal: Decimal::parse(price),
            volume: volume.map(|v| (v.parse().expect("a number"), Decimal::parse(v))),
        }
    }

    fn at(seq: u64) -> Position<'static> {
        Position {
            symbol: "AAPL",
            client: None,
            ts: 60_500,
            seq,
            epoch: "9f2c01ab",
        }
    }

    #[test]
    fn each_kind_writes_one_json_object_naming_its_series() {
        let nz64 = |v| NonZeroU64::new(v).expect("non-zero");
        let cases = [
            (
                spec(
                    "ema.20",
                    Kind::Ema {
                        span: NonZeroU32::new(20).expect("non-zero"),
                    },
                ),
                r#"{"symbol":"AAPL","series":"ema.20","price":189.5,"ema":189.5,"span":20,"ts":60500,"seq":1,"epoch":"9f2c01ab"}"#,
            ),
            (
                spec(
                    "sma.5m",
                    Kind::TimeSma {
                        window_ms: nz64(300_000),
                        max_points: 10,
                    },
                ),
                r#"{"symbol":"AAPL","series":"sma.5m","price":189.5,"sma":189.5,"window_ms":300000,"count":1,"complete":true,"ts":60500,"seq":1,"epoch":"9f2c01ab"}"#,
            ),
            (
                spec(
                    "candles.1m",
                    Kind::Candles {
                        interval_ms: nz64(60_000),
                        update_ms: 2_000,
                    },
                ),
                r#"{"symbol":"AAPL","series":"candles.1m","interval_ms":60000,"start":60000,"end":120000,"open":189.5,"high":189.5,"low":189.5,"close":189.5,"volume":100.0,"trades":1,"vwap":189.5,"closed":false,"ts":60500,"seq":1,"epoch":"9f2c01ab"}"#,
            ),
            (
                spec(
                    "ticker.24h",
                    Kind::Ticker {
                        window_ms: nz64(86_400_000),
                        step_ms: nz64(60_000),
                    },
                ),
                r#"{"symbol":"AAPL","series":"ticker.24h","window_ms":86400000,"from":0,"open":189.5,"high":189.5,"low":189.5,"last":189.5,"change":0.0,"volume":100.0,"trades":1,"ts":60500,"seq":1,"epoch":"9f2c01ab"}"#,
            ),
        ];
        for (spec, want) in cases {
            let mut state = spec.start();
            let outputs = state.push(&spec, &input(60_500, "189.5", Some("100")));
            assert!(!outputs.late);
            assert_eq!(outputs.results.len(), 1, "{}", spec.name);
            assert_eq!(outputs.results[0].encode(&spec, 189.5, &at(1)), want);
        }
    }

    #[test]
    fn every_kind_saved_as_json_continues_bit_for_bit() {
        let nz64 = |v| NonZeroU64::new(v).expect("non-zero");
        let specs = [
            spec(
                "sma.3",
                Kind::Sma {
                    window: NonZeroUsize::new(3).expect("non-zero"),
                },
            ),
            spec(
                "sma.1s",
                Kind::TimeSma {
                    window_ms: nz64(1_000),
                    max_points: 5,
                },
            ),
            spec(
                "ema.3",
                Kind::Ema {
                    span: NonZeroU32::new(3).expect("non-zero"),
                },
            ),
            spec(
                "candles.1s",
                Kind::Candles {
                    interval_ms: nz64(1_000),
                    update_ms: 300,
                },
            ),
            spec(
                "ticker.5s",
                Kind::Ticker {
                    window_ms: nz64(5_000),
                    step_ms: nz64(500),
                },
            ),
        ];
        let before = [
            (100, "1.5", "1"),
            (400, "1e-30", "2"),
            (900, "2.25", "0.5"),
            (1_300, "3", "7"),
        ];
        let after = [
            (1_350, "4.125", "1"),
            (1_200, "5", "1"),
            (2_600, "0.1", "3"),
            (9_000, "7", "1"),
        ];
        for spec in specs {
            let mut original = spec.start();
            for (ts, price, volume) in before {
                original.push(&spec, &input(ts, price, Some(volume)));
            }
            let json = serde_json::to_string(&original.save()).expect("serializes");
            let mut restored = spec.restore(serde_json::from_str(&json).expect("reads"));
            for (ts, price, volume) in after {
                let want = original.push(&spec, &input(ts, price, Some(volume)));
                let got = restored.push(&spec, &input(ts, price, Some(volume)));
                let text = |o: &Outputs| -> Vec<String> {
                    o.results
                        .iter()
                        .map(|r| r.encode(&spec, 0.0, &at(1)))
                        .collect()
                };
                assert_eq!(text(&got), text(&want), "{} after {json}", spec.name);
                assert_eq!(got.late, want.late);
            }
        }
    }

    #[test]
    fn an_open_candle_is_updated_at_most_once_per_update_interval() {
        let spec = spec(
            "candles.1m",
            Kind::Candles {
                interval_ms: NonZeroU64::new(60_000).expect("non-zero"),
                update_ms: 2_000,
            },
        );
        let mut state = spec.start();
        let counts: Vec<usize> = [60_000, 61_000, 61_999, 62_000, 119_000, 120_000]
            .into_iter()
            .map(|ts| state.push(&spec, &input(ts, "1", None)).results.len())
            .collect();
        // Opened; too soon; too soon; due; due; closed and reopened.
        assert_eq!(counts, vec![1, 0, 0, 1, 1, 2]);
    }

    #[test]
    fn a_late_quote_is_left_out_of_timed_series_only() {
        let timed = spec(
            "sma.1s",
            Kind::TimeSma {
                window_ms: NonZeroU64::new(1_000).expect("non-zero"),
                max_points: 100,
            },
        );
        let counted = spec(
            "sma.3",
            Kind::Sma {
                window: NonZeroUsize::new(3).expect("non-zero"),
            },
        );
        assert!(timed.is_timed() && !counted.is_timed());
        let (mut a, mut b) = (timed.start(), counted.start());
        a.push(&timed, &input(100_000, "1", None));
        b.push(&counted, &input(100_000, "1", None));
        assert!(a.push(&timed, &input(10_000, "2", None)).late);
        assert!(!b.push(&counted, &input(10_000, "2", None)).late);
    }
}
