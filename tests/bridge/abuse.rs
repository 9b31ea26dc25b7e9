//! Clients that stay within their documented limits yet ask for work or
//! memory out of proportion to their requests, run against the real binary.
//! Each test asserts the bound that is not a timing (memory, frames, work);
//! what the abuse does to other clients' latency is the benchmark's to measure.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::binary::{Serve, counting_sockets};
use crate::support::*;

/// 20 sockets subscribe `"*"` at the slowest rate allowed, and say so again
/// after every 1,000 quotes, while 100,000 symbols each get a result. Each
/// socket's rate limit remembers at most `send_queue_bytes / 128` keys
/// (docs/protocol.md), so the bridge's memory grows with the keys (their
/// windows, histories and snapshots), not with keys × sockets: kept per key
/// for an hour, as before, this was about 23 MiB a socket.
#[tokio::test]
async fn a_slow_rate_over_every_symbol_keeps_bounded_memory_per_socket() {
    const ABUSERS: usize = 20;
    const KEYS: usize = 100_000;
    const CHUNK: usize = 1_000;
    /// What the keys themselves may take (windows, histories, snapshots of
    /// 100,000 keys: 96 MiB measured in a debug build with no abuser), plus
    /// 4 MiB a socket: the results waiting for their rate (at most
    /// `send_queue_bytes`, 1 MiB) and the send times it remembers. Before
    /// the bound, 20 sockets took 460 MiB more.
    const RSS_GROWTH_BOUND_KIB: u64 = 128 * 1024 + ABUSERS as u64 * 4 * 1024;

    let redis = RedisServer::start().await;
    let env = [
        ("QUOTEBRIDGE__SMA__WINDOW", "1"),
        ("QUOTEBRIDGE__WEBSOCKET__CLIENT_MESSAGES_PER_SECOND", "1000"),
    ];
    let serve = Serve::start(&redis, &env).await;
    let slowest = serde_json::json!({"op": "subscribe", "symbols": ["*"], "max_rate": 0.0003});
    let mut writers = Vec::new();
    let abused = Arc::new(AtomicUsize::new(0));
    for i in 0..ABUSERS {
        let url = format!("ws://{}/ws/abuser{i}", serve.address);
        let (mut socket, _) = connect_ws(&url).await;
        send_json(&mut socket, slowest.clone()).await;
        assert_eq!(next_json(&mut socket).await["type"], "subscribed");
        let (writer, mut reader) = socket.split();
        let frames = abused.clone();
        // They read everything they are sent: a socket that fell behind
        // would be conflated or closed, and free what it held.
        tokio::spawn(async move {
            while let Some(Ok(_)) = reader.next().await {
                frames.fetch_add(1, Ordering::Relaxed);
            }
        });
        writers.push(writer);
    }
    let received = counting_sockets(&serve, 1, |_| None).await;
    let rss_before = serve.rss_kib();

    let mut conn = redis.connection().await;
    for chunk in 0..KEYS / CHUNK {
        let batch: Vec<(String, Vec<u8>)> = (0..CHUNK)
            .map(|i| {
                let n = chunk * CHUNK + i;
                let quote = format!(r#"{{"symbol":"K{n}","price":{n},"ts":{n}}}"#);
                ("quotes".to_owned(), quote.into_bytes())
            })
            .collect();
        publish_all(&mut conn, &batch).await;
        let want = (chunk + 1) * CHUNK;
        eventually("the honest reader to keep up", async || {
            (received[0].load(Ordering::Relaxed) >= want).then_some(())
        })
        .await;
        for writer in &mut writers {
            let again = Message::Text(slowest.to_string().into());
            writer
                .send(again)
                .await
                .expect("the abuser's subscribe is sent");
        }
    }
    let stats = serve.stats().await;
    let growth = serve.rss_kib().saturating_sub(rss_before);
    eprintln!(
        "RSS grew {growth} KiB; abusers received {} frames; stats {stats}",
        abused.load(Ordering::Relaxed)
    );
    assert_eq!(stats["sockets"], ABUSERS + 1, "nobody was closed");
    // Each abuser may get every key's first result only while it can tell
    // keys apart (8,193 of them: one past the 8,192 send times it remembers);
    // every later key waits an hour, or is skipped once the waiting results
    // reach `send_queue_bytes`. Sent at once instead, as before, they made
    // each abuser a full-rate subscriber (about 90,000 frames here).
    const REPLIES: usize = 1 + KEYS / CHUNK;
    let most = ABUSERS * (8_192 + 1 + REPLIES);
    let got = abused.load(Ordering::Relaxed);
    assert!(got <= most, "abusers got {got} frames, over {most}");
    assert!(
        growth <= RSS_GROWTH_BOUND_KIB,
        "RSS grew by {growth} KiB, over the {RSS_GROWTH_BOUND_KIB} KiB bound"
    );
}

/// A client that opens and closes sockets over and over, never holding more
/// than it may, gets its burst, then HTTP 429 until its allowance refills:
/// handshakes in a loop cannot keep the bridge busy.
#[tokio::test]
async fn opening_sockets_over_and_over_is_refused_after_a_burst() {
    let redis = RedisServer::start().await;
    let app = Serve::start(
        &redis,
        &[
            ("QUOTEBRIDGE__SERVER__MAX_CONNECTIONS_PER_CLIENT", "3"),
            ("QUOTEBRIDGE__SERVER__CONNECTS_PER_CLIENT_PER_SECOND", "1"),
        ],
    )
    .await;
    for _ in 0..3 {
        let (socket, _) = app.connect("churn").await;
        drop(socket);
    }
    let refused = crate::hostile_clients::refused(app.ws_url("churn")).await;
    assert_eq!(
        refused.status(),
        429,
        "the burst (max_connections_per_client) is spent"
    );
    // How long to wait before trying again: the allowance refills at least
    // one socket a second.
    assert_eq!(
        refused.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let (_other, _) = app.connect("calm").await;
    let stats = app.stats().await;
    assert_eq!(stats["client_limit_refusals"], 1, "{stats}");
    eventually("the allowance to refill (one a second)", async || {
        tokio_tungstenite::connect_async(app.ws_url("churn"))
            .await
            .ok()
            .map(drop)
    })
    .await;
}

/// A client resumes over and over naming many keys it has nothing to
/// recover on (so nothing is sent): answering each key is work, and each
/// costs one frame of the client code's resume allowance, so such resumes
/// are refused once the keys named have spent it, while another client
/// code resumes as before. Before the keys counted, every one of these
/// resumes was answered.
#[tokio::test]
async fn resumes_naming_many_keys_spend_the_allowance_though_they_send_nothing() {
    let redis = RedisServer::start().await;
    let app = Serve::start(
        &redis,
        &[("QUOTEBRIDGE__WEBSOCKET__RESUME_FRAMES_PER_SECOND", "100")],
    )
    .await;
    let keys: serde_json::Map<String, serde_json::Value> =
        (0..600).map(|i| (format!("K{i}"), 1.into())).collect();
    let request = json!({"op": "resume", "public": {"e1": keys}});
    let resume = async |code: &str| {
        let url = format!("{}?resume=1", app.ws_url(code));
        let (mut socket, _) = connect_ws(&url).await;
        send_json(&mut socket, request.clone()).await;
        next_json(&mut socket).await
    };
    // 100 a second: the first resume's 600 keys spend them and a second's
    // worth more (the debt stops there), so the next waits a second.
    let reply = resume("hoarder").await;
    assert_eq!(
        (reply["type"].as_str(), reply["replayed"].as_u64()),
        (Some("resumed"), Some(0)),
        "{reply}"
    );
    assert_eq!(
        reply["unrecovered"]["public"].as_array().map(Vec::len),
        Some(600),
        "{reply}"
    );
    let refused = resume("hoarder").await;
    assert_eq!(refused["type"], "error", "the second resume is refused");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("resume_frames_per_second")),
        "{refused}"
    );
    let neighbour = resume("neighbour").await;
    assert_eq!(
        neighbour["type"], "resumed",
        "another client code has its own"
    );
    let stats = app.stats().await;
    assert_eq!(stats["resumes_unrecovered"], 2, "{stats}");
}

/// Four keep-alive connections ask `/stats` back to back while 200 sockets
/// are open. `/stats` reads counters and gauges (the socket count is a
/// gauge the connections keep, not a walk over them), and a connection
/// asking faster than 20 requests a second, past a burst of 20, is held
/// back: every request is answered, and the ones held back are counted.
#[tokio::test]
async fn stats_asked_in_a_loop_is_paced_and_answered_from_gauges() {
    const SOCKETS: usize = 200;
    const LOOPS: usize = 4;
    /// Past the burst of 20, the rest wait: only a loop slower than 50 ms
    /// a request (the refill) could go unpaced.
    const ASKS: usize = 60;

    let redis = RedisServer::start().await;
    let app = Serve::start(&redis, &[]).await;
    let mut sockets = Vec::new();
    for i in 0..SOCKETS {
        sockets.push(app.connect(&format!("reader{i}")).await.0);
    }
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..LOOPS {
        let address = app.address;
        loops.spawn(async move {
            let stream = tokio::net::TcpStream::connect(address)
                .await
                .expect("connect");
            let mut stream = tokio::io::BufReader::new(stream);
            let mut answers = Vec::new();
            for _ in 0..ASKS {
                answers.push(ask_kept_alive(&mut stream, address, "/stats").await);
            }
            answers
        });
    }
    let answers = within("every /stats to be answered", loops.join_all()).await;
    for answer in answers.iter().flatten() {
        let stats: serde_json::Value = serde_json::from_str(answer).expect("stats are JSON");
        assert_eq!(stats["sockets"], SOCKETS, "{stats}");
    }
    let paced = app.stats().await["http_requests_paced"]
        .as_u64()
        .expect("a count");
    assert!(
        (1..=(LOOPS * (ASKS - 20)) as u64).contains(&paced),
        "{paced} requests held back"
    );
    drop(sockets);
}

/// One `GET path` on a kept-alive connection: its body, once the status
/// says 200.
async fn ask_kept_alive(
    stream: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    address: std::net::SocketAddr,
    path: &str,
) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n");
    stream
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .expect("ask");
    let mut status = String::new();
    stream.read_line(&mut status).await.expect("status line");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut length = 0;
    loop {
        let mut header = String::new();
        stream.read_line(&mut header).await.expect("a header");
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().expect("a length");
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.expect("the body");
    String::from_utf8(body).expect("UTF-8")
}
