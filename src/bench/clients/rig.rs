//! A bridge with socket readers attached, and waiting on what they count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::connect::{Socket, connect_sockets};
use super::histogram::Latency;
use super::reader::spawn_readers;
use crate::Error;
use crate::bench::environment::{Bridge, Environment};

/// A bridge reading `bench.{name}.in` and writing `bench.{name}.out`, one SMA
/// per quote, with `sockets` readers in `groups` client groups subscribed to
/// every symbol, the first `stalled` of which never read, the others
/// recording the latency of every `latency_every`th frame. Without stalled
/// sockets, queues are sized so a benchmark never trips the slow-consumer
/// bounds; with them, the bounds are the defaults, so the stalled sockets
/// meet them as real ones would.
pub struct Rig {
    pub bridge: Bridge,
    pub input: String,
    pub output: String,
    /// Frames the reading sockets received.
    pub frames: Arc<AtomicU64>,
    pub stop: CancellationToken,
    pub readers: Vec<JoinHandle<Latency>>,
    /// Sockets open but never read.
    pub stalled: Vec<Socket>,
}

pub async fn rig(
    environment: &Environment,
    name: &str,
    sockets: usize,
    groups: usize,
    stalled: usize,
    latency_every: u64,
) -> Result<Rig, Error> {
    let (input, output) = (format!("bench.{name}.in"), format!("bench.{name}.out"));
    let mut overrides = vec![
        ("REDIS__INPUT", input.clone()),
        ("REDIS__OUTPUT", output.clone()),
        ("SMA__EMIT_PARTIAL", "true".into()),
        (
            "SERVER__MAX_CONNECTIONS_PER_CLIENT",
            (sockets + 1).to_string(),
        ),
        ("SERVER__MAX_CONNECTIONS", (sockets + 1).to_string()),
    ];
    if stalled == 0 {
        overrides.push(("WEBSOCKET__SEND_QUEUE", "65536".into()));
        overrides.push(("WEBSOCKET__SEND_QUEUE_BYTES", (64 << 20).to_string()));
    }
    let bridge = environment.start_bridge(&overrides).await?;
    let groups = groups.max(1);
    let code = |i| format!("{name}{}", i % groups);
    // Stalled sockets with small windows: they back up at the bridge.
    let stalled = stalled.min(sockets);
    let open = connect_sockets(bridge.address, stalled, code, &[], Some(4096)).await?;
    let reading = connect_sockets(bridge.address, sockets - stalled, code, &[], None).await?;
    let frames = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let readers = spawn_readers(reading, &frames, &stop, latency_every);
    Ok(Rig {
        bridge,
        input,
        output,
        frames,
        stop,
        readers,
        stalled: open,
    })
}

/// Waits until `counter` reaches `target`, or `limit` passes; true if reached.
pub async fn wait_for(counter: &AtomicU64, target: u64, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while counter.load(Relaxed) < target {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    true
}
