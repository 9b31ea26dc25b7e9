//! Parse + SMA + serialize per quote: the pipeline with no I/O; and what a
//! gateway does to route each result it relays.
//!
//! `cargo bench --bench pipeline`; docs/BENCHMARKS.md has the results and the
//! callgrind instruction count of the same work.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quotebridge::config::Settings;
use quotebridge::pipeline::{Outcome, Pipeline};
use quotebridge::protocol::ResultRoute;
use quotebridge::stats::Stats;

fn quotes(symbols: usize) -> Vec<Vec<u8>> {
    (0..symbols * 16)
        .map(|i| {
            let price = 100.0 + (i % 997) as f64 / 8.0;
            format!(
                r#"{{"symbol":"S{}","price":{price},"ts":{i}}}"#,
                i % symbols
            )
            .into_bytes()
        })
        .collect()
}

fn pipeline(c: &mut Criterion) {
    let mut settings = Settings::defaults().expect("defaults load");
    settings.sma.emit_partial = true;
    let payloads = quotes(1000);
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_sma_serialize", |b| {
        let mut pipeline = Pipeline::new(&settings, Arc::new(Stats::default()));
        let mut next = payloads.iter().cycle();
        b.iter(|| {
            let payload = next.next().expect("cycle never ends");
            if let Outcome::Accepted { sma: Some(sma), .. } = pipeline.process(black_box(payload)) {
                black_box(sma.frame);
            }
        });
    });
    group.bench_function("parse_only", |b| {
        let mut next = payloads.iter().cycle();
        b.iter(|| {
            let payload = next.next().expect("cycle never ends");
            let _ = black_box(quotebridge::quote::parse(black_box(payload)));
        });
    });
    group.finish();
}

/// A gateway reads every relayed result's route (and an event stream each
/// result's position): the one-scan reader against serde_json.
fn route(c: &mut Criterion) {
    let mut settings = Settings::defaults().expect("defaults load");
    settings.sma.emit_partial = true;
    let mut pipeline = Pipeline::new(&settings, Arc::new(Stats::default()));
    let frames: Vec<_> = quotes(1000)
        .iter()
        .filter_map(|payload| match pipeline.process(payload) {
            Outcome::Accepted { sma, .. } => sma.map(|sma| sma.frame),
            _ => None,
        })
        .collect();
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    group.bench_function("of", |b| {
        let mut next = frames.iter().cycle();
        b.iter(|| {
            let frame = next.next().expect("cycle never ends");
            black_box(ResultRoute::of(black_box(frame.as_str())).is_some())
        });
    });
    group.bench_function("serde_json", |b| {
        let mut next = frames.iter().cycle();
        b.iter(|| {
            let frame = next.next().expect("cycle never ends");
            black_box(ResultRoute::parsed(black_box(frame.as_str())).is_some())
        });
    });
    group.finish();
}

criterion_group!(benches, pipeline, route);
criterion_main!(benches);
