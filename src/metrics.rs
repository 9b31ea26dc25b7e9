//! `GET /metrics`: the counters in Prometheus text format.
//!
//! The hot path keeps counting into [`Stats`]'s plain atomics (no registry
//! lookup per event); at scrape time their values are handed to a
//! metrics-exporter-prometheus recorder of this bridge's own, which renders
//! the exposition. The one histogram, quote-to-publish latency, is recorded
//! as events happen.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use metrics::{Histogram, Key, Label, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::quote::Reject;
use crate::stats::Stats;

const PUBLISH_LATENCY: &str = "quotebridge_quote_to_publish_seconds";

/// Latency buckets, in seconds: 100 µs to 1 s.
const LATENCY_BUCKETS: [f64; 13] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// The bridge's Prometheus recorder. Not installed globally, so several
/// bridges (tests, the benchmark) can live in one process.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    publish_latency: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A recorder of its own, with latency buckets.
    #[must_use]
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new();
        // The matcher and buckets are constants; the fallback is never taken.
        let builder = builder
            .set_buckets_for_metric(Matcher::Full(PUBLISH_LATENCY.to_owned()), &LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        recorder.describe_histogram(
            PUBLISH_LATENCY.into(),
            Some(Unit::Seconds),
            SharedString::const_str(
                "From a quote's arrival to Redis acknowledging its SMA's publish",
            ),
        );
        let publish_latency =
            recorder.register_histogram(&Key::from_static_name(PUBLISH_LATENCY), &metadata());
        Self {
            recorder,
            handle,
            publish_latency,
        }
    }

    /// Records one quote-to-publish latency.
    pub fn record_publish_latency(&self, latency: Duration) {
        self.publish_latency.record(latency.as_secs_f64());
    }

    /// The Prometheus text exposition, with `sockets` and `groups` as gauges.
    #[must_use]
    pub fn render(&self, stats: &Stats, sockets: usize, groups: usize) -> String {
        let counters = [
            (
                "quotebridge_quotes_received_total",
                "Payloads received on the input channels or stream",
                &stats.quotes_received,
            ),
            (
                "quotebridge_quotes_other_shard_total",
                "Valid quotes skipped because another compute shard owns their symbol",
                &stats.quotes_other_shard,
            ),
            (
                "quotebridge_results_relayed_total",
                "Results a gateway received from compute nodes and fanned out",
                &stats.results_relayed,
            ),
            (
                "quotebridge_results_unroutable_total",
                "Messages on the output channels a gateway could not route",
                &stats.results_unroutable,
            ),
            (
                "quotebridge_smas_emitted_total",
                "SMA results computed and sent to Redis and sockets",
                &stats.smas_emitted,
            ),
            (
                "quotebridge_published_total",
                "Messages Redis acknowledged (SMA results and rejection notices)",
                &stats.published,
            ),
            (
                "quotebridge_publish_failed_total",
                "Messages lost because a publish to Redis failed",
                &stats.publish_failed,
            ),
            (
                "quotebridge_direct_messages_total",
                "Direct messages received for client groups",
                &stats.direct_received,
            ),
            (
                "quotebridge_frames_queued_total",
                "WebSocket frames queued to sockets",
                &stats.frames_queued,
            ),
            (
                "quotebridge_slow_consumer_closes_total",
                "Sockets closed for falling behind",
                &stats.slow_consumers_closed,
            ),
            (
                "quotebridge_rate_limited_closes_total",
                "Sockets closed for sending too fast",
                &stats.rate_limited_closes,
            ),
            (
                "quotebridge_keepalive_timeouts_total",
                "Sockets closed for not answering pings",
                &stats.keepalive_timeouts,
            ),
            (
                "quotebridge_frames_too_large_total",
                "Frames refused because one alone exceeds websocket.send_queue_bytes",
                &stats.frames_too_large,
            ),
            (
                "quotebridge_snapshots_skipped_total",
                "Snapshots not sent on subscribe for lack of outbox room",
                &stats.snapshots_skipped,
            ),
            (
                "quotebridge_subscription_overflows_total",
                "Times the Redis subscription buffer overflowed and was re-established",
                &stats.subscription_overflows,
            ),
            (
                "quotebridge_http_header_timeouts_total",
                "HTTP connections closed for not sending request headers in time",
                &stats.http_header_timeouts,
            ),
            (
                "quotebridge_redis_reconnects_total",
                "Times the Redis input was re-established after a loss",
                &stats.redis_resubscribes,
            ),
            (
                "quotebridge_stream_batches_total",
                "Stream mode: batches applied with MULTI/EXEC",
                &stats.stream_batches,
            ),
            (
                "quotebridge_stream_replayed_total",
                "Stream mode: entries replayed or claimed after a failure",
                &stats.stream_replayed,
            ),
        ];
        for (name, help, value) in counters {
            self.recorder
                .describe_counter(name.into(), None, SharedString::const_str(help));
            self.recorder
                .register_counter(&Key::from_static_name(name), &metadata())
                .absolute(value.load(Relaxed));
        }
        let rejected = "quotebridge_quotes_rejected_total";
        self.recorder.describe_counter(
            rejected.into(),
            None,
            SharedString::const_str("Payloads rejected, by reason"),
        );
        for (label, value) in Reject::LABELS.iter().zip(&stats.quotes_rejected) {
            let key = Key::from_parts(rejected, vec![Label::new("reason", *label)]);
            self.recorder
                .register_counter(&key, &metadata())
                .absolute(value.load(Relaxed));
        }
        let gauges = [
            (
                "quotebridge_websocket_sockets",
                "Open WebSocket connections",
                sockets,
            ),
            (
                "quotebridge_websocket_groups",
                "Client groups with at least one open socket",
                groups,
            ),
        ];
        for (name, help, value) in gauges {
            self.recorder
                .describe_gauge(name.into(), None, SharedString::const_str(help));
            self.recorder
                .register_gauge(&Key::from_static_name(name), &metadata())
                .set(value as f64);
        }
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn metadata() -> metrics::Metadata<'static> {
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_the_latency_histogram() {
        let stats = Stats::default();
        stats.quotes_received.fetch_add(7, Relaxed);
        stats.reject(&Reject::InvalidPrice);
        let metrics = Metrics::new();
        metrics.record_publish_latency(Duration::from_micros(300));
        let text = metrics.render(&stats, 3, 2);
        assert!(
            text.contains("quotebridge_quotes_received_total 7"),
            "{text}"
        );
        assert!(
            text.contains(r#"quotebridge_quotes_rejected_total{reason="invalid_price"} 1"#),
            "{text}"
        );
        assert!(text.contains("quotebridge_websocket_sockets 3"), "{text}");
        assert!(
            text.contains("# HELP quotebridge_smas_emitted_total"),
            "{text}"
        );
        assert!(
            text.contains(r#"quotebridge_quote_to_publish_seconds_bucket{le="0.0005"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("quotebridge_quote_to_publish_seconds_count 1"),
            "{text}"
        );
    }
}
