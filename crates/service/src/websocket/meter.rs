//! Counts a client's WebSocket frames as their bytes arrive.
//!
//! The WebSocket engine hands the session whole messages: a message sent as
//! 200,000 empty continuation frames, each taking the engine a turn, arrives
//! as one. So frames are counted here, under the engine, by reading each
//! frame's header as the bytes pass through: data, continuation and control
//! frames alike take a token of `websocket.client_messages_per_second`.
//! Past it the read fails with [`FrameRateExceeded`], the session closes
//! with 1008, and [`FrameMeter::drain_until_close`] reads what the client
//! still sends up to its Close reply, so the connection ends with a FIN the
//! client can read up to, not a reset.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::rate::TokenBucket;

/// The read error a client past its frame rate gets.
#[derive(Debug, thiserror::Error)]
#[error("client sent more frames a second than websocket.client_messages_per_second")]
pub struct FrameRateExceeded;

impl FrameRateExceeded {
    /// Whether `err` is this one.
    pub fn is(err: &io::Error) -> bool {
        err.get_ref().is_some_and(|inner| inner.is::<Self>())
    }
}

/// The opcode of a Close frame.
const CLOSE: u8 = 0x8;

/// A connection whose incoming frames are counted against a rate.
#[derive(Debug)]
pub struct FrameMeter<S> {
    inner: S,
    headers: HeaderReader,
    rate: TokenBucket,
    /// Frames counted so far.
    frames: u64,
    /// The client's Close frame has passed, whole.
    close_seen: bool,
}

impl<S> FrameMeter<S> {
    /// Meters `inner`'s incoming frames at `per_second` frames a second,
    /// with a burst of as many.
    pub fn new(inner: S, per_second: u32) -> Self {
        Self {
            inner,
            headers: HeaderReader::default(),
            rate: TokenBucket::new(per_second, Instant::now()),
            frames: 0,
            close_seen: false,
        }
    }

    /// Frames the client has sent so far, whole or begun.
    #[cfg(test)]
    fn frames(&self) -> u64 {
        self.frames
    }

    /// Reads `bytes`, which arrived; false once the client is past its rate.
    fn meter(&mut self, bytes: &[u8]) -> bool {
        let mut within = true;
        let now = Instant::now();
        let Self {
            headers,
            rate,
            frames,
            close_seen,
            ..
        } = self;
        headers.read(bytes, |event| match event {
            Event::Header => {
                *frames += 1;
                within &= rate.take(now);
            }
            Event::CloseEnded => *close_seen = true,
        });
        within
    }
}

impl<S: AsyncRead + Unpin> FrameMeter<S> {
    /// Reads and drops what the client sends until its Close frame has
    /// passed (it may have already), the connection ends, or `within`.
    pub async fn drain_until_close(&mut self, within: Duration) {
        let drain = async {
            let mut scratch = vec![0u8; 1024];
            while !self.close_seen {
                match self.inner.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(read) => {
                        self.meter(&scratch[..read]);
                    }
                }
            }
        };
        let _ = tokio::time::timeout(within, drain).await;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameMeter<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            let within = self.meter(&buf.filled()[before..]);
            if !within {
                return Poll::Ready(Err(io::Error::other(FrameRateExceeded)));
            }
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameMeter<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What reading a client's bytes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// A frame's header, whole: a frame has begun.
    Header,
    /// A Close frame's last byte.
    CloseEnded,
}

/// Follows the frame boundaries of a client's byte stream (RFC 6455 §5.2):
/// a header of 2 to 14 bytes, then as many payload bytes as it says.
#[derive(Debug, Default)]
struct HeaderReader {
    /// The header read so far (its length is known from its second byte).
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload_left: u64,
    /// The current frame is a Close frame.
    closing: bool,
}

impl HeaderReader {
    /// Reads `bytes`, the next bytes of the stream, telling `on` what they held.
    fn read(&mut self, mut bytes: &[u8], mut on: impl FnMut(Event)) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                bytes = &bytes[skip..];
                self.payload_left -= skip as u64;
                if self.payload_left == 0 && std::mem::take(&mut self.closing) {
                    on(Event::CloseEnded);
                }
                continue;
            }
            let need = self.header_len();
            let take = (need - self.have).min(bytes.len());
            self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            bytes = &bytes[take..];
            // The length is known once two bytes are in; the header is whole
            // once that many are.
            if self.have < 2 || self.have < self.header_len() {
                continue;
            }
            on(Event::Header);
            self.closing = self.header[0] & 0x0f == CLOSE;
            self.payload_left = self.payload_len();
            self.have = 0;
            if self.payload_left == 0 && std::mem::take(&mut self.closing) {
                on(Event::CloseEnded);
            }
        }
    }

    /// The header's length: 2 until its second byte is in.
    fn header_len(&self) -> usize {
        if self.have < 2 {
            return 2;
        }
        let masked = self.header[1] & 0x80 != 0;
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + extended + if masked { 4 } else { 0 }
    }

    fn payload_len(&self) -> u64 {
        match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut len = [0u8; 8];
                len.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(len)
            }
            short => u64::from(short),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame of `opcode` carrying `payload`.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            len @ 0..=125 => out.push(0x80 | len as u8),
            len @ 126..=0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        let mask = [1, 2, 3, 4];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        out
    }

    fn headers_in(stream: &[u8], piece: usize) -> (usize, usize) {
        let mut reader = HeaderReader::default();
        let mut events = Vec::new();
        for chunk in stream.chunks(piece) {
            reader.read(chunk, |event| events.push(event));
        }
        let count = |kind| events.iter().filter(|e| **e == kind).count();
        (count(Event::Header), count(Event::CloseEnded))
    }

    #[test]
    fn every_frame_is_counted_however_the_bytes_arrive() {
        let mut stream = Vec::new();
        stream.extend(frame(false, 0x1, b"{\"op\":"));
        for _ in 0..1000 {
            stream.extend(frame(false, 0x0, b""));
        }
        stream.extend(frame(true, 0x9, b"ping"));
        stream.extend(frame(true, 0x0, b"\"subscribe\"}"));
        stream.extend(frame(true, 0x2, &[7u8; 300]));
        stream.extend(frame(true, 0x2, &vec![7u8; 70_000]));
        stream.extend(frame(true, 0x8, &[0x03, 0xe8]));
        for piece in [1, 2, 3, 7, 13, 4096, stream.len()] {
            assert_eq!(
                headers_in(&stream, piece),
                (1006, 1),
                "in pieces of {piece}"
            );
        }
    }

    #[test]
    fn an_empty_close_frame_is_seen_at_its_header() {
        assert_eq!(headers_in(&frame(true, 0x8, b""), 1), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_rate_a_read_fails_and_the_close_is_drained() {
        let mut stream = Vec::new();
        for _ in 0..12 {
            stream.extend(frame(true, 0x9, b""));
        }
        stream.extend(frame(true, 0x8, b""));
        let (mut client, server) = tokio::io::duplex(1 << 16);
        tokio::io::AsyncWriteExt::write_all(&mut client, &stream)
            .await
            .expect("written");
        let mut meter = FrameMeter::new(server, 10);
        let mut buf = [0u8; 12];
        let mut failed = None;
        for _ in 0..20 {
            if let Err(err) = meter.read(&mut buf).await {
                failed = Some(err);
                break;
            }
        }
        let err = failed.expect("the eleventh frame is past the burst of 10");
        assert!(FrameRateExceeded::is(&err), "{err}");
        meter.drain_until_close(Duration::from_secs(1)).await;
        assert!(meter.close_seen);
        assert_eq!(meter.frames(), 13);
    }
}
