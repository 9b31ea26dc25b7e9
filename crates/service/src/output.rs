//! The pipelined publisher: one task that takes SMA and rejected messages
//! from a bounded queue and publishes whatever has accumulated in one round
//! trip, so the listener never waits on Redis per quote.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::broker::{Broker, Outbound};
use crate::metrics::Metrics;
use crate::stats::Stats;

/// Most messages in one pipeline.
const MAX_PIPELINE: usize = 1024;

/// A message waiting to be published.
#[derive(Debug)]
pub struct Queued {
    /// What to publish.
    pub outbound: Outbound,
    /// When the quote behind an SMA arrived; `None` for other messages.
    pub since: Option<Instant>,
}

/// Publishes until every sender is dropped and the queue is drained.
///
/// Order is kept: one task, one connection, FIFO queue. A failed pipeline is
/// counted in `publish_failed` and logged; it is not retried (pub/sub is
/// at-most-once; the next pipeline goes out on a reconnected connection).
/// Each acknowledged SMA's quote-to-publish latency is recorded.
pub async fn run<B: Broker>(
    broker: B,
    mut queue: mpsc::Receiver<Queued>,
    stats: Arc<Stats>,
    metrics: Arc<Metrics>,
) {
    // Reused for every pipeline: no allocation per batch once warm.
    let mut queued = Vec::with_capacity(MAX_PIPELINE);
    let mut batch = Vec::with_capacity(MAX_PIPELINE);
    let mut arrivals = Vec::with_capacity(MAX_PIPELINE);
    while queue.recv_many(&mut queued, MAX_PIPELINE).await > 0 {
        for Queued { outbound, since } in queued.drain(..) {
            batch.push(outbound);
            arrivals.extend(since);
        }
        let count = batch.len() as u64;
        match broker.publish(&batch).await {
            Ok(()) => {
                stats.published.fetch_add(count, Relaxed);
                let now = Instant::now();
                for since in &arrivals {
                    metrics.record_publish_latency(now.saturating_duration_since(*since));
                }
            }
            Err(err) => {
                stats.publish_failed.fetch_add(count, Relaxed);
                tracing::warn!(cause = %err, lost = count, "publish to redis failed");
            }
        }
        batch.clear();
        arrivals.clear();
    }
    tracing::debug!("publisher drained and stopped");
}
