//! The wire formats: SMA messages (Redis and WebSocket alike), the frames a
//! client sends, and the control frames the server sends back.
//!
//! docs/protocol.md is the prose version of this file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::names;
use crate::quote::Spelling;

/// One SMA result, as published to Redis and sent to sockets.
#[derive(Debug, Clone, Serialize)]
pub struct SmaMessage<'a> {
    /// The quote's symbol.
    pub symbol: &'a str,
    /// The triggering quote's price.
    pub price: f64,
    /// The mean of the last `count` prices of this key.
    pub sma: f64,
    /// The configured window.
    pub window: usize,
    /// How many prices the mean covers (`< window` only with `emit_partial`).
    pub count: usize,
    /// The triggering quote's timestamp, ms since the Unix epoch.
    pub ts: u64,
    /// The result's position in its key's sequence: 1 for the key's first
    /// result, one more for each after it.
    pub seq: u64,
    /// Names the run of the key's sequence `seq` counts in; it changes
    /// whenever the sequence could not be continued (a restart that lost the
    /// key's window in pub/sub mode).
    pub epoch: &'a str,
    /// The client code of a private quote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<&'a str>,
}

impl SmaMessage<'_> {
    /// Serializes once; the result is shared by Redis and every socket.
    ///
    /// This is the hottest serialization in the bridge, so it is written by
    /// hand into one exactly-sized buffer: symbols, client codes and epochs
    /// are restricted to characters JSON never escapes, so they are copied as
    /// they are. Anything else (only possible through this public type, never
    /// from the parser) goes through serde_json.
    #[must_use]
    pub fn encode(&self) -> String {
        let plain = names::is_symbol(self.symbol)
            && names::is_epoch(self.epoch)
            && self.client.is_none_or(names::is_client_code);
        if !plain {
            return serde_json::to_string(self).unwrap_or_default();
        }
        let key = KeyFraming::new(self.symbol, self.epoch, self.client);
        self.encode_framed(&key, &WindowFraming::new(self.window), Spelling::default())
    }

    /// [`SmaMessage::encode`] with the parts that are the same for every
    /// result of a key and window written out beforehand, so most of the
    /// message is copied in three pieces. `key` must be this message's
    /// (valid names, which JSON never escapes) and `window` its window;
    /// `spelled` may give the text of its price and ts, copied as they are.
    pub fn encode_framed(
        &self,
        key: &KeyFraming,
        window: &WindowFraming,
        spelled: Spelling<'_>,
    ) -> String {
        debug_assert_eq!(*key, KeyFraming::new(self.symbol, self.epoch, self.client));
        debug_assert_eq!(window.window, self.window);
        let mut floats = [zmij::Buffer::new(), zmij::Buffer::new()];
        let [price_buf, sma_buf] = &mut floats;
        let price = match spelled.price {
            Some(text) => {
                debug_assert_eq!(text, json_float(&mut zmij::Buffer::new(), self.price));
                text
            }
            None => json_float(price_buf, self.price),
        };
        let sma = json_float(sma_buf, self.sma);
        let mut ints = [
            itoa::Buffer::new(),
            itoa::Buffer::new(),
            itoa::Buffer::new(),
        ];
        let [count_buf, ts_buf, seq_buf] = &mut ints;
        let ts = match spelled.ts {
            Some(text) => {
                debug_assert_eq!(text, itoa::Buffer::new().format(self.ts));
                text
            }
            None => ts_buf.format(self.ts),
        };
        let seq = seq_buf.format(self.seq);
        const SMA: &str = ",\"sma\":";
        const SEQ: &str = ",\"seq\":";
        // A full window's `,"window":W,"count":W,"ts":` is always the same.
        let count = (self.count != window.window).then(|| count_buf.format(self.count));
        let middle_len = match count {
            None => window.full.len(),
            Some(count) => PARTIAL_FIXED + window.text.len() + count.len(),
        };
        // The exact length: a buffer with no spare capacity becomes `Bytes`
        // without being copied or reallocated.
        let exact = key.head.len()
            + price.len()
            + SMA.len()
            + sma.len()
            + middle_len
            + ts.len()
            + SEQ.len()
            + seq.len()
            + key.tail.len();
        let mut out = String::with_capacity(exact);
        out.push_str(&key.head);
        out.push_str(price);
        out.push_str(SMA);
        out.push_str(sma);
        match count {
            None => out.push_str(&window.full),
            Some(count) => {
                out.push_str(",\"window\":");
                out.push_str(&window.text);
                out.push_str(",\"count\":");
                out.push_str(count);
                out.push_str(",\"ts\":");
            }
        }
        out.push_str(ts);
        out.push_str(SEQ);
        out.push_str(seq);
        out.push_str(&key.tail);
        debug_assert_eq!(out.len(), exact);
        out
    }
}

/// `,"window":,"count":,"ts":` around a partial window's numbers.
const PARTIAL_FIXED: usize = r#","window":,"count":,"ts":"#.len();

/// A result's place in its key's sequence: the `seq` and `epoch` of its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position<'a> {
    /// 1 for the key's first result in `epoch`, one more for each after it.
    pub seq: u64,
    /// The run of the sequence.
    pub epoch: &'a str,
}

/// What every SMA message of one key (in one epoch) starts and ends with:
/// `{"symbol":"AAPL","price":` and `,"epoch":"E"}` (or
/// `,"epoch":"E","client":"acme"}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFraming {
    head: Box<str>,
    tail: Box<str>,
    epoch_len: usize,
    /// The client code's length, for a private key.
    client_len: Option<usize>,
}

/// Where a result framed by a [`KeyFraming`] spells its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameSpans {
    /// The symbol.
    pub symbol: std::ops::Range<usize>,
    /// The epoch.
    pub epoch: std::ops::Range<usize>,
    /// The client code of a private result.
    pub client: Option<std::ops::Range<usize>>,
}

/// What the head starts with, before the symbol itself.
const SYMBOL_FIELD: &str = r#"{"symbol":""#;

/// What the tail starts with, before the epoch itself.
const EPOCH_FIELD: &str = r#","epoch":""#;

impl KeyFraming {
    /// The framing for `symbol`, `epoch` and `client`, which must be valid names.
    pub fn new(symbol: &str, epoch: &str, client: Option<&str>) -> Self {
        Self {
            head: format!("{SYMBOL_FIELD}{symbol}\",\"price\":").into(),
            tail: match client {
                None => format!("{EPOCH_FIELD}{epoch}\"}}").into(),
                Some(client) => format!("{EPOCH_FIELD}{epoch}\",\"client\":\"{client}\"}}").into(),
            },
            epoch_len: epoch.len(),
            client_len: client.map(str::len),
        }
    }

    /// Where the names are in a message of `len` bytes framed by this.
    pub fn spans(&self, len: usize) -> NameSpans {
        let symbol_len = self.head.len() - SYMBOL_FIELD.len() - r#"","price":"#.len();
        let epoch = len - self.tail.len() + EPOCH_FIELD.len();
        let epoch = epoch..epoch + self.epoch_len;
        NameSpans {
            symbol: SYMBOL_FIELD.len()..SYMBOL_FIELD.len() + symbol_len,
            client: self.client_len.map(|client_len| {
                let start = epoch.end + r#"","client":""#.len();
                start..start + client_len
            }),
            epoch,
        }
    }
}

/// The window of every SMA message of a pipeline, written out.
#[derive(Debug, Clone)]
pub struct WindowFraming {
    window: usize,
    /// `W`
    text: Box<str>,
    /// `,"window":W,"count":W,"ts":`
    full: Box<str>,
}

impl WindowFraming {
    /// The framing for windows of `window` prices.
    pub fn new(window: usize) -> Self {
        Self {
            window,
            text: window.to_string().into(),
            full: format!(",\"window\":{window},\"count\":{window},\"ts\":").into(),
        }
    }
}

/// The longest result the bridge writes: the longest names, numbers and
/// floats of every member come to under 400 bytes (a test checks it).
/// Anything longer is not a result ([`ResultRoute::of`] says so): a gateway
/// relays or loads as a snapshot nothing longer, so a forged message padded
/// with members cannot make history and snapshots (one frame kept per key)
/// hold more than this a key.
pub const MAX_RESULT_BYTES: usize = 512;

/// A float as JSON: shortest round-trip form, `null` for a non-finite value
/// (a mean can overflow when prices near f64::MAX are summed), as serde_json does.
fn json_float(buffer: &mut zmij::Buffer, value: f64) -> &str {
    if value.is_finite() {
        buffer.format_finite(value)
    } else {
        "null"
    }
}

/// Epoch → symbol → the last `seq` a client saw.
pub type LastSeenMap = BTreeMap<String, BTreeMap<String, u64>>;

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientOp {
    /// Add symbols (or `"*"`) to the socket's subscriptions.
    Subscribe {
        /// Symbols to add.
        symbols: Vec<String>,
        /// The series to add them in (`"sma"`: the `[sma]` section's);
        /// absent: the socket's default series.
        series: Option<Vec<String>>,
        /// At most this many results a second per key of these symbols,
        /// each the newest (absent: every result).
        max_rate: Option<f64>,
        /// Candles of these keys only once closed (open updates skipped).
        closed_only: bool,
    },
    /// Remove symbols (or `"*"`) from the socket's subscriptions.
    Unsubscribe {
        /// Symbols to remove.
        symbols: Vec<String>,
        /// The series to remove them from; absent: the default series.
        series: Option<Vec<String>>,
    },
    /// The first request of a socket opened with `?resume=1`: what the
    /// client last saw, so it is sent what it missed.
    Resume(LastSeen),
    /// A fresh token for the socket's client code, before the one it
    /// connected with expires: checked like a new connection's, the socket
    /// then lasts until the new one expires, and may see what both allow.
    Refresh {
        /// The new token (a JWT in `auth.mode = "jwt"`).
        token: String,
    },
}

/// What a client that comes back says it last saw: per epoch, the last
/// `seq` of each public symbol and of each of its own private keys. Grouped
/// by epoch, as the keys of one compute node share one: a socket on `"*"`
/// over 1,000 symbols says it in about 14 bytes a symbol.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastSeen {
    /// Epoch → symbol → seq, for public results.
    #[serde(default)]
    pub public: LastSeenMap,
    /// Epoch → symbol → seq, for the client's private results.
    #[serde(default)]
    pub private: LastSeenMap,
    /// The subscriptions the socket resumes with (symbols or `"*"`);
    /// absent: its initial set.
    #[serde(default)]
    pub symbols: Option<Vec<String>>,
    /// The series of those subscriptions, as in a subscribe; absent: the
    /// socket's default series.
    #[serde(default)]
    pub series: Option<Vec<String>>,
}

impl ClientOp {
    /// Parses a client's text frame; the error is the message sent back to it.
    pub fn parse(text: &str) -> Result<Self, String> {
        request::parse(text).map_err(|err| {
            format!(
                "invalid request ({err}); expected {{\"op\":\"subscribe\"|\"unsubscribe\",\"symbols\":[...]}} (may add \"series\":[...]; subscribe \"max_rate\":N and \"closed_only\":true) or {{\"op\":\"resume\",\"public\":{{...}},\"private\":{{...}}}} or {{\"op\":\"refresh\",\"token\":\"...\"}}"
            )
        })
    }
}

/// How a client's frame is read: its `op` first, with every other member
/// skipped unread, then the whole frame straight into that op's shape.
/// serde's tagged enums instead copy every member into a buffer to find the
/// tag wherever it is: for a resume naming 5,000 keys (49 KB) that was most
/// of 0.85 ms, spent on a task that other sockets' deliveries wait behind.
mod request {
    use std::borrow::Cow;
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{Error as _, IgnoredAny, MapAccess, Visitor};
    use serde::{Deserialize, Deserializer};

    use super::{ClientOp, LastSeen, LastSeenMap};

    const OPS: &[&str] = &["subscribe", "unsubscribe", "resume", "refresh"];

    pub(super) fn parse(text: &str) -> serde_json::Result<ClientOp> {
        #[derive(Deserialize)]
        struct Op<'a> {
            #[serde(borrow)]
            op: Cow<'a, str>,
        }
        let Op { op } = serde_json::from_str(text)?;
        Ok(match &*op {
            "subscribe" => {
                let Subscribe {
                    symbols,
                    series,
                    max_rate,
                    closed_only,
                    ..
                } = serde_json::from_str(text)?;
                ClientOp::Subscribe {
                    symbols,
                    series,
                    max_rate,
                    closed_only,
                }
            }
            "unsubscribe" => {
                let Unsubscribe {
                    symbols, series, ..
                } = serde_json::from_str(text)?;
                ClientOp::Unsubscribe { symbols, series }
            }
            "resume" => {
                let Resume {
                    public,
                    private,
                    symbols,
                    series,
                    ..
                } = serde_json::from_str(text)?;
                ClientOp::Resume(LastSeen {
                    public,
                    private,
                    symbols,
                    series,
                })
            }
            "refresh" => {
                let Refresh { token, .. } = serde_json::from_str(text)?;
                ClientOp::Refresh { token }
            }
            other => return Err(serde_json::Error::unknown_variant(other, OPS)),
        })
    }

    /// Epoch → symbol → seq, each epoch's symbols read into a list and
    /// then made a map in one sorted pass, rather than inserted one by one
    /// (a descent of the tree each): the same map, the last of a repeated
    /// symbol kept, in about half the time.
    fn last_seen_map<'de, D: Deserializer<'de>>(deserializer: D) -> Result<LastSeenMap, D::Error> {
        struct Symbols(BTreeMap<String, u64>);
        impl<'de> Deserialize<'de> for Symbols {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Listed;
                impl<'de> Visitor<'de> for Listed {
                    type Value = Vec<(String, u64)>;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("an object of symbols and seqs")
                    }
                    fn visit_map<A: MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<Self::Value, A::Error> {
                        let mut listed = Vec::with_capacity(map.size_hint().unwrap_or(0));
                        while let Some(entry) = map.next_entry()? {
                            listed.push(entry);
                        }
                        Ok(listed)
                    }
                }
                let listed = deserializer.deserialize_map(Listed)?;
                Ok(Symbols(listed.into_iter().collect()))
            }
        }
        let epochs = BTreeMap::<String, Symbols>::deserialize(deserializer)?;
        Ok(epochs
            .into_iter()
            .map(|(epoch, Symbols(symbols))| (epoch, symbols))
            .collect())
    }

    // Each op's members as [`ClientOp`] documents them, and `op` itself.

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Subscribe {
        #[serde(rename = "op")]
        _op: IgnoredAny,
        symbols: Vec<String>,
        #[serde(default)]
        series: Option<Vec<String>>,
        #[serde(default)]
        max_rate: Option<f64>,
        #[serde(default)]
        closed_only: bool,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Unsubscribe {
        #[serde(rename = "op")]
        _op: IgnoredAny,
        symbols: Vec<String>,
        #[serde(default)]
        series: Option<Vec<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Resume {
        #[serde(rename = "op")]
        _op: IgnoredAny,
        #[serde(default, deserialize_with = "last_seen_map")]
        public: LastSeenMap,
        #[serde(default, deserialize_with = "last_seen_map")]
        private: LastSeenMap,
        #[serde(default)]
        symbols: Option<Vec<String>>,
        #[serde(default)]
        series: Option<Vec<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Refresh {
        #[serde(rename = "op")]
        _op: IgnoredAny,
        token: String,
    }
}

/// Who a published SMA result is for: what a gateway needs to fan it out.
#[derive(Debug, PartialEq, Deserialize)]
pub struct ResultRoute<'a> {
    /// The symbol: public results go to its subscribers.
    #[serde(borrow)]
    pub symbol: std::borrow::Cow<'a, str>,
    /// The client code of a private result: it goes to that group.
    #[serde(borrow, default)]
    pub client: Option<std::borrow::Cow<'a, str>>,
    /// The result's position in its key's sequence (1 or more).
    pub seq: Option<u64>,
    /// The epoch of `seq`.
    #[serde(borrow)]
    pub epoch: Option<std::borrow::Cow<'a, str>>,
    /// Present in every SMA message (a number, or `null` while a window's
    /// sum overflows); required so other JSON is not taken for one.
    #[serde(rename = "sma")]
    _sma: SmaValue,
    /// The window and how many prices the mean covers: each required, an
    /// integer, checked against the result schema's range.
    window: u64,
    count: u64,
    /// Required numbers whose values a route does not need.
    #[serde(rename = "price")]
    _price: JsonNumber,
    #[serde(rename = "ts")]
    _ts: u64,
}

/// The largest `sma.window`: a result naming a larger one is not one.
pub const MAX_WINDOW: usize = 10_000;

/// A member that must be a JSON number, whatever its value.
#[derive(Debug, PartialEq)]
struct JsonNumber;

/// The `sma` member of a result: a number or `null`, but never absent.
/// (An `Option<f64>` field would also accept a missing member.)
#[derive(Debug, PartialEq)]
struct SmaValue;

/// Accepts any JSON number, and `null` when `null_too`.
struct Numeric {
    null_too: bool,
}

impl serde::de::Visitor<'_> for Numeric {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.null_too {
            "a number or null"
        } else {
            "a number"
        })
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        if self.null_too {
            Ok(())
        } else {
            Err(E::invalid_type(serde::de::Unexpected::Unit, &self))
        }
    }
}

// `deserialize_any`, not `deserialize_option`: serde answers the latter for
// a missing member with "none", which would let one pass.
impl<'de> Deserialize<'de> for JsonNumber {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Numeric { null_too: false })?;
        Ok(JsonNumber)
    }
}

impl<'de> Deserialize<'de> for SmaValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Numeric { null_too: true })?;
        Ok(SmaValue)
    }
}

impl<'a> ResultRoute<'a> {
    /// The route of an SMA message as compute nodes publish it; `None` for
    /// anything else (no `sma` number, names the bridge would not produce,
    /// or longer than [`MAX_RESULT_BYTES`]).
    #[must_use]
    pub fn of(message: &'a str) -> Option<Self> {
        if message.len() > MAX_RESULT_BYTES {
            return None;
        }
        // A gateway routes every result it relays, and an event stream
        // reads each one's position: results as this bridge writes them
        // take one scan; anything else, serde_json.
        let route = Self::scanned(message).or_else(|| Self::parsed(message))?;
        // What docs/schemas/sma.schema.json requires of a result (members
        // it does not name are let through: a newer compute node's).
        let valid = names::is_symbol(&route.symbol)
            && route.client.as_deref().is_none_or(names::is_client_code)
            && route.position().is_some_and(|at| at.seq >= 1)
            && (1..=MAX_WINDOW as u64).contains(&route.window)
            && (1..=route.window).contains(&route.count);
        valid.then_some(route)
    }

    /// serde_json's reading of `message`, names not checked. For the tests
    /// that hold [`ResultRoute::scanned`] to it.
    #[doc(hidden)]
    #[must_use]
    pub fn parsed(message: &'a str) -> Option<Self> {
        serde_json::from_str(message).ok()
    }

    /// The route of a result laid out exactly as [`SmaMessage::encode`]
    /// writes one — its members in its order, strings without escapes,
    /// numbers without exponents — read in one scan; `None` means "ask
    /// serde_json", never "not a result". Wherever it answers, it answers
    /// as serde_json does (a property test checks it).
    #[doc(hidden)]
    #[must_use]
    pub fn scanned(message: &'a str) -> Option<Self> {
        use std::borrow::Cow::Borrowed;
        let mut rest = message.strip_prefix(r#"{"symbol":""#)?;
        let symbol = scan::plain_string(&mut rest)?;
        rest = rest.strip_prefix(r#","price":"#)?;
        scan::plain_number(&mut rest)?;
        rest = rest.strip_prefix(r#","sma":"#)?;
        match rest.strip_prefix("null") {
            Some(after) => rest = after,
            None => scan::plain_number(&mut rest)?,
        }
        let [window, count, _ts] = [r#","window":"#, r#","count":"#, r#","ts":"#].map(|member| {
            rest = rest.strip_prefix(member)?;
            scan::integer(&mut rest)
        });
        rest = rest.strip_prefix(r#","seq":"#)?;
        let seq = scan::integer(&mut rest)?;
        rest = rest.strip_prefix(r#","epoch":""#)?;
        let epoch = scan::plain_string(&mut rest)?;
        let client = match rest.strip_prefix(r#","client":""#) {
            Some(after) => {
                rest = after;
                Some(Borrowed(scan::plain_string(&mut rest)?))
            }
            None => None,
        };
        (rest == "}").then_some(Self {
            symbol: Borrowed(symbol),
            client,
            seq: Some(seq),
            epoch: Some(Borrowed(epoch)),
            _sma: SmaValue,
            window: window?,
            count: count?,
            _price: JsonNumber,
            _ts: _ts?,
        })
    }

    /// The result's position, when it carries a valid one.
    #[must_use]
    pub fn position(&self) -> Option<Position<'_>> {
        let epoch = self.epoch.as_deref().filter(|e| names::is_epoch(e))?;
        Some(Position {
            seq: self.seq?,
            epoch,
        })
    }
}

/// The pieces [`ResultRoute::scanned`] reads, each advancing `rest` past
/// what it took, or `None` for anything it leaves to serde_json.
mod scan {
    /// The rest of a string whose opening quote is behind: its text up to
    /// the closing quote, which is consumed. No escapes and no control
    /// characters (which JSON forbids raw), so the text is the value.
    pub(super) fn plain_string<'a>(rest: &mut &'a str) -> Option<&'a str> {
        let end = rest
            .bytes()
            .position(|b| b == b'"' || b == b'\\' || b < 0x20)?;
        let (text, after) = rest.split_at(end);
        *rest = after.strip_prefix('"')?;
        Some(text)
    }

    /// A JSON number without an exponent whose integer part fits a u64:
    /// what zmij writes for a result's usual price or mean (and finite as
    /// serde_json reads it).
    pub(super) fn plain_number(rest: &mut &str) -> Option<()> {
        let unsigned = rest.strip_prefix('-').unwrap_or(rest);
        let mut after = unsigned;
        integer(&mut after)?;
        if let Some(fraction) = after.strip_prefix('.') {
            let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return None;
            }
            after = &fraction[digits..];
        }
        if after.starts_with(['e', 'E']) {
            return None;
        }
        *rest = after;
        Some(())
    }

    /// An unsigned JSON integer (no leading zero) that fits a u64.
    pub(super) fn integer(rest: &mut &str) -> Option<u64> {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let text = &rest[..digits];
        if digits == 0 || (digits > 1 && text.starts_with('0')) {
            return None;
        }
        let value = text.parse().ok()?;
        *rest = &rest[digits..];
        Some(value)
    }
}

/// The longest `[[series]]` result a gateway relays: a candle with the
/// longest names and numbers comes to under 700 bytes. As for SMA results
/// ([`MAX_RESULT_BYTES`]), a longer message is not relayed, so what a key's
/// history and snapshot hold stays bounded.
pub const MAX_SERIES_RESULT_BYTES: usize = 1024;

/// Who a published `[[series]]` result is for, and where it stands: what a
/// gateway reads of each one it relays.
#[derive(Debug, PartialEq, Deserialize)]
pub struct SeriesRoute<'a> {
    /// The symbol.
    #[serde(borrow)]
    pub symbol: std::borrow::Cow<'a, str>,
    /// The series' name.
    #[serde(borrow)]
    pub series: std::borrow::Cow<'a, str>,
    /// The client code of a private result.
    #[serde(borrow, default)]
    pub client: Option<std::borrow::Cow<'a, str>>,
    /// Its position in its series key's sequence.
    pub seq: u64,
    /// The run of that sequence.
    #[serde(borrow)]
    pub epoch: std::borrow::Cow<'a, str>,
    /// A candle's: whether it is closed.
    #[serde(default)]
    pub closed: Option<bool>,
}

impl<'a> SeriesRoute<'a> {
    /// The route of a series result as compute nodes publish it; `None` for
    /// anything else (names the bridge would not write, no position, or
    /// longer than [`MAX_SERIES_RESULT_BYTES`]). Members it does not name
    /// are let through: a newer compute node's.
    #[must_use]
    pub fn of(message: &'a str) -> Option<Self> {
        if message.len() > MAX_SERIES_RESULT_BYTES {
            return None;
        }
        let route: Self = serde_json::from_str(message).ok()?;
        let valid = names::is_symbol(&route.symbol)
            && names::is_series(&route.series)
            && route.client.as_deref().is_none_or(names::is_client_code)
            && names::is_epoch(&route.epoch)
            && route.seq >= 1;
        valid.then_some(route)
    }

    /// The result's position.
    #[must_use]
    pub fn position(&self) -> Position<'_> {
        Position {
            seq: self.seq,
            epoch: &self.epoch,
        }
    }
}

/// A control frame the server sends.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    /// First frame on every socket.
    Welcome {
        /// The socket's client code.
        client: &'a str,
        /// The socket's initial subscriptions, sorted.
        subscriptions: &'a [String],
        /// The series the bridge serves (`sma` first): what subscriptions
        /// may name.
        series: &'a [String],
        /// When the socket's token expires (seconds since the Unix epoch;
        /// absent for tokens that do not): the socket is closed then, unless
        /// a `refresh` extends it.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    /// Reply to a refresh: when the socket now expires (absent: never).
    Refreshed {
        /// Seconds since the Unix epoch.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    /// Reply to subscribe and unsubscribe: the socket's whole current set, sorted.
    Subscribed {
        /// Every symbol the socket now subscribes to.
        symbols: &'a [String],
    },
    /// Reply to resume, before the frames it sends.
    Resumed {
        /// True when every key named was recovered: all its missed results
        /// follow. False when some could not be (listed in `unrecovered`).
        recovered: bool,
        /// How many missed results follow.
        replayed: usize,
        /// The keys whose missed results could not all be sent; the latest
        /// result of each (when known) follows instead.
        unrecovered: Unrecovered<'a>,
    },
    /// The socket fell behind and its outbox conflated: the next `keys`
    /// frames are the latest result of each key that did not fit (the
    /// results between were skipped; `seq` jumps), and after them delivery
    /// is complete again.
    Conflated {
        /// How many frames follow.
        keys: usize,
    },
    /// A request could not be served; the socket stays open.
    Error {
        /// What was wrong.
        message: &'a str,
    },
}

/// The keys a resume could not recover, public and private.
#[derive(Debug, Clone, Serialize)]
pub struct Unrecovered<'a> {
    /// Public symbols.
    pub public: &'a [&'a str],
    /// The client's private symbols.
    pub private: &'a [&'a str],
}

impl ServerFrame<'_> {
    /// Serializes the frame for sending.
    #[must_use]
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn framed_encoding_is_byte_for_byte_the_general_one() {
        for (count, client) in [(3, None), (1, None), (3, Some("acme")), (2, Some("b-2"))] {
            let message = SmaMessage {
                symbol: "BRK.B",
                price: 412.5,
                sma: 410.123_456_789,
                window: 3,
                count,
                ts: 1_764_115_200_123,
                seq: 7,
                epoch: "e1",
                client,
            };
            let general = serde_json::to_string(&message).expect("serializes");
            // Formatted, and with the numbers copied as a quote spelled them.
            for spelled in [
                Spelling::default(),
                Spelling {
                    price: Some("412.5"),
                    ts: Some("1764115200123"),
                },
            ] {
                let framed = message.encode_framed(
                    &KeyFraming::new(message.symbol, message.epoch, client),
                    &WindowFraming::new(3),
                    spelled,
                );
                assert_eq!(framed.as_str(), general, "count {count}, client {client:?}");
            }
        }
    }

    #[test]
    fn the_longest_result_fits_the_relay_bound() {
        let longest = SmaMessage {
            symbol: &"S".repeat(names::MAX_SYMBOL_LEN),
            price: -1.797_693_134_862_315_7e308,
            sma: -2.225_073_858_507_201_4e-308,
            window: MAX_WINDOW,
            count: MAX_WINDOW - 1,
            ts: u64::MAX,
            seq: u64::MAX,
            epoch: &"e".repeat(names::MAX_EPOCH_LEN),
            client: Some(&"c".repeat(names::MAX_CLIENT_CODE_LEN)),
        }
        .encode();
        assert!(
            longest.len() < 400 && 400 <= MAX_RESULT_BYTES,
            "{} bytes: {longest}",
            longest.len()
        );
        assert!(ResultRoute::of(longest.as_str()).is_some(), "and is routed");
        let pad = format!(r#"{{"pad":"{}","#, "x".repeat(MAX_RESULT_BYTES));
        let padded = longest.replacen('{', &pad, 1);
        assert!(
            ResultRoute::parsed(&padded).is_some(),
            "a route but for its length"
        );
        assert!(
            ResultRoute::of(&padded).is_none(),
            "too long to be a result"
        );
    }

    #[test]
    fn result_routes_come_from_sma_messages_only() {
        let message = |symbol, client| {
            SmaMessage {
                symbol,
                price: 1.0,
                sma: 2.0,
                window: 3,
                count: 3,
                ts: 4,
                seq: 7,
                epoch: "e1",
                client,
            }
            .encode()
        };
        let public = message("AAPL", None);
        let route = ResultRoute::of(public.as_str()).expect("routable");
        assert_eq!((&*route.symbol, route.client), ("AAPL", None));
        let private = message("MSFT", Some("acme"));
        let route = ResultRoute::of(private.as_str()).expect("routable");
        assert_eq!(route.client.as_deref(), Some("acme"));
        // A window whose sum overflows publishes `"sma":null`: still a result.
        let overflowed = SmaMessage {
            sma: f64::INFINITY,
            ..SmaMessage {
                symbol: "AAPL",
                price: 1.0,
                sma: 0.0,
                window: 1,
                count: 1,
                ts: 0,
                seq: 7,
                epoch: "e1",
                client: Some("acme"),
            }
        }
        .encode();
        let route = ResultRoute::of(overflowed.as_str()).expect("a null sma is routable");
        assert_eq!(route.client.as_deref(), Some("acme"));
        for junk in [
            "",
            "not json",
            r#"{"symbol":"AAPL"}"#,
            r#"{"symbol":"AAPL","sma":"x"}"#,
            r#"{"symbol":"AAPL","price":1}"#,
            r#"{"symbol":"bad symbol","sma":1}"#,
            r#"{"symbol":"AAPL","sma":1,"client":"no/slash"}"#,
            // Not results by the schema, though close: no position, a
            // wrong type, an epoch with a newline, impossible counts.
            r#"{"symbol":"AAPL","sma":null}"#,
            r#"{"symbol":"AAPL","price":1,"sma":1,"window":3,"count":3,"ts":4}"#,
            r#"{"symbol":"AAPL","price":"1","sma":1,"window":3,"count":3,"ts":4,"seq":7,"epoch":"e1"}"#,
            r#"{"symbol":"AAPL","price":1,"sma":1,"window":"3","count":3,"ts":4,"seq":7,"epoch":"e1"}"#,
            r#"{"symbol":"AAPL","price":1,"sma":1,"window":3,"count":3,"ts":-4,"seq":7,"epoch":"e1"}"#,
            r#"{"symbol":"AAPL","price":1,"sma":1,"window":3,"count":3,"ts":4,"seq":7,"epoch":"e\n1"}"#,
            r#"{"symbol":"AAPL","price":1,"sma":1,"window":3,"count":3,"ts":4,"seq":0,"epoch":"e1"}"#,
            r#"{"symbol":"AAPL","price":1,"sma":1,"window":3,"count":4,"ts":4,"seq":7,"epoch":"e1"}"#,
            r#"{"symbol":"AAPL","price":1,"sma":1,"window":0,"count":0,"ts":4,"seq":7,"epoch":"e1"}"#,
            r#"{"symbol":"AAPL","price":1,"sma":1,"window":10001,"count":3,"ts":4,"seq":7,"epoch":"e1"}"#,
        ] {
            assert!(ResultRoute::of(junk).is_none(), "{junk:?} is not routable");
        }
        // Members the schema does not name are let through (a newer
        // compute node's), in any order and spelling.
        let reordered = r#"{"epoch":"e1","seq":7,"ts":4.0e0,"count":3,"window":3,"sma":2,"price":1,"symbol":"A\u0041PL","series":"sma.10"}"#;
        assert!(
            ResultRoute::of(reordered).is_none(),
            "ts 4.0e0 is not an integer"
        );
        let reordered = reordered.replace("4.0e0", "4");
        let route = ResultRoute::of(&reordered).expect("routable");
        assert_eq!(&*route.symbol, "AAPL");
    }

    fn as_json(bytes: &str) -> Value {
        serde_json::from_str(bytes).expect("frame is JSON")
    }

    #[test]
    fn public_sma_has_no_client_field() {
        let msg = SmaMessage {
            symbol: "AAPL",
            price: 190.25,
            sma: 189.5,
            window: 10,
            count: 10,
            ts: 1_700_000_000_000,
            seq: 7,
            epoch: "e1",
            client: None,
        };
        assert_eq!(
            msg.encode().as_str(),
            r#"{"symbol":"AAPL","price":190.25,"sma":189.5,"window":10,"count":10,"ts":1700000000000,"seq":7,"epoch":"e1"}"#
        );
    }

    #[test]
    fn hand_written_encoding_equals_serde_json_as_json() {
        for (price, sma, client) in [
            (1.0, 1.0, None),
            (0.1, 1e-7, Some("acme")),
            (1e21, 123_456.789, None),
            (-3.5, f64::MAX, Some("a-b_c")),
        ] {
            let msg = SmaMessage {
                symbol: "BRK.B/X:1-_",
                price,
                sma,
                window: 10_000,
                count: 7,
                ts: u64::MAX,
                seq: 7,
                epoch: "e1",
                client,
            };
            let fast: Value = serde_json::from_str(msg.encode().as_str()).expect("valid JSON");
            let slow: Value =
                serde_json::from_str(&serde_json::to_string(&msg).expect("serialize"))
                    .expect("json");
            assert_eq!(fast, slow);
        }
        let overflowed = SmaMessage {
            symbol: "A",
            price: 1.0,
            sma: f64::INFINITY,
            window: 1,
            count: 1,
            ts: 0,
            seq: 7,
            epoch: "e1",
            client: None,
        };
        assert_eq!(as_json(&overflowed.encode())["sma"], Value::Null);
        // A symbol JSON would escape takes the general path and stays valid.
        let odd = SmaMessage {
            symbol: "a\"b",
            ..overflowed
        };
        assert_eq!(as_json(&odd.encode())["symbol"], "a\"b");
    }

    #[test]
    fn private_sma_names_its_client() {
        let msg = SmaMessage {
            symbol: "X",
            price: 1.0,
            sma: 1.0,
            window: 3,
            count: 1,
            ts: 5,
            seq: 7,
            epoch: "e1",
            client: Some("acme"),
        };
        assert_eq!(as_json(&msg.encode())["client"], "acme");
    }

    #[test]
    fn client_ops_parse() {
        assert_eq!(
            ClientOp::parse(r#"{"op":"subscribe","symbols":["A","B"]}"#),
            Ok(ClientOp::Subscribe {
                symbols: vec!["A".into(), "B".into()],
                series: None,
                max_rate: None,
                closed_only: false,
            })
        );
        assert_eq!(
            ClientOp::parse(
                r#"{"op":"subscribe","symbols":["A"],"series":["sma","candles.1m"],"closed_only":true}"#
            ),
            Ok(ClientOp::Subscribe {
                symbols: vec!["A".into()],
                series: Some(vec!["sma".into(), "candles.1m".into()]),
                max_rate: None,
                closed_only: true,
            })
        );
        assert_eq!(
            ClientOp::parse(r#"{"op":"unsubscribe","symbols":[]}"#),
            Ok(ClientOp::Unsubscribe {
                symbols: vec![],
                series: None
            })
        );
        for bad in [
            "",
            "nope",
            "{}",
            r#"{"op":"publish","symbols":["A"]}"#,
            r#"{"op":"subscribe"}"#,
            r#"{"op":"subscribe","symbols":"A"}"#,
            r#"{"op":"subscribe","symbols":["A"],"extra":1}"#,
        ] {
            assert!(ClientOp::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn a_request_is_read_whatever_the_order_of_its_members() {
        let mut e1 = BTreeMap::new();
        // A symbol named twice keeps its last seq, as a map would.
        e1.insert("A".to_owned(), 1);
        e1.insert("B".to_owned(), 3);
        let mut public = LastSeenMap::new();
        public.insert("e1".to_owned(), e1);
        let expected = ClientOp::Resume(LastSeen {
            public,
            symbols: Some(vec!["*".into()]),
            ..LastSeen::default()
        });
        for text in [
            r#"{"op":"resume","public":{"e1":{"B":2,"A":1,"B":3}},"symbols":["*"]}"#,
            r#"{"public":{"e1":{"B":2,"A":1,"B":3}},"symbols":["*"],"op":"resume"}"#,
        ] {
            assert_eq!(ClientOp::parse(text), Ok(expected.clone()), "{text}");
        }
        assert_eq!(
            ClientOp::parse(r#"{"symbols":["A"],"op":"unsubscribe"}"#),
            Ok(ClientOp::Unsubscribe {
                symbols: vec!["A".into()],
                series: None
            })
        );
        for (bad, says) in [
            (
                r#"{"op":"resume","public":{"e1":{"A":-1}}}"#,
                "invalid value",
            ),
            (
                r#"{"op":"resume","public":{"e1":["A"]}}"#,
                "an object of symbols and seqs",
            ),
            (
                r#"{"op":"resume","public":{},"extra":1}"#,
                "unknown field `extra`",
            ),
            (r#"{"op":"publish"}"#, "unknown variant `publish`"),
            // One `op` decides the shape: a second is refused, not chosen.
            (
                r#"{"op":"subscribe","op":"resume","symbols":["A"]}"#,
                "duplicate field `op`",
            ),
            (
                r#"{"op":"resume","public":{"e1":{"A":1}},"public":{}}"#,
                "duplicate field `public`",
            ),
            (r#"{"symbols":["A"]}"#, "missing field `op`"),
            (r#"{"op":"resume","public":{}"#, "EOF"),
        ] {
            let err = ClientOp::parse(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn server_frames() {
        let subs = vec!["*".to_string()];
        let series = vec!["sma".to_string()];
        assert_eq!(
            as_json(
                &ServerFrame::Welcome {
                    client: "acme",
                    subscriptions: &subs,
                    series: &series,
                    expires_at: None,
                }
                .encode()
            ),
            json!({"type":"welcome","client":"acme","subscriptions":["*"],"series":["sma"]})
        );
        let expiring = ServerFrame::Welcome {
            client: "acme",
            subscriptions: &subs,
            series: &series,
            expires_at: Some(1_800_000_000),
        };
        assert_eq!(
            as_json(&expiring.encode()),
            json!({"type":"welcome","client":"acme","subscriptions":["*"],"series":["sma"],"expires_at":1_800_000_000})
        );
        assert_eq!(
            as_json(
                &ServerFrame::Refreshed {
                    expires_at: Some(7)
                }
                .encode()
            ),
            json!({"type":"refreshed","expires_at":7})
        );
        assert_eq!(
            ClientOp::parse(r#"{"op":"refresh","token":"t"}"#),
            Ok(ClientOp::Refresh { token: "t".into() })
        );
        assert_eq!(
            as_json(&ServerFrame::Subscribed { symbols: &subs }.encode()),
            json!({"type":"subscribed","symbols":["*"]})
        );
        assert_eq!(
            as_json(&ServerFrame::Error { message: "no" }.encode()),
            json!({"type":"error","message":"no"})
        );
    }
}
