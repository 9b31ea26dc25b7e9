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

/// `wanted` quotes, or more if this machine's TCP buffers could hold that
/// many results of a stalled socket: the outbox must overflow for the test
/// to mean anything. The kernel holds at most the send buffer's limit
/// (tcp_wmem's maximum, 4 MiB by default: about 42,000 results of ~100
/// bytes) plus the 4 KiB window, and the outbox 4,096 frames.
fn quotes_past_the_kernel(wanted: usize) -> usize {
    const SMALLEST_FRAME: usize = 100;
    let tcp_wmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .expect("read /proc/sys/net/ipv4/tcp_wmem");
    let max_send_buffer: usize = tcp_wmem
        .split_whitespace()
        .nth(2)
        .and_then(|max| max.parse().ok())
        .expect("tcp_wmem has a maximum");
    let held = (max_send_buffer + 8192) / SMALLEST_FRAME + 4096;
    // Whole thousands (the load's chunks) and whole rounds of the keys.
    wanted.max((held + 5_000).div_ceil(1000) * 1000)
}

/// The case: one socket of 100 stops reading for 5 s while 10,000
/// results a second flow (a little longer where the kernel could otherwise
/// absorb them all: 5.2 s with Linux's default buffers). It takes every result (`"*"`, 100 keys); each of
/// the other 99 takes 5 keys' results, so that every key goes to about five
/// readers and a debug build on two cores delivers it all in time. (Every
/// result to all 100 sockets, a million frames a second, is what the
/// `slow-fanout` benchmark measures, with the readers' latency.)
#[tokio::test]
async fn a_socket_that_stops_reading_is_conflated_not_closed_and_catches_up_with_every_key() {
    const KEYS: usize = 100;
    const READERS: usize = 99;
    const KEYS_PER_READER: usize = 5;
    const PER_SECOND: usize = 10_000;
    let quotes = quotes_past_the_kernel(5 * PER_SECOND);
    /// The configured outbox bound (the default).
    const SEND_QUEUE_BYTES: u64 = 1024 * 1024;
    /// A result here is under 128 bytes.
    const FRAME_BYTES: u64 = 128;

    let redis = RedisServer::start().await;
    let serve = Serve::start(
        &redis,
        &[
            ("QUOTEBRIDGE__SMA__WINDOW", "1"),
            ("QUOTEBRIDGE__WEBSOCKET__DEFAULT_SYMBOLS", ""),
            // The stall lasts as long as publishing takes: 5 s at the
            // intended rate, longer on a loaded machine. A generous write
            // timeout keeps a slow run from ending it (the timeout has a
            // test of its own).
            ("QUOTEBRIDGE__WEBSOCKET__WRITE_TIMEOUT_MS", "120000"),
        ],
    )
    .await;
    let mut stalled = small_window_socket(serve.address, "stalled").await;
    assert_eq!(next_json(&mut stalled).await["type"], "welcome");
    send_json(&mut stalled, json!({"op": "subscribe", "symbols": ["*"]})).await;
    assert_eq!(next_json(&mut stalled).await["type"], "subscribed");
    let readers = crate::binary::counting_sockets(&serve, READERS, |i| {
        let keys = (0..KEYS_PER_READER).map(|k| format!("S{}", (i * KEYS_PER_READER + k) % KEYS));
        Some(keys.collect())
    })
    .await;
    let mut conn = redis.connection().await;
    let load = crate::binary::Load {
        quotes,
        keys: KEYS,
        per_second: Some(PER_SECOND),
    };
    // Whole chunks are whole rounds of the keys: each reader has had
    // exactly its keys' share of them.
    let share = |published: usize| published / KEYS * KEYS_PER_READER;
    let peaks = crate::binary::publish_keeping_up(&serve, &mut conn, &load, &readers, share).await;
    for count in &readers {
        assert_eq!(
            count.load(Ordering::Relaxed),
            share(quotes),
            "the readers get 100%"
        );
    }
    let stats = serve.stats().await;
    eprintln!(
        "peak RSS {} KiB, peak queued {} bytes; stats {stats}",
        peaks.rss_kib, peaks.queued_bytes
    );
    assert_eq!(stats["sockets"], READERS + 1, "nobody closed: {stats}");
    assert_eq!(stats["slow_consumer_closes"], 0, "{stats}");
    assert_eq!(stats["write_timeouts"], 0, "{stats}");
    assert!(
        stats["frames_conflated"].as_u64() > Some(0),
        "it conflated: {stats}"
    );
    // What the stalled socket's outbox held (the readers' were empty when
    // the gauge was read): its queue's bound, and one frame per key beyond.
    let bound = SEND_QUEUE_BYTES + KEYS as u64 * FRAME_BYTES;
    assert!(
        peaks.queued_bytes <= bound,
        "{} bytes queued, over the {bound}-byte bound",
        peaks.queued_bytes
    );

    // Reading again, it is told it was conflated and catches up with the
    // latest of every key; per key, seq only goes up.
    let final_seq = (quotes / KEYS) as u64;
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
    assert_eq!(stats["queued_bytes"], 0, "all delivered: {stats}");
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
