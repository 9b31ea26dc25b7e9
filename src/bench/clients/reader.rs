//! Benchmark socket readers that split the server's frames themselves
//! (see [`spawn_readers`] for why).

use std::cell::RefCell;
use std::io::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::connect::Socket;
use super::histogram::Latency;
use crate::bench::{now_ns, ts_of};

/// Every result frame starts so (the control frames with `{"type"`).
const RESULT_START: &[u8] = b"{\"symbol\":";

thread_local! {
    /// What every reader on this thread reads into, then keeps only a
    /// partial frame of: one buffer that stays in cache, where a buffer per
    /// socket (160 MiB at 10,000 sockets) has every read land in memory
    /// nothing touched since that socket's last read.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_BYTES]);
}

/// Room for a read of many frames after a partial one.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Readers for a set of sockets: each counts result frames into `frames`
/// and records the latency of every `latency_every`th one (1: each), until
/// `stop`.
///
/// They read frames straight off the TCP stream instead of through
/// tungstenite. The readers stand in for clients on other machines, yet here
/// they share the bridge's two cores; through tungstenite (two waker
/// registrations, a UTF-8 check and a buffer split per frame, a clock read
/// per frame) they used nearly as much CPU as the bridge they measure. A
/// server's frames are unmasked and the bridge never fragments them, so
/// reading them is a header and a length. For the same reason a scenario
/// of millions of frames samples their latency: finding and reading each
/// frame's `ts` and recording it cost the readers more than the bridge
/// spent sending the frame.
pub fn spawn_readers(
    sockets: Vec<Socket>,
    frames: &Arc<AtomicU64>,
    stop: &CancellationToken,
    latency_every: u64,
) -> Vec<JoinHandle<Latency>> {
    let latency_every = latency_every.max(1);
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
                let mut results: u64 = 0;
                let stopped = stop.cancelled();
                tokio::pin!(stopped);
                loop {
                    let ready = tokio::select! {
                        biased;
                        ready = tcp.readable() => ready,
                        () = &mut stopped => break,
                    };
                    if ready.is_err() {
                        break;
                    }
                    let mut pings = Vec::new();
                    // Read, split and count without an await, so the
                    // thread's scratch buffer is never held across one.
                    let scanned = SCRATCH.with_borrow_mut(|scratch| {
                        let kept = reader.restore(scratch);
                        let n = match tcp.try_read(&mut scratch[kept..]) {
                            Ok(0) => return Err(Ended::Closed),
                            Ok(n) => n,
                            Err(err) if err.kind() == ErrorKind::WouldBlock => return Ok(()),
                            Err(_) => return Err(Ended::Closed),
                        };
                        // Everything in one read arrived at the same moment.
                        let now = now_ns();
                        let before = results;
                        let scanned = reader.scan(&scratch[..kept + n], |frame| match frame {
                            Frame::Text(payload) if payload.starts_with(RESULT_START) => {
                                // A frame stamped 0 is a warm-up's: counted, not timed.
                                if results.is_multiple_of(latency_every)
                                    && let Some(ts @ 1..) = ts_of(payload)
                                {
                                    latency.record(now.saturating_sub(ts));
                                }
                                results += 1;
                            }
                            Frame::Ping(payload) => pings.push(pong(payload)),
                            Frame::Text(_) | Frame::Other => {}
                        });
                        frames.fetch_add(results - before, Relaxed);
                        scanned
                    });
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

/// Splits a byte stream into WebSocket frames from a server, keeping
/// between reads only the partial frame a read ended in.
#[derive(Default)]
struct FrameReader {
    partial: Vec<u8>,
}

impl FrameReader {
    /// The longest frame a reader takes: about a hundred SMA frames.
    const MAX_FRAME: usize = 16 * 1024;

    /// Puts the partial frame kept from the last read at the start of
    /// `scratch`, for the next read to follow; returns its length.
    fn restore(&self, scratch: &mut [u8]) -> usize {
        scratch[..self.partial.len()].copy_from_slice(&self.partial);
        self.partial.len()
    }

    /// Hands every complete frame in `bytes` (what [`FrameReader::restore`]
    /// put there, then what was read) to `each`; keeps a partial one.
    fn scan(&mut self, bytes: &[u8], mut each: impl FnMut(Frame<'_>)) -> Result<(), Ended> {
        let mut at = 0;
        let result = loop {
            match frame_at(&bytes[at..]) {
                Ok(Some((frame, len))) => {
                    let closed = matches!(frame, FrameKind::Close);
                    let payload = &bytes[at + len.header..at + len.header + len.payload];
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
        self.partial.clear();
        self.partial.extend_from_slice(&bytes[at..]);
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
    if payload > FrameReader::MAX_FRAME {
        // Far longer than anything the bridge sends (~200 bytes a frame).
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
        let mut scratch = vec![0; SCRATCH_BYTES];
        let mut seen = Vec::new();
        let mut result = Ok(());
        for piece in stream.chunks(chunk) {
            let kept = reader.restore(&mut scratch);
            scratch[kept..kept + piece.len()].copy_from_slice(piece);
            result = reader.scan(&scratch[..kept + piece.len()], |frame| {
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
