//! Micro: parse + SMA + serialize per quote, no I/O — the pipeline alone.
//! Run it under `valgrind --tool=callgrind` for an instruction count (see
//! docs/BENCHMARKS.md).

use std::sync::Arc;
use std::time::Instant;

use super::{Row, Scenario, quote};
use crate::config::Settings;
use crate::pipeline::{Outcome, Pipeline};
use crate::stats::Stats;

pub fn run(quotes: usize, symbols: usize) -> Row {
    // Timestamps as producers send them: milliseconds since the epoch.
    const EPOCH_MS: u64 = 1_764_115_200_000;
    let payloads: Vec<bytes::Bytes> = (0..symbols.max(1) * 16)
        .map(|i| quote(i, symbols, EPOCH_MS + i as u64))
        .collect();
    let Ok(mut settings) = Settings::defaults() else {
        return Row::new(Scenario::Micro, "defaults did not load".into());
    };
    settings.sma.emit_partial = true;
    let mut pipeline = Pipeline::new(&settings, Arc::new(Stats::default()));
    let mut emitted = 0usize;
    let start = Instant::now();
    for payload in payloads.iter().cycle().take(quotes) {
        if let Outcome::Accepted { sma: Some(sma), .. } =
            pipeline.process(std::hint::black_box(payload))
        {
            emitted += std::hint::black_box(sma.frame.as_str().len()).min(1);
        }
    }
    let elapsed = start.elapsed();
    Row::new(
        Scenario::Micro,
        format!("{quotes} quotes / {symbols} symbols"),
    )
    .with(
        "ns_per_quote",
        elapsed.as_nanos() as f64 / quotes.max(1) as f64,
    )
    .with(
        "quotes_per_s",
        (quotes as f64 / elapsed.as_secs_f64()).round(),
    )
    .with("emitted", emitted as f64)
}
