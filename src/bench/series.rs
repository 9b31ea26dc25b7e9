//! Series: what each indicator kind costs per quote, computation alone (no
//! parsing, no encoding, no I/O), over the same quotes spread over many
//! keys: SMA 20, 50 and 200 by count, SMA over 5 minutes, EMA 20, candles of
//! 1 and 5 minutes, and a 24-hour ticker in minute buckets.

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::time::Instant;

use super::{Row, Scenario};
use crate::decimal::Decimal;
use crate::series::Input;
use crate::series::candles::Candles;
use crate::series::ema::Ema;
use crate::series::rolling::Rolling;
use crate::series::timed::{MAX_POINTS, TimeSma};
use crate::sma::SmaWindow;

/// One quote as the kinds take it.
struct Sample {
    key: usize,
    ts: u64,
    price: f64,
    decimal: Option<Decimal>,
    volume: (f64, Option<Decimal>),
}

/// `quotes` quotes over `symbols` keys, 10 a millisecond of event time
/// (so a 5-minute window holds 3,000 / `symbols` quotes a key), prices in
/// cents wandering around 100, volumes in lots.
fn samples(quotes: usize, symbols: usize) -> Vec<Sample> {
    let symbols = symbols.max(1);
    let mut cents = vec![10_000i64; symbols];
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..quotes)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let key = i % symbols;
            cents[key] = (cents[key] + (state % 7) as i64 - 3).max(1);
            let decimal = Decimal::new(cents[key], 2);
            let lots = Decimal::new(((state >> 8) % 50 + 1) as i64 * 100, 0);
            Sample {
                key,
                ts: 1_764_599_400_000 + i as u64 / 10,
                price: decimal.map_or(0.0, Decimal::to_f64),
                decimal,
                volume: (lots.map_or(0.0, Decimal::to_f64), lots),
            }
        })
        .collect()
}

/// Runs `push` over every sample and returns a row with ns per quote.
fn measure(name: &str, samples: &[Sample], mut push: impl FnMut(&Sample) -> f64) -> Row {
    let start = Instant::now();
    let mut sink = 0.0;
    for sample in samples {
        sink += push(std::hint::black_box(sample));
    }
    let elapsed = start.elapsed();
    std::hint::black_box(sink);
    Row::new(
        Scenario::Series,
        format!("{name}, {} quotes", samples.len()),
    )
    .with(
        "ns_per_quote",
        elapsed.as_nanos() as f64 / samples.len().max(1) as f64,
    )
}

/// One row per kind.
pub fn run(quotes: usize, symbols: usize) -> Vec<Row> {
    let samples = samples(quotes, symbols);
    let keys = symbols.max(1);
    let nz = |v: u64| NonZeroU64::new(v).unwrap_or(NonZeroU64::MIN);
    let mut rows = Vec::new();
    for window in [20, 50, 200] {
        let capacity = NonZeroUsize::new(window).unwrap_or(NonZeroUsize::MIN);
        let mut windows = vec![SmaWindow::new(capacity); keys];
        rows.push(measure(&format!("sma {window}"), &samples, |s| {
            windows[s.key].push(s.price, s.decimal).mean
        }));
    }
    let mut timed = vec![TimeSma::new(nz(300_000), 5_000, MAX_POINTS); keys];
    rows.push(measure("sma 5m (time)", &samples, |s| {
        match timed[s.key].push(s.ts, s.price, s.decimal) {
            crate::series::timed::TimePushed::Mean(mean) => mean.mean,
            crate::series::timed::TimePushed::Late => 0.0,
        }
    }));
    let mut emas = vec![Ema::new(NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN)); keys];
    rows.push(measure("ema 20", &samples, |s| emas[s.key].push(s.price)));
    for (name, interval) in [("candles 1m", 60_000), ("candles 5m", 300_000)] {
        let mut candles = vec![Candles::new(nz(interval)); keys];
        rows.push(measure(name, &samples, |s| {
            let trade = Input {
                ts: s.ts,
                price: s.price,
                decimal: s.decimal,
                volume: Some(s.volume),
            };
            match candles[s.key].push(&trade) {
                crate::series::candles::Pushed::Taken { open, .. } => open.close,
                crate::series::candles::Pushed::Late => 0.0,
            }
        }));
    }
    let day = nz(86_400_000);
    let mut tickers = vec![Rolling::new(day, Rolling::default_step(day), 5_000); keys];
    rows.push(measure(
        "ticker 24h (1m steps)",
        &samples,
        |s| match tickers[s.key].push(s.ts, s.price, s.decimal, Some(s.volume)) {
            crate::series::rolling::RollingPushed::Ticker(t) => t.last,
            crate::series::rolling::RollingPushed::Late => 0.0,
        },
    ));
    rows.push(pipeline_with_example_series(&samples, keys));
    rows
}

/// The whole pipeline (parse, the SMA and every series of the example
/// configuration, each result encoded and framed) over the same quotes as
/// payloads: what the kinds cost once their results are made to go out.
fn pipeline_with_example_series(samples: &[Sample], keys: usize) -> Row {
    use crate::config::Settings;
    use crate::pipeline::{Outcome, Pipeline};
    let name = "pipeline, example series";
    let example = std::env::temp_dir().join(format!(
        "quotebridge-bench-pipeline-{}.toml",
        std::process::id()
    ));
    let written = std::fs::write(&example, super::ingest::EXAMPLE_SERIES);
    let settings = written
        .ok()
        .and_then(|()| Settings::load_with_env(Some(&example), None).ok());
    let _ = std::fs::remove_file(&example);
    let Some(mut settings) = settings else {
        return Row::new(
            Scenario::Series,
            format!("{name}: the example did not load"),
        );
    };
    settings.sma.max_keys = keys + 1;
    let mut pipeline = Pipeline::new(&settings, std::sync::Arc::default());
    let payloads: Vec<String> = samples
        .iter()
        .map(|s| {
            format!(
                r#"{{"symbol":"S{}","price":{},"volume":{},"ts":{}}}"#,
                s.key, s.price, s.volume.0, s.ts
            )
        })
        .collect();
    let mut payloads = payloads.iter();
    let mut results = 0usize;
    let row = measure(name, samples, |_| {
        let payload = payloads.next().map_or(&[][..], |p| p.as_bytes());
        if let Outcome::Accepted { sma } = pipeline.process(payload) {
            results += usize::from(sma.is_some()) + pipeline.take_series().len();
        }
        results as f64
    });
    row.with(
        "results_per_quote",
        results as f64 / samples.len().max(1) as f64,
    )
}
