//! Keys that do not live for ever: `sma.max_keys` bounds the keys alive now,
//! and a key with no quote for `sma.key_idle_ms` is released everywhere it
//! lives, so a burst of junk symbols blocks new ones for that long at most.

use serde_json::Value;

use crate::durable::xadd_all;
use crate::support::*;

/// One second: a key is released one to one and a quarter seconds after its
/// last quote.
const IDLE: (&str, &str) = ("QUOTEBRIDGE__SMA__KEY_IDLE_MS", "1000");
const TEN_KEYS: (&str, &str) = ("QUOTEBRIDGE__SMA__MAX_KEYS", "10");
const PARTIAL: (&str, &str) = ("QUOTEBRIDGE__SMA__EMIT_PARTIAL", "true");
const STREAM_MODE: (&str, &str) = ("QUOTEBRIDGE__REDIS__INPUT_MODE", "stream");

fn quote(symbol: &str, price: u32) -> Vec<u8> {
    format!(r#"{{"symbol":"{symbol}","price":{price},"ts":{price}}}"#).into_bytes()
}

fn junk() -> Vec<Vec<u8>> {
    (0..10).map(|n| quote(&format!("JUNK{n}"), n)).collect()
}

async fn publish(conn: &mut redis::aio::MultiplexedConnection, quotes: &[Vec<u8>]) {
    let batch: Vec<(String, Vec<u8>)> = quotes
        .iter()
        .map(|q| ("quotes".to_owned(), q.clone()))
        .collect();
    publish_all(conn, &batch).await;
}

fn too_many_keys(stats: &Value) -> u64 {
    stats["quotes_rejected_by_reason"]["too_many_keys"]
        .as_u64()
        .expect("a count")
}

#[tokio::test]
async fn a_burst_of_junk_symbols_blocks_a_new_listing_only_until_it_is_idle() {
    let app = spawn_app_with(&[IDLE, TEN_KEYS, PARTIAL]).await;
    let mut output = app.redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    let mut conn = app.redis.connection().await;
    publish(&mut conn, &junk()).await;
    let mut old_epoch = Value::Null;
    for _ in 0..10 {
        let (_, result) = next_redis(&mut output).await;
        old_epoch = serde_json::from_str::<Value>(&result).expect("json")["epoch"].clone();
    }
    assert_eq!(app.stats().await["keys"], 10);

    // Every key is taken: the new listing is refused, visibly.
    publish(&mut conn, &[quote("REAL", 100)]).await;
    app.wait_for_stats("the new key to be refused", |s| too_many_keys(s) == 1)
        .await;

    // Once the junk has been idle for key_idle_ms it is gone everywhere.
    let stats = app
        .wait_for_stats("the junk to be released", |s| {
            s["keys_released"] == 10 && s["keys"] == 0 && s["history_keys_released"] == 10
        })
        .await;
    assert_eq!(stats["history_bytes"], 0, "{stats}");
    publish(&mut conn, &[quote("REAL", 101)]).await;
    let (_, result) = next_redis(&mut output).await;
    let result: Value = serde_json::from_str(&result).expect("json");
    assert_eq!(
        (result["symbol"].as_str(), result["seq"].as_u64()),
        (Some("REAL"), Some(1))
    );

    // A junk symbol that comes back starts a new window in a new epoch.
    publish(&mut conn, &[quote("JUNK0", 7)]).await;
    let (_, again) = next_redis(&mut output).await;
    let again: Value = serde_json::from_str(&again).expect("json");
    assert_eq!(again["seq"], 1);
    assert_eq!(again["count"], 1, "a new window");
    assert_ne!(again["epoch"], old_epoch, "in a new epoch");
    app.shutdown().await;
}

#[tokio::test]
async fn in_stream_mode_a_released_key_leaves_no_saved_state() {
    let app = spawn_app_with(&[IDLE, TEN_KEYS, PARTIAL, STREAM_MODE]).await;
    let mut output = app.redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    let mut conn = app.redis.connection().await;
    xadd_all(&mut conn, &junk()).await;
    for _ in 0..10 {
        next_redis(&mut output).await;
    }
    let saved = async |conn: &mut redis::aio::MultiplexedConnection| -> usize {
        redis::cmd("HLEN")
            .arg("quotebridge:windows")
            .query_async(conn)
            .await
            .expect("HLEN")
    };
    assert_eq!(saved(&mut conn).await, 10, "each key's state is saved");
    // The consumer sweeps between reads: entries keep it reading.
    eventually(
        "the saved state of the idle keys to be deleted",
        async || {
            xadd_all(&mut conn, &[quote("TICK", 1)]).await;
            (saved(&mut conn).await == 1).then_some(())
        },
    )
    .await;
    let stats = app.stats().await;
    assert_eq!(stats["keys"], 1, "only TICK is alive: {stats}");
    assert!(stats["keys_released"].as_u64() >= Some(10), "{stats}");
    app.shutdown().await;
}

/// A compute node whose snapshot delete is refused (here: an ACL without
/// HDEL) deletes the released keys' snapshots at a later sweep, once it
/// can, and leaves alone the snapshot of a key that came back meanwhile.
#[tokio::test]
async fn a_snapshot_delete_that_failed_is_done_at_a_later_sweep() {
    let redis = RedisServer::start().await;
    let mut admin = redis.connection().await;
    let acl = |rules: &'static [&'static str]| {
        let mut command = redis::cmd("ACL");
        command.arg("SETUSER").arg("node").arg("on").arg(">pw");
        for rule in rules {
            command.arg(*rule);
        }
        command
    };
    let _: () = acl(&["~*", "&*", "+@all", "-hdel"])
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    let port = redis
        .url()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let url = format!("redis://node:pw@127.0.0.1:{port}");
    let env = [
        IDLE,
        PARTIAL,
        ("QUOTEBRIDGE__NODE__ROLE", "compute"),
        ("QUOTEBRIDGE__REDIS__URL", url.as_str()),
    ];
    let mut bridge = bridge_with(&env).await;
    let stats = async |what: &str, check: &dyn Fn(&Value) -> bool| {
        eventually(what, async || {
            let (_, body) = http_get(bridge.address, "/stats").await;
            let stats: Value = serde_json::from_str(&body).ok()?;
            check(&stats).then_some(())
        })
        .await;
    };
    let mut conn = redis.connection().await;
    publish(&mut conn, &[quote("GONE", 1), quote("BACK", 1)]).await;
    let fields = async |conn: &mut redis::aio::MultiplexedConnection| -> Vec<String> {
        let mut fields: Vec<String> = redis::cmd("HKEYS")
            .arg("quotebridge:latest")
            .query_async(conn)
            .await
            .expect("HKEYS");
        fields.sort();
        fields
    };
    eventually("both snapshots to be stored", async || {
        (fields(&mut conn).await == ["BACK", "GONE"]).then_some(())
    })
    .await;
    stats("both keys to be released", &|s| s["keys_released"] == 2).await;
    assert_eq!(
        fields(&mut conn).await,
        ["BACK", "GONE"],
        "HDEL was refused"
    );

    // BACK comes back (a new snapshot, to be kept); then HDEL is allowed.
    publish(&mut conn, &[quote("BACK", 2)]).await;
    stats("BACK to be alive again", &|s| s["keys"] == 1).await;
    let _: () = acl(&["+hdel"]).query_async(&mut conn).await.expect("ACL");
    eventually(
        "GONE's snapshot to be deleted at a later sweep",
        async || (fields(&mut conn).await == ["BACK"]).then_some(()),
    )
    .await;
    bridge.stop().await;
}
