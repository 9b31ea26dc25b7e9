//! `GET /metrics`: the counters in Prometheus text format, named after
//! their `/stats` names by the one table in [`crate::stats`].
//!
//! The hot path keeps counting into [`Stats`]'s plain atomics (no registry
//! lookup per event); at scrape time their values are handed to a
//! metrics-exporter-prometheus recorder of this bridge's own, which renders
//! the exposition. The one histogram, quote-to-publish latency, is recorded
//! as events happen; the recorder keeps each sample until it is folded into
//! the buckets, so it is folded every [`UPKEEP_EVERY`] samples rather than
//! only when something scrapes (a bridge nobody scrapes would otherwise keep
//! every sample it ever took).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use metrics::{Histogram, Key, Label, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::quote::Reject;
use crate::stats::{COUNTERS, GAUGES, Gauges, REJECTED, Stats};

const PUBLISH_LATENCY: &str = "quotebridge_quote_to_publish_seconds";

/// Latency buckets, in seconds: 100 µs to 1 s.
const LATENCY_BUCKETS: [f64; 13] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Latency samples recorded between two folds into the histogram's buckets:
/// at most this many (8 bytes each) wait, scraped or not.
pub const UPKEEP_EVERY: u64 = 4096;

/// The bridge's Prometheus recorder. Not installed globally, so several
/// bridges (tests, the benchmark) can live in one process.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    publish_latency: Histogram,
    /// Latency samples recorded so far, to fold them every `UPKEEP_EVERY`.
    recorded: AtomicU64,
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
            recorded: AtomicU64::new(0),
        }
    }

    /// Records one quote-to-publish latency.
    pub fn record_publish_latency(&self, latency: Duration) {
        self.publish_latency.record(latency.as_secs_f64());
        if self.recorded.fetch_add(1, Relaxed) % UPKEEP_EVERY == UPKEEP_EVERY - 1 {
            self.handle.run_upkeep();
        }
    }

    /// The Prometheus text exposition of `stats` and `gauges`.
    #[must_use]
    pub fn render(&self, stats: &Stats, gauges: &Gauges) -> String {
        for counter in COUNTERS {
            let name = counter.prometheus_name();
            self.recorder.describe_counter(
                name.clone().into(),
                None,
                SharedString::const_str(counter.help),
            );
            self.recorder
                .register_counter(&Key::from_name(name), &metadata())
                .absolute(counter.read(stats));
        }
        let rejected = REJECTED.prometheus_name();
        self.recorder.describe_counter(
            rejected.clone().into(),
            None,
            SharedString::const_str(REJECTED.help),
        );
        for (label, value) in Reject::LABELS.iter().zip(&stats.quotes_rejected) {
            let key = Key::from_parts(rejected.clone(), vec![Label::new("reason", *label)]);
            self.recorder
                .register_counter(&key, &metadata())
                .absolute(value.load(Relaxed));
        }
        for gauge in GAUGES {
            let name = gauge.prometheus_name();
            self.recorder.describe_gauge(
                name.clone().into(),
                None,
                SharedString::const_str(gauge.help),
            );
            self.recorder
                .register_gauge(&Key::from_name(name), &metadata())
                .set(gauge.read(stats, gauges) as f64);
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
        let gauges = Gauges {
            sockets: 3,
            groups: 2,
            ready: true,
            history_bytes: 0,
            history_keys: 0,
            queued_bytes: 0,
        };
        let text = metrics.render(&stats, &gauges);
        assert!(
            text.contains("quotebridge_quotes_received_total 7"),
            "{text}"
        );
        assert!(
            text.contains(r#"quotebridge_quotes_rejected_total{reason="invalid_price"} 1"#),
            "{text}"
        );
        assert!(text.contains("quotebridge_sockets 3"), "{text}");
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
