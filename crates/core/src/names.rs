//! The names the contract constrains: symbols, client codes and epochs.

/// Longest symbol accepted, in bytes (all allowed characters are ASCII).
pub const MAX_SYMBOL_LEN: usize = 32;

/// Longest client code accepted, in bytes.
pub const MAX_CLIENT_CODE_LEN: usize = 64;

/// The symbol that, in a subscription, stands for every public symbol.
pub const ALL_SYMBOLS: &str = "*";

/// A symbol is 1–32 characters of `[A-Za-z0-9._:/-]`.
#[must_use]
pub fn is_symbol(s: &str) -> bool {
    (1..=MAX_SYMBOL_LEN).contains(&s.len()) && s.bytes().all(is_symbol_byte)
}

/// Whether `b` may appear in a symbol.
#[must_use]
pub const fn is_symbol_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-')
}

/// A client code is 1–64 characters of `[A-Za-z0-9_-]`.
#[must_use]
pub fn is_client_code(s: &str) -> bool {
    (1..=MAX_CLIENT_CODE_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// Longest epoch accepted, in bytes.
pub const MAX_EPOCH_LEN: usize = 32;

/// An epoch (the name of one run of a key's sequence) is 1–32 characters of
/// `[A-Za-z0-9_-]`: written into messages as it is, so JSON never escapes it.
#[must_use]
pub fn is_epoch(s: &str) -> bool {
    (1..=MAX_EPOCH_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// A subscription entry is a symbol or [`ALL_SYMBOLS`], optionally followed
/// by [`SERIES_SEPARATOR`] and a series name ([`StreamName`]).
#[must_use]
pub fn is_subscription(s: &str) -> bool {
    let name = StreamName::split(s);
    (name.symbol == ALL_SYMBOLS || is_symbol(name.symbol)) && name.series.is_none_or(is_series)
}

/// A key's name is a symbol, or a symbol, [`SERIES_SEPARATOR`] and a
/// series name (a `[[series]]` key's).
#[must_use]
pub fn is_key(s: &str) -> bool {
    let name = StreamName::split(s);
    is_symbol(name.symbol) && name.series.is_none_or(is_series)
}

/// What joins a symbol and a series in a key's name: `AAPL@candles.1m` is
/// the key of symbol `AAPL` in series `candles.1m` (as an exchange names
/// its streams `btcusdt@kline_1m`). Never in a symbol or a series name, so
/// the split is unambiguous, and a name without it is the SMA's key.
pub const SERIES_SEPARATOR: char = '@';

/// Longest series name accepted, in bytes.
pub const MAX_SERIES_LEN: usize = 32;

/// The name clients use for the `[sma]` section's own series, which keys
/// spell without a suffix.
pub const SMA_SERIES: &str = "sma";

/// A series name is 1–32 characters of `[A-Za-z0-9._-]`.
#[must_use]
pub fn is_series(s: &str) -> bool {
    (1..=MAX_SERIES_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A key's (or a subscription entry's) name, split: the symbol (or
/// [`ALL_SYMBOLS`]) and, for a `[[series]]` key, the series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamName<'a> {
    /// The symbol, or `"*"` in a subscription.
    pub symbol: &'a str,
    /// The series; `None` for the SMA.
    pub series: Option<&'a str>,
}

impl<'a> StreamName<'a> {
    /// Splits `name` at its [`SERIES_SEPARATOR`], if it has one.
    #[must_use]
    pub fn split(name: &'a str) -> Self {
        match name.split_once(SERIES_SEPARATOR) {
            Some((symbol, series)) => Self {
                symbol,
                series: Some(series),
            },
            None => Self {
                symbol: name,
                series: None,
            },
        }
    }

    /// Whether this subscription entry is the wildcard of its series.
    #[must_use]
    pub fn is_wildcard(self) -> bool {
        self.symbol == ALL_SYMBOLS
    }

    /// Whether the wildcard entry `wildcard` (`"*"` or `"*@series"`) covers
    /// the key named `key`, without building the wildcard's name.
    #[must_use]
    pub fn wildcard_covers(wildcard: &str, key: &str) -> bool {
        let (wildcard, key) = (StreamName::split(wildcard), StreamName::split(key));
        wildcard.is_wildcard() && wildcard.series == key.series
    }

    /// The name written back out: `symbol` or `symbol@series`.
    #[must_use]
    pub fn joined(self) -> String {
        match self.series {
            Some(series) => format!("{}{SERIES_SEPARATOR}{series}", self.symbol),
            None => self.symbol.to_owned(),
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols() {
        for ok in [
            "A",
            "AAPL",
            "BRK.B",
            "BTC/USD",
            "ES:F",
            "x_y-z",
            &"S".repeat(32),
        ] {
            assert!(is_symbol(ok), "{ok:?} should be a symbol");
        }
        for bad in ["", "A B", "AAPL!", "é", "*", &"S".repeat(33)] {
            assert!(!is_symbol(bad), "{bad:?} should not be a symbol");
        }
    }

    #[test]
    fn client_codes() {
        for ok in ["a", "acme", "ACME_01", "x-y", &"c".repeat(64)] {
            assert!(is_client_code(ok), "{ok:?} should be a client code");
        }
        for bad in ["", "a.b", "a/b", "a b", "ü", &"c".repeat(65)] {
            assert!(!is_client_code(bad), "{bad:?} should not be a client code");
        }
    }

    #[test]
    fn subscriptions_accept_the_wildcard() {
        assert!(is_subscription("*"));
        assert!(is_subscription("AAPL"));
        assert!(!is_subscription("AA*"));
    }

    #[test]
    fn series_keys_split_at_the_separator() {
        for ok in ["AAPL@candles.1m", "*@ema.20", "BRK/B@sma-5m"] {
            assert!(is_subscription(ok), "{ok:?} should be a subscription");
        }
        for bad in ["AAPL@", "@ema", "AAPL@a@b", "AAPL@x/y", "A*@ema"] {
            assert!(!is_subscription(bad), "{bad:?} should not be");
        }
        let name = StreamName::split("ES:F@candles.1m");
        assert_eq!((name.symbol, name.series), ("ES:F", Some("candles.1m")));
        assert_eq!(name.joined(), "ES:F@candles.1m");
        assert!(StreamName::wildcard_covers("*@ema", "AAPL@ema"));
        assert!(!StreamName::wildcard_covers("*", "AAPL@ema"));
        assert!(StreamName::wildcard_covers("*", "AAPL"));
        assert!(!StreamName::wildcard_covers("*@ema", "AAPL"));
    }
}
