//! Conflation: a socket that stops reading is kept, with the latest result
//! of each key, instead of being cut off; everyone else gets everything.
//! And a subscription's `max_rate`: the newest value of a key, at most so
//! often.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use crate::binary::Serve;
use crate::support::*;

/// A WebSocket whose receive buffer is small, so that when it stops
/// reading the bridge, not the kernel, holds what it has not read.
async fn small_window_socket(address: std::net::SocketAddr, code: &str) -> Socket {
    let tcp = tokio::net::TcpSocket::new_v4().expect("a socket");
    tcp.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = within("connect", tcp.connect(address))
        .await
        .expect("connect");
    let url = format!("ws://{address}/ws/{code}");
    let (socket, _) = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("handshake");
    socket
}

#[tokio::test]
async fn a_socket_that_stops_reading_is_conflated_not_closed_and_catches_up_with_every_key() {
    const KEYS: usize = 100;
    const QUOTES: usize = 100_000;
    const HEALTHY: usize = 5;
    /// As in the slow-consumer test: what the bridge may grow by while a
    /// socket's outbox is full (one frame per key beyond it here).
    const RSS_GROWTH_BOUND_KIB: u64 = 64 * 1024;

    let redis = RedisServer::start().await;
    let serve = Serve::start(
        &redis,
        &[
            ("QUOTEBRIDGE__SMA__WINDOW", "1"),
            // The pause lasts as long as publishing takes here, not a
            // fixed 5 s: the write timeout must not end it.
            ("QUOTEBRIDGE__WEBSOCKET__WRITE_TIMEOUT_MS", "600000"),
        ],
    )
    .await;
    let mut stalled = small_window_socket(serve.address, "stalled").await;
    assert_eq!(next_json(&mut stalled).await["type"], "welcome");
    let received = crate::binary::counting_sockets(&serve, HEALTHY).await;
    let rss_before = serve.rss_kib();
    let mut conn = redis.connection().await;
    // Healthy readers are never more than a chunk (2,000 frames, well
    // within the default queue of 4,096) behind, however slow the machine;
    // the stalled one falls ~11 MB behind: more than the kernel buffers.
    let peak = crate::binary::publish_keeping_up(&serve, &mut conn, QUOTES, KEYS, &received).await;
    for count in &received {
        assert_eq!(
            count.load(Ordering::Relaxed),
            QUOTES,
            "healthy sockets get 100%"
        );
    }
    let stats = serve.stats().await;
    assert_eq!(stats["sockets"], HEALTHY + 1, "nobody closed: {stats}");
    assert_eq!(stats["slow_consumer_closes"], 0, "{stats}");
    assert!(
        stats["frames_conflated"].as_u64() > Some(0),
        "it conflated: {stats}"
    );
    let growth = peak.saturating_sub(rss_before);
    eprintln!("RSS before {rss_before} KiB, peak {peak} KiB; stats {stats}");
    assert!(
        growth <= RSS_GROWTH_BOUND_KIB,
        "RSS grew by {growth} KiB, over the {RSS_GROWTH_BOUND_KIB} KiB bound"
    );

    // Reading again, it is told it was conflated and catches up with the
    // latest of every key; per key, seq only goes up.
    let final_seq = (QUOTES / KEYS) as u64;
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let mut notices = 0;
    while last.len() < KEYS || last.values().any(|seq| *seq < final_seq) {
        let frame = next_json(&mut stalled).await;
        if frame["type"] == "conflated" {
            crate::schemas::assert_valid("conflated", &frame);
            notices += 1;
            continue;
        }
        let symbol = frame["symbol"].as_str().expect("an SMA").to_owned();
        let seq = frame["seq"].as_u64().expect("seq");
        let before = last.insert(symbol.clone(), seq);
        assert!(before < Some(seq), "{symbol}: {before:?} then {seq}");
    }
    assert!(
        notices > 0,
        "a conflated notice came before the latest values"
    );
    let stats: Value = serve.stats().await;
    assert!(stats["conflations"].as_u64() >= Some(1), "{stats}");
    drop(stalled);
}

#[tokio::test]
async fn a_subscription_with_max_rate_gets_the_newest_value_at_most_that_often() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__SMA__WINDOW", "1")]).await;
    let (mut socket, _) = app.connect("acme").await;
    let limited = json!({"op": "subscribe", "symbols": ["AAPL"], "max_rate": 2});
    crate::schemas::assert_valid("client-request", &limited);
    send_json(&mut socket, limited).await;
    assert_eq!(next_json(&mut socket).await["type"], "subscribed");
    for bad in [json!(0), json!(-1), json!(1e9), json!("2")] {
        send_json(
            &mut socket,
            json!({"op": "subscribe", "symbols": ["X"], "max_rate": bad}),
        )
        .await;
        assert_eq!(
            next_json(&mut socket).await["type"],
            "error",
            "max_rate {bad}"
        );
    }

    // A burst of 200 results each: AAPL is limited by name, MSFT (through
    // "*") is not.
    let quotes: Vec<(String, Vec<u8>)> = (1..=200)
        .flat_map(|n| {
            ["AAPL", "MSFT"].map(|symbol| {
                let quote = json!({"symbol": symbol, "price": n});
                ("quotes".to_owned(), quote.to_string().into_bytes())
            })
        })
        .collect();
    publish_all(&mut app.redis.connection().await, &quotes).await;
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    while seqs.get("MSFT").map_or(0, Vec::len) < 200
        || seqs.get("AAPL").and_then(|s| s.last()) != Some(&200)
    {
        let frame = next_json(&mut socket).await;
        let symbol = frame["symbol"].as_str().expect("an SMA").to_owned();
        seqs.entry(symbol)
            .or_default()
            .push(frame["seq"].as_u64().expect("seq"));
    }
    let aapl = &seqs["AAPL"];
    assert!(
        aapl.windows(2).all(|w| w[0] < w[1]),
        "newer each time: {aapl:?}"
    );
    assert!(aapl.len() < 200, "the burst was thinned: {aapl:?}");
    assert_eq!(
        seqs["MSFT"],
        (1..=200).collect::<Vec<u64>>(),
        "MSFT: every result"
    );
    assert!(app.stats().await["frames_conflated"].as_u64() > Some(0));
    app.shutdown().await;
}
