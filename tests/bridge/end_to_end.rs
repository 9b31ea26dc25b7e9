//! End to end through real Redis: many quotes in, exactly the expected SMAs
//! out, on the output channel and on every socket, in order.

use serde_json::{Value, json};

use crate::support::*;

const SYMBOLS: usize = 50;
const QUOTES: usize = 10_000;
const CLIENTS: [&str; 2] = ["alpha", "beta"];

/// Quote `i`: one in four is private to alpha or beta; prices wander.
fn quote(i: usize) -> Value {
    let symbol = format!("SYM{:02}", i % SYMBOLS);
    let price = 100.0 + ((i * 7919) % 1000) as f64 / 8.0 + (i % SYMBOLS) as f64;
    let mut q = json!({"symbol": symbol, "price": price, "ts": 1_700_000_000_000u64 + i as u64});
    if i % 4 == 3 {
        q["client"] = CLIENTS[(i / 4) % 2].into();
    }
    q
}

#[tokio::test]
async fn ten_thousand_quotes_yield_exactly_the_expected_smas_everywhere() {
    let app = spawn_app().await;
    let window = app.settings.sma.window;
    let mut output = app.redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    let (mut public_watcher, _) = app.connect("gamma").await;
    let (mut alpha, _) = app.connect("alpha").await;
    let (mut beta, _) = app.connect("beta").await;

    // The reference: from-scratch means, in input order.
    let mut reference = ReferenceSma::default();
    let mut expected = Vec::new();
    let mut messages = Vec::with_capacity(QUOTES);
    for i in 0..QUOTES {
        let q = quote(i);
        let client = q["client"].as_str();
        let symbol = q["symbol"].as_str().expect("symbol");
        let price = q["price"].as_f64().expect("price");
        let (sma, count) = reference.push(client, symbol, price, window);
        if count == window {
            let mut want = json!({"symbol": symbol, "price": price, "sma": sma, "window": window, "count": count, "ts": q["ts"]});
            if let Some(c) = client {
                want["client"] = c.into();
            }
            expected.push(want);
        }
        messages.push(("quotes".to_owned(), q.to_string().into_bytes()));
    }
    let mut conn = app.redis.connection().await;
    publish_all(&mut conn, &messages).await;

    // Redis output channel: every expected SMA, in order.
    let mut published = Vec::with_capacity(expected.len());
    for want in &expected {
        let (channel, payload) = next_redis(&mut output).await;
        assert_eq!(channel, "sma");
        let got: Value = serde_json::from_str(&payload).expect("SMA is JSON");
        assert_sma(&got, want);
        published.push(payload);
    }

    // Sockets: gamma sees every public SMA; alpha and beta see the public ones
    // (default "*") plus their own private ones, never the other's. Each frame
    // is byte for byte what was published to Redis.
    for (socket, code) in [
        (&mut public_watcher, "gamma"),
        (&mut alpha, "alpha"),
        (&mut beta, "beta"),
    ] {
        let mut received = 0;
        for (want, bytes) in expected.iter().zip(&published) {
            let wanted = match want.get("client").and_then(Value::as_str) {
                None => true,
                Some(owner) => owner == code,
            };
            if wanted {
                assert_eq!(&next_text(socket).await, bytes, "socket of {code}");
                received += 1;
            }
        }
        assert!(received > 0);
    }
    let stats = app.stats().await;
    assert_eq!(stats["quotes_received"], QUOTES);
    assert_eq!(stats["smas_emitted"], expected.len());
    assert_eq!(stats["quotes_rejected"], 0);
    drop(output);
    app.shutdown().await;
}

#[tokio::test]
async fn per_symbol_output_channels_and_partial_windows() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__REDIS__OUTPUT", "sma.{symbol}"),
        ("QUOTEBRIDGE__SMA__EMIT_PARTIAL", "true"),
        ("QUOTEBRIDGE__SMA__WINDOW", "3"),
        ("QUOTEBRIDGE__REDIS__INPUT", "feed.*"),
    ])
    .await;
    let mut pubsub = app.redis.client().get_async_pubsub().await.expect("pubsub");
    pubsub.psubscribe("sma.*").await.expect("psubscribe");
    let mut output = pubsub.on_message();
    let mut conn = app.redis.connection().await;
    let quotes = [
        ("feed.us", "AAPL", 1.0),
        ("feed.eu", "SAP", 10.0),
        ("feed.us", "AAPL", 2.0),
        ("feed.us", "AAPL", 3.0),
        ("feed.us", "AAPL", 7.0),
    ];
    let messages: Vec<(String, Vec<u8>)> = quotes
        .iter()
        .map(|(ch, s, p)| {
            (
                (*ch).to_owned(),
                json!({"symbol": s, "price": p, "ts": 5})
                    .to_string()
                    .into_bytes(),
            )
        })
        .collect();
    publish_all(&mut conn, &messages).await;
    let want = [
        ("sma.AAPL", 1.0, 1),
        ("sma.SAP", 10.0, 1),
        ("sma.AAPL", 1.5, 2),
        ("sma.AAPL", 2.0, 3),
        ("sma.AAPL", 4.0, 3),
    ];
    for (channel, sma, count) in want {
        let (got_channel, payload) = next_redis(&mut output).await;
        let got: Value = serde_json::from_str(&payload).expect("json");
        assert_eq!(got_channel, channel);
        assert_eq!(
            (
                got["sma"].as_f64(),
                got["count"].as_u64(),
                got["window"].as_u64()
            ),
            (Some(sma), Some(count), Some(3))
        );
    }
    drop(output);
    app.shutdown().await;
}

#[tokio::test]
async fn quotes_without_ts_are_stamped_with_arrival_time() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__SMA__WINDOW", "1")]).await;
    let mut output = app.redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    let before = now_ms();
    let mut conn = app.redis.connection().await;
    publish_all(
        &mut conn,
        &[("quotes".into(), br#"{"symbol":"AAPL","price":1}"#.to_vec())],
    )
    .await;
    let (_, payload) = next_redis(&mut output).await;
    let ts = serde_json::from_str::<Value>(&payload).expect("json")["ts"]
        .as_u64()
        .expect("ts");
    assert!(
        ts >= before && ts <= now_ms(),
        "ts {ts} is not the arrival time"
    );
    drop(output);
    app.shutdown().await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// A mean is the exact mean of the decimals the producers wrote, rounded
/// once: `(168.8 + 168.8 + 168.83) / 3` is written `168.81` where a float
/// sum would say `168.81000000000003`. A price outside the exact domain is
/// still averaged, and the result is counted as inexact.
#[tokio::test]
async fn means_are_the_exact_decimal_means() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__SMA__WINDOW", "3")]).await;
    let mut output = app.redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    let mut conn = app.redis.connection().await;
    let quotes = [
        r#"{"symbol":"X","price":168.8,"ts":1}"#,
        r#"{"symbol":"X","price":168.80,"ts":2}"#,
        r#"{"symbol":"X","price":1.6883e2,"ts":3}"#,
        // Twenty significant digits: outside the exact domain.
        r#"{"symbol":"X","price":168.81000000000000001,"ts":4}"#,
    ];
    let messages: Vec<_> = quotes
        .iter()
        .map(|q| ("quotes".to_owned(), q.as_bytes().to_vec()))
        .collect();
    publish_all(&mut conn, &messages).await;
    let (_, third) = next_redis(&mut output).await;
    assert!(third.contains(r#""sma":168.81,"#), "{third}");
    let (_, fourth) = next_redis(&mut output).await;
    let fourth: Value = serde_json::from_str(&fourth).expect("JSON");
    assert!((fourth["sma"].as_f64().expect("a mean") - 168.8133).abs() < 1e-3);
    let stats = app
        .wait_for_stats("one inexact mean", |s| s["smas_emitted"] == 2)
        .await;
    assert_eq!(stats["smas_inexact"], 1, "{stats}");
}
