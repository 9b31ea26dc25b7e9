//! The simple moving average over the last `window` prices of one key.
//!
//! Pure and synchronous: no I/O, no clock. The listener owns one [`SmaWindow`]
//! per (client, symbol) key.

use std::collections::VecDeque;
use std::num::NonZeroUsize;

use serde::{Deserialize, Serialize};

use crate::decimal::{self, Decimal};
use crate::sum::{CompensatedSum, ExactSum};

/// The slot of a price outside the exact domain: its value waits, in
/// order, in [`SmaWindow::inexact_prices`]. (A [`Decimal`]'s bits are
/// never 0.)
const INEXACT: i64 = 0;

/// A saved price's scale when it lies outside the exact domain.
const INEXACT_SCALE: u8 = u8::MAX;

/// A fixed-size window of prices with an O(1) mean.
///
/// Prices inside the exact decimal domain (see [`crate::decimal`]) are kept
/// as integer units and summed in an `i128` at the window's scale (the most
/// decimal places of any price in it): adding and removing them is exact,
/// so after any number of quotes the mean is the exact mean of the prices
/// in the window, rounded once. That holds while every price in the window
/// is exact; while one is not (`1e-30`, a 20-digit price), the mean comes
/// from a Neumaier-compensated `f64` sum over the whole window, which keeps
/// the error at a few ulps of the window's sum, and [`Average::exact`] is
/// false. Once that price has left the window the mean is exact again.
#[derive(Debug, Clone)]
pub struct SmaWindow {
    capacity: NonZeroUsize,
    /// A ring once full: the newest price overwrites the oldest in place.
    /// A slot holds a price's [`Decimal`] bits, or [`INEXACT`].
    slots: Vec<i64>,
    /// Where the oldest price is (0 until the window is full).
    oldest: usize,
    /// The prices of the [`INEXACT`] slots, oldest first: they enter and
    /// leave in the ring's order.
    inexact_prices: VecDeque<f64>,
    exact: ExactSum,
    /// Kept only while the window holds an inexact price.
    compensated: Option<CompensatedSum>,
}

/// A window's complete state, for persisting it (durable stream mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowState {
    /// The prices, oldest first.
    pub prices: Vec<f64>,
    /// Each price's decimal places, or 255 for a price outside the exact
    /// domain (absent in state saved before prices were exact: every
    /// price is then taken as inexact until it leaves the window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scales: Option<Vec<u8>>,
    /// The compensated sum over the prices while the window holds an
    /// inexact price, else 0 (`null` in JSON when it overflowed; the sum
    /// is then rebuilt from the prices on restore).
    #[serde(deserialize_with = "number_or_nan")]
    pub sum: f64,
    /// The compensated sum's compensation term (likewise).
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
    /// Whether `mean` is the exact mean rounded once: false while the
    /// window holds a price outside the exact decimal domain.
    pub exact: bool,
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
            slots: Vec::new(),
            oldest: 0,
            inexact_prices: VecDeque::new(),
            exact: ExactSum::default(),
            compensated: None,
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
        self.slots.len()
    }

    /// True before the first push.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// True once the window holds `capacity` prices.
    #[must_use]
    pub fn is_full(&self) -> bool {
        self.slots.len() == self.capacity.get()
    }

    /// Adds a price (evicting the oldest price when full) and returns the
    /// new mean. `decimal` is the price as the decimal it was written as,
    /// when that lies in the exact domain; `price` is its nearest `f64`.
    ///
    /// The caller guarantees `price` is finite; the quote parser rejects
    /// anything else before it reaches a window.
    #[inline]
    pub fn push(&mut self, price: f64, decimal: Option<Decimal>) -> Average {
        debug_assert!(price.is_finite(), "non-finite price reached the SMA");
        debug_assert!(decimal.is_none_or(|d| d.to_f64() == price));
        let slot = decimal.map_or(INEXACT, Decimal::to_bits);
        let was_inexact = self.exact.inexact > 0;
        let evicted = if self.is_full() {
            let at = self.oldest;
            let evicted = std::mem::replace(&mut self.slots[at], slot);
            self.oldest = if at + 1 == self.slots.len() {
                0
            } else {
                at + 1
            };
            Some(evicted)
        } else {
            self.slots.push(slot);
            None
        };
        self.exact.add(decimal);
        if slot == INEXACT {
            self.inexact_prices.push_back(price);
        }
        // The evicted price, as an f64 only where the compensated sum
        // needs it.
        let mut evicted_price = 0.0;
        if let Some(evicted) = evicted {
            let evicted = Decimal::from_bits(evicted);
            self.exact.remove(evicted);
            evicted_price = match evicted {
                None => self.inexact_prices.pop_front().unwrap_or_default(),
                Some(d) if was_inexact => d.to_f64(),
                Some(_) => 0.0,
            };
        }
        if self.exact.inexact == 0 {
            self.compensated = None;
        } else if was_inexact && let Some(compensated) = &mut self.compensated {
            if !compensated.replace(evicted_price, price) {
                self.compensated = Some(self.resum());
            }
        } else {
            // The first inexact price: from here the window is summed in
            // f64 as well, until it has left. Entering costs O(window), at
            // most once per `capacity` pushes.
            self.compensated = Some(self.resum());
        }
        self.average_now()
    }

    /// The mean of the prices in the window, or `None` when it is empty.
    #[must_use]
    pub fn average(&self) -> Option<Average> {
        (!self.is_empty()).then(|| self.average_now())
    }

    #[inline]
    fn average_now(&self) -> Average {
        let count = self.slots.len();
        match &self.compensated {
            Some(compensated) => Average {
                mean: compensated.value() / count as f64,
                count,
                exact: false,
            },
            None => Average {
                mean: decimal::mean(self.exact.sum, count, self.exact.scale),
                count,
                exact: true,
            },
        }
    }

    /// Everything needed to continue this window elsewhere bit for bit:
    /// the prices with their decimal places, and the compensated sum while
    /// one is kept (a sum recomputed from the prices could differ in the
    /// last bits).
    #[must_use]
    pub fn state(&self) -> WindowState {
        let compensated = self.compensated.unwrap_or_default();
        WindowState {
            prices: self.prices().collect(),
            scales: Some(
                self.slots_in_order()
                    .map(|slot| Decimal::from_bits(slot).map_or(INEXACT_SCALE, Decimal::scale))
                    .collect(),
            ),
            sum: compensated.sum,
            compensation: compensated.compensation,
        }
    }

    /// A window continuing from `state`. When `state` came from a window of
    /// another capacity (the configuration changed), or does not hold
    /// together, the window is rebuilt from its newest `capacity` prices.
    #[must_use]
    pub fn restore(capacity: NonZeroUsize, state: WindowState) -> Self {
        let scales = state
            .scales
            .filter(|scales| scales.len() == state.prices.len());
        let decimals: Vec<Option<Decimal>> = state
            .prices
            .iter()
            .enumerate()
            .map(|(i, &price)| {
                let scale = *scales.as_ref()?.get(i)?;
                Decimal::from_f64(price, scale)
            })
            .collect();
        let consistent = state.prices.len() <= capacity.get()
            && state.prices.iter().all(|p| p.is_finite())
            && state.sum.is_finite()
            && state.compensation.is_finite();
        let mut window = Self::new(capacity);
        let skip = state.prices.len().saturating_sub(capacity.get());
        for (&price, &decimal) in state.prices.iter().zip(&decimals).skip(skip) {
            if price.is_finite() {
                window.push(price, decimal);
            }
        }
        // The pushes summed the window afresh; a saved compensated sum is
        // what the window had, to the last bit.
        if consistent && let Some(compensated) = &mut window.compensated {
            compensated.sum = state.sum;
            compensated.compensation = state.compensation;
        }
        window
    }

    /// The prices in the window, oldest first.
    pub fn prices(&self) -> impl Iterator<Item = f64> + '_ {
        let mut inexact = self.inexact_prices.iter();
        self.slots_in_order()
            .map(move |slot| match Decimal::from_bits(slot) {
                Some(decimal) => decimal.to_f64(),
                None => inexact.next().copied().unwrap_or_default(),
            })
    }

    /// The slots, oldest first.
    fn slots_in_order(&self) -> impl Iterator<Item = i64> + '_ {
        let (newer, older) = self.slots.split_at(self.oldest);
        older.iter().chain(newer).copied()
    }

    /// The compensated sum of every price in the window, afresh: O(window).
    fn resum(&self) -> CompensatedSum {
        let mut sum = CompensatedSum::default();
        for price in self.prices() {
            sum.add(price);
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// Pushing a price as a quote would: exact when its shortest decimal
    /// form lies in the exact domain.
    trait PushText {
        fn push_text(&mut self, price: f64) -> Average;
    }

    impl PushText for SmaWindow {
        fn push_text(&mut self, price: f64) -> Average {
            self.push(price, Decimal::parse(&price.to_string()))
        }
    }

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
            w.push_text(10.0),
            Average {
                mean: 10.0,
                count: 1,
                exact: true
            }
        );
        assert_eq!(
            w.push_text(20.0),
            Average {
                mean: 15.0,
                count: 2,
                exact: true
            }
        );
        assert!(!w.is_full());
    }

    #[test]
    fn full_window_evicts_the_oldest_price() {
        let mut w = window(3);
        for p in [1.0, 2.0, 3.0] {
            w.push_text(p);
        }
        assert!(w.is_full());
        assert_eq!(
            w.push_text(10.0),
            Average {
                mean: 5.0,
                count: 3,
                exact: true
            }
        );
        assert_eq!(w.prices().collect::<Vec<_>>(), vec![2.0, 3.0, 10.0]);
    }

    #[test]
    fn window_of_one_is_the_last_price() {
        let mut w = window(1);
        for p in [5.5, -3.25, 1e12, 0.0] {
            assert_eq!(
                w.push_text(p),
                Average {
                    mean: p,
                    count: 1,
                    exact: true
                }
            );
        }
    }

    #[test]
    fn large_price_leaving_the_window_leaves_no_residue() {
        let mut w = window(2);
        w.push_text(1e16);
        w.push_text(1.0);
        // 1e16 leaves: a naive sum would read 0 or 2 here.
        let avg = w.push_text(1.0);
        assert_eq!(avg.mean, 1.0);
    }

    #[test]
    fn an_overflowing_sum_recovers_once_its_prices_leave_the_window() {
        let mut w = window(3);
        w.push_text(f64::MAX);
        assert!(
            !w.push_text(f64::MAX).mean.is_finite(),
            "the window's own sum overflows"
        );
        assert!(
            !w.push_text(1.0).mean.is_finite(),
            "still two MAX in the window"
        );
        // One MAX left: the sum is representable again.
        assert_eq!(w.push_text(2.0).mean, (f64::MAX + 3.0) / 3.0);
        assert_eq!(w.push_text(3.0).mean, 2.0);
        assert_eq!(w.push_text(4.0).mean, 3.0);
    }

    #[test]
    fn prices_that_cancel_average_to_exactly_zero() {
        let mut w = window(4);
        for i in 0..1_000 {
            let price = if i % 2 == 0 { 1e6 } else { -1e6 };
            let mean = w.push_text(price).mean;
            if i >= 3 {
                assert_eq!(mean, 0.0);
            }
        }
    }

    #[test]
    fn an_overflowed_state_survives_json_and_is_rebuilt_on_restore() {
        let mut w = window(3);
        w.push_text(f64::MAX);
        w.push_text(f64::MAX);
        let json = serde_json::to_string(&w.state()).expect("serialize");
        assert!(
            json.contains("null"),
            "serde_json writes inf as null: {json}"
        );
        let state: WindowState = serde_json::from_str(&json).expect("readable");
        let mut restored = SmaWindow::restore(w.capacity, state);
        restored.push_text(1.0);
        assert_eq!(restored.push_text(2.0).mean, (f64::MAX + 3.0) / 3.0);
        assert_eq!(restored.push_text(3.0).mean, 2.0);
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
            let got = w.push_text(price).mean;
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
            original.push_text(p);
        }
        let mut restored = SmaWindow::restore(original.capacity, original.state());
        for p in [0.9, 1e-7, 3.3, 0.1] {
            assert_eq!(
                original.push_text(p).mean.to_bits(),
                restored.push_text(p).mean.to_bits()
            );
        }
    }

    #[test]
    fn a_state_from_a_larger_window_is_trimmed_and_resummed() {
        let mut big = window(5);
        for p in [1.0, 2.0, 3.0, 4.0, 5.0] {
            big.push_text(p);
        }
        let small = SmaWindow::restore(NonZeroUsize::new(2).expect("non-zero"), big.state());
        assert_eq!(small.prices().collect::<Vec<_>>(), vec![4.0, 5.0]);
        assert_eq!(
            small.average(),
            Some(Average {
                mean: 4.5,
                count: 2,
                exact: true
            })
        );
    }

    #[test]
    fn repeated_price_does_not_drift() {
        let mut w = window(4);
        for _ in 0..100_000 {
            let mean = w.push_text(0.1).mean;
            assert!(
                (mean - 0.1).abs() <= f64::EPSILON * 0.1,
                "mean drifted to {mean}"
            );
        }
    }
}
