//! Connections: many idle sockets, and what each costs the bridge in RSS.
//!
//! The bridge runs as a child process (when the quotebridge binary is known)
//! so its RSS is its own; sources are spread over several 127.0.0.x
//! addresses, since one address pair offers only ~28,000 ephemeral ports.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::clients::connect_sockets;
use super::environment::{free_port, raise_file_limit, rss_kib, wait_ready};
use super::{Environment, Options, Row, Scenario};
use crate::Error;

/// Sockets per source address, well inside the ephemeral port range.
const PER_SOURCE: usize = 20_000;

pub async fn run(environment: &Environment, options: &Options) -> Result<Row, Error> {
    // Both ends may live in this process (in-process bridge): two descriptors each.
    let limit = raise_file_limit(options.idle_sockets as u64 * 2 + 1_024);
    let wanted = options.idle_sockets;
    let sockets =
        wanted.min(usize::try_from(limit.saturating_sub(1_024) / 2).unwrap_or(usize::MAX));
    let sources: Vec<IpAddr> = (0..sockets.div_ceil(PER_SOURCE).max(1))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8)))
        .collect();
    let overrides = [
        ("WEBSOCKET__DEFAULT_SYMBOLS", String::new()),
        ("SERVER__MAX_CONNECTIONS", (sockets + 10).to_string()),
        (
            "SERVER__MAX_CONNECTIONS_PER_CLIENT",
            (sockets + 10).to_string(),
        ),
    ];

    let (bridge, pid) = match &options.bridge_binary {
        Some(binary) => {
            let child = ChildBridge::start(binary, environment, &overrides)?;
            let pid = child.child.id();
            (Running::Child(child), Some(pid))
        }
        None => (
            Running::InProcess(environment.start_bridge(&overrides).await?),
            None,
        ),
    };
    let address = bridge.address();
    wait_ready(address).await?;
    let before = rss_kib(pid).unwrap_or(0);
    let open = connect_sockets(address, sockets, |i| format!("idle{}", i % 1000), &sources).await?;
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

enum Running {
    Child(ChildBridge),
    InProcess(super::environment::Bridge),
}

impl Running {
    fn address(&self) -> std::net::SocketAddr {
        match self {
            Running::Child(child) => child.address,
            Running::InProcess(bridge) => bridge.address,
        }
    }

    async fn stop(self) {
        match self {
            Running::Child(child) => drop(child),
            Running::InProcess(bridge) => bridge.stop().await,
        }
    }
}

/// `quotebridge serve` as a child, killed on drop.
struct ChildBridge {
    child: Child,
    address: std::net::SocketAddr,
}

impl ChildBridge {
    fn start(
        binary: &std::path::Path,
        environment: &Environment,
        overrides: &[(&str, String)],
    ) -> Result<Self, Error> {
        let port = free_port()?;
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .env("QUOTEBRIDGE__REDIS__URL", &environment.url)
            .env("QUOTEBRIDGE__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (key, value) in overrides {
            command.env(format!("QUOTEBRIDGE__{key}"), value);
        }
        let child = command
            .spawn()
            .map_err(|e| Error::io(format!("cannot start {}", binary.display()), e))?;
        Ok(Self {
            child,
            address: ([127, 0, 0, 1], port).into(),
        })
    }
}

impl Drop for ChildBridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
