//! The simple moving average over the last `window` prices of one key.
//!
//! Pure and synchronous: no I/O, no clock. The listener owns one [`SmaWindow`]
//! per (client, symbol) key.

use std::num::NonZeroUsize;

use serde::{Deserialize, Serialize};

/// How much larger than what it leaves behind (the new total and the new
/// price, in magnitude) a leaving price may be before the running sum is
/// rebuilt; see [`SmaWindow::push`]. Within it the compensation's own
/// rounding stays below 2^16 ulps of those (~1e-11 of them).
const CANCELLATION_RATIO: f64 = 65_536.0;

/// A fixed-size window of prices with an O(1) mean.
///
/// A plain running sum (`sum += new; sum -= old`) accumulates rounding error
/// with every update, so after millions of quotes it no longer equals the mean
/// of the prices it claims to hold. The sum here is Neumaier-compensated: the
/// low-order bits lost by each addition are carried in `compensation`, which
/// keeps the error at a few ulps of the window's own sum no matter how many
/// updates have gone through it.
#[derive(Debug, Clone)]
pub struct SmaWindow {
    capacity: NonZeroUsize,
    /// A ring once full: the newest price overwrites the oldest in place.
    prices: Vec<f64>,
    /// Where the oldest price is (0 until the window is full).
    oldest: usize,
    sum: f64,
    compensation: f64,
}

/// A window's complete state, for persisting it (durable stream mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowState {
    /// The prices, oldest first.
    pub prices: Vec<f64>,
    /// The running sum (`null` in JSON when it overflowed; the sum is then
    /// rebuilt from the prices on restore).
    #[serde(deserialize_with = "number_or_nan")]
    pub sum: f64,
    /// The running sum's compensation term (likewise).
    #[serde(deserialize_with = "number_or_nan")]
    pub compensation: f64,
}

/// A JSON number, or NaN for `null` (how serde_json writes a non-finite f64).
fn number_or_nan<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// What one push produced: the mean of the prices now in the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Average {
    /// The arithmetic mean of the prices in the window.
    pub mean: f64,
    /// How many prices the window holds (at most its capacity).
    pub count: usize,
}

impl SmaWindow {
    /// An empty window that averages the last `capacity` prices.
    ///
    /// Storage grows with the prices actually pushed, so a large window on a
    /// key that sees few quotes costs little.
    #[must_use]
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self {
            capacity,
            prices: Vec::new(),
            oldest: 0,
            sum: 0.0,
            compensation: 0.0,
        }
    }

    /// The number of prices the window averages once full.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity.get()
    }

    /// How many prices the window holds now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.prices.len()
    }

    /// True before the first push.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }

    /// True once the window holds `capacity` prices.
    #[must_use]
    pub fn is_full(&self) -> bool {
        self.prices.len() == self.capacity.get()
    }

    /// Adds `price` (evicting the oldest price when full) and returns the new mean.
    ///
    /// The caller guarantees `price` is finite; the quote parser rejects
    /// anything else before it reaches a window.
    pub fn push(&mut self, price: f64) -> Average {
        debug_assert!(price.is_finite(), "non-finite price reached the SMA");
        let mut evicted = 0.0f64;
        if self.is_full() {
            evicted = std::mem::replace(&mut self.prices[self.oldest], price);
            self.oldest += 1;
            if self.oldest == self.prices.len() {
                self.oldest = 0;
            }
            self.add(-evicted);
        } else {
            self.prices.push(price);
        }
        self.add(price);
        let total = self.sum + self.compensation;
        // Two cases the running sum cannot come back from, so the window is
        // summed afresh (O(window), and only then):
        // - An overflowing price made it inf (or NaN, once inf - inf). Once
        //   such prices have left the window the fresh sum is finite again;
        //   while they are in it the mean stays non-finite (`null` on the
        //   wire), which is the truth.
        // - A price far larger than all that remains just left: the
        //   remainder then lives in the compensation term, which itself has
        //   only 53 bits and may have rounded away the smaller prices added
        //   since. (The new price counts too: prices that cancel, +x and -x,
        //   leave a total of 0 but lose nothing, and cost no rebuild.)
        if !total.is_finite() || evicted.abs() > CANCELLATION_RATIO * (total.abs() + price.abs()) {
            self.resum();
        }
        Average {
            mean: self.mean(),
            count: self.prices.len(),
        }
    }

    /// The mean of the prices in the window, or `None` when it is empty.
    #[must_use]
    pub fn average(&self) -> Option<Average> {
        (!self.is_empty()).then(|| Average {
            mean: self.mean(),
            count: self.prices.len(),
        })
    }

    /// Everything needed to continue this window elsewhere bit for bit: the
    /// prices and the running sum with its compensation (a mean recomputed
    /// from the prices could differ in the last bits).
    #[must_use]
    pub fn state(&self) -> WindowState {
        WindowState {
            prices: self.prices().collect(),
            sum: self.sum,
            compensation: self.compensation,
        }
    }

    /// A window continuing from `state`. When `state` came from a window of
    /// another capacity (the configuration changed), the sum is rebuilt from
    /// the newest `capacity` prices instead.
    #[must_use]
    pub fn restore(capacity: NonZeroUsize, state: WindowState) -> Self {
        let consistent = state.prices.len() <= capacity.get()
            && state.prices.iter().all(|p| p.is_finite())
            && state.sum.is_finite()
            && state.compensation.is_finite();
        if consistent {
            return Self {
                capacity,
                prices: state.prices,
                oldest: 0,
                sum: state.sum,
                compensation: state.compensation,
            };
        }
        let mut window = Self::new(capacity);
        let skip = state.prices.len().saturating_sub(capacity.get());
        for price in state
            .prices
            .into_iter()
            .skip(skip)
            .filter(|p| p.is_finite())
        {
            window.push(price);
        }
        window
    }

    /// The prices in the window, oldest first.
    pub fn prices(&self) -> impl Iterator<Item = f64> + '_ {
        let (newer, older) = self.prices.split_at(self.oldest);
        older.iter().chain(newer).copied()
    }

    /// Rebuilds the running sum from the prices in the window. O(window);
    /// only called when the running sum is no longer finite.
    fn resum(&mut self) {
        let prices = std::mem::take(&mut self.prices);
        self.sum = 0.0;
        self.compensation = 0.0;
        for &price in &prices {
            self.add_unchecked(price);
        }
        self.prices = prices;
    }

    fn mean(&self) -> f64 {
        (self.sum + self.compensation) / self.prices.len() as f64
    }

    /// Neumaier's variant of Kahan summation: also exact when the addend is
    /// larger than the running sum, which happens whenever prices move by
    /// orders of magnitude.
    fn add(&mut self, value: f64) {
        self.add_unchecked(value);
        if self.prices.is_empty() {
            // An empty window must read exactly zero, not the residue of
            // earlier rounding.
            self.sum = 0.0;
            self.compensation = 0.0;
        }
    }

    fn add_unchecked(&mut self, value: f64) {
        let total = self.sum + value;
        if self.sum.abs() >= value.abs() {
            self.compensation += (self.sum - total) + value;
        } else {
            self.compensation += (value - total) + self.sum;
        }
        self.sum = total;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    fn window(capacity: usize) -> SmaWindow {
        SmaWindow::new(NonZeroUsize::new(capacity).expect("test capacity is non-zero"))
    }

    fn from_scratch(prices: &[f64]) -> f64 {
        prices.iter().sum::<f64>() / prices.len() as f64
    }

    #[test]
    fn a_new_window_is_empty_and_has_no_average() {
        let w = window(3);
        assert!(w.is_empty());
        assert!(!w.is_full());
        assert_eq!(w.average(), None);
        assert_eq!(w.capacity(), 3);
    }

    #[test]
    fn partial_window_averages_what_it_holds() {
        let mut w = window(3);
        assert_eq!(
            w.push(10.0),
            Average {
                mean: 10.0,
                count: 1
            }
        );
        assert_eq!(
            w.push(20.0),
            Average {
                mean: 15.0,
                count: 2
            }
        );
        assert!(!w.is_full());
    }

    #[test]
    fn full_window_evicts_the_oldest_price() {
        let mut w = window(3);
        for p in [1.0, 2.0, 3.0] {
            w.push(p);
        }
        assert!(w.is_full());
        assert_eq!(
            w.push(10.0),
            Average {
                mean: 5.0,
                count: 3
            }
        );
        assert_eq!(w.prices().collect::<Vec<_>>(), vec![2.0, 3.0, 10.0]);
    }

    #[test]
    fn window_of_one_is_the_last_price() {
        let mut w = window(1);
        for p in [5.5, -3.25, 1e12, 0.0] {
            assert_eq!(w.push(p), Average { mean: p, count: 1 });
        }
    }

    #[test]
    fn large_price_leaving_the_window_leaves_no_residue() {
        let mut w = window(2);
        w.push(1e16);
        w.push(1.0);
        // 1e16 leaves: a naive sum would read 0 or 2 here.
        let avg = w.push(1.0);
        assert_eq!(avg.mean, 1.0);
    }

    #[test]
    fn an_overflowing_sum_recovers_once_its_prices_leave_the_window() {
        let mut w = window(3);
        w.push(f64::MAX);
        assert!(
            !w.push(f64::MAX).mean.is_finite(),
            "the window's own sum overflows"
        );
        assert!(!w.push(1.0).mean.is_finite(), "still two MAX in the window");
        // One MAX left: the sum is representable again.
        assert_eq!(w.push(2.0).mean, (f64::MAX + 3.0) / 3.0);
        assert_eq!(w.push(3.0).mean, 2.0);
        assert_eq!(w.push(4.0).mean, 3.0);
    }

    #[test]
    fn prices_that_cancel_average_to_exactly_zero() {
        let mut w = window(4);
        for i in 0..1_000 {
            let price = if i % 2 == 0 { 1e6 } else { -1e6 };
            let mean = w.push(price).mean;
            if i >= 3 {
                assert_eq!(mean, 0.0);
            }
        }
    }

    #[test]
    fn an_overflowed_state_survives_json_and_is_rebuilt_on_restore() {
        let mut w = window(3);
        w.push(f64::MAX);
        w.push(f64::MAX);
        let json = serde_json::to_string(&w.state()).expect("serialize");
        assert!(
            json.contains("null"),
            "serde_json writes inf as null: {json}"
        );
        let state: WindowState = serde_json::from_str(&json).expect("readable");
        let mut restored = SmaWindow::restore(w.capacity, state);
        restored.push(1.0);
        assert_eq!(restored.push(2.0).mean, (f64::MAX + 3.0) / 3.0);
        assert_eq!(restored.push(3.0).mean, 2.0);
    }

    #[test]
    fn ten_million_updates_stay_within_1e9_of_a_from_scratch_mean() {
        const WINDOW: usize = 10;
        let mut w = window(WINDOW);
        let mut recent = VecDeque::with_capacity(WINDOW);
        // A deterministic walk that mixes magnitudes, the worst case for a
        // running sum: prices jump between ~1e-3 and ~1e6.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut worst: f64 = 0.0;
        for i in 0..10_000_000u64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 11) as f64 / (1u64 << 53) as f64;
            let price = if i % 7 == 0 {
                unit * 1e6
            } else {
                unit * 1e-3 + 100.0
            };
            if recent.len() == WINDOW {
                recent.pop_front();
            }
            recent.push_back(price);
            let got = w.push(price).mean;
            if i % 1000 == 0 || i > 9_999_990 {
                let prices: Vec<f64> = recent.iter().copied().collect();
                let want = from_scratch(&prices);
                worst = worst.max(((got - want) / want).abs());
            }
        }
        assert!(worst <= 1e-9, "relative error {worst} exceeds 1e-9");
    }

    #[test]
    fn a_restored_window_continues_bit_for_bit() {
        let mut original = window(3);
        for p in [0.1, 0.7, 1e9, 0.3, 0.2] {
            original.push(p);
        }
        let mut restored = SmaWindow::restore(original.capacity, original.state());
        for p in [0.9, 1e-7, 3.3, 0.1] {
            assert_eq!(
                original.push(p).mean.to_bits(),
                restored.push(p).mean.to_bits()
            );
        }
    }

    #[test]
    fn a_state_from_a_larger_window_is_trimmed_and_resummed() {
        let mut big = window(5);
        for p in [1.0, 2.0, 3.0, 4.0, 5.0] {
            big.push(p);
        }
        let small = SmaWindow::restore(NonZeroUsize::new(2).expect("non-zero"), big.state());
        assert_eq!(small.prices().collect::<Vec<_>>(), vec![4.0, 5.0]);
        assert_eq!(
            small.average(),
            Some(Average {
                mean: 4.5,
                count: 2
            })
        );
    }

    #[test]
    fn repeated_price_does_not_drift() {
        let mut w = window(4);
        for _ in 0..100_000 {
            let mean = w.push(0.1).mean;
            assert!(
                (mean - 0.1).abs() <= f64::EPSILON * 0.1,
                "mean drifted to {mean}"
            );
        }
    }
}
