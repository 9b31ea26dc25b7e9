//! Counters every part of the bridge bumps and `/stats` reports.
//!
//! Plain atomics: one writer per hot counter (the listener), relaxed ordering,
//! no locks, nothing allocated per event.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde_json::{Map, Value, json};

use crate::quote::Reject;

/// Process-wide counters, shared as `Arc<Stats>`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Payloads received on the input channels.
    pub quotes_received: AtomicU64,
    /// Rejected payloads, indexed like [`Reject::LABELS`].
    pub quotes_rejected: [AtomicU64; Reject::LABELS.len()],
    /// Valid quotes ignored because another compute shard handles their symbol.
    pub quotes_other_shard: AtomicU64,
    /// Results a gateway received on the output channels and fanned out.
    pub results_relayed: AtomicU64,
    /// Messages on the output channels a gateway could not route (not an SMA result).
    pub results_unroutable: AtomicU64,
    /// SMA results computed and handed to Redis and the sockets.
    pub smas_emitted: AtomicU64,
    /// Messages (SMA and rejected) Redis acknowledged.
    pub published: AtomicU64,
    /// Messages lost because a publish to Redis failed.
    pub publish_failed: AtomicU64,
    /// Direct messages received for client groups.
    pub direct_received: AtomicU64,
    /// Frames queued to sockets.
    pub frames_queued: AtomicU64,
    /// Sockets closed because they fell behind.
    pub slow_consumers_closed: AtomicU64,
    /// Sockets closed for sending faster than allowed.
    pub rate_limited_closes: AtomicU64,
    /// Sockets closed for not answering pings.
    pub keepalive_timeouts: AtomicU64,
    /// Times the Redis subscription was re-established after a loss.
    pub redis_resubscribes: AtomicU64,
    /// Frames (direct messages, relayed results) refused because one alone exceeds a socket's byte bound (websocket.send_queue_bytes).
    pub frames_too_large: AtomicU64,
    /// Snapshots a subscribe did not queue because the socket's outbox had no room; those symbols follow with their next results.
    pub snapshots_skipped: AtomicU64,
    /// Times the Redis subscription's bounded buffer overflowed (the listener fell behind) and was re-established.
    pub subscription_overflows: AtomicU64,
    /// HTTP connections closed for not sending a complete request head within server.header_read_timeout_ms.
    pub http_header_timeouts: AtomicU64,
    /// Stream mode: batches applied with MULTI/EXEC.
    pub stream_batches: AtomicU64,
    /// Stream mode: entries replayed after a restart or claimed from another consumer.
    pub stream_replayed: AtomicU64,
}

impl Stats {
    /// Counts one rejected payload.
    pub fn reject(&self, reason: &Reject) {
        self.quotes_rejected[reason.index()].fetch_add(1, Relaxed);
    }

    /// All rejected payloads, whatever the reason.
    #[must_use]
    pub fn rejected_total(&self) -> u64 {
        self.quotes_rejected.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// The counters as JSON, with the hub's live gauges added by the caller.
    #[must_use]
    pub fn to_json(&self) -> Value {
        let by_reason: Map<String, Value> = Reject::LABELS
            .iter()
            .zip(&self.quotes_rejected)
            .map(|(label, count)| ((*label).to_owned(), count.load(Relaxed).into()))
            .collect();
        json!({
            "quotes_received": self.quotes_received.load(Relaxed),
            "quotes_rejected": self.rejected_total(),
            "quotes_rejected_by_reason": by_reason,
            "quotes_other_shard": self.quotes_other_shard.load(Relaxed),
            "smas_emitted": self.smas_emitted.load(Relaxed),
            "results_relayed": self.results_relayed.load(Relaxed),
            "results_unroutable": self.results_unroutable.load(Relaxed),
            "published": self.published.load(Relaxed),
            "publish_failed": self.publish_failed.load(Relaxed),
            "direct_received": self.direct_received.load(Relaxed),
            "frames_queued": self.frames_queued.load(Relaxed),
            "slow_consumers_closed": self.slow_consumers_closed.load(Relaxed),
            "rate_limited_closes": self.rate_limited_closes.load(Relaxed),
            "keepalive_timeouts": self.keepalive_timeouts.load(Relaxed),
            "redis_resubscribes": self.redis_resubscribes.load(Relaxed),
            "frames_too_large": self.frames_too_large.load(Relaxed),
            "snapshots_skipped": self.snapshots_skipped.load(Relaxed),
            "subscription_overflows": self.subscription_overflows.load(Relaxed),
            "http_header_timeouts": self.http_header_timeouts.load(Relaxed),
            "stream_batches": self.stream_batches.load(Relaxed),
            "stream_replayed": self.stream_replayed.load(Relaxed),
        })
    }
}
