//! An exact running total of decimals (volumes, prices × volumes), for the
//! sums candles keep. Add-only: a candle's totals only grow until it
//! closes.
//!
//! The total is an `i128` count of units of `10^-scale`, `scale` the most
//! places of anything added so far (up to 36: a price's 18 plus a volume's
//! 18). Every addition is checked; one that would overflow (or an addend
//! outside the exact domain) turns the total inexact for good, and from
//! then on it is the compensated `f64` sum kept beside it, which is what
//! [`Total::value`] says.

use serde::{Deserialize, Serialize};

use crate::decimal::{self, Decimal};
use crate::sum::CompensatedSum;

/// The most places a total keeps: a product of two exact decimals.
pub const MAX_TOTAL_SCALE: u8 = 2 * decimal::MAX_SCALE;

/// An exact sum of decimals, or, once one did not fit, a compensated one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Total {
    /// The exact sum in units of `10^-scale`; `None` once inexact.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "exact_units")]
    units: Option<i128>,
    scale: u8,
    /// The same sum in `f64`, compensated.
    float: CompensatedSum,
}

/// `i128` as a decimal string in JSON, which has no 128-bit integers.
mod exact_units {
    use serde::{Deserialize, Deserializer, Serializer};

    #[allow(clippy::ref_option)] // serde's `with` passes a reference
    pub fn serialize<S: Serializer>(units: &Option<i128>, s: S) -> Result<S::Ok, S::Error> {
        match units {
            Some(units) => s.serialize_str(&units.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i128>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        Ok(text.and_then(|t| t.parse().ok()))
    }
}

/// A value of a total: the nearest `f64`, and whether it is exact.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Amount {
    /// The sum (or a quotient of sums), rounded once when `exact`.
    pub value: f64,
    /// Whether `value` is the exact result rounded once.
    pub exact: bool,
}

impl Total {
    /// An empty total: exactly zero.
    #[must_use]
    pub fn new() -> Self {
        Self {
            units: Some(0),
            ..Self::default()
        }
    }

    /// Adds a decimal (`None`: a value outside the exact domain, whose
    /// `f64` is `value`).
    pub fn add(&mut self, value: f64, decimal: Option<Decimal>) {
        self.add_units(value, decimal.map(|d| (i128::from(d.units()), d.scale())));
    }

    /// Adds the product of two decimals (a price times a volume).
    pub fn add_product(&mut self, value: f64, a: Option<Decimal>, b: Option<Decimal>) {
        let product = a.zip(b).and_then(|(a, b)| {
            let units = i128::from(a.units()).checked_mul(i128::from(b.units()))?;
            Some((units, a.scale() + b.scale()))
        });
        self.add_units(value, product);
    }

    fn add_units(&mut self, value: f64, exact: Option<(i128, u8)>) {
        self.float.add(value);
        self.add_exact(exact);
    }

    /// Adds another total.
    pub fn merge(&mut self, other: &Total) {
        self.float.add(other.float.sum);
        self.float.add(other.float.compensation);
        self.add_exact(other.units.map(|units| (units, other.scale)));
    }

    fn add_exact(&mut self, exact: Option<(i128, u8)>) {
        let (Some(sum), Some((units, scale))) = (self.units, exact) else {
            self.units = None;
            return;
        };
        // Both at the larger scale, then added; any overflow ends exactness.
        let target = self.scale.max(scale);
        let sum = sum.checked_mul(decimal::pow10(target - self.scale));
        let units = units.checked_mul(decimal::pow10(target - scale));
        self.units = sum
            .zip(units)
            .and_then(|(sum, units)| sum.checked_add(units));
        self.scale = target;
    }

    /// The total.
    #[must_use]
    pub fn value(&self) -> Amount {
        match self.units {
            Some(units) => Amount {
                value: decimal::ratio_to_f64(units, decimal::pow10(self.scale).unsigned_abs()),
                exact: true,
            },
            None => Amount {
                value: self.float.value(),
                exact: false,
            },
        }
    }

    /// Whether the total is exactly zero (an inexact one never is).
    #[must_use]
    pub fn is_zero(&self) -> bool {
        self.units == Some(0)
    }

    /// `self / divisor`, rounded once when both are exact and the quotient
    /// fits the exact division; `None` when `divisor` is zero.
    #[must_use]
    pub fn ratio(&self, divisor: &Total) -> Option<Amount> {
        if divisor.is_zero() {
            return None;
        }
        let exact = self.units.zip(divisor.units).and_then(|(num, den)| {
            // num / 10^a ÷ den / 10^b = num × 10^b / (den × 10^a)
            let (mut num, mut den) = (num, den);
            if den < 0 {
                (num, den) = (num.checked_neg()?, den.checked_neg()?);
            }
            let (a, b) = (self.scale, divisor.scale);
            if a >= b {
                den = den.checked_mul(decimal::pow10(a - b))?;
            } else {
                num = num.checked_mul(decimal::pow10(b - a))?;
            }
            let den = den.unsigned_abs();
            (den < 1 << 120).then(|| decimal::ratio_to_f64(num, den))
        });
        Some(match exact {
            Some(value) => Amount { value, exact: true },
            None => Amount {
                value: self.float.value() / divisor.float.value(),
                exact: false,
            },
        })
    }
}
