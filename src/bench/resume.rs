//! Resume: sockets that come back after missing results, all at once, and
//! how long the bridge takes to send every one of them what it missed.
//!
//! The bridge computes `missed` results over `symbols` keys while no socket
//! is open; then `sockets` sockets open with `?resume=1`, each says it has
//! seen nothing of those keys (seq 0 of their epoch), and the clock runs
//! until every socket has received every missed result.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::clients::{
    collect, connect_sockets, publish_and_await_results, spawn_readers, wait_for,
};
use super::environment::raise_file_limit;
use super::{Environment, Options, Row, Scenario, feed, now_ns};
use crate::Error;

pub async fn run(environment: &Environment, options: &Options) -> Result<Row, Error> {
    let sockets = options.resume_sockets.max(1);
    let symbols = options.resume_symbols.max(1);
    let missed = options.resume_missed.max(symbols);
    let per_key = missed.div_ceil(symbols);
    let missed = per_key * symbols;
    raise_file_limit(sockets as u64 * 2 + 1_024);
    let (input, output) = ("bench.resume.in".to_owned(), "bench.resume.out".to_owned());
    let bridge = environment
        .start_bridge(&[
            ("REDIS__INPUT", input.clone()),
            ("REDIS__OUTPUT", output.clone()),
            ("SMA__EMIT_PARTIAL", "true".into()),
            ("WEBSOCKET__HISTORY_SIZE", per_key.to_string()),
            ("WEBSOCKET__SEND_QUEUE", missed.max(4096).to_string()),
            (
                "SERVER__MAX_CONNECTIONS_PER_CLIENT",
                (sockets + 1).to_string(),
            ),
            ("SERVER__MAX_CONNECTIONS", (sockets + 1).to_string()),
        ])
        .await?;

    // The results nobody is there to see; their epoch, from the output channel.
    let role = environment.role;
    let epoch = publish_and_await_results(&environment.redis, &output, missed, |n| {
        feed(role, (&input, &output), n, symbols, now_ns())
    })
    .await?;
    let keys: serde_json::Map<String, serde_json::Value> =
        (0..symbols).map(|i| (format!("S{i}"), 0.into())).collect();
    let request = serde_json::json!({"op": "resume", "public": {epoch: keys}}).to_string();

    // Back, all at once.
    let mut open = connect_sockets(
        bridge.address,
        sockets,
        |i| format!("resume{}?resume=1", i % 10),
        &[],
        None,
    )
    .await?;
    let frames = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let start = Instant::now();
    for socket in &mut open {
        socket.send(Message::text(request.clone())).await?;
    }
    let readers = spawn_readers(open, &frames, &stop, 1);
    let target = (missed * sockets) as u64;
    let complete = wait_for(&frames, target, Duration::from_secs(120)).await;
    let elapsed = start.elapsed();
    stop.cancel();
    let _ = collect(readers).await;
    bridge.stop().await;

    let delivered = frames.load(Relaxed);
    let mut row = Row::new(
        Scenario::Resume,
        format!(
            "{sockets} sockets x {missed} missed ({symbols} keys), {}",
            environment.role
        ),
    )
    .with("seconds", (elapsed.as_secs_f64() * 1000.0).round() / 1000.0)
    .with(
        "replayed_frames_per_s",
        (delivered as f64 / elapsed.as_secs_f64()).round(),
    )
    .with(
        "ms_per_socket",
        elapsed.as_secs_f64() * 1000.0 / sockets as f64,
    );
    if !complete {
        row.note = Some(format!(
            "incomplete: {delivered} of {target} frames within 120 s"
        ));
    }
    Ok(row)
}
