//! The published description cannot drift from the code: real messages the
//! bridge produces are validated against docs/schemas/, and every schema the
//! AsyncAPI document references exists.

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

fn schema(name: &str) -> jsonschema::Validator {
    let path = format!(
        "{}/docs/schemas/{name}.schema.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let schema: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"));
    jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("{path} is not a valid schema: {e}"))
}

pub fn assert_valid(schema_name: &str, instance: &Value) {
    let validator = schema(schema_name);
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{instance} does not match {schema_name}: {errors:?}"
    );
}

fn assert_invalid(schema_name: &str, instance: &Value) {
    assert!(
        !schema(schema_name).is_valid(instance),
        "{instance} should not match {schema_name}"
    );
}

#[tokio::test]
async fn real_messages_match_the_published_schemas() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__SMA__WINDOW", "2")]).await;
    let mut redis_out = app.redis.subscribe(&["sma", "quotes.rejected"]).await;
    let mut redis_out = redis_out.on_message();
    let (mut socket, welcome) = app.connect("acme").await;
    assert_valid("welcome", &welcome);

    let request = json!({"op": "subscribe", "symbols": ["AAPL", "*"]});
    assert_valid("client-request", &request);
    send_json(&mut socket, request).await;
    assert_valid("subscribed", &next_json(&mut socket).await);
    socket.send(Message::text("nonsense")).await.expect("send");
    assert_valid("error", &next_json(&mut socket).await);

    let quotes = [
        json!({"symbol": "AAPL", "price": 1.5, "ts": 1}),
        json!({"symbol": "AAPL", "price": 2.5}),
        json!({"symbol": "AAPL", "price": 3, "client": "acme", "ts": 3}),
        json!({"symbol": "AAPL", "price": 4, "client": "acme", "ts": 4}),
    ];
    for quote in &quotes {
        assert_valid("quote", quote);
    }
    let mut payloads: Vec<(String, Vec<u8>)> = quotes
        .iter()
        .map(|q| ("quotes".to_owned(), q.to_string().into_bytes()))
        .collect();
    payloads.push(("quotes".to_owned(), vec![0xff, b'{', 0x80]));
    let mut conn = app.redis.connection().await;
    publish_all(&mut conn, &payloads).await;

    // Public SMA, private SMA and the rejection, on Redis and on the socket.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (channel, payload) = next_redis(&mut redis_out).await;
        let message: Value = serde_json::from_str(&payload).expect("json");
        match channel.as_str() {
            "sma" => assert_valid("sma", &message),
            "quotes.rejected" => assert_valid("rejected", &message),
            other => panic!("unexpected channel {other}"),
        }
        seen.push(message);
    }
    assert!(
        seen.iter().any(|m| m.get("client").is_some()),
        "a private SMA was checked: {seen:?}"
    );
    let mut last_seen = json!({"op": "resume", "public": {}, "private": {}});
    for _ in 0..2 {
        let frame = next_json(&mut socket).await;
        assert_valid("sma", &frame);
        let kind = if frame.get("client").is_some() {
            "private"
        } else {
            "public"
        };
        let epoch = frame["epoch"].as_str().expect("epoch");
        let symbol = frame["symbol"].as_str().expect("symbol");
        last_seen[kind][epoch][symbol] = frame["seq"].clone();
    }

    // A socket that comes back: its request and the reply, then what it missed.
    assert_valid("client-request", &last_seen);
    drop(socket);
    publish_all(
        &mut conn,
        &[(
            "quotes".to_owned(),
            json!({"symbol": "AAPL", "price": 5})
                .to_string()
                .into_bytes(),
        )],
    )
    .await;
    let _ = next_redis(&mut redis_out).await;
    let (mut socket, _) = connect_ws(&format!("{}?resume=1", app.ws_url("acme"))).await;
    send_json(&mut socket, last_seen).await;
    let resumed = next_json(&mut socket).await;
    assert_valid("resumed", &resumed);
    assert_eq!(
        (resumed["recovered"].as_bool(), resumed["replayed"].as_u64()),
        (Some(true), Some(1))
    );
    assert_valid("sma", &next_json(&mut socket).await);

    // The schemas are strict enough to catch drift.
    assert_invalid(
        "sma",
        &json!({"symbol": "A", "price": 1, "sma": 1, "window": 1, "count": 1, "ts": 1, "extra": true}),
    );
    assert_invalid("quote", &json!({"symbol": "A B", "price": 1}));
    assert_invalid("client-request", &json!({"op": "publish", "symbols": []}));
    assert_invalid(
        "client-request",
        &json!({"op": "resume", "public": {"e": {"A": -1}}}),
    );
    assert_invalid("resumed", &json!({"type": "resumed", "recovered": true}));
    let candle = json!({"symbol": "A", "series": "candles.1m", "interval_ms": 60000, "start": 0, "end": 60000,
        "open": 1, "high": 1, "low": 1, "close": 1, "volume": 0, "trades": 1, "vwap": null, "closed": true,
        "ts": 1, "seq": 1, "epoch": "e1"});
    assert_valid("series", &candle);
    let mut open = candle.clone();
    open.as_object_mut().map(|m| m.remove("closed"));
    assert_invalid("series", &open);
    assert_invalid(
        "series",
        &json!({"symbol": "A", "series": "ema.9", "price": 1, "ema": 1, "span": 9,
        "ts": 1, "seq": 1, "epoch": "e1", "extra": 1}),
    );
    assert_invalid(
        "client-request",
        &json!({"op": "subscribe", "symbols": ["A@"]}),
    );
    drop(redis_out);
    app.shutdown().await;
}

#[test]
fn every_schema_the_asyncapi_document_references_exists() {
    let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/docs");
    let asyncapi =
        std::fs::read_to_string(format!("{docs}/asyncapi.yaml")).expect("docs/asyncapi.yaml");
    assert!(
        asyncapi.starts_with("asyncapi: 3."),
        "an AsyncAPI 3 document"
    );
    let referenced: Vec<&str> = asyncapi
        .split("'./schemas/")
        .skip(1)
        .filter_map(|rest| rest.split('\'').next())
        .collect();
    assert_eq!(referenced.len(), 11, "{referenced:?}");
    for file in referenced {
        let text = std::fs::read_to_string(format!("{docs}/schemas/{file}"))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let schema: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        jsonschema::validator_for(&schema)
            .unwrap_or_else(|e| panic!("{file} is not a valid schema: {e}"));
    }
}
