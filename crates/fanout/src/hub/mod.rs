//! The hub: every open socket, grouped by client code, indexed by symbol.
//!
//! The input loop pushes frames in ([`delivery`]: `deliver_result`,
//! `send_to_group`, the seed's `send_message(client_code, message)`); each
//! socket's session drains its own bounded outbox. Routing looks up the
//! sockets that want a frame in an index; it never scans every socket. A
//! socket's requests go through its [`Membership`] ([`membership`]:
//! subscribe, unsubscribe; [`resume`]: what it missed).
//!
//! Its state is five parts, each with its own small API: the
//! [connections](connections) by client group, the
//! [subscriptions](subscriptions) by symbol, the [snapshots](snapshots), the
//! [history](history) of each key for sockets that resume (with the
//! [floors](seen_ahead) of sockets that saw further elsewhere), and the
//! [wakes](pending_wakes) it batches. They live under one lock, because a
//! subscribe and its snapshots must be one step; every request's work under
//! it is bounded by the request's own size, and the gauges `/stats` reads
//! are kept outside it. The [admissions](admissions) per client (sockets,
//! new sockets a second, resume allowance) have a lock of their own, so
//! that connections refused in a flood never wait for, or hold up,
//! delivery.

mod admissions;
mod burst;
mod connections;
mod delivery;
mod history;
mod membership;
mod pending_wakes;
mod resume;
mod seen_ahead;
mod snapshots;
mod subscriptions;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use crate::frame::SharedResult;

use self::admissions::Admissions;
use self::burst::Burst;
use self::connections::Connections;
pub use self::delivery::WakeHold;
use self::history::{History, HistoryGauges};
pub use self::membership::Membership;
use self::pending_wakes::PendingWakes;
use self::seen_ahead::SeenAhead;
use self::snapshots::Snapshots;
use self::subscriptions::Subscriptions;
use crate::outbox::{self, Outbox, QueuedBytes};
use crate::stats::Stats;
use crate::sync::{HubGuard, HubMutex, lock_hub};

/// Identifies one socket for the lifetime of the process.
pub type SocketId = u64;

/// Shared handle to the hub; clones are cheap and see the same sockets.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: HubMutex<State>,
    /// Sockets and allowances per client code, under a lock of their own:
    /// a connection refused for its client's limits (a client retrying in
    /// a loop makes thousands a second) never takes the hub's lock, which
    /// delivery needs. Taken alone, or inside the hub's lock, never the
    /// other way round.
    admissions: HubMutex<Admissions>,
    limits: HubLimits,
    stats: Arc<Stats>,
    /// What every socket's outbox holds, kept by the outboxes.
    queued: QueuedBytes,
    /// Open sockets and groups, kept by the connections.
    counts: Arc<connections::Counts>,
    /// Bytes and keys the history holds, kept by the history.
    history: Arc<HistoryGauges>,
    /// Whether a frame too large for any socket has been logged (once is
    /// enough: the counter tells how often).
    logged_too_large: AtomicBool,
    /// One resume at a time: see [`Hub::resume_turn`].
    resumes: tokio::sync::Semaphore,
}

/// Bounds on what one socket or one client may hold.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// Frames queued for one socket before it is a slow consumer.
    pub send_queue: usize,
    /// Bytes queued for one socket before it is a slow consumer.
    pub send_queue_bytes: usize,
    /// Whether a socket past those bounds is kept, with the latest result
    /// of each key (`websocket.slow_consumer = "conflate"`), rather than closed.
    pub conflate: bool,
    /// Subscriptions per socket.
    pub max_symbols: usize,
    /// Open sockets per client code.
    pub max_sockets_per_client: usize,
    /// Symbols whose latest result is kept for snapshots, and keys whose
    /// history is kept (`sma.max_keys`): a gateway's keys come from Redis,
    /// not from a bounded pipeline.
    pub max_snapshots: usize,
    /// Results kept per key for sockets that resume (`websocket.history_size`).
    pub history_size: usize,
    /// Bytes the history may hold in all (`websocket.history_bytes`).
    pub history_bytes: usize,
    /// Frames the resumes of one client code may send a second
    /// (`websocket.resume_frames_per_second`).
    pub resume_frames_per_second: usize,
    /// New sockets one client code may open a second, after a burst of
    /// `max_sockets_per_client` (`server.connects_per_client_per_second`).
    pub connects_per_client_per_second: usize,
}

/// Everything under the hub's one lock.
#[derive(Debug)]
struct State {
    connections: Connections,
    subscriptions: Subscriptions,
    snapshots: Snapshots,
    history: History,
    /// Sockets opened to resume, not yet live: their initial subscriptions,
    /// which take effect with the resume (or with any other first request).
    held: HashMap<SocketId, Vec<String>>,
    /// What resumed sockets saw elsewhere that has not arrived here yet.
    seen_ahead: SeenAhead,
    wakes: PendingWakes,
    /// Results delivered during a wake hold, not yet offered.
    burst: Burst,
}

/// Why a socket was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    /// The client code already has `server.max_connections_per_client` sockets.
    #[error("client code has too many open sockets (at most {0})")]
    TooManySockets(usize),
    /// The client code opened its allowance of new sockets this second.
    #[error("client code opens sockets too fast (at most {0} a second)")]
    TooManyConnects(usize),
}

/// A socket's place in its client's connection count, taken before the
/// upgrade so the limit holds even for handshakes in flight. Released on drop.
#[derive(Debug)]
pub struct Admission {
    hub: Hub,
    client: Box<str>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let now = std::time::Instant::now();
        self.hub.admissions().release(&self.client, now);
    }
}

/// A socket's turn to resume, from [`Hub::resume_turn`]; the next resume
/// may go once it is dropped.
#[derive(Debug)]
#[must_use = "the turn ends when it is dropped"]
pub struct ResumeTurn<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
}

/// Why a resume was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// The socket was not opened to resume, or has resumed already.
    #[error("resume must be the first request on a socket opened with ?resume=1")]
    NotHeld,
    /// The socket would exceed `websocket.max_symbols`.
    #[error("subscription limit reached: at most {0} symbols per socket")]
    TooManySymbols(usize),
    /// The client code's resumes sent what they may this second.
    #[error(
        "resume refused: this client code's resumes sent {0} frames in the last second (websocket.resume_frames_per_second); live without recovery"
    )]
    RateLimited(usize),
}

/// Why a subscription request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The socket would exceed `websocket.max_symbols`.
    #[error("subscription limit reached: at most {0} symbols per socket")]
    TooManySymbols(usize),
}

/// What a resume did; the keys it names are borrowed from the request (a
/// resume naming 5,000 keys copied each into a list of its own).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resumed<'a> {
    /// The frames to send before anything live, in per-key order: every
    /// missed result of each recovered key, and the latest result of each
    /// key that could not be recovered.
    pub frames: Vec<SharedResult>,
    /// How many of `frames` are missed results (the rest stand in for gaps).
    pub replayed: usize,
    /// Public symbols whose missed results could not all be sent.
    pub unrecovered_public: Vec<&'a str>,
    /// Private symbols (of the client's own keys) likewise.
    pub unrecovered_private: Vec<&'a str>,
}

/// The outcome of a subscribe or unsubscribe.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribed {
    /// The socket's whole subscription set, sorted.
    pub symbols: Vec<String>,
    /// How many snapshots (latest results of the newly subscribed symbols)
    /// were queued to the socket, after the reply; 0 on unsubscribe.
    pub snapshots: usize,
}

impl Hub {
    /// An empty hub.
    #[must_use]
    pub fn new(limits: HubLimits, stats: Arc<Stats>) -> Self {
        let limits = HubLimits {
            send_queue: limits.send_queue.max(1),
            ..limits
        };
        let state = State {
            connections: Connections::default(),
            subscriptions: Subscriptions::default(),
            snapshots: Snapshots::default(),
            history: History::new(
                limits.history_size,
                limits.history_bytes,
                limits.max_snapshots,
            ),
            held: HashMap::new(),
            seen_ahead: SeenAhead::default(),
            wakes: PendingWakes::default(),
            burst: Burst::default(),
        };
        let counts = state.connections.counts();
        let history = state.history.gauges();
        Self {
            inner: Arc::new(Inner {
                counts,
                history,
                state: HubMutex::new(state),
                admissions: HubMutex::new(Admissions::new(admissions::Rates {
                    connects_per_second: limits.connects_per_client_per_second,
                    max_sockets: limits.max_sockets_per_client,
                    replay_frames_per_second: limits.resume_frames_per_second,
                })),
                limits,
                stats,
                queued: QueuedBytes::default(),
                logged_too_large: AtomicBool::new(false),
                resumes: tokio::sync::Semaphore::new(1),
            }),
        }
    }

    /// Counts a socket about to open for `client`, or refuses it when the
    /// client is at `max_sockets_per_client`.
    pub fn admit(&self, client: &str) -> Result<Admission, AdmitError> {
        let now = std::time::Instant::now();
        self.admissions().admit(client, now)?;
        Ok(Admission {
            hub: self.clone(),
            client: client.into(),
        })
    }

    /// The hub's state, with any burst of results offered first: whatever
    /// reads or changes the hub sees every result delivered before it.
    fn state(&self) -> HubGuard<'_, State> {
        let mut state = self.lock();
        if !state.burst.is_empty() {
            self.offer_burst(&mut state);
        }
        state
    }

    /// The per-client counts and allowances: O(1) work under its own lock.
    fn admissions(&self) -> HubGuard<'_, Admissions> {
        lock_hub(&self.inner.admissions)
    }

    /// The hub's state as it is, burst and all: for delivery itself.
    fn lock(&self) -> HubGuard<'_, State> {
        lock_hub(&self.inner.state)
    }

    /// Adds an admitted socket to its client's group, subscribed to
    /// `subscriptions`. The socket leaves the hub, and its admission is
    /// released, when the returned [`Membership`] is dropped.
    ///
    /// A socket joined with `hold` receives nothing until
    /// [`Membership::resume`] or [`Membership::go_live`]: what it missed
    /// must reach it before anything newer.
    pub fn join(
        &self,
        admission: Admission,
        subscriptions: &[String],
        hold: bool,
    ) -> (Membership, Outbox) {
        let limits = &self.inner.limits;
        let bounds = outbox::Bounds {
            frames: limits.send_queue,
            bytes: limits.send_queue_bytes,
            conflate: limits.conflate,
        };
        let (sender, outbox) = outbox::bounded(bounds, self.inner.queued.clone());
        let rates = sender.rates();
        let mut state = self.state();
        let id = state
            .connections
            .add(admission.client.clone(), sender, !hold);
        if hold {
            state.held.insert(id, subscriptions.to_vec());
        } else {
            state.subscriptions.add(id, subscriptions);
        }
        drop(state);
        let membership = Membership {
            hub: self.clone(),
            id,
            rates,
            _admission: admission,
        };
        (membership, outbox)
    }

    /// Waits for this socket's turn to resume: resumes take the hub's lock
    /// one at a time, in the order they asked. A resume's work under the
    /// lock is bounded (its request and the queue bounds: a few
    /// milliseconds for thousands of keys), but twenty sockets resuming at
    /// once would otherwise take the lock back to back while live delivery
    /// waits behind them; taking turns, each resume waits without holding a
    /// thread, and live delivery gets the lock between any two.
    pub async fn resume_turn(&self) -> ResumeTurn<'_> {
        let permit = self.inner.resumes.acquire().await;
        ResumeTurn {
            _permit: permit.expect("the hub never closes its resume semaphore"),
        }
    }

    /// How many sockets are open.
    #[must_use]
    pub fn socket_count(&self) -> usize {
        self.inner.counts.sockets.load(Relaxed)
    }

    /// How many client groups have at least one socket.
    #[must_use]
    pub fn group_count(&self) -> usize {
        self.inner.counts.groups.load(Relaxed)
    }

    /// Payload bytes waiting in sockets' outboxes: a gauge the outboxes
    /// keep, read without the hub's lock.
    #[must_use]
    pub fn queued_bytes(&self) -> usize {
        self.inner.queued.get()
    }

    /// Releases the history, snapshot and floors of every key that had no
    /// result for about `sma.key_idle_ms`: called every quarter of it (see
    /// [`crate::idle`]). One walk over the keys under the hub's lock, once
    /// per sweep: a millisecond or so for `sma.max_keys` keys, never per
    /// request. Returns how many keys' histories went.
    pub fn release_idle(&self) -> usize {
        let mut state = self.state();
        let released = state.history.release_idle();
        state.snapshots.release_idle();
        if !state.seen_ahead.is_empty() {
            for (client, symbol) in &released {
                state.seen_ahead.forget(client.as_deref(), symbol);
            }
        }
        drop(state);
        self.inner
            .stats
            .history_keys_released
            .fetch_add(released.len() as u64, Relaxed);
        released.len()
    }

    /// Bytes the history of every key holds, read without the hub's lock.
    #[must_use]
    pub fn history_bytes(&self) -> usize {
        self.inner.history.bytes.load(Relaxed)
    }

    /// Keys with a history kept here, read without the hub's lock: on a
    /// gateway, the keys relayed from Redis (`sma.max_keys` bounds them).
    #[must_use]
    pub fn history_keys(&self) -> usize {
        self.inner.history.keys.load(Relaxed)
    }

    /// How many sockets the group `client` has (the tests' view of a group).
    #[cfg(test)]
    #[must_use]
    pub fn group_size(&self, client: &str) -> usize {
        self.state().connections.group(client).len()
    }
}

impl State {
    fn subscriptions_of(&self, id: SocketId) -> Vec<String> {
        if let Some(held) = self.held.get(&id) {
            let mut held = held.clone();
            held.sort();
            held.dedup();
            return held;
        }
        self.subscriptions
            .of(id)
            .map(|own| own.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Removes a socket and every index entry it had; returns its group's
    /// code, or `None` when it was already gone.
    fn remove(&mut self, id: SocketId) -> Option<Box<str>> {
        self.held.remove(&id);
        self.seen_ahead.remove(id);
        self.subscriptions.remove_all(id);
        self.connections.remove(id)
    }
}

#[cfg(test)]
mod tests;
