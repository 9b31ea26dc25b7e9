//! A result on its way from where it is made to the sockets and event
//! streams: its encoded bytes, and beside them its key and its position,
//! read once where the result was made (or, for a result relayed from Redis,
//! where its bytes came in). Whoever handles it afterwards (the hub, its
//! history and snapshots, an event stream writing ids) asks the frame, and
//! never parses JSON to learn where a result goes or where it stands.
//!
//! The text type is the caller's: a `String` here, the web framework's
//! shared text type in the fan-out crate, so the bytes are shared, not
//! copied, with every socket. The key is kept as spans of the text (a
//! result is at most [`MAX_RESULT_BYTES`] long), so a frame is cloned once
//! per socket for the cost of its text's reference count.

use std::ops::{Deref, Range};
use std::sync::Arc;

use crate::names::StreamName;
use crate::protocol::{KeyFraming, MAX_RESULT_BYTES, Position, ResultRoute, SeriesRoute};

/// An encoded result with its key and position.
#[derive(Debug, PartialEq, Eq)]
pub struct ResultFrame<T> {
    text: T,
    route: Route,
}

// By hand, to be inlined: fan-out clones a frame once per socket.
impl<T: Clone> Clone for ResultFrame<T> {
    #[inline]
    fn clone(&self) -> Self {
        Self {
            text: self.text.clone(),
            route: self.route.clone(),
        }
    }
}

/// Where a frame's names are.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// In the text, as spans: every result this bridge encodes, and every
    /// relayed one that spells its names without escapes.
    InText {
        symbol: Span,
        /// Empty: a public result.
        client: Span,
        /// Empty: a result without a position.
        epoch: Span,
        seq: u64,
    },
    /// Held beside the text: a relayed result whose names are escaped in
    /// its JSON (`"BRK\/B"`), so the text does not spell them as they are;
    /// and every `[[series]]` result, whose key is named `symbol@series`.
    Beside(Arc<Names>),
}

/// Whether a result is a candle, and if so whether it is final: a closed
/// candle is never replaced by a later result of its key (conflation and
/// rate limits replace only what a later result supersedes), and a
/// subscription may ask for closed candles only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BarState {
    /// Not a candle: the SMA and every other series.
    #[default]
    NotABar,
    /// An update of a candle still open.
    Open,
    /// A candle's final value.
    Closed,
}

impl Clone for Route {
    #[inline]
    fn clone(&self) -> Self {
        match self {
            Self::InText {
                symbol,
                client,
                epoch,
                seq,
            } => Self::InText {
                symbol: *symbol,
                client: *client,
                epoch: *epoch,
                seq: *seq,
            },
            Self::Beside(names) => Self::Beside(names.clone()),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Names {
    /// The key's name: the symbol, then `@series` for a series' key.
    key: Box<str>,
    /// How much of `key` is the symbol.
    symbol_len: usize,
    client: Option<Box<str>>,
    position: Option<(u64, Box<str>)>,
    bar: BarState,
}

impl Names {
    fn new(
        symbol: &str,
        series: Option<&str>,
        client: Option<&str>,
        position: Option<Position<'_>>,
        bar: BarState,
    ) -> Self {
        let key = StreamName { symbol, series }.joined();
        Self {
            key: key.into(),
            symbol_len: symbol.len(),
            client: client.map(Box::from),
            position: position.map(|at| (at.seq, at.epoch.into())),
            bar,
        }
    }
}

/// A range of a result's text; results are short, so two `u16`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Span {
    start: u16,
    len: u16,
}

impl Span {
    /// The span of `range`, which lies within a result's text.
    fn of(range: Range<usize>) -> Self {
        debug_assert!(range.end <= MAX_RESULT_BYTES);
        Self {
            start: u16::try_from(range.start).unwrap_or(u16::MAX),
            len: u16::try_from(range.len()).unwrap_or(0),
        }
    }

    /// The span of `part`, a slice of `whole`.
    fn within(whole: &str, part: &str) -> Option<Self> {
        let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
        (start + part.len() <= whole.len()).then(|| Self::of(start..start + part.len()))
    }

    fn is_empty(self) -> bool {
        self.len == 0
    }

    fn read(self, text: &str) -> &str {
        let start = usize::from(self.start);
        text.get(start..start + usize::from(self.len))
            .unwrap_or_default()
    }
}

impl<T: Deref<Target = str>> ResultFrame<T> {
    /// A result this bridge encoded with `framing`, at `seq`: where its
    /// names are is known from the framing, nothing is read.
    pub fn encoded(text: T, framing: &KeyFraming, seq: u64) -> Self {
        let len = text.len();
        let spans = framing.spans(len);
        let frame = Self {
            text,
            route: Route::InText {
                symbol: Span::of(spans.symbol),
                client: spans.client.map(Span::of).unwrap_or_default(),
                epoch: Span::of(spans.epoch),
                seq,
            },
        };
        debug_assert_eq!(
            ResultRoute::of(&frame.text).map(|route| (
                route.symbol.to_string(),
                route.client.as_deref().map(str::to_owned),
                route.seq
            )),
            Some((
                frame.symbol().to_owned(),
                frame.client().map(str::to_owned),
                Some(seq)
            )),
            "the framing says where the names are"
        );
        frame
    }

    /// Reads the key and position of a result that came in as bytes (a
    /// compute node's, relayed by a gateway, or a stored snapshot); the
    /// text back for anything that is not a result ([`ResultRoute::of`]),
    /// so a caller can say what it was without keeping a copy of every one.
    pub fn read(text: T) -> Result<Self, T> {
        let route = {
            let whole = &*text;
            let Some(parsed) = ResultRoute::of(whole) else {
                return Err(text);
            };
            let position = parsed.position();
            let in_text = |part: Option<&str>| match part {
                None => Some(Span::default()),
                Some(part) => Span::within(whole, part),
            };
            let spans = (|| {
                Some(Route::InText {
                    symbol: Span::within(whole, &parsed.symbol)?,
                    client: in_text(parsed.client.as_deref())?,
                    epoch: in_text(position.map(|at| at.epoch))?,
                    seq: position.map_or(0, |at| at.seq),
                })
            })();
            spans.unwrap_or_else(|| {
                Route::Beside(Arc::new(Names::new(
                    &parsed.symbol,
                    None,
                    parsed.client.as_deref(),
                    position,
                    BarState::NotABar,
                )))
            })
        };
        Ok(Self { text, route })
    }

    /// Reads a `[[series]]` result that came in as bytes (a compute node's,
    /// relayed by a gateway) from the channel of the series `series`; the
    /// text back for anything that is not one of that series' results
    /// ([`SeriesRoute::of`]).
    pub fn read_series(text: T, series: &str) -> Result<Self, T> {
        let names = {
            let Some(route) = SeriesRoute::of(&text).filter(|route| route.series == series) else {
                return Err(text);
            };
            let bar = match route.closed {
                None => BarState::NotABar,
                Some(false) => BarState::Open,
                Some(true) => BarState::Closed,
            };
            Names::new(
                &route.symbol,
                Some(series),
                route.client.as_deref(),
                Some(route.position()),
                bar,
            )
        };
        Ok(Self {
            text,
            route: Route::Beside(Arc::new(names)),
        })
    }

    /// A frame whose key and position are given rather than read from
    /// `text`, which may then be anything: for tests, and for what a test
    /// double delivers.
    pub fn detached(
        text: T,
        symbol: &str,
        client: Option<&str>,
        position: Option<Position<'_>>,
    ) -> Self {
        Self {
            text,
            route: Route::Beside(Arc::new(Names::new(
                symbol,
                None,
                client,
                position,
                BarState::NotABar,
            ))),
        }
    }

    /// A `[[series]]` result this bridge encoded: its key is named
    /// `symbol@series`, and sockets, history and snapshots keep it apart
    /// from the symbol's SMA.
    pub fn series(
        text: T,
        series: &str,
        symbol: &str,
        client: Option<&str>,
        position: Position<'_>,
        bar: BarState,
    ) -> Self {
        Self {
            text,
            route: Route::Beside(Arc::new(Names::new(
                symbol,
                Some(series),
                client,
                Some(position),
                bar,
            ))),
        }
    }

    /// The result's symbol.
    pub fn symbol(&self) -> &str {
        match &self.route {
            Route::InText { symbol, .. } => symbol.read(&self.text),
            Route::Beside(names) => &names.key[..names.symbol_len],
        }
    }

    /// The name of the result's key among its client's (or the public)
    /// keys: the symbol for an SMA, `symbol@series` for a series' result.
    /// Subscriptions, history, snapshots and conflation go by it.
    pub fn key(&self) -> &str {
        match &self.route {
            Route::InText { symbol, .. } => symbol.read(&self.text),
            Route::Beside(names) => &names.key,
        }
    }

    /// The series of a `[[series]]` result; `None` for an SMA.
    pub fn series_name(&self) -> Option<&str> {
        match &self.route {
            Route::InText { .. } => None,
            Route::Beside(names) => names.key.get(names.symbol_len + 1..),
        }
    }

    /// Whether the result is a candle, and a closed one.
    pub fn bar(&self) -> BarState {
        match &self.route {
            Route::InText { .. } => BarState::NotABar,
            Route::Beside(names) => names.bar,
        }
    }

    /// The client code of a private result; `None` for a public one.
    pub fn client(&self) -> Option<&str> {
        match &self.route {
            Route::InText { client, .. } if client.is_empty() => None,
            Route::InText { client, .. } => Some(client.read(&self.text)),
            Route::Beside(names) => names.client.as_deref(),
        }
    }

    /// Where the result stands in its key's sequence; `None` only for a
    /// frame built without one (a test double's): every result the
    /// pipeline makes or a gateway reads has one.
    pub fn position(&self) -> Option<Position<'_>> {
        match &self.route {
            Route::InText { epoch, .. } if epoch.is_empty() => None,
            Route::InText { epoch, seq, .. } => Some(Position {
                seq: *seq,
                epoch: epoch.read(&self.text),
            }),
            Route::Beside(names) => names
                .position
                .as_ref()
                .map(|(seq, epoch)| Position { seq: *seq, epoch }),
        }
    }

    /// The encoded result, as sockets and Redis carry it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl<T> ResultFrame<T> {
    /// The encoded result.
    pub fn text(&self) -> &T {
        &self.text
    }

    /// The encoded result, the frame given up.
    pub fn into_text(self) -> T {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{SmaMessage, WindowFraming};
    use crate::quote::Spelling;
    use proptest::prelude::*;

    fn encode(symbol: &str, client: Option<&str>, seq: u64) -> ResultFrame<String> {
        let framing = KeyFraming::new(symbol, "e9", client);
        let text = SmaMessage {
            symbol,
            price: 1.5,
            sma: 1.25,
            window: 3,
            count: 2,
            ts: 7,
            seq,
            epoch: "e9",
            client,
        }
        .encode_framed(&framing, &WindowFraming::new(3), Spelling::default());
        ResultFrame::encoded(text, &framing, seq)
    }

    #[test]
    fn an_encoded_result_knows_its_key_and_position() {
        let public = encode("BRK/B", None, 41);
        assert_eq!(public.symbol(), "BRK/B");
        assert_eq!(public.client(), None);
        assert_eq!(
            public.position(),
            Some(Position {
                seq: 41,
                epoch: "e9"
            })
        );
        let private = encode("AAPL", Some("acme"), 1);
        assert_eq!(private.client(), Some("acme"));
        assert_eq!(private.symbol(), "AAPL");
        assert_eq!(
            private.position(),
            Some(Position {
                seq: 1,
                epoch: "e9"
            })
        );
    }

    #[test]
    fn a_relayed_result_is_read_once_escaped_or_not() {
        let plain = encode("AAPL", Some("acme"), 3);
        let read = ResultFrame::read(plain.as_str()).expect("a result");
        assert_eq!(
            (read.symbol(), read.client(), read.position()),
            (plain.symbol(), plain.client(), plain.position())
        );
        let escaped = r#"{"symbol":"BRK\/B","price":1.0,"sma":1.0,"window":1,"count":1,"ts":1,"seq":5,"epoch":"e1","client":"a\u0063me"}"#;
        let read = ResultFrame::read(escaped).expect("a result");
        assert_eq!(read.symbol(), "BRK/B");
        assert_eq!(read.client(), Some("acme"));
        assert_eq!(
            read.position(),
            Some(Position {
                seq: 5,
                epoch: "e1"
            })
        );
        assert_eq!(read.as_str(), escaped, "the bytes are relayed as they came");
        let positionless = r#"{"symbol":"A","sma":null}"#;
        assert!(
            ResultFrame::read(positionless).is_err(),
            "not a result by the schema"
        );
        assert!(ResultFrame::read(r#"{"symbol":"A"}"#).is_err(), "no sma");
    }

    #[test]
    fn a_relayed_series_result_is_read_with_its_key_and_candle_state() {
        let candle = r#"{"symbol":"BRK\/B","series":"candles.1m","interval_ms":60000,"start":0,"end":60000,"open":1.0,"high":1.0,"low":1.0,"close":1.0,"volume":0.0,"trades":1,"vwap":null,"closed":true,"ts":5,"seq":7,"epoch":"e1","client":"acme"}"#;
        let read = ResultFrame::read_series(candle, "candles.1m").expect("a series result");
        assert_eq!(
            (read.key(), read.symbol(), read.series_name(), read.client()),
            (
                "BRK/B@candles.1m",
                "BRK/B",
                Some("candles.1m"),
                Some("acme")
            )
        );
        assert_eq!(read.bar(), BarState::Closed);
        assert_eq!(
            read.position(),
            Some(Position {
                seq: 7,
                epoch: "e1"
            })
        );
        assert!(
            ResultFrame::read_series(candle, "candles.5m").is_err(),
            "another series' channel"
        );
        let ema = r#"{"symbol":"A","series":"ema.2","price":1.0,"ema":1.0,"span":2,"ts":1,"seq":1,"epoch":"e1"}"#;
        let read = ResultFrame::read_series(ema, "ema.2").expect("a series result");
        assert_eq!((read.key(), read.bar()), ("A@ema.2", BarState::NotABar));
        for bad in [
            r#"{"symbol":"A","series":"ema.2","seq":0,"epoch":"e1"}"#,
            r#"{"symbol":"A B","series":"ema.2","seq":1,"epoch":"e1"}"#,
            r#"{"symbol":"A","series":"ema.2","seq":1}"#,
            "nonsense",
        ] {
            assert!(ResultFrame::read_series(bad, "ema.2").is_err(), "{bad}");
        }
        let long = format!(
            r#"{{"symbol":"A","series":"ema.2","seq":1,"epoch":"e1","pad":"{}"}}"#,
            "x".repeat(1024)
        );
        assert!(
            ResultFrame::read_series(long.as_str(), "ema.2").is_err(),
            "too long"
        );
    }

    proptest! {
        /// Whatever the names, the frame answers as parsing its text does.
        #[test]
        fn spans_answer_as_the_parser_does(
            symbol in "[A-Za-z0-9._:/-]{1,16}",
            client in proptest::option::of("[A-Za-z0-9_-]{1,12}"),
            seq in 1u64..u64::MAX,
        ) {
            let frame = encode(&symbol, client.as_deref(), seq);
            let parsed = ResultRoute::parsed(frame.as_str()).expect("parses");
            prop_assert_eq!(frame.symbol(), &*parsed.symbol);
            prop_assert_eq!(frame.client(), parsed.client.as_deref());
            prop_assert_eq!(frame.position(), parsed.position());
            let read = ResultFrame::read(frame.as_str()).expect("reads");
            prop_assert_eq!(read.route, frame.route);
        }
    }
}
