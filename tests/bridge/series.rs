//! `[[series]]` through real Redis: every kind's results on its own
//! channel, each with its own positions, late quotes left out of the
//! time-based kinds and counted; on the sockets and event streams that
//! subscribe to them (closed candles only, snapshots, resume).

use std::collections::HashMap;
use std::num::NonZeroU32;

use quotebridge::config::Settings;
use quotebridge::series::ema::Ema;
use serde_json::Value;

use std::process::Stdio;

use crate::binary::Serve;
use crate::support::*;

pub(crate) const SERIES: &str = r#"
[[series]]
name = "sma.3"
kind = "sma"
window = 3

[[series]]
name = "sma.1s"
kind = "sma"
window = "1s"

[[series]]
name = "ema.2"
kind = "ema"
span = 2

[[series]]
name = "candles.1m"
kind = "candles"
interval = "1m"
update_ms = 0
channel = "candles.{symbol}"

[[series]]
name = "ticker.1h"
kind = "ticker"
window = "1h"
step = "1m"
"#;

/// Settings from a configuration file holding `toml`, and `env`.
pub(crate) fn settings_from_file(toml: &str, env: &[(&str, &str)]) -> Settings {
    let path = std::env::temp_dir().join(format!(
        "quotebridge-series-{}-{}.toml",
        std::process::id(),
        free_port()
    ));
    std::fs::write(&path, toml).expect("config file written");
    let vars: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let settings = Settings::load_with_env(Some(&path), Some(vars));
    let _ = std::fs::remove_file(&path);
    settings.expect("test settings are valid")
}

/// A Redis server and a bridge on it serving [`SERIES`], with SMAs of 2.
async fn series_bridge() -> (RedisServer, Running) {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let settings = settings_from_file(
        SERIES,
        &[
            ("QUOTEBRIDGE__REDIS__URL", &url),
            ("QUOTEBRIDGE__SMA__WINDOW", "2"),
        ],
    );
    let bridge = Running::on_redis(settings);
    bridge.wait_until_ready().await;
    (redis, bridge)
}

#[tokio::test]
async fn every_kind_publishes_on_its_own_channel() {
    let (redis, bridge) = series_bridge().await;
    let channels = ["sma", "sma.3", "sma.1s", "ema.2", "candles.X", "ticker.1h"];
    let mut output = redis.subscribe(&channels).await;
    let mut output = output.on_message();
    let (mut socket, _) = connect_ws(&format!("ws://{}/ws/c1", bridge.address)).await;

    let quotes = [
        (60_000, "10", "1"),
        (60_500, "11", "2"),
        (61_000, "12", "1"),
        (120_000, "13", "1"),
        // Late for the time-based kinds: two minutes behind.
        (1_000, "99", "5"),
    ];
    let messages: Vec<_> = quotes
        .iter()
        .map(|(ts, price, volume)| {
            let q = format!(r#"{{"symbol":"X","price":{price},"volume":{volume},"ts":{ts}}}"#);
            ("quotes".to_owned(), q.into_bytes())
        })
        .collect();
    let mut conn = redis.connection().await;
    publish_all(&mut conn, &messages).await;

    // 4 SMA + 5 + 4 + 5 + 5 (4 candles, one of them closing) + 4.
    let mut by_channel: HashMap<String, Vec<Value>> = HashMap::new();
    for _ in 0..4 + 5 + 4 + 5 + 5 + 4 {
        let (channel, payload) = next_redis(&mut output).await;
        let value: Value = serde_json::from_str(&payload).expect("JSON");
        by_channel.entry(channel).or_default().push(value);
    }
    let got = |channel: &str, field: &str| -> Vec<Value> {
        by_channel[channel]
            .iter()
            .map(|v| v[field].clone())
            .collect()
    };
    for channel in channels.into_iter().skip(1) {
        for frame in &by_channel[channel] {
            crate::schemas::assert_valid("series", frame);
        }
        let seqs: Vec<u64> = got(channel, "seq")
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "{channel}: its own sequence");
        assert!(
            by_channel[channel]
                .iter()
                .all(|v| v["symbol"] == "X" && v["series"].is_string()),
            "{channel}"
        );
    }
    // Exact means of the decimals: 124 / 3, rounded once.
    assert_eq!(got("sma.3", "sma"), [10.0, 10.5, 11.0, 12.0, 124.0 / 3.0]);
    assert_eq!(got("sma.3", "count"), [1, 2, 3, 3, 3]);
    // (59.5 s, 60.5 s] holds 10 and 11; (60 s, 61 s] only 11 and 12.
    assert_eq!(got("sma.1s", "sma"), [10.0, 10.5, 11.5, 13.0]);
    assert_eq!(got("sma.1s", "complete"), [true, true, true, true]);
    let mut ema = Ema::new(NonZeroU32::new(2).expect("non-zero"));
    let want: Vec<f64> = [10.0, 11.0, 12.0, 13.0, 99.0].map(|p| ema.push(p)).into();
    assert_eq!(got("ema.2", "ema"), want);
    let candles = &by_channel["candles.X"];
    assert_eq!(
        got("candles.X", "closed"),
        [false, false, false, true, false]
    );
    let first = &candles[3];
    assert_eq!(
        (first["start"].as_u64(), first["end"].as_u64()),
        (Some(60_000), Some(120_000))
    );
    assert_eq!(
        [
            &first["open"],
            &first["high"],
            &first["low"],
            &first["close"]
        ],
        [10.0, 12.0, 10.0, 12.0]
    );
    // (10 × 1 + 11 × 2 + 12 × 1) / 4
    assert_eq!(
        (&first["volume"], &first["vwap"], &first["trades"]),
        (&4.0.into(), &11.0.into(), &3.into())
    );
    assert_eq!(candles[4]["start"], 120_000);
    assert_eq!(got("ticker.1h", "last"), [10.0, 11.0, 12.0, 13.0]);
    assert_eq!(got("ticker.1h", "change"), [0.0, 1.0, 2.0, 3.0]);
    assert_eq!(got("ticker.1h", "volume"), [1.0, 3.0, 4.0, 5.0]);

    let (_, stats) = http_get(bridge.address, "/stats").await;
    let stats: Value = serde_json::from_str(&stats).expect("JSON");
    assert_eq!(stats["series_results"], 5 + 4 + 5 + 5 + 4, "{stats}");
    assert_eq!(
        stats["series_late"], 3,
        "one quote, three time-based series"
    );

    // A socket on the default subscriptions had the SMA only: its four
    // results, then the direct message published after them.
    let fence = ("client.c1".to_owned(), b"fence".to_vec());
    publish_all(&mut redis.connection().await, &[fence]).await;
    for _ in 0..4 {
        let frame: Value = serde_json::from_str(&next_text(&mut socket).await).expect("JSON");
        assert!(
            frame["sma"].is_number() && frame.get("series").is_none(),
            "{frame}"
        );
    }
    assert_eq!(next_text(&mut socket).await, "fence");
}

/// Frames off `socket` until `count` results have come, by series
/// (`"sma"` for the SMA's).
async fn results_by_series(socket: &mut Socket, count: usize) -> HashMap<String, Vec<Value>> {
    let mut by_series: HashMap<String, Vec<Value>> = HashMap::new();
    for _ in 0..count {
        let frame = next_json(socket).await;
        assert!(frame["seq"].is_u64(), "a result: {frame}");
        let series = frame["series"].as_str().unwrap_or("sma").to_owned();
        by_series.entry(series).or_default().push(frame);
    }
    by_series
}

fn field(frames: &[Value], name: &str) -> Vec<Value> {
    frames.iter().map(|frame| frame[name].clone()).collect()
}

#[tokio::test]
async fn sockets_and_event_streams_subscribe_to_series_and_resume_them() {
    let (redis, bridge) = series_bridge().await;
    let ws = |code: &str| format!("ws://{}/ws/{code}", bridge.address);

    // The welcome lists what may be named; a subscribe names series.
    let (mut both, welcome) = connect_ws(&ws("c1")).await;
    assert_eq!(
        welcome["series"],
        serde_json::json!(["sma", "sma.3", "sma.1s", "ema.2", "candles.1m", "ticker.1h"])
    );
    assert_eq!(welcome["subscriptions"], serde_json::json!(["*"]));
    crate::schemas::assert_valid("welcome", &welcome);
    send_json(
        &mut both,
        serde_json::json!({"op":"subscribe","symbols":["X"],"series":["candles.1m","ema.2"]}),
    )
    .await;
    assert_eq!(
        next_json(&mut both).await,
        serde_json::json!({"type":"subscribed","symbols":["*","X@candles.1m","X@ema.2"]})
    );
    // Closed candles only, of every symbol, and no SMA.
    let (mut closed, _) = connect_ws(&ws("c2")).await;
    for request in [
        serde_json::json!({"op":"subscribe","symbols":["*"],"series":["candles.1m"],"closed_only":true}),
        serde_json::json!({"op":"unsubscribe","symbols":["*"],"series":["sma"]}),
    ] {
        crate::schemas::assert_valid("client-request", &request);
        send_json(&mut closed, request).await;
        crate::schemas::assert_valid("subscribed", &next_json(&mut closed).await);
    }
    // An unknown series is refused, naming what is served.
    assert_refused(
        &mut closed,
        serde_json::json!({"op":"subscribe","symbols":["X"],"series":["ema.9"]}),
        "unknown series \"ema.9\"",
    )
    .await;
    // Symbols times series are held to websocket.max_symbols before any is
    // spelled out, and duplicates count once.
    let max = Settings::defaults()
        .expect("defaults")
        .websocket
        .max_symbols;
    let symbols: Vec<String> = (0..=max / 2).map(|n| format!("S{n}")).collect();
    let twice = [symbols.clone(), symbols.clone()].concat();
    assert_refused(
        &mut closed,
        serde_json::json!({"op":"subscribe","symbols":symbols,"series":["sma","ema.2","ema.2"]}),
        "too many symbols",
    )
    .await;
    send_json(
        &mut closed,
        serde_json::json!({"op":"subscribe","symbols":twice,"series":["ema.2"]}),
    )
    .await;
    let taken = next_json(&mut closed).await;
    assert_eq!(taken["type"], "subscribed", "{taken}");
    send_json(
        &mut closed,
        serde_json::json!({"op":"unsubscribe","symbols":symbols,"series":["ema.2"]}),
    )
    .await;
    next_json(&mut closed).await;

    let quotes = [
        (60_000, "10"),
        (60_500, "11"),
        (61_000, "12"),
        (120_000, "13"),
    ];
    let messages: Vec<_> = quotes
        .iter()
        .map(|(ts, price)| {
            let q = format!(r#"{{"symbol":"X","price":{price},"volume":1,"ts":{ts}}}"#);
            ("quotes".to_owned(), q.into_bytes())
        })
        .collect();
    let mut conn = redis.connection().await;
    publish_all(&mut conn, &messages).await;

    // 3 SMA, 4 EMA and 5 candles (the first closes as the fourth quote opens
    // the next): the frames Redis carries, each series in its own order.
    let got = results_by_series(&mut both, 3 + 4 + 5).await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(field(&got["ema.2"], "seq"), [1, 2, 3, 4]);
    assert_eq!(field(&got["sma"], "seq"), [1, 2, 3]);
    assert_eq!(
        field(&got["candles.1m"], "closed"),
        [false, false, false, true, false]
    );
    assert_eq!(field(&got["candles.1m"], "seq"), [1, 2, 3, 4, 5]);
    let epoch = got["candles.1m"][0]["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();

    // The closed-only socket had the closed candle alone, then the fence.
    let fence = ("client.c2".to_owned(), b"fence".to_vec());
    publish_all(&mut redis.connection().await, &[fence]).await;
    let only = next_json(&mut closed).await;
    assert_eq!(
        (&only["closed"], &only["seq"]),
        (&true.into(), &4.into()),
        "{only}"
    );
    assert_eq!(next_text(&mut closed).await, "fence");

    // A new subscriber gets the key's latest result first.
    let (mut late, _) = connect_ws(&ws("c3")).await;
    send_json(
        &mut late,
        serde_json::json!({"op":"subscribe","symbols":["X"],"series":["ticker.1h"]}),
    )
    .await;
    next_json(&mut late).await;
    let snapshot = next_json(&mut late).await;
    assert_eq!(
        (&snapshot["series"], &snapshot["seq"], &snapshot["last"]),
        (&"ticker.1h".into(), &4.into(), &13.0.into()),
        "{snapshot}"
    );

    // A socket that saw candle 2 resumes the series' key by its name.
    let (mut resumed, _) = connect_ws(&format!("{}?resume=1", ws("c4"))).await;
    send_json(
        &mut resumed,
        serde_json::json!({"op":"resume","public":{epoch.as_str():{"X@candles.1m":2}},"symbols":["X"],"series":["candles.1m"]}),
    )
    .await;
    let reply = next_json(&mut resumed).await;
    crate::schemas::assert_valid("resumed", &reply);
    assert_eq!(
        (&reply["recovered"], &reply["replayed"]),
        (&true.into(), &3.into()),
        "{reply}"
    );
    let replayed: Vec<Value> = [
        next_json(&mut resumed).await,
        next_json(&mut resumed).await,
        next_json(&mut resumed).await,
    ]
    .into();
    assert_eq!(field(&replayed, "seq"), [3, 4, 5]);

    // An event stream names series too; its ids name the series' key.
    let path = "/sse/c5?symbols=X&series=ema.2";
    let (head, mut events) = crate::sse::Events::open(bridge.address, path, None).await;
    assert!(
        head.starts_with("http/1.1 200") || head.starts_with("http/1.0 200"),
        "{head}"
    );
    let (event, latest) = events.next_json().await;
    assert_eq!(
        (&latest["series"], &latest["seq"]),
        (&"ema.2".into(), &4.into())
    );
    assert_eq!(
        event.id.as_deref(),
        Some(format!("{epoch}:4:p:X@ema.2").as_str())
    );
    let (status, body) = http_get(bridge.address, "/sse/c6?series=nope").await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn a_gateway_relays_every_series_to_its_sockets() {
    let redis = RedisServer::start().await;
    let path = std::env::temp_dir().join(format!(
        "quotebridge-series-gateway-{}-{}.toml",
        std::process::id(),
        free_port()
    ));
    std::fs::write(&path, SERIES).expect("config file written");
    let config = path.to_str().expect("a UTF-8 path");
    let node = |role: &'static str| {
        let redis = &redis;
        async move {
            let env = [
                ("QUOTEBRIDGE__NODE__ROLE", role),
                ("QUOTEBRIDGE__SMA__WINDOW", "2"),
            ];
            Serve::start_with(redis, &["--config", config], &env, Stdio::null()).await
        }
    };
    let gateway = node("gateway").await;
    let _compute = node("compute").await;

    let (mut socket, welcome) = connect_ws(&format!("ws://{}/ws/c1", gateway.address)).await;
    assert_eq!(welcome["series"][4], "candles.1m");
    send_json(
        &mut socket,
        serde_json::json!({"op":"subscribe","symbols":["X"],"series":["candles.1m","ema.2"]}),
    )
    .await;
    next_json(&mut socket).await;
    let mut conn = redis.connection().await;
    // Not a result of the series whose channel it came on: not relayed.
    redis::cmd("PUBLISH")
        .arg("ema.2")
        .arg(r#"{"symbol":"X","series":"sma.3","seq":1,"epoch":"e1"}"#)
        .query_async::<i64>(&mut conn)
        .await
        .expect("published");
    let quotes: Vec<_> = [(60_000, "10"), (61_000, "11"), (120_000, "12")]
        .iter()
        .map(|(ts, price)| {
            let q = format!(r#"{{"symbol":"X","price":{price},"volume":1,"ts":{ts}}}"#);
            ("quotes".to_owned(), q.into_bytes())
        })
        .collect();
    publish_all(&mut conn, &quotes).await;
    // 2 SMA (window 2), 3 EMA, 4 candles (the first closes at the third quote).
    let got = results_by_series(&mut socket, 2 + 3 + 4).await;
    assert_eq!(field(&got["ema.2"], "seq"), [1, 2, 3]);
    assert_eq!(
        field(&got["candles.1m"], "closed"),
        [false, false, true, false]
    );
    let (_, stats) = http_get(gateway.address, "/stats").await;
    let stats: Value = serde_json::from_str(&stats).expect("JSON");
    assert_eq!(stats["results_unroutable"], 1, "{stats}");
    // A closed-only socket on the gateway: the relayed candle says it closed.
    let (mut closed, _) = connect_ws(&format!("ws://{}/ws/c2", gateway.address)).await;
    for request in [
        serde_json::json!({"op":"subscribe","symbols":["X"],"series":["candles.1m"],"closed_only":true}),
        serde_json::json!({"op":"unsubscribe","symbols":["*"],"series":["sma"]}),
    ] {
        send_json(&mut closed, request).await;
        next_json(&mut closed).await;
    }
    publish_all(
        &mut conn,
        &[(
            "quotes".to_owned(),
            br#"{"symbol":"X","price":13,"volume":1,"ts":180000}"#.to_vec(),
        )],
    )
    .await;
    let candle = next_json(&mut closed).await;
    assert_eq!(
        (&candle["closed"], &candle["start"]),
        (&true.into(), &120_000.into()),
        "{candle}"
    );

    // Compute nodes keep each public series key's latest result beside the
    // SMA's: a gateway that starts now answers a subscribe with it.
    let latest: Option<String> = redis::cmd("HGET")
        .arg("quotebridge:latest")
        .arg("X@ema.2")
        .query_async(&mut conn)
        .await
        .expect("HGET");
    let latest: Value = serde_json::from_str(&latest.expect("kept")).expect("JSON");
    assert_eq!(latest["seq"], 4, "{latest}");
    let late_gateway = node("gateway").await;
    let _ = std::fs::remove_file(&path);
    let (mut socket, _) = connect_ws(&format!("ws://{}/ws/c3", late_gateway.address)).await;
    send_json(
        &mut socket,
        serde_json::json!({"op":"subscribe","symbols":["X"],"series":["ema.2"]}),
    )
    .await;
    next_json(&mut socket).await;
    assert_eq!(next_json(&mut socket).await, latest, "the snapshot first");
}

#[test]
fn a_bad_series_table_fails_in_one_line_naming_what_to_change() {
    for (toml, says) in [
        (
            "[[series]]\nname = \"sma\"\nkind = \"sma\"\nwindow = 5\n",
            "not \"sma\"",
        ),
        ("[[series]]\nname = \"e\"\nkind = \"ema\"\n", "needs `span`"),
        (
            "[[series]]\nname = \"c\"\nkind = \"candles\"\ninterval = \"5 minutes\"\n",
            "not a duration",
        ),
        (
            "[[series]]\nname = \"s\"\nkind = \"sma\"\nwindow = 3\nchannel = \"sma\"\n",
            "channel \"sma\"",
        ),
        (
            "[[series]]\nname = \"t\"\nkind = \"ticker\"\nwindow = 24\n",
            "a time",
        ),
        (
            "[[series]]\nname = \"t\"\nkind = \"ticker\"\nwindow = \"24h\"\nstep = \"1s\"\n",
            "a 10000th",
        ),
        (
            "[redis]\noutput = \"sma.{symbol}\"\n[[series]]\nname = \"sma.50\"\nkind = \"sma\"\nwindow = 50\n",
            "channel \"sma.50\"",
        ),
        (
            "[[series]]\nname = \"a\"\nkind = \"ema\"\nspan = 2\n[[series]]\nname = \"a\"\nkind = \"ema\"\nspan = 3\n",
            "named twice",
        ),
    ] {
        let path =
            std::env::temp_dir().join(format!("quotebridge-bad-series-{}.toml", free_port()));
        std::fs::write(&path, toml).expect("written");
        let err = Settings::load_with_env(Some(&path), Some(HashMap::new()))
            .expect_err(toml)
            .to_string();
        let _ = std::fs::remove_file(&path);
        assert!(err.contains(says) && !err.contains('\n'), "{toml}: {err}");
    }
    let path =
        std::env::temp_dir().join(format!("quotebridge-cluster-series-{}.toml", free_port()));
    std::fs::write(
        &path,
        format!("[redis]\ncluster_nodes = [\"redis://127.0.0.1:7000\"]\n{SERIES}"),
    )
    .expect("written");
    let err = Settings::load_with_env(Some(&path), Some(HashMap::new()))
        .expect_err("a cluster partitions series' channels: no {symbol}")
        .to_string();
    let _ = std::fs::remove_file(&path);
    assert!(
        err.contains("candles.{symbol}") && err.contains("Redis Cluster"),
        "{err}"
    );
}

#[test]
fn the_example_configuration_loads_every_series() {
    let path = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/series.example.toml"
    ));
    let settings = Settings::load_with_env(Some(path), Some(HashMap::new())).expect("valid");
    let names: Vec<&str> = settings.series.iter().map(|s| &*s.spec.name).collect();
    assert_eq!(
        names,
        [
            "sma.20",
            "sma.50",
            "sma.200",
            "sma.5m",
            "ema.20",
            "candles.1m",
            "candles.5m",
            "ticker.24h"
        ]
    );
}

/// Durable stream mode: every series' state is saved in the MULTI/EXEC of
/// the batch that changed it, so a bridge killed with SIGKILL twice, mid
/// stream, publishes on every series channel exactly what an uninterrupted
/// one would, byte for byte.
#[tokio::test]
async fn kill_dash_nine_mid_stream_continues_every_series_bit_for_bit() {
    const QUOTES: usize = 20_000;
    const SYMBOLS: usize = 7;
    let path =
        std::env::temp_dir().join(format!("quotebridge-durable-series-{}.toml", free_port()));
    std::fs::write(&path, SERIES).expect("config file written");
    let config = path.to_str().expect("a UTF-8 path").to_owned();
    let settings = Settings::load_with_env(Some(&path), Some(HashMap::new())).expect("valid");
    let env = [
        ("QUOTEBRIDGE__REDIS__INPUT_MODE", "stream"),
        ("QUOTEBRIDGE__REDIS__STREAM_BATCH", "100"),
    ];
    let quotes: Vec<(String, String, String, u64)> = (0..QUOTES)
        .map(|i| {
            // S6 goes quiet halfway: the feed's progress closes its candles.
            let n = if i % SYMBOLS == 6 && i > QUOTES / 2 {
                5
            } else {
                i % SYMBOLS
            };
            let symbol = format!("S{n}");
            let price = format!("{}.{:02}", 100 + (i * 7919) % 37, (i * 31) % 100);
            let volume = format!("{}", (i * 13) % 500);
            // 50 ms apart, one in 50 a little late, one in 400 too late.
            let mut ts = 1_000_000 + 50 * i as u64;
            if i % 50 == 7 {
                ts -= 2_000;
            }
            if i % 400 == 9 {
                ts -= 60_000;
            }
            (symbol, price, volume, ts)
        })
        .collect();

    let redis = RedisServer::start().await;
    let channels: Vec<String> = settings
        .series
        .iter()
        .flat_map(|s| (0..SYMBOLS).map(move |k| s.channel.replace("{symbol}", &format!("S{k}"))))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let channel_names: Vec<&str> = channels.iter().map(String::as_str).collect();
    let mut output = redis.subscribe(&channel_names).await;
    let mut output = output.on_message();
    let mut conn = redis.connection().await;
    let payloads: Vec<Vec<u8>> = quotes
        .iter()
        .map(|(symbol, price, volume, ts)| {
            format!(r#"{{"symbol":"{symbol}","price":{price},"volume":{volume},"ts":{ts}}}"#)
                .into_bytes()
        })
        .collect();
    crate::durable::xadd_all(&mut conn, &payloads).await;

    let total = reference(&settings, &quotes, "e").len();

    let mut serve = crate::binary::Serve::start_with(
        &redis,
        &["--config", &config],
        &env,
        std::process::Stdio::null(),
    )
    .await;
    let mut got: Vec<(String, String)> = Vec::with_capacity(total);
    for fraction in [0.2, 0.6] {
        while got.len() < (total as f64 * fraction) as usize {
            got.push(next_redis(&mut output).await);
        }
        serve.kill();
        serve = crate::binary::Serve::start_with(
            &redis,
            &["--config", &config],
            &env,
            std::process::Stdio::null(),
        )
        .await;
    }
    while got.len() < total {
        got.push(next_redis(&mut output).await);
    }
    let _ = std::fs::remove_file(&path);
    let epoch = serde_json::from_str::<Value>(&got[0].1).expect("JSON")["epoch"]
        .as_str()
        .expect("an epoch")
        .to_owned();
    let expected = reference(&settings, &quotes, &epoch);
    if let Some(i) = got.iter().zip(&expected).position(|(g, e)| g != e) {
        panic!(
            "output {i} differs:\n got  {:?}\n want {:?}",
            got[i], expected[i]
        );
    }
    assert_eq!(got.len(), expected.len());
    // Nothing more: no result was published twice.
    redis::cmd("PUBLISH")
        .arg(channel_names[0])
        .arg("end")
        .query_async::<i64>(&mut conn)
        .await
        .expect("published");
    assert_eq!(
        next_redis(&mut output).await.1,
        "end",
        "a result published twice"
    );
    drop(serve);
}

/// What an uninterrupted bridge publishes for `quotes` on the series
/// channels, in order, every key in `epoch`.
fn reference(
    settings: &Settings,
    quotes: &[(String, String, String, u64)],
    epoch: &str,
) -> Vec<(String, String)> {
    use quotebridge::decimal::Decimal;
    use quotebridge::series::{Input, Position, State};
    let mut states: HashMap<(usize, &str), (State, u64)> = HashMap::new();
    let mut expected = Vec::new();
    // The feed's event time, which closes the candles of quiet keys.
    let mut feed = 0;
    for (symbol, price, volume, ts) in quotes {
        let input = Input {
            ts: *ts,
            price: price.parse().expect("a price"),
            decimal: Decimal::parse(price),
            volume: Some((volume.parse().expect("a volume"), Decimal::parse(volume))),
        };
        for (n, series) in settings.series.iter().enumerate() {
            let (state, seq) = states
                .entry((n, symbol.as_str()))
                .or_insert_with(|| (series.spec.start(), 0));
            for output in state.push(&series.spec, &input).results {
                *seq += 1;
                let at = Position {
                    symbol,
                    client: None,
                    ts: *ts,
                    seq: *seq,
                    epoch,
                };
                expected.push((
                    series.channel.replace("{symbol}", symbol),
                    output.encode(&series.spec, input.price, &at),
                ));
            }
        }
        if *ts <= feed {
            continue;
        }
        feed = *ts;
        // Every open candle whose end is `lateness_ms` behind the feed
        // closes, by when it was due, then series, then symbol.
        let mut due: Vec<(u64, usize, &str)> = states
            .iter()
            .filter_map(|(&(n, symbol), (state, _))| {
                let at = state.closes_at(&settings.series[n].spec)?;
                (at <= feed).then_some((at, n, symbol))
            })
            .collect();
        due.sort_unstable();
        for (_, n, symbol) in due {
            let series = &settings.series[n];
            let Some((state, seq)) = states.get_mut(&(n, symbol)) else {
                continue;
            };
            let Some(output) = state.close_quiet(&series.spec, feed) else {
                continue;
            };
            *seq += 1;
            let at = Position {
                symbol,
                client: None,
                ts: feed,
                seq: *seq,
                epoch,
            };
            expected.push((
                series.channel.replace("{symbol}", symbol),
                output.encode(&series.spec, 0.0, &at),
            ));
        }
    }
    expected
}
