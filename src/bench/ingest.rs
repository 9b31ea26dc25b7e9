//! Ingest: quotes/s end to end through the bridge, against the Redis ceiling
//! — the same messages published and received with no bridge in between.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::clients::{publisher, spawn_subscriber, wait_for};
use super::{Environment, Row, Scenario, quote};
use crate::Error;
use crate::broker::BrokerError;

/// Most messages published but not yet received; keeps every subscriber
/// (the bridge's included) within reach of Redis's output buffers.
const MAX_IN_FLIGHT: u64 = 100_000;

/// The series of the example configuration (SMA 20/50/200, SMA 5m, EMA 20,
/// candles 1m and 5m, a 24-hour ticker): what the second row computes
/// besides the SMA.
pub(super) const EXAMPLE_SERIES: &str = include_str!("../../config/series.example.toml");

/// Two rows: the SMA alone, then with the example configuration's series
/// (each quote then also makes a result of every series, published on its
/// own channel), each against the same Redis ceiling, with the messages the
/// bridge published a second (results of every series and notices).
pub async fn run(
    environment: &Environment,
    quotes: usize,
    symbols: usize,
) -> Result<Vec<Row>, Error> {
    let payloads: Vec<Bytes> = (0..quotes).map(|i| quote(i, symbols, i as u64)).collect();

    let ceiling = pump(environment, "bench.ceiling", "bench.ceiling", &payloads).await?;
    let ceiling_rate = quotes as f64 / ceiling.as_secs_f64();
    // One file per run: runs in one process (tests) must not share it.
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let example = std::env::temp_dir().join(format!(
        "quotebridge-bench-series-{}-{}.toml",
        std::process::id(),
        RUNS.fetch_add(1, Relaxed)
    ));
    std::fs::write(&example, EXAMPLE_SERIES)
        .map_err(|e| Error::io(format!("cannot write {}", example.display()), e))?;
    let mut rows = Vec::new();
    for (config, what) in [(None, ""), (Some(example.as_path()), ", example series")] {
        let bridge = environment
            .start_bridge_with(
                &[
                    ("REDIS__INPUT", "bench.quotes".into()),
                    ("REDIS__OUTPUT", "bench.sma".into()),
                    ("SMA__EMIT_PARTIAL", "true".into()),
                    ("SMA__MAX_KEYS", (symbols + 1).to_string()),
                    ("REDIS__PUBLISH_QUEUE", "65536".into()),
                ],
                config,
            )
            .await?;
        let bridged = pump(environment, "bench.quotes", "bench.sma", &payloads).await;
        // Every message the bridge published: with series, several a quote.
        let stats = crate::health::body_of(bridge.address, "/stats").await;
        let published = stats
            .ok()
            .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|stats| stats["published"].as_f64());
        bridge.stop().await;
        let elapsed = bridged?.as_secs_f64();
        let bridge_rate = quotes as f64 / elapsed;
        rows.push(
            Row::new(
                Scenario::Ingest,
                format!(
                    "{quotes} quotes / {symbols} symbols, {}{what}",
                    environment.role
                ),
            )
            .with("bridge_quotes_per_s", bridge_rate.round())
            .with("ceiling_msgs_per_s", ceiling_rate.round())
            .with(
                "ratio",
                (bridge_rate / ceiling_rate * 100.0).round() / 100.0,
            )
            .with(
                "published_per_s",
                published.map_or(0.0, |n| (n / elapsed).round()),
            ),
        );
    }
    let _ = std::fs::remove_file(&example);
    Ok(rows)
}

/// Publishes `payloads` on `publish_to`, pipelined, and times until as many
/// messages have arrived on `receive_from`.
async fn pump(
    environment: &Environment,
    publish_to: &str,
    receive_from: &str,
    payloads: &[Bytes],
) -> Result<Duration, Error> {
    let received = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let subscriber =
        spawn_subscriber(&environment.redis, receive_from, &received, &stop, false).await?;
    let mut conn = publisher(&environment.redis).await?;

    let start = Instant::now();
    let mut published = 0u64;
    for chunk in payloads.chunks(1000) {
        while published.saturating_sub(received.load(Relaxed)) > MAX_IN_FLIGHT {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        let mut pipe = redis::pipe();
        for payload in chunk {
            pipe.publish(publish_to, payload.as_ref()).ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(BrokerError::from)?;
        published += chunk.len() as u64;
    }
    let complete = wait_for(&received, published, Duration::from_secs(120)).await;
    let elapsed = start.elapsed();
    stop.cancel();
    let _ = subscriber.await;
    if !complete {
        return Err(Error::Input(format!(
            "{receive_from}: only {} of {published} messages arrived",
            received.load(Relaxed)
        )));
    }
    Ok(elapsed)
}
