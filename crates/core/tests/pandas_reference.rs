//! The EMA against pandas, bit for bit: tests/reference/ema.csv holds
//! pandas' `ewm(span, adjust=False).mean()` of real-looking and of
//! adversarial price sequences (tests/reference/pandas_ema.py writes it).

use std::collections::HashMap;
use std::num::NonZeroU32;

use quotebridge_core::series::ema::Ema;

const REFERENCE: &str = include_str!("reference/ema.csv");

#[test]
fn every_ema_is_bit_identical_to_pandas() {
    let mut emas: HashMap<(&str, u32), Ema> = HashMap::new();
    let mut compared = 0;
    for (line, row) in REFERENCE.lines().enumerate().skip(1) {
        let fields: Vec<&str> = row.split(',').collect();
        let [symbol, span, price, want] = fields[..] else {
            panic!("line {}: four fields expected: {row}", line + 1);
        };
        let span: u32 = span.parse().expect("a span");
        let price: f64 = price.parse().expect("a price");
        let want: f64 = want.parse().expect("an EMA");
        let ema = emas
            .entry((symbol, span))
            .or_insert_with(|| Ema::new(NonZeroU32::new(span).expect("non-zero")));
        let got = ema.push(price);
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "line {}: {symbol} span {span}: {got:?}, pandas {want:?}",
            line + 1
        );
        compared += 1;
    }
    assert!(compared > 9_000, "the reference has {compared} rows");
}
