//! OHLCV candles by event time: a key's quotes grouped into buckets of
//! `floor(ts / interval) × interval` (UTC-aligned, since `ts` counts from
//! the Unix epoch), each with its open (first quote in arrival order), high,
//! low, close (last), volume, trade count and volume-weighted average price.
//!
//! A candle closes once, when event time has passed its end: a quote of the
//! key in a later bucket, or (through [`Candles::close_before`]) the feed as
//! a whole having moved past it. A quote for a bucket that is already
//! closed, or older than the open one, is late: it is left out and the
//! caller counts it. Only `ts` and arrival order decide any of this, so the
//! same input gives the same candles on every replay.

use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};

use super::Input;
use super::total::{Amount, Total};
use crate::decimal::Decimal;

/// One candle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bar {
    /// The bucket's first millisecond.
    pub start_ms: u64,
    /// The next bucket's first millisecond (the bucket is `[start, end)`).
    pub end_ms: u64,
    /// The first price of the bucket, in arrival order.
    pub open: f64,
    /// The highest price.
    pub high: f64,
    /// The lowest price.
    pub low: f64,
    /// The last price, in arrival order.
    pub close: f64,
    /// The sum of the quotes' volumes (a quote without one adds 0).
    pub volume: Total,
    /// The sum of price × volume, for the VWAP.
    pub turnover: Total,
    /// How many quotes the bucket took.
    pub trades: u64,
    /// Whether the candle is final.
    pub closed: bool,
}

impl Bar {
    fn open_at(start_ms: u64, interval: NonZeroU64, price: f64) -> Self {
        Self {
            start_ms,
            end_ms: start_ms.saturating_add(interval.get()),
            open: price,
            high: price,
            low: price,
            close: price,
            volume: Total::new(),
            turnover: Total::new(),
            trades: 0,
            closed: false,
        }
    }

    fn take(&mut self, quote: &Input) {
        self.high = self.high.max(quote.price);
        self.low = self.low.min(quote.price);
        self.close = quote.price;
        let (volume, volume_decimal) = quote.volume.unwrap_or((0.0, Decimal::new(0, 0)));
        self.volume.add(volume, volume_decimal);
        self.turnover
            .add_product(quote.price * volume, quote.decimal, volume_decimal);
        self.trades += 1;
    }

    /// The total volume.
    #[must_use]
    pub fn volume(&self) -> Amount {
        self.volume.value()
    }

    /// The volume-weighted average price, Σ(price × volume) / Σ volume;
    /// `None` while the volume is zero.
    #[must_use]
    pub fn vwap(&self) -> Option<Amount> {
        self.turnover.ratio(&self.volume)
    }
}

/// What one quote did to a key's candles.
#[derive(Debug, Clone, PartialEq)]
pub enum Pushed<'a> {
    /// The quote went into the open candle (`closed` is the candle it
    /// closed by starting a new bucket, if any).
    Taken {
        /// The candle that closed, final.
        closed: Option<Bar>,
        /// The open candle, with the quote in it.
        open: &'a Bar,
    },
    /// The quote's bucket is closed or older than the open one: left out.
    Late,
}

/// One key's candles of one interval: the open candle, and how far they
/// have closed.
#[derive(Debug, Clone, PartialEq)]
pub struct Candles {
    interval: NonZeroU64,
    open: Option<Bar>,
    /// Quotes before this are late: the end of the last closed candle.
    closed_until: u64,
}

/// What candles keep, for persisting them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandlesState {
    /// The open candle.
    pub open: Option<Bar>,
    /// The end of the last closed candle.
    pub closed_until: u64,
}

impl Candles {
    /// Candles of `interval` milliseconds, none yet.
    #[must_use]
    pub fn new(interval: NonZeroU64) -> Self {
        Self {
            interval,
            open: None,
            closed_until: 0,
        }
    }

    /// The bucket `ts` falls in.
    #[must_use]
    pub fn bucket_of(&self, ts: u64) -> u64 {
        ts - ts % self.interval.get()
    }

    /// Takes one quote.
    pub fn push(&mut self, trade: &Input) -> Pushed<'_> {
        let start = self.bucket_of(trade.ts);
        if trade.ts < self.closed_until || self.open.as_ref().is_some_and(|b| start < b.start_ms) {
            return Pushed::Late;
        }
        let closed = match &self.open {
            Some(open) if open.start_ms == start => None,
            _ => self.close_open(),
        };
        let interval = self.interval;
        let open = self
            .open
            .get_or_insert_with(|| Bar::open_at(start, interval, trade.price));
        open.take(trade);
        Pushed::Taken { closed, open }
    }

    /// Closes the open candle if event time (the feed's, `watermark_ms`)
    /// has reached its end, and returns it.
    pub fn close_before(&mut self, watermark_ms: u64) -> Option<Bar> {
        let due = self
            .open
            .as_ref()
            .is_some_and(|open| open.end_ms <= watermark_ms);
        if due { self.close_open() } else { None }
    }

    fn close_open(&mut self) -> Option<Bar> {
        let mut bar = self.open.take()?;
        bar.closed = true;
        self.closed_until = bar.end_ms;
        Some(bar)
    }

    /// The open candle, if any.
    #[must_use]
    pub fn open(&self) -> Option<&Bar> {
        self.open.as_ref()
    }

    /// Everything needed to continue these candles elsewhere bit for bit.
    #[must_use]
    pub fn state(&self) -> CandlesState {
        CandlesState {
            open: self.open.clone(),
            closed_until: self.closed_until,
        }
    }

    /// Candles of `interval` continuing from `state`; an open candle of
    /// another interval (the configuration changed) is dropped.
    #[must_use]
    pub fn restore(interval: NonZeroU64, state: CandlesState) -> Self {
        let open = state
            .open
            .filter(|bar| bar.end_ms.checked_sub(bar.start_ms) == Some(interval.get()));
        Self {
            interval,
            open,
            closed_until: state.closed_until,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trade(ts: u64, price: &str, volume: Option<&str>) -> Input {
        let decimal = Decimal::parse(price);
        Input {
            ts,
            price: price.parse().expect("a number"),
            decimal,
            volume: volume.map(|v| (v.parse().expect("a number"), Decimal::parse(v))),
        }
    }

    fn minute() -> Candles {
        Candles::new(NonZeroU64::new(60_000).expect("non-zero"))
    }

    #[test]
    fn a_bucket_gathers_ohlcv_and_vwap() {
        let mut c = minute();
        for (ts, price, volume) in [
            (60_000, "10.5", "100"),
            (61_000, "11.25", "50"),
            (62_000, "9.75", "50"),
            (119_999, "10", "0"),
        ] {
            let Pushed::Taken { closed, .. } = c.push(&trade(ts, price, Some(volume))) else {
                panic!("{ts} is not late");
            };
            assert_eq!(closed, None);
        }
        let bar = c.open().expect("open").clone();
        assert_eq!((bar.start_ms, bar.end_ms), (60_000, 120_000));
        assert_eq!(
            (bar.open, bar.high, bar.low, bar.close),
            (10.5, 11.25, 9.75, 10.0)
        );
        assert_eq!(bar.trades, 4);
        assert_eq!(bar.volume().value, 200.0);
        // (1050 + 562.5 + 487.5) / 200
        let vwap = bar.vwap().expect("volume traded");
        assert!(vwap.exact);
        assert_eq!(vwap.value, 10.5);
    }

    #[test]
    fn a_later_bucket_closes_the_open_candle_once() {
        let mut c = minute();
        c.push(&trade(1_000, "1", Some("1")));
        let Pushed::Taken { closed, open } = c.push(&trade(125_000, "2", Some("1"))) else {
            panic!("not late");
        };
        let closed = closed.expect("the first minute closed");
        assert!(closed.closed);
        assert_eq!((closed.start_ms, closed.close), (0, 1.0));
        assert_eq!(open.start_ms, 120_000);
        assert!(!open.closed);
    }

    #[test]
    fn quotes_for_closed_or_older_buckets_are_late() {
        let mut c = minute();
        c.push(&trade(61_000, "1", None));
        c.push(&trade(121_000, "2", None));
        assert_eq!(c.push(&trade(119_000, "3", None)), Pushed::Late);
        assert_eq!(c.push(&trade(5_000, "3", None)), Pushed::Late);
        // Out of order within the open bucket is fine.
        assert!(matches!(
            c.push(&trade(120_500, "4", None)),
            Pushed::Taken { closed: None, .. }
        ));
        assert_eq!(c.open().expect("open").close, 4.0);
    }

    #[test]
    fn feed_progress_closes_a_quiet_key() {
        let mut c = minute();
        c.push(&trade(61_000, "1", None));
        assert_eq!(c.close_before(119_999), None);
        let bar = c.close_before(120_000).expect("due");
        assert!(bar.closed);
        assert_eq!(c.push(&trade(119_000, "1", None)), Pushed::Late);
        assert_eq!(c.close_before(500_000), None, "nothing open");
    }

    #[test]
    fn no_volume_means_no_vwap() {
        let mut c = minute();
        c.push(&trade(0, "5", None));
        let bar = c.open().expect("open");
        assert_eq!(bar.volume().value, 0.0);
        assert_eq!(bar.vwap(), None);
        assert_eq!(bar.trades, 1);
    }

    #[test]
    fn state_survives_json_and_continues() {
        let mut c = minute();
        c.push(&trade(60_001, "10.01", Some("0.00000001")));
        c.push(&trade(60_002, "10.03", Some("3")));
        let json = serde_json::to_string(&c.state()).expect("serializes");
        let mut restored = Candles::restore(
            NonZeroU64::new(60_000).expect("non-zero"),
            serde_json::from_str(&json).expect("reads"),
        );
        assert_eq!(restored, c);
        let next = trade(60_003, "10.02", Some("1.5"));
        c.push(&next);
        restored.push(&next);
        assert_eq!(restored, c);
    }
}
