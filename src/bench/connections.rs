//! Connections: many idle sockets, and what each costs the bridge in RSS.
//!
//! Run with the bridge as a child process (the `bench` command does) so its
//! RSS is its own; sources are spread over several 127.0.0.x
//! addresses, since one address pair offers only ~28,000 ephemeral ports.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use super::clients::connect_sockets;
use super::environment::{raise_file_limit, rss_kib};
use super::{Environment, Options, Row, Scenario};
use crate::Error;

/// Sockets per source address, well inside the ephemeral port range.
const PER_SOURCE: usize = 20_000;

pub async fn run(environment: &Environment, options: &Options) -> Result<Row, Error> {
    let ends = if environment.in_process() { 2 } else { 1 };
    let limit = raise_file_limit(options.idle_sockets as u64 * ends + 1_024);
    let wanted = options.idle_sockets;
    let sockets =
        wanted.min(usize::try_from(limit.saturating_sub(1_024) / ends).unwrap_or(usize::MAX));
    let sources: Vec<IpAddr> = (0..sockets.div_ceil(PER_SOURCE).max(1))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8)))
        .collect();
    let bridge = environment
        .start_bridge(&[
            ("WEBSOCKET__DEFAULT_SYMBOLS", String::new()),
            ("SERVER__MAX_CONNECTIONS", (sockets + 10).to_string()),
            (
                "SERVER__MAX_CONNECTIONS_PER_CLIENT",
                (sockets + 10).to_string(),
            ),
        ])
        .await?;
    let pid = bridge.pid();
    let before = rss_kib(pid).unwrap_or(0);
    let open = connect_sockets(
        bridge.address,
        sockets,
        |i| format!("idle{}", i % 1000),
        &sources,
        None,
    )
    .await?;
    // Let the sessions settle into their idle state before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid).unwrap_or(0);
    let opened = open.len();
    drop(open);
    bridge.stop().await;

    let per_socket = (after.saturating_sub(before)) as f64 / opened.max(1) as f64;
    let mut row = Row::new(Scenario::Connections, format!("{opened} idle sockets"))
        .with("rss_before_kib", before as f64)
        .with("rss_after_kib", after as f64)
        .with("kib_per_socket", (per_socket * 100.0).round() / 100.0);
    let mut notes = Vec::new();
    if pid.is_none() {
        notes.push("bridge in-process: RSS includes the client sockets".to_owned());
    }
    if opened < wanted {
        notes.push(format!(
            "{wanted} wanted; the open-file limit ({limit}) allows {opened}"
        ));
    }
    if !notes.is_empty() {
        row.note = Some(notes.join("; "));
    }
    Ok(row)
}
