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
        ("quotebridge_sockets", 1.0),
        ("quotebridge_groups", 1.0),
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

/// Every counter has one name: `NAME` in `/stats` is `quotebridge_NAME_total`
/// (a gauge: `quotebridge_NAME`) in `/metrics`, and the README's table lists
/// each.
#[tokio::test]
async fn stats_metrics_and_the_readme_name_every_counter_alike() {
    use std::collections::BTreeSet;

    let app = spawn_app().await;
    let stats = app.stats().await;
    let (_, metrics) = app.get("/metrics").await;
    let families: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");

    let mut named = BTreeSet::new();
    for name in stats.as_object().expect("an object").keys() {
        if name.ends_with("_by_reason") {
            continue;
        }
        let counter = format!("quotebridge_{name}_total");
        let gauge = format!("quotebridge_{name}");
        let family = if families.contains(counter.as_str()) {
            counter
        } else {
            gauge
        };
        assert!(
            families.contains(family.as_str()),
            "/stats {name} has no /metrics family: {families:?}"
        );
        assert!(
            readme.contains(&format!("| `{name}`")) && readme.contains(&format!("`{family}")),
            "README's table lacks {name} / {family}"
        );
        named.insert(family);
    }
    let histogram = "quotebridge_quote_to_publish_seconds";
    for family in families {
        assert!(
            family == histogram || named.contains(family),
            "/metrics {family} has no /stats counterpart"
        );
    }
}
