//! The WebSocket contract: welcome, subscriptions with snapshots, group
//! routing, direct messages, malformed frames, client-code validation.

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::*;

fn quote(symbol: &str, price: f64, client: Option<&str>) -> (String, Vec<u8>) {
    let mut q = json!({"symbol": symbol, "price": price, "ts": 1});
    if let Some(c) = client {
        q["client"] = c.into();
    }
    ("quotes".into(), q.to_string().into_bytes())
}

#[tokio::test]
async fn welcome_lists_the_default_subscriptions() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__WEBSOCKET__DEFAULT_SYMBOLS", "MSFT,AAPL")]).await;
    let (_socket, welcome) = app.connect("acme").await;
    assert_eq!(
        welcome,
        json!({"type": "welcome", "client": "acme", "subscriptions": ["AAPL", "MSFT"], "series": ["sma"]})
    );
    app.shutdown().await;
}

#[tokio::test]
async fn subscribe_replies_with_the_sorted_set_then_snapshots() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__WEBSOCKET__DEFAULT_SYMBOLS", ""),
        ("QUOTEBRIDGE__SMA__EMIT_PARTIAL", "true"),
    ])
    .await;
    let mut conn = app.redis.connection().await;
    // A watcher on "*" tells us when the bridge has processed the quotes.
    let (mut watcher, _) = app.connect("watcher").await;
    send_json(&mut watcher, json!({"op": "subscribe", "symbols": ["*"]})).await;
    assert_eq!(next_json(&mut watcher).await["type"], "subscribed");
    publish_all(
        &mut conn,
        &[quote("MSFT", 10.0, None), quote("AAPL", 20.0, None)],
    )
    .await;
    let mut latest_aapl = String::new();
    for _ in 0..2 {
        let frame = next_text(&mut watcher).await;
        if frame.contains("AAPL") {
            latest_aapl = frame;
        }
    }

    let (mut socket, welcome) = app.connect("acme").await;
    assert_eq!(welcome["subscriptions"], json!([]));
    send_json(
        &mut socket,
        json!({"op": "subscribe", "symbols": ["ZZZ", "AAPL"]}),
    )
    .await;
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "subscribed", "symbols": ["AAPL", "ZZZ"]})
    );
    // Snapshot of AAPL, byte for byte the frame the watcher saw; ZZZ has none.
    assert_eq!(next_text(&mut socket).await, latest_aapl);

    // Live updates follow for subscribed symbols only.
    publish_all(
        &mut conn,
        &[quote("MSFT", 11.0, None), quote("AAPL", 21.0, None)],
    )
    .await;
    let live = next_json(&mut socket).await;
    assert_eq!(
        (live["symbol"].as_str(), live["price"].as_f64()),
        (Some("AAPL"), Some(21.0))
    );

    send_json(
        &mut socket,
        json!({"op": "unsubscribe", "symbols": ["AAPL"]}),
    )
    .await;
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "subscribed", "symbols": ["ZZZ"]})
    );
    app.shutdown().await;
}

#[tokio::test]
async fn private_smas_reach_every_socket_of_their_group_and_no_other() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__SMA__EMIT_PARTIAL", "true")]).await;
    let mut conn = app.redis.connection().await;
    let (mut acme_1, _) = app.connect("acme").await;
    let (mut acme_2, _) = app.connect("acme").await;
    let (mut other, _) = app.connect("other").await;

    // A private quote for acme, then a public marker. Frames reach a socket in
    // the order the bridge produced them, so if `other` sees the marker first,
    // the private SMA was never sent to it.
    publish_all(
        &mut conn,
        &[quote("AAPL", 5.0, Some("acme")), quote("MARK", 1.0, None)],
    )
    .await;
    for socket in [&mut acme_1, &mut acme_2] {
        let private = next_json(socket).await;
        assert_eq!(
            (private["client"].as_str(), private["symbol"].as_str()),
            (Some("acme"), Some("AAPL"))
        );
        assert_eq!(next_json(socket).await["symbol"], "MARK");
    }
    let first = next_json(&mut other).await;
    assert_eq!(first["symbol"], "MARK", "other group got {first}");
    assert!(first.get("client").is_none());

    // Private quotes go to the group even when it subscribes to nothing public.
    send_json(&mut acme_1, json!({"op": "unsubscribe", "symbols": ["*"]})).await;
    assert_eq!(next_json(&mut acme_1).await["symbols"], json!([]));
    publish_all(&mut conn, &[quote("MSFT", 7.0, Some("acme"))]).await;
    let private = next_json(&mut acme_1).await;
    assert_eq!(
        (private["client"].as_str(), private["symbol"].as_str()),
        (Some("acme"), Some("MSFT"))
    );
    app.shutdown().await;
}

#[tokio::test]
async fn direct_messages_reach_every_socket_of_the_group_verbatim() {
    let app = spawn_app().await;
    let mut conn = app.redis.connection().await;
    let (mut acme_1, _) = app.connect("acme").await;
    let (mut acme_2, _) = app.connect("acme").await;
    let (mut other, _) = app.connect("other").await;
    let payload = r#"{"alert": "margin call",  "level": 3}"#;
    publish_all(
        &mut conn,
        &[
            ("client.acme".into(), payload.as_bytes().to_vec()),
            ("client.other".into(), b"for other".to_vec()),
        ],
    )
    .await;
    assert_eq!(
        next_text(&mut acme_1).await,
        payload,
        "verbatim, spacing included"
    );
    assert_eq!(next_text(&mut acme_2).await, payload);
    assert_eq!(
        next_text(&mut other).await,
        "for other",
        "only its own direct message"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn malformed_client_frames_get_errors_and_the_socket_stays_open() {
    let app = spawn_app().await;
    let (mut socket, _) = app.connect("acme").await;
    let bad_frames = [
        "not json",
        "{}",
        r#"{"op":"publish","symbols":["A"]}"#,
        r#"{"op":"subscribe","symbols":"AAPL"}"#,
        r#"{"op":"subscribe","symbols":["BAD SYMBOL"]}"#,
        r#"{"op":"subscribe","symbols":["AA*"]}"#,
    ];
    for frame in bad_frames {
        socket.send(Message::text(frame)).await.expect("send");
        let reply = next_json(&mut socket).await;
        assert_eq!(reply["type"], "error", "{frame} got {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    socket
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .expect("send");
    assert_eq!(next_json(&mut socket).await["type"], "error");
    // Still open and serving.
    send_json(&mut socket, json!({"op": "subscribe", "symbols": ["AAPL"]})).await;
    assert_eq!(next_json(&mut socket).await["type"], "subscribed");
    app.shutdown().await;
}

#[tokio::test]
async fn oversized_client_frames_close_the_socket_with_1009() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__WEBSOCKET__MAX_MESSAGE_BYTES", "1024")]).await;
    let (mut socket, _) = app.connect("acme").await;
    let huge = format!(r#"{{"op":"subscribe","symbols":["{}"]}}"#, "A".repeat(4096));
    socket.send(Message::text(huge)).await.expect("send");
    assert_eq!(close_frame(&mut socket).await.0, 1009);
    app.shutdown().await;
}

#[tokio::test]
async fn invalid_client_codes_are_refused_with_400_before_the_upgrade() {
    let app = spawn_app().await;
    let long = "c".repeat(65);
    for code in ["bad.code", "a%20b", "caf%C3%A9", long.as_str(), "a/b", ""] {
        match tokio_tungstenite::connect_async(app.ws_url(code)).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 400, "client code {code:?}");
            }
            other => panic!("client code {code:?} was not refused: {other:?}"),
        }
    }
    // 64 characters is the longest valid code.
    let (_socket, welcome) = app.connect(&"c".repeat(64)).await;
    assert_eq!(welcome["client"], "c".repeat(64));
    app.shutdown().await;
}

#[tokio::test]
async fn a_group_disappears_when_its_last_socket_closes() {
    let app = spawn_app().await;
    let (mut first, _) = app.connect("acme").await;
    let (second, _) = app.connect("acme").await;
    let (_other, _) = app.connect("other").await;
    app.wait_for_stats("3 sockets in 2 groups", |s| {
        s["sockets"] == 3 && s["groups"] == 2
    })
    .await;

    first.close(None).await.expect("close");
    app.wait_for_stats("acme down to one socket", |s| {
        s["sockets"] == 2 && s["groups"] == 2
    })
    .await;
    // An abrupt disconnect (no close frame) must not leak either.
    drop(second);
    app.wait_for_stats("acme gone", |s| s["sockets"] == 1 && s["groups"] == 1)
        .await;
    app.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001() {
    let app = spawn_app().await;
    let (mut socket, _) = app.connect("acme").await;
    let stopping = tokio::spawn(app.shutdown());
    assert_eq!(
        close_frame(&mut socket).await,
        (1001, "going away".to_owned())
    );
    stopping.await.expect("shutdown completes");
}

#[tokio::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").await.0, 200);
    assert_eq!(app.get("/readyz").await.0, 200);
    assert_eq!(app.get("/nope").await.0, 404);
    app.shutdown().await;
}

#[tokio::test]
async fn a_direct_message_larger_than_a_socket_may_queue_is_refused_and_evicts_nobody() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__WEBSOCKET__SEND_QUEUE_BYTES", "65536")]).await;
    let mut conn = app.redis.connection().await;
    let (mut acme_1, _) = app.connect("acme").await;
    let (mut acme_2, _) = app.connect("acme").await;
    let huge = vec![b'x'; 2 << 20];
    publish_all(
        &mut conn,
        &[
            ("client.acme".into(), huge),
            ("client.acme".into(), b"after".to_vec()),
        ],
    )
    .await;
    assert_eq!(next_text(&mut acme_1).await, "after");
    assert_eq!(next_text(&mut acme_2).await, "after");
    let stats = app.stats().await;
    assert_eq!(stats["frames_too_large"], 1, "{stats}");
    assert_eq!(stats["slow_consumer_closes"], 0, "{stats}");
    let metrics = app.get("/metrics").await.1;
    assert!(
        metrics.contains("quotebridge_frames_too_large_total 1"),
        "{metrics}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn snapshots_stay_within_the_socket_queue_and_repeating_costs_nothing_more() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__WEBSOCKET__DEFAULT_SYMBOLS", ""),
        ("QUOTEBRIDGE__WEBSOCKET__SEND_QUEUE", "8"),
        ("QUOTEBRIDGE__WEBSOCKET__CLIENT_MESSAGES_PER_SECOND", "100"),
        ("QUOTEBRIDGE__SMA__EMIT_PARTIAL", "true"),
    ])
    .await;
    let mut conn = app.redis.connection().await;
    let quotes: Vec<_> = (0..40)
        .map(|i| quote(&format!("S{i}"), 1.0, None))
        .collect();
    publish_all(&mut conn, &quotes).await;
    app.wait_for_stats("40 results", |s| s["smas_emitted"] == 40)
        .await;

    let (mut socket, _) = app.connect("acme").await;
    send_json(&mut socket, json!({"op": "subscribe", "symbols": ["*"]})).await;
    assert_eq!(next_json(&mut socket).await["type"], "subscribed");
    // Half the queue: live frames arriving meanwhile still find room.
    for _ in 0..4 {
        assert!(next_json(&mut socket).await["sma"].is_number());
    }
    app.wait_for_stats("the rest counted as skipped", |s| {
        s["snapshots_skipped"] == 36
    })
    .await;
    // Asking again and again: each time at most half the queue's worth.
    for _ in 0..10 {
        send_json(&mut socket, json!({"op": "unsubscribe", "symbols": ["*"]})).await;
        send_json(&mut socket, json!({"op": "subscribe", "symbols": ["*"]})).await;
    }
    let stats = app
        .wait_for_stats("ten more subscribes", |s| {
            s["snapshots_skipped"].as_u64().unwrap_or(0) >= 36 + 10 * 36
        })
        .await;
    assert_eq!(stats["slow_consumer_closes"], 0, "{stats}");
    assert_eq!(stats["sockets"], 1, "{stats}");
    app.shutdown().await;
}

/// Results for `"*"` go out as frames encoded once and written as they are,
/// beside what the WebSocket engine writes itself: a client pinging while
/// bursts flow gets every result, each a valid frame, in order, and a pong
/// for every ping (a pong written into the middle of a result's frame
/// would break the stream).
#[tokio::test]
async fn a_client_pinging_while_bursts_flow_gets_whole_frames_and_its_pongs() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__SMA__EMIT_PARTIAL", "true")]).await;
    let mut conn = app.redis.connection().await;
    let (mut socket, welcome) = app.connect("acme").await;
    assert_eq!(
        welcome["subscriptions"],
        json!(["*"]),
        "the shared bursts' path"
    );
    const ROUNDS: usize = 5;
    const QUOTES: usize = 200;
    for round in 0..ROUNDS {
        let quotes: Vec<_> = (0..QUOTES)
            .map(|i| quote(&format!("S{}", i % 7), (round * QUOTES + i) as f64, None))
            .collect();
        publish_all(&mut conn, &quotes).await;
        socket
            .send(Message::Ping(format!("{round}").into_bytes().into()))
            .await
            .expect("ping");
    }
    let (mut results, mut pongs) = (0, 0);
    let mut last_seq = std::collections::HashMap::new();
    within("every result and pong", async {
        while results < ROUNDS * QUOTES || pongs < ROUNDS {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    let result: serde_json::Value =
                        serde_json::from_str(&text).expect("every frame is a whole result");
                    let symbol = result["symbol"].as_str().expect("symbol").to_owned();
                    let seq = result["seq"].as_u64().expect("seq");
                    let previous = last_seq.insert(symbol, seq).unwrap_or(0);
                    assert_eq!(seq, previous + 1, "each key's results in order: {text}");
                    results += 1;
                }
                Some(Ok(Message::Pong(payload))) => {
                    assert_eq!(payload, format!("{pongs}").into_bytes(), "pongs in order");
                    pongs += 1;
                }
                other => panic!("expected results and pongs, got {other:?}"),
            }
        }
    })
    .await;
    app.shutdown().await;
}
