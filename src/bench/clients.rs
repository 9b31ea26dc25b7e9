//! The benchmark's load: WebSocket readers, a Redis subscriber, latency histograms.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
        self.record(now_ns().saturating_sub(ts));
    }

    /// Records one latency of `ns` nanoseconds.
    pub fn record(&mut self, ns: u64) {
        let _ = self.0.record(ns.max(1_000));
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
            // The welcome frame, read here so that nothing is left in
            // tungstenite's buffer when a reader takes the bare stream.
            match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => Ok::<Socket, Error>(socket),
                _ => Err(Error::Input(format!("no welcome frame from {address}"))),
            }
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
///
/// They read frames straight off the TCP stream instead of through
/// tungstenite. The readers stand in for clients on other machines, yet here
/// they share the bridge's two cores; through tungstenite (two waker
/// registrations, a UTF-8 check and a buffer split per frame, a clock read
/// per frame) they used nearly as much CPU as the bridge they measure. A
/// server's frames are unmasked and the bridge never fragments them, so
/// reading them is a header and a length.
pub fn spawn_readers(
    sockets: Vec<Socket>,
    frames: &Arc<AtomicU64>,
    stop: &CancellationToken,
) -> Vec<JoinHandle<Latency>> {
    sockets
        .into_iter()
        .map(|socket| {
            // The handshake and welcome went through tungstenite, and
            // nothing is sent after the welcome until the load starts, so
            // tungstenite holds no unread bytes.
            let mut tcp = socket.into_inner();
            let frames = frames.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut latency = Latency::new();
                let mut reader = FrameReader::default();
                let stopped = stop.cancelled();
                tokio::pin!(stopped);
                loop {
                    let read = tokio::select! {
                        biased;
                        read = tcp.read(reader.spare()) => read,
                        () = &mut stopped => break,
                    };
                    let Ok(n @ 1..) = read else { break };
                    // Everything in one read arrived at the same moment.
                    let now = now_ns();
                    let mut counted = 0;
                    let mut pings = Vec::new();
                    let scanned = reader.scan(n, |frame| match frame {
                        Frame::Text(payload) => {
                            if let Some(ts) = ts_of(payload) {
                                latency.record(now.saturating_sub(ts));
                                counted += 1;
                            }
                        }
                        Frame::Ping(payload) => pings.push(pong(payload)),
                        Frame::Other => {}
                    });
                    frames.fetch_add(counted, Relaxed);
                    let mut answered = true;
                    for reply in pings {
                        answered = answered && tcp.write_all(&reply).await.is_ok();
                    }
                    match scanned {
                        Ok(()) if answered => {}
                        Ok(()) | Err(Ended::Closed) => break,
                        Err(ended) => {
                            tracing::warn!(?ended, "benchmark reader stopped");
                            break;
                        }
                    }
                }
                latency
            })
        })
        .collect()
}

/// A server frame, as the benchmark's readers care about it.
enum Frame<'a> {
    Text(&'a [u8]),
    Ping(&'a [u8]),
    Other,
}

/// Why a reader stops.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The bridge closed the socket.
    Closed,
    /// A frame a server never sends (masked, or longer than anything real).
    Protocol,
}

/// Splits a byte stream into WebSocket frames from a server.
#[derive(Default)]
struct FrameReader {
    buffer: Vec<u8>,
    /// Bytes of `buffer` received and not yet scanned.
    filled: usize,
}

impl FrameReader {
    /// About a hundred SMA frames; at 10,000 sockets, 160 MiB in all.
    const CAPACITY: usize = 16 * 1024;

    /// Room to read into.
    fn spare(&mut self) -> &mut [u8] {
        if self.buffer.len() < Self::CAPACITY {
            self.buffer.resize(Self::CAPACITY, 0);
        }
        &mut self.buffer[self.filled..]
    }

    /// Takes `n` more bytes read into `spare()` and hands every complete
    /// frame to `each`; a partial frame waits for the next read.
    fn scan(&mut self, n: usize, mut each: impl FnMut(Frame<'_>)) -> Result<(), Ended> {
        self.filled += n;
        let mut at = 0;
        let result = loop {
            match frame_at(&self.buffer[at..self.filled]) {
                Ok(Some((frame, len))) => {
                    let closed = matches!(frame, FrameKind::Close);
                    let payload = &self.buffer[at + len.header..at + len.header + len.payload];
                    each(match frame {
                        FrameKind::Text => Frame::Text(payload),
                        FrameKind::Ping => Frame::Ping(payload),
                        FrameKind::Close | FrameKind::Other => Frame::Other,
                    });
                    at += len.header + len.payload;
                    if closed {
                        break Err(Ended::Closed);
                    }
                }
                Ok(None) => break Ok(()),
                Err(ended) => break Err(ended),
            }
        };
        self.buffer.copy_within(at..self.filled, 0);
        self.filled -= at;
        if self.filled == self.buffer.len() {
            // One frame larger than the buffer: the bridge sends none.
            return Err(Ended::Protocol);
        }
        result
    }
}

enum FrameKind {
    Text,
    Ping,
    Close,
    Other,
}

struct FrameLen {
    header: usize,
    payload: usize,
}

/// The frame at the start of `bytes`, if all of it is there (RFC 6455 §5.2).
fn frame_at(bytes: &[u8]) -> Result<Option<(FrameKind, FrameLen)>, Ended> {
    let [first, second, ..] = *bytes else {
        return Ok(None);
    };
    if second & 0x80 != 0 {
        // A server never masks its frames.
        return Err(Ended::Protocol);
    }
    let (header, payload) = match second & 0x7f {
        126 if bytes.len() >= 4 => (4, usize::from(u16::from_be_bytes([bytes[2], bytes[3]]))),
        127 if bytes.len() >= 10 => {
            let mut len = [0u8; 8];
            len.copy_from_slice(&bytes[2..10]);
            (
                10,
                usize::try_from(u64::from_be_bytes(len)).map_err(|_| Ended::Protocol)?,
            )
        }
        126 | 127 => return Ok(None),
        short => (2, usize::from(short)),
    };
    if payload > FrameReader::CAPACITY {
        // Could never fit the buffer; the bridge's frames are ~200 bytes.
        return Err(Ended::Protocol);
    }
    if bytes.len() < header + payload {
        return Ok(None);
    }
    let kind = match first & 0x0f {
        0x1 => FrameKind::Text,
        0x8 => FrameKind::Close,
        0x9 => FrameKind::Ping,
        _ => FrameKind::Other,
    };
    Ok(Some((kind, FrameLen { header, payload })))
}

/// A client's answer to a ping: a pong with the same payload, masked as a
/// client must, with a zero key (XOR with zero leaves the payload as it is).
fn pong(payload: &[u8]) -> Vec<u8> {
    // Control frame payloads are at most 125 bytes.
    let len = payload.len().min(125);
    let mut frame = vec![0x8a, 0x80 | len as u8, 0, 0, 0, 0];
    frame.extend_from_slice(&payload[..len]);
    frame
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame: FIN, `opcode`, unmasked `payload`.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            len @ 0..126 => out.push(len as u8),
            len @ 126..65536 => {
                out.push(126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    /// Feeds `stream` to a reader `chunk` bytes at a time; returns what it saw.
    fn scan(stream: &[u8], chunk: usize) -> (Vec<String>, Result<(), Ended>) {
        let mut reader = FrameReader::default();
        let mut seen = Vec::new();
        let mut result = Ok(());
        for piece in stream.chunks(chunk) {
            reader.spare()[..piece.len()].copy_from_slice(piece);
            result = reader.scan(piece.len(), |frame| {
                seen.push(match frame {
                    Frame::Text(t) => format!("text {}", String::from_utf8_lossy(t)),
                    Frame::Ping(p) => format!("ping {}", String::from_utf8_lossy(p)),
                    Frame::Other => "other".to_owned(),
                });
            });
            if result.is_err() {
                break;
            }
        }
        (seen, result)
    }

    #[test]
    fn frames_are_found_however_the_stream_is_split() {
        let long = "x".repeat(300);
        let mut stream = frame(0x1, b"{\"ts\":1}");
        stream.extend(frame(0x9, b"p"));
        stream.extend(frame(0x1, long.as_bytes()));
        stream.extend(frame(0x2, b"bin"));
        let expected = vec![
            "text {\"ts\":1}".to_owned(),
            "ping p".to_owned(),
            format!("text {long}"),
            "other".to_owned(),
        ];
        for chunk in [1, 2, 3, 7, stream.len()] {
            let (seen, result) = scan(&stream, chunk);
            assert_eq!(seen, expected, "read {chunk} bytes at a time");
            assert!(result.is_ok());
        }
    }

    #[test]
    fn a_close_or_a_masked_frame_ends_the_reader() {
        let mut stream = frame(0x1, b"a");
        stream.extend(frame(0x8, b""));
        stream.extend(frame(0x1, b"after"));
        let (seen, result) = scan(&stream, stream.len());
        assert_eq!(seen, ["text a", "other"]);

        assert_eq!(result, Err(Ended::Closed));

        let masked = [0x81, 0x81, 1, 2, 3, 4, b'a' ^ 1];
        assert_eq!(scan(&masked, masked.len()).1, Err(Ended::Protocol));

        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(scan(&huge, huge.len()).1, Err(Ended::Protocol));
    }

    #[test]
    fn a_pong_is_a_masked_client_frame_with_the_ping_payload() {
        assert_eq!(pong(b"hi"), [0x8a, 0x82, 0, 0, 0, 0, b'h', b'i']);
    }
}
