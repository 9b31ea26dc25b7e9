//! Soak: steady load for minutes with nobody scraping `/metrics`, and the
//! bridge's resident memory over time. A leak of a few bytes a quote (the
//! latency histogram once kept every sample until a scrape) shows as RSS
//! that keeps rising after the warm-up; a bounded bridge is flat.
//!
//! [`RATE`] quotes a second over [`SYMBOLS`] symbols, two sockets reading
//! every result, for `--soak-seconds`; RSS is sampled every tenth of the run.
//! Reported: RSS after the first fifth (warm-up), at the end, and the growth
//! between them per minute. Run the bridge as a child process (the `bench`
//! command does) so the RSS is its own.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::time::Instant;

use super::clients::{collect, connect_sockets, publish_paced, publisher, spawn_readers};
use super::environment::rss_kib;
use super::{Environment, Options, Row, Scenario, feed};
use crate::Error;

/// Quotes a second.
pub const RATE: u64 = 5_000;
/// Symbols they go to.
pub const SYMBOLS: usize = 1_000;

pub async fn run(environment: &Environment, options: &Options) -> Result<Row, Error> {
    let (input, output) = ("bench.soak.in".to_owned(), "bench.soak.out".to_owned());
    let bridge = environment
        .start_bridge(&[
            ("REDIS__INPUT", input.clone()),
            ("REDIS__OUTPUT", output.clone()),
        ])
        .await?;
    let pid = bridge.pid();
    let sockets = connect_sockets(bridge.address, 2, |i| format!("soak{i}"), &[], None).await?;
    let frames = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let readers = spawn_readers(sockets, &frames, &stop, 1);
    let mut conn = publisher(&environment.redis).await?;
    let seconds = options.soak_seconds.max(1.0);
    let total = (RATE as f64 * seconds) as u64;
    let sample_every = Duration::from_secs_f64(seconds / 10.0);
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let begin = Instant::now();
    let mut next_sample = begin + sample_every;
    let role = environment.role;
    let message = |i, ts| feed(role, (&input, &output), i, SYMBOLS, ts);
    publish_paced(&mut conn, RATE, total, message, || {
        if Instant::now() >= next_sample {
            samples.push((begin.elapsed().as_secs_f64(), rss_kib(pid).unwrap_or(0)));
            next_sample += sample_every;
        }
    })
    .await?;
    samples.push((begin.elapsed().as_secs_f64(), rss_kib(pid).unwrap_or(0)));
    stop.cancel();
    let latency = collect(readers).await;
    bridge.stop().await;

    // Warm-up: the first fifth (windows, histories and buffers filling).
    let warm = samples
        .iter()
        .find(|(at, _)| *at >= seconds / 5.0)
        .copied()
        .unwrap_or(samples[0]);
    let (end_at, end_rss) = samples.last().copied().unwrap_or(warm);
    let minutes = ((end_at - warm.0) / 60.0).max(f64::MIN_POSITIVE);
    let growth = (end_rss as f64 - warm.1 as f64) / minutes;
    let mut row = Row::new(
        Scenario::Soak,
        format!("{RATE} quotes/s, {SYMBOLS} symbols, {seconds} s, no scrape"),
    )
    .with("rss_warm_kib", warm.1 as f64)
    .with("rss_end_kib", end_rss as f64)
    .with("kib_per_minute", growth.round())
    .with("socket_p99_us", latency.quantile_us(0.99));
    if pid.is_none() {
        row.note = Some("in-process: RSS includes the benchmark's own clients".into());
    }
    Ok(row)
}
