//! The quote parser: bytes from the input channel to a validated [`Quote`].
//!
//! Pure and synchronous. One pass over the payload, borrowing strings from it
//! where JSON escapes allow; no intermediate `serde_json::Value`.

use std::borrow::Cow;
use std::fmt;

use serde::Serialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

use crate::names;

/// Largest quote payload accepted, in bytes.
pub const MAX_QUOTE_BYTES: usize = 64 * 1024;

/// A validated quote. Serializes back to the input format.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quote<'a> {
    /// 1–32 characters of `[A-Za-z0-9._:/-]`.
    pub symbol: Cow<'a, str>,
    /// A finite price.
    pub price: f64,
    /// Milliseconds since the Unix epoch; `None` when the payload had none
    /// (the listener then stamps the arrival time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// The client code of a private quote; `None` for a public one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<Cow<'a, str>>,
}

/// Why a payload was rejected. [`Reject::label`] is the stable short form used
/// in metrics; `Display` is the message republished with the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// The payload is larger than [`MAX_QUOTE_BYTES`].
    #[error("payload of {0} bytes exceeds the 65536-byte limit")]
    TooLarge(usize),
    /// The payload is not valid JSON (or not UTF-8).
    #[error("not valid JSON: {0}")]
    Malformed(String),
    /// Valid JSON, but not an object.
    #[error("not a JSON object")]
    NotObject,
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field appears twice.
    #[error("duplicate field `{0}`")]
    DuplicateField(&'static str),
    /// `symbol` is not a string of 1–32 allowed characters.
    #[error("invalid symbol: expected a string of 1-32 characters from [A-Za-z0-9._:/-]")]
    InvalidSymbol,
    /// `price` is not a finite number.
    #[error("invalid price: expected a finite number")]
    InvalidPrice,
    /// `ts` is not a non-negative integer.
    #[error("invalid ts: expected an integer count of milliseconds since the Unix epoch")]
    InvalidTs,
    /// `client` is not a valid client code.
    #[error("invalid client: expected a string of 1-64 characters from [A-Za-z0-9_-]")]
    InvalidClient,
    /// The quote would open a new SMA key beyond `sma.max_keys`.
    #[error("too many distinct keys: sma.max_keys reached")]
    TooManyKeys,
}

impl Reject {
    /// Every label, in a fixed order (for metrics that list them all).
    pub const LABELS: [&'static str; 10] = [
        "too_large",
        "malformed",
        "not_object",
        "missing_field",
        "duplicate_field",
        "invalid_symbol",
        "invalid_price",
        "invalid_ts",
        "invalid_client",
        "too_many_keys",
    ];

    /// The position of this reason's label in [`Reject::LABELS`].
    #[must_use]
    pub fn index(&self) -> usize {
        match self {
            Reject::TooLarge(_) => 0,
            Reject::Malformed(_) => 1,
            Reject::NotObject => 2,
            Reject::MissingField(_) => 3,
            Reject::DuplicateField(_) => 4,
            Reject::InvalidSymbol => 5,
            Reject::InvalidPrice => 6,
            Reject::InvalidTs => 7,
            Reject::InvalidClient => 8,
            Reject::TooManyKeys => 9,
        }
    }

    /// A short, stable name for this reason.
    #[must_use]
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

/// Parses and validates one quote payload.
pub fn parse(payload: &[u8]) -> Result<Quote<'_>, Reject> {
    if payload.len() > MAX_QUOTE_BYTES {
        return Err(Reject::TooLarge(payload.len()));
    }
    let mut reason = None;
    let mut de = serde_json::Deserializer::from_slice(payload);
    let parsed = QuoteSeed {
        reason: &mut reason,
    }
    .deserialize(&mut de)
    .and_then(|quote| de.end().map(|()| quote));
    match parsed {
        Ok(quote) => Ok(quote),
        Err(err) => Err(reason.unwrap_or_else(|| match err.classify() {
            serde_json::error::Category::Data => Reject::NotObject,
            _ => Reject::Malformed(err.to_string()),
        })),
    }
}

/// Drives the deserializer and records *why* it failed, which serde's error
/// type cannot carry in a form we can match on.
struct QuoteSeed<'r> {
    reason: &'r mut Option<Reject>,
}

impl<'de> DeserializeSeed<'de> for QuoteSeed<'_> {
    type Value = Quote<'de>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

/// A string that borrows from the payload unless JSON escapes forced a copy.
/// (serde's own `Cow<str>` always copies.)
struct CowStr<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CowStrVisitor;
        impl<'de> Visitor<'de> for CowStrVisitor {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(CowStrVisitor)
    }
}

impl QuoteSeed<'_> {
    fn fail<E: de::Error>(&mut self, reason: Reject) -> E {
        let err = E::custom(&reason);
        *self.reason = Some(reason);
        err
    }
}

impl<'de> Visitor<'de> for QuoteSeed<'_> {
    type Value = Quote<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a quote object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut symbol: Option<Cow<'de, str>> = None;
        let mut price: Option<f64> = None;
        let mut ts: Option<Option<u64>> = None;
        let mut client: Option<Option<Cow<'de, str>>> = None;

        while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
            match key.as_ref() {
                "symbol" => {
                    if symbol.is_some() {
                        return Err(self.fail(Reject::DuplicateField("symbol")));
                    }
                    match map.next_value::<CowStr<'de>>() {
                        Ok(CowStr(s)) if names::is_symbol(&s) => symbol = Some(s),
                        _ => return Err(self.fail(Reject::InvalidSymbol)),
                    }
                }
                "price" => {
                    if price.is_some() {
                        return Err(self.fail(Reject::DuplicateField("price")));
                    }
                    // JSON has no NaN or Infinity, but an exponent can
                    // overflow f64; serde_json reports that as an error.
                    match map.next_value::<f64>() {
                        Ok(p) if p.is_finite() => price = Some(p),
                        _ => return Err(self.fail(Reject::InvalidPrice)),
                    }
                }
                "ts" => {
                    if ts.is_some() {
                        return Err(self.fail(Reject::DuplicateField("ts")));
                    }
                    match map.next_value::<Option<u64>>() {
                        Ok(t) => ts = Some(t),
                        Err(_) => return Err(self.fail(Reject::InvalidTs)),
                    }
                }
                "client" => {
                    if client.is_some() {
                        return Err(self.fail(Reject::DuplicateField("client")));
                    }
                    match map.next_value::<Option<CowStr<'de>>>() {
                        Ok(Some(CowStr(c))) if names::is_client_code(&c) => client = Some(Some(c)),
                        Ok(None) => client = Some(None),
                        _ => return Err(self.fail(Reject::InvalidClient)),
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }

        let Some(symbol) = symbol else {
            return Err(self.fail(Reject::MissingField("symbol")));
        };
        let Some(price) = price else {
            return Err(self.fail(Reject::MissingField("price")));
        };
        Ok(Quote {
            symbol,
            price,
            ts: ts.flatten(),
            client: client.flatten(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(payload: &str) -> Quote<'_> {
        parse(payload.as_bytes()).expect("quote should parse")
    }

    fn rejected(payload: &str) -> Reject {
        parse(payload.as_bytes()).expect_err("quote should be rejected")
    }

    #[test]
    fn public_quote_without_ts() {
        let q = ok(r#"{"symbol":"AAPL","price":189.5}"#);
        assert_eq!(q.symbol, "AAPL");
        assert_eq!(q.price, 189.5);
        assert_eq!(q.ts, None);
        assert_eq!(q.client, None);
        assert!(
            matches!(q.symbol, Cow::Borrowed(_)),
            "plain strings are borrowed"
        );
    }

    #[test]
    fn private_quote_keeps_ts_and_client() {
        let q = ok(r#"{"symbol":"MSFT","price":420,"ts":1700000000123,"client":"acme"}"#);
        assert_eq!(q.price, 420.0);
        assert_eq!(q.ts, Some(1_700_000_000_123));
        assert_eq!(q.client.as_deref(), Some("acme"));
    }

    #[test]
    fn unknown_fields_and_nulls_are_ignored() {
        let q = ok(r#"{"venue":{"a":[1,2]},"symbol":"X","price":-1.5e3,"ts":null,"client":null}"#);
        assert_eq!(q.price, -1500.0);
        assert_eq!(q.ts, None);
        assert_eq!(q.client, None);
    }

    #[test]
    fn escaped_symbol_is_decoded_then_validated() {
        let q = ok(r#"{"symbol":"BTC\/USD","price":1}"#);
        assert_eq!(q.symbol, "BTC/USD");
        assert_eq!(
            rejected(r#"{"symbol":"A\u0020B","price":1}"#),
            Reject::InvalidSymbol
        );
    }

    #[test]
    fn not_json() {
        assert!(matches!(rejected("hello"), Reject::Malformed(_)));
        assert!(matches!(
            rejected(r#"{"symbol":"A","price":1"#),
            Reject::Malformed(_)
        ));
        assert!(matches!(
            rejected(r#"{"symbol":"A","price":1} x"#),
            Reject::Malformed(_)
        ));
        assert!(matches!(rejected(""), Reject::Malformed(_)));
        assert!(matches!(parse(&[0xff, 0xfe]), Err(Reject::Malformed(_))));
    }

    #[test]
    fn not_an_object() {
        for payload in ["[1,2]", "42", "\"AAPL\"", "null", "true"] {
            assert_eq!(rejected(payload), Reject::NotObject, "{payload}");
        }
    }

    #[test]
    fn missing_fields() {
        assert_eq!(rejected(r#"{"price":1}"#), Reject::MissingField("symbol"));
        assert_eq!(rejected(r#"{"symbol":"A"}"#), Reject::MissingField("price"));
        assert_eq!(rejected("{}"), Reject::MissingField("symbol"));
    }

    #[test]
    fn duplicate_fields() {
        assert_eq!(
            rejected(r#"{"symbol":"A","symbol":"B","price":1}"#),
            Reject::DuplicateField("symbol")
        );
        assert_eq!(
            rejected(r#"{"symbol":"A","price":1,"price":2}"#),
            Reject::DuplicateField("price")
        );
    }

    #[test]
    fn invalid_prices() {
        for price in [
            r#""1.5""#, "NaN", "Infinity", "1e400", "null", "[1]", "true",
        ] {
            let payload = format!(r#"{{"symbol":"A","price":{price}}}"#);
            let got = parse(payload.as_bytes());
            assert!(
                matches!(got, Err(Reject::InvalidPrice | Reject::Malformed(_))),
                "{payload} gave {got:?}"
            );
        }
        assert_eq!(
            rejected(r#"{"symbol":"A","price":"1.5"}"#),
            Reject::InvalidPrice
        );
        assert_eq!(
            rejected(r#"{"symbol":"A","price":1e400}"#),
            Reject::InvalidPrice
        );
    }

    #[test]
    fn invalid_symbols() {
        for symbol in [
            "\"\"",
            "1",
            "null",
            &format!("\"{}\"", "A".repeat(33)),
            "\"A B\"",
        ] {
            let payload = format!(r#"{{"symbol":{symbol},"price":1}}"#);
            assert_eq!(rejected(&payload), Reject::InvalidSymbol, "{payload}");
        }
    }

    #[test]
    fn invalid_ts_and_client() {
        assert_eq!(
            rejected(r#"{"symbol":"A","price":1,"ts":-5}"#),
            Reject::InvalidTs
        );
        assert_eq!(
            rejected(r#"{"symbol":"A","price":1,"ts":1.5}"#),
            Reject::InvalidTs
        );
        assert_eq!(
            rejected(r#"{"symbol":"A","price":1,"ts":"now"}"#),
            Reject::InvalidTs
        );
        assert_eq!(
            rejected(r#"{"symbol":"A","price":1,"client":"a.b"}"#),
            Reject::InvalidClient
        );
        assert_eq!(
            rejected(r#"{"symbol":"A","price":1,"client":7}"#),
            Reject::InvalidClient
        );
    }

    #[test]
    fn oversized_payload_is_rejected_before_parsing() {
        let big = format!(
            r#"{{"symbol":"A","price":1,"pad":"{}"}}"#,
            "x".repeat(MAX_QUOTE_BYTES)
        );
        assert_eq!(rejected(&big), Reject::TooLarge(big.len()));
        let fits = format!(
            r#"{{"symbol":"A","price":1,"pad":"{}"}}"#,
            "x".repeat(60_000)
        );
        assert_eq!(ok(&fits).symbol, "A");
    }

    #[test]
    fn serializes_back_to_an_equal_quote() {
        let q = ok(r#"{"symbol":"MSFT","price":420.5,"ts":7,"client":"acme","x":1}"#);
        let json = serde_json::to_string(&q).expect("serialize");
        assert_eq!(
            json,
            r#"{"symbol":"MSFT","price":420.5,"ts":7,"client":"acme"}"#
        );
        assert_eq!(ok(&json), q);
        let public = ok(r#"{"symbol":"A","price":1}"#);
        assert_eq!(
            serde_json::to_string(&public).expect("serialize"),
            r#"{"symbol":"A","price":1.0}"#
        );
    }

    #[test]
    fn labels_are_distinct() {
        let mut labels = Reject::LABELS.to_vec();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Reject::LABELS.len());
        assert_eq!(Reject::InvalidTs.label(), "invalid_ts");
    }
}
