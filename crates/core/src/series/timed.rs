//! The moving average by time: for a quote at `t`, the mean of the key's
//! prices received so far whose `ts` lies in `(t − window, t]` (pandas'
//! `rolling("5min")` over a time index), with how many prices that covers.
//! A quote that arrives out of `ts` order is placed by its `ts`, and its own
//! mean covers the window ending at its `ts`.
//!
//! Bounded, and never silently wrong:
//! - A quote more than `lateness` behind the newest `ts` the key has seen
//!   is late: left out, for the caller to count. So a point older than
//!   `newest − lateness − window` can never be in a window again and is
//!   dropped: a key keeps the points of one window plus its lateness.
//! - At most `max_points` points are kept. Past that the oldest are
//!   dropped, and every mean whose window still reaches back over them says
//!   `complete: false` (its `count` is what it did cover) until they would
//!   have left the window anyway.
//! - The mean of the newest quote is kept as a running sum, exact like the
//!   count SMA's (see `crate::sma`); a late quote's is that sum corrected
//!   by the points within `lateness` of the window's two edges.

use std::collections::VecDeque;
use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};

use crate::decimal::{self, Decimal};
use crate::sum::{CompensatedSum, ExactSum};

/// The most points a time window may be configured to keep: its exact sum
/// (below 10^33 a point) stays within an `i128`.
pub const MAX_POINTS: usize = 100_000;

/// The most points a late quote may land behind, or reach back over at its
/// window's start, and still be taken: what placing it and correcting the
/// newest window's sum for it cost. Past that it is late however recent its
/// `ts`, so a producer cannot make each quote walk a whole window.
pub const MAX_LATE_SHIFT: usize = 1_024;

/// One price in a time window.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    ts: u64,
    price: f64,
    decimal: Option<Decimal>,
}

/// What a quote at `t` produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TimePushed {
    /// The mean over `(t − window, t]`.
    Mean(TimeMean),
    /// More than `lateness` behind the newest `ts`: left out.
    Late,
}

/// A time-window mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeMean {
    /// The mean of the prices in the window.
    pub mean: f64,
    /// How many prices the window holds.
    pub count: usize,
    /// Whether `mean` is the exact mean rounded once (false while the
    /// window holds a price outside the exact decimal domain).
    pub exact: bool,
    /// False when points of this window were dropped for `max_points`.
    pub complete: bool,
}

/// What a time SMA keeps, for persisting it: its points, by `ts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeSmaState {
    /// `[ts, price, places]`, places 255 for a price outside the exact
    /// domain.
    pub points: Vec<(u64, f64, u8)>,
    /// The newest `ts`.
    pub newest: Option<u64>,
    /// The newest `ts` dropped for `max_points`, while windows reach it.
    pub dropped_through: Option<u64>,
    /// The newest window's compensated sum and its compensation, while it
    /// holds an inexact price (a sum redone from the points could differ in
    /// the last bits).
    pub compensated: Option<(f64, f64)>,
}

/// One key's moving average over a time window.
#[derive(Debug, Clone)]
pub struct TimeSma {
    window: u64,
    lateness: u64,
    max_points: usize,
    /// Sorted by `ts`; equal `ts` in arrival order.
    points: VecDeque<Point>,
    /// The newest `ts` so far.
    newest: Option<u64>,
    /// The first point in the newest window, `(newest − window, newest]`.
    live_from: usize,
    /// The exact sum of the newest window's points.
    live: ExactSum,
    /// Its compensated sum, kept while it holds an inexact price.
    live_float: Option<CompensatedSum>,
    /// The newest `ts` of a point dropped for `max_points`, while a window
    /// may still reach back to it.
    dropped_through: Option<u64>,
}

impl TimeSma {
    /// A time SMA over `window` milliseconds, taking quotes up to
    /// `lateness` milliseconds behind the newest, keeping at most
    /// `max_points` (at most [`MAX_POINTS`]).
    #[must_use]
    pub fn new(window: NonZeroU64, lateness: u64, max_points: usize) -> Self {
        Self {
            window: window.get(),
            lateness,
            max_points: max_points.clamp(1, MAX_POINTS),
            points: VecDeque::new(),
            newest: None,
            live_from: 0,
            live: ExactSum::default(),
            live_float: None,
            dropped_through: None,
        }
    }

    /// Everything needed to continue this window elsewhere bit for bit.
    #[must_use]
    pub fn state(&self) -> TimeSmaState {
        TimeSmaState {
            points: self
                .points
                .iter()
                .map(|p| (p.ts, p.price, p.decimal.map_or(u8::MAX, Decimal::scale)))
                .collect(),
            newest: self.newest,
            dropped_through: self.dropped_through,
            compensated: self.live_float.map(|sum| (sum.sum, sum.compensation)),
        }
    }

    /// A time SMA of these parameters continuing from `state`.
    #[must_use]
    pub fn restore(
        window: NonZeroU64,
        lateness: u64,
        max_points: usize,
        state: TimeSmaState,
    ) -> Self {
        let mut sma = Self::new(window, lateness, max_points);
        let mut points: Vec<Point> = state
            .points
            .into_iter()
            .filter(|(_, price, _)| price.is_finite())
            .map(|(ts, price, scale)| Point {
                ts,
                price,
                decimal: Decimal::from_f64(price, scale),
            })
            .collect();
        points.sort_by_key(|p| p.ts);
        let overflow = points.len().saturating_sub(sma.max_points);
        sma.points = points.into_iter().skip(overflow).collect();
        sma.newest = state.newest.or(sma.points.back().map(|p| p.ts));
        sma.dropped_through = state.dropped_through;
        let newest = sma.newest.unwrap_or(0);
        sma.live_from = sma
            .points
            .partition_point(|p| sma.before_window(p.ts, newest));
        for index in sma.live_from..sma.points.len() {
            let point = sma.points[index];
            let was_inexact = sma.live.inexact > 0;
            sma.live.add(point.decimal);
            sma.update_float(was_inexact, 0.0, point.price);
        }
        if let (Some(float), Some((sum, compensation))) = (&mut sma.live_float, state.compensated)
            && sum.is_finite()
            && compensation.is_finite()
        {
            float.sum = sum;
            float.compensation = compensation;
        }
        sma
    }

    /// How many points the key keeps now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// True before the first quote.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Takes a quote at `ts` and returns the mean over `(ts − window, ts]`.
    pub fn push(&mut self, ts: u64, price: f64, decimal: Option<Decimal>) -> TimePushed {
        debug_assert!(decimal.is_none_or(|d| d.to_f64() == price));
        let newest = self.newest.unwrap_or(ts);
        if ts.saturating_add(self.lateness) < newest {
            return TimePushed::Late;
        }
        let point = Point { ts, price, decimal };
        // In order, the usual case, the point goes at the end: no search
        // through a window of cold memory.
        let at = if self.points.back().is_none_or(|p| p.ts <= ts) {
            self.points.len()
        } else {
            let at = self.points.partition_point(|p| p.ts <= ts);
            let before = self
                .points
                .partition_point(|p| self.before_window(p.ts, ts));
            let shift = self.points.len() - at;
            if shift > MAX_LATE_SHIFT || self.live_from.saturating_sub(before) > MAX_LATE_SHIFT {
                return TimePushed::Late;
            }
            at
        };
        self.points.insert(at, point);
        if self.newest.is_none() || !self.before_window(ts, newest) {
            self.enter(point);
        } else {
            self.live_from += 1;
        }
        if ts > newest || self.newest.is_none() {
            self.newest = Some(ts);
            self.advance_live();
        }
        self.forget_old();
        TimePushed::Mean(self.mean_at(ts))
    }

    /// Whether `ts` lies at or before the start of the window ending at
    /// `t`, `t − window` (a window that starts before the epoch has none).
    fn before_window(&self, ts: u64, t: u64) -> bool {
        t.checked_sub(self.window).is_some_and(|start| ts <= start)
    }

    /// Moves the newest window's start up to `newest − window`.
    fn advance_live(&mut self) {
        let newest = self.newest.unwrap_or(0);
        while let Some(&point) = self.points.get(self.live_from) {
            if !self.before_window(point.ts, newest) {
                break;
            }
            self.live_from += 1;
            self.leave(point);
        }
    }

    /// Drops what no window can reach again, and what `max_points` does
    /// not leave room for.
    fn forget_old(&mut self) {
        let newest = self.newest.unwrap_or(0);
        // No quote may come before `newest − lateness`, so no window
        // reaches back to this or before it.
        let unreachable = newest.checked_sub(self.window.saturating_add(self.lateness));
        let reachable = |ts: u64| unreachable.is_none_or(|u| ts > u);
        while let Some(&oldest) = self.points.front() {
            let over = self.points.len() > self.max_points;
            if !over && reachable(oldest.ts) {
                break;
            }
            self.points.pop_front();
            if self.live_from == 0 {
                self.leave(oldest);
            } else {
                self.live_from -= 1;
            }
            if over && reachable(oldest.ts) {
                self.dropped_through =
                    Some(self.dropped_through.map_or(oldest.ts, |d| d.max(oldest.ts)));
            }
        }
        // Once every window a quote may still ask for starts after the
        // dropped points, none is incomplete.
        if self.dropped_through.is_some_and(|d| !reachable(d)) {
            self.dropped_through = None;
        }
    }

    fn enter(&mut self, point: Point) {
        let was_inexact = self.live.inexact > 0;
        self.live.add(point.decimal);
        self.update_float(was_inexact, 0.0, point.price);
    }

    fn leave(&mut self, point: Point) {
        let was_inexact = self.live.inexact > 0;
        self.live.remove(point.decimal);
        self.update_float(was_inexact, point.price, 0.0);
    }

    /// Keeps the compensated sum while the newest window holds an inexact
    /// price: summed afresh when one enters (O(window), at most once per
    /// such price) or when a cancellation could have lost bits.
    fn update_float(&mut self, was_inexact: bool, removed: f64, added: f64) {
        if self.live.inexact == 0 {
            self.live_float = None;
            return;
        }
        let kept = was_inexact
            && self
                .live_float
                .as_mut()
                .is_some_and(|sum| sum.replace(removed, added));
        if !kept {
            let mut sum = CompensatedSum::default();
            for point in self.points.range(self.live_from..) {
                sum.add(point.price);
            }
            self.live_float = Some(sum);
        }
    }

    /// The compensated sum of `points[before..after]`, a late quote's
    /// window (one holding a price outside the exact domain). Worked out
    /// from the newest window's sum (its running compensated sum, or its
    /// exact sum rounded once when it holds only exact prices), less its
    /// points after `after`, plus the points before its start: at most
    /// [`MAX_LATE_SHIFT`] each, as `push` makes sure. Summed afresh only
    /// when taking a point away could have cancelled bits away.
    fn float_sum_of(&self, before: usize, after: usize) -> CompensatedSum {
        let mut sum = CompensatedSum::default();
        match self.live_float {
            Some(live) => sum = live,
            None => sum.add(decimal::mean(self.live.sum, 1, self.live.scale)),
        }
        let mut sound = true;
        for point in self.points.range(after.max(self.live_from)..) {
            sound &= sum.replace(point.price, 0.0);
        }
        for point in self.points.range(before..after.min(self.live_from)) {
            sound &= sum.replace(0.0, point.price);
        }
        if !sound {
            sum = CompensatedSum::default();
            for point in self.points.range(before..after) {
                sum.add(point.price);
            }
        }
        sum
    }

    /// The mean over `(t − window, t]`, for `t` no more than `lateness`
    /// behind the newest `ts`.
    fn mean_at(&self, t: u64) -> TimeMean {
        let newest = self.newest.unwrap_or(t);
        let complete = self
            .dropped_through
            .is_none_or(|dropped| self.before_window(dropped, t));
        let (exact, float, count) = if t == newest {
            let count = self.points.len() - self.live_from;
            (self.live.clone(), self.live_float, count)
        } else {
            // t's window is points[before..after], the newest window
            // points[live_from..], and before <= live_from. So: the newest
            // window, less its points after t, plus t's points ahead of it.
            let mut exact = self.live.clone();
            let after = self.points.partition_point(|p| p.ts <= t);
            let before = self.points.partition_point(|p| self.before_window(p.ts, t));
            for point in self.points.range(after.max(self.live_from)..) {
                exact.remove(point.decimal);
            }
            for point in self.points.range(before..after.min(self.live_from)) {
                exact.add(point.decimal);
            }
            let float = (exact.inexact > 0).then(|| self.float_sum_of(before, after));
            (exact, float, after - before)
        };
        let mean = match float {
            Some(sum) => sum.value() / count as f64,
            None => decimal::mean(exact.sum, count, exact.scale),
        };
        TimeMean {
            mean,
            count,
            exact: float.is_none(),
            complete,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sma(window: u64, lateness: u64, max_points: usize) -> TimeSma {
        TimeSma::new(
            NonZeroU64::new(window).expect("non-zero"),
            lateness,
            max_points,
        )
    }

    fn push(w: &mut TimeSma, ts: u64, price: &str) -> TimePushed {
        w.push(ts, price.parse().expect("a number"), Decimal::parse(price))
    }

    fn mean(pushed: TimePushed) -> TimeMean {
        match pushed {
            TimePushed::Mean(mean) => mean,
            TimePushed::Late => panic!("not late"),
        }
    }

    #[test]
    fn the_window_is_open_at_its_start_and_closed_at_its_end() {
        let mut w = sma(1_000, 0, 100);
        mean(push(&mut w, 1_000, "1"));
        mean(push(&mut w, 1_500, "2"));
        // (1000, 2000]: 1_000 is out.
        let m = mean(push(&mut w, 2_000, "6"));
        assert_eq!((m.mean, m.count, m.exact, m.complete), (4.0, 2, true, true));
        assert_eq!(w.len(), 2, "what no window reaches is dropped");
    }

    #[test]
    fn a_late_quote_is_placed_by_its_ts_and_averages_its_own_window() {
        let mut w = sma(1_000, 500, 100);
        push(&mut w, 1_000, "10");
        push(&mut w, 2_000, "20");
        push(&mut w, 2_100, "30");
        // At 1_800: (800, 1800] holds 10 and itself.
        let m = mean(push(&mut w, 1_800, "40"));
        assert_eq!((m.mean, m.count), (25.0, 2));
        // The newest window now counts it: (1100, 2100] = 20, 30, 40.
        let m = mean(push(&mut w, 2_100, "50"));
        assert_eq!((m.mean, m.count), (35.0, 4));
        // Past the lateness: left out.
        assert_eq!(push(&mut w, 1_599, "99"), TimePushed::Late);
    }

    #[test]
    fn a_late_quote_behind_too_many_newer_points_is_late() {
        let mut w = sma(60_000, 5_000, MAX_POINTS);
        for _ in 0..MAX_LATE_SHIFT {
            push(&mut w, 10_000, "1");
        }
        // Behind exactly the most it may be: placed and averaged.
        let m = mean(push(&mut w, 9_999, "3"));
        assert_eq!(m.count, 1);
        // One newer point more: late, and nothing of it kept.
        push(&mut w, 10_000, "1");
        let kept = w.len();
        assert_eq!(push(&mut w, 9_999, "3"), TimePushed::Late);
        assert_eq!(w.len(), kept);
        // Reaching back over too many points at its window's start is late
        // too: (9_999, 10_999] would add back every point at 10_000.
        let mut w = sma(1_000, 5_000, MAX_POINTS);
        for _ in 0..=MAX_LATE_SHIFT {
            push(&mut w, 10_000, "1");
        }
        push(&mut w, 11_000, "2");
        assert_eq!(push(&mut w, 10_999, "2"), TimePushed::Late);
    }

    #[test]
    fn a_late_window_with_an_inexact_price_is_worked_out_from_the_newest() {
        // The newest window holds the inexact price: its running sum, less
        // what came after the late quote, plus what lies before the window.
        let mut w = sma(1_000, 5_000, MAX_POINTS);
        mean(w.push(100, 1e-30, None));
        mean(push(&mut w, 200, "2"));
        mean(push(&mut w, 300, "4"));
        let m = mean(push(&mut w, 150, "6"));
        assert_eq!((m.mean, m.count, m.exact), ((6.0 + 1e-30) / 2.0, 2, false));
        // The newest window is exact, the late one reaches back to the
        // inexact price: the exact sum rounded once, adjusted the same way.
        let mut w = sma(100, 5_000, MAX_POINTS);
        mean(w.push(100, 1e-30, None));
        mean(push(&mut w, 160, "2"));
        assert!(mean(push(&mut w, 250, "4")).exact, "(150, 250] is exact");
        let m = mean(push(&mut w, 190, "6"));
        assert_eq!((m.mean, m.count, m.exact), (8.0 / 3.0, 3, false));
    }

    #[test]
    fn points_past_the_cap_make_the_windows_that_reach_them_incomplete() {
        let mut w = sma(10_000, 0, 3);
        for (ts, price) in [(1, "1"), (2, "2"), (3, "3")] {
            assert!(mean(push(&mut w, ts, price)).complete);
        }
        let m = mean(push(&mut w, 4, "4"));
        assert_eq!((m.mean, m.count, m.complete), (3.0, 3, false));
        // (1, 10001] would reach the dropped 2...
        let m = mean(push(&mut w, 10_001, "5"));
        assert_eq!((m.count, m.complete), (3, false));
        // ...(4, 10004] no longer does.
        let m = mean(push(&mut w, 10_004, "5"));
        assert_eq!((m.mean, m.count, m.complete), (5.0, 2, true));
    }

    #[test]
    fn an_inexact_price_is_averaged_and_said_so_until_it_leaves() {
        let mut w = sma(100, 0, 100);
        push(&mut w, 0, "1");
        let m = mean(w.push(50, 1e-30, None));
        assert!(!m.exact);
        assert_eq!(m.mean, (1.0 + 1e-30) / 2.0);
        let m = mean(push(&mut w, 151, "3"));
        assert!(m.exact);
        assert_eq!((m.mean, m.count), (3.0, 1));
    }
}
