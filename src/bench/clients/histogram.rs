//! Latency histograms: what the readers and subscribers record, merged.

use hdrhistogram::Histogram;
use tokio::task::JoinHandle;

use crate::bench::now_ns;

/// Latencies in nanoseconds, 1 µs to 100 s, 3 significant digits.
///
/// A histogram of that range is about 220 KB of counts, so a recorder
/// keeps its first samples as they are and makes one only past
/// [`Latency::SAMPLES`], recording into it from then on: with a recorder
/// per socket, 10,000 histograms were 2.2 GB for the kernel to zero while
/// the bridge was being measured.
#[derive(Default)]
pub struct Latency {
    samples: Vec<u64>,
    histogram: Option<Histogram<u64>>,
}

impl Latency {
    /// Samples kept before they go into a histogram (32 KiB).
    const SAMPLES: usize = 4_096;

    pub fn new() -> Self {
        Self::default()
    }

    fn empty_histogram() -> Histogram<u64> {
        // Constant bounds within hdrhistogram's limits: no input reaches this.
        Histogram::new_with_bounds(1_000, 100_000_000_000, 3).expect("valid histogram bounds")
    }

    /// Records the time since `ts` (a `now_ns` stamp).
    pub fn record_since(&mut self, ts: u64) {
        self.record(now_ns().saturating_sub(ts));
    }

    /// Records one latency of `ns` nanoseconds.
    pub fn record(&mut self, ns: u64) {
        if let Some(histogram) = &mut self.histogram {
            Self::add_samples(histogram, &[ns]);
            return;
        }
        self.samples.push(ns);
        if self.samples.len() >= Self::SAMPLES {
            let mut histogram = Self::empty_histogram();
            Self::add_samples(&mut histogram, &self.samples);
            self.histogram = Some(histogram);
            self.samples = Vec::new();
        }
    }

    fn add_samples(histogram: &mut Histogram<u64>, samples: &[u64]) {
        for &ns in samples {
            // Below the lowest bound counts as it; above the highest as it.
            let _ = histogram.record(ns.clamp(1_000, histogram.high()));
        }
    }

    pub fn merge(&mut self, other: &Latency) {
        if let Some(theirs) = &other.histogram {
            let _ = self
                .histogram
                .get_or_insert_with(Self::empty_histogram)
                .add(theirs);
        }
        for &ns in &other.samples {
            self.record(ns);
        }
    }

    /// Everything recorded, in one histogram.
    fn whole(&self) -> Histogram<u64> {
        let mut whole = self.histogram.clone().unwrap_or_else(Self::empty_histogram);
        Self::add_samples(&mut whole, &self.samples);
        whole
    }

    /// The `q` quantile in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        self.whole().value_at_quantile(q) as f64 / 1_000.0
    }

    pub fn max_us(&self) -> f64 {
        self.whole().max() as f64 / 1_000.0
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_and_histograms_give_the_same_quantiles() {
        let mut few = Latency::new();
        let mut many = Latency::new();
        for i in 1..=10_000u64 {
            many.record(i * 1_000);
            if i % 100 == 0 {
                few.record(i * 1_000);
            }
        }
        assert!(many.histogram.is_some() && few.histogram.is_none());
        // 3 significant digits: 5,000 µs within 0.1 %.
        assert!((many.quantile_us(0.5) - 5_000.0).abs() <= 5.0);
        assert!((few.quantile_us(0.5) - 5_000.0).abs() <= 5.0);
        assert!((many.max_us() - 10_000.0).abs() <= 10.0);

        let mut all = Latency::new();
        all.merge(&few);
        all.merge(&many);
        assert!((all.quantile_us(0.5) - 5_000.0).abs() <= 10.0);
        assert_eq!(all.whole().len(), 10_100);
    }
}
