//! One WebSocket's session: the task that owns the socket.
//!
//! It races three things — shutdown, frames the hub queued for it, and
//! frames the client sent — like the seed's `handle_client_connection`
//! raced a socket's reads against a producer.

use std::io::IoSlice;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::AsyncWrite;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use std::collections::HashSet;
use std::sync::Arc;

use crate::auth::{Authenticator, Grant};
use crate::config::WebSocketSettings;
use crate::config::series::Catalog;
use crate::frame::BarState;
use crate::frame::{Burst, Frame, Outgoing, SharedResult};
use crate::hub::Membership;
use crate::names::{self, StreamName};
use crate::outbox::Outbox;
use crate::protocol::{ClientOp, LastSeen, ServerFrame, Unrecovered};
use crate::websocket::{FrameRateExceeded, Socket};

/// Most queued frames written before one flush; bounds the time one busy
/// socket spends away from reading its client.
const MAX_BATCH: usize = 256;

/// What one socket may do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time between keepalive pings.
    pub ping_interval: Duration,
    /// How long one batch of writes may take. A client that stops reading
    /// fills its TCP window and would stall the session forever; past this
    /// it is dropped.
    pub write_timeout: Duration,
    /// How long a socket opened to resume is held for its resume request;
    /// then it goes live without one.
    pub resume_wait: Duration,
}

impl Limits {
    /// The limits `[websocket]` configures.
    #[must_use]
    pub fn from_settings(settings: &WebSocketSettings) -> Self {
        Self {
            ping_interval: Duration::from_millis(settings.ping_interval_ms),
            write_timeout: Duration::from_millis(settings.write_timeout_ms),
            resume_wait: Duration::from_millis(settings.resume_wait_ms),
        }
    }
}

/// How long a closing socket waits for the other side's Close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Pings sent without a pong since; at this many the peer is gone.
const MAX_UNANSWERED_PINGS: u32 = 2;

/// What a socket may see, until when, and how a fresh token is checked.
#[derive(Debug)]
pub struct Access {
    /// Its entitlements and their end.
    pub grant: Grant,
    /// Checks a token sent with `{"op":"refresh"}`, as at connection.
    pub authenticator: Arc<Authenticator>,
    /// The series a subscription may name, and the default ones.
    pub catalog: Arc<Catalog>,
}

/// The close code of a socket whose token expired: in the range RFC 6455
/// leaves to applications, so a client can tell it from any other close
/// and connect again with a fresh token.
pub const TOKEN_EXPIRED: u16 = 4001;

/// Why a session ended abnormally. Ordinary disconnects are not errors.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The socket failed.
    #[error("websocket: {0}")]
    Socket(#[from] tungstenite::Error),
    /// The client stopped reading and writes did not complete in time.
    #[error("write timed out after {0:?}; client is not reading")]
    WriteTimeout(Duration),
}

/// Runs one socket until the client leaves, the hub evicts it, a limit is
/// broken, or shutdown; in a span naming its client and socket.
///
/// This future is what every open socket keeps for its whole life, so its
/// size is memory per idle socket: it holds its arguments once (the
/// `instrument` attribute would capture them a second time, for the inner
/// future it wraps), and it is spawned as a task of its own, not awaited
/// inside the upgrade's future, which holds the socket and the request's
/// grant besides.
pub fn run(
    socket: Socket,
    client: Box<str>,
    membership: Membership,
    access: Access,
    outbox: Outbox,
    limits: Limits,
    shutdown: CancellationToken,
) -> impl Future<Output = Result<(), SessionError>> + Send {
    let span = tracing::info_span!("session", client = %client, socket = membership.id());
    serve(socket, client, membership, access, outbox, limits, shutdown).instrument(span)
}

async fn serve(
    mut socket: Socket,
    client: Box<str>,
    membership: Membership,
    mut access: Access,
    mut outbox: Outbox,
    limits: Limits,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let client = &*client;
    // Joined held (`?resume=1`): nothing is delivered until the first
    // request, or until `resume_wait` has passed.
    let mut held = membership.is_held();
    // Boxed, and only for a held socket: a timer kept in every session's
    // state would cost every idle socket its size.
    let mut hold_ends = held.then(|| Box::pin(tokio::time::sleep(limits.resume_wait)));
    let subscriptions = membership.subscriptions();
    let welcome = ServerFrame::Welcome {
        client,
        subscriptions: &subscriptions,
        series: access.catalog.served(),
        expires_at: access.grant.expires_at,
    };
    // Boxed, and only for a token that expires, like the hold's timer.
    let mut expiry = access
        .grant
        .remaining(std::time::SystemTime::now())
        .map(|left| Box::pin(tokio::time::sleep(left)));
    write(
        &mut socket,
        [Message::Text(welcome.encode().into())],
        limits.write_timeout,
    )
    .await?;
    tracing::debug!("socket opened");

    let mut keepalive =
        tokio::time::interval_at(Instant::now() + limits.ping_interval, limits.ping_interval);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut unanswered_pings = 0u32;
    // Grows to the largest batch seen, on first use: idle sockets pay nothing.
    let mut batch: Vec<Frame> = Vec::new();
    // The keys whose open candles this socket skips: its own, outside the hub.
    let mut closed_only = ClosedOnly::default();
    // Registered once: a `cancelled()` per turn of the loop would lock the
    // token's waiter list, which every socket shares, twice per batch.
    let shutting_down = shutdown.cancelled();
    tokio::pin!(shutting_down);
    loop {
        tokio::select! {
            () = &mut shutting_down => {
                close(&mut socket, CloseCode::Away, "going away").await;
                return Ok(());
            }
            () = async { if let Some(timer) = hold_ends.as_mut() { timer.await } }, if held => {
                tracing::debug!("no resume request in time; live without one");
                held = false;
                membership.go_live();
            }
            () = async { if let Some(timer) = expiry.as_mut() { timer.await } }, if expiry.is_some() => {
                tracing::info!("token expired; closing");
                membership.stats().token_expiry_closes.fetch_add(1, Relaxed);
                close(&mut socket, CloseCode::from(TOKEN_EXPIRED), "token expired").await;
                return Ok(());
            }
            _ = keepalive.tick() => {
                if unanswered_pings >= MAX_UNANSWERED_PINGS {
                    tracing::info!("no pong to the last two pings; closing");
                    membership.stats().keepalive_timeouts.fetch_add(1, Relaxed);
                    close(&mut socket, CloseCode::Away, "keepalive timeout").await;
                    return Ok(());
                }
                unanswered_pings += 1;
                write(&mut socket, [Message::Ping(Bytes::new())], limits.write_timeout).await?;
            }
            taken = outbox.recv_many(&mut batch, MAX_BATCH) => {
                if taken.frames == 0 {
                    // The hub closed our outbox: we fell behind.
                    close(&mut socket, CloseCode::Policy, "slow consumer").await;
                    return Ok(());
                }
                if !closed_only.is_empty() {
                    batch.retain(|frame| !closed_only.skips(frame));
                }
                if taken.conflated {
                    // The client is told before the latest values come.
                    membership.stats().conflations.fetch_add(1, Relaxed);
                    let notice = ServerFrame::Conflated { keys: batch.len() }.encode();
                    batch.insert(0, Frame::Direct(Message::Text(notice.into())));
                }
                // Everything already queued goes out with one flush (a
                // conflated batch, one key each, a batch at a time); the
                // batch buffer is reused, so a busy socket allocates nothing.
                while !batch.is_empty() {
                    let chunk = batch.len().min(MAX_BATCH);
                    write(&mut socket, batch.drain(..chunk).map(Frame::into_message), limits.write_timeout).await?;
                }
            }
            incoming = socket.next() => {
                let message = match incoming {
                    None => {
                        tracing::debug!("client went away");
                        return Ok(());
                    }
                    Some(Err(err)) => return end_on_read_error(&mut socket, err, &membership).await,
                    Some(Ok(Message::Close(_))) => {
                        // The engine has queued the reply Close (RFC 6455
                        // §5.5.1); flushing sends it before the TCP
                        // connection goes, so the client sees a clean close.
                        tracing::debug!("client closed the socket");
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.flush()).await;
                        return Ok(());
                    }
                    Some(Ok(message)) => message,
                };
                match message {
                    Message::Text(text) => {
                        let ends = access.grant.expires_at;
                        // Boxed: a request (a resume above all) awaits
                        // states far larger than an idle socket's, and
                        // every session's future would be sized for them.
                        // One allocation per request, which the client
                        // frame rate bounds.
                        let replies = Box::pin(async {
                            // A held socket's first request may be a resume:
                            // it waits for its turn (see `Hub::resume_turn`).
                            let turn = if held { Some(membership.resume_turn().await) } else { None };
                            let replies = answer(&membership, client, &mut access, &mut closed_only, &text, &mut held).await;
                            drop(turn);
                            replies
                        })
                        .await;
                        // A refresh moves the end (no other request does).
                        // `sleep` takes any length (an `Instant` sum would
                        // panic past the clock's range).
                        if access.grant.expires_at != ends {
                            expiry = access
                                .grant
                                .remaining(std::time::SystemTime::now())
                                .map(|left| Box::pin(tokio::time::sleep(left)));
                        }
                        // A resume's replay can be long: written a batch at
                        // a time, each within the write timeout, giving the
                        // thread to other sessions between batches (a write
                        // into a socket with room never yields by itself, and
                        // 4,096 frames would hold it for a millisecond or more).
                        let mut replies = replies.into_iter().map(Message::Text).peekable();
                        while replies.peek().is_some() {
                            write(&mut socket, replies.by_ref().take(MAX_BATCH), limits.write_timeout).await?;
                            if replies.peek().is_some() {
                                tokio::task::yield_now().await;
                            }
                        }
                    }
                    Message::Binary(_) => {
                        if std::mem::take(&mut held) {
                            membership.go_live();
                        }
                        let reply = ServerFrame::Error { message: "binary frames are not supported; send JSON text" }.encode();
                        write(&mut socket, [Message::Text(reply.into())], limits.write_timeout).await?;
                    }
                    Message::Pong(_) => unanswered_pings = 0,
                    // The WebSocket engine answers pings itself; reading
                    // never yields raw frames or (here) a Close.
                    Message::Ping(_) | Message::Close(_) | Message::Frame(_) => {}
                }
            }
        }
    }
}

/// Handles one text frame from the client; returns the frames to send back.
/// The first request of a `held` socket ends the hold: a resume resumes,
/// anything else makes it live as it is.
async fn answer(
    membership: &Membership,
    client: &str,
    access: &mut Access,
    closed_only: &mut ClosedOnly,
    text: &str,
    held: &mut bool,
) -> Vec<Utf8Bytes> {
    let error = |message: &str| vec![ServerFrame::Error { message }.encode().into()];
    let parsed = ClientOp::parse(text);
    let resuming = matches!(parsed, Ok(ClientOp::Resume(_)));
    if std::mem::take(held) && !resuming {
        membership.go_live();
    }
    let mut op = match parsed {
        Ok(op) => op,
        Err(message) => return error(&message),
    };
    // Each name counts once, and a list may name at most what a socket may
    // hold: the work a request does under the hub's lock stays bounded.
    // Symbols and series multiply, so a request is refused before it is
    // spelled out when the product is over the bound.
    if let ClientOp::Subscribe {
        symbols, series, ..
    }
    | ClientOp::Unsubscribe { symbols, series } = &mut op
    {
        symbols.sort_unstable();
        symbols.dedup();
        if let Some(series) = series {
            series.sort_unstable();
            series.dedup();
        }
        let across = series.as_ref().map_or(1, Vec::len).max(1);
        if symbols.len().saturating_mul(across) > membership.max_symbols() {
            return error(&format!(
                "too many symbols in one request: at most {}",
                membership.max_symbols()
            ));
        }
        match access.catalog.subscriptions(symbols, series.as_deref()) {
            Ok(entries) => *symbols = entries,
            Err(message) => return error(&message),
        }
        symbols.sort_unstable();
        symbols.dedup();
        if symbols.len() > membership.max_symbols() {
            return error(&format!(
                "too many symbols in one request: at most {}",
                membership.max_symbols()
            ));
        }
    }
    // A resume's keys are moved on, not copied: 5,000 of them took as
    // long to clone as to parse.
    let (symbols, subscribe) = match op {
        ClientOp::Subscribe {
            symbols,
            max_rate,
            closed_only,
            ..
        } => (symbols, Some((max_rate, closed_only))),
        ClientOp::Unsubscribe { symbols, .. } => (symbols, None),
        ClientOp::Resume(last_seen) => {
            return resume(membership, &access.grant, &access.catalog, last_seen).await;
        }
        ClientOp::Refresh { token } => return refresh(membership, client, access, &token),
    };
    let entitlement = subscribe.is_some().then_some(&access.grant);
    if let Err(message) = check_subscriptions(&symbols, entitlement) {
        return error(&message);
    }
    let outcome = match subscribe {
        Some((max_rate, only_closed)) => {
            let interval = match max_rate.map(rate_interval).transpose() {
                Ok(interval) => interval,
                Err(message) => return error(&message),
            };
            let outcome = match membership.subscribe(&symbols, interval) {
                Ok(outcome) => outcome,
                Err(err) => return error(&err.to_string()),
            };
            // Before the session writes the snapshots just queued: an open
            // candle's snapshot is skipped too.
            closed_only.set(&symbols, only_closed);
            // Entries a refresh ended stay until here: the set never holds
            // more than the socket may subscribe to.
            if closed_only.len() > membership.max_symbols() {
                closed_only.keep(&outcome.symbols);
            }
            outcome
        }
        None => {
            closed_only.set(&symbols, false);
            membership.unsubscribe(&symbols)
        }
    };
    // The snapshots wait in the outbox, which the session drains after
    // writing this reply.
    let reply = ServerFrame::Subscribed {
        symbols: &outcome.symbols,
    };
    vec![reply.encode().into()]
}

/// Answers a refresh: a fresh token for the socket's own client code,
/// checked as at connection. The socket then lasts until it expires and may
/// see what both tokens allow; subscriptions the new one does not allow
/// end (a `subscribed` frame with the set that is left follows the reply).
/// A token refused leaves the socket as it was, ending when the old one does.
fn refresh(
    membership: &Membership,
    client: &str,
    access: &mut Access,
    token: &str,
) -> Vec<Utf8Bytes> {
    let fresh = match access.authenticator.authenticate(client, Some(token)) {
        Ok(fresh) => fresh,
        Err(err) => {
            tracing::info!(reason = %err, "token refresh refused");
            let message =
                format!("refresh refused: {err}; the socket still ends when its token expires");
            return vec![ServerFrame::Error { message: &message }.encode().into()];
        }
    };
    access.grant = access.grant.renewed_by(fresh);
    membership.stats().token_refreshes.fetch_add(1, Relaxed);
    let grant = &access.grant;
    let mut replies = vec![
        ServerFrame::Refreshed {
            expires_at: grant.expires_at,
        }
        .encode()
        .into(),
    ];
    let subscribed = membership.subscriptions();
    let disallowed: Vec<String> = subscribed
        .iter()
        .filter(|symbol| !grant.allows(symbol))
        .cloned()
        .collect();
    if !disallowed.is_empty() {
        let mut outcome = membership.unsubscribe(&disallowed);
        // `"*"` no longer allowed stands for every symbol that still is,
        // as it does at connection.
        let entitled = grant.initial_subscriptions(&disallowed);
        if !entitled.is_empty()
            && let Ok(subscribed) = membership.subscribe(&entitled, None)
        {
            outcome = subscribed;
        }
        let reply = ServerFrame::Subscribed {
            symbols: &outcome.symbols,
        };
        replies.push(reply.encode().into());
    }
    replies
}

/// The most results a second a subscription may ask for per key (and the
/// least: one an hour).
const MAX_RATE: f64 = 1000.0;
const MIN_RATE: f64 = 1.0 / 3600.0;

/// The time between results of a key limited to `max_rate` a second.
fn rate_interval(max_rate: f64) -> Result<Duration, String> {
    if !(MIN_RATE..=MAX_RATE).contains(&max_rate) {
        return Err(format!(
            "invalid max_rate {max_rate}: expected results per second per key, from 1/3600 to 1000"
        ));
    }
    Ok(Duration::from_secs_f64(1.0 / max_rate))
}

/// Answers a resume: the reply, then what the socket missed. Only the first
/// request of a socket opened with `?resume=1` may be one; a request that
/// names an invalid symbol or epoch is refused, and the socket goes live
/// without recovery.
async fn resume(
    membership: &Membership,
    grant: &Grant,
    catalog: &Catalog,
    mut last_seen: LastSeen,
) -> Vec<Utf8Bytes> {
    let error = |message: &str| vec![ServerFrame::Error { message }.encode().into()];
    if let Some(symbols) = &mut last_seen.symbols {
        let across = last_seen.series.as_ref().map_or(1, Vec::len).max(1);
        if symbols.len().saturating_mul(across) > membership.max_symbols() {
            membership.go_live();
            return error(&format!(
                "too many symbols in one request: at most {}",
                membership.max_symbols()
            ));
        }
        match catalog.subscriptions(symbols, last_seen.series.as_deref()) {
            Ok(entries) => *symbols = entries,
            Err(message) => {
                membership.go_live();
                return error(&message);
            }
        }
    }
    if let Some(message) = invalid_resume(grant, &last_seen) {
        membership.go_live();
        return error(&message);
    }
    let resumed = match membership.resume(&last_seen).await {
        Ok(resumed) => resumed,
        Err(err) => {
            membership.go_live();
            return error(&err.to_string());
        }
    };
    let recovered = resumed.unrecovered_public.is_empty() && resumed.unrecovered_private.is_empty();
    let stats = membership.stats();
    let outcome = if recovered {
        &stats.resumes_recovered
    } else {
        &stats.resumes_unrecovered
    };
    outcome.fetch_add(1, Relaxed);
    stats
        .frames_replayed
        .fetch_add(resumed.replayed as u64, Relaxed);
    let reply = ServerFrame::Resumed {
        recovered,
        replayed: resumed.replayed,
        unrecovered: Unrecovered {
            public: &resumed.unrecovered_public,
            private: &resumed.unrecovered_private,
        },
    };
    std::iter::once(reply.encode().into())
        .chain(resumed.frames.into_iter().map(SharedResult::into_text))
        .collect()
}

/// What is wrong with a resume request, if anything: an invalid epoch or
/// symbol, a symbol named under two epochs (its position would be
/// ambiguous), or a subscription the socket may not have.
fn invalid_resume(grant: &Grant, last_seen: &LastSeen) -> Option<String> {
    for (kind, by_epoch) in [
        ("public", &last_seen.public),
        ("private", &last_seen.private),
    ] {
        let mut named = std::collections::HashSet::new();
        for (epoch, symbols) in by_epoch {
            if !names::is_epoch(epoch) {
                return Some(format!(
                    "invalid epoch {epoch:?}: expected 1-32 characters from [A-Za-z0-9_-]"
                ));
            }
            for symbol in symbols.keys() {
                if !names::is_key(symbol) {
                    return Some(format!(
                        "invalid key {symbol:?}: expected a symbol (1-32 characters from [A-Za-z0-9._:/-]), or symbol@series"
                    ));
                }
                if !named.insert(symbol) {
                    return Some(format!(
                        "{kind} symbol {symbol:?} is named under more than one epoch"
                    ));
                }
            }
        }
    }
    let symbols = last_seen.symbols.as_deref().unwrap_or_default();
    check_subscriptions(symbols, Some(grant)).err()
}

/// Checks subscriptions as every request that names some does: each a
/// symbol or `"*"`, and, when they are to be added under `grant`, every one
/// entitled. (Socket, resume and event stream share it.)
pub(crate) fn check_subscriptions(symbols: &[String], grant: Option<&Grant>) -> Result<(), String> {
    if let Some(bad) = symbols.iter().find(|s| !names::is_subscription(s)) {
        return Err(format!(
            "invalid symbol {bad:?}: expected \"*\" or 1-32 characters from [A-Za-z0-9._:/-], optionally followed by @series"
        ));
    }
    let Some(grant) = grant else {
        return Ok(());
    };
    let denied: Vec<&str> = symbols
        .iter()
        .filter(|s| !grant.allows(s))
        .map(String::as_str)
        .collect();
    if denied.is_empty() {
        Ok(())
    } else {
        Err(format!("not entitled to {}", denied.join(", ")))
    }
}

/// The subscriptions of one socket that asked for closed candles only
/// (`"closed_only":true`): its open candles of those keys are skipped as
/// they are written. Kept by the session, not the hub: at most the
/// socket's own subscriptions.
#[derive(Debug, Default)]
struct ClosedOnly {
    /// Keys named (`AAPL@candles.1m`).
    keys: HashSet<String>,
    /// Series whose wildcard was named (`*@candles.1m`).
    series: HashSet<String>,
}

impl ClosedOnly {
    /// Every subscribe sets the option of the entries it names (an
    /// unsubscribe clears it).
    fn set(&mut self, entries: &[String], only_closed: bool) {
        for entry in entries {
            let name = StreamName::split(entry);
            let (set, item) = match (name.is_wildcard(), name.series) {
                (true, Some(series)) => (&mut self.series, series),
                (false, Some(_)) => (&mut self.keys, entry.as_str()),
                // The SMA has no candles.
                (_, None) => continue,
            };
            if only_closed {
                set.insert(item.to_owned());
            } else {
                set.remove(item);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.series.is_empty()
    }

    fn len(&self) -> usize {
        self.keys.len() + self.series.len()
    }

    /// Forgets every entry not among `subscribed` (sorted).
    fn keep(&mut self, subscribed: &[String]) {
        let subscribed = |entry: &str| {
            subscribed
                .binary_search_by(|s| s.as_str().cmp(entry))
                .is_ok()
        };
        self.keys.retain(|key| subscribed(key));
        self.series
            .retain(|series| subscribed(&format!("*{}{series}", names::SERIES_SEPARATOR)));
    }

    /// Whether `frame` is an open candle this socket does not want.
    fn skips(&self, frame: &Frame) -> bool {
        let Frame::Result(result) = frame else {
            return false;
        };
        result.bar() == BarState::Open
            && (self.keys.contains(result.key())
                || result
                    .series_name()
                    .is_some_and(|series| self.series.contains(series)))
    }
}

/// Feeds every message, then flushes once, within `timeout`. A burst's
/// frames, encoded already, go to the connection as they are, after what
/// the engine holds: whole, since nothing else writes to the connection
/// until this returns.
async fn write(
    socket: &mut Socket,
    messages: impl IntoIterator<Item = impl Into<Outgoing>>,
    timeout: Duration,
) -> Result<(), SessionError> {
    let writes = async {
        let mut messages = messages.into_iter().map(Into::into).peekable();
        while let Some(message) = messages.next() {
            let first = match message {
                Outgoing::Message(message) => {
                    socket.feed(message).await?;
                    continue;
                }
                Outgoing::Encoded(burst) => burst,
            };
            // Bursts queued one after another go out in one write.
            let mut run: [Option<Arc<Burst>>; MAX_BURSTS_A_WRITE] = Default::default();
            run[0] = Some(first);
            for slot in &mut run[1..] {
                match messages.next_if(|next| matches!(next, Outgoing::Encoded(_))) {
                    Some(Outgoing::Encoded(burst)) => *slot = Some(burst),
                    _ => break,
                }
            }
            socket.flush().await?;
            write_encoded(socket.get_mut(), &run)
                .await
                .map_err(tungstenite::Error::Io)?;
        }
        socket.flush().await
    };
    let mut writes = std::pin::pin!(writes);
    // Nearly every batch fits the socket's send buffer and completes at
    // once; only one that has to wait is worth arming a timer for (a timer
    // per batch was a lock on the runtime's timer wheel per batch).
    if let Some(written) = writes.as_mut().now_or_never() {
        return Ok(written?);
    }
    tokio::time::timeout(timeout, writes)
        .await
        .map_err(|_| SessionError::WriteTimeout(timeout))??;
    Ok(())
}

/// Bursts written to a connection in one system call, at most.
const MAX_BURSTS_A_WRITE: usize = 16;

/// Writes the bursts of `run` (up to its first `None`), their frames as
/// encoded, in as few writes as the connection takes.
async fn write_encoded(
    connection: &mut (impl AsyncWrite + Unpin),
    run: &[Option<Arc<Burst>>],
) -> std::io::Result<()> {
    let count = run.iter().map_while(Option::as_ref).count();
    let wire = |index: usize| run[index].as_deref().map_or(&[][..], Burst::wire);
    // How far the write has got: bursts written whole, and bytes of the
    // next. The slices are laid out afresh at each poll, so they take no
    // room in the future that every session keeps while it waits.
    let (mut first, mut done) = (0, 0);
    std::future::poll_fn(|cx| {
        while first < count {
            let mut slices = [IoSlice::new(&[]); MAX_BURSTS_A_WRITE];
            for (index, slice) in (first..count).zip(slices.iter_mut()) {
                *slice = IoSlice::new(wire(index));
            }
            slices[0] = IoSlice::new(&wire(first)[done..]);
            let connection = std::pin::Pin::new(&mut *connection);
            let written =
                std::task::ready!(connection.poll_write_vectored(cx, &slices[..count - first]))?;
            if written == 0 {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            done += written;
            while first < count && done >= wire(first).len() {
                done -= wire(first).len();
                first += 1;
            }
        }
        std::task::Poll::Ready(Ok(()))
    })
    .await
}

/// Sends a close frame and waits (at most [`CLOSE_TIMEOUT`]) for the client's
/// reply, best effort: the peer may already be gone. Reading to the reply
/// also drains what the client sent meanwhile, so the TCP connection ends
/// with a FIN the client can read up to, not a reset over unread data.
async fn close(socket: &mut Socket, code: CloseCode, reason: &'static str) {
    // Boxed: inline, the closing handshake's state would make every
    // session's future, idle or not, that much larger.
    Box::pin(close_now(socket, code, reason)).await;
}

async fn close_now(socket: &mut Socket, code: CloseCode, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    if write(socket, [Message::Close(Some(frame))], CLOSE_TIMEOUT)
        .await
        .is_err()
    {
        return;
    }
    // Read under the engine: after a read error it reads no more.
    socket.get_mut().drain_until_close(CLOSE_TIMEOUT).await;
}

/// Sorts a read error into an ordinary disconnect, a client past its
/// frame rate (closed with 1008) or the size limit (1009), one that broke the
/// protocol (1002, or 1007 for text that is not UTF-8), or a real failure.
async fn end_on_read_error(
    socket: &mut Socket,
    err: tungstenite::Error,
    membership: &Membership,
) -> Result<(), SessionError> {
    use tungstenite::Error as WsError;
    use tungstenite::error::ProtocolError;

    match err {
        WsError::Io(io) if FrameRateExceeded::is(&io) => {
            // Every frame counts, continuations and control frames too: a
            // flood of pings costs a pong each, a flood of fragments a turn each.
            tracing::info!("client exceeded websocket.client_messages_per_second; closing");
            membership.stats().rate_limited_closes.fetch_add(1, Relaxed);
            close(socket, CloseCode::Policy, "rate limit exceeded").await;
            Ok(())
        }
        WsError::Capacity(_) => {
            tracing::info!("client sent a frame over websocket.max_message_bytes; closing");
            close(socket, CloseCode::Size, "message too big").await;
            Ok(())
        }
        WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
        | WsError::Io(_) => {
            tracing::debug!("client went away");
            Ok(())
        }
        WsError::Utf8(_) => {
            tracing::info!("client sent a text frame that is not UTF-8; closing");
            close(socket, CloseCode::Invalid, "text frame is not UTF-8").await;
            Ok(())
        }
        WsError::Protocol(violation) => {
            tracing::info!(violation = ?violation, "client broke the WebSocket protocol; closing");
            close(socket, CloseCode::Protocol, "protocol error").await;
            Ok(())
        }
        other => Err(SessionError::Socket(other)),
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A connection that takes at most `at_most` bytes a write, as a
    /// socket with little room does.
    struct Trickle {
        written: Vec<u8>,
        at_most: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let taken = buf.len().min(self.at_most);
            self.written.extend_from_slice(&buf[..taken]);
            Poll::Ready(Ok(taken))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn bursts_written_together_arrive_whole_and_in_order_however_little_a_write_takes() {
        let burst = |texts: &[&str]| {
            let results = texts
                .iter()
                .map(|text| SharedResult::detached((*text).into(), "A", None, None));
            Some(Arc::new(Burst::new(results.collect())))
        };
        let run = [
            burst(&["one", "two"]),
            burst(&["three"]),
            None,
            burst(&["unsent"]),
        ];
        let mut expected = Vec::new();
        for burst in run[..2].iter().flatten() {
            expected.extend_from_slice(burst.wire());
        }
        for at_most in [1, 3, 7, 1_000] {
            let mut connection = Trickle {
                written: Vec::new(),
                at_most,
            };
            write_encoded(&mut connection, &run).await.expect("writes");
            assert_eq!(connection.written, expected, "{at_most} bytes a write");
        }
    }
}
