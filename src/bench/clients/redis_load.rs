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

/// A Redis subscriber on `channel` counting messages into `received` and
/// recording their latency, until `stop`.
pub async fn spawn_subscriber(
    url: &str,
    channel: &str,
    received: &Arc<AtomicU64>,
    stop: &CancellationToken,
    measure_latency: bool,
) -> Result<JoinHandle<Latency>, Error> {
    let client = crate::broker::redis_client(url).map_err(crate::broker::BrokerError::from)?;
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
pub async fn publisher(url: &str) -> Result<redis::aio::MultiplexedConnection, Error> {
    let client = crate::broker::redis_client(url).map_err(crate::broker::BrokerError::from)?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(60)));
    let conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(crate::broker::BrokerError::from)?;
    Ok(conn)
}
