//! Fan-out: many sockets in many groups, all subscribed to every symbol;
//! frames/s delivered. Quotes go out in rounds sized so every socket's queue
//! holds a round; each round waits until every frame has arrived.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::clients::{collect, connect_sockets, publisher, spawn_readers, wait_for};
use super::environment::raise_file_limit;
use super::{Environment, Options, Row, Scenario, now_ns, quote};
use crate::Error;
use crate::broker::BrokerError;

/// Frames per round, across all sockets.
const ROUND_FRAMES: u64 = 200_000;

pub async fn run(
    environment: &Environment,
    sockets: usize,
    options: &Options,
) -> Result<Row, Error> {
    // A socket is one descriptor here, and one more if the bridge shares the process.
    let ends = if environment.in_process() { 2 } else { 1 };
    let limit = raise_file_limit(sockets as u64 * ends + 1_024);
    let wanted = sockets;
    let sockets =
        sockets.min(usize::try_from(limit.saturating_sub(1_024) / ends).unwrap_or(usize::MAX));
    let groups = options.groups.max(1);
    let bridge = environment
        .start_bridge(&[
            ("REDIS__INPUT", "bench.fanout.in".into()),
            ("REDIS__OUTPUT", "bench.fanout.out".into()),
            ("SMA__EMIT_PARTIAL", "true".into()),
            ("WEBSOCKET__SEND_QUEUE", "65536".into()),
            ("WEBSOCKET__SEND_QUEUE_BYTES", (64 << 20).to_string()),
            (
                "SERVER__MAX_CONNECTIONS_PER_CLIENT",
                (sockets + 1).to_string(),
            ),
            ("SERVER__MAX_CONNECTIONS", (sockets + 1).to_string()),
        ])
        .await?;
    let stop = CancellationToken::new();
    let frames = Arc::new(AtomicU64::new(0));
    let open = connect_sockets(
        bridge.address,
        sockets,
        |i| format!("fanout{}", i % groups),
        &[],
    )
    .await?;
    let readers = spawn_readers(open, &frames, &stop);

    let mut conn = publisher(&environment.url).await?;
    let per_round = (ROUND_FRAMES / sockets.max(1) as u64).max(1);
    let rounds = options
        .fanout_frames
        .div_ceil(per_round * sockets.max(1) as u64)
        .max(1);
    let start = Instant::now();
    let mut complete = true;
    for round in 0..rounds {
        let mut pipe = redis::pipe();
        let ts = now_ns();
        for i in 0..per_round {
            let n = (round * per_round + i) as usize;
            pipe.publish("bench.fanout.in", quote(n, options.symbols, ts).as_ref())
                .ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(BrokerError::from)?;
        let target = (round + 1) * per_round * sockets as u64;
        if !wait_for(&frames, target, Duration::from_secs(60)).await {
            complete = false;
            break;
        }
    }
    let elapsed = start.elapsed();
    stop.cancel();
    let latency = collect(readers).await;
    bridge.stop().await;

    let delivered = frames.load(Relaxed);
    let mut row = Row::new(
        Scenario::Fanout,
        format!("{sockets} sockets / {groups} groups"),
    )
    .with(
        "frames_per_s",
        (delivered as f64 / elapsed.as_secs_f64()).round(),
    )
    .with("frames", delivered as f64)
    .with("p50_us", latency.quantile_us(0.5))
    .with("p99_us", latency.quantile_us(0.99))
    .with("max_us", latency.max_us());
    if !complete {
        row.note = Some("incomplete: a round did not arrive within 60 s".into());
    } else if sockets < wanted {
        row.note = Some(format!(
            "{wanted} wanted; the open-file limit ({limit}) allows {sockets}"
        ));
    }
    Ok(row)
}
