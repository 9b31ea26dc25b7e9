//! Slow, silent, greedy and hostile WebSocket clients: each is bounded, and
//! nobody else notices.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::binary::Serve;
use crate::support::*;

/// The bridge's answer to an upgrade it refuses; the test fails if the
/// upgrade goes through.
pub(crate) async fn refused(url: String) -> tungstenite::http::Response<Option<Vec<u8>>> {
    match tokio_tungstenite::connect_async(url).await {
        Err(tungstenite::Error::Http(response)) => *response,
        other => panic!("upgrade was not refused: {other:?}"),
    }
}

pub(crate) async fn refused_status(url: String) -> u16 {
    refused(url).await.status().as_u16()
}

#[tokio::test]
async fn a_client_flooding_frames_is_closed_with_1008() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__WEBSOCKET__CLIENT_MESSAGES_PER_SECOND", "5")]).await;
    let (mut flooder, _) = app.connect("acme").await;
    let (mut calm, _) = app.connect("acme").await;
    for _ in 0..50 {
        if flooder
            .send(Message::text(r#"{"op":"subscribe","symbols":["A"]}"#))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(
        close_frame(&mut flooder).await,
        (1008, "rate limit exceeded".into())
    );
    // Its neighbour in the same group is untouched.
    send_json(&mut calm, json!({"op": "subscribe", "symbols": ["B"]})).await;
    assert_eq!(next_json(&mut calm).await["type"], "subscribed");
    app.wait_for_stats("the close to be counted", |s| s["rate_limited_closes"] == 1)
        .await;
    app.shutdown().await;
}

#[tokio::test]
async fn connection_limits_refuse_upgrades_with_429_and_503() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__SERVER__MAX_CONNECTIONS_PER_CLIENT", "2"),
        ("QUOTEBRIDGE__SERVER__MAX_CONNECTIONS", "3"),
    ])
    .await;
    let (_a1, _) = app.connect("acme").await;
    let (a2, _) = app.connect("acme").await;
    assert_eq!(
        refused_status(app.ws_url("acme")).await,
        429,
        "per client code"
    );
    let (_b1, _) = app.connect("other").await;
    assert_eq!(refused_status(app.ws_url("third")).await, 503, "in total");
    // A closed socket gives its place back.
    drop(a2);
    app.wait_for_stats("the socket to be gone", |s| s["sockets"] == 2)
        .await;
    eventually("a place for acme again", async || {
        tokio_tungstenite::connect_async(app.ws_url("acme"))
            .await
            .ok()
            .map(drop)
    })
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_and_a_live_one_is_not() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__WEBSOCKET__PING_INTERVAL_MS", "50")]).await;
    let (silent, _) = app.connect("acme").await;
    let (mut live, _) = app.connect("acme").await;
    // The live client reads (and so answers pings) until told to stop.
    let pings = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let pings = pings.clone();
        async move {
            while let Some(Ok(message)) = live.next().await {
                if matches!(message, Message::Ping(_)) {
                    pings.fetch_add(1, Ordering::Relaxed);
                }
            }
            live
        }
    });
    app.wait_for_stats("the silent client to time out", |s| {
        s["keepalive_timeouts"] == 1 && s["sockets"] == 1
    })
    .await;
    // The live socket has answered pings all along and is still open: it keeps
    // getting them after the silent one was dropped.
    let seen = pings.load(Ordering::Relaxed);
    eventually("more pings to the live socket", async || {
        (pings.load(Ordering::Relaxed) >= seen + 3).then_some(())
    })
    .await;
    assert_eq!(app.stats().await["keepalive_timeouts"], 1);
    drop(silent);
    app.shutdown().await;
    let _ = reader.await;
}

#[tokio::test]
async fn requests_that_are_not_websocket_upgrades_get_clean_http_errors() {
    let app = spawn_app().await;
    // A plain GET on the WebSocket path.
    let (status, _) = app.get("/ws/acme").await;
    assert!((400..500).contains(&status), "plain GET got {status}");
    // Garbage bytes instead of HTTP.
    let mut stream = TcpStream::connect(app.address).await.expect("connect");
    stream
        .write_all(b"\x16\x03\x01garbage that is not http\r\n\r\n")
        .await
        .expect("write");
    let mut response = Vec::new();
    within(
        "the server to answer garbage",
        stream.read_to_end(&mut response),
    )
    .await
    .expect("read");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.is_empty() || response.starts_with("HTTP/1.1 400"),
        "garbage got {response:?}"
    );
    // An upgrade (or any HTTP/1.1 request) without exactly one Host header
    // is malformed: 400, not 101.
    let upgrade = |hosts: &str| {
        format!(
            "GET /ws/acme HTTP/1.1\r\n{hosts}Connection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    };
    let host = format!("Host: {}\r\n", app.address);
    for request in [
        upgrade(""),
        upgrade(&format!("{host}{host}")),
        "GET /stats HTTP/1.1\r\n\r\n".to_owned(),
    ] {
        let mut stream = TcpStream::connect(app.address).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut status = [0u8; 12];
        within("the answer", stream.read_exact(&mut status))
            .await
            .expect("read");
        assert_eq!(&status, b"HTTP/1.1 400", "{request:?}");
    }
    // The server is unharmed.
    let (_socket, welcome) = app.connect("acme").await;
    assert_eq!(welcome["client"], "acme");
    app.shutdown().await;
}

/// 50 sockets that never read while 100,000 SMA frames flow: with
/// `slow_consumer = "close"` each is closed as a slow consumer, memory stays
/// bounded, and healthy sockets get every frame. (Conflating, the default,
/// is `conflation.rs`.)
#[tokio::test]
async fn fifty_sockets_that_never_read_are_closed_and_memory_stays_bounded() {
    const QUOTES: usize = 100_000;
    const STALLED: usize = 50;
    const HEALTHY: usize = 3;
    /// Documented in README (slow consumers): growth allowed while the stalled
    /// sockets fill their queues, before they are cut off.
    const RSS_GROWTH_BOUND_KIB: u64 = 64 * 1024;

    let redis = RedisServer::start().await;
    let env = [
        ("QUOTEBRIDGE__SMA__WINDOW", "1"),
        ("QUOTEBRIDGE__WEBSOCKET__SLOW_CONSUMER", "close"),
    ];
    let serve = Serve::start(&redis, &env).await;
    let url = format!("ws://{}/ws/", serve.address);
    let mut stalled = Vec::new();
    for i in 0..STALLED {
        let (socket, _) = tokio_tungstenite::connect_async(format!("{url}stalled{i}"))
            .await
            .expect("connect");
        stalled.push(socket); // never read again
    }
    let received = crate::binary::counting_sockets(&serve, HEALTHY, |_| None).await;
    let rss_before = serve.rss_kib();

    // Publish in chunks and let the healthy readers catch up after each, so
    // they never fall behind while the stalled sockets take everything.
    let mut conn = redis.connection().await;
    let load = crate::binary::Load {
        quotes: QUOTES,
        keys: 100,
        per_second: None,
    };
    let peak = crate::binary::publish_keeping_up(&serve, &mut conn, &load, &received, |n| n)
        .await
        .rss_kib;
    let stats = eventually("the stalled sockets to be closed", async || {
        let (_, body) = http_get(serve.address, "/stats").await;
        let stats: serde_json::Value = serde_json::from_str(&body).expect("json");
        (stats["slow_consumer_closes"] == STALLED && stats["sockets"] == HEALTHY).then_some(stats)
    })
    .await;
    for count in &received {
        assert_eq!(
            count.load(Ordering::Relaxed),
            QUOTES,
            "healthy sockets receive 100%"
        );
    }
    let growth = peak.saturating_sub(rss_before);
    eprintln!("RSS before {rss_before} KiB, peak {peak} KiB, growth {growth} KiB; stats {stats}");
    assert!(
        growth <= RSS_GROWTH_BOUND_KIB,
        "RSS grew by {growth} KiB, over the {RSS_GROWTH_BOUND_KIB} KiB bound"
    );
    drop(stalled);
}

/// Reads what follows a close frame: a clean end (the server closed the TCP
/// connection after the handshake), never a reset or a protocol error.
async fn assert_ends_cleanly(socket: &mut Socket) {
    within("the connection to end", async {
        loop {
            match socket.next().await {
                None | Some(Err(tungstenite::Error::ConnectionClosed)) => return,
                Some(Ok(Message::Close(_) | Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a clean end after the close handshake, got {other:?}"),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_client_close_is_answered_before_the_connection_ends() {
    let app = spawn_app().await;
    let (mut socket, _) = app.connect("acme").await;
    socket.close(None).await.expect("send a close frame");
    match within("the close reply", socket.next()).await {
        Some(Ok(Message::Close(_))) => {}
        other => panic!("the server did not answer the close (RFC 6455 5.5.1): {other:?}"),
    }
    assert_ends_cleanly(&mut socket).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_closed_flooder_reads_its_close_frame_and_no_reset() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__WEBSOCKET__CLIENT_MESSAGES_PER_SECOND", "5")]).await;
    for _ in 0..5 {
        let (mut flooder, _) = app.connect("acme").await;
        // Far more than the limit, sent at once: most are still unread
        // when the server decides to close.
        for _ in 0..200 {
            flooder
                .feed(Message::text(r#"{"op":"subscribe","symbols":["A"]}"#))
                .await
                .expect("queue a frame");
        }
        flooder.flush().await.expect("send the flood");
        assert_eq!(
            close_frame(&mut flooder).await,
            (1008, "rate limit exceeded".into())
        );
        assert_ends_cleanly(&mut flooder).await;
    }
    app.shutdown().await;
}

/// One message sent as 200,000 empty continuation frames: the engine hands
/// the session nothing until the message ends, so the frames are counted as
/// they arrive, under it.
#[tokio::test]
async fn continuation_frames_count_toward_the_client_frame_rate() {
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};

    let redis = RedisServer::start().await;
    let app = Serve::start(
        &redis,
        &[("QUOTEBRIDGE__WEBSOCKET__CLIENT_MESSAGES_PER_SECOND", "50")],
    )
    .await;
    let (mut calm, _) = app.connect("acme").await;
    let (mut fragmenter, _) = app.connect("acme").await;
    let first = Frame::message(b"{".to_vec(), OpCode::Data(Data::Text), false);
    fragmenter
        .feed(Message::Frame(first))
        .await
        .expect("first fragment");
    let mut sent = 1;
    while sent < 200_000 {
        let empty = Frame::message(Vec::new(), OpCode::Data(Data::Continue), false);
        if fragmenter.feed(Message::Frame(empty)).await.is_err() {
            break;
        }
        sent += 1;
    }
    let _ = fragmenter.flush().await;
    assert_eq!(
        close_frame(&mut fragmenter).await,
        (1008, "rate limit exceeded".into())
    );
    assert_ends_cleanly(&mut fragmenter).await;
    app.wait_for_stats("the close to be counted", |s| s["rate_limited_closes"] == 1)
        .await;
    // Its neighbour in the same group is untouched.
    send_json(&mut calm, json!({"op": "subscribe", "symbols": ["B"]})).await;
    assert_eq!(next_json(&mut calm).await["type"], "subscribed");
}

#[tokio::test]
async fn pings_count_toward_the_client_frame_rate() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__WEBSOCKET__CLIENT_MESSAGES_PER_SECOND", "5")]).await;
    let (mut pinger, _) = app.connect("acme").await;
    for _ in 0..50 {
        if pinger
            .send(Message::Ping(Default::default()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(
        close_frame(&mut pinger).await,
        (1008, "rate limit exceeded".into())
    );
    app.wait_for_stats("the close to be counted", |s| s["rate_limited_closes"] == 1)
        .await;
    app.shutdown().await;
}

#[tokio::test]
async fn protocol_violations_close_with_1002_and_bad_text_with_1007() {
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};

    let app = spawn_app().await;
    let (mut socket, _) = app.connect("acme").await;
    let not_utf8 = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    socket.send(Message::Frame(not_utf8)).await.expect("send");
    assert_eq!(close_frame(&mut socket).await.0, 1007);

    let (mut socket, _) = app.connect("acme").await;
    let reserved = Frame::message(vec![1, 2, 3], OpCode::Data(Data::Reserved(3)), true);
    socket.send(Message::Frame(reserved)).await.expect("send");
    assert_eq!(close_frame(&mut socket).await.0, 1002);
    app.shutdown().await;
}

#[tokio::test]
async fn silent_and_trickling_http_clients_are_bounded_and_timed_out() {
    let redis = RedisServer::start().await;
    let bridge = Serve::start(
        &redis,
        &[
            ("QUOTEBRIDGE__SERVER__HEADER_READ_TIMEOUT_MS", "500"),
            ("QUOTEBRIDGE__SERVER__MAX_PENDING_CONNECTIONS", "16"),
        ],
    )
    .await;
    let before = bridge.descriptors();

    // 100 clients that connect and say nothing: the bridge holds at most
    // 16 of them at a time, and closes each when its time is up.
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(bridge.address).await.expect("connect"));
    }
    let held = bridge.descriptors();
    assert!(
        held <= before + 16,
        "{held} descriptors with 100 silent clients, {before} before"
    );
    for mut client in silent {
        let mut buf = [0u8; 64];
        let read = within("a silent connection to be closed", client.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "a silent client got an answer: {read:?}"
        );
    }

    // A client that sends its request a byte at a time, slower than the
    // header timeout allows, is cut off before it finishes.
    let request = b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n";
    let mut trickle = TcpStream::connect(bridge.address).await.expect("connect");
    let mut sent = 0;
    let mut answer = Vec::new();
    within("the trickling client to be cut off", async {
        for byte in request {
            let mut buf = [0u8; 256];
            tokio::select! {
                read = trickle.read(&mut buf) => {
                    match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                    }
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if trickle.write_all(&[*byte]).await.is_err() {
                        return;
                    }
                    sent += 1;
                }
            }
        }
    })
    .await;
    assert!(sent < request.len(), "the whole request went through");
    assert!(
        answer.is_empty(),
        "got {}",
        String::from_utf8_lossy(&answer)
    );

    // Honest clients are served all along, and the descriptors are back.
    assert_eq!(http_get(bridge.address, "/healthz").await.0, 200);
    let stats = bridge.stats().await;
    assert!(
        stats["http_header_timeouts"].as_u64() >= Some(101),
        "{stats}"
    );
    let after = bridge.descriptors();
    assert!(
        after <= before + 2,
        "{after} descriptors after, {before} before"
    );
}

/// A connection asking `/healthz` in a loop as fast as it can is paced to
/// 20 requests a second: every request is answered, the ones past the
/// burst only later, and they are counted.
#[tokio::test]
async fn a_kept_alive_connection_asking_in_a_loop_is_paced() {
    let app = spawn_app().await;
    let mut client = TcpStream::connect(app.address).await.expect("connect");
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", app.address);
    let mut answered = 0;
    within("30 answers", async {
        let mut buf = [0u8; 4096];
        while answered < 30 {
            client.write_all(request.as_bytes()).await.expect("ask");
            let read = client.read(&mut buf).await.expect("answer");
            assert!(
                buf[..read].starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&buf[..read])
            );
            answered += 1;
        }
    })
    .await;
    let stats = app
        .wait_for_stats("the paced requests to be counted", |s| {
            s["http_requests_paced"].as_u64() >= Some(1)
        })
        .await;
    assert!(stats["http_requests_paced"].as_u64() <= Some(10), "{stats}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_kept_alive_http_connection_cannot_hold_its_slot_for_ever() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__SERVER__HEADER_READ_TIMEOUT_MS", "500"),
        ("QUOTEBRIDGE__SERVER__ANSWER_TIMEOUT_MS", "1000"),
    ])
    .await;
    let mut client = TcpStream::connect(app.address).await.expect("connect");
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", app.address);
    // A request before every header timeout, each answered: without a cap
    // on the connection's whole life this would go on for ever. The cap is
    // twice the header timeout plus the answer timeout: 2 s here.
    let mut answers = 0;
    within("the kept-alive connection to be closed", async {
        loop {
            if client.write_all(request.as_bytes()).await.is_err() {
                return;
            }
            let mut buf = [0u8; 1024];
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => answers += 1,
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    assert!(
        answers > 1,
        "it was kept alive ({answers} answers) until the cap"
    );
    app.shutdown().await;
}
