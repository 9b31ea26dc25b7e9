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

/// A subscription entry is a symbol or [`ALL_SYMBOLS`].
#[must_use]
pub fn is_subscription(s: &str) -> bool {
    s == ALL_SYMBOLS || is_symbol(s)
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
}
