//! Gap-free resume: a socket that comes back with what it last saw gets
//! exactly what it missed, in per-key order, then live results, with no
//! duplicate at the seam; or it is told which keys it could not recover.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::binary::Serve;
use crate::scale_out::start_node;
use crate::support::*;

const PARTIAL: (&str, &str) = ("QUOTEBRIDGE__SMA__EMIT_PARTIAL", "true");

/// Nine public symbols and one of `acme`'s private keys: ten keys.
fn keys() -> Vec<(Option<&'static str>, String)> {
    (0..10)
        .map(|n| ((n == 9).then_some("acme"), format!("R{n}")))
        .collect()
}

/// One quote for every key, priced by `round`, for `channel`.
fn round(number: u32, channel: &str) -> Vec<(String, Vec<u8>)> {
    keys()
        .into_iter()
        .map(|(client, symbol)| {
            let mut quote = json!({"symbol": symbol, "price": f64::from(number) + 0.5});
            if let Some(code) = client {
                quote["client"] = json!(code);
            }
            (channel.to_owned(), quote.to_string().into_bytes())
        })
        .collect()
}

/// What a client keeps to resume: the last position of each key it saw,
/// grouped as the request wants it.
#[derive(Default)]
struct LastSeen {
    /// (private?, symbol) → (epoch, seq).
    keys: BTreeMap<(bool, String), (String, u64)>,
}

impl LastSeen {
    fn note(&mut self, frame: &Value) {
        let private = frame.get("client").is_some();
        let symbol = frame["symbol"].as_str().expect("symbol").to_owned();
        let epoch = frame["epoch"].as_str().expect("epoch").to_owned();
        let seq = frame["seq"].as_u64().expect("seq");
        self.keys.insert((private, symbol), (epoch, seq));
    }

    fn request(&self) -> Value {
        let mut request = json!({"op": "resume", "public": {}, "private": {}});
        for ((private, symbol), (epoch, seq)) in &self.keys {
            let kind = if *private { "private" } else { "public" };
            request[kind][epoch][symbol] = json!(seq);
        }
        request
    }
}

/// The key of an SMA frame: (private?, symbol).
fn key_of(frame: &str) -> (bool, String) {
    let frame: Value = serde_json::from_str(frame).expect("an SMA frame");
    (
        frame.get("client").is_some(),
        frame["symbol"].as_str().expect("symbol").to_owned(),
    )
}

/// Frames grouped by key, each key's in the order given.
fn by_key(frames: &[String]) -> BTreeMap<(bool, String), Vec<String>> {
    let mut grouped: BTreeMap<_, Vec<String>> = BTreeMap::new();
    for frame in frames {
        grouped
            .entry(key_of(frame))
            .or_default()
            .push(frame.clone());
    }
    grouped
}

/// The next `n` messages on the output channel, verbatim.
async fn outputs(
    output: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin),
    n: usize,
) -> Vec<String> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        got.push(next_redis(output).await.1);
    }
    got
}

/// Publishes round 0, notes what `socket` (on everything) sees of it, and
/// leaves.
async fn first_round_then_leave(
    mut socket: Socket,
    conn: &mut redis::aio::MultiplexedConnection,
    output: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin),
) -> LastSeen {
    publish_all(conn, &round(0, "quotes")).await;
    let mut last_seen = LastSeen::default();
    for frame in frames(&mut socket, 10).await {
        last_seen.note(&serde_json::from_str(&frame).expect("json"));
    }
    outputs(output, 10).await;
    last_seen
}

/// Publishes the rounds `numbers` while the client is away; returns their
/// results as they went to Redis.
async fn while_away(
    conn: &mut redis::aio::MultiplexedConnection,
    output: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin),
    numbers: std::ops::RangeInclusive<u32>,
) -> Vec<String> {
    let count = numbers.clone().count() * keys().len();
    let away: Vec<(String, Vec<u8>)> = numbers.flat_map(|n| round(n, "quotes")).collect();
    publish_all(conn, &away).await;
    outputs(output, count).await
}

/// The next `n` text frames, verbatim.
async fn frames(socket: &mut Socket, n: usize) -> Vec<String> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        got.push(next_text(socket).await);
    }
    got
}

#[tokio::test]
async fn a_socket_on_everything_resumes_exactly_the_results_it_missed() {
    let app = spawn_app_with(&[PARTIAL, ("QUOTEBRIDGE__WEBSOCKET__HISTORY_SIZE", "64")]).await;
    let mut output = app.redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    let mut conn = app.redis.connection().await;
    let (socket, _) = app.connect("acme").await;
    let last_seen = first_round_then_leave(socket, &mut conn, &mut output).await;

    // 500 results while it is away.
    let missed = while_away(&mut conn, &mut output, 1..=50).await;

    // Back: the socket is held until it says what it saw, so results that
    // come meanwhile are among what it missed, not ahead of it.
    let url = format!("{}?resume=1", app.ws_url("acme"));
    let (mut socket, _) = connect_ws(&url).await;
    publish_all(&mut conn, &round(51, "quotes")).await;
    let mut missed = missed;
    missed.extend(outputs(&mut output, 10).await);
    send_json(&mut socket, last_seen.request()).await;
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "resumed", "recovered": true, "replayed": 510,
               "unrecovered": {"public": [], "private": []}})
    );
    let replayed = frames(&mut socket, 510).await;
    assert_eq!(
        by_key(&replayed),
        by_key(&missed),
        "every missed result once, byte for byte, in per-key order"
    );

    // Then live, continuing each key's sequence: nothing twice at the seam.
    publish_all(&mut conn, &round(52, "quotes")).await;
    let live = outputs(&mut output, 10).await;
    assert_eq!(by_key(&frames(&mut socket, 10).await), by_key(&live));
    for frame in &live {
        let frame: Value = serde_json::from_str(frame).expect("json");
        assert_eq!(frame["seq"], 53, "{frame}");
    }
    let stats = app.stats().await;
    assert_eq!(
        (
            stats["resumes_recovered"].as_u64(),
            stats["frames_replayed"].as_u64()
        ),
        (Some(1), Some(510))
    );
    assert!(stats["history_bytes"].as_u64() > Some(0));
    app.shutdown().await;
}

#[tokio::test]
async fn beyond_the_history_the_client_is_told_and_gets_the_latest_values() {
    let app = spawn_app_with(&[PARTIAL, ("QUOTEBRIDGE__WEBSOCKET__HISTORY_SIZE", "20")]).await;
    let mut output = app.redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    let mut conn = app.redis.connection().await;
    let (socket, _) = app.connect("acme").await;
    let last_seen = first_round_then_leave(socket, &mut conn, &mut output).await;
    let missed = while_away(&mut conn, &mut output, 1..=30).await;

    let url = format!("{}?resume=1", app.ws_url("acme"));
    let (mut socket, _) = connect_ws(&url).await;
    send_json(&mut socket, last_seen.request()).await;
    let public: Vec<String> = (0..9).map(|n| format!("R{n}")).collect();
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "resumed", "recovered": false, "replayed": 0,
               "unrecovered": {"public": public, "private": ["R9"]}})
    );
    let latest: BTreeMap<_, Vec<String>> = by_key(&missed)
        .into_iter()
        .map(|(key, frames)| (key, frames[frames.len() - 1..].to_vec()))
        .collect();
    assert_eq!(
        by_key(&frames(&mut socket, 10).await),
        latest,
        "the latest result of each key"
    );

    // A private key's history is its own client's: another code that names
    // it recovers nothing and is sent nothing of it.
    let url = format!("{}?resume=1", app.ws_url("beta"));
    let (mut beta, _) = connect_ws(&url).await;
    let mut acme_only = last_seen.request();
    acme_only["public"] = json!({});
    send_json(&mut beta, acme_only).await;
    assert_eq!(
        next_json(&mut beta).await,
        json!({"type": "resumed", "recovered": false, "replayed": 0,
               "unrecovered": {"public": [], "private": ["R9"]}})
    );
    publish_all(&mut conn, &round(31, "quotes")).await;
    let next = next_json(&mut beta).await;
    assert_eq!(
        (&next["symbol"], next.get("client")),
        (&json!("R0"), None),
        "live, public: {next}"
    );

    // Resume is the first request of a socket opened to resume, and only that.
    send_json(&mut beta, last_seen.request()).await;
    let refused = loop {
        let frame = next_json(&mut beta).await;
        if frame["type"] == "error" {
            break frame;
        }
    };
    assert!(
        refused["message"]
            .as_str()
            .expect("message")
            .contains("?resume=1"),
        "{refused}"
    );
    let (mut plain, _) = app.connect("gamma").await;
    let mut bad = last_seen.request();
    bad["public"] = json!({"not an epoch!": {"R0": 1}});
    send_json(&mut plain, bad).await;
    let refused = loop {
        let frame = next_json(&mut plain).await;
        if frame["type"] == "error" {
            break frame;
        }
    };
    assert!(
        refused["message"]
            .as_str()
            .expect("message")
            .contains("invalid epoch")
    );
    assert_eq!(app.stats().await["resumes_unrecovered"], 2);
    app.shutdown().await;
}

/// How many results `node` (a gateway) has relayed.
async fn relayed(node: &Serve) -> u64 {
    node.stats().await["results_relayed"].as_u64().unwrap_or(0)
}

async fn wait_relayed(node: &Serve, at_least: u64) {
    eventually("the gateway to relay every result", async || {
        (relayed(node).await >= at_least).then_some(())
    })
    .await;
}

/// Reads the reply and the frames a resume sends: (reply, frames).
async fn resume(node: &Serve, code: &str, last_seen: &LastSeen) -> (Socket, Value, usize) {
    let url = format!("ws://{}/ws/{code}?resume=1", node.address);
    let (mut socket, _) = connect_ws(&url).await;
    send_json(&mut socket, last_seen.request()).await;
    let reply = next_json(&mut socket).await;
    assert_eq!(reply["type"], "resumed", "{reply}");
    let replayed = reply["replayed"].as_u64().expect("replayed") as usize;
    (socket, reply, replayed)
}

#[tokio::test]
async fn a_client_resumes_on_another_gateway_and_across_compute_restarts() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let on_redis = [("QUOTEBRIDGE__REDIS__URL", url.as_str())];
    let mut compute = start_node("compute", None, &on_redis).await;
    let gateways = [
        start_node("gateway", None, &on_redis).await,
        start_node("gateway", None, &on_redis).await,
    ];
    let mut output = redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    let mut conn = redis.connection().await;
    let socket = crate::scale_out::connect(&gateways[0], "acme").await;
    let mut last_seen = first_round_then_leave(socket, &mut conn, &mut output).await;

    // Away from gateway 0; back on gateway 1.
    let missed = while_away(&mut conn, &mut output, 1..=20).await;
    wait_relayed(&gateways[1], 210).await;
    let (mut socket, reply, replayed) = resume(&gateways[1], "acme", &last_seen).await;
    assert_eq!(
        (reply["recovered"].as_bool(), replayed),
        (Some(true), 200),
        "{reply}"
    );
    let got = frames(&mut socket, 200).await;
    assert_eq!(by_key(&got), by_key(&missed));
    for frame in &got {
        last_seen.note(&serde_json::from_str(frame).expect("json"));
    }
    drop(socket);

    // A pub/sub-mode compute node that restarts has lost its windows: its
    // keys start a new epoch, and the client is told it has a gap.
    compute.kill();
    compute = start_node("compute", None, &on_redis).await;
    publish_all(&mut conn, &round(21, "quotes")).await;
    let after = outputs(&mut output, 10).await;
    wait_relayed(&gateways[0], 220).await;
    let (mut socket, reply, replayed) = resume(&gateways[0], "acme", &last_seen).await;
    assert_eq!(
        (reply["recovered"].as_bool(), replayed),
        (Some(false), 0),
        "{reply}"
    );
    assert_eq!(reply["unrecovered"]["private"], json!(["R9"]));
    let latest = frames(&mut socket, 10).await;
    assert_eq!(
        by_key(&latest),
        by_key(&after),
        "the latest, in the new epoch"
    );
    let new_epoch: Value = serde_json::from_str(&latest[0]).expect("json");
    assert_ne!(
        new_epoch["epoch"].as_str(),
        last_seen
            .keys
            .values()
            .next()
            .map(|(epoch, _)| epoch.as_str())
    );
    drop(compute);
}

#[tokio::test]
async fn in_stream_mode_a_compute_restart_keeps_the_epoch_and_resume_recovers() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let env = [
        ("QUOTEBRIDGE__REDIS__URL", url.as_str()),
        ("QUOTEBRIDGE__REDIS__INPUT_MODE", "stream"),
    ];
    let mut compute = start_node("compute", None, &env).await;
    let gateway = start_node("gateway", None, &env[..1]).await;
    let mut conn = redis.connection().await;
    let xadd = async |conn: &mut redis::aio::MultiplexedConnection, number: u32| {
        let mut pipe = redis::pipe();
        for (_, quote) in round(number, "") {
            pipe.cmd("XADD")
                .arg("quotes.stream")
                .arg("*")
                .arg("quote")
                .arg(quote)
                .ignore();
        }
        pipe.query_async::<()>(conn).await.expect("XADD");
    };
    let mut socket = crate::scale_out::connect(&gateway, "acme").await;
    xadd(&mut conn, 0).await;
    let mut last_seen = LastSeen::default();
    for frame in frames(&mut socket, 10).await {
        last_seen.note(&serde_json::from_str(&frame).expect("json"));
    }
    drop(socket);

    // The compute node dies and comes back while the client is away; the
    // keys go on in their epoch, so nothing is a gap.
    xadd(&mut conn, 1).await;
    wait_relayed(&gateway, 20).await;
    compute.kill();
    compute = start_node("compute", None, &env).await;
    xadd(&mut conn, 2).await;
    wait_relayed(&gateway, 30).await;
    let (mut socket, reply, replayed) = resume(&gateway, "acme", &last_seen).await;
    assert_eq!(
        (reply["recovered"].as_bool(), replayed),
        (Some(true), 20),
        "{reply}"
    );
    let got = frames(&mut socket, 20).await;
    for (key, frames) in by_key(&got) {
        let seqs: Vec<u64> = frames
            .iter()
            .map(|f| {
                serde_json::from_str::<Value>(f).expect("json")["seq"]
                    .as_u64()
                    .expect("seq")
            })
            .collect();
        assert_eq!(seqs, [2, 3], "{key:?} continues its sequence");
    }
    drop(compute);
}

#[tokio::test]
async fn a_resume_sets_its_subscriptions_and_stays_within_the_queue_bounds() {
    let app = spawn_app_with(&[PARTIAL, ("QUOTEBRIDGE__WEBSOCKET__SEND_QUEUE", "15")]).await;
    let mut output = app.redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    let mut conn = app.redis.connection().await;
    let (socket, _) = app.connect("acme").await;
    let last_seen = first_round_then_leave(socket, &mut conn, &mut output).await;
    let missed = while_away(&mut conn, &mut output, 1..=10).await;

    let url = format!("{}?resume=1", app.ws_url("acme"));
    let (mut socket, _) = connect_ws(&url).await;
    let mut request = last_seen.request();
    request["symbols"] = json!(["R1", "R0"]);
    send_json(&mut socket, request).await;
    // R0's ten missed results fit the queue of 15; R1's ten would not, so
    // R1 gets its latest; R2..R8 are not subscribed any more; R9's ten
    // would not fit either.
    let unsubscribed: Vec<String> = (1..9).map(|n| format!("R{n}")).collect();
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "resumed", "recovered": false, "replayed": 10,
               "unrecovered": {"public": unsubscribed, "private": ["R9"]}})
    );
    let missed = by_key(&missed);
    let mut want = BTreeMap::new();
    for (key, take_all) in [
        ((false, "R0"), true),
        ((false, "R1"), false),
        ((true, "R9"), false),
    ] {
        let key = (key.0, key.1.to_owned());
        let frames = &missed[&key];
        let frames = if take_all {
            frames.clone()
        } else {
            frames[frames.len() - 1..].to_vec()
        };
        want.insert(key, frames);
    }
    assert_eq!(by_key(&frames(&mut socket, 12).await), want);

    // Live: only what it resumed with, and its own private key.
    publish_all(&mut conn, &round(11, "quotes")).await;
    let live = outputs(&mut output, 10).await;
    let live: Vec<String> = live
        .into_iter()
        .filter(|f| matches!(key_of(f), (false, s) if s == "R0" || s == "R1") || key_of(f).0)
        .collect();
    assert_eq!(by_key(&frames(&mut socket, 3).await), by_key(&live));

    // A key named under two epochs is ambiguous: refused, and the socket
    // goes live as it was.
    let (mut other, _) = connect_ws(&url).await;
    let ambiguous = json!({"op": "resume", "public": {"e1": {"R0": 1}, "e2": {"R0": 2}}});
    send_json(&mut other, ambiguous).await;
    let refused = next_json(&mut other).await;
    assert!(
        refused["message"]
            .as_str()
            .expect("an error")
            .contains("more than one epoch"),
        "{refused}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_held_socket_that_never_resumes_goes_live_after_the_resume_wait() {
    let app = spawn_app_with(&[PARTIAL, ("QUOTEBRIDGE__WEBSOCKET__RESUME_WAIT_MS", "500")]).await;
    let url = format!("{}?resume=1", app.ws_url("acme"));
    let (mut socket, _) = connect_ws(&url).await;
    let mut conn = app.redis.connection().await;
    publish_all(&mut conn, &round(0, "quotes")).await;
    // Held: nothing of that round comes; past the hold, the next one does.
    tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
    publish_all(&mut conn, &round(1, "quotes")).await;
    let frame = next_json(&mut socket).await;
    assert_eq!(
        frame["price"], 1.5,
        "the first frame is live, not held: {frame}"
    );
    app.shutdown().await;
}
