//! Abuse: what one client acting within its documented limits does to
//! everyone else's latency.
//!
//! The bridge first sees [`SEEDED_KEYS`] symbols (so each socket's `"*"`
//! covers that many keys, each with a history). Then, in phases of
//! `--seconds` each, quotes flow at [`RATE`] a second over 100 of those
//! symbols while two honest sockets read every result; the first phase is
//! quiet, and each later one runs one abuse from outside testing alone:
//!
//! - `max_rate`: 50 sockets subscribe `{"op":"subscribe","symbols":["*"],
//!   "max_rate":0.0003}`, every seeded symbol gets one more result (so each
//!   socket's limit has seen every key, as over a day's trading), and they
//!   re-send that subscribe 15 times a second each, reading what they get;
//! - `big resume`: 20 sockets at a time open with `?resume=1`, name 5,000
//!   keys in one resume (49 KB), and hang up, over and over;
//! - `stats`: 4 keep-alive connections ask `GET /stats` back to back;
//! - `resume loop`: 100 sockets at a time resume a few keys from their
//!   start (a small request, a reply as large as the queue bounds allow),
//!   read the reply and the missed results it announces, and hang up, over
//!   and over;
//! - `connect flood`: the resume loop of a client that ignores its limits:
//!   refused (429), each socket tries again 10 ms later instead of when the
//!   bridge said.
//!
//! The resuming abusers of the first four open sockets as fast as their
//! client code may: refused for opening too fast, they wait as the 429's
//! `Retry-After` asks. The last shows what ignoring that costs everyone: the
//! bridge refuses each try cheaply, but a TCP connection and an HTTP request
//! are work that no per-client limit can stop (that is for a firewall or a
//! load balancer in front, per address).
//!
//! Each phase reports the honest readers' p50, p99 and maximum, and the
//! p99 (and p50) over that of a quiet phase run just before it: the goal is
//! a p99 at most 2 times the quiet one.
//! A last row shows how far consecutive quiet phases' p99s are apart with
//! no abuse at all (`largest_quiet_swing`): the machine's own noise, against
//! which a single ratio has to be read.
//! The honest publisher and readers run on a thread and runtime of their
//! own, apart from the abusive clients, as they would on another machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::clients::{
    Latency, RedisAt, Socket, collect, connect_sockets, publish_and_await_results, publish_paced,
    publisher, spawn_readers,
};
use super::environment::Bridge;
use super::{Environment, Options, Row, Scenario, feed};
use crate::Error;
use crate::topology::Role;

/// Symbols the bridge has seen before the phases start.
pub const SEEDED_KEYS: usize = 20_000;
/// Quotes a second during every phase.
pub const RATE: u64 = 500;
/// Symbols those quotes go to.
const LIVE_SYMBOLS: usize = 100;
/// Honest sockets, each reading every result.
const HONEST: usize = 2;

/// One abuse, run by its own tasks until `stop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Abuse {
    MaxRate,
    BigResume,
    Stats,
    ResumeLoop,
    ConnectFlood,
}

impl Abuse {
    const ALL: [Self; 5] = [
        Self::MaxRate,
        Self::BigResume,
        Self::Stats,
        Self::ResumeLoop,
        Self::ConnectFlood,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::MaxRate => "max_rate: 50 sockets re-subscribe \"*\" 15/s",
            Self::BigResume => "big resume: 20 sockets x 5,000 keys, reset",
            Self::Stats => "stats: 4 keep-alive /stats loops",
            Self::ResumeLoop => "resume loop: 100 sockets",
            Self::ConnectFlood => "connect flood: resume loop retrying 429s at once",
        }
    }
}

pub async fn run(environment: &Environment, options: &Options) -> Result<Vec<Row>, Error> {
    let (input, output) = ("bench.abuse.in".to_owned(), "bench.abuse.out".to_owned());
    let bridge = environment
        .start_bridge(&[
            ("REDIS__INPUT", input.clone()),
            ("REDIS__OUTPUT", output.clone()),
            ("SMA__EMIT_PARTIAL", "true".into()),
        ])
        .await?;
    let epoch = seed(environment, (&input, &output)).await?;
    let channels = (input.as_str(), output.as_str());
    let mut rows = Vec::new();
    let mut quiet_p99s = Vec::new();
    for abuse in Abuse::ALL {
        // A shared machine's own noise drifts during a run (the quiet p99
        // has moved 3× between runs minutes apart): each abuse is compared
        // with a quiet phase run just before it, not with the first. The
        // first quiet phase is a row of its own.
        let quiet = phase(environment, &bridge, channels, &epoch, None, options).await?;
        let quiet_p99 = quiet.get("p99_us").unwrap_or(f64::NAN);
        let quiet_p50 = quiet.get("p50_us").unwrap_or(f64::NAN);
        quiet_p99s.push(quiet_p99);
        if rows.is_empty() {
            rows.push(quiet);
        }
        let row = phase(environment, &bridge, channels, &epoch, Some(abuse), options).await?;
        let ratio =
            |quantile: &str, quiet: f64| hundredths(row.get(quantile).unwrap_or(f64::NAN) / quiet);
        // The p50's ratio too: where the machine's noise sets the p99, a
        // steady cost of the abuse still shows in the median.
        let (p99_ratio, p50_ratio) = (ratio("p99_us", quiet_p99), ratio("p50_us", quiet_p50));
        rows.push(
            row.with("quiet_p99_us", quiet_p99)
                .with("p99_vs_quiet", p99_ratio)
                .with("p50_vs_quiet", p50_ratio),
        );
    }
    bridge.stop().await;
    rows.push(noise_floor(&quiet_p99s));
    Ok(rows)
}

/// How far apart the quiet phases' p99s are, by themselves: the ratio an
/// abuse's `p99_vs_quiet` could show with no abuse at all.
fn noise_floor(quiet_p99s: &[f64]) -> Row {
    let swing = quiet_p99s
        .windows(2)
        .map(|pair| (pair[1] / pair[0]).max(pair[0] / pair[1]))
        .fold(1.0, f64::max);
    let least = quiet_p99s.iter().copied().fold(f64::INFINITY, f64::min);
    let most = quiet_p99s.iter().copied().fold(0.0, f64::max);
    Row::new(
        Scenario::Abuse,
        format!("noise: the {} quiet phases' p99s", quiet_p99s.len()),
    )
    .with("quiet_p99_min_us", least)
    .with("quiet_p99_max_us", most)
    .with("largest_quiet_swing", hundredths(swing))
}

fn hundredths(ratio: f64) -> f64 {
    (ratio * 100.0).round() / 100.0
}

/// One result for each of [`SEEDED_KEYS`] symbols; returns their epoch.
async fn seed(environment: &Environment, (input, output): (&str, &str)) -> Result<String, Error> {
    let role = environment.role;
    publish_and_await_results(&environment.redis, output, SEEDED_KEYS, |n| {
        feed(role, (input, output), n, SEEDED_KEYS, 0)
    })
    .await
}

/// One phase: load, honest readers and (if any) the abuse, for `seconds`.
async fn phase(
    environment: &Environment,
    bridge: &Bridge,
    (input, output): (&str, &str),
    epoch: &str,
    abuse: Option<Abuse>,
    options: &Options,
) -> Result<Row, Error> {
    let stop = CancellationToken::new();
    let mut abusers = JoinSet::new();
    let opens = Arc::new(Opens::default());
    let started = Instant::now();
    if let Some(abuse) = abuse {
        start(abuse, bridge, epoch, (&stop, &opens), &mut abusers).await?;
        if abuse == Abuse::MaxRate {
            // Every seeded key once more, now that the abusers subscribe;
            // the phase starts once the bridge has put out every one (its
            // sockets then hold them), not after a guessed pause that a
            // busy machine outlasts.
            let role = environment.role;
            publish_and_await_results(&environment.redis, output, SEEDED_KEYS, |n| {
                feed(role, (input, output), n, SEEDED_KEYS, 0)
            })
            .await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let honest = Honest {
        redis: environment.redis.clone(),
        address: bridge.address,
        channels: (input.to_owned(), output.to_owned()),
        role: environment.role,
        seconds: options.seconds,
    };
    // The honest side (its publisher and readers) runs on a thread and a
    // runtime of its own, as it would on another machine: a stamp or a read
    // waiting behind the abusive clients' tasks would be the benchmark's
    // delay, not the bridge's.
    let (latency, frames, want) = honest.measure().await?;
    stop.cancel();
    let work = abusers.len();
    while abusers.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    let label = abuse.map_or("quiet", Abuse::name);
    let mut row = Row::new(
        Scenario::Abuse,
        format!("{label}, {RATE} quotes/s, {HONEST} honest readers"),
    )
    .with("p50_us", latency.quantile_us(0.5))
    .with("p99_us", latency.quantile_us(0.99))
    .with("max_us", latency.max_us());
    // What a resume abuse amounts to: the sockets it tried to open a
    // second, and those its client code's limits refused (429).
    let tried = opens.tried.load(Relaxed);
    if tried > 0 {
        let per_second = |n: u64| (n as f64 / seconds).round();
        row = row
            .with("opens_per_s", per_second(tried))
            .with("refused_per_s", per_second(opens.refused.load(Relaxed)));
    }
    let received = frames;
    if received < want {
        row.note = Some(format!(
            "{} of {want} results had not arrived 5 s after the phase ({work} abusive tasks)",
            want - received
        ));
    }
    Ok(row)
}

/// The honest clients of a phase: a paced publisher and [`HONEST`]
/// sockets reading every result.
struct Honest {
    redis: RedisAt,
    address: std::net::SocketAddr,
    channels: (String, String),
    role: Role,
    seconds: f64,
}

impl Honest {
    /// Publishes the phase's quotes and reads every result, on a thread of
    /// its own; returns the readers' latency, the results they got, and
    /// how many they should have.
    async fn measure(self) -> Result<(Latency, u64, u64), Error> {
        let (done, result) = tokio::sync::oneshot::channel();
        // Named, so that a scheduler trace (`perf sched`) tells it apart.
        let spawned = std::thread::Builder::new()
            .name("honest-clients".into())
            .spawn(move || {
                let measured = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::io("cannot start the honest clients' runtime", e))
                    .and_then(|runtime| runtime.block_on(self.run()));
                let _ = done.send(measured);
            });
        if let Err(err) = spawned {
            return Err(Error::io("cannot start the honest clients' thread", err));
        }
        result.await.unwrap_or_else(|_| {
            let ended = std::io::Error::other("it ended without a result");
            Err(Error::io("the honest clients' thread", ended))
        })
    }

    async fn run(self) -> Result<(Latency, u64, u64), Error> {
        let stop = CancellationToken::new();
        let mut conn = publisher(&self.redis).await?;
        let honest =
            connect_sockets(self.address, HONEST, |i| format!("honest{i}"), &[], None).await?;
        let frames = Arc::new(AtomicU64::new(0));
        let readers = spawn_readers(honest, &frames, &stop, 1);
        let total = (RATE as f64 * self.seconds).max(1.0) as u64;
        let (input, output) = (self.channels.0.as_str(), self.channels.1.as_str());
        let message = |i, ts| feed(self.role, (input, output), i, LIVE_SYMBOLS, ts);
        let sent = publish_paced(&mut conn, RATE, total, message, || {}).await?;
        // What is still on its way gets a few seconds; a stalled bridge
        // shows as missing frames.
        let want = sent * HONEST as u64;
        let deadline = Instant::now() + Duration::from_secs(5);
        while frames.load(Relaxed) < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
        let latency = collect(readers).await;
        Ok((latency, frames.load(Relaxed), want))
    }
}

/// Sockets an abuse tried to open, and those refused.
#[derive(Debug, Default)]
struct Opens {
    tried: AtomicU64,
    refused: AtomicU64,
}

/// Starts `abuse`'s tasks in `tasks`, each running until `stop`; those that
/// open sockets over and over count them in `opens`.
async fn start(
    abuse: Abuse,
    bridge: &Bridge,
    epoch: &str,
    (stop, opens): (&CancellationToken, &Arc<Opens>),
    tasks: &mut JoinSet<()>,
) -> Result<(), Error> {
    let address = bridge.address;
    match abuse {
        Abuse::MaxRate => {
            let request = r#"{"op":"subscribe","symbols":["*"],"max_rate":0.0003}"#;
            let sockets = connect_sockets(address, 50, |_| "rates".into(), &[], None).await?;
            for socket in sockets {
                let (mut sink, mut stream) = socket.split();
                let stop = stop.clone();
                tasks.spawn(async move {
                    let mut ticks = tokio::time::interval(Duration::from_millis(1000 / 15));
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => break,
                            _ = ticks.tick() => {
                                if sink.send(Message::text(request)).await.is_err() {
                                    break;
                                }
                            }
                            read = stream.next() => if !matches!(read, Some(Ok(_))) { break },
                        }
                    }
                });
            }
        }
        Abuse::BigResume => {
            let keys: serde_json::Map<String, serde_json::Value> =
                (0..5_000).map(|i| (format!("S{i}"), 0.into())).collect();
            let request = serde_json::json!({"op": "resume", "public": {epoch: keys}}).to_string();
            let loops = ResumeLoops {
                sockets: 20,
                code: "resumes",
                read: false,
                obey_retry_after: true,
            };
            loops.start(address, request, (stop, opens), tasks);
        }
        Abuse::Stats => {
            for _ in 0..4 {
                let stop = stop.clone();
                tasks.spawn(async move {
                    let Ok(mut tcp) = tokio::net::TcpStream::connect(address).await else {
                        return;
                    };
                    let request = format!("GET /stats HTTP/1.1\r\nHost: {address}\r\n\r\n");
                    let mut buffer = vec![0u8; 64 * 1024];
                    while !stop.is_cancelled() {
                        if tcp.write_all(request.as_bytes()).await.is_err() {
                            return;
                        }
                        // One response: its head and a JSON body, read whole.
                        match tcp.read(&mut buffer).await {
                            Ok(1..) => {}
                            _ => return,
                        }
                    }
                });
            }
        }
        Abuse::ResumeLoop | Abuse::ConnectFlood => {
            let keys: serde_json::Map<String, serde_json::Value> = (0..LIVE_SYMBOLS)
                .map(|i| (format!("S{i}"), 0.into()))
                .collect();
            let request = serde_json::json!({"op": "resume", "public": {epoch: keys}}).to_string();
            let loops = ResumeLoops {
                sockets: 100,
                code: "replays",
                read: true,
                obey_retry_after: abuse == Abuse::ResumeLoop,
            };
            loops.start(address, request, (stop, opens), tasks);
        }
    }
    Ok(())
}

/// Sockets that open with `?resume=1`, resume, and hang up, over and over.
struct ResumeLoops {
    /// How many at a time.
    sockets: usize,
    /// Their client code.
    code: &'static str,
    /// Whether each reads the reply and the replay before hanging up.
    read: bool,
    /// Whether a socket refused for opening too fast waits as the 429's
    /// `Retry-After` asks (a client within its limits), or tries again
    /// 10 ms later (one that ignores them).
    obey_retry_after: bool,
}

impl ResumeLoops {
    /// One task per socket, each sending `request` once open, until `stop`.
    fn start(
        self,
        address: std::net::SocketAddr,
        request: String,
        (stop, opens): (&CancellationToken, &Arc<Opens>),
        tasks: &mut JoinSet<()>,
    ) {
        let request = Arc::new(request);
        for _ in 0..self.sockets {
            let (stop, request, opens) = (stop.clone(), request.clone(), opens.clone());
            let Self {
                code,
                read,
                obey_retry_after,
                ..
            } = self;
            tasks.spawn(async move {
                while !stop.is_cancelled() {
                    opens.tried.fetch_add(1, Relaxed);
                    let mut socket = match open_resuming(address, code).await {
                        Ok(socket) => socket,
                        Err(asked) => {
                            opens.refused.fetch_add(1, Relaxed);
                            let wait = asked
                                .filter(|_| obey_retry_after)
                                .unwrap_or(Duration::from_millis(10));
                            tokio::select! {
                                () = stop.cancelled() => break,
                                () = tokio::time::sleep(wait) => continue,
                            }
                        }
                    };
                    if socket.send(Message::text(request.as_str())).await.is_err() {
                        continue;
                    }
                    if read {
                        read_replay(&mut socket, &stop).await;
                    }
                    drop(socket);
                }
            });
        }
    }
}

/// Opens a socket of client code `code` with `?resume=1`; refused, the
/// wait its `Retry-After` asks for, if it gave one.
async fn open_resuming(
    address: std::net::SocketAddr,
    code: &str,
) -> Result<Socket, Option<Duration>> {
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|_| None)?;
    let _ = tcp.set_nodelay(true);
    let url = format!("ws://{address}/ws/{code}?resume=1");
    match tokio_tungstenite::client_async(url, tcp).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(refused)) => Err(refused
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok()?.parse().ok())
            .map(Duration::from_secs)),
        Err(_) => Err(None),
    }
}

/// Reads a resume's reply and the missed results it says follow (live
/// results of the keys it names arrive after them, so a socket that waited
/// for quiet would never hang up), or the error that refused it. Gives up
/// after a second without a frame.
async fn read_replay(socket: &mut Socket, stop: &CancellationToken) {
    let mut left: Option<u64> = None;
    while left != Some(0) && !stop.is_cancelled() {
        let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_secs(1), socket.next()).await
        else {
            return;
        };
        let Message::Text(text) = message else {
            continue;
        };
        left = match left {
            Some(left) => Some(left.saturating_sub(1)),
            None if text.starts_with(r#"{"type":"resumed""#) => {
                let reply: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                Some(reply["replayed"].as_u64().unwrap_or(0))
            }
            // Refused (its client code's allowance is spent): the socket
            // went live without a replay.
            None if text.starts_with(r#"{"type":"error""#) => return,
            None => None,
        };
    }
}
