//! A bridge with socket readers attached, and waiting on what they count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::connect::connect_sockets;
use super::histogram::Latency;
use super::reader::spawn_readers;
use crate::Error;
use crate::bench::environment::{Bridge, Environment};

/// A bridge reading `bench.{name}.in` and writing `bench.{name}.out`, one SMA
/// per quote, with `sockets` readers in `groups` client groups subscribed to
/// every symbol. Queues are sized so a benchmark never trips the slow-consumer
/// limit.
pub struct Rig {
    pub bridge: Bridge,
    pub input: String,
    pub output: String,
    pub frames: Arc<AtomicU64>,
    pub stop: CancellationToken,
    pub readers: Vec<JoinHandle<Latency>>,
}

pub async fn rig(
    environment: &Environment,
    name: &str,
    sockets: usize,
    groups: usize,
) -> Result<Rig, Error> {
    let (input, output) = (format!("bench.{name}.in"), format!("bench.{name}.out"));
    let bridge = environment
        .start_bridge(&[
            ("REDIS__INPUT", input.clone()),
            ("REDIS__OUTPUT", output.clone()),
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
    let groups = groups.max(1);
    let open = connect_sockets(
        bridge.address,
        sockets,
        |i| format!("{name}{}", i % groups),
        &[],
    )
    .await?;
    let frames = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let readers = spawn_readers(open, &frames, &stop);
    Ok(Rig {
        bridge,
        input,
        output,
        frames,
        stop,
        readers,
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
