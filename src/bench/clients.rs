//! The benchmark's load: WebSocket readers, a Redis subscriber, latency histograms.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt, stream};
use hdrhistogram::Histogram;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use super::environment::{Bridge, Environment};
use super::{now_ns, ts_of};
use crate::Error;

/// An open benchmark socket.
pub type Socket = WebSocketStream<TcpStream>;

/// Latencies in nanoseconds, 1 µs to 100 s, 3 significant digits.
pub struct Latency(Histogram<u64>);

impl Latency {
    pub fn new() -> Self {
        // Constant bounds within hdrhistogram's limits: no input reaches this.
        Self(Histogram::new_with_bounds(1_000, 100_000_000_000, 3).expect("valid histogram bounds"))
    }

    /// Records the time since `ts` (a `now_ns` stamp).
    pub fn record_since(&mut self, ts: u64) {
        let _ = self.0.record(now_ns().saturating_sub(ts).max(1_000));
    }

    pub fn merge(&mut self, other: &Latency) {
        let _ = self.0.add(&other.0);
    }

    /// The `q` quantile in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1_000.0
    }

    pub fn max_us(&self) -> f64 {
        self.0.max() as f64 / 1_000.0
    }
}

/// Opens `count` sockets to `address`, client code `code(i)`, 256 handshakes
/// at a time, spreading sources over `sources` local addresses (to have more
/// than one address's worth of ephemeral ports). Each socket's welcome is read.
pub async fn connect_sockets(
    address: SocketAddr,
    count: usize,
    code: impl Fn(usize) -> String,
    sources: &[IpAddr],
) -> Result<Vec<Socket>, Error> {
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let attempts = (0..count).map(|i| {
        let url = format!("ws://{address}/ws/{}", code(i));
        let source = sources.get(i % sources.len().max(1)).copied();
        async move {
            let tcp = match source {
                Some(ip) => {
                    let socket = TcpSocket::new_v4().map_err(|e| Error::io("socket", e))?;
                    // Ports still in TIME_WAIT from an earlier run may be
                    // reused; without this a second run within a minute
                    // runs out of ports on the source address.
                    socket
                        .set_reuseaddr(true)
                        .map_err(|e| Error::io("SO_REUSEADDR", e))?;
                    socket
                        .bind(SocketAddr::new(ip, 0))
                        .map_err(|e| Error::io(format!("bind {ip}"), e))?;
                    socket
                        .connect(address)
                        .await
                        .map_err(|e| Error::io("connect", e))?
                }
                None => TcpStream::connect(address)
                    .await
                    .map_err(|e| Error::io("connect", e))?,
            };
            let _ = tcp.set_nodelay(true);
            let (mut socket, _) =
                tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await?;
            // The welcome frame.
            let _ = tokio::time::timeout(Duration::from_secs(30), socket.next()).await;
            Ok::<Socket, Error>(socket)
        }
    });
    stream::iter(attempts)
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Readers for a set of sockets: each counts SMA frames into `frames` and
/// records their latency, until `stop`.
pub fn spawn_readers(
    sockets: Vec<Socket>,
    frames: &Arc<AtomicU64>,
    stop: &CancellationToken,
) -> Vec<JoinHandle<Latency>> {
    sockets
        .into_iter()
        .map(|mut socket| {
            let frames = frames.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut latency = Latency::new();
                // One registration for the whole run, not one per frame: the
                // readers' own overhead is CPU the bridge under test loses.
                let stopped = stop.cancelled();
                tokio::pin!(stopped);
                'reading: loop {
                    let first = tokio::select! {
                        biased;
                        message = socket.next() => message,
                        () = &mut stopped => break,
                    };
                    // Everything already received is counted with one update
                    // of the shared counter, which all readers contend on.
                    let mut counted = 0;
                    let mut next = first;
                    loop {
                        match next {
                            Some(Ok(Message::Text(text))) => {
                                if let Some(ts) = ts_of(text.as_bytes()) {
                                    latency.record_since(ts);
                                    counted += 1;
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => {
                                frames.fetch_add(counted, Relaxed);
                                break 'reading;
                            }
                        }
                        match socket.next().now_or_never() {
                            Some(message) => next = message,
                            None => break,
                        }
                    }
                    frames.fetch_add(counted, Relaxed);
                }
                latency
            })
        })
        .collect()
}

/// A Redis subscriber on `channel` counting messages into `received` and
/// recording their latency, until `stop`.
pub async fn spawn_subscriber(
    url: &str,
    channel: &str,
    received: &Arc<AtomicU64>,
    stop: &CancellationToken,
    measure_latency: bool,
) -> Result<JoinHandle<Latency>, Error> {
    let client = crate::broker::redis_client(url).map_err(crate::broker::BrokerError::from)?;
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .map_err(crate::broker::BrokerError::from)?;
    pubsub
        .subscribe(channel)
        .await
        .map_err(crate::broker::BrokerError::from)?;
    let received = received.clone();
    let stop = stop.clone();
    Ok(tokio::spawn(async move {
        let mut latency = Latency::new();
        let mut messages = pubsub.into_on_message();
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            let message = tokio::select! {
                biased;
                message = messages.next() => message,
                () = &mut stopped => break,
            };
            let Some(message) = message else { break };
            if measure_latency && let Some(ts) = ts_of(message.get_payload_bytes()) {
                latency.record_since(ts);
            }
            received.fetch_add(1, Relaxed);
        }
        latency
    }))
}

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

/// A connection for publishing load. Its timeouts are generous: a machine
/// saturated on purpose answers slowly, and that is a result, not an error.
pub async fn publisher(url: &str) -> Result<redis::aio::MultiplexedConnection, Error> {
    let client = crate::broker::redis_client(url).map_err(crate::broker::BrokerError::from)?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(60)));
    let conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(crate::broker::BrokerError::from)?;
    Ok(conn)
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

/// Merges the histograms the tasks return.
pub async fn collect(tasks: Vec<JoinHandle<Latency>>) -> Latency {
    let mut all = Latency::new();
    for task in tasks {
        if let Ok(latency) = task.await {
            all.merge(&latency);
        }
    }
    all
}
