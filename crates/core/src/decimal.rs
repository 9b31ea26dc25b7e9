//! Prices as the decimals they were written as, and the one rounding from
//! an exact quotient to the `f64` a result carries.
//!
//! A quote's price arrives as decimal text (`168.912`). Binary floating
//! point cannot hold most such values, so a running sum of `f64`s drifts
//! and a mean of them prints as `168.91199999999998`. Kept as an integer
//! count of units of `10^-scale`, the same prices add and subtract exactly,
//! in O(1), for ever; a mean is then one exact quotient, rounded once
//! ([`ratio_to_f64`]) to the nearest `f64`, ties to even: *the* correctly
//! rounded value, which prints as `168.912`.
//!
//! The domain in which this holds is small enough for an `i128` to sum a
//! whole window of it without overflow, and large enough for every price a
//! market quotes: at most [`MAX_DIGITS`] significant digits and at most
//! [`MAX_SCALE`] decimal places. A price outside it (`1e-30`, a 20-digit
//! price) is still a valid price: it is averaged by the compensated `f64`
//! path instead, and the result says so (see `crate::sma`).

use std::fmt;
use std::num::NonZeroI64;

/// The most decimal places an exact price may have.
pub const MAX_SCALE: u8 = 18;

/// The most significant digits an exact price may have.
pub const MAX_DIGITS: u32 = 15;

/// `10^MAX_DIGITS`: an exact price's units are below it in magnitude.
const UNITS_LIMIT: i64 = 1_000_000_000_000_000;

/// `10^0 ..= 10^38`, every power of ten an `i128` holds.
const POWERS_OF_TEN: [i128; 39] = {
    let mut table = [1i128; 39];
    let mut i = 1;
    while i < table.len() {
        table[i] = table[i - 1] * 10;
        i += 1;
    }
    table
};

/// `10^0 ..= 10^18`, the powers of ten between two scales.
const SMALL_POWERS_OF_TEN: [i64; MAX_SCALE as usize + 1] = {
    let mut table = [1i64; MAX_SCALE as usize + 1];
    let mut i = 1;
    while i < table.len() {
        table[i] = table[i - 1] * 10;
        i += 1;
    }
    table
};

/// `units × 10^shift` for a `shift` of at most [`MAX_SCALE`]: one widening
/// multiply of two 64-bit numbers.
#[inline]
#[must_use]
pub fn shifted(units: i64, shift: u8) -> i128 {
    i128::from(units) * i128::from(SMALL_POWERS_OF_TEN[usize::from(shift)])
}

/// `sum / (count × 10^scale)` rounded once, as [`ratio_to_f64`], for the
/// mean of `count` prices whose units of `10^-scale` add up to `sum`. The
/// usual case (both below 2^53) takes 64-bit arithmetic and one division.
#[inline]
#[must_use]
pub fn mean(sum: i128, count: usize, scale: u8) -> f64 {
    const EXACT: u64 = 1 << 53;
    let divisor = (count as u64).checked_mul(SMALL_POWERS_OF_TEN[usize::from(scale)] as u64);
    if let (Ok(sum), Some(divisor)) = (i64::try_from(sum), divisor)
        && sum.unsigned_abs() <= EXACT
        && divisor <= EXACT
    {
        return sum as f64 / divisor as f64;
    }
    ratio_to_f64(sum, count as u128 * pow10(scale).unsigned_abs())
}

/// `10^n` for `n <= 38`.
#[must_use]
pub fn pow10(n: u8) -> i128 {
    POWERS_OF_TEN[usize::from(n)]
}

/// A decimal number `units × 10^-scale`, inside the exact domain:
/// `|units| < 10^15` and `scale <= 18`, with no trailing zero in `units`
/// unless `scale` is 0 (so each value has one representation).
///
/// Packed in one word, `units << 5 | (scale + 1)`, never zero: a quote
/// carries an `Option<Decimal>` for the cost of an `i64`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decimal(NonZeroI64);

impl fmt::Debug for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}e-{}", self.units(), self.scale())
    }
}

impl Decimal {
    /// The decimal `units × 10^-scale`, if it lies in the exact domain.
    #[must_use]
    #[inline]
    pub fn new(mut units: i64, mut scale: u8) -> Option<Self> {
        // The parser's hot path: 64-bit arithmetic only (an i128 remainder
        // is a library call).
        while scale > 0 && units % 10 == 0 {
            units /= 10;
            scale -= 1;
        }
        let inside = units.unsigned_abs() < UNITS_LIMIT.unsigned_abs() && scale <= MAX_SCALE;
        inside.then(|| Self::pack(units, if units == 0 { 0 } else { scale }))
    }

    /// The decimal `units × 10^-scale`, for a caller that knows it lies in
    /// the domain and `units` has no trailing zero (or `scale` is 0).
    #[inline]
    #[must_use]
    pub fn from_normalized(units: i64, scale: u8) -> Self {
        debug_assert!(scale == 0 || units % 10 != 0);
        Self::pack(units, if units == 0 { 0 } else { scale })
    }

    /// Units and scale already normalized and inside the domain.
    #[inline]
    fn pack(units: i64, scale: u8) -> Self {
        debug_assert!(units.unsigned_abs() < UNITS_LIMIT.unsigned_abs() && scale <= MAX_SCALE);
        let packed = (units << 5) | i64::from(scale + 1);
        Self(NonZeroI64::new(packed).unwrap_or(NonZeroI64::MIN))
    }

    /// The value a JSON number's text spells exactly (`-12.5`, `1.25e2`,
    /// `0.000001`), if it lies in the exact domain. `None` for text that is
    /// not a JSON number, and for numbers outside the domain.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        let (negative, rest) = match bytes.split_first() {
            Some((b'-', rest)) => (true, rest),
            _ => (false, bytes),
        };
        let int_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let (int, rest) = rest.split_at(int_len);
        if int.is_empty() || (int.len() > 1 && int[0] == b'0') {
            return None;
        }
        let (fraction, rest) = match rest.split_first() {
            Some((b'.', rest)) => {
                let len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
                if len == 0 {
                    return None;
                }
                rest.split_at(len)
            }
            _ => (&[][..], rest),
        };
        let exponent = match rest.split_first() {
            None => 0i64,
            Some((b'e' | b'E', rest)) => {
                let (sign, digits) = match rest.split_first() {
                    Some((b'-', digits)) => (-1, digits),
                    Some((b'+', digits)) => (1, digits),
                    _ => (1, rest),
                };
                if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                    return None;
                }
                // Exponents this long put any nonzero value far outside the
                // domain; zero stays zero.
                let value = if digits.len() > 6 {
                    1_000_000
                } else {
                    digits
                        .iter()
                        .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'))
                };
                sign * value
            }
            Some(_) => return None,
        };
        // The significant digits, without leading zeros (of the whole
        // number) or trailing ones (of the fraction, moved to the scale).
        let leading = int
            .iter()
            .chain(fraction)
            .take_while(|&&d| d == b'0')
            .count();
        let total = int.len() + fraction.len();
        let trailing = int
            .iter()
            .chain(fraction)
            .rev()
            .take_while(|&&d| d == b'0')
            .count()
            .min(total - leading);
        let significant = total - leading - trailing;
        if significant == 0 {
            return Some(Self::pack(0, 0));
        }
        if significant > MAX_DIGITS as usize {
            return None;
        }
        let units = int
            .iter()
            .chain(fraction)
            .skip(leading)
            .take(significant)
            .fold(0i128, |n, d| n * 10 + i128::from(d - b'0'));
        // value = units × 10^(trailing - fraction.len() + exponent)
        let scale = fraction.len() as i64 - trailing as i64 - exponent;
        let scale = i32::try_from(scale.clamp(-1_000, 1_000)).unwrap_or(1_000);
        Self::normalized(if negative { -units } else { units }, scale)
    }

    /// `units × 10^-scale` in the domain, trailing zeros moved to the scale;
    /// a negative scale multiplies the units out.
    fn normalized(mut units: i128, mut scale: i32) -> Option<Self> {
        if units == 0 {
            return Some(Self::pack(0, 0));
        }
        while scale > 0 && units % 10 == 0 {
            units /= 10;
            scale -= 1;
        }
        if scale < 0 {
            if scale < -(MAX_DIGITS as i32) {
                return None;
            }
            units = units.checked_mul(pow10(u8::try_from(-scale).ok()?))?;
            scale = 0;
        }
        let scale = u8::try_from(scale).ok().filter(|&s| s <= MAX_SCALE)?;
        let units = i64::try_from(units)
            .ok()
            .filter(|u| u.unsigned_abs() < UNITS_LIMIT.unsigned_abs())?;
        Some(Self::pack(units, scale))
    }

    /// The value in units of `10^-scale`.
    #[must_use]
    #[inline]
    pub fn units(self) -> i64 {
        self.0.get() >> 5
    }

    /// The number of decimal places.
    #[must_use]
    #[inline]
    pub fn scale(self) -> u8 {
        (self.0.get() & 31) as u8 - 1
    }

    /// The decimal in one nonzero word, for storing many compactly.
    #[must_use]
    #[inline]
    pub fn to_bits(self) -> i64 {
        self.0.get()
    }

    /// The decimal whose [`Decimal::to_bits`] are `bits`; `None` for 0.
    #[must_use]
    #[inline]
    pub fn from_bits(bits: i64) -> Option<Self> {
        let decimal = Self(NonZeroI64::new(bits)?);
        debug_assert!(decimal.scale() <= MAX_SCALE);
        Some(decimal)
    }

    /// The nearest `f64` (the value the price's text parses to).
    #[must_use]
    pub fn to_f64(self) -> f64 {
        ratio_to_f64(i128::from(self.units()), pow10(self.scale()).unsigned_abs())
    }

    /// The decimal of `scale` places that `value` is the nearest `f64` to,
    /// where one with at most [`MAX_DIGITS`] digits exists: how a saved
    /// window's prices are read back as the decimals they were. With at
    /// most 15 digits the `f64` is within half a unit in the last place
    /// of a part in 2^53 of the decimal, so rounding `value × 10^scale`
    /// exactly to an integer finds it; it is then checked to round trip.
    #[must_use]
    pub fn from_f64(value: f64, scale: u8) -> Option<Self> {
        if !value.is_finite() || scale > MAX_SCALE {
            return None;
        }
        if value == 0.0 {
            return Some(Self::pack(0, 0));
        }
        let bits = value.to_bits();
        let biased = ((bits >> 52) & 0x7ff) as i32;
        let fraction = bits & ((1 << 52) - 1);
        // value = mantissa × 2^exponent
        let (mantissa, exponent) = if biased == 0 {
            (fraction, -1074)
        } else {
            (fraction | (1 << 52), biased - 1075)
        };
        let scaled = u128::from(mantissa) * pow10(scale).unsigned_abs();
        let units = if exponent >= 0 {
            scaled.checked_shl(u32::try_from(exponent).ok()?)?
        } else {
            let shift = u32::try_from(-exponent).ok()?;
            if shift >= 127 {
                return None;
            }
            (scaled + (1 << (shift - 1))) >> shift
        };
        let units = i128::try_from(units).ok()?;
        let units = if value < 0.0 { -units } else { units };
        let decimal = Self::normalized(units, i32::from(scale))?;
        (decimal.to_f64() == value).then_some(decimal)
    }
}

/// `numerator / denominator` rounded once to the nearest `f64`, ties to
/// even. `denominator` must be nonzero and below 2^120 (a window's count
/// times `10^scale` is below 2^88).
///
/// When both are below 2^53 they are exact `f64`s and one IEEE division
/// rounds correctly; otherwise the quotient's leading 55 bits are found by
/// integer division and rounded by hand.
#[must_use]
pub fn ratio_to_f64(numerator: i128, denominator: u128) -> f64 {
    debug_assert!(denominator != 0);
    const EXACT: u128 = 1 << 53;
    let magnitude = numerator.unsigned_abs();
    if magnitude <= EXACT && denominator <= EXACT {
        // Through 64 bits: converting an i128 to f64 is a library call.
        return numerator as i64 as f64 / denominator as u64 as f64;
    }
    let value = positive_ratio_to_f64(magnitude, denominator);
    if numerator < 0 { -value } else { value }
}

fn positive_ratio_to_f64(numerator: u128, denominator: u128) -> f64 {
    debug_assert!(denominator < 1 << 120);
    if numerator == 0 {
        return 0.0;
    }
    let bits = |n: u128| 128 - n.leading_zeros();
    let mut quotient = numerator / denominator;
    let mut remainder = numerator % denominator;
    // The quotient is `quotient × 2^exponent`, plus what `remainder` holds.
    let mut exponent = 0i32;
    let mut sticky = false;
    if bits(quotient) > 55 {
        let shift = bits(quotient) - 55;
        sticky = quotient & ((1 << shift) - 1) != 0;
        quotient >>= shift;
        exponent = shift as i32;
    } else {
        // Bring down more bits of the quotient until it has 55, as many
        // at a time as the remainder can be shifted without overflow.
        let room = 127 - bits(denominator);
        while bits(quotient) < 55 {
            let step = (55 - bits(quotient)).min(room);
            let shifted = remainder << step;
            quotient = (quotient << step) | (shifted / denominator);
            remainder = shifted % denominator;
            exponent -= step as i32;
        }
    }
    sticky |= remainder != 0;
    // 55 bits: 53 of mantissa, a rounding bit, and one more folded into
    // the sticky bit.
    let mut mantissa = (quotient >> 2) as u64;
    let round = quotient & 0b10 != 0;
    sticky |= quotient & 1 != 0;
    exponent += 2;
    if round && (sticky || mantissa & 1 == 1) {
        mantissa += 1;
        if mantissa == 1 << 53 {
            mantissa >>= 1;
            exponent += 1;
        }
    }
    // The mantissa and the power of two are exact `f64`s, and so is their
    // product: the quotients here (below 2^127, above 2^-128) are normal.
    mantissa as f64 * power_of_two(exponent)
}

/// `2^exponent` for a normal exponent.
fn power_of_two(exponent: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&exponent));
    f64::from_bits(((exponent + 1023) as u64) << 52)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decimal(units: i64, scale: u8) -> Decimal {
        Decimal::new(units, scale).expect("in the domain")
    }

    #[test]
    fn plain_decimals_parse_to_their_digits() {
        assert_eq!(Decimal::parse("168.912"), Some(decimal(168_912, 3)));
        assert_eq!(Decimal::parse("-0.5"), Some(decimal(-5, 1)));
        assert_eq!(Decimal::parse("420"), Some(decimal(420, 0)));
        assert_eq!(Decimal::parse("0"), Some(decimal(0, 0)));
        assert_eq!(Decimal::parse("-0.000"), Some(decimal(0, 0)));
    }

    #[test]
    fn trailing_zeros_and_exponents_normalize() {
        assert_eq!(Decimal::parse("189.50"), Some(decimal(1895, 1)));
        assert_eq!(Decimal::parse("1.5e3"), Some(decimal(1500, 0)));
        assert_eq!(Decimal::parse("1.5E-3"), Some(decimal(15, 4)));
        assert_eq!(Decimal::parse("12e+1"), Some(decimal(120, 0)));
        assert_eq!(Decimal::parse("1000.000"), Some(decimal(1000, 0)));
        assert_eq!(Decimal::parse("0.00012300"), Some(decimal(123, 6)));
    }

    #[test]
    fn numbers_outside_the_domain_are_not_exact() {
        // 16 significant digits.
        assert_eq!(Decimal::parse("1234567890.123456"), None);
        // 19 decimal places.
        assert_eq!(Decimal::parse("0.0000000000000000001"), None);
        assert_eq!(Decimal::parse("1e-30"), None);
        assert_eq!(Decimal::parse("1e300"), None);
        assert_eq!(Decimal::parse("1e99999999999999999999"), None);
        // 15 digits and 18 places are inside.
        assert_eq!(
            Decimal::parse("123456789012345"),
            Some(decimal(123_456_789_012_345, 0))
        );
        assert_eq!(Decimal::parse("0.000000000000000001"), Some(decimal(1, 18)));
        assert_eq!(Decimal::parse("0e99999999999"), Some(decimal(0, 0)));
    }

    #[test]
    fn text_that_is_not_a_json_number_is_refused() {
        for text in [
            "", "-", "01", "1.", ".5", "1e", "1e+", "+1", "1.5x", "NaN", "inf", "0x10",
        ] {
            assert_eq!(Decimal::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn a_decimal_reads_as_the_f64_its_text_parses_to() {
        for text in ["168.912", "0.1", "-3.3", "123456789012345", "1e-18", "9.99"] {
            let d = Decimal::parse(text).expect("in the domain");
            assert_eq!(d.to_f64(), text.parse::<f64>().expect("a number"), "{text}");
        }
    }

    #[test]
    fn a_decimal_is_found_again_from_its_f64_and_scale() {
        for text in [
            "168.912",
            "0.1",
            "-3.3",
            "999999999999999",
            "1e-18",
            "-0.000007",
        ] {
            let d = Decimal::parse(text).expect("in the domain");
            assert_eq!(Decimal::from_f64(d.to_f64(), d.scale()), Some(d), "{text}");
        }
        // 0.1 is not a whole number of units.
        assert_eq!(Decimal::from_f64(0.1, 0), None);
    }

    #[test]
    fn quotients_round_once_to_nearest_even() {
        assert_eq!(ratio_to_f64(1_689_120, 10_000), 168.912);
        assert_eq!(ratio_to_f64(-1, 3), -1.0 / 3.0);
        assert_eq!(ratio_to_f64(0, 7), 0.0);
        // Beyond 2^53: 2^53 + 1 is a tie between 2^53 and 2^53 + 2.
        let big = (1i128 << 53) + 1;
        assert_eq!(ratio_to_f64(big, 1), 9_007_199_254_740_992.0);
        assert_eq!(ratio_to_f64(big + 2, 1), 9_007_199_254_740_996.0);
        // A tie that only the remainder breaks: (2^54 + 2 + 1/3) rounds up.
        assert_eq!(
            ratio_to_f64(3 * ((1i128 << 54) + 2) + 1, 3),
            18_014_398_509_481_988.0
        );
        let tiny = ratio_to_f64(1, 10u128.pow(22) * 10_000);
        assert_eq!(tiny, 1e-26);
    }
}
