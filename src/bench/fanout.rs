//! Fan-out: many sockets in many groups, all subscribed to every symbol;
//! frames/s delivered. Quotes go out in rounds of the same number of results
//! whatever the number of sockets, so each socket does the same work per
//! round at every size; a round goes out once every frame of the round
//! before the last has arrived at every reading socket (a socket's queue
//! holds two rounds). One round goes out first, untimed (`warm_up_ms` says
//! how long it took), and the readers time one frame in sixteen. With
//! `stalled` sockets (which never read), what the others get shows what a
//! slow minority costs them.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::clients::{collect, publisher, rig, wait_for};
use super::environment::raise_file_limit;
use super::{Environment, Options, Row, Scenario, feed, now_ns};
use crate::Error;
use crate::broker::BrokerError;

/// Results per round, each to every socket: as many at 10,000 sockets as at
/// 100, so what more sockets cost is measured, not what smaller batches per
/// socket cost (each batch costs a wake and a write whatever its size).
pub const ROUND_RESULTS: u64 = 200;

/// The readers record the latency of one frame in this many: tens of
/// millions of frames leave a sample of millions, and the readers, which
/// share the bridge's cores, spend their time reading rather than parsing
/// timestamps.
const LATENCY_EVERY: u64 = 16;

pub async fn run(
    environment: &Environment,
    sockets: usize,
    stalled_percent: usize,
    options: &Options,
) -> Result<Row, Error> {
    // A socket is one descriptor here, and one more if the bridge shares the process.
    let ends = if environment.in_process() { 2 } else { 1 };
    let limit = raise_file_limit(sockets as u64 * ends + 1_024);
    let wanted = sockets;
    let sockets =
        sockets.min(usize::try_from(limit.saturating_sub(1_024) / ends).unwrap_or(usize::MAX));
    let groups = options.groups.max(1);
    // At least one when any share is asked for, and never all of them.
    let stalled = match stalled_percent.min(100) {
        0 => 0,
        share => (sockets * share / 100).clamp(1, sockets.saturating_sub(1)),
    };
    let reading = sockets - stalled;
    let rig = rig(
        environment,
        "fanout",
        sockets,
        groups,
        stalled,
        LATENCY_EVERY,
    )
    .await?;
    let frames = rig.frames.clone();

    let mut conn = publisher(&environment.redis).await?;
    let per_round = options.fanout_round.max(1);
    let rounds = options
        .fanout_frames
        .div_ceil(per_round * sockets.max(1) as u64)
        .max(1);
    let publish_round = async |conn: &mut redis::aio::MultiplexedConnection, round: u64, ts| {
        let mut pipe = redis::pipe();
        for i in 0..per_round {
            let n = (round * per_round + i) as usize;
            let (channel, payload) = feed(
                environment.role,
                (&rig.input, &rig.output),
                n,
                options.symbols,
                ts,
            );
            pipe.publish(channel, payload.as_ref()).ignore();
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(BrokerError::from)
    };
    // One round before the clock starts, stamped 0 so that the readers do
    // not time it: its frames are the first each socket gets, and meet cold
    // memory (the kernel's socket buffers, every task's first wake). Its
    // time is reported on its own.
    let warming = Instant::now();
    publish_round(&mut conn, 0, 0).await?;
    let warm = per_round * reading as u64;
    let mut complete = wait_for(&frames, warm, Duration::from_secs(60)).await;
    let warm_up = warming.elapsed();
    let cpu = rig.bridge.cpu_meter();
    let start = Instant::now();
    for round in 1..=rounds {
        if !complete {
            break;
        }
        publish_round(&mut conn, round, now_ns()).await?;
        // One round in flight while the one before it arrives: the sockets
        // never run dry between rounds (a round's last frames reach the
        // last of 10,000 sockets well after its first ones), and their
        // queues never hold more than two.
        let delivered_before = round * per_round * reading as u64;
        complete = wait_for(&frames, delivered_before, Duration::from_secs(60)).await;
    }
    let everything = warm + rounds * per_round * reading as u64;
    if complete && !wait_for(&frames, everything, Duration::from_secs(60)).await {
        complete = false;
    }
    let elapsed = start.elapsed();
    let delivered = frames.load(Relaxed).saturating_sub(warm);
    let cpu_per_frame = cpu.ns_per_frame(delivered);
    let bridge_stats = if stalled_percent > 0 {
        let body = crate::health::body_of(rig.bridge.address, "/stats").await;
        body.ok()
            .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
    } else {
        None
    };
    rig.stop.cancel();
    let latency = collect(rig.readers).await;
    drop(rig.stalled);
    rig.bridge.stop().await;

    let (scenario, parameters) = if stalled_percent > 0 {
        (
            Scenario::SlowFanout,
            format!(
                "{sockets} sockets ({stalled} never read) / {groups} groups, {}",
                environment.role
            ),
        )
    } else {
        (
            Scenario::Fanout,
            format!(
                "{sockets} sockets / {groups} groups, {}, {per_round} a round",
                environment.role
            ),
        )
    };
    let mut row = Row::new(scenario, parameters)
        .with(
            "frames_per_s",
            (delivered as f64 / elapsed.as_secs_f64()).round(),
        )
        .with("frames", delivered as f64)
        .with("warm_up_ms", (warm_up.as_secs_f64() * 1e3).round())
        .with("p50_us", latency.quantile_us(0.5))
        .with("p99_us", latency.quantile_us(0.99))
        .with("max_us", latency.max_us());
    if let Some(per_frame) = cpu_per_frame {
        row = row.with("bridge_cpu_ns_per_frame", per_frame);
    }
    if let Some(stats) = bridge_stats {
        for counter in ["frames_conflated", "slow_consumer_closes", "write_timeouts"] {
            row = row.with(counter, stats[counter].as_f64().unwrap_or(0.0));
        }
    }
    if !complete {
        row.note = Some("incomplete: a round did not arrive within 60 s".into());
    } else if sockets < wanted {
        row.note = Some(format!(
            "{wanted} wanted; the open-file limit ({limit}) allows {sockets}"
        ));
    }
    Ok(row)
}
