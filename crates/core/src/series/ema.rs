//! The exponential moving average, bit for bit as pandas computes
//! `Series.ewm(span=N, adjust=False).mean()` over a key's prices in arrival
//! order.
//!
//! Bit-identical means the same operations in the same order, each rounded
//! as pandas rounds it (its Cython loop, compiled without fused
//! multiply-add; Rust never contracts `a * b + c` into one either):
//!
//! ```text
//! com = (span - 1) / 2            alpha = 1 / (1 + com)
//! old = 1 - alpha                 y0 = x0
//! y   = y                         when x == y (a constant run stays put)
//! y   = (old * y + alpha * x) / (old + alpha)   otherwise
//! ```
//!
//! The last division is by a number that rounds to 1 for every whole span,
//! and is kept because pandas performs it. The algebraically equal
//! `y + alpha * (x - y)` differs in the last bits on most inputs; the
//! committed pandas reference (tests/reference) tells them apart.

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

/// An EMA of span N over one key's prices.
#[derive(Debug, Clone, PartialEq)]
pub struct Ema {
    /// The weight of a new price.
    alpha: f64,
    /// The weight of the average so far.
    old: f64,
    /// The average so far; `None` before the first price.
    value: Option<f64>,
}

/// What an EMA keeps, for persisting it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EmaState {
    /// The average so far (`null` before the first price).
    pub value: Option<f64>,
}

impl Ema {
    /// An EMA of `span` prices (`alpha = 2 / (span + 1)`).
    #[must_use]
    pub fn new(span: NonZeroU32) -> Self {
        let com = (f64::from(span.get()) - 1.0) / 2.0;
        let alpha = 1.0 / (1.0 + com);
        Self {
            alpha,
            old: 1.0 - alpha,
            value: None,
        }
    }

    /// Takes the next price and returns the new average. The first price
    /// is its own average.
    pub fn push(&mut self, price: f64) -> f64 {
        let value = match self.value {
            None => price,
            Some(value) if value == price => value,
            Some(value) => (self.old * value + self.alpha * price) / (self.old + self.alpha),
        };
        self.value = Some(value);
        value
    }

    /// The average so far, if a price has been pushed.
    #[must_use]
    pub fn value(&self) -> Option<f64> {
        self.value
    }

    /// Everything needed to continue this EMA elsewhere bit for bit.
    #[must_use]
    pub fn state(&self) -> EmaState {
        EmaState { value: self.value }
    }

    /// An EMA of `span` continuing from `state`.
    #[must_use]
    pub fn restore(span: NonZeroU32, state: EmaState) -> Self {
        Self {
            value: state.value.filter(|v| v.is_finite()),
            ..Self::new(span)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ema(span: u32) -> Ema {
        Ema::new(NonZeroU32::new(span).expect("non-zero"))
    }

    #[test]
    fn the_first_price_is_its_own_average() {
        let mut e = ema(20);
        assert_eq!(e.value(), None);
        assert_eq!(e.push(189.37), 189.37);
    }

    #[test]
    fn a_span_of_one_follows_the_price() {
        let mut e = ema(1);
        for p in [3.0, 7.5, -2.25] {
            assert_eq!(e.push(p), p);
        }
    }

    #[test]
    fn span_three_weighs_the_new_price_by_a_half() {
        let mut e = ema(3);
        e.push(10.0);
        assert_eq!(e.push(20.0), 15.0);
        assert_eq!(e.push(20.0), 17.5);
    }

    #[test]
    fn a_constant_run_stays_exactly_put() {
        let mut e = ema(7);
        for _ in 0..1000 {
            assert_eq!(e.push(0.1), 0.1);
        }
    }

    #[test]
    fn a_restored_ema_continues_bit_for_bit() {
        let mut original = ema(26);
        for p in [101.5, 99.25, 100.0, 104.75] {
            original.push(p);
        }
        let json = serde_json::to_string(&original.state()).expect("serializes");
        let mut restored = Ema::restore(
            NonZeroU32::new(26).expect("non-zero"),
            serde_json::from_str(&json).expect("reads"),
        );
        for p in [103.0, 0.1, 1e9] {
            assert_eq!(original.push(p).to_bits(), restored.push(p).to_bits());
        }
    }
}
