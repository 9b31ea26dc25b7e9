//! The pipelined publisher: one task that takes SMA and rejected messages
//! from a bounded queue and publishes whatever has accumulated in one round
//! trip, so the listener never waits on Redis per quote.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::mpsc;

use crate::broker::{Broker, Outbound};
use crate::stats::Stats;

/// Most messages in one pipeline.
const MAX_PIPELINE: usize = 1024;

/// Publishes until every sender is dropped and the queue is drained.
///
/// Order is kept: one task, one connection, FIFO queue. A failed pipeline is
/// counted in `publish_failed` and logged; it is not retried (pub/sub is
/// at-most-once; the next pipeline goes out on a reconnected connection).
pub async fn run<B: Broker>(broker: B, mut queue: mpsc::Receiver<Outbound>, stats: Arc<Stats>) {
    let mut batch = Vec::with_capacity(MAX_PIPELINE);
    while queue.recv_many(&mut batch, MAX_PIPELINE).await > 0 {
        let count = batch.len() as u64;
        match broker.publish(&batch).await {
            Ok(()) => {
                stats.published.fetch_add(count, Relaxed);
            }
            Err(err) => {
                stats.publish_failed.fetch_add(count, Relaxed);
                tracing::warn!(cause = %err, lost = count, "publish to redis failed");
            }
        }
        batch.clear();
    }
    tracing::debug!("publisher drained and stopped");
}
