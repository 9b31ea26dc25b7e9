//! Latency histograms: what the readers and subscribers record, merged.

use hdrhistogram::Histogram;
use tokio::task::JoinHandle;

use crate::bench::now_ns;

/// Latencies in nanoseconds, 1 µs to 100 s, 3 significant digits.
pub struct Latency(Histogram<u64>);

impl Latency {
    pub fn new() -> Self {
        // Constant bounds within hdrhistogram's limits: no input reaches this.
        Self(Histogram::new_with_bounds(1_000, 100_000_000_000, 3).expect("valid histogram bounds"))
    }

    /// Records the time since `ts` (a `now_ns` stamp).
    pub fn record_since(&mut self, ts: u64) {
        self.record(now_ns().saturating_sub(ts));
    }

    /// Records one latency of `ns` nanoseconds.
    pub fn record(&mut self, ns: u64) {
        let _ = self.0.record(ns.max(1_000));
    }

    pub fn merge(&mut self, other: &Latency) {
        let _ = self.0.add(&other.0);
    }

    /// The `q` quantile in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1_000.0
    }

    pub fn max_us(&self) -> f64 {
        self.0.max() as f64 / 1_000.0
    }
}

/// Merges the histograms the tasks return.
pub async fn collect(tasks: Vec<JoinHandle<Latency>>) -> Latency {
    let mut all = Latency::new();
    for task in tasks {
        if let Ok(latency) = task.await {
            all.merge(&latency);
        }
    }
    all
}
