//! Scale-out with real processes: compute shards and gateways of the real
//! binary on one redis-server (this file) and on a Redis Cluster (`cluster.rs`).

use std::collections::BTreeMap;
use std::process::Stdio;

use quotebridge::topology::Shard;
use serde_json::{Value, json};

use crate::binary::Serve;
use crate::support::*;

/// Every quote yields a result (emit_partial), over a window of 3.
pub const NODE_ENV: [(&str, &str); 2] = [
    ("QUOTEBRIDGE__SMA__WINDOW", "3"),
    ("QUOTEBRIDGE__SMA__EMIT_PARTIAL", "true"),
];
pub const WINDOW: usize = 3;

/// `quotebridge serve --role ROLE [--shard I/N]` with `env` on top of [`NODE_ENV`].
pub async fn start_node(role: &str, shard: Option<&str>, env: &[(&str, &str)]) -> Serve {
    let mut args = vec!["serve", "--role", role];
    if let Some(shard) = shard {
        args.extend(["--shard", shard]);
    }
    let env: Vec<(&str, &str)> = NODE_ENV.iter().chain(env).copied().collect();
    Serve::launch(&args, &env, Stdio::null()).await
}

/// A symbol of the form `{prefix}{n}` that shard `index` of 2 owns.
pub fn symbol_of_shard(prefix: &str, index: u32) -> String {
    let shard = Shard::new(index, 2).expect("shard");
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|symbol| shard.owns(symbol))
        .expect("some symbol")
}

/// What one round of input should produce, and the input itself.
pub struct Round {
    /// `(channel, payload)` in publish order; the sentinels come last.
    pub messages: Vec<(String, Vec<u8>)>,
    /// Public results per symbol, in order.
    pub public: BTreeMap<String, Vec<Value>>,
    /// `acme`'s private results per symbol, in order.
    pub private: BTreeMap<String, Vec<Value>>,
    /// The direct payload for each client code.
    pub direct: BTreeMap<String, Value>,
    /// Public symbols quoted last, one per path results take (per compute
    /// shard on one server, per partition on a cluster): order holds along
    /// a path, so once a socket has every sentinel's result it has
    /// everything published before them.
    pub sentinels: Vec<String>,
}

impl Round {
    /// `public_symbols` quoted four times, two private symbols of `acme`,
    /// a direct message to `acme` and `beta`, then the `sentinels`.
    pub fn new(
        number: u64,
        public_symbols: &[String],
        sentinels: Vec<String>,
        reference: &mut ReferenceSma,
        channel_of: &dyn Fn(&str) -> String,
        direct_channel_of: &dyn Fn(&str) -> String,
    ) -> Self {
        let mut round = Round {
            messages: Vec::new(),
            public: BTreeMap::new(),
            private: BTreeMap::new(),
            direct: BTreeMap::new(),
            sentinels,
        };
        let mut ts = number * 1_000_000;
        let mut quote = |round: &mut Round, client: Option<&str>, symbol: &str, price: f64| {
            ts += 1;
            let mut body = json!({"symbol": symbol, "price": price, "ts": ts});
            if let Some(code) = client {
                body["client"] = json!(code);
            }
            round
                .messages
                .push((channel_of(symbol), body.to_string().into_bytes()));
            let (sma, count) = reference.push(client, symbol, price, WINDOW);
            let mut want = json!({"symbol": symbol, "price": price, "sma": sma,
                "window": WINDOW, "count": count, "ts": ts});
            let results = match client {
                Some(code) => {
                    want["client"] = json!(code);
                    &mut round.private
                }
                None => &mut round.public,
            };
            results.entry(symbol.to_owned()).or_default().push(want);
        };
        for step in 0..4u32 {
            for (i, symbol) in public_symbols.iter().enumerate() {
                quote(
                    &mut round,
                    None,
                    symbol,
                    f64::from(step * 7 + i as u32) + 0.25,
                );
            }
            for symbol in ["P1", "P2"] {
                quote(
                    &mut round,
                    Some("acme"),
                    symbol,
                    f64::from(step) * 1.5 + 10.0,
                );
            }
        }
        for code in ["acme", "beta"] {
            let payload = json!({"direct": code, "round": number});
            round
                .messages
                .push((direct_channel_of(code), payload.to_string().into_bytes()));
            round.direct.insert(code.to_owned(), payload);
        }
        for sentinel in round.sentinels.clone() {
            quote(&mut round, None, &sentinel, 1.0);
        }
        round
    }

    /// Reads `socket` until both sentinels arrived and checks it got exactly
    /// what a socket of `client` (subscribed to everything) should.
    pub async fn check_socket(&self, socket: &mut Socket, client: &str) {
        let mut until = UntilSentinels::new(&self.sentinels);
        if self.direct.contains_key(client) {
            // Direct messages may take another path than results (on a
            // cluster they do), so the direct one is awaited too.
            until.missing.push(DIRECT);
        }
        while !until.take(next_json(socket).await) {}
        let none = BTreeMap::new();
        let private = if client == "acme" {
            &self.private
        } else {
            &none
        };
        self.check(
            &until.frames,
            &self.public,
            private,
            self.direct.get(client),
            client,
        );
    }

    fn check(
        &self,
        frames: &[Value],
        public: &BTreeMap<String, Vec<Value>>,
        private: &BTreeMap<String, Vec<Value>>,
        direct: Option<&Value>,
        who: &str,
    ) {
        let mut got_public: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut got_private: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut got_direct = Vec::new();
        for frame in frames {
            match (frame.get("sma"), frame.get("client")) {
                (None, _) => got_direct.push(frame.clone()),
                (Some(_), None) => got_public
                    .entry(symbol(frame))
                    .or_default()
                    .push(frame.clone()),
                (Some(_), Some(_)) => got_private
                    .entry(symbol(frame))
                    .or_default()
                    .push(frame.clone()),
            }
        }
        for (kind, got, want) in [
            ("public", &got_public, public),
            ("private", &got_private, private),
        ] {
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "{who}: {kind} symbols"
            );
            for (symbol, want) in want {
                let got = &got[symbol];
                assert_eq!(
                    got.len(),
                    want.len(),
                    "{who}: {kind} results of {symbol}: {got:?}"
                );
                for (got, want) in got.iter().zip(want) {
                    assert_sma(got, want);
                }
            }
        }
        assert_eq!(
            got_direct,
            direct.into_iter().cloned().collect::<Vec<_>>(),
            "{who}: direct messages"
        );
    }

    /// Checks what a Redis subscriber of the output channel(s) received:
    /// every result once, public and private, and nothing else.
    pub fn check_output(&self, frames: &[Value]) {
        self.check(frames, &self.public, &self.private, None, "output channel");
    }
}

fn symbol(frame: &Value) -> String {
    frame["symbol"].as_str().expect("symbol").to_owned()
}

/// Stands for a round's direct message among the awaited sentinels.
const DIRECT: &str = "(direct message)";

/// Collects frames until each sentinel symbol's result has arrived.
pub struct UntilSentinels<'a> {
    missing: Vec<&'a str>,
    /// Every frame so far, sentinels included.
    pub frames: Vec<Value>,
}

impl<'a> UntilSentinels<'a> {
    pub fn new(sentinels: &'a [String]) -> Self {
        Self {
            missing: sentinels.iter().map(String::as_str).collect(),
            frames: Vec::new(),
        }
    }

    /// Takes `frame`; true once every sentinel has arrived.
    pub fn take(&mut self, frame: Value) -> bool {
        let arrived = match frame.get("symbol").and_then(Value::as_str) {
            Some(symbol) => symbol,
            None if frame.get("direct").is_some() => DIRECT,
            None => "",
        };
        self.missing.retain(|s| *s != arrived);
        self.frames.push(frame);
        self.missing.is_empty()
    }
}

/// Round `number`'s sentinels for two compute shards on one server.
fn sentinels_per_shard(number: u64) -> Vec<String> {
    (0..2)
        .map(|i| symbol_of_shard(&format!("END{number}x"), i))
        .collect()
}

/// Round `number` on one server: quotes on `quotes`, direct messages on
/// `client.{CODE}`.
fn single_server_round(number: u64, symbols: &[String], reference: &mut ReferenceSma) -> Round {
    let to_input = |_: &str| "quotes".to_owned();
    let to_direct = |code: &str| format!("client.{code}");
    Round::new(
        number,
        symbols,
        sentinels_per_shard(number),
        reference,
        &to_input,
        &to_direct,
    )
}

/// Connects `code` to `node`.
pub async fn connect(node: &Serve, code: &str) -> Socket {
    connect_ws(&format!("ws://{}/ws/{code}", node.address))
        .await
        .0
}

fn public_symbols() -> Vec<String> {
    let symbols: Vec<String> = (0..12).map(|n| format!("S{n}")).collect();
    for index in 0..2 {
        let shard = Shard::new(index, 2).expect("shard");
        assert!(
            symbols.iter().any(|s| shard.owns(s)),
            "shard {index} owns some symbols"
        );
    }
    symbols
}

#[tokio::test]
async fn two_compute_shards_and_two_gateways_deliver_every_message_once_to_exactly_its_sockets() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let on_redis = [("QUOTEBRIDGE__REDIS__URL", url.as_str())];
    let compute = [
        start_node("compute", Some("0/2"), &on_redis).await,
        start_node("compute", Some("1/2"), &on_redis).await,
    ];
    let mut gateways = [
        start_node("gateway", None, &on_redis).await,
        start_node("gateway", None, &on_redis).await,
    ];
    // One client code's sockets on both gateways, and another's too.
    let mut acme = [
        connect(&gateways[0], "acme").await,
        connect(&gateways[1], "acme").await,
    ];
    let mut beta = [
        connect(&gateways[0], "beta").await,
        connect(&gateways[1], "beta").await,
    ];
    let mut output = redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();

    let symbols = public_symbols();
    let mut reference = ReferenceSma::default();
    let round = single_server_round(1, &symbols, &mut reference);
    publish_all(&mut redis.connection().await, &round.messages).await;

    for socket in &mut acme {
        round.check_socket(socket, "acme").await;
    }
    for socket in &mut beta {
        round.check_socket(socket, "beta").await;
    }
    let mut published = UntilSentinels::new(&round.sentinels);
    while !published.take(serde_json::from_str(&next_redis(&mut output).await.1).expect("JSON")) {}
    round.check_output(&published.frames);

    // Each shard computed its own symbols and skipped the other's.
    let results: usize = round
        .public
        .values()
        .chain(round.private.values())
        .map(Vec::len)
        .sum();
    let mut emitted = 0;
    for node in &compute {
        let stats = node.stats().await;
        assert!(stats["quotes_other_shard"].as_u64() > Some(0), "{stats}");
        emitted += stats["smas_emitted"].as_u64().expect("count");
    }
    assert_eq!(emitted as usize, results, "every result computed once");
    for gateway in &gateways {
        let stats = gateway.stats().await;
        assert_eq!(
            stats["results_relayed"].as_u64(),
            Some(results as u64),
            "{stats}"
        );
        assert_eq!(
            stats["quotes_received"].as_u64(),
            Some(0),
            "gateways compute nothing"
        );
    }

    // A compute node serves no sockets.
    let (status, _) = http_get(compute[0].address, "/ws/acme").await;
    assert_eq!(status, 404);

    // Killing one gateway leaves the other's sockets fully served.
    gateways[0].kill();
    let round = single_server_round(2, &symbols, &mut reference);
    publish_all(&mut redis.connection().await, &round.messages).await;
    round.check_socket(&mut acme[1], "acme").await;
    round.check_socket(&mut beta[1], "beta").await;
}

#[tokio::test]
async fn a_restarted_compute_shard_resumes_its_symbols_and_a_new_gateway_has_snapshots() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let on_redis = [("QUOTEBRIDGE__REDIS__URL", url.as_str())];
    let mut compute = [
        start_node("compute", Some("0/2"), &on_redis).await,
        start_node("compute", Some("1/2"), &on_redis).await,
    ];
    let gateway = start_node("gateway", None, &on_redis).await;
    let mut socket = connect(&gateway, "acme").await;

    let symbols = public_symbols();
    let mut reference = ReferenceSma::default();
    let round = single_server_round(1, &symbols, &mut reference);
    publish_all(&mut redis.connection().await, &round.messages).await;
    round.check_socket(&mut socket, "acme").await;

    // A gateway started now answers a subscription with the latest results,
    // which it read from the hash the compute nodes keep.
    let no_defaults = [("QUOTEBRIDGE__WEBSOCKET__DEFAULT_SYMBOLS", ""), on_redis[0]];
    let late = start_node("gateway", None, &no_defaults).await;
    let mut newcomer = connect(&late, "beta").await;
    send_json(
        &mut newcomer,
        json!({"op": "subscribe", "symbols": symbols}),
    )
    .await;
    assert_eq!(next_json(&mut newcomer).await["type"], "subscribed");
    let mut snapshots = BTreeMap::new();
    for _ in 0..symbols.len() {
        let frame = next_json(&mut newcomer).await;
        snapshots.insert(symbol(&frame), frame);
    }
    for symbol in &symbols {
        assert_sma(
            &snapshots[symbol],
            round.public[symbol].last().expect("a result"),
        );
    }

    // Kill shard 1 and start it again: its symbols flow again, from fresh
    // windows (pub/sub mode keeps windows in memory; stream mode restores them).
    compute[1].kill();
    compute[1] = start_node("compute", Some("1/2"), &on_redis).await;
    let shard1 = Shard::new(1, 2).expect("shard");
    let mut conn = redis.connection().await;
    let quotes: Vec<(String, Vec<u8>)> = symbols
        .iter()
        .map(|s| {
            (
                "quotes".to_owned(),
                json!({"symbol": s, "price": 500.0, "ts": 9})
                    .to_string()
                    .into_bytes(),
            )
        })
        .collect();
    publish_all(&mut conn, &quotes).await;
    let mut seen = BTreeMap::new();
    while seen.len() < symbols.len() {
        let frame = next_json(&mut socket).await;
        seen.insert(symbol(&frame), frame);
    }
    for symbol in &symbols {
        let frame = &seen[symbol];
        let want_count = if shard1.owns(symbol) { 1 } else { WINDOW };
        assert_eq!(frame["count"], want_count, "{symbol}: {frame}");
        assert_eq!(frame["price"], 500.0);
    }
    assert_eq!(
        compute[1].stats().await["smas_emitted"].as_u64(),
        Some(symbols.iter().filter(|s| shard1.owns(s)).count() as u64)
    );
}

/// Anyone who may publish on the output channel can forge a result; one
/// that is not a result by the schema, or is padded past what the bridge
/// ever writes, is not relayed (a gateway keeps
/// a frame per key in its history and snapshots, so size is what counts).
#[tokio::test]
async fn a_gateway_relays_no_result_longer_than_the_bridge_writes() {
    let redis = RedisServer::start().await;
    let gateway = gateway_on(&redis, &[]).await;
    let mut socket = connect(&gateway, "acme").await;
    let result = |padding: usize, seq: u64| {
        let pad = "x".repeat(padding);
        forged_result("X", seq, &format!(r#","pad":"{pad}""#))
    };
    let padded = result(quotebridge::protocol::MAX_RESULT_BYTES, 1);
    // Not results by the schema: no position, a wrong type, an epoch with
    // a newline (escaped, as JSON must), a count past the window.
    let junk = [
        r#"{"symbol":"X","sma":null}"#,
        r#"{"symbol":"X","price":"1","sma":1,"window":1,"count":1,"ts":1,"seq":3,"epoch":"e1"}"#,
        r#"{"symbol":"X","price":1,"sma":1,"window":1,"count":1,"ts":1,"seq":3,"epoch":"e\n1"}"#,
        r#"{"symbol":"X","price":1,"sma":1,"window":1,"count":2,"ts":1,"seq":3,"epoch":"e1"}"#,
    ]
    .map(|text| ("sma".to_owned(), text.as_bytes().to_vec()));
    let mut messages = vec![padded];
    messages.extend(junk);
    messages.push(result(0, 2));
    publish_all(&mut redis.connection().await, &messages).await;
    let frame = next_json(&mut socket).await;
    assert_eq!(
        frame["seq"], 2,
        "the padded one and the junk were dropped: {frame}"
    );
    let stats = gateway.stats().await;
    assert_eq!(stats["results_unroutable"], 5, "{stats}");
}

/// A gateway keeps the history and snapshots of at most `sma.max_keys`
/// keys: the results of a key past that are still relayed to sockets, but
/// not kept, and that is counted (the alert `QuotebridgeHistoryKeysRefused`
/// reads the counter) beside a gauge of the keys kept.
#[tokio::test]
async fn a_gateway_past_max_keys_relays_a_new_key_without_keeping_it_and_counts_it() {
    let redis = RedisServer::start().await;
    let gateway = gateway_on(&redis, &[("QUOTEBRIDGE__SMA__MAX_KEYS", "2")]).await;
    let mut socket = connect(&gateway, "acme").await;
    let result = |symbol, seq| forged_result(symbol, seq, "");
    let messages = [
        result("A", 1),
        result("B", 1),
        result("C", 1),
        result("C", 2),
    ];
    publish_all(&mut redis.connection().await, &messages).await;
    for (symbol, seq) in [("A", 1), ("B", 1), ("C", 1), ("C", 2)] {
        let frame = next_json(&mut socket).await;
        assert_eq!(
            (frame["symbol"].as_str(), frame["seq"].as_u64()),
            (Some(symbol), Some(seq))
        );
    }
    let stats = gateway.stats().await;
    assert_eq!(stats["history_keys"], 2, "A and B: {stats}");
    assert_eq!(stats["history_keys_refused"], 2, "C's two results: {stats}");
}

/// A gateway of its own on `redis`, with `env` on top of [`NODE_ENV`].
async fn gateway_on(redis: &RedisServer, env: &[(&str, &str)]) -> Serve {
    let url = redis.url();
    let mut env = env.to_vec();
    env.push(("QUOTEBRIDGE__REDIS__URL", url.as_str()));
    start_node("gateway", None, &env).await
}

/// A result as a compute node would publish it on `sma` (anyone who may
/// publish there can), with `extra` members before its closing brace.
fn forged_result(symbol: &str, seq: u64, extra: &str) -> (String, Vec<u8>) {
    let frame = format!(
        r#"{{"symbol":"{symbol}","price":1.0,"sma":1.0,"window":1,"count":1,"ts":1,"seq":{seq},"epoch":"e1"{extra}}}"#
    );
    ("sma".to_owned(), frame.into_bytes())
}
