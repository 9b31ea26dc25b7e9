//! Running sums of prices: exact over decimals, compensated over `f64`s.
//! The moving averages keep one of each (the compensated one only while an
//! inexact price is among the summed).

use crate::decimal::{self, Decimal, MAX_SCALE};

/// How much larger than what it leaves behind (the new total and the new
/// price, in magnitude) a leaving price may be before the compensated sum
/// is rebuilt; see [`CompensatedSum::replace`]. Within it the
/// compensation's own rounding stays below 2^16 ulps of those (~1e-11 of
/// them).
const CANCELLATION_RATIO: f64 = 65_536.0;

/// The exact sum of a window's exact prices.
#[derive(Debug, Clone, Default)]
pub(crate) struct ExactSum {
    /// The sum in units of `10^-scale`. Below 10^15 × 10^18 a price and
    /// 10^4 prices a window, so far from the `i128` limit (1.7 × 10^38).
    pub(crate) sum: i128,
    /// The largest scale among the window's exact prices.
    pub(crate) scale: u8,
    /// How many exact prices the window holds at each scale, to find the
    /// new largest when the last price at the largest leaves.
    per_scale: [u32; MAX_SCALE as usize + 1],
    /// How many inexact prices the window holds.
    pub(crate) inexact: u32,
}

/// A Neumaier-compensated sum of `f64`s.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct CompensatedSum {
    pub(crate) sum: f64,
    pub(crate) compensation: f64,
}

impl ExactSum {
    #[inline]
    pub(crate) fn add(&mut self, price: Option<Decimal>) {
        let Some(price) = price else {
            self.inexact += 1;
            return;
        };
        let (units, scale) = (price.units(), price.scale());
        if scale == self.scale {
            // The usual case: every price of a key has as many places.
            self.sum += i128::from(units);
        } else {
            if scale > self.scale {
                self.sum *= decimal::pow10(scale - self.scale);
                self.scale = scale;
            }
            self.sum += decimal::shifted(units, self.scale - scale);
        }
        self.per_scale[usize::from(scale)] += 1;
    }

    #[inline]
    pub(crate) fn remove(&mut self, price: Option<Decimal>) {
        let Some(price) = price else {
            self.inexact -= 1;
            return;
        };
        let (units, scale) = (price.units(), price.scale());
        self.sum -= if scale == self.scale {
            i128::from(units)
        } else {
            decimal::shifted(units, self.scale - scale)
        };
        self.per_scale[usize::from(scale)] -= 1;
        if scale == self.scale && self.per_scale[usize::from(scale)] == 0 {
            // Every price left is a whole number of units at a smaller
            // scale, so the sum divides exactly.
            let largest = self.per_scale.iter().rposition(|&n| n > 0).unwrap_or(0);
            let largest = largest as u8;
            let divisor = decimal::pow10(self.scale - largest);
            debug_assert_eq!(self.sum % divisor, 0);
            self.sum /= divisor;
            self.scale = largest;
        }
    }
}

impl CompensatedSum {
    /// The sum, its compensation folded in.
    #[inline]
    pub(crate) fn value(&self) -> f64 {
        self.sum + self.compensation
    }

    /// Replaces `evicted` (0 when nothing left) by `price`: false when the
    /// running sum cannot come back from it and must be summed afresh:
    /// - An overflowing price made it inf (or NaN, once inf - inf). Once
    ///   such prices have left the window the fresh sum is finite again;
    ///   while they are in it the mean stays non-finite (`null` on the
    ///   wire), which is the truth.
    /// - A price far larger than all that remains just left: the
    ///   remainder then lives in the compensation term, which itself has
    ///   only 53 bits and may have rounded away the smaller prices added
    ///   since. (The new price counts too: prices that cancel, +x and -x,
    ///   leave a total of 0 but lose nothing, and cost no rebuild.)
    pub(crate) fn replace(&mut self, evicted: f64, price: f64) -> bool {
        self.add(-evicted);
        self.add(price);
        let total = self.value();
        total.is_finite() && evicted.abs() <= CANCELLATION_RATIO * (total.abs() + price.abs())
    }

    /// Neumaier's variant of Kahan summation: also exact when the addend is
    /// larger than the running sum, which happens whenever prices move by
    /// orders of magnitude.
    pub(crate) fn add(&mut self, value: f64) {
        let total = self.sum + value;
        if self.sum.abs() >= value.abs() {
            self.compensation += (self.sum - total) + value;
        } else {
            self.compensation += (value - total) + self.sum;
        }
        self.sum = total;
    }
}
