//! Redis going away: restarts, silent connection death. The bridge stays up,
//! keeps its sockets open, resubscribes and processes what comes after.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

/// Publishes a quote for symbol BG every few milliseconds, through restarts,
/// so Redis goes away while quotes flow.
fn background_flow(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = redis::Client::open(url).expect("url");
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let quote = format!(r#"{{"symbol":"BG","price":{i},"ts":{i}}}"#);
                    let sent: redis::RedisResult<()> = redis::cmd("PUBLISH")
                        .arg("quotes")
                        .arg(quote)
                        .query_async(&mut conn)
                        .await;
                    if sent.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Publishes 50 quotes of `symbol` and checks that each one's SMA reaches
/// both the output channel and the socket (skipping background traffic).
async fn quotes_flow_through(app: &TestApp, socket: &mut Socket, symbol: &str) {
    let mut pubsub = app.redis.subscribe(&["sma"]).await;
    let mut output = pubsub.on_message();
    let mut conn = app.redis.connection().await;
    let quotes: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| {
            (
                "quotes".to_owned(),
                format!(r#"{{"symbol":"{symbol}","price":{i},"ts":{i}}}"#).into_bytes(),
            )
        })
        .collect();
    publish_all(&mut conn, &quotes).await;
    // One bound for all: background traffic keeps each read short, so a
    // lost result must not leave the loops below waiting forever.
    within(
        &format!("{symbol}'s 50 SMAs on Redis and the socket"),
        async {
            read_symbol_through(&mut output, socket, symbol).await;
        },
    )
    .await;
}

async fn read_symbol_through(
    output: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin),
    socket: &mut Socket,
    symbol: &str,
) {
    for i in 0..50 {
        let got = loop {
            let (_, payload) = next_redis(output).await;
            let got: Value = serde_json::from_str(&payload).expect("json");
            if got["symbol"] == symbol {
                break got;
            }
        };
        assert_eq!(got["price"].as_f64(), Some(f64::from(i)));
        let frame = loop {
            let frame = next_json(socket).await;
            if frame["symbol"] == symbol {
                break frame;
            }
        };
        assert_eq!(frame["price"].as_f64(), Some(f64::from(i)));
    }
}

#[tokio::test]
async fn the_bridge_survives_three_redis_restarts_with_its_sockets_open() {
    let mut app = spawn_app_with(&[("QUOTEBRIDGE__SMA__WINDOW", "1")]).await;
    let (mut socket, _) = app.connect("acme").await;
    let stop = Arc::new(AtomicBool::new(false));
    let flow = background_flow(app.redis.url(), stop.clone());
    quotes_flow_through(&app, &mut socket, "R0").await;

    for round in 1..=3u64 {
        app.redis.kill();
        eventually("/readyz to report the outage", async || {
            (app.get("/readyz").await.0 == 503).then_some(())
        })
        .await;
        app.redis.start_again().await;
        let answering = Instant::now();
        app.wait_for_stats("the bridge to resubscribe", |s| {
            s["redis_resubscribes"] == round
        })
        .await;
        // Reported, not asserted: speed is the benchmark's business.
        eprintln!(
            "round {round}: resubscribed {:?} after Redis answered again",
            answering.elapsed()
        );
        assert_eq!(app.get("/readyz").await.0, 200);
        // The same socket, still open, gets everything published from now on.
        quotes_flow_through(&app, &mut socket, &format!("R{round}")).await;
    }
    stop.store(true, Ordering::Relaxed);
    flow.await.expect("background flow");
    let stats = app.stats().await;
    assert_eq!(stats["sockets"], 1, "the socket stayed open throughout");
    app.shutdown().await;
}

#[tokio::test]
async fn a_silently_dead_subscriber_connection_is_detected_and_replaced() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__SMA__WINDOW", "1"),
        ("QUOTEBRIDGE__REDIS__HEALTH_CHECK_INTERVAL_MS", "100"),
        ("QUOTEBRIDGE__REDIS__HEALTH_CHECK_TIMEOUT_MS", "200"),
    ])
    .await;
    let (mut socket, _) = app.connect("acme").await;
    // While paused, Redis accepts bytes but answers nothing: to the bridge the
    // connection looks alive but is not — a half-open connection.
    let mut conn = app.redis.connection().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .expect("pause");
    app.wait_for_stats("the dead connection to be replaced", |s| {
        s["redis_resubscribes"] == 1
    })
    .await;
    quotes_flow_through(&app, &mut socket, "AFTER").await;
    app.shutdown().await;
}

#[tokio::test]
async fn the_bridge_starts_before_redis_and_becomes_ready_when_it_answers() {
    // A server on a port, killed at once: the bridge starts against a dead port.
    let mut redis = RedisServer::start().await;
    redis.kill();
    let mut app = spawn_app_on(redis, &[("QUOTEBRIDGE__SMA__WINDOW", "1")]);
    eventually("the HTTP side to answer", async || {
        tokio::net::TcpStream::connect(app.address)
            .await
            .ok()
            .map(drop)
    })
    .await;
    assert_eq!(app.get("/readyz").await.0, 503, "not ready without Redis");
    let (mut socket, _) = app.connect("early").await;
    app.redis.start_again().await;
    app.wait_until_ready().await;
    quotes_flow_through(&app, &mut socket, "LATE").await;
    app.shutdown().await;
}

/// The test process's resident set size, in MiB.
fn own_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        / 1024
}

/// A producer far faster than the listener: the subscription's buffer is
/// bounded, so memory stays put, the overflow is counted and the
/// subscription ends (the listener then subscribes again) rather than
/// queuing without limit.
#[tokio::test]
async fn a_subscriber_that_falls_behind_is_bounded_and_ends_its_subscription() {
    use futures_util::StreamExt;
    use quotebridge::broker::{Broker, RedisBroker, SubscriptionBuffer, Topic};

    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;
    // Redis itself would cut off so slow a subscriber; the bound under test
    // is the bridge's own.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("client-output-buffer-limit")
        .arg("pubsub 0 0 0")
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
    let broker = RedisBroker::new(&redis.url())
        .expect("broker")
        .with_subscription_buffer(SubscriptionBuffer {
            messages: 20_000,
            bytes: 32 << 20,
        });
    let mut messages = broker
        .subscribe(&[Topic::Channel("flood".into())])
        .await
        .expect("subscribe");
    let before = own_rss_mib();

    // 200,000 messages of 2 KiB (400 MiB) that nobody reads yet.
    let payload = vec![b'x'; 2048];
    for _ in 0..200 {
        let mut pipe = redis::pipe();
        for _ in 0..1000 {
            pipe.publish("flood", &payload).ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.expect("publish");
    }
    // Redis holds nothing more for the subscriber: it read everything into
    // the bounded queue, or it overflowed and closed the connection.
    eventually(
        "redis to drain the subscriber's output buffer",
        async || {
            let clients = pubsub_clients(&mut conn).await;
            clients
                .lines()
                .all(|client| client.contains(" omem=0 "))
                .then_some(())
        },
    )
    .await;
    let grown = own_rss_mib().saturating_sub(before);
    // The queue holds at most 32 MiB of these; an unbounded one would hold
    // all 400 MiB. (The margin is for tests running alongside in this
    // process.)
    assert!(grown < 200, "memory grew by {grown} MiB");

    let after_overflow = within("the subscription to end", messages.next()).await;
    assert!(
        after_overflow.is_none(),
        "a subscription that overflowed must end, not deliver a gap"
    );
    assert_eq!(broker.overflows(), 1);
}
