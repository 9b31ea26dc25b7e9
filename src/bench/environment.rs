//! What the benchmark runs against: a Redis server and bridges.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::clients::RedisAt;
use crate::Error;
use crate::config::Settings;
use crate::topology::Role;

/// The Redis server the benchmark uses (a throwaway one is killed on drop),
/// and how bridges are run.
pub struct Environment {
    /// Its URL and TLS.
    pub redis: RedisAt,
    spawned: Option<Child>,
    /// Run bridges as child processes of this binary; in-process when `None`.
    bridge_binary: Option<PathBuf>,
    /// The role every bridge runs in.
    pub role: Role,
}

impl Environment {
    /// Uses `url`, or starts `redis-server` on a free port. Bridges run as
    /// children of `bridge_binary` when given, so their memory and
    /// descriptors are their own.
    pub async fn start(
        redis: Option<RedisAt>,
        bridge_binary: Option<PathBuf>,
        role: Role,
    ) -> Result<Self, Error> {
        if let Some(redis) = redis {
            return Ok(Self {
                redis,
                spawned: None,
                bridge_binary,
                role,
            });
        }
        let port = free_port()?;
        // Unlimited pub/sub output buffers: the ceiling run deliberately lets a
        // subscriber fall behind, which Redis's default limit would punish by
        // disconnecting it.
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--client-output-buffer-limit", "pubsub 0 0 0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                Error::io(
                    "cannot start redis-server (install it: apt-get install redis-server, or pass --redis URL)",
                    e,
                )
            })?;
        let environment = Self {
            redis: RedisAt::new(
                &format!("redis://127.0.0.1:{port}"),
                &crate::broker::TlsFiles::default(),
            ),
            spawned: Some(child),
            bridge_binary,
            role,
        };
        for _ in 0..200 {
            if ping(port).await {
                return Ok(environment);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(Error::Input(format!(
            "redis-server on port {port} did not answer PING"
        )))
    }

    /// Settings for a bridge on this Redis, with `overrides` as
    /// `QUOTEBRIDGE__…` variables would give them.
    pub fn settings(
        &self,
        overrides: &[(&str, String)],
        config: Option<&Path>,
    ) -> Result<Settings, Error> {
        let mut env: HashMap<String, String> = self
            .overrides(overrides)
            .into_iter()
            .map(|(k, v)| (format!("QUOTEBRIDGE__{k}"), v))
            .collect();
        env.insert("QUOTEBRIDGE__REDIS__URL".into(), self.redis.url.clone());
        Ok(Settings::load_with_env(config, Some(env))?)
    }

    /// Starts a bridge — a child process, or in this process — and waits
    /// until it is subscribed.
    pub async fn start_bridge(&self, overrides: &[(&str, String)]) -> Result<Bridge, Error> {
        self.start_bridge_with(overrides, None).await
    }

    /// [`Environment::start_bridge`] with a configuration file too.
    pub async fn start_bridge_with(
        &self,
        overrides: &[(&str, String)],
        config: Option<&Path>,
    ) -> Result<Bridge, Error> {
        if let Some(binary) = &self.bridge_binary {
            let bridge = self.start_child(binary, overrides, config)?;
            wait_ready(bridge.address).await?;
            return Ok(bridge);
        }
        let settings = self.settings(overrides, config)?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::io("cannot bind the bridge", e))?;
        let address = listener
            .local_addr()
            .map_err(|e| Error::io("cannot read the bridge address", e))?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(crate::run(settings, listener, shutdown.clone()));
        wait_ready(address).await?;
        Ok(Bridge {
            address,
            running: Running::InProcess { shutdown, task },
        })
    }

    fn start_child(
        &self,
        binary: &Path,
        overrides: &[(&str, String)],
        config: Option<&Path>,
    ) -> Result<Bridge, Error> {
        // Check the overrides here, where a mistake gets a clear error.
        self.settings(overrides, config)?;
        let port = free_port()?;
        let mut command = Command::new(binary);
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        command
            .arg("serve")
            .env("QUOTEBRIDGE__REDIS__URL", &self.redis.url)
            .env("QUOTEBRIDGE__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (key, value) in self.overrides(overrides) {
            command.env(format!("QUOTEBRIDGE__{key}"), value);
        }
        let child = command
            .spawn()
            .map_err(|e| Error::io(format!("cannot start {}", binary.display()), e))?;
        Ok(Bridge {
            address: ([127, 0, 0, 1], port).into(),
            running: Running::Child(child),
        })
    }

    /// A scenario's overrides, with this environment's role.
    fn overrides(&self, overrides: &[(&str, String)]) -> Vec<(String, String)> {
        std::iter::once(("NODE__ROLE".to_owned(), self.role.to_string()))
            .chain(overrides.iter().map(|(k, v)| ((*k).to_owned(), v.clone())))
            .collect()
    }

    /// Whether bridges run in this process (and so share its descriptors).
    #[must_use]
    pub fn in_process(&self) -> bool {
        self.bridge_binary.is_none()
    }
}

impl Drop for Environment {
    fn drop(&mut self) {
        if let Some(child) = &mut self.spawned {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running bridge.
pub struct Bridge {
    /// Its HTTP/WebSocket address.
    pub address: SocketAddr,
    running: Running,
}

enum Running {
    InProcess {
        shutdown: CancellationToken,
        task: JoinHandle<Result<(), Error>>,
    },
    Child(Child),
}

impl Bridge {
    /// Its process id, when it runs as a child.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        match &self.running {
            Running::Child(child) => Some(child.id()),
            Running::InProcess { .. } => None,
        }
    }

    /// Starts measuring the CPU time it uses from now on.
    #[must_use]
    pub fn cpu_meter(&self) -> CpuMeter {
        let pid = self.pid();
        CpuMeter {
            pid,
            start: pid.and_then(cpu_time),
        }
    }

    /// Stops it and waits.
    pub async fn stop(mut self) {
        if let Running::InProcess { shutdown, task } = &mut self.running {
            shutdown.cancel();
            let _ = task.await;
        }
    }
}

impl Drop for Bridge {
    /// Whatever way a scenario ends, no bridge outlives it.
    fn drop(&mut self) {
        match &mut self.running {
            Running::InProcess { shutdown, .. } => shutdown.cancel(),
            Running::Child(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Waits until `/readyz` at `address` answers 200.
pub async fn wait_ready(address: SocketAddr) -> Result<(), Error> {
    for _ in 0..500 {
        if http_status(address, "/readyz").await == Some(200) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(Error::Input(format!(
        "the bridge at {address} did not become ready"
    )))
}

async fn http_status(address: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    std::str::from_utf8(&response)
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").await.is_ok()
        && stream.read_exact(&mut reply).await.is_ok()
        && &reply == b"+PONG\r\n"
}

/// A port nobody listens on right now.
pub fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::io("cannot find a free port", e))
}

/// The CPU time a bridge running as a child uses from a starting point.
pub struct CpuMeter {
    pid: Option<u32>,
    start: Option<Duration>,
}

impl CpuMeter {
    /// The CPU time used since the start per delivered frame, in
    /// nanoseconds: unlike latency, it hardly depends on what else the
    /// machine is doing. `None` for a bridge in this process, and below
    /// 100 ms of CPU, since the kernel counts it in 10 ms ticks.
    #[must_use]
    pub fn ns_per_frame(&self, frames: u64) -> Option<f64> {
        let used = cpu_time(self.pid?)?.saturating_sub(self.start?);
        (used >= Duration::from_millis(100))
            .then(|| (used.as_nanos() as f64 / frames.max(1) as f64).round())
    }
}

/// CPU time (user and system, all threads) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    // Linux reports it in USER_HZ ticks, which are 1/100 s on every
    // architecture it runs on.
    const TICKS_PER_SECOND: u64 = 100;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(Duration::from_millis(
        cpu_ticks(&stat)? * 1000 / TICKS_PER_SECOND,
    ))
}

/// utime + stime from a `/proc/PID/stat` line.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses; fields after it don't.
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ');
    // utime and stime are fields 14 and 15 of proc(5), 12 and 13 after the name.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size of process `pid` (this process when `None`), in KiB.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Raises the open-file limit towards `wanted` (never lowering it); returns
/// the soft limit now in force. Child processes inherit it.
pub fn raise_file_limit(wanted: u64) -> u64 {
    use rlimit::Resource;
    let Ok((_, hard)) = Resource::NOFILE.get() else {
        return 1024;
    };
    if wanted > hard {
        // Only a privileged process may raise the hard limit; try anyway.
        let _ = Resource::NOFILE.set(wanted, wanted);
    }
    let _ = rlimit::increase_nofile_limit(wanted);
    Resource::NOFILE.get().map_or(1024, |(soft, _)| soft)
}

/// CPU model, core count and memory, for the report header.
pub fn describe_machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or_else(String::new, |kib| format!(", {} GiB", kib / 1024 / 1024));
    format!("{cores} cores, {model}{memory}")
}

/// The quotebridge binary when it is this process (the `bench` command).
#[must_use]
pub fn current_binary() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let name = exe.file_stem()?.to_str()?;
    (name == "quotebridge").then_some(exe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn cpu_ticks_are_read_past_an_awkward_command_name() {
        let stat = "42 (a b) c)) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 1";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert!(cpu_time(std::process::id()).is_some());
    }
}
