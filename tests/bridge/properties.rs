//! Properties over random input: the SMA equals a from-scratch mean, and the
//! quote parser never panics and accepts exactly what it should.

use std::num::NonZeroUsize;
use std::sync::Arc;

use proptest::prelude::*;
use quotebridge::config::Settings;
use quotebridge::decimal::Decimal;
use quotebridge::pipeline::{Outcome, Pipeline};
use quotebridge::protocol::{ResultRoute, SmaMessage};
use quotebridge::quote::{self, Quote};
use quotebridge::sma::SmaWindow;
use quotebridge::stats::Stats;

proptest! {
    #[test]
    fn sma_equals_the_mean_of_the_last_window_prices(
        window in 1usize..64,
        prices in prop::collection::vec(-1e9f64..1e9, 1..400),
    ) {
        let mut sma = SmaWindow::new(NonZeroUsize::new(window).expect("non-zero"));
        for (i, &price) in prices.iter().enumerate() {
            let got = sma.push(price, None);
            let tail = &prices[(i + 1).saturating_sub(window)..=i];
            let want = tail.iter().sum::<f64>() / tail.len() as f64;
            let scale = tail.iter().map(|p| p.abs()).sum::<f64>() / tail.len() as f64;
            prop_assert_eq!(got.count, tail.len());
            prop_assert!((got.mean - want).abs() <= 1e-9 * scale.max(1e-300), "{} vs {}", got.mean, want);
        }
    }

    /// Whatever came before (overflowing prices included), once the window
    /// holds only ordinary prices its mean is their mean again.
    #[test]
    fn any_history_then_a_window_of_ordinary_prices_gives_their_mean(
        window in 1usize..32,
        history in prop::collection::vec(
            prop_oneof![
                Just(f64::MAX),
                Just(-f64::MAX),
                Just(1.797_693_134_862_315_7e308),
                (-1e308f64..1e308),
                any::<f64>().prop_filter("finite", |p| p.is_finite()),
                (-1e6f64..1e6),
            ],
            0..100,
        ),
        ordinary in prop::collection::vec(-1e6f64..1e6, 32),
    ) {
        let mut sma = SmaWindow::new(NonZeroUsize::new(window).expect("non-zero"));
        for &price in &history {
            sma.push(price, None);
        }
        let tail = &ordinary[..window];
        let mut got = None;
        for &price in tail {
            got = Some(sma.push(price, None));
        }
        let got = got.expect("the window is at least 1");
        let want = tail.iter().sum::<f64>() / window as f64;
        let scale = tail.iter().map(|p| p.abs()).sum::<f64>() / window as f64;
        prop_assert_eq!(got.count, window);
        prop_assert!(got.mean.is_finite(), "mean stayed {} after the history {:?}", got.mean, history);
        prop_assert!((got.mean - want).abs() <= 1e-9 * scale.max(1e-300), "{} vs {}", got.mean, want);
    }

    #[test]
    fn the_parser_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = quote::parse(&bytes);
    }

    #[test]
    fn the_parser_never_panics_on_json_like_text(text in r#"\{("(symbol|price|ts|client|x)":(-?[0-9.eE+]{0,12}|"[^"]{0,40}"|null|true|\[\]|\{\}),?){0,6}\}"#) {
        let _ = quote::parse(text.as_bytes());
    }

    #[test]
    fn the_fast_path_agrees_with_the_full_parser(
        text in r#"\s?\{\s?("(symbol|price|ts|client|x)"\s?:\s?(-?[0-9]{0,3}(\.[0-9]{0,3})?([eE][+-]?[0-9]{0,3})?|"[A-Za-z0-9 ._\\-]{0,8}"|null|0[0-9]),?\s?){0,5}\}\s?"#,
    ) {
        // Where the fast path accepts, it must agree (a fast path that
        // always declined would pass `parse == parse_fully` trivially).
        if let Some((fast, _)) = quote::parse_fast(text.as_bytes()) {
            prop_assert_eq!(Ok(fast), quote::parse_fully(text.as_bytes()));
        }
        prop_assert_eq!(quote::parse(text.as_bytes()), quote::parse_fully(text.as_bytes()));
    }

    /// Producer-shaped quotes (what serde_json writes for a finite price)
    /// always take the fast path, and it reads them as the full parser does.
    #[test]
    fn the_fast_path_takes_every_producer_shaped_quote(
        symbol in "[A-Za-z0-9._:/-]{1,32}",
        price in prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO,
        ts in prop::option::of(any::<u64>()),
        client in prop::option::of("[A-Za-z0-9_-]{1,64}"),
        volume in prop::option::of(0.0f64..1e12),
    ) {
        let decimal = Decimal::parse(&price.to_string());
        let volume_decimal = volume.and_then(|v| Decimal::parse(&v.to_string()));
        let q = Quote { symbol: symbol.as_str().into(), price, decimal, ts, client: client.as_deref().map(Into::into), volume, volume_decimal };
        let json = serde_json::to_vec(&q).expect("serialize");
        let fast = quote::parse_fast(&json).map(|(quote, _)| quote);
        prop_assert!(fast.is_some(), "declined {}", String::from_utf8_lossy(&json));
        prop_assert_eq!(fast.map(Ok), Some(quote::parse_fully(&json)));
    }

    #[test]
    fn the_fast_path_agrees_on_generated_quotes(
        symbol in "[A-Za-z0-9._:/-]{1,32}",
        price in any::<f64>(),
        ts in prop::option::of(any::<u64>()),
        client in prop::option::of("[A-Za-z0-9_-]{1,64}"),
    ) {
        let mut text = format!(r#"{{"symbol":"{symbol}","price":{price:e}"#);
        if let Some(ts) = ts { text.push_str(&format!(r#","ts":{ts}"#)); }
        if let Some(client) = &client { text.push_str(&format!(r#","client":"{client}""#)); }
        text.push('}');
        prop_assert_eq!(quote::parse(text.as_bytes()), quote::parse_fully(text.as_bytes()));
    }

    #[test]
    fn decimal_prices_parse_to_the_same_bits_on_both_paths(
        price in r"-?(0|[1-9][0-9]{0,16})(\.[0-9]{1,17})?",
    ) {
        // Up to 15 digits take the fast path's exact-division shortcut;
        // longer ones the general algorithm. Both must round like serde_json.
        let text = format!(r#"{{"symbol":"A","price":{price}}}"#);
        let bits = |q: Result<quote::Quote<'_>, _>| q.map(|q| (q.price.to_bits(), q.decimal));
        prop_assert_eq!(bits(quote::parse(text.as_bytes())), bits(quote::parse_fully(text.as_bytes())));
    }

    #[test]
    fn every_valid_quote_round_trips(
        symbol in "[A-Za-z0-9._:/-]{1,32}",
        price in prop::num::f64::NORMAL | prop::num::f64::ZERO,
        ts in prop::option::of(any::<u64>()),
        client in prop::option::of("[A-Za-z0-9_-]{1,64}"),
        volume in prop::option::of(0.0f64..1e12),
    ) {
        let decimal = Decimal::parse(&price.to_string());
        let volume_decimal = volume.and_then(|v| Decimal::parse(&v.to_string()));
        let q = Quote { symbol: symbol.as_str().into(), price, decimal, ts, client: client.as_deref().map(Into::into), volume, volume_decimal };
        let json = serde_json::to_vec(&q).expect("serialize");
        prop_assert_eq!(quote::parse(&json), Ok(q));
    }
}

proptest! {
    /// A result copies a quote's price and ts as the payload spelled them
    /// when that is how it would write them anyway: the frame must be the
    /// very bytes that formatting the values gives.
    #[test]
    fn a_result_that_copies_the_spelled_numbers_is_the_formatted_one(
        price in prop_oneof![
            r"-?(0|[1-9][0-9]{0,9})(\.[0-9]{1,8})?",
            // Near the edges of the copied form: small, and 15 digits.
            r"-?0\.0{0,6}[1-9][0-9]{0,9}",
            r"-?[1-9][0-9]{10,15}\.[0-9]{1,4}",
        ],
        ts in any::<u64>(),
    ) {
        let mut settings = Settings::defaults().expect("defaults load");
        settings.sma.emit_partial = true;
        let mut pipeline = Pipeline::new(&settings, Arc::new(Stats::default()));
        let payload = format!(r#"{{"symbol":"A","price":{price},"ts":{ts}}}"#);
        let Outcome::Accepted { sma: Some(sma) } = pipeline.process(payload.as_bytes()) else {
            panic!("{payload} is a valid quote");
        };
        // The mean as sent (it is not always the price: -0 + 0 is 0).
        let sent: serde_json::Value = serde_json::from_str(sma.frame.as_str()).expect("JSON");
        let position = sma.frame.position().expect("a position");
        let formatted = SmaMessage {
            symbol: "A",
            price: price.parse().expect("a number"),
            sma: sent["sma"].as_f64().expect("a mean"),
            window: settings.sma.window,
            count: 1,
            ts,
            seq: position.seq,
            epoch: position.epoch,
            client: None,
        }
        .encode();
        prop_assert_eq!(sma.frame.as_str(), formatted.as_str());
    }
}

/// The usual price and every ts are copied, not formatted again; what zmij
/// would write otherwise (`420.0`, `1e-6`, no trailing zeros) is not.
#[test]
fn usual_prices_and_every_ts_are_spelled_as_sent() {
    let spelled = |price: &str| {
        let payload = format!(r#"{{"symbol":"A","price":{price},"ts":1764115200123}}"#);
        let (_, spelling) = quote::parse_spelled(payload.as_bytes()).expect("valid");
        assert_eq!(spelling.ts, Some("1764115200123"));
        spelling.price.map(str::to_owned)
    };
    for usual in ["187.42", "-0.5", "0.00001", "99999999999999.9", "0.1"] {
        assert_eq!(spelled(usual).as_deref(), Some(usual));
    }
    for formatted in [
        "420",
        "0.10",
        "0.000001",
        "-0.0",
        "1e3",
        "1234567890.1234567",
    ] {
        assert_eq!(spelled(formatted), None, "{formatted}");
    }
}

proptest! {
    /// Results as the bridge writes them: wherever the one-scan route
    /// reader answers, it answers as serde_json does, and it answers for
    /// the usual result.
    #[test]
    fn written_results_are_routed_as_serde_json_reads_them(
        symbol in "[A-Za-z0-9._:/-]{1,32}",
        cents in 1u64..100_000_000,
        price in any::<f64>(),
        sma in any::<f64>(),
        window in any::<usize>(),
        count in any::<usize>(),
        ts in any::<u64>(),
        seq in any::<u64>(),
        epoch in "[A-Za-z0-9_-]{1,32}",
        client in prop::option::of("[A-Za-z0-9_-]{1,64}"),
    ) {
        for (price, usual) in [(cents as f64 / 100.0, true), (price, false)] {
            let message = SmaMessage {
                symbol: &symbol, price, sma: price, window, count, ts, seq, epoch: &epoch,
                client: client.as_deref(),
            };
            for message in [message.clone(), SmaMessage { sma, ..message }] {
                let frame = message.encode();
                let scanned = ResultRoute::scanned(frame.as_str());
                let parsed = ResultRoute::parsed(frame.as_str());
                prop_assert!(parsed.is_some(), "{}", frame.as_str());
                if usual && message.sma == price {
                    prop_assert!(scanned.is_some(), "the usual result is scanned: {}", frame.as_str());
                }
                if scanned.is_some() {
                    prop_assert_eq!(scanned, parsed, "{}", frame.as_str());
                }
            }
        }
    }

    /// Near misses of that layout: a written result with a character or
    /// two replaced, inserted or removed (escapes, control characters,
    /// exponents, leading zeros, stray bytes). The scan answers as
    /// serde_json does, or leaves the message to it.
    #[test]
    fn mangled_results_are_routed_as_serde_json_reads_them_or_left_to_it(
        cents in 0u64..100_000_000,
        seq in any::<u64>(),
        client in prop::option::of("[a-z]{1,3}"),
        edits in prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                prop::sample::select(vec![
                    '0', '1', '9', '-', '+', '.', 'e', 'E', '"', '\\', '\u{1}', '}', ',', ' ',
                    'n', 'é', ':',
                ]),
                0u8..3,
            ),
            1..3,
        ),
    ) {
        let frame = SmaMessage {
            symbol: "AB", price: cents as f64 / 100.0, sma: cents as f64 / 300.0, window: 10,
            count: 7, ts: 1_764_115_200_000, seq, epoch: "e1", client: client.as_deref(),
        }
        .encode();
        let mut chars: Vec<char> = frame.as_str().chars().collect();
        for (at, ch, how) in edits {
            let at = at.index(chars.len());
            match how {
                0 => chars[at] = ch,
                1 => chars.insert(at, ch),
                _ => {
                    chars.remove(at);
                }
            }
        }
        let text: String = chars.into_iter().collect();
        if let Some(scanned) = ResultRoute::scanned(&text) {
            prop_assert_eq!(Some(scanned), ResultRoute::parsed(&text), "{}", text);
        }
    }
}
