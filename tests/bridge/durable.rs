//! Durable stream mode: nothing lost across crashes, nothing applied twice.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use quotebridge::decimal::Decimal;
use quotebridge::protocol::SmaMessage;
use quotebridge::sma::SmaWindow;
use redis::streams::StreamRangeReply;
use serde_json::{Value, json};

use crate::binary::Serve;
use crate::support::*;

const STREAM_MODE: (&str, &str) = ("QUOTEBRIDGE__REDIS__INPUT_MODE", "stream");

/// Creates the bridge's consumer group and reads every entry as
/// `consumer`, acknowledging none: what a consumer that crashed (or went
/// away) between XREADGROUP and EXEC leaves pending.
async fn read_without_acknowledging(conn: &mut redis::aio::MultiplexedConnection, consumer: &str) {
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", "quotes.stream", "quotebridge", "0"])
        .query_async(conn)
        .await
        .expect("the group");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP",
            "quotebridge",
            consumer,
            "STREAMS",
            "quotes.stream",
            ">",
        ])
        .query_async(conn)
        .await
        .expect("read, never acknowledged");
}

pub(crate) async fn xadd_all(conn: &mut redis::aio::MultiplexedConnection, quotes: &[Vec<u8>]) {
    for chunk in quotes.chunks(1000) {
        let mut pipe = redis::pipe();
        for quote in chunk {
            pipe.cmd("XADD")
                .arg("quotes.stream")
                .arg("*")
                .arg("quote")
                .arg(quote.as_slice())
                .ignore();
        }
        pipe.query_async::<()>(conn).await.expect("XADD pipeline");
    }
}

async fn xlen(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> usize {
    redis::cmd("XLEN")
        .arg(key)
        .query_async(conn)
        .await
        .expect("XLEN")
}

/// Entries delivered to the group but not acknowledged.
async fn pending(conn: &mut redis::aio::MultiplexedConnection) -> usize {
    let (count, _, _, _): (usize, redis::Value, redis::Value, redis::Value) =
        redis::cmd("XPENDING")
            .arg("quotes.stream")
            .arg("quotebridge")
            .query_async(conn)
            .await
            .expect("XPENDING");
    count
}

#[tokio::test]
async fn stream_input_is_processed_acknowledged_and_restored_after_a_restart() {
    let window = ("QUOTEBRIDGE__SMA__WINDOW", "3");
    let app = spawn_app_with(&[STREAM_MODE, window]).await;
    let mut output = app.redis.subscribe(&["sma", "quotes.rejected"]).await;
    let mut output = output.on_message();
    let (mut socket, _) = app.connect("acme").await;
    let mut conn = app.redis.connection().await;
    let quotes: Vec<Vec<u8>> = [
        r#"{"symbol":"A","price":1,"ts":1}"#,
        "garbage",
        r#"{"symbol":"A","price":2,"ts":2}"#,
        r#"{"symbol":"A","price":3,"ts":3}"#,
    ]
    .iter()
    .map(|q| q.as_bytes().to_vec())
    .collect();
    xadd_all(&mut conn, &quotes).await;
    let (channel, rejected) = next_redis(&mut output).await;
    assert_eq!(channel, "quotes.rejected");
    assert!(rejected.contains("not valid JSON"));
    let (channel, payload) = next_redis(&mut output).await;
    assert_eq!(channel, "sma");
    assert_eq!(
        serde_json::from_str::<Value>(&payload).expect("json")["sma"],
        2.0
    );
    assert_eq!(
        next_text(&mut socket).await,
        payload,
        "the socket gets the same bytes after EXEC"
    );
    eventually("every entry to be acknowledged", async || {
        (pending(&mut conn).await == 0).then_some(())
    })
    .await;

    // A new bridge on the same Redis continues the window where it stopped.
    let redis = app.take_redis().await;
    let app = spawn_app_on(redis, &[STREAM_MODE, window]);
    app.wait_until_ready().await;
    let mut conn = app.redis.connection().await;
    let mut output = app.redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    xadd_all(&mut conn, &[br#"{"symbol":"A","price":7,"ts":4}"#.to_vec()]).await;
    let (_, payload) = next_redis(&mut output).await;
    assert_eq!(
        serde_json::from_str::<Value>(&payload).expect("json")["sma"],
        4.0,
        "(2 + 3 + 7) / 3"
    );
    app.shutdown().await;
}

/// The reference: what an uninterrupted bridge emits for `quotes`, byte for
/// byte, when every key's sequence runs in `epoch`.
fn uninterrupted_run(quotes: &[Value], window: usize, epoch: &str) -> Vec<String> {
    let capacity = NonZeroUsize::new(window).expect("non-zero");
    let mut windows: HashMap<(Option<String>, String), (SmaWindow, u64)> = HashMap::new();
    let mut outputs = Vec::new();
    for q in quotes {
        let client = q["client"].as_str();
        let symbol = q["symbol"].as_str().expect("symbol");
        let price = q["price"].as_f64().expect("price");
        let (w, seq) = windows
            .entry((client.map(str::to_owned), symbol.to_owned()))
            .or_insert_with(|| (SmaWindow::new(capacity), 0));
        let average = w.push(price, Decimal::parse(&price.to_string()));
        if w.is_full() {
            *seq += 1;
            let message = SmaMessage {
                symbol,
                price,
                sma: average.mean,
                window,
                count: average.count,
                ts: q["ts"].as_u64().expect("ts"),
                seq: *seq,
                epoch,
                client,
            };
            outputs.push(message.encode().to_string());
        }
    }
    outputs
}

/// The epoch of an output message.
fn epoch_of(output: &str) -> String {
    let message: Value = serde_json::from_str(output).expect("an SMA message");
    message["epoch"].as_str().expect("an epoch").to_owned()
}

async fn stream_replayed(serve: &Serve) -> u64 {
    let (_, body) = http_get(serve.address, "/stats").await;
    serde_json::from_str::<Value>(&body).expect("stats")["stream_replayed"]
        .as_u64()
        .expect("counter")
}

#[tokio::test]
async fn entries_read_but_never_applied_are_replayed_on_start() {
    // What a crash between XREADGROUP and EXEC leaves behind: entries
    // delivered to this consumer and never acknowledged.
    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;
    let quotes: Vec<Vec<u8>> = (1..=3)
        .map(|p| format!(r#"{{"symbol":"A","price":{p},"ts":{p}}}"#).into_bytes())
        .collect();
    xadd_all(&mut conn, &quotes).await;
    read_without_acknowledging(&mut conn, "bridge-1").await;
    assert_eq!(pending(&mut conn).await, 3);

    let mut output = redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    let app = spawn_app_on(redis, &[STREAM_MODE, ("QUOTEBRIDGE__SMA__WINDOW", "3")]);
    let (_, payload) = next_redis(&mut output).await;
    assert_eq!(
        serde_json::from_str::<Value>(&payload).expect("json")["sma"],
        2.0
    );
    app.wait_for_stats("the replay to be counted", |s| s["stream_replayed"] == 3)
        .await;
    let mut conn = app.redis.connection().await;
    assert_eq!(pending(&mut conn).await, 0);
    drop(output);
    app.shutdown().await;
}

#[tokio::test]
async fn kill_dash_nine_twice_mid_stream_loses_nothing_and_duplicates_nothing() {
    const QUOTES: usize = 100_000;
    let env = [
        STREAM_MODE,
        ("QUOTEBRIDGE__REDIS__OUTPUT_STREAM", "sma.out"),
        ("QUOTEBRIDGE__REDIS__STREAM_BATCH", "200"),
    ];
    let quotes: Vec<Value> = (0..QUOTES)
        .map(|i| {
            let mut q = json!({"symbol": format!("S{}", i % 97), "price": 100.0 + ((i * 7919) % 1013) as f64 / 7.0, "ts": i});
            if i % 5 == 0 {
                q["client"] = json!(["alpha", "beta"][i % 2]);
            }
            q
        })
        .collect();
    // Every key starts in the first run: one epoch throughout.
    let expected_len = uninterrupted_run(&quotes, 10, "e").len();

    // The whole input is queued first, so the bridge is always mid-work when
    // it is killed.
    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;
    let payloads: Vec<Vec<u8>> = quotes.iter().map(|q| q.to_string().into_bytes()).collect();
    xadd_all(&mut conn, &payloads).await;
    let mut serve = Serve::start(&redis, &env).await;
    let mut replayed = 0;

    for fraction in [0.15, 0.5] {
        let threshold = (expected_len as f64 * fraction) as usize;
        let at_kill = eventually("output to reach the kill point", async || {
            let len = xlen(&mut conn, "sma.out").await;
            (len >= threshold).then_some(len)
        })
        .await;
        replayed += stream_replayed(&serve).await;
        serve.child.kill().expect("kill -9"); // SIGKILL: no shutdown code runs
        serve.child.wait().expect("reap");
        eprintln!("killed at {at_kill} of {expected_len} outputs");
        assert!(at_kill < expected_len, "the kill must land mid-stream");
        serve = Serve::start(&redis, &env).await;
    }

    eventually("every output and acknowledgement", async || {
        let done = xlen(&mut conn, "sma.out").await >= expected_len;
        (done && pending(&mut conn).await == 0).then_some(())
    })
    .await;
    let got = output_stream(&mut conn, "sma.out").await;
    let expected = uninterrupted_run(&quotes, 10, &epoch_of(&got[0]));
    replayed += stream_replayed(&serve).await;
    eprintln!("entries replayed after the kills: {replayed}");
    assert_eq!(
        got.len(),
        expected.len(),
        "no output lost and none duplicated"
    );
    if let Some(i) = got.iter().zip(&expected).position(|(g, e)| g != e) {
        panic!(
            "output {i} differs:\n got  {}\n want {}",
            got[i], expected[i]
        );
    }
    drop(serve);
}

#[tokio::test]
async fn stream_mode_shards_take_over_from_one_consumer_applying_nothing_twice() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let env = [
        STREAM_MODE,
        ("QUOTEBRIDGE__REDIS__URL", url.as_str()),
        ("QUOTEBRIDGE__SMA__WINDOW", "3"),
        ("QUOTEBRIDGE__SMA__EMIT_PARTIAL", "true"),
    ];
    let mut pubsub = redis.subscribe(&["sma"]).await;
    let mut output = pubsub.on_message();
    let mut conn = redis.connection().await;
    let mut reference = ReferenceSma::default();
    let mut phase = |ts_base: u64| {
        let mut quotes = Vec::new();
        let mut want = HashMap::new();
        for round in 0..5u32 {
            for n in 0..10u32 {
                let (symbol, price, ts) = (
                    format!("S{n}"),
                    f64::from(round * 10 + n + 1),
                    ts_base + u64::from(round * 10 + n),
                );
                quotes.push(
                    json!({"symbol": symbol, "price": price, "ts": ts})
                        .to_string()
                        .into_bytes(),
                );
                let (sma, count) = reference.push(None, &symbol, price, 3);
                want.insert(ts, json!({"symbol": symbol, "price": price, "sma": sma, "window": 3, "count": count, "ts": ts}));
            }
        }
        (quotes, want)
    };
    let mut receive = async |want: &HashMap<u64, Value>| {
        let mut seen = 0;
        while seen < want.len() {
            let got: Value = serde_json::from_str(&next_redis(&mut output).await.1).expect("JSON");
            let ts = got["ts"].as_u64().expect("ts");
            let expected = want
                .get(&ts)
                .unwrap_or_else(|| panic!("unexpected (replayed?) result {got}"));
            assert_sma(&got, expected);
            seen += 1;
        }
    };

    // One unsharded consumer applies the first half, then stops cleanly.
    let mut single = Serve::launch(&["serve"], &env, std::process::Stdio::null()).await;
    let (quotes, first) = phase(1_000);
    xadd_all(&mut conn, &quotes).await;
    receive(&first).await;
    assert!(single.terminate().await.success());

    // Two compute shards take over: each continues its symbols' windows from
    // the stored state and starts where the unsharded group stopped. They
    // also append to an output stream, and still publish for gateways.
    let sharded: Vec<(&str, &str)> = env
        .iter()
        .copied()
        .chain([("QUOTEBRIDGE__REDIS__OUTPUT_STREAM", "sma.stream")])
        .collect();
    let _shards = [
        Serve::launch(
            &["serve", "--role", "compute", "--shard", "0/2"],
            &sharded,
            std::process::Stdio::null(),
        )
        .await,
        Serve::launch(
            &["serve", "--role", "compute", "--shard", "1/2"],
            &sharded,
            std::process::Stdio::null(),
        )
        .await,
    ];
    let (quotes, second) = phase(2_000);
    xadd_all(&mut conn, &quotes).await;
    receive(&second).await;
    assert_eq!(xlen(&mut conn, "sma.stream").await, second.len());

    // The compute shards kept each symbol's latest result for gateways.
    let latest: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("quotebridge:latest")
        .query_async(&mut conn)
        .await
        .expect("HGETALL");
    assert_eq!(latest.len(), 10);
    for n in 0..10u64 {
        let stored: Value = serde_json::from_str(&latest[&format!("S{n}")]).expect("JSON");
        assert_sma(&stored, &second[&(2_040 + n)]);
    }
}

/// Reads a whole output stream's `sma` fields, in order.
async fn output_stream(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<String> {
    let mut got = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let page: StreamRangeReply = redis::cmd("XRANGE")
            .arg(key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            // Pages small enough to arrive within the client's response
            // timeout on a loaded machine.
            .arg(1_000)
            .query_async(conn)
            .await
            .expect("XRANGE");
        let Some(last) = page.ids.last() else {
            return got;
        };
        start = format!("({}", last.id);
        for entry in &page.ids {
            got.push(entry.get("sma").expect("sma field"));
        }
    }
}

/// A bridge under another consumer name takes over from one killed with a
/// batch in flight: the abandoned batch is applied before anything newer,
/// so the output is bit for bit an uninterrupted run's.
#[tokio::test]
async fn a_takeover_under_another_name_keeps_per_key_order() {
    let quotes: Vec<Value> = (0..3_000)
        .map(|i| json!({"symbol": format!("S{}", i % 5), "price": 100.0 + ((i * 7919) % 1013) as f64 / 7.0, "ts": i}))
        .collect();
    let expected_len = uninterrupted_run(&quotes, 5, "e").len();
    let payloads: Vec<Vec<u8>> = quotes.iter().map(|q| q.to_string().into_bytes()).collect();
    let env = |name| {
        [
            STREAM_MODE,
            ("QUOTEBRIDGE__SMA__WINDOW", "5"),
            ("QUOTEBRIDGE__REDIS__OUTPUT_STREAM", "sma.out"),
            ("QUOTEBRIDGE__REDIS__STREAM_BATCH", "50"),
            ("QUOTEBRIDGE__REDIS__CLAIM_IDLE_MS", "1000"),
            ("QUOTEBRIDGE__REDIS__CONSUMER_NAME", name),
        ]
    };
    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;

    // bridge-1 applies the first thousand, then dies (kill -9) holding the
    // next batch of 50: read, never applied.
    xadd_all(&mut conn, &payloads[..1_000]).await;
    let mut first = Serve::start(&redis, &env("bridge-1")).await;
    let first_share = uninterrupted_run(&quotes[..1_000], 5, "e").len();
    eventually("bridge-1 to apply its share", async || {
        let done = xlen(&mut conn, "sma.out").await >= first_share;
        (done && pending(&mut conn).await == 0).then_some(())
    })
    .await;
    first.kill();
    xadd_all(&mut conn, &payloads[1_000..]).await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("quotebridge")
        .arg("bridge-1")
        .arg("COUNT")
        .arg(50)
        .arg("STREAMS")
        .arg("quotes.stream")
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("the batch bridge-1 had in flight");
    assert_eq!(pending(&mut conn).await, 50);

    // bridge-2 must not read the 1,950 newer entries before it can claim
    // the 50 (after claim_idle_ms).
    let second = Serve::start(&redis, &env("bridge-2")).await;
    eventually("every output and acknowledgement", async || {
        let done = xlen(&mut conn, "sma.out").await >= expected_len;
        (done && pending(&mut conn).await == 0).then_some(())
    })
    .await;
    let got = output_stream(&mut conn, "sma.out").await;
    // bridge-2 continues bridge-1's keys: their sequences, in its epoch.
    let expected = uninterrupted_run(&quotes, 5, &epoch_of(&got[0]));
    assert_eq!(got.len(), expected.len(), "nothing lost, nothing twice");
    if let Some(i) = got.iter().zip(&expected).position(|(g, e)| g != e) {
        panic!(
            "output {i} differs:\n got  {}\n want {}",
            got[i], expected[i]
        );
    }
    assert_eq!(stream_replayed(&second).await, 50);
}

/// `stream_lag` (the gauge the stream-lag alert watches) counts what the
/// group has yet to acknowledge, and falls to zero once it is applied: it
/// is measured again after every batch while it is not zero, so it does not
/// go on showing entries that are done.
#[tokio::test]
async fn stream_lag_counts_what_is_waiting_and_falls_to_zero() {
    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;
    let quotes: Vec<Vec<u8>> = (0..100)
        .map(|i| format!(r#"{{"symbol":"L{}","price":{i},"ts":{i}}}"#, i % 7).into_bytes())
        .collect();
    xadd_all(&mut conn, &quotes).await;
    // A consumer that went away holds all 100: the bridge waits
    // claim_idle_ms before it may take them, and shows them meanwhile.
    read_without_acknowledging(&mut conn, "gone").await;
    let app = spawn_app_on(
        redis,
        &[STREAM_MODE, ("QUOTEBRIDGE__REDIS__CLAIM_IDLE_MS", "3000")],
    );
    app.wait_for_stats("the lag of what another consumer holds", |s| {
        s["stream_lag"] == 100 && s["quotes_received"] == 0
    })
    .await;
    let stats = app
        .wait_for_stats("the lag to fall to zero", |s| {
            s["stream_lag"] == 0 && s["quotes_received"] == 100
        })
        .await;
    assert_eq!(stats["ready"], 1);
    let (_, metrics) = app.get("/metrics").await;
    assert!(
        metrics.contains("\nquotebridge_stream_lag 0\n"),
        "{metrics}"
    );
    app.shutdown().await;
}
