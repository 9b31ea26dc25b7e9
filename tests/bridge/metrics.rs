//! `GET /metrics`: the Prometheus exposition moves with what the bridge does.

use crate::support::*;

/// The value of the sample line that starts with `series ` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn prometheus_counters_move_as_quotes_flow() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__SMA__WINDOW", "1")]).await;
    let (status, before) = app.get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(&before, "quotebridge_quotes_received_total"),
        Some(0.0),
        "{before}"
    );

    let (_socket, _) = app.connect("acme").await;
    let mut conn = app.redis.connection().await;
    let quotes: Vec<(String, Vec<u8>)> = [
        r#"{"symbol":"A","price":1,"ts":1}"#,
        "not json",
        r#"{"symbol":"A","price":2,"ts":2}"#,
        r#"{"symbol":"A","price":"3"}"#,
        r#"{"symbol":"B","price":3,"ts":3}"#,
    ]
    .iter()
    .map(|q| ("quotes".to_owned(), q.as_bytes().to_vec()))
    .collect();
    publish_all(&mut conn, &quotes).await;
    // 3 SMAs and 2 rejection notices acknowledged by Redis.
    app.wait_for_stats("everything to be published", |s| s["published"] == 5)
        .await;

    let (_, text) = app.get("/metrics").await;
    let expect = [
        ("quotebridge_quotes_received_total", 5.0),
        (
            r#"quotebridge_quotes_rejected_total{reason="malformed"}"#,
            1.0,
        ),
        (
            r#"quotebridge_quotes_rejected_total{reason="invalid_price"}"#,
            1.0,
        ),
        (
            r#"quotebridge_quotes_rejected_total{reason="too_large"}"#,
            0.0,
        ),
        ("quotebridge_smas_emitted_total", 3.0),
        ("quotebridge_published_total", 5.0),
        // The welcome is written by the session itself; queued frames are the three SMAs.
        ("quotebridge_frames_queued_total", 3.0),
        ("quotebridge_websocket_sockets", 1.0),
        ("quotebridge_websocket_groups", 1.0),
        ("quotebridge_quote_to_publish_seconds_count", 3.0),
    ];
    for (series, want) in expect {
        assert_eq!(sample(&text, series), Some(want), "{series} in\n{text}");
    }
    assert!(
        text.contains("# TYPE quotebridge_quote_to_publish_seconds histogram"),
        "{text}"
    );
    app.shutdown().await;
}
