//! Counters every part of the bridge bumps, and [`COUNTERS`], the one table
//! that names and describes each for `/stats` and `/metrics` alike.
//!
//! Plain atomics: one writer per hot counter (the listener), relaxed ordering,
//! no locks, nothing allocated per event.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde_json::{Map, Value};

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
    /// Results not delivered because their key's history already held them.
    pub results_repeated: AtomicU64,
    /// SMA results computed and handed to Redis and the sockets.
    pub smas_emitted: AtomicU64,
    /// SMA results whose window held a price outside the exact decimal
    /// domain: their mean is a compensated `f64` sum's, not the exact mean
    /// rounded once.
    pub smas_inexact: AtomicU64,
    /// `[[series]]` results computed and published.
    pub series_results: AtomicU64,
    /// Quotes a time-based series left out: more than its lateness behind
    /// the key's newest `ts`, or in a candle already closed.
    pub series_late: AtomicU64,
    /// Quotes a time-based series refused: `ts` more than its
    /// `max_future_ms` ahead of the clock.
    pub series_future: AtomicU64,
    /// Messages (SMA and rejected) Redis acknowledged.
    pub published: AtomicU64,
    /// Messages lost because a publish to Redis failed.
    pub publish_failed: AtomicU64,
    /// Direct messages received for client groups.
    pub direct_messages: AtomicU64,
    /// Frames queued to sockets.
    pub frames_queued: AtomicU64,
    /// Sockets closed because they fell behind.
    pub slow_consumer_closes: AtomicU64,
    /// Results a socket skipped: replaced, before they were sent, by a newer one of their key (conflation, or a subscription's max_rate).
    pub frames_conflated: AtomicU64,
    /// Conflated batches sent: times a socket that fell behind caught up with the latest of each key.
    pub conflations: AtomicU64,
    /// Sockets dropped because a write waited websocket.write_timeout_ms: the client stopped reading.
    pub write_timeouts: AtomicU64,
    /// Sockets closed for sending faster than allowed.
    pub rate_limited_closes: AtomicU64,
    /// Sockets closed for not answering pings.
    pub keepalive_timeouts: AtomicU64,
    /// Sockets and event streams closed because their token expired.
    pub token_expiry_closes: AtomicU64,
    /// Tokens sockets renewed in place (`{"op":"refresh"}`).
    pub token_refreshes: AtomicU64,
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
    /// HTTP requests held back because their connection asked faster than the per-connection pace.
    pub http_requests_paced: AtomicU64,
    /// Stream mode: batches applied with MULTI/EXEC.
    pub stream_batches: AtomicU64,
    /// Stream mode: entries replayed after a restart or claimed from another consumer.
    pub stream_replayed: AtomicU64,
    /// Resume requests answered with every key recovered.
    pub resumes_recovered: AtomicU64,
    /// Resume requests answered with `recovered: false` for some key.
    pub resumes_unrecovered: AtomicU64,
    /// Missed results sent to sockets that resumed.
    pub frames_replayed: AtomicU64,
    /// Connections refused with 429 for their client code's limits.
    pub client_limit_refusals: AtomicU64,
    /// Keys released for having had no quote for `sma.key_idle_ms` (their
    /// windows, and what is kept of them in Redis).
    pub keys_released: AtomicU64,
    /// Keys released from the history and snapshots kept for sockets, for
    /// having had no result for `sma.key_idle_ms`.
    pub history_keys_released: AtomicU64,
    /// Results of new keys whose history and snapshot were not kept, for
    /// `sma.max_keys` keys having them already (on a gateway, keys relayed
    /// from Redis; a resume of such a key reports a gap).
    pub history_keys_refused: AtomicU64,
    /// A gauge: (client, symbol) keys with a window now (at most `sma.max_keys`).
    pub keys: AtomicU64,
    /// Stream mode, a gauge: entries of the input stream the consumer group
    /// has not yet acknowledged (pending plus not yet delivered), as last measured.
    pub stream_lag: AtomicU64,
}

/// The gauges read off the running bridge when `/stats` or `/metrics` is asked.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Open WebSocket connections.
    pub sockets: usize,
    /// Client groups with at least one open socket.
    pub groups: usize,
    /// Whether `/readyz` would answer 200.
    pub ready: bool,
    /// Bytes the results kept for resuming sockets hold.
    pub history_bytes: usize,
    /// Keys whose results are kept for resuming sockets.
    pub history_keys: usize,
    /// Payload bytes waiting in sockets' outboxes.
    pub queued_bytes: usize,
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

    /// The counters and `gauges` as JSON.
    #[must_use]
    pub fn to_json(&self, gauges: &Gauges) -> Value {
        let by_reason: Map<String, Value> = Reject::LABELS
            .iter()
            .zip(&self.quotes_rejected)
            .map(|(label, count)| ((*label).to_owned(), count.load(Relaxed).into()))
            .collect();
        let mut json: Map<String, Value> = COUNTERS
            .iter()
            .map(|counter| (counter.name.to_owned(), counter.read(self).into()))
            .collect();
        json.insert(REJECTED.name.into(), REJECTED.read(self).into());
        for gauge in GAUGES {
            json.insert(gauge.name.into(), gauge.read(self, gauges).into());
        }
        json.insert(format!("{}_by_reason", REJECTED.name), by_reason.into());
        Value::Object(json)
    }
}

/// One counter as the outside sees it: `name` in `/stats`, and
/// `quotebridge_{name}_total` in `/metrics`, with `help` as its HELP text.
#[derive(Debug)]
pub struct Counter {
    /// The name in `/stats`.
    pub name: &'static str,
    /// What it counts.
    pub help: &'static str,
    /// How to read it.
    value: fn(&Stats) -> u64,
}

impl Counter {
    /// Its current value in `stats`.
    #[must_use]
    pub fn read(&self, stats: &Stats) -> u64 {
        (self.value)(stats)
    }

    /// Its name in the Prometheus exposition.
    #[must_use]
    pub fn prometheus_name(&self) -> String {
        format!("quotebridge_{}_total", self.name)
    }
}

/// Rejected payloads: one counter per [`Reject`] reason, a `reason` label in
/// `/metrics`, a total and `…_by_reason` in `/stats`.
pub const REJECTED: Counter = Counter {
    name: "quotes_rejected",
    help: "Payloads rejected, by reason",
    value: Stats::rejected_total,
};

/// Every other counter, defined once.
pub const COUNTERS: &[Counter] = &[
    Counter {
        name: "quotes_received",
        help: "Payloads received on the input channels or stream",
        value: |stats| stats.quotes_received.load(Relaxed),
    },
    Counter {
        name: "quotes_other_shard",
        help: "Valid quotes skipped because another compute shard owns their symbol",
        value: |stats| stats.quotes_other_shard.load(Relaxed),
    },
    Counter {
        name: "results_relayed",
        help: "Results a gateway received from compute nodes and fanned out",
        value: |stats| stats.results_relayed.load(Relaxed),
    },
    Counter {
        name: "results_unroutable",
        help: "Messages on the output channels a gateway could not route",
        value: |stats| stats.results_unroutable.load(Relaxed),
    },
    Counter {
        name: "results_repeated",
        help: "Results not delivered because their key's history already holds them (same epoch, seq and bytes)",
        value: |stats| stats.results_repeated.load(Relaxed),
    },
    Counter {
        name: "smas_emitted",
        help: "SMA results computed and sent to Redis and sockets",
        value: |stats| stats.smas_emitted.load(Relaxed),
    },
    Counter {
        name: "smas_inexact",
        help: "SMA results whose window held a price outside the exact decimal domain (more than 15 significant digits or 18 decimal places): a compensated f64 mean, not the exact mean rounded once",
        value: |stats| stats.smas_inexact.load(Relaxed),
    },
    Counter {
        name: "series_results",
        help: "Results of the [[series]] computed and published",
        value: |stats| stats.series_results.load(Relaxed),
    },
    Counter {
        name: "series_late",
        help: "Quotes a time-based series left out as late (behind its lateness, or for a closed candle)",
        value: |stats| stats.series_late.load(Relaxed),
    },
    Counter {
        name: "series_future",
        help: "Quotes a time-based series refused for a ts more than its max_future_ms ahead of the clock",
        value: |stats| stats.series_future.load(Relaxed),
    },
    Counter {
        name: "published",
        help: "Messages Redis acknowledged (SMA results and rejection notices)",
        value: |stats| stats.published.load(Relaxed),
    },
    Counter {
        name: "publish_failed",
        help: "Messages lost because a publish to Redis failed",
        value: |stats| stats.publish_failed.load(Relaxed),
    },
    Counter {
        name: "direct_messages",
        help: "Direct messages received for client groups",
        value: |stats| stats.direct_messages.load(Relaxed),
    },
    Counter {
        name: "frames_queued",
        help: "WebSocket frames queued to sockets",
        value: |stats| stats.frames_queued.load(Relaxed),
    },
    Counter {
        name: "slow_consumer_closes",
        help: "Sockets closed for falling behind",
        value: |stats| stats.slow_consumer_closes.load(Relaxed),
    },
    Counter {
        name: "frames_conflated",
        help: "Results a socket skipped for a newer one of their key (conflation or max_rate)",
        value: |stats| stats.frames_conflated.load(Relaxed),
    },
    Counter {
        name: "conflations",
        help: "Conflated batches sent: a socket that fell behind caught up with the latest of each key",
        value: |stats| stats.conflations.load(Relaxed),
    },
    Counter {
        name: "write_timeouts",
        help: "Sockets dropped because a write waited websocket.write_timeout_ms (the client stopped reading)",
        value: |stats| stats.write_timeouts.load(Relaxed),
    },
    Counter {
        name: "rate_limited_closes",
        help: "Sockets closed for sending too fast",
        value: |stats| stats.rate_limited_closes.load(Relaxed),
    },
    Counter {
        name: "keepalive_timeouts",
        help: "Sockets closed for not answering pings",
        value: |stats| stats.keepalive_timeouts.load(Relaxed),
    },
    Counter {
        name: "token_expiry_closes",
        help: "Sockets and event streams closed because their token expired",
        value: |stats| stats.token_expiry_closes.load(Relaxed),
    },
    Counter {
        name: "token_refreshes",
        help: "Tokens sockets renewed in place with a refresh request",
        value: |stats| stats.token_refreshes.load(Relaxed),
    },
    Counter {
        name: "frames_too_large",
        help: "Frames refused because one alone exceeds websocket.send_queue_bytes",
        value: |stats| stats.frames_too_large.load(Relaxed),
    },
    Counter {
        name: "snapshots_skipped",
        help: "Snapshots not sent on subscribe for lack of outbox room",
        value: |stats| stats.snapshots_skipped.load(Relaxed),
    },
    Counter {
        name: "subscription_overflows",
        help: "Times the Redis subscription buffer overflowed and was re-established",
        value: |stats| stats.subscription_overflows.load(Relaxed),
    },
    Counter {
        name: "http_header_timeouts",
        help: "HTTP connections closed for not sending request headers in time",
        value: |stats| stats.http_header_timeouts.load(Relaxed),
    },
    Counter {
        name: "http_requests_paced",
        help: "HTTP requests held back because their connection asked faster than 20 a second",
        value: |stats| stats.http_requests_paced.load(Relaxed),
    },
    Counter {
        name: "redis_resubscribes",
        help: "Times the Redis input was re-established after a loss",
        value: |stats| stats.redis_resubscribes.load(Relaxed),
    },
    Counter {
        name: "resumes_recovered",
        help: "Resume requests answered with every key recovered",
        value: |stats| stats.resumes_recovered.load(Relaxed),
    },
    Counter {
        name: "resumes_unrecovered",
        help: "Resume requests answered with recovered: false for some key",
        value: |stats| stats.resumes_unrecovered.load(Relaxed),
    },
    Counter {
        name: "frames_replayed",
        help: "Missed results sent to sockets that resumed",
        value: |stats| stats.frames_replayed.load(Relaxed),
    },
    Counter {
        name: "stream_batches",
        help: "Stream mode: batches applied with MULTI/EXEC",
        value: |stats| stats.stream_batches.load(Relaxed),
    },
    Counter {
        name: "client_limit_refusals",
        help: "WebSocket and event-stream connections refused with 429: the client code had server.max_connections_per_client open, or opened new ones faster than server.connects_per_client_per_second",
        value: |stats| stats.client_limit_refusals.load(Relaxed),
    },
    Counter {
        name: "keys_released",
        help: "Keys released after sma.key_idle_ms without a quote (their windows and saved state)",
        value: |stats| stats.keys_released.load(Relaxed),
    },
    Counter {
        name: "history_keys_released",
        help: "Keys whose history and snapshot, kept for sockets, were released after sma.key_idle_ms without a result",
        value: |stats| stats.history_keys_released.load(Relaxed),
    },
    Counter {
        name: "history_keys_refused",
        help: "Results of new keys not kept in the history and snapshots for sockets, because sma.max_keys keys had them (on a gateway: keys relayed from Redis); they are still delivered, but a resume of such a key reports a gap",
        value: |stats| stats.history_keys_refused.load(Relaxed),
    },
    Counter {
        name: "stream_replayed",
        help: "Stream mode: entries replayed or claimed after a failure",
        value: |stats| stats.stream_replayed.load(Relaxed),
    },
];

/// One gauge: `name` in `/stats`, `quotebridge_{name}` in `/metrics`.
#[derive(Debug)]
pub struct Gauge {
    /// The name in `/stats`.
    pub name: &'static str,
    /// What it measures.
    pub help: &'static str,
    /// How to read it.
    value: fn(&Stats, &Gauges) -> u64,
}

impl Gauge {
    /// Its current value.
    #[must_use]
    pub fn read(&self, stats: &Stats, gauges: &Gauges) -> u64 {
        (self.value)(stats, gauges)
    }

    /// Its name in the Prometheus exposition.
    #[must_use]
    pub fn prometheus_name(&self) -> String {
        format!("quotebridge_{}", self.name)
    }
}

/// Every gauge, defined once.
pub const GAUGES: &[Gauge] = &[
    Gauge {
        name: "sockets",
        help: "Open WebSocket connections",
        value: |_, gauges| gauges.sockets as u64,
    },
    Gauge {
        name: "groups",
        help: "Client groups with at least one open socket",
        value: |_, gauges| gauges.groups as u64,
    },
    Gauge {
        name: "ready",
        help: "1 while /readyz answers 200 (the Redis input is established), else 0",
        value: |_, gauges| u64::from(gauges.ready),
    },
    Gauge {
        name: "history_bytes",
        help: "Bytes held by the results kept for sockets that resume (websocket.history_bytes bounds it)",
        value: |_, gauges| gauges.history_bytes as u64,
    },
    Gauge {
        name: "history_keys",
        help: "Keys whose results are kept for sockets that resume (sma.max_keys bounds it; on a gateway, the keys relayed from Redis; idle ones are released after sma.key_idle_ms)",
        value: |_, gauges| gauges.history_keys as u64,
    },
    Gauge {
        name: "queued_bytes",
        help: "Payload bytes waiting in sockets' outboxes (each at most websocket.send_queue_bytes, and as much again in the latest frame of each key while it conflates)",
        value: |_, gauges| gauges.queued_bytes as u64,
    },
    Gauge {
        name: "keys",
        help: "(client, symbol) keys with a window now (sma.max_keys bounds it; idle ones are released after sma.key_idle_ms)",
        value: |stats, _| stats.keys.load(Relaxed),
    },
    Gauge {
        name: "stream_lag",
        help: "Stream mode: input entries the consumer group has not acknowledged yet",
        value: |stats, _| stats.stream_lag.load(Relaxed),
    },
];
