//! The Redis broker's subscriber connection: RESP2, read by a task of ours
//! straight into a bounded [queue](super::queue).
//!
//! redis-rs's RESP2 pub/sub connection queues messages in an unbounded
//! channel, where a listener that falls behind grows memory without limit;
//! its RESP3 connection can hand pushes to a bounded queue, but builds a tree
//! of values for each and cost the bridge 10–15 % of its burst ingest. A
//! subscriber needs little of the protocol: AUTH's answer, and arrays of at
//! most four bulk strings or integers (confirmations, messages, PING's
//! answer). This module reads just that, and copies each message out of the
//! read buffer once.

use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use redis::{ConnectionAddr, ConnectionInfo, ErrorKind, RedisError, RedisResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tokio_util::task::AbortOnDropHandle;

use super::queue::{self, QueueSender, Step, SubscriptionBuffer, TopicIndex};
use super::tls::Tls;
use super::{HealthCheck, Inbound, Subscription, Topic, until_unanswered};

/// How long connecting and subscribing may take.
pub(super) struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

/// What the subscription needs besides its topics.
pub(super) struct Subscriber<'a> {
    pub info: &'a ConnectionInfo,
    pub timeouts: Timeouts,
    pub buffer: SubscriptionBuffer,
    pub health_check: HealthCheck,
    pub overflows: Arc<AtomicU64>,
    /// TLS, for a `rediss://` URL.
    pub tls: Option<&'a Tls>,
}

type Reading = Box<dyn AsyncRead + Send + Unpin>;
type Writing = Box<dyn AsyncWrite + Send + Unpin>;

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 << 10;

/// The longest line (a simple string, an error, a length) we wait to end.
const MAX_LINE: usize = 64 << 10;

/// A read buffer grown past this by a large message is given back once empty.
const KEEP_CAPACITY: usize = 4 * READ_CHUNK;

/// The most of a text from the server that goes into an error.
const MAX_QUOTED: usize = 200;

/// The subscriber's name in `CLIENT LIST`.
const CLIENT_NAME: &str = "quotebridge-subscriber";

impl Subscriber<'_> {
    /// Connects, authenticates, subscribes to every topic and returns once
    /// the server confirmed each. The messages then arrive on the stream,
    /// which ends when the connection does, when PING goes unanswered, or
    /// when the listener fell the buffer behind. Dropping it closes the
    /// connection.
    pub(super) async fn subscribe(self, topics: &[Topic]) -> RedisResult<Subscription> {
        let (reading, writing) =
            tokio::time::timeout(self.timeouts.connect, connect(self.info.addr(), self.tls))
                .await
                .map_err(|_| timed_out("connecting"))??;
        let (sender, queue) = queue::bounded(self.buffer);
        let mut connection = Connection {
            reading,
            writing,
            buffer: BytesMut::with_capacity(READ_CHUNK),
            index: TopicIndex::new(topics),
            sender,
            pongs: Arc::new(Notify::new()),
        };
        let handshake = Handshake::new(self.info, topics);
        let subscribed = async {
            connection.writing.write_all(&handshake.commands).await?;
            connection.await_answers(&handshake).await
        };
        tokio::time::timeout(self.timeouts.response, subscribed)
            .await
            .map_err(|_| timed_out("subscribing"))??;

        let pongs = connection.pongs.clone();
        let (pings, wanted) = mpsc::channel(1);
        // The task owns the connection: when it stops (overflow, error) the
        // connection closes at once, and Redis frees what it held for us.
        let task = AbortOnDropHandle::new(tokio::spawn(connection.run(wanted)));
        let health_check = self.health_check;
        // Ends the stream, and with the task the connection, once PING goes
        // unanswered: a connection that died silently (half-open) sends no
        // error. Dropping the stream drops this, and so the connection too.
        let dead = async move {
            let _connection = task;
            until_unanswered(health_check, "redis subscriber connection", move || {
                ping(pings.clone(), pongs.clone())
            })
            .await;
        };
        let messages = queue.into_messages("redis subscription", self.overflows, Step::Message);
        Ok(messages.take_until(Box::pin(dead)).boxed())
    }
}

async fn connect(addr: &ConnectionAddr, tls: Option<&Tls>) -> RedisResult<(Reading, Writing)> {
    match addr {
        ConnectionAddr::Tcp(host, port) => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            let (reading, writing) = stream.into_split();
            Ok((Box::new(reading), Box::new(writing)))
        }
        ConnectionAddr::TcpTls { host, port, .. } => {
            let Some(tls) = tls else {
                return Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "a rediss:// URL needs the broker's TLS settings",
                )));
            };
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            let stream = tls.connect(host, stream).await.map_err(|err| {
                RedisError::from((
                    ErrorKind::Io,
                    "TLS handshake with Redis failed",
                    err.to_string(),
                ))
            })?;
            let (reading, writing) = tokio::io::split(stream);
            Ok((Box::new(reading), Box::new(writing)))
        }
        #[cfg(unix)]
        ConnectionAddr::Unix(path) => {
            let (reading, writing) = tokio::net::UnixStream::connect(path).await?.into_split();
            Ok((Box::new(reading), Box::new(writing)))
        }
        _ => Err(RedisError::from((
            ErrorKind::InvalidClientConfig,
            "the subscriber connects over TCP or a Unix socket only",
        ))),
    }
}

/// What is sent on connecting, and what answers to expect.
struct Handshake {
    commands: Vec<u8>,
    /// AUTH was sent (the URL has a password): its answer comes first.
    auth: bool,
    /// Confirmations to wait for: one per channel and pattern.
    confirmations: usize,
}

impl Handshake {
    /// AUTH when the URL has a password, CLIENT SETNAME, then one SUBSCRIBE
    /// for the channels and one PSUBSCRIBE for the patterns, sent together.
    /// (Sharded topics need a cluster; the broker refuses them before.)
    fn new(info: &ConnectionInfo, topics: &[Topic]) -> Self {
        let settings = info.redis_settings();
        let mut commands = Vec::new();
        let auth = settings.password().is_some();
        if let Some(password) = settings.password() {
            match settings.username() {
                Some(user) => command(&mut commands, "AUTH", [user, password]),
                None => command(&mut commands, "AUTH", [password]),
            }
        }
        command(&mut commands, "CLIENT", ["SETNAME", CLIENT_NAME]);
        let channels = topics.iter().filter_map(|topic| match topic {
            Topic::Channel(name) => Some(name.as_str()),
            _ => None,
        });
        let patterns = topics.iter().filter_map(|topic| match topic {
            Topic::Pattern(pattern) => Some(pattern.as_str()),
            _ => None,
        });
        let confirmations = channels.clone().count() + patterns.clone().count();
        if channels.clone().next().is_some() {
            command(&mut commands, "SUBSCRIBE", channels);
        }
        if patterns.clone().next().is_some() {
            command(&mut commands, "PSUBSCRIBE", patterns);
        }
        Self {
            commands,
            auth,
            confirmations,
        }
    }
}

/// Appends `name args…` to `out` as a RESP array of bulk strings.
fn command<'a, I>(out: &mut Vec<u8>, name: &'a str, args: I)
where
    I: IntoIterator<Item = &'a str>,
    I::IntoIter: Clone,
{
    let args = args.into_iter();
    out.push(b'*');
    out.extend_from_slice(
        itoa::Buffer::new()
            .format(1 + args.clone().count())
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    for arg in std::iter::once(name).chain(args) {
        out.push(b'$');
        out.extend_from_slice(itoa::Buffer::new().format(arg.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Has the connection's task send PING and waits for the answer, which the
/// task announces through `pongs`. A PING left unanswered ends the
/// subscription, so no late answer can stand in for a later PING's.
async fn ping(pings: mpsc::Sender<()>, pongs: Arc<Notify>) -> RedisResult<()> {
    let answered = pongs.notified();
    tokio::pin!(answered);
    // Waiting before the PING goes, so a quick answer is not missed.
    answered.as_mut().enable();
    if pings.send(()).await.is_err() {
        return Err(closed());
    }
    answered.await;
    Ok(())
}

fn closed() -> RedisError {
    RedisError::from(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "redis closed the subscriber connection",
    ))
}

fn timed_out(doing: &'static str) -> RedisError {
    RedisError::from(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("redis did not answer in time while {doing}"),
    ))
}

fn protocol_error(what: String) -> RedisError {
    RedisError::from((ErrorKind::Parse, "unexpected reply from redis", what))
}

/// An overflow while subscribing: the listener has not started yet, so
/// nothing counts it; it fails the subscription instead.
fn while_subscribing(stop: Stop) -> RedisError {
    match stop {
        Stop::Failed(err) => err,
        Stop::Overflowed => RedisError::from((
            ErrorKind::Client,
            "messages overflowed redis.subscription_buffer while subscribing",
        )),
    }
}

/// The subscribed connection and what it feeds.
struct Connection {
    reading: Reading,
    writing: Writing,
    /// Bytes read and not yet handled; a frame is handled in place.
    buffer: BytesMut,
    index: TopicIndex,
    sender: QueueSender<Inbound>,
    pongs: Arc<Notify>,
}

/// Why reading stopped.
enum Stop {
    /// The queue overflowed, or a message larger than all of it arrived.
    Overflowed,
    /// The connection ended or failed.
    Failed(RedisError),
}

impl From<RedisError> for Stop {
    fn from(err: RedisError) -> Self {
        Stop::Failed(err)
    }
}

impl Connection {
    /// Reads the answers `handshake` asks for; messages that arrive
    /// between the confirmations are queued.
    async fn await_answers(&mut self, handshake: &Handshake) -> RedisResult<()> {
        if handshake.auth {
            let frame = self.frame().await.map_err(while_subscribing)?;
            let answer = match frame.kind {
                Kind::Simple(_) => Ok(()),
                Kind::Error(message) => Err(RedisError::from((
                    ErrorKind::AuthenticationFailed,
                    "redis refused AUTH",
                    message.text(&self.buffer),
                ))),
                _ => Err(protocol_error(format!(
                    "{} in answer to AUTH",
                    frame.text(&self.buffer)
                ))),
            };
            self.buffer.advance(frame.len);
            answer?;
        }
        // CLIENT SETNAME: only for operators' eyes, so a refusal (an ACL
        // user without +client) does not matter.
        let named = self.frame().await.map_err(while_subscribing)?;
        self.buffer.advance(named.len);
        let mut confirmed = 0;
        while confirmed < handshake.confirmations {
            let frame = self.frame().await.map_err(while_subscribing)?;
            if frame.is(b"subscribe", &self.buffer) || frame.is(b"psubscribe", &self.buffer) {
                confirmed += 1;
            }
            if let Kind::Error(message) = frame.kind {
                return Err(RedisError::from((
                    ErrorKind::Client,
                    "redis refused to subscribe",
                    message.text(&self.buffer),
                )));
            }
            self.handle(frame).map_err(while_subscribing)?;
        }
        Ok(())
    }

    /// Queues messages until the connection ends or the queue overflows;
    /// sends PING whenever `pings` asks.
    async fn run(mut self, mut pings: mpsc::Receiver<()>) {
        match self.serve(&mut pings).await {
            // Redis restarting: the listener reports the lost subscription.
            Err(Stop::Failed(err)) if err.kind() == ErrorKind::Io => {
                tracing::debug!(cause = ?err, "redis subscriber connection ended");
            }
            Err(Stop::Failed(err)) => {
                tracing::warn!(cause = ?err, "redis subscriber connection failed");
            }
            // Counted and logged by the queue's receiver.
            Err(Stop::Overflowed) | Ok(()) => {}
        }
    }

    async fn serve(&mut self, pings: &mut mpsc::Receiver<()>) -> Result<(), Stop> {
        loop {
            // Every whole frame read so far, without waiting in between.
            while let Some(frame) = self.parse()? {
                self.handle(frame)?;
            }
            tokio::select! {
                read = self.read_more() => read?,
                Some(()) = pings.recv() => {
                    self.writing
                        .write_all(b"*1\r\n$4\r\nPING\r\n")
                        .await
                        .map_err(RedisError::from)?;
                }
            }
        }
    }

    /// Acts on the frame at the front of the buffer, then consumes it.
    fn handle(&mut self, frame: Frame) -> Result<(), Stop> {
        let acted = self.act(&frame);
        self.buffer.advance(frame.len);
        if self.buffer.is_empty() && self.buffer.capacity() > KEEP_CAPACITY {
            self.buffer = BytesMut::with_capacity(READ_CHUNK);
        }
        acted
    }

    fn act(&self, frame: &Frame) -> Result<(), Stop> {
        let buffer = &self.buffer[..];
        let (topic, channel, payload) = if frame.is(b"message", buffer) {
            let (Some(channel), Some(payload)) = (frame.bulk(1, buffer), frame.bulk(2, buffer))
            else {
                return Err(Stop::Failed(protocol_error(
                    "a message without a payload".into(),
                )));
            };
            (self.index.channel(channel), channel, payload)
        } else if frame.is(b"pmessage", buffer) {
            let (Some(pattern), Some(channel), Some(payload)) = (
                frame.bulk(1, buffer),
                frame.bulk(2, buffer),
                frame.bulk(3, buffer),
            ) else {
                return Err(Stop::Failed(protocol_error(
                    "a pmessage without a payload".into(),
                )));
            };
            (self.index.pattern(pattern), channel, payload)
        } else if frame.is(b"pong", buffer) {
            self.pongs.notify_one();
            return Ok(());
        } else if let Kind::Error(message) = frame.kind {
            return Err(Stop::Failed(RedisError::from((
                ErrorKind::Client,
                "redis sent the subscriber an error",
                message.text(buffer),
            ))));
        } else {
            // Confirmations; nothing else is sent to a subscriber.
            return Ok(());
        };
        // A channel that is not UTF-8 cannot be one of ours (topic names
        // are strings), and matched only a pattern: nothing routes it.
        let (Some(topic), Ok(channel)) = (topic, std::str::from_utf8(channel)) else {
            return Ok(());
        };
        let message = Inbound {
            topic,
            channel: channel.to_owned(),
            // Copied out, so a payload a slow socket keeps holds its own
            // bytes and not a whole read chunk.
            payload: Bytes::copy_from_slice(payload),
        };
        if self.sender.offer(message) {
            Ok(())
        } else {
            Err(Stop::Overflowed)
        }
    }

    /// The next whole frame, left at the front of the buffer.
    async fn frame(&mut self) -> Result<Frame, Stop> {
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(frame);
            }
            self.read_more().await?;
        }
    }

    /// The frame at the front of the buffer, if it has all arrived.
    fn parse(&mut self) -> Result<Option<Frame>, Stop> {
        match parse(&self.buffer, self.sender.capacity_bytes()) {
            Ok(frame) => Ok(frame),
            Err(Malformed::TooLarge(bytes)) => {
                tracing::warn!(
                    bytes,
                    "a message larger than redis.subscription_buffer_bytes arrived"
                );
                self.sender.overflow();
                Err(Stop::Overflowed)
            }
            Err(Malformed::Bad(what)) => Err(Stop::Failed(protocol_error(what))),
        }
    }

    /// Reads what the server sent next into the buffer. Cancel-safe.
    async fn read_more(&mut self) -> Result<(), Stop> {
        self.buffer.reserve(READ_CHUNK);
        let read = self
            .reading
            .read_buf(&mut self.buffer)
            .await
            .map_err(RedisError::from)?;
        if read == 0 {
            return Err(Stop::Failed(closed()));
        }
        Ok(())
    }
}

/// Where a part of a frame lies in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    fn of(self, buffer: &[u8]) -> &[u8] {
        &buffer[self.start..self.end]
    }

    /// The bytes as text for an error message, cut at [`MAX_QUOTED`].
    fn text(self, buffer: &[u8]) -> String {
        let bytes = self.of(buffer);
        let quoted = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_QUOTED)]);
        if bytes.len() > MAX_QUOTED {
            format!("{quoted}… ({} bytes)", bytes.len())
        } else {
            quoted.into_owned()
        }
    }
}

/// One whole frame at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame {
    /// Its length in bytes.
    len: usize,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `+OK`, without the `+`.
    Simple(Span),
    /// `-ERR …`, without the `-`.
    Error(Span),
    Integer,
    /// The first `count` of `items`.
    Array {
        items: [Item; 4],
        count: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Bulk(Span),
    Integer,
    Nil,
}

impl Frame {
    /// The bulk string at `at` of an array.
    fn bulk<'a>(&self, at: usize, buffer: &'a [u8]) -> Option<&'a [u8]> {
        match self.kind {
            Kind::Array { items, count } if at < count => match items[at] {
                Item::Bulk(span) => Some(span.of(buffer)),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether this is an array whose first item is `name`.
    fn is(&self, name: &[u8], buffer: &[u8]) -> bool {
        self.bulk(0, buffer) == Some(name)
    }

    /// The whole frame, for error messages.
    fn text(&self, buffer: &[u8]) -> String {
        Span {
            start: 0,
            end: self.len,
        }
        .text(buffer)
    }
}

/// Why the bytes are not a frame a subscriber can take.
#[derive(Debug, PartialEq, Eq)]
enum Malformed {
    /// A bulk string of this many bytes, more than the whole queue holds.
    TooLarge(usize),
    Bad(String),
}

/// The frame at the front of `buffer`, if it has all arrived. A frame whose
/// bulk strings together are longer than `max_bulk` is refused before it is
/// read, so the buffer never holds more than one such frame.
fn parse(buffer: &[u8], max_bulk: usize) -> Result<Option<Frame>, Malformed> {
    let Some((head, mut at)) = line(buffer, 0)? else {
        return Ok(None);
    };
    let body = Span {
        start: head.start + 1,
        end: head.end,
    };
    let kind = match buffer[head.start] {
        b'+' => Kind::Simple(body),
        b'-' => Kind::Error(body),
        b':' => Kind::Integer,
        b'*' => {
            let count = number(body.of(buffer))?;
            let count = usize::try_from(count)
                .ok()
                .filter(|count| (1..=4).contains(count))
                .ok_or_else(|| Malformed::Bad(format!("an array of {count} items")))?;
            let mut items = [Item::Nil; 4];
            let mut bulk_bytes = 0;
            for item in items.iter_mut().take(count) {
                let parsed =
                    parse_item(buffer, at, max_bulk - bulk_bytes).map_err(|err| match err {
                        Malformed::TooLarge(len) => Malformed::TooLarge(bulk_bytes + len),
                        err => err,
                    })?;
                let Some((parsed, next)) = parsed else {
                    return Ok(None);
                };
                if let Item::Bulk(span) = parsed {
                    bulk_bytes += span.end - span.start;
                }
                *item = parsed;
                at = next;
            }
            Kind::Array { items, count }
        }
        other => {
            return Err(Malformed::Bad(format!(
                "a frame starting with {:?}",
                char::from(other)
            )));
        }
    };
    Ok(Some(Frame { len: at, kind }))
}

/// The array item at `at`, and where the next begins; a bulk string
/// longer than `max_bulk` is refused.
fn parse_item(
    buffer: &[u8],
    at: usize,
    max_bulk: usize,
) -> Result<Option<(Item, usize)>, Malformed> {
    let Some((head, next)) = line(buffer, at)? else {
        return Ok(None);
    };
    let body = &buffer[head.start + 1..head.end];
    match buffer[head.start] {
        b':' => Ok(Some((Item::Integer, next))),
        b'$' => {
            let len = number(body)?;
            if len == -1 {
                return Ok(Some((Item::Nil, next)));
            }
            let len = usize::try_from(len)
                .map_err(|_| Malformed::Bad(format!("a bulk string of {len} bytes")))?;
            if len > max_bulk {
                return Err(Malformed::TooLarge(len));
            }
            let end = next.saturating_add(len);
            match buffer.get(end..end.saturating_add(2)) {
                None => Ok(None),
                Some(b"\r\n") => Ok(Some((Item::Bulk(Span { start: next, end }), end + 2))),
                Some(_) => Err(Malformed::Bad("a bulk string not ended by CRLF".into())),
            }
        }
        other => Err(Malformed::Bad(format!(
            "an array item starting with {:?}",
            char::from(other)
        ))),
    }
}

/// The line starting at `at` (type byte included, CRLF not), and where the
/// next begins; `None` while it has not all arrived.
fn line(buffer: &[u8], at: usize) -> Result<Option<(Span, usize)>, Malformed> {
    let rest = &buffer[at..];
    match rest.iter().position(|&byte| byte == b'\n') {
        Some(end) if end >= 2 && rest[end - 1] == b'\r' => Ok(Some((
            Span {
                start: at,
                end: at + end - 1,
            },
            at + end + 1,
        ))),
        Some(_) => Err(Malformed::Bad(
            "an empty line, or one not ended by CRLF".into(),
        )),
        None if rest.len() > MAX_LINE => Err(Malformed::Bad(format!(
            "a line longer than {MAX_LINE} bytes"
        ))),
        None => Ok(None),
    }
}

fn number(digits: &[u8]) -> Result<i64, Malformed> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|digits| digits.parse().ok())
        .ok_or_else(|| {
            Malformed::Bad(format!(
                "{:?} where a number belongs",
                String::from_utf8_lossy(digits)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &[u8]) -> Result<Option<Frame>, Malformed> {
        parse(bytes, 1 << 20)
    }

    #[test]
    fn a_message_is_parsed_in_place() {
        let bytes = b"*3\r\n$7\r\nmessage\r\n$6\r\nquotes\r\n$5\r\nhello\r\n+OK\r\n";
        let frame = parsed(bytes).expect("valid").expect("whole");
        assert_eq!(frame.len, bytes.len() - 5);
        assert!(frame.is(b"message", bytes));
        assert_eq!(frame.bulk(1, bytes), Some(&b"quotes"[..]));
        assert_eq!(frame.bulk(2, bytes), Some(&b"hello"[..]));
        assert_eq!(frame.bulk(3, bytes), None);
    }

    #[test]
    fn a_payload_may_hold_crlf_and_be_empty() {
        let bytes = b"*4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$1\r\na\r\n$4\r\n\r\n\r\n\r\n";
        let frame = parsed(bytes).expect("valid").expect("whole");
        assert_eq!(frame.len, bytes.len());
        assert_eq!(frame.bulk(3, bytes), Some(&b"\r\n\r\n"[..]));
        let empty = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n";
        let frame = parsed(empty).expect("valid").expect("whole");
        assert!(frame.is(b"pong", empty));
        assert_eq!(frame.bulk(1, empty), Some(&b""[..]));
    }

    #[test]
    fn every_prefix_of_a_frame_waits_for_more() {
        let bytes = b"*3\r\n$9\r\nsubscribe\r\n$6\r\nquotes\r\n:1\r\n";
        for end in 0..bytes.len() {
            assert_eq!(parsed(&bytes[..end]), Ok(None), "prefix of {end} bytes");
        }
        let frame = parsed(bytes).expect("valid").expect("whole");
        assert!(frame.is(b"subscribe", bytes));
        assert_eq!(frame.len, bytes.len());
    }

    #[test]
    fn simple_strings_errors_and_integers() {
        let ok = parsed(b"+OK\r\n").expect("valid").expect("whole");
        assert!(matches!(ok.kind, Kind::Simple(span) if span.of(b"+OK\r\n") == b"OK"));
        let error = b"-WRONGPASS invalid username-password pair\r\n";
        let frame = parsed(error).expect("valid").expect("whole");
        let Kind::Error(message) = frame.kind else {
            panic!("{frame:?}")
        };
        assert_eq!(
            message.text(error),
            "WRONGPASS invalid username-password pair"
        );
        assert_eq!(
            parsed(b":12\r\n").expect("valid").map(|f| f.kind),
            Some(Kind::Integer)
        );
    }

    #[test]
    fn a_frame_larger_than_the_queue_is_refused_before_it_is_read() {
        let head = b"*3\r\n$7\r\nmessage\r\n$6\r\nquotes\r\n$2000000\r\n";
        assert_eq!(parse(head, 1_000_000), Err(Malformed::TooLarge(2_000_013)));
        // Each bulk string fits; together they do not.
        let mut frame = b"*4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$600000\r\n".to_vec();
        frame.extend(std::iter::repeat_n(b'c', 600_000));
        frame.extend_from_slice(b"\r\n$600000\r\n");
        assert!(matches!(
            parse(&frame, 1_000_000),
            Err(Malformed::TooLarge(1_200_009))
        ));
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for bytes in [
            &b"?\r\n"[..],
            b"\r\n",
            b"*0\r\n",
            b"*5\r\n",
            b"*-1\r\n",
            b"*x\r\n",
            b"*1\r\n+OK\r\n",
            b"*1\r\n$-2\r\n",
            b"*1\r\n$2\r\nabcd\r\n",
            b"*1\r\n$1\nab\r\n",
            b"+OK\n",
        ] {
            assert!(
                matches!(parsed(bytes), Err(Malformed::Bad(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(bytes),
                parsed(bytes)
            );
        }
        let endless = vec![b'+'; MAX_LINE + 2];
        assert!(matches!(parsed(&endless), Err(Malformed::Bad(_))));
    }

    /// `message` frames for each `(channel, payload)`, back to back.
    fn messages(messages: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (channel, payload) in messages {
            for (at, part) in [&b"message"[..], channel, payload].into_iter().enumerate() {
                if at == 0 {
                    out.extend_from_slice(b"*3\r\n");
                }
                out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
                out.extend_from_slice(part);
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_fail_without_panicking(bytes: Vec<u8>) {
            let _ = parse(&bytes, 1 << 20);
        }

        /// Valid frames with bytes overwritten: read until the first error.
        #[test]
        fn damaged_frames_parse_or_fail_without_panicking(
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..50),
            damage in proptest::collection::vec((0usize..200, proptest::num::u8::ANY), 1..4),
        ) {
            let mut bytes = messages(&[(b"quotes".to_vec(), payload.clone()), (b"q".to_vec(), payload)]);
            for (at, byte) in damage {
                let at = at % bytes.len();
                bytes[at] = byte;
            }
            let mut rest = &bytes[..];
            while let Ok(Some(frame)) = parse(rest, 1 << 20) {
                proptest::prop_assert!(frame.len > 0 && frame.len <= rest.len());
                rest = &rest[frame.len..];
            }
        }

        /// However the bytes arrive, the frames read back are the ones sent.
        #[test]
        fn frames_arriving_in_any_pieces_read_back_whole(
            sent in proptest::collection::vec(
                (proptest::collection::vec(proptest::num::u8::ANY, 0..20),
                 proptest::collection::vec(proptest::num::u8::ANY, 0..200)),
                1..8,
            ),
            cuts in proptest::collection::vec(0usize..2000, 0..6),
        ) {
            let bytes = messages(&sent);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % bytes.len()).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut arrived = Vec::new();
            let mut received = Vec::new();
            let mut from = 0;
            for cut in cuts {
                arrived.extend_from_slice(&bytes[from..cut]);
                from = cut;
                while let Some(frame) = parse(&arrived, 1 << 20).expect("valid") {
                    let channel = frame.bulk(1, &arrived).expect("channel").to_vec();
                    let payload = frame.bulk(2, &arrived).expect("payload").to_vec();
                    received.push((channel, payload));
                    arrived.drain(..frame.len);
                }
            }
            proptest::prop_assert!(arrived.is_empty());
            proptest::prop_assert_eq!(received, sent);
        }
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        command(&mut out, "SUBSCRIBE", ["quotes", "sma"]);
        assert_eq!(
            out,
            b"*3\r\n$9\r\nSUBSCRIBE\r\n$6\r\nquotes\r\n$3\r\nsma\r\n"
        );
    }
}
