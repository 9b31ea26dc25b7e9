//! Server-Sent Events: `GET /sse/{client_code}`, one-way, for clients that
//! cannot use a WebSocket (or want plain `curl -N`).
//!
//! A stream is a socket of its client code in every way the hub knows: it
//! joins the group (private results, direct messages), subscribes to its
//! symbols, has a bounded outbox (conflated or closed when it falls behind)
//! and counts against the same connection limits. What differs is the
//! wire: each result is an event whose `id` is its key's position,
//!
//! ```text
//! id: 9f2c01ab:1041:p:AAPL
//! data: {"symbol":"AAPL",...,"seq":1041,"epoch":"9f2c01ab"}
//! ```
//!
//! so a browser's `EventSource`, reconnecting with `Last-Event-ID`, names
//! the last result it received: that key is replayed exactly from the
//! history, and every other subscribed symbol starts from its latest value.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Grant;
use crate::config::series::Catalog;
use crate::frame::{Frame, SharedResult};
use crate::hub::{Admission, Hub, Membership, ResumeError, Resumed};
use crate::names;
use crate::outbox::Outbox;
use crate::protocol::{LastSeen, LastSeenMap, ServerFrame, Unrecovered};
use crate::session::{Limits, check_subscriptions};

/// Most queued frames encoded into one chunk of the response.
const MAX_BATCH: usize = 256;

/// How long a client's browser waits before reconnecting (the `retry:`
/// field): soon, since it resumes where it left off.
const RETRY_MS: u64 = 1000;

/// What opening a stream takes besides the hub and the client's admission.
pub struct Request {
    /// Its subscriptions, checked already (names, entitlement).
    pub symbols: Vec<String>,
    /// The `Last-Event-ID` header, if any.
    pub last_event_id: Option<String>,
    /// Keepalive period and write timeout.
    pub limits: Limits,
    /// Cancelled when the bridge stops.
    pub shutdown: CancellationToken,
    /// Its place in `server.max_connections`, held while it runs.
    pub permit: OwnedSemaphorePermit,
    /// Cancelled when the stream ends (the connection then closes).
    pub ended: Option<CancellationToken>,
    /// How long until its token expires: the stream ends then, with an
    /// `expired` event, and the client connects again with a fresh token
    /// and its `Last-Event-ID`.
    pub expires_in: Option<Duration>,
}

/// The subscriptions of `?symbols=A,B,*` in the series of
/// `?series=sma,candles.1m` (absent: the socket's defaults of each),
/// checked like a subscribe.
pub fn requested_symbols(
    (symbols, series): (Option<&str>, Option<&str>),
    catalog: &Catalog,
    grant: &Grant,
    max: usize,
) -> Result<Vec<String>, String> {
    let list = |text: &str| -> Vec<String> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let series = series.map(list);
    let named = symbols.map_or_else(|| catalog.default_symbols().to_vec(), list);
    let across = series.as_ref().map_or(1, Vec::len).max(1);
    if named.len().saturating_mul(across) > max {
        return Err(format!("too many symbols: at most {max}"));
    }
    let mut entries = catalog
        .subscriptions(&named, series.as_deref())
        .map_err(|message| format!("?series=: {message}"))?;
    if symbols.is_none() {
        // The defaults, as a socket gets them: a `"*"` the grant does not
        // allow stands for the symbols it does.
        return Ok(grant.initial_subscriptions(&entries));
    }
    entries.sort();
    entries.dedup();
    check_subscriptions(&entries, Some(grant))
        .map_err(|message| format!("?symbols=: {message}"))?;
    Ok(entries)
}

/// A result's event id, `{epoch}:{seq}:{p|c}:{symbol}` (`c` for the
/// client's private key; the symbol last, as it may hold `:`), if it has a
/// position.
fn event_id(out: &mut String, result: &SharedResult) {
    let Some(position) = result.position() else {
        return;
    };
    let kind = if result.client().is_some() { 'c' } else { 'p' };
    let _ = writeln!(
        out,
        "id: {}:{}:{kind}:{}",
        position.epoch,
        position.seq,
        result.key()
    );
}

/// The position `Last-Event-ID` names, as a resume request for that key.
fn last_seen_of(last_event_id: &str) -> Option<LastSeen> {
    let mut parts = last_event_id.splitn(4, ':');
    let (epoch, seq, kind, symbol) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let seq: u64 = seq.parse().ok()?;
    if !names::is_epoch(epoch) || !names::is_key(symbol) {
        return None;
    }
    let mut last_seen = LastSeen::default();
    let by_epoch = match kind {
        "p" => &mut last_seen.public,
        "c" => &mut last_seen.private,
        _ => return None,
    };
    by_epoch
        .entry(epoch.to_owned())
        .or_default()
        .insert(symbol.to_owned(), seq);
    Some(last_seen)
}

/// Appends `data` as an event's data lines (a line break in a direct
/// message would otherwise end the field) and the blank line ending it.
fn data_lines(out: &mut String, data: &str) {
    // CRLF, LF and CR each end a line in an event stream. Split in place:
    // a result has no line break, and costs no copy.
    let mut rest = data;
    loop {
        let end = rest.find(['\n', '\r']);
        out.push_str("data: ");
        out.push_str(&rest[..end.unwrap_or(rest.len())]);
        out.push('\n');
        let Some(end) = end else { break };
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
    }
    out.push('\n');
}

/// Appends one queued frame as an event: a result with its id, a text
/// direct message as `event: direct`. Binary direct messages cannot be
/// carried by an event stream and are skipped.
fn encode(out: &mut String, frame: &Frame) {
    match frame {
        Frame::Direct(Message::Text(text)) => {
            out.push_str("event: direct\n");
            data_lines(out, text.as_str());
        }
        Frame::Direct(_) => {}
        results => {
            for result in results.results() {
                event_id(out, result);
                data_lines(out, result.as_str());
            }
        }
    }
}

/// The symbols `map` names, under any epoch.
fn named_keys(map: &LastSeenMap) -> Vec<&str> {
    map.values()
        .flat_map(|symbols| symbols.keys().map(String::as_str))
        .collect()
}

/// Appends a control frame as an event of its `type`.
fn notice(out: &mut String, kind: &str, frame: &str) {
    out.push_str("event: ");
    out.push_str(kind);
    out.push('\n');
    data_lines(out, frame);
}

/// Joins `admission` to the hub subscribed to `symbols` and starts the
/// stream: first (after `Last-Event-ID`) the missed results of the key it
/// names, then the latest result of every other subscribed symbol, then
/// live events. Returns the response body, or why the stream cannot be.
/// `ended` is cancelled when the stream ends.
pub async fn open(
    hub: &Hub,
    admission: Admission,
    mut request: Request,
    tasks: &TaskTracker,
) -> Result<impl Stream<Item = Result<Bytes, Infallible>> + use<>, String> {
    let (membership, outbox) = hub.join(admission, &[], true);
    let named = request.last_event_id.as_deref().and_then(last_seen_of);
    let mut last_seen = named.clone().unwrap_or_default();
    last_seen.symbols = Some(std::mem::take(&mut request.symbols));
    // Out here: what the stream starts with borrows from it.
    let fresh;
    // A JWT's entitled symbols may exceed websocket.max_symbols.
    let resumed = match membership.resume_with_latest(&last_seen).await {
        Ok(resumed) => resumed,
        // The client code's resumes sent their allowance this second: the
        // stream starts live, without recovery, rather than fail (a browser
        // gives up on an event stream answered with an error status).
        Err(ResumeError::RateLimited(_)) => {
            // Still held: it starts as a stream without Last-Event-ID would
            // (its symbols, their latest values), its key not recovered.
            fresh = LastSeen {
                symbols: last_seen.symbols.clone(),
                ..LastSeen::default()
            };
            Resumed {
                unrecovered_public: named_keys(&last_seen.public),
                unrecovered_private: named_keys(&last_seen.private),
                ..membership
                    .resume_with_latest(&fresh)
                    .await
                    .map_err(|err| err.to_string())?
            }
        }
        Err(err) => return Err(err.to_string()),
    };
    let mut first = format!("retry: {RETRY_MS}\n\n");
    if named.is_some() {
        let reply = ServerFrame::Resumed {
            recovered: resumed.unrecovered_public.is_empty()
                && resumed.unrecovered_private.is_empty(),
            replayed: resumed.replayed,
            unrecovered: Unrecovered {
                public: &resumed.unrecovered_public,
                private: &resumed.unrecovered_private,
            },
        };
        notice(&mut first, "resumed", &reply.encode());
    }
    let (events, body) = mpsc::channel::<Bytes>(1);
    for result in resumed.frames {
        encode(&mut first, &Frame::Result(result));
    }
    // The connection learns the stream ended when the task does.
    let ended = request.ended.take().map(CancellationToken::drop_guard);
    tasks.spawn(async move {
        let _ended = ended;
        run(events, membership, outbox, first, request).await;
    });
    Ok(futures_util::stream::unfold(body, |mut body| async move {
        body.recv().await.map(|chunk| (Ok(chunk), body))
    }))
}

/// Feeds the stream, `first` first, until the client goes, the hub evicts
/// it, a write waits past the write timeout, or shutdown. The request's
/// connection permit is held until then.
async fn run(
    events: mpsc::Sender<Bytes>,
    membership: Membership,
    mut outbox: Outbox,
    first: String,
    request: Request,
) {
    let Request {
        limits,
        shutdown,
        permit: _held_until_the_stream_ends,
        expires_in,
        ..
    } = request;
    let expired = async {
        match expires_in {
            Some(left) => tokio::time::sleep(left).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    let send = async |chunk: String| {
        // A client that stops reading fills its TCP window; past the write
        // timeout it is dropped, as a socket would be.
        let sent = tokio::time::timeout(limits.write_timeout, events.send(chunk.into())).await;
        if sent.is_err() {
            membership.stats().write_timeouts.fetch_add(1, Relaxed);
        }
        matches!(sent, Ok(Ok(())))
    };
    if !send(first).await {
        return;
    }
    let mut keepalive =
        tokio::time::interval_at(Instant::now() + limits.ping_interval, limits.ping_interval);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut batch: Vec<Frame> = Vec::new();
    loop {
        let chunk = tokio::select! {
            () = shutdown.cancelled() => return,
            () = events.closed() => return,
            () = &mut expired => {
                membership.stats().token_expiry_closes.fetch_add(1, Relaxed);
                let mut chunk = String::new();
                let message = ServerFrame::Error { message: "token expired" }.encode();
                notice(&mut chunk, "expired", &message);
                send(chunk).await;
                return;
            }
            _ = keepalive.tick() => ": keepalive\n\n".to_owned(),
            taken = outbox.recv_many(&mut batch, MAX_BATCH) => {
                if taken.frames == 0 {
                    // Evicted as a slow consumer: the stream ends; the
                    // browser reconnects and resumes.
                    return;
                }
                let mut chunk = String::new();
                if taken.conflated {
                    membership.stats().conflations.fetch_add(1, Relaxed);
                    let conflated = ServerFrame::Conflated { keys: taken.frames }.encode();
                    notice(&mut chunk, "conflated", &conflated);
                }
                for frame in batch.drain(..) {
                    encode(&mut chunk, &frame);
                }
                chunk
            }
        };
        if !send(chunk).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_ids_name_one_key() {
        let public = last_seen_of("9f2c01ab:41:p:BTC:USD").expect("valid");
        assert_eq!(public.public["9f2c01ab"]["BTC:USD"], 41);
        let private = last_seen_of("e1:3:c:AAPL").expect("valid");
        assert_eq!(private.private["e1"]["AAPL"], 3);
        for bad in [
            "",
            "e1:x:p:A",
            "e1:3:q:A",
            "e 1:3:p:A",
            "e1:3:p:",
            "e1:3:p:A B",
        ] {
            assert!(last_seen_of(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn events_carry_ids_and_keep_lines_apart() {
        let mut out = String::new();
        let result = r#"{"symbol":"A","price":1,"sma":1,"window":1,"count":1,"ts":1,"seq":7,"epoch":"e1","client":"acme"}"#;
        let read = SharedResult::read(result.into()).expect("a result");
        encode(&mut out, &Frame::Result(read));
        assert_eq!(out, format!("id: e1:7:c:A\ndata: {result}\n\n"));
        out.clear();
        encode(&mut out, &Frame::Direct(Message::Text(result.into())));
        assert_eq!(
            out,
            format!("event: direct\ndata: {result}\n\n"),
            "a direct message is one, whatever its text looks like"
        );
        out.clear();
        let direct = |text: &str| Frame::Direct(Message::Text(text.into()));
        encode(&mut out, &direct("line one\r\nline two"));
        assert_eq!(out, "event: direct\ndata: line one\ndata: line two\n\n");
        out.clear();
        encode(&mut out, &direct("a\rb\n\nc\n"));
        assert_eq!(
            out, "event: direct\ndata: a\ndata: b\ndata: \ndata: c\ndata: \n\n",
            "CR, LF and CRLF each end a line; empty lines are kept"
        );
        out.clear();
        encode(
            &mut out,
            &Frame::Direct(Message::Binary(Bytes::from_static(b"\xff"))),
        );
        assert!(out.is_empty(), "binary is skipped");
    }
}
