//! The quote parser: bytes from the input channel to a validated [`Quote`].
//!
//! Pure and synchronous. One pass over the payload, borrowing strings from it
//! where JSON escapes allow; no intermediate `serde_json::Value`.

use std::borrow::Cow;
use std::fmt;

use serde::Serialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::decimal::Decimal;
use crate::names;

/// Largest quote payload accepted, in bytes.
pub const MAX_QUOTE_BYTES: usize = 64 * 1024;

/// A validated quote. Serializes back to the input format.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quote<'a> {
    /// 1–32 characters of `[A-Za-z0-9._:/-]`.
    pub symbol: Cow<'a, str>,
    /// A finite price: the nearest `f64` to what the payload wrote.
    pub price: f64,
    /// The price exactly as the payload wrote it, when that lies in the
    /// exact decimal domain (see [`crate::decimal`]).
    #[serde(skip)]
    pub decimal: Option<Decimal>,
    /// Milliseconds since the Unix epoch; `None` when the payload had none
    /// (the listener then stamps the arrival time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// The client code of a private quote; `None` for a public one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<Cow<'a, str>>,
    /// The traded volume (a finite number ≥ 0), if the payload had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<f64>,
    /// The volume exactly as the payload wrote it, when that lies in the
    /// exact decimal domain.
    #[serde(skip)]
    pub volume_decimal: Option<Decimal>,
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
    /// `volume` is not a finite number ≥ 0.
    #[error("invalid volume: expected a finite number >= 0")]
    InvalidVolume,
    /// The quote would open a new SMA key beyond `sma.max_keys`.
    #[error("too many distinct keys: sma.max_keys reached")]
    TooManyKeys,
    /// On a Redis Cluster, the quote arrived on another partition's channel
    /// than its symbol's (a producer with another `redis.partitions`).
    #[error("wrong partition: the symbol belongs to another partition's channel")]
    WrongPartition,
}

impl Reject {
    /// Every label, in a fixed order (for metrics that list them all).
    pub const LABELS: [&'static str; 12] = [
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
        "wrong_partition",
        "invalid_volume",
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
            Reject::WrongPartition => 10,
            Reject::InvalidVolume => 11,
        }
    }

    /// A short, stable name for this reason.
    #[must_use]
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

/// How a quote's `price` and `ts` were written in its payload, where that is
/// exactly how a result writes the parsed values (zmij's shortest round-trip
/// form, itoa's digits). A result copies such text instead of formatting the
/// number again: two of the costliest steps of encoding, saved for the usual
/// quote. `None` means "format the value".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spelling<'a> {
    /// The price, e.g. `187.42`.
    pub price: Option<&'a str>,
    /// The timestamp's digits.
    pub ts: Option<&'a str>,
}

/// Parses and validates one quote payload.
pub fn parse(payload: &[u8]) -> Result<Quote<'_>, Reject> {
    parse_spelled(payload).map(|(quote, _)| quote)
}

/// [`parse`], and how the payload spelled the quote's numbers.
pub fn parse_spelled(payload: &[u8]) -> Result<(Quote<'_>, Spelling<'_>), Reject> {
    if payload.len() > MAX_QUOTE_BYTES {
        return Err(Reject::TooLarge(payload.len()));
    }
    // Nearly every quote is a flat object of the four known fields with
    // plain values; those take a single scan. Anything else — unknown
    // fields, escapes, nulls, any error — gets the full parser, which alone
    // decides what is rejected and why. The two agree on every input the
    // fast path accepts (tests and the fuzz target check it).
    if let Some(parsed) = fast::parse(payload) {
        return Ok(parsed);
    }
    parse_fully(payload).map(|quote| (quote, Spelling::default()))
}

/// The fast path alone: `Some` only for the common shape it takes. For
/// tests and the fuzz target, which check that it agrees with
/// [`parse_fully`] wherever it accepts, and that it accepts real quotes.
#[doc(hidden)]
#[must_use]
pub fn parse_fast(payload: &[u8]) -> Option<(Quote<'_>, Spelling<'_>)> {
    fast::parse(payload)
}

/// The general parser: serde_json, with the reason for any rejection.
#[doc(hidden)]
pub fn parse_fully(payload: &[u8]) -> Result<Quote<'_>, Reject> {
    // serde_json checks UTF-8 only in strings it decodes; one it skips (an
    // unknown member's value) could carry any bytes. The whole payload is
    // checked here instead, as the fast path checks it.
    if let Err(err) = std::str::from_utf8(payload) {
        return Err(Reject::Malformed(format!(
            "invalid UTF-8 at byte {}",
            err.valid_up_to()
        )));
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
        let mut price: Option<(f64, Option<Decimal>)> = None;
        let mut ts: Option<Option<u64>> = None;
        let mut client: Option<Option<Cow<'de, str>>> = None;
        let mut volume: Option<Option<(f64, Option<Decimal>)>> = None;

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
                    match map.next_value::<&'de RawValue>().ok().and_then(number) {
                        Some(Some(number)) => price = Some(number),
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
                "volume" => {
                    if volume.is_some() {
                        return Err(self.fail(Reject::DuplicateField("volume")));
                    }
                    match map.next_value::<&'de RawValue>().ok().and_then(number) {
                        Some(Some((v, decimal))) if v >= 0.0 => volume = Some(Some((v, decimal))),
                        Some(None) => volume = Some(None),
                        _ => return Err(self.fail(Reject::InvalidVolume)),
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
        let Some((price, decimal)) = price else {
            return Err(self.fail(Reject::MissingField("price")));
        };
        Ok(Quote {
            symbol,
            price,
            decimal,
            ts: ts.flatten(),
            client: client.flatten(),
            volume: volume.flatten().map(|(v, _)| v),
            volume_decimal: volume.flatten().and_then(|(_, d)| d),
        })
    }
}

/// A JSON value read as a number: `Some(None)` for `null`, `None` for
/// anything but a finite number. The text is kept to read the decimal it
/// spells as well as its nearest `f64`. JSON has no NaN or Infinity, but an
/// exponent can overflow `f64`.
fn number(raw: &RawValue) -> Option<Option<(f64, Option<Decimal>)>> {
    let text = raw.get();
    if text == "null" {
        return Some(None);
    }
    if !text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return None;
    }
    let value = text.parse::<f64>().ok().filter(|v| v.is_finite())?;
    Some(Some((value, Decimal::parse(text))))
}

/// The single-scan parser for the common shape of a quote.
mod fast {
    use std::borrow::Cow;

    use super::{Quote, Spelling};
    use crate::decimal::Decimal;
    use crate::names;

    /// The quote, if `payload` is a flat JSON object whose only members are
    /// `symbol` and `price` and optionally `ts` and `client`, with a plain
    /// string symbol and client, a JSON number price and a digits-only ts,
    /// all valid. `None` means "ask the full parser", never "invalid".
    pub(super) fn parse(payload: &[u8]) -> Option<(Quote<'_>, Spelling<'_>)> {
        // One UTF-8 check of the whole payload, rather than one per string
        // taken from it, lets every value be borrowed as text. (Any byte
        // that is not ASCII sends the payload to the full parser anyway.)
        let text = std::str::from_utf8(payload).ok()?;
        let mut scan = Scan { text, at: 0 };
        let (mut symbol, mut price, mut ts, mut client) = (None, None, None, None);
        let mut volume = None;
        scan.skip_whitespace();
        scan.expect(b'{')?;
        loop {
            scan.skip_whitespace();
            // A key is compared with the five known ones, quotes included,
            // rather than scanned: anything else goes to the full parser.
            let key = scan.member_name()?;
            scan.skip_whitespace();
            match key {
                Key::Symbol if symbol.is_none() => symbol = Some(scan.symbol()?),
                Key::Price if price.is_none() => price = Some(scan.number()?),
                Key::Ts if ts.is_none() => ts = Some(scan.digits()?),
                Key::Client if client.is_none() => {
                    client = Some(scan.plain_string().filter(|s| names::is_client_code(s))?)
                }
                // A negative volume is for the full parser to reject.
                Key::Volume if volume.is_none() => {
                    volume = Some(scan.number().filter(|(v, _, _)| *v >= 0.0)?)
                }
                _ => return None,
            }
            scan.skip_whitespace();
            match scan.next()? {
                b',' => continue,
                b'}' => break,
                _ => return None,
            }
        }
        scan.skip_whitespace();
        if scan.at != payload.len() {
            return None;
        }
        let (price, decimal, price_text) = price?;
        let quote = Quote {
            symbol: Cow::Borrowed(symbol?),
            price,
            decimal,
            ts: ts.map(|(value, _)| value),
            client: client.map(Cow::Borrowed),
            volume: volume.map(|(value, _, _)| value),
            volume_decimal: volume.and_then(|(_, decimal, _)| decimal),
        };
        let spelling = Spelling {
            price: price_text,
            ts: ts.map(|(_, text)| text),
        };
        Some((quote, spelling))
    }

    struct Scan<'a> {
        text: &'a str,
        at: usize,
    }

    /// The members the fast path knows.
    #[derive(Clone, Copy)]
    enum Key {
        Symbol,
        Price,
        Ts,
        Client,
        Volume,
    }

    /// 10^0 ..= 10^15, for the fast path's mantissas.
    const POWERS_OF_TEN: [u64; 16] = {
        let mut table = [1u64; 16];
        let mut i = 1;
        while i < 16 {
            table[i] = table[i - 1] * 10;
            i += 1;
        }
        table
    };

    /// Powers of ten a `f64` holds exactly.
    const EXACT_POWERS_OF_TEN: [f64; 23] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
        1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
    ];

    impl<'a> Scan<'a> {
        fn bytes(&self) -> &'a [u8] {
            self.text.as_bytes()
        }

        /// The text from `start` to where the scan is. Every place the scan
        /// stops at follows an ASCII byte, so this is never `None` in fact.
        #[inline]
        fn text_from(&self, start: usize) -> Option<&'a str> {
            self.text.get(start..self.at)
        }

        fn next(&mut self) -> Option<u8> {
            let b = *self.bytes().get(self.at)?;
            self.at += 1;
            Some(b)
        }

        fn expect(&mut self, wanted: u8) -> Option<()> {
            (self.next()? == wanted).then_some(())
        }

        fn skip_whitespace(&mut self) {
            // Usually there is none: one comparison says so.
            while let Some(&b) = self.bytes().get(self.at) {
                if b > b' ' || !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                    return;
                }
                self.at += 1;
            }
        }

        /// A string that is a valid symbol, checked as it is scanned.
        fn symbol(&mut self) -> Option<&'a str> {
            self.expect(b'"')?;
            let name = self.take_while(names::is_symbol_byte)?;
            self.expect(b'"')?;
            (1..=names::MAX_SYMBOL_LEN)
                .contains(&name.len())
                .then_some(name)
        }

        /// The longest run of bytes from here that `keep` accepts (it must
        /// accept only ASCII).
        fn take_while(&mut self, keep: impl Fn(u8) -> bool) -> Option<&'a str> {
            let start = self.at;
            let rest = self.bytes().get(start..).unwrap_or_default();
            self.at += rest.iter().position(|&b| !keep(b)).unwrap_or(rest.len());
            self.text_from(start)
        }

        /// One of the known member names, with its quotes, and the colon
        /// after it.
        fn member_name(&mut self) -> Option<Key> {
            // Most payloads put the colon right after the name: one
            // comparison takes both (25 instructions a quote fewer than
            // `known_key` and then a test for the colon, by callgrind).
            let rest = self.bytes().get(self.at..)?;
            let (key, len) = if rest.starts_with(b"\"symbol\":") {
                (Key::Symbol, 9)
            } else if rest.starts_with(b"\"price\":") {
                (Key::Price, 8)
            } else if rest.starts_with(b"\"ts\":") {
                (Key::Ts, 5)
            } else {
                let key = self.known_key()?;
                self.skip_whitespace();
                self.expect(b':')?;
                return Some(key);
            };
            self.at += len;
            Some(key)
        }

        /// One of the known member names, with its quotes.
        fn known_key(&mut self) -> Option<Key> {
            let rest = self.bytes().get(self.at..)?;
            let (key, len) = if rest.starts_with(b"\"symbol\"") {
                (Key::Symbol, 8)
            } else if rest.starts_with(b"\"price\"") {
                (Key::Price, 7)
            } else if rest.starts_with(b"\"ts\"") {
                (Key::Ts, 4)
            } else if rest.starts_with(b"\"client\"") {
                (Key::Client, 8)
            } else if rest.starts_with(b"\"volume\"") {
                (Key::Volume, 8)
            } else {
                return None;
            };
            self.at += len;
            Some(key)
        }

        /// A string of printable ASCII without escapes.
        fn plain_string(&mut self) -> Option<&'a str> {
            self.expect(b'"')?;
            let text = self.take_while(|b| b != b'"' && b != b'\\' && (0x20..0x7f).contains(&b))?;
            self.expect(b'"')?;
            Some(text)
        }

        /// A run of digits and its value, in one pass. The value wraps past
        /// 19 digits; callers use it only for shorter runs.
        fn decimal(&mut self) -> (&'a [u8], u64) {
            self.decimal_after(0, 0)
        }

        /// [`Scan::decimal`] when its first `len` digits, of value `value`,
        /// have been read already: the rest one at a time.
        fn decimal_after(&mut self, mut len: usize, mut value: u64) -> (&'a [u8], u64) {
            let rest = self.bytes().get(self.at..).unwrap_or_default();
            for &b in rest.get(len..).unwrap_or_default() {
                let digit = b.wrapping_sub(b'0');
                if digit > 9 {
                    break;
                }
                value = value.wrapping_mul(10).wrapping_add(u64::from(digit));
                len += 1;
            }
            self.at += len;
            (&rest[..len], value)
        }

        /// [`Scan::decimal`], eight digits at a time while eight follow, then
        /// one at a time: a timestamp in milliseconds has 13.
        fn long_decimal(&mut self) -> (&'a [u8], u64) {
            let rest = self.bytes().get(self.at..).unwrap_or_default();
            let mut value: u64 = 0;
            let mut len = 0;
            while let Some(&eight) = rest.get(len..).and_then(<[u8]>::first_chunk::<8>) {
                let word = u64::from_le_bytes(eight);
                if !are_digits(word) {
                    break;
                }
                value = value
                    .wrapping_mul(100_000_000)
                    .wrapping_add(eight_digits(word));
                len += 8;
            }
            self.decimal_after(len, value)
        }

        /// An unsigned integer, as JSON writes it (no leading zeros), and its
        /// digits: exactly what itoa writes for the value.
        fn digits(&mut self) -> Option<(u64, &'a str)> {
            let start = self.at;
            let (digits, value) = self.long_decimal();
            if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') {
                return None;
            }
            let text = self.text_from(start)?;
            // Up to 19 digits always fit in a u64; more may not.
            if digits.len() <= 19 {
                return Some((value, text));
            }
            let value = digits.iter().try_fold(0u64, |n, &d| {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            })?;
            Some((value, text))
        }

        /// A finite number in strict JSON grammar, correctly rounded, the
        /// decimal it spells when that is exact, and its text where that is
        /// the value's shortest round-trip form.
        #[inline(always)]
        fn number(&mut self) -> Option<(f64, Option<Decimal>, Option<&'a str>)> {
            let start = self.at;
            let negative = self.bytes().get(self.at) == Some(&b'-');
            if negative {
                self.at += 1;
            }
            let (int, int_value) = self.decimal();
            if int.is_empty() || (int.len() > 1 && int[0] == b'0') {
                return None;
            }
            let (mut fraction, mut fraction_value): (&[u8], u64) = (&[], 0);
            if self.bytes().get(self.at) == Some(&b'.') {
                self.at += 1;
                (fraction, fraction_value) = self.decimal();
                if fraction.is_empty() {
                    return None;
                }
            }
            let exponent = matches!(self.bytes().get(self.at), Some(b'e' | b'E'));
            // Clinger's fast path: with at most 15 significant digits and
            // at most 22 decimals, the digits as an integer and the power of
            // ten are both exact in an f64, so one IEEE division rounds
            // correctly — the same value the general algorithm finds.
            if !exponent && int.len() + fraction.len() <= 15 {
                // At most 15 digits: no wrapping happened, and none here.
                let mantissa = int_value * POWERS_OF_TEN[fraction.len()] + fraction_value;
                let value = mantissa as f64 / EXACT_POWERS_OF_TEN[fraction.len()];
                let value = if negative { -value } else { value };
                // Below 10^15 and at most 15 places: inside the domain,
                // and normalized unless the fraction ends in a zero.
                let units = mantissa as i64;
                let units = if negative { -units } else { units };
                let decimal = match fraction.last() {
                    Some(b'0') => Decimal::new(units, fraction.len() as u8),
                    _ => Some(Decimal::from_normalized(units, fraction.len() as u8)),
                };
                let text = is_shortest(int, fraction)
                    .then(|| self.text_from(start))
                    .flatten();
                return Some((value, decimal, text));
            }
            if exponent {
                self.at += 1;
                if let Some(b'+' | b'-') = self.bytes().get(self.at) {
                    self.at += 1;
                }
                if self.take_while(|b| b.is_ascii_digit())?.is_empty() {
                    return None;
                }
            }
            let text = self.text_from(start)?;
            let value = text.parse::<f64>().ok().filter(|p| p.is_finite())?;
            Some((value, Decimal::parse(text), None))
        }
    }

    /// Whether each of the eight bytes of `word` is an ASCII digit: its high
    /// half is 3, and adding 6 keeps it 3 (`:` to `?` become `@` to `E`; no
    /// byte carries into the next, as none passes 0x45).
    fn are_digits(word: u64) -> bool {
        const HIGH: u64 = 0xF0F0_F0F0_F0F0_F0F0;
        const THREES: u64 = 0x3030_3030_3030_3030;
        word & HIGH == THREES && word.wrapping_add(0x0606_0606_0606_0606) & HIGH == THREES
    }

    /// The value of eight ASCII digits read little-endian (the first digit
    /// in the lowest byte): neighbours combined into two digits, then
    /// four, then eight, a multiplication each.
    fn eight_digits(word: u64) -> u64 {
        let pairs = ((word & 0x0F0F_0F0F_0F0F_0F0F).wrapping_mul(10 << 8 | 1)) >> 8;
        let fours = ((pairs & 0x00FF_00FF_00FF_00FF).wrapping_mul(100 << 16 | 1)) >> 16;
        ((fours & 0x0000_FFFF_0000_FFFF).wrapping_mul(10_000 << 32 | 1)) >> 32
    }

    /// Whether a plain decimal of at most 15 digits, `int.fraction`, is
    /// written the way zmij writes its value (what a result would say):
    /// - No two decimals of 15 significant digits or fewer are the same
    ///   `f64`, so the shortest form that reads back as the value has these
    ///   very digits, less any trailing zeros — hence none are allowed.
    /// - zmij always writes a fraction (`420.0`) — hence one is required.
    /// - zmij writes plain decimals from 1e-5 up to 1e16 and exponents
    ///   outside; with at most 15 digits only the small end can be passed:
    ///   `0.00001` is written so, `0.000001` as `1e-6`.
    ///
    /// The property test `a_result_that_copies_the_spelled_numbers_is_the_formatted_one`
    /// and the unit test `zmij_writes_the_prices_the_fast_path_spells` check it.
    fn is_shortest(int: &[u8], fraction: &[u8]) -> bool {
        let Some(&last) = fraction.last() else {
            return false;
        };
        let leading_zeros = fraction.iter().take_while(|&&d| d == b'0').count();
        last != b'0' && (int != b"0" || leading_zeros <= 4)
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
    fn a_timestamp_is_read_eight_digits_at_a_time_and_exactly() {
        for ts in [
            0u64,
            7,
            12_345_678,
            123_456_789,
            1_764_115_200_000,
            9_999_999_999_999_999,
            u64::MAX,
        ] {
            let payload = format!(r#"{{"symbol":"A","price":1.5,"ts":{ts}}}"#);
            let (quote, spelling) = parse_fast(payload.as_bytes()).expect("fast path");
            assert_eq!(quote.ts, Some(ts), "{payload}");
            assert_eq!(spelling.ts, Some(ts.to_string().as_str()));
        }
        for bad in ["1764115200:00", "17641152000000000000000", "01764115200000"] {
            let payload = format!(r#"{{"symbol":"A","price":1.5,"ts":{bad}}}"#);
            assert!(parse_fast(payload.as_bytes()).is_none(), "{payload}");
        }
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
    fn a_volume_is_read_with_its_decimal_on_both_paths() {
        for payload in [
            r#"{"symbol":"X","price":1.5,"volume":120.50}"#,
            r#"{"volume": 1.205e2, "symbol":"X","price":1.5, "venue":"x"}"#,
        ] {
            let q = ok(payload);
            assert_eq!(q.volume, Some(120.5), "{payload}");
            assert_eq!(q.volume_decimal, Decimal::new(1205, 1), "{payload}");
            assert_eq!(parse_fully(payload.as_bytes()), Ok(q));
        }
        let q = ok(r#"{"symbol":"X","price":1.5,"volume":null}"#);
        assert_eq!((q.volume, q.volume_decimal), (None, None));
        let q = ok(r#"{"symbol":"X","price":1.5,"volume":0}"#);
        assert_eq!(q.volume, Some(0.0));
    }

    #[test]
    fn a_volume_that_is_not_a_finite_number_at_least_zero_is_refused() {
        for volume in ["-1", "\"12\"", "true", "1e999", "[1]"] {
            let payload = format!(r#"{{"symbol":"X","price":1.5,"volume":{volume}}}"#);
            assert_eq!(rejected(&payload), Reject::InvalidVolume, "{payload}");
        }
        assert_eq!(
            rejected(r#"{"symbol":"X","price":1,"volume":1,"volume":2}"#),
            Reject::DuplicateField("volume")
        );
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
    fn invalid_utf8_anywhere_is_rejected_even_in_an_ignored_member() {
        for payload in [
            &b"{\"symbol\":\"A\",\"price\":1,\"note\":\"\xff\"}"[..],
            b"{\"symbol\":\"A\",\"price\":1,\"\xc3\":2}",
            b"{\"symbol\":\"A\",\"price\":1,\"x\":[\"\xed\xa0\x80\"]}",
        ] {
            assert_eq!(
                parse(payload),
                Err(Reject::Malformed(format!(
                    "invalid UTF-8 at byte {}",
                    std::str::from_utf8(payload).unwrap_err().valid_up_to()
                ))),
                "{payload:?}"
            );
        }
        // Valid multi-byte UTF-8 in an ignored member is fine.
        assert_eq!(
            ok(r#"{"symbol":"A","price":1,"note":"prix en €"}"#).symbol,
            "A"
        );
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
    fn fast_and_full_parsers_agree_on_common_shapes() {
        for payload in [
            r#"{"symbol":"AAPL","price":189.5}"#,
            r#" { "symbol" : "AAPL" , "price" : -0.0 , "ts" : 0 , "client" : "acme" } "#,
            r#"{"price":1e-7,"symbol":"BTC/USD","ts":18446744073709551615}"#,
            r#"{"symbol":"A","price":3.451576960480499e-210}"#,
            r#"{"symbol":"A","price":12345678901234567890123}"#,
            r#"{"symbol":"A","price":1E+2,"client":"x_y-z"}"#,
        ] {
            let fast = fast::parse(payload.as_bytes()).map(|(quote, _)| quote);
            assert!(fast.is_some(), "fast path should take {payload}");
            assert_eq!(
                fast.map(Ok),
                Some(parse_fully(payload.as_bytes())),
                "{payload}"
            );
        }
    }

    /// The edges of what the fast path copies (see `is_shortest`): if a
    /// zmij release moved its fixed-notation range, this fails before a
    /// frame could differ.
    #[test]
    fn zmij_writes_the_prices_the_fast_path_spells() {
        for text in [
            "0.00001",
            "-0.00001",
            "0.0000999999999",
            "0.1",
            "0.3",
            "1.5",
            "187.42",
            "99999999999999.9",
            "0.00000000000001",
            "123456789.012345",
        ] {
            let payload = format!(r#"{{"symbol":"A","price":{text}}}"#);
            let (quote, spelling) = fast::parse(payload.as_bytes()).expect("fast path");
            let formatted = zmij::Buffer::new().format_finite(quote.price).to_owned();
            match spelling.price {
                Some(spelled) => assert_eq!(spelled, formatted, "{text}"),
                None => assert_ne!(text, formatted, "{text} could have been copied"),
            }
        }
        for (text, formatted) in [("0.000001", "1e-6"), ("420", "420.0"), ("0.10", "0.1")] {
            let payload = format!(r#"{{"symbol":"A","price":{text}}}"#);
            let (quote, spelling) = fast::parse(payload.as_bytes()).expect("fast path");
            assert_eq!(spelling.price, None, "{text}");
            assert_eq!(zmij::Buffer::new().format_finite(quote.price), formatted);
        }
    }

    #[test]
    fn the_fast_path_leaves_everything_unusual_to_the_full_parser() {
        for payload in [
            r#"{"symbol":"A","price":01}"#,
            r#"{"symbol":"A","price":1.}"#,
            r#"{"symbol":"A","price":.5}"#,
            r#"{"symbol":"A","price":+1}"#,
            r#"{"symbol":"A","price":1e}"#,
            r#"{"symbol":"A","price":1e999}"#,
            r#"{"symbol":"A","price":NaN}"#,
            r#"{"symbol":"A","price":"1"}"#,
            r#"{"symbol":"A\u0042","price":1}"#,
            r#"{"symbol":"A","price":1,"ts":null}"#,
            r#"{"symbol":"A","price":1,"ts":01}"#,
            r#"{"symbol":"A","price":1,"ts":-1}"#,
            r#"{"symbol":"A","price":1,"ts":99999999999999999999}"#,
            r#"{"symbol":"A","price":1,"client":null}"#,
            r#"{"symbol":"A","price":1,"venue":"X"}"#,
            r#"{"symbol":"A","symbol":"B","price":1}"#,
            r#"{"symbol":"A"}"#,
            r#"{"symbol":"A","price":1,}"#,
            r#"{"symbol":"A","price":1} x"#,
            r#"{"symbol":"A B","price":1}"#,
            "{}",
            "",
        ] {
            assert_eq!(fast::parse(payload.as_bytes()), None, "{payload}");
        }
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
