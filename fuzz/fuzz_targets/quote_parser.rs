//! Arbitrary bytes on the input channel: the parser must never panic, its
//! fast path must agree with the full parser, and whatever it accepts must
//! satisfy the contract and survive a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quotebridge::names;
use quotebridge::quote;

fuzz_target!(|payload: &[u8]| {
    // Wherever the single-scan fast path accepts, it must agree with the
    // full parser, bit for bit (asked directly: `parse == parse_fully`
    // alone would hold for a fast path that always declined).
    if let Some((fast, spelling)) = quote::parse_fast(payload) {
        let full = quote::parse_fully(payload).expect("the full parser accepts it too");
        assert_eq!(fast, full);
        assert_eq!(fast.price.to_bits(), full.price.to_bits());
        // A result copies these instead of formatting the numbers: they
        // must say the same values.
        if let Some(text) = spelling.price {
            assert_eq!(text.parse::<f64>().map(f64::to_bits), Ok(fast.price.to_bits()));
        }
        assert_eq!(spelling.ts.map(str::parse::<u64>), fast.ts.map(Ok));
    }
    assert_eq!(quote::parse(payload), quote::parse_fully(payload));
    // Equal as numbers is not enough (0.0 == -0.0): the same bits.
    let bits = |q: Result<quote::Quote<'_>, _>| q.map(|q| q.price.to_bits());
    assert_eq!(bits(quote::parse(payload)), bits(quote::parse_fully(payload)));
    if let Ok(q) = quote::parse(payload) {
        assert!(names::is_symbol(&q.symbol));
        assert!(q.price.is_finite());
        assert!(q.client.as_deref().is_none_or(names::is_client_code));
        let encoded = serde_json::to_vec(&q).expect("an accepted quote encodes");
        assert_eq!(quote::parse(&encoded).as_ref(), Ok(&q));
    }
});
