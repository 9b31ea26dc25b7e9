//! The benchmark's Redis clients: a publisher for load and a subscriber
//! that counts (and times) what the bridge publishes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::histogram::Latency;
use crate::Error;
use crate::bench::ts_of;

/// The Redis the benchmark talks to: its URL, and TLS for a `rediss://` one.
#[derive(Debug, Clone)]
pub struct RedisAt {
    /// The URL.
    pub url: String,
    tls: crate::broker::TlsFiles,
}

impl RedisAt {
    /// `url`, with `tls` for a `rediss://` one.
    pub fn new(url: &str, tls: &crate::broker::TlsFiles) -> Self {
        Self {
            url: url.to_owned(),
            tls: tls.clone(),
        }
    }

    fn client(&self) -> Result<redis::Client, Error> {
        Ok(crate::broker::redis_client(&self.url, &self.tls)?)
    }
}

/// A Redis subscriber on `channel` counting messages into `received` and
/// recording their latency, until `stop`.
pub async fn spawn_subscriber(
    redis: &RedisAt,
    channel: &str,
    received: &Arc<AtomicU64>,
    stop: &CancellationToken,
    measure_latency: bool,
) -> Result<JoinHandle<Latency>, Error> {
    let client = redis.client()?;
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .map_err(crate::broker::BrokerError::from)?;
    pubsub
        .subscribe(channel)
        .await
        .map_err(crate::broker::BrokerError::from)?;
    let received = received.clone();
    let stop = stop.clone();
    Ok(tokio::spawn(async move {
        let mut latency = Latency::new();
        let mut messages = pubsub.into_on_message();
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            let message = tokio::select! {
                biased;
                message = messages.next() => message,
                () = &mut stopped => break,
            };
            let Some(message) = message else { break };
            if measure_latency && let Some(ts) = ts_of(message.get_payload_bytes()) {
                latency.record_since(ts);
            }
            received.fetch_add(1, Relaxed);
        }
        latency
    }))
}

/// A connection for publishing load. Its timeouts are generous: a machine
/// saturated on purpose answers slowly, and that is a result, not an error.
pub async fn publisher(redis: &RedisAt) -> Result<redis::aio::MultiplexedConnection, Error> {
    let client = redis.client()?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(60)));
    let conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(crate::broker::BrokerError::from)?;
    Ok(conn)
}

/// Publishes messages `0..total` at `rate` a second: whatever is due goes
/// out in one pipeline, stamped (`message(i, ts)`) as it leaves, and `after`
/// runs after each pipeline. Returns how many were sent.
pub async fn publish_paced<'c>(
    conn: &mut redis::aio::MultiplexedConnection,
    rate: u64,
    total: u64,
    mut message: impl FnMut(usize, u64) -> (&'c str, bytes::Bytes),
    mut after: impl FnMut(),
) -> Result<u64, Error> {
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due_at = start + Duration::from_secs_f64(sent as f64 / rate as f64);
        tokio::time::sleep_until(due_at).await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
        let mut pipe = redis::pipe();
        let ts = crate::bench::now_ns();
        for i in sent..due.max(sent + 1) {
            let (channel, payload) = message(i as usize, ts);
            pipe.publish(channel, payload.as_ref()).ignore();
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(crate::broker::BrokerError::from)?;
        sent = due.max(sent + 1);
        after();
    }
    Ok(sent)
}

/// Publishes messages `0..count` (`message(i)`) as fast as Redis takes
/// them, and waits until the bridge has published a result for each on
/// `output`; returns the epoch of the first.
pub async fn publish_and_await_results<'c>(
    redis: &RedisAt,
    output: &str,
    count: usize,
    mut message: impl FnMut(usize) -> (&'c str, bytes::Bytes),
) -> Result<String, Error> {
    use crate::broker::BrokerError;
    let client = redis.client()?;
    let mut pubsub = client.get_async_pubsub().await.map_err(BrokerError::from)?;
    pubsub.subscribe(output).await.map_err(BrokerError::from)?;
    let mut conn = publisher(redis).await?;
    for chunk in (0..count).collect::<Vec<_>>().chunks(1_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let (channel, payload) = message(i);
            pipe.publish(channel, payload.as_ref()).ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(BrokerError::from)?;
    }
    let mut results = pubsub.into_on_message();
    let mut epoch = String::new();
    for _ in 0..count {
        let message = tokio::time::timeout(Duration::from_secs(60), results.next())
            .await
            .ok()
            .flatten()
            .ok_or_else(|| Error::Input("the bridge published too few results".into()))?;
        if epoch.is_empty() {
            let sma: serde_json::Value = serde_json::from_slice(message.get_payload_bytes())
                .map_err(|e| Error::Input(format!("not an SMA result: {e}")))?;
            epoch = sma["epoch"].as_str().unwrap_or_default().to_owned();
        }
    }
    Ok(epoch)
}
