//! The means we publish against an exact rational oracle: every price
//! inside the exact decimal domain is held as the rational it spells, the
//! window's mean is computed in unbounded rationals, and the published
//! `f64` must be that rational rounded once to nearest, ties to even.

use std::collections::VecDeque;
use std::num::NonZeroUsize;

use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::{Signed, Zero};
use proptest::prelude::*;
use quotebridge_core::decimal::{Decimal, MAX_SCALE, ratio_to_f64};
use quotebridge_core::sma::SmaWindow;

/// The exact value of a finite `f64`.
fn exact(value: f64) -> BigRational {
    BigRational::from_float(value).expect("finite")
}

/// The exact value of a decimal.
fn rational(decimal: Decimal) -> BigRational {
    BigRational::new(
        BigInt::from(decimal.units()),
        BigInt::from(10u8).pow(u32::from(decimal.scale())),
    )
}

/// Whether `got` is `want` rounded to the nearest `f64`, ties to even:
/// no neighbour of `got` is nearer, and an equally near one loses only to
/// an even mantissa.
fn is_correctly_rounded(got: f64, want: &BigRational) -> bool {
    if !got.is_finite() {
        return false;
    }
    let distance = (exact(got) - want).abs();
    [got.next_down(), got.next_up()]
        .into_iter()
        .filter(|n| n.is_finite())
        .all(|neighbour| {
            let other = (exact(neighbour) - want).abs();
            distance < other || (distance == other && got.to_bits() & 1 == 0)
        })
}

/// A price in the exact domain, drawn to hit the hard cases: any digits at
/// any scale, the largest and smallest magnitudes the domain holds, and a
/// few values over and over (cancellation, repeated prices).
fn decimal() -> impl Strategy<Value = Decimal> {
    let limit = 999_999_999_999_999i64;
    prop_oneof![
        4 => (-limit..=limit, 0..=MAX_SCALE),
        1 => (prop_oneof![Just(limit), Just(-limit)], 0..=2u8),
        1 => (-9i64..=9, MAX_SCALE - 2..=MAX_SCALE),
        2 => (prop_oneof![Just(1i64), Just(-1), Just(3), Just(1_000_001)], 0..=MAX_SCALE),
        2 => (10_000i64..=20_000, 2..=3u8),
    ]
    .prop_map(|(units, scale)| Decimal::new(units, scale).expect("drawn inside the domain"))
}

/// A price as a quote carries it: exact, or (rarely) one outside the
/// domain that only its `f64` describes.
#[derive(Debug, Clone, Copy)]
enum Price {
    Exact(Decimal),
    Inexact(f64),
}

fn price() -> impl Strategy<Value = Price> {
    prop_oneof![
        12 => decimal().prop_map(Price::Exact),
        1 => prop_oneof![Just(1e-30), Just(1.234_567_890_123_456_7e20), Just(-7e300), Just(0.1 + 0.2)]
            .prop_map(Price::Inexact),
    ]
}

impl Price {
    fn push(self, window: &mut SmaWindow) -> quotebridge_core::sma::Average {
        match self {
            Price::Exact(d) => window.push(d.to_f64(), Some(d)),
            Price::Inexact(p) => window.push(p, None),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn quotients_round_once(
        numerator in -(1i128 << 126)..(1i128 << 126),
        denominator in 1u128..(1u128 << 100),
    ) {
        let got = ratio_to_f64(numerator, denominator);
        let want = BigRational::new(BigInt::from(numerator), BigInt::from(denominator));
        prop_assert!(is_correctly_rounded(got, &want), "{numerator}/{denominator} gave {got:e}");
    }

    #[test]
    fn small_quotients_round_once(numerator in -(1i128 << 60)..(1i128 << 60), denominator in 1u128..100_000) {
        let got = ratio_to_f64(numerator, denominator);
        let want = BigRational::new(BigInt::from(numerator), BigInt::from(denominator));
        prop_assert!(is_correctly_rounded(got, &want), "{numerator}/{denominator} gave {got:e}");
    }

    #[test]
    fn a_decimal_spells_the_value_its_text_has(d in decimal(), exponent in -3i32..=3) {
        // The same value written with an exponent: units e(exponent - scale).
        let text = format!("{}e{}", d.units(), -i32::from(d.scale()));
        prop_assert_eq!(Decimal::parse(&text), Some(d));
        prop_assert_eq!(d.to_f64(), text.parse::<f64>().expect("a number"));
        prop_assert!(is_correctly_rounded(d.to_f64(), &rational(d)));
        let shifted = format!("{}e{}", d.units(), exponent - i32::from(d.scale()));
        if let Some(other) = Decimal::parse(&shifted) {
            let ten = BigRational::from_integer(BigInt::from(10));
            let factor = if exponent >= 0 { ten.pow(exponent) } else { ten.pow(-exponent).recip() };
            prop_assert_eq!(rational(other), rational(d) * factor);
        }
    }

    #[test]
    fn every_exact_mean_is_the_rational_mean_rounded_once(
        capacity in 1usize..=24,
        prices in prop::collection::vec(price(), 1..300),
    ) {
        let mut window = SmaWindow::new(NonZeroUsize::new(capacity).expect("non-zero"));
        let mut recent: VecDeque<Price> = VecDeque::new();
        for price in prices {
            if recent.len() == capacity {
                recent.pop_front();
            }
            recent.push_back(price);
            let average = price.push(&mut window);
            prop_assert_eq!(average.count, recent.len());
            let exact_prices: Option<Vec<Decimal>> = recent
                .iter()
                .map(|p| match p {
                    Price::Exact(d) => Some(*d),
                    Price::Inexact(_) => None,
                })
                .collect();
            match exact_prices {
                Some(decimals) => {
                    prop_assert!(average.exact);
                    let sum = decimals.iter().fold(BigRational::zero(), |sum, d| sum + rational(*d));
                    let mean = sum / BigRational::from_integer(BigInt::from(decimals.len()));
                    prop_assert!(
                        is_correctly_rounded(average.mean, &mean),
                        "mean {:e} of {:?} is not {} rounded", average.mean, decimals, mean
                    );
                }
                None => prop_assert!(!average.exact, "an inexact price is in the window"),
            }
        }
    }

    #[test]
    fn a_restored_window_continues_bit_for_bit(
        capacity in 1usize..=16,
        before in prop::collection::vec(price(), 0..40),
        after in prop::collection::vec(price(), 1..40),
    ) {
        let capacity = NonZeroUsize::new(capacity).expect("non-zero");
        let mut original = SmaWindow::new(capacity);
        for price in before {
            price.push(&mut original);
        }
        let state = serde_json::to_string(&original.state()).expect("serializes");
        let mut restored = SmaWindow::restore(capacity, serde_json::from_str(&state).expect("reads"));
        for price in after {
            let want = price.push(&mut original);
            let got = price.push(&mut restored);
            prop_assert_eq!(want.mean.to_bits(), got.mean.to_bits());
            prop_assert_eq!(want.exact, got.exact);
        }
    }
}

#[test]
fn a_mean_that_floats_cannot_print_prints_as_its_decimal() {
    let mut window = SmaWindow::new(NonZeroUsize::new(3).expect("non-zero"));
    let mut last = 0.0;
    for text in ["168.8", "168.8", "168.83"] {
        let d = Decimal::parse(text).expect("exact");
        last = window.push(d.to_f64(), Some(d)).mean;
    }
    // (168.8 + 168.8 + 168.83) / 3 = 168.81; a float sum says 168.81000000000003.
    assert_eq!(
        ((168.8f64 + 168.8 + 168.83) / 3.0).to_string(),
        "168.81000000000003"
    );
    assert_eq!(last.to_string(), "168.81");
}

#[test]
fn huge_then_tiny_prices_leave_no_residue() {
    let mut window = SmaWindow::new(NonZeroUsize::new(2).expect("non-zero"));
    let huge = Decimal::parse("999999999999999").expect("exact");
    let tiny = Decimal::parse("0.000000000000000001").expect("exact");
    window.push(huge.to_f64(), Some(huge));
    window.push(tiny.to_f64(), Some(tiny));
    let mean = window.push(tiny.to_f64(), Some(tiny));
    assert!(mean.exact);
    assert_eq!(mean.mean, 1e-18);
    // The scale fell back with the huge price gone, and rises again.
    let cents = Decimal::parse("0.01").expect("exact");
    let mean = window.push(cents.to_f64(), Some(cents));
    let want = BigRational::new(
        BigInt::from(50_000_000_000_000_005_u64),
        BigInt::from(10u8).pow(19),
    );
    assert!(
        mean.exact && is_correctly_rounded(mean.mean, &want),
        "{mean:?}"
    );
}

/// A trade for the candle property: `ts` advances by `gap`.
#[derive(Debug, Clone, Copy)]
struct Step {
    gap: u64,
    price: Decimal,
    volume: Option<Decimal>,
}

/// `realistic`: prices and volumes of up to 10 digits and 6 places, whose
/// products a bucket sums exactly (each below 10^32 at 12 places). Otherwise anything in the exact domain,
/// where a bucket's Σ price × volume may outgrow 38 digits.
fn step(realistic: bool) -> impl Strategy<Value = Step> {
    let prices = if realistic {
        (1i64..10_000_000_000, 0..=6u8)
            .prop_map(|(u, s)| Decimal::new(u, s).expect("inside the domain"))
            .boxed()
    } else {
        decimal().boxed()
    };
    let volumes = if realistic {
        (0i64..10_000_000_000, 0..=6u8).boxed()
    } else {
        (0i64..=999_999_999_999_999, 0..=MAX_SCALE).boxed()
    };
    (
        prop_oneof![3 => 0u64..2_000, 1 => 2_000u64..200_000],
        prices,
        prop::option::of(volumes),
    )
        .prop_map(|(gap, price, volume)| Step {
            gap,
            price,
            volume: volume.map(|(u, s)| Decimal::new(u, s).expect("inside the domain")),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Every candle's open, high, low and close are input prices exactly;
    /// its volume and VWAP are the exact sums and quotient rounded once.
    #[test]
    fn candles_are_exact(
        (realistic, steps) in any::<bool>()
            .prop_flat_map(|r| (Just(r), prop::collection::vec(step(r), 1..200))),
    ) {
        use quotebridge_core::series::Input;
        use quotebridge_core::series::candles::{Bar, Candles, Pushed};
        let interval = 60_000u64;
        let mut candles = Candles::new(std::num::NonZeroU64::new(interval).expect("non-zero"));
        let mut bars: Vec<Bar> = Vec::new();
        let mut ts = 1_764_599_400_000u64;
        // The oracle: the steps grouped by bucket, in order.
        let mut buckets: Vec<(u64, Vec<Step>)> = Vec::new();
        for step in &steps {
            ts += step.gap;
            let trade = Input {
                ts,
                price: step.price.to_f64(),
                decimal: Some(step.price),
                volume: step.volume.map(|v| (v.to_f64(), Some(v))),
            };
            match candles.push(&trade) {
                Pushed::Taken { closed, .. } => bars.extend(closed),
                Pushed::Late => prop_assert!(false, "time only advances"),
            }
            let bucket = ts - ts % interval;
            match buckets.last_mut() {
                Some((start, steps)) if *start == bucket => steps.push(*step),
                _ => buckets.push((bucket, vec![*step])),
            }
        }
        bars.extend(candles.open().cloned());
        prop_assert_eq!(bars.len(), buckets.len());
        for (bar, (start, steps)) in bars.iter().zip(&buckets) {
            prop_assert_eq!(bar.start_ms, *start);
            prop_assert_eq!(bar.trades, steps.len() as u64);
            let prices: Vec<f64> = steps.iter().map(|s| s.price.to_f64()).collect();
            prop_assert_eq!(bar.open, prices[0]);
            prop_assert_eq!(bar.close, prices[prices.len() - 1]);
            prop_assert_eq!(bar.high, prices.iter().copied().fold(f64::MIN, f64::max));
            prop_assert_eq!(bar.low, prices.iter().copied().fold(f64::MAX, f64::min));
            let zero = || Decimal::new(0, 0).expect("zero");
            let volume = steps.iter().fold(BigRational::zero(), |sum, s| {
                sum + rational(s.volume.unwrap_or_else(zero))
            });
            let turnover = steps.iter().fold(BigRational::zero(), |sum, s| {
                sum + rational(s.price) * rational(s.volume.unwrap_or_else(zero))
            });
            let got = bar.volume();
            prop_assert!(got.exact && is_correctly_rounded(got.value, &volume), "volume {:?} of {}", got, volume);
            match bar.vwap() {
                None => prop_assert!(volume.is_zero()),
                Some(vwap) => {
                    let want = turnover / volume;
                    prop_assert!(vwap.exact || !realistic, "realistic inputs give an exact VWAP");
                    if vwap.exact {
                        prop_assert!(is_correctly_rounded(vwap.value, &want), "vwap {:?} is not {}", vwap, want);
                    } else {
                        // Outside the exact sums: compensated, and said so.
                        let error = (exact(vwap.value) - &want).abs() / want.abs();
                        prop_assert!(error < BigRational::new(BigInt::from(1), BigInt::from(1_000_000_000u64)));
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Every time-window mean covers exactly the accepted quotes whose `ts`
    /// lies in `(t − window, t]`, and is their exact mean rounded once;
    /// quotes more than `lateness` behind are refused; a mean that lost
    /// points to `max_points` says so.
    #[test]
    fn time_window_means_are_exact(
        window in 1u64..5_000,
        lateness in 0u64..3_000,
        max_points in prop_oneof![Just(100_000usize), 1usize..20],
        quotes in prop::collection::vec((-2_500i64..1_500, price()), 1..150),
    ) {
        use quotebridge_core::series::timed::{TimePushed, TimeSma};
        let mut sma = TimeSma::new(std::num::NonZeroU64::new(window).expect("non-zero"), lateness, max_points);
        let mut clock = 10_000u64;
        let mut accepted: Vec<(u64, Price)> = Vec::new();
        let mut newest: Option<u64> = None;
        for (step, price) in quotes {
            // Mostly forward; a negative step is a quote that comes late.
            let ts = clock.saturating_add_signed(step);
            clock = clock.max(ts);
            let pushed = match price {
                Price::Exact(d) => sma.push(ts, d.to_f64(), Some(d)),
                Price::Inexact(p) => sma.push(ts, p, None),
            };
            let late = newest.is_some_and(|n| ts + lateness < n);
            let TimePushed::Mean(mean) = pushed else {
                prop_assert!(late, "{} refused with newest {:?}", ts, newest);
                continue;
            };
            prop_assert!(!late, "{} taken with newest {:?}", ts, newest);
            newest = Some(newest.map_or(ts, |n| n.max(ts)));
            accepted.push((ts, price));
            let in_window: Vec<Price> = accepted
                .iter()
                .filter(|(at, _)| *at <= ts && at + window > ts)
                .map(|(_, p)| *p)
                .collect();
            if !mean.complete {
                prop_assert!(mean.count < in_window.len());
                continue;
            }
            prop_assert_eq!(mean.count, in_window.len());
            let decimals: Option<Vec<Decimal>> = in_window
                .iter()
                .map(|p| match p {
                    Price::Exact(d) => Some(*d),
                    Price::Inexact(_) => None,
                })
                .collect();
            match decimals {
                Some(decimals) => {
                    prop_assert!(mean.exact);
                    let sum = decimals.iter().fold(BigRational::zero(), |s, d| s + rational(*d));
                    let want = sum / BigRational::from_integer(BigInt::from(decimals.len()));
                    prop_assert!(is_correctly_rounded(mean.mean, &want), "{:?} is not {}", mean, want);
                }
                None => prop_assert!(!mean.exact),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The rolling ticker covers exactly the accepted quotes in
    /// `[from, newest]`, `from` the first step boundary inside the window:
    /// open and last by `ts` (ties by arrival), high, low, trades, and the
    /// volume and change exact.
    #[test]
    fn rolling_tickers_cover_what_they_say(
        window in 100u64..5_000,
        step in 1u64..500,
        lateness in 0u64..1_000,
        quotes in prop::collection::vec((-1_200i64..400, decimal(), 0i64..1_000_000, 0..=6u8), 1..150),
    ) {
        use quotebridge_core::series::rolling::{Rolling, RollingPushed};
        let nz = |v: u64| std::num::NonZeroU64::new(v).expect("non-zero");
        let mut rolling = Rolling::new(nz(window), nz(step), lateness);
        let step = step.min(window);
        let mut clock = 100_000u64;
        let mut accepted: Vec<(u64, Decimal, Decimal)> = Vec::new();
        for (delta, price, volume_units, volume_scale) in quotes {
            let ts = clock.saturating_add_signed(delta);
            clock = clock.max(ts);
            let volume = Decimal::new(volume_units, volume_scale).expect("inside the domain");
            let pushed = rolling.push(ts, price.to_f64(), Some(price), Some((volume.to_f64(), Some(volume))));
            let newest = accepted.iter().map(|q| q.0).max();
            let from_of = |n: u64| n.checked_sub(window).map_or(0, |s| (s / step + 1) * step);
            let late = newest.is_some_and(|n| ts + lateness < n || ts < from_of(n.max(ts)));
            let RollingPushed::Ticker(ticker) = pushed else {
                prop_assert!(late, "{} refused", ts);
                continue;
            };
            prop_assert!(!late, "{} taken", ts);
            accepted.push((ts, price, volume));
            let newest = newest.map_or(ts, |n| n.max(ts));
            let from = from_of(newest);
            prop_assert_eq!(ticker.from_ms, from);
            let covered: Vec<&(u64, Decimal, Decimal)> =
                accepted.iter().filter(|q| q.0 >= from && q.0 <= newest).collect();
            prop_assert_eq!(ticker.trades, covered.len() as u64);
            let open = covered.iter().min_by_key(|q| q.0).expect("the quote itself");
            let last = covered.iter().max_by_key(|q| q.0).expect("the quote itself");
            prop_assert_eq!(ticker.open, open.1.to_f64());
            prop_assert_eq!(ticker.last, last.1.to_f64());
            let high = covered.iter().map(|q| q.1.to_f64()).fold(f64::MIN, f64::max);
            let low = covered.iter().map(|q| q.1.to_f64()).fold(f64::MAX, f64::min);
            prop_assert_eq!((ticker.high, ticker.low), (high, low));
            let volume = covered.iter().fold(BigRational::zero(), |s, q| s + rational(q.2));
            prop_assert!(ticker.volume.exact && is_correctly_rounded(ticker.volume.value, &volume));
            let change = rational(last.1) - rational(open.1);
            prop_assert!(ticker.change.exact && is_correctly_rounded(ticker.change.value, &change));
        }
    }
}
