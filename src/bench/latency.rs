//! Latency: quotes at a fixed rate, one SMA per quote, received on the output
//! channel and by every one of `latency_sockets` sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::clients::{collect, publish_paced, publisher, rig, spawn_subscriber, wait_for};
use super::{Environment, Options, Row, Scenario, feed};
use crate::Error;

pub async fn run(environment: &Environment, rate: u64, options: &Options) -> Result<Row, Error> {
    let sockets = options.latency_sockets;
    let rig = rig(environment, "latency", sockets, 10, 0, 1).await?;
    let (frames, stop) = (rig.frames.clone(), rig.stop.clone());
    let outputs = Arc::new(AtomicU64::new(0));
    let subscriber =
        spawn_subscriber(&environment.redis, &rig.output, &outputs, &stop, true).await?;
    // The baseline: the same messages straight from Redis, no bridge in between.
    let role = environment.role;
    let fed = feed(role, (&rig.input, &rig.output), 0, 1, 0).0.to_owned();
    let inputs = Arc::new(AtomicU64::new(0));
    let baseline = spawn_subscriber(&environment.redis, &fed, &inputs, &stop, true).await?;

    let mut conn = publisher(&environment.redis).await?;
    let total = (rate as f64 * options.seconds).max(1.0) as u64;
    let cpu = rig.bridge.cpu_meter();
    let symbols = options.symbols;
    let (input, output) = (&rig.input, &rig.output);
    let message = |i, ts| feed(role, (input, output), i, symbols, ts);
    let sent = publish_paced(&mut conn, rate, total, message, || {}).await?;
    let limit = Duration::from_secs(60);
    let complete = wait_for(&outputs, sent, limit).await
        && wait_for(&frames, sent * sockets as u64, limit).await;
    let cpu_per_frame = cpu.ns_per_frame(frames.load(Relaxed));
    stop.cancel();
    let socket_latency = collect(rig.readers).await;
    let output_latency = collect(vec![subscriber]).await;
    let redis_latency = collect(vec![baseline]).await;
    rig.bridge.stop().await;

    let mut row = Row::new(
        Scenario::Latency,
        format!("{rate} quotes/s × {sockets} sockets, {role}"),
    )
    .with("redis_p50_us", redis_latency.quantile_us(0.5))
    .with("redis_p99_us", redis_latency.quantile_us(0.99))
    .with("redis_max_us", redis_latency.max_us())
    .with("output_p50_us", output_latency.quantile_us(0.5))
    .with("output_p99_us", output_latency.quantile_us(0.99))
    .with("output_p999_us", output_latency.quantile_us(0.999))
    .with("output_max_us", output_latency.max_us())
    .with("socket_p50_us", socket_latency.quantile_us(0.5))
    .with("socket_p99_us", socket_latency.quantile_us(0.99))
    .with("socket_p999_us", socket_latency.quantile_us(0.999))
    .with("socket_max_us", socket_latency.max_us())
    .with("frames", frames.load(Relaxed) as f64);
    if let Some(per_frame) = cpu_per_frame {
        row = row.with("bridge_cpu_ns_per_frame", per_frame);
    }
    if !complete {
        row.note = Some(format!(
            "incomplete: {} of {sent} outputs, {} of {} frames arrived",
            outputs.load(Relaxed),
            frames.load(Relaxed),
            sent * sockets as u64
        ));
    }
    Ok(row)
}
