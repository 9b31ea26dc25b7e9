//! Rolling statistics over a long time window, like an exchange's 24-hour
//! ticker: open, high, low, last, change and volume of a key's quotes over
//! the last `window` of event time.
//!
//! A busy symbol trades millions of times a day, so a day's quotes are not
//! kept one by one: they are gathered into `step`-long buckets (by default
//! `window / 1440`, a minute for a day), each holding its open, high, low,
//! last, volume and trade count. A bucket leaves as a whole, so the
//! statistics at `t` cover `[from, t]`, where `from` is the start of the
//! oldest bucket wholly inside `(t − window, t]`; every result says which
//! `from` it covers, rather than pretend to cover the window to the
//! millisecond. Memory is at most `window / step + 1` buckets per key,
//! however fast the key trades. Within what it covers, everything is exact:
//! open, high, low and last are input prices, volume is the exact sum,
//! change is `last − open` rounded once.
//!
//! Quotes may come out of `ts` order by up to `lateness`: each goes to its
//! own bucket, and open and last follow `ts` (ties: arrival order).

use std::collections::VecDeque;
use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};

use super::total::{Amount, Total};
use crate::decimal::{self, Decimal};

/// One bucket of quotes (also as saved).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    start: u64,
    open: Price,
    last: Price,
    high: f64,
    low: f64,
    volume: Total,
    trades: u64,
}

/// A price with the `ts` it was quoted at.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "(u64, f64, u8)", into = "(u64, f64, u8)")]
struct Price {
    ts: u64,
    value: f64,
    decimal: Option<Decimal>,
}

/// Saved as `[ts, price, places]`, places 255 for an inexact price.
impl From<Price> for (u64, f64, u8) {
    fn from(price: Price) -> Self {
        (
            price.ts,
            price.value,
            price.decimal.map_or(u8::MAX, Decimal::scale),
        )
    }
}

impl From<(u64, f64, u8)> for Price {
    fn from((ts, value, scale): (u64, f64, u8)) -> Self {
        Self {
            ts,
            value,
            decimal: Decimal::from_f64(value, scale),
        }
    }
}

/// What a ticker keeps, for persisting it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollingState {
    /// The buckets, oldest first.
    pub buckets: Vec<Bucket>,
    /// The newest `ts`.
    pub newest: Option<u64>,
    /// The running high, low, volume and trades over the buckets (a volume
    /// summed afresh could differ in the last bits once inexact).
    pub high: f64,
    /// See `high`.
    pub low: f64,
    /// See `high`.
    pub volume: Total,
    /// See `high`.
    pub trades: u64,
}

/// The statistics at one quote.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ticker {
    /// The first millisecond covered: the start of the oldest bucket
    /// inside the window.
    pub from_ms: u64,
    /// The first price covered, by `ts`.
    pub open: f64,
    /// The highest price covered.
    pub high: f64,
    /// The lowest price covered.
    pub low: f64,
    /// The last price, by `ts`.
    pub last: f64,
    /// `last − open`, rounded once when both are exact decimals.
    pub change: Amount,
    /// The volume covered.
    pub volume: Amount,
    /// How many quotes are covered.
    pub trades: u64,
}

/// What a quote produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RollingPushed {
    /// The statistics over the window ending at the newest `ts`.
    Ticker(Ticker),
    /// More than `lateness` behind the newest `ts`, or in a bucket that has
    /// left the window: left out.
    Late,
}

/// One key's rolling statistics.
#[derive(Debug, Clone)]
pub struct Rolling {
    window: u64,
    step: u64,
    lateness: u64,
    /// By start, oldest first; only buckets that had quotes.
    buckets: VecDeque<Bucket>,
    newest: Option<u64>,
    /// High, low, volume and trades over the buckets kept, updated with
    /// each quote and summed afresh when a bucket leaves.
    high: f64,
    low: f64,
    volume: Total,
    trades: u64,
}

impl Rolling {
    /// Statistics over `window`, in buckets of `step` (at most the window),
    /// taking quotes up to `lateness` behind the newest.
    #[must_use]
    pub fn new(window: NonZeroU64, step: NonZeroU64, lateness: u64) -> Self {
        Self {
            window: window.get(),
            step: step.get().min(window.get()),
            lateness,
            buckets: VecDeque::new(),
            newest: None,
            high: f64::NEG_INFINITY,
            low: f64::INFINITY,
            volume: Total::new(),
            trades: 0,
        }
    }

    /// Everything needed to continue these statistics elsewhere bit for bit.
    #[must_use]
    pub fn state(&self) -> RollingState {
        RollingState {
            buckets: self.buckets.iter().cloned().collect(),
            newest: self.newest,
            high: self.high,
            low: self.low,
            volume: self.volume,
            trades: self.trades,
        }
    }

    /// Statistics of these parameters continuing from `state`; saved
    /// buckets of another step (the configuration changed) are summed
    /// afresh into what they can still say: nothing, so they are dropped.
    #[must_use]
    pub fn restore(
        window: NonZeroU64,
        step: NonZeroU64,
        lateness: u64,
        state: RollingState,
    ) -> Self {
        let mut rolling = Self::new(window, step, lateness);
        let step = rolling.step;
        let fits = state
            .buckets
            .windows(2)
            .all(|pair| pair[0].start < pair[1].start)
            && state.buckets.iter().all(|b| b.start % step == 0);
        if !fits {
            return rolling;
        }
        rolling.buckets = state.buckets.into();
        rolling.newest = state.newest;
        rolling.high = state.high;
        rolling.low = state.low;
        rolling.volume = state.volume;
        rolling.trades = state.trades;
        rolling
    }

    /// The default step for `window`: a 1440th of it (a minute for a day),
    /// at least a millisecond.
    #[must_use]
    pub fn default_step(window: NonZeroU64) -> NonZeroU64 {
        NonZeroU64::new(window.get() / 1440).unwrap_or(NonZeroU64::MIN)
    }

    /// The first bucket start inside `(t − window, t]`.
    fn from(&self, t: u64) -> u64 {
        match t.checked_sub(self.window) {
            // The smallest multiple of `step` above `t − window`.
            Some(start) => (start / self.step + 1) * self.step,
            None => 0,
        }
    }

    /// How many buckets a key keeps at most.
    #[must_use]
    pub fn max_buckets(&self) -> u64 {
        self.window / self.step + 1
    }

    /// Takes a quote and returns the statistics at the newest `ts`.
    pub fn push(
        &mut self,
        ts: u64,
        price: f64,
        decimal: Option<Decimal>,
        volume: Option<(f64, Option<Decimal>)>,
    ) -> RollingPushed {
        let newest = self.newest.map_or(ts, |n| n.max(ts));
        let late = self
            .newest
            .is_some_and(|n| ts.saturating_add(self.lateness) < n);
        if late || ts < self.from(newest) {
            return RollingPushed::Late;
        }
        self.newest = Some(newest);
        let start = ts - ts % self.step;
        let quote = Price {
            ts,
            value: price,
            decimal,
        };
        let at = self.buckets.partition_point(|b| b.start < start);
        match self.buckets.get_mut(at) {
            Some(bucket) if bucket.start == start => bucket.take(quote, volume),
            _ => self.buckets.insert(at, Bucket::first(start, quote, volume)),
        }
        let from = self.from(newest);
        let before = self.buckets.len();
        while self.buckets.front().is_some_and(|b| b.start < from) {
            self.buckets.pop_front();
        }
        if self.buckets.len() < before {
            // O(buckets kept), once per bucket that leaves.
            self.resum();
        } else {
            self.high = self.high.max(price);
            self.low = self.low.min(price);
            let (volume, decimal) = volume.unwrap_or((0.0, Decimal::new(0, 0)));
            self.volume.add(volume, decimal);
            self.trades += 1;
        }
        RollingPushed::Ticker(self.ticker(from))
    }

    fn resum(&mut self) {
        self.high = f64::NEG_INFINITY;
        self.low = f64::INFINITY;
        self.volume = Total::new();
        self.trades = 0;
        for bucket in &self.buckets {
            self.high = self.high.max(bucket.high);
            self.low = self.low.min(bucket.low);
            self.volume.merge(&bucket.volume);
            self.trades += bucket.trades;
        }
    }

    /// The statistics over the buckets kept: the oldest bucket's open is
    /// the earliest quote by `ts`, the newest's last the latest.
    fn ticker(&self, from: u64) -> Ticker {
        let first = self.buckets.front().expect("a bucket holds the quote");
        let newest = self.buckets.back().expect("a bucket holds the quote");
        Ticker {
            from_ms: from,
            open: first.open.value,
            high: self.high,
            low: self.low,
            last: newest.last.value,
            change: difference(newest.last, first.open),
            volume: self.volume.value(),
            trades: self.trades,
        }
    }
}

/// `last − open`, exact when both are decimals.
fn difference(last: Price, open: Price) -> Amount {
    match last.decimal.zip(open.decimal) {
        Some((last, open)) => {
            let scale = last.scale().max(open.scale());
            let shift = |d: Decimal| decimal::shifted(d.units(), scale - d.scale());
            Amount {
                value: decimal::ratio_to_f64(
                    shift(last) - shift(open),
                    decimal::pow10(scale).unsigned_abs(),
                ),
                exact: true,
            }
        }
        None => Amount {
            value: last.value - open.value,
            exact: false,
        },
    }
}

impl Bucket {
    fn first(start: u64, quote: Price, volume: Option<(f64, Option<Decimal>)>) -> Self {
        let mut bucket = Self {
            start,
            open: quote,
            last: quote,
            high: quote.value,
            low: quote.value,
            volume: Total::new(),
            trades: 0,
        };
        bucket.take(quote, volume);
        bucket
    }

    fn take(&mut self, quote: Price, volume: Option<(f64, Option<Decimal>)>) {
        if quote.ts < self.open.ts {
            self.open = quote;
        }
        if quote.ts >= self.last.ts {
            self.last = quote;
        }
        self.high = self.high.max(quote.value);
        self.low = self.low.min(quote.value);
        let (volume, decimal) = volume.unwrap_or((0.0, Decimal::new(0, 0)));
        self.volume.add(volume, decimal);
        self.trades += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rolling(window: u64, step: u64, lateness: u64) -> Rolling {
        Rolling::new(
            NonZeroU64::new(window).expect("non-zero"),
            NonZeroU64::new(step).expect("non-zero"),
            lateness,
        )
    }

    fn push(r: &mut Rolling, ts: u64, price: &str, volume: &str) -> Ticker {
        let pushed = r.push(
            ts,
            price.parse().expect("a number"),
            Decimal::parse(price),
            Some((volume.parse().expect("a number"), Decimal::parse(volume))),
        );
        match pushed {
            RollingPushed::Ticker(ticker) => ticker,
            RollingPushed::Late => panic!("{ts} is not late"),
        }
    }

    #[test]
    fn a_day_in_minutes_keeps_at_most_1441_buckets() {
        let day = NonZeroU64::new(86_400_000).expect("non-zero");
        let r = Rolling::new(day, Rolling::default_step(day), 0);
        assert_eq!(r.max_buckets(), 1441);
    }

    #[test]
    fn the_ticker_covers_whole_buckets_and_says_from_where() {
        let mut r = rolling(1_000, 100, 0);
        push(&mut r, 50, "10.0", "1");
        push(&mut r, 420, "12.5", "2");
        push(&mut r, 430, "9.5", "0.5");
        let t = push(&mut r, 999, "11", "1");
        assert_eq!(t.from_ms, 0);
        assert_eq!((t.open, t.high, t.low, t.last), (10.0, 12.5, 9.5, 11.0));
        assert_eq!((t.change.value, t.volume.value, t.trades), (1.0, 4.5, 4));
        // At 1_060 the window is (60, 1060]: the bucket [0, 100) has left,
        // and the ticker covers [100, 1060].
        let t = push(&mut r, 1_060, "11.1", "1");
        assert_eq!(t.from_ms, 100);
        assert_eq!((t.open, t.trades), (12.5, 4));
        assert!(t.change.exact);
        assert_eq!(t.change.value, -1.4);
    }

    #[test]
    fn late_quotes_are_placed_by_ts_within_the_lateness() {
        let mut r = rolling(10_000, 1_000, 500);
        push(&mut r, 5_000, "2", "1");
        let t = push(&mut r, 4_600, "1", "1");
        assert_eq!((t.open, t.last), (1.0, 2.0));
        assert_eq!(
            r.push(4_000, 1.0, Decimal::parse("1"), None),
            RollingPushed::Late
        );
    }

    #[test]
    fn a_busy_key_keeps_a_bounded_number_of_buckets() {
        let mut r = rolling(60_000, 1_000, 0);
        for i in 0..100_000u64 {
            push(&mut r, i * 7, "1.25", "3");
        }
        assert!(r.buckets.len() as u64 <= r.max_buckets());
    }
}
