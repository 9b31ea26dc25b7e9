//! The hub: every open socket, grouped by client code, indexed by symbol.
//!
//! The listener pushes frames in (`publish_public`, `send_to_group` — the
//! seed's `send_message(client_code, message)`); each socket's session drains
//! its own bounded outbox. Routing looks up the sockets that want a frame in
//! an index; it never scans every socket.
//!
//! Its state is six parts, each with its own small API: the
//! [connections](connections) by client group, the
//! [subscriptions](subscriptions) by symbol, the [snapshots](snapshots), the
//! [history](history) of each key for sockets that resume, the
//! [admissions](admissions) per client, and the [wakes](wakes) it batches.
//! They live under one lock, because a subscribe and its snapshots must be
//! one step; connections and subscriptions are kept apart so that the lock
//! can be split along that seam when one lock becomes the bottleneck.

mod admissions;
mod connections;
mod floors;
mod history;
mod snapshots;
mod subscriptions;
mod wakes;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes};

use self::admissions::Admissions;
use self::connections::Connections;
use self::floors::Floors;
use self::history::{History, Replay};
use self::snapshots::Snapshots;
use self::subscriptions::Subscriptions;
use self::wakes::Wakes;
use crate::names::ALL_SYMBOLS;
use crate::outbox::{self, FrameKey, Offer, Outbox, QueuedBytes};
use crate::protocol::{LastSeen, Position};
use crate::stats::Stats;

/// Identifies one socket for the lifetime of the process.
pub type SocketId = u64;

/// Shared handle to the hub; clones are cheap and see the same sockets.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    limits: HubLimits,
    stats: Arc<Stats>,
    /// What every socket's outbox holds, kept by the outboxes.
    queued: QueuedBytes,
    /// Open sockets and groups, kept by the connections.
    counts: Arc<connections::Counts>,
    /// Bytes the history holds, kept by the history.
    history_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// Whether a frame too large for any socket has been logged (once is
    /// enough: the counter tells how often).
    logged_too_large: AtomicBool,
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
    floors: Floors,
    admissions: Admissions,
    wakes: Wakes,
}

/// What one offer loop did: frames queued, frames a newer one of their key
/// replaced, and the sockets found full.
#[derive(Debug, Default)]
struct Delivery {
    queued: u64,
    conflated: u64,
    slow: Vec<SocketId>,
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
        self.hub.state().admissions.release(&self.client, now);
    }
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

/// What a resume did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resumed {
    /// The frames to send before anything live, in per-key order: every
    /// missed result of each recovered key, and the latest result of each
    /// key that could not be recovered.
    pub frames: Vec<Utf8Bytes>,
    /// How many of `frames` are missed results (the rest stand in for gaps).
    pub replayed: usize,
    /// Public symbols whose missed results could not all be sent.
    pub unrecovered_public: Vec<String>,
    /// Private symbols (of the client's own keys) likewise.
    pub unrecovered_private: Vec<String>,
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
            floors: Floors::default(),
            admissions: Admissions::new(admissions::Rates {
                connects_per_second: limits.connects_per_client_per_second,
                max_sockets: limits.max_sockets_per_client,
                replay_frames_per_second: limits.resume_frames_per_second,
            }),
            wakes: Wakes::default(),
        };
        let counts = state.connections.counts();
        let history_bytes = state.history.bytes_gauge();
        Self {
            inner: Arc::new(Inner {
                counts,
                history_bytes,
                state: Mutex::new(state),
                limits,
                stats,
                queued: QueuedBytes::default(),
                logged_too_large: AtomicBool::new(false),
            }),
        }
    }

    /// Counts a socket about to open for `client`, or refuses it when the
    /// client is at `max_sockets_per_client`.
    pub fn admit(&self, client: &str) -> Result<Admission, AdmitError> {
        let now = std::time::Instant::now();
        self.state().admissions.admit(client, now)?;
        Ok(Admission {
            hub: self.clone(),
            client: client.into(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every mutation below completes before it can panic, so a poisoned
        // lock still guards consistent data.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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

    /// Fans out one SMA result: a public one (`client` is `None`) to every
    /// socket subscribed to `symbol` (by name or through `"*"`), kept as the
    /// symbol's snapshot; a private one to every socket of its client's
    /// group. A result with a position is kept in its key's history too.
    pub fn deliver_result(
        &self,
        symbol: &str,
        client: Option<&str>,
        position: Option<Position<'_>>,
        frame: Utf8Bytes,
    ) {
        if !self.fits_a_socket(frame.len()) {
            return;
        }
        let mut guard = self.state();
        let state = &mut *guard;
        // A result its key already had (the output channel repeated it, or
        // a stale node published it) reaches no socket a second time.
        if let Some(position) = position
            && !state.history.record(client, symbol, position, &frame)
        {
            self.inner.stats.results_repeated.fetch_add(1, Relaxed);
            return;
        }
        // The key's floors, looked up once: each subscriber is then one probe.
        let floors = position.and_then(|at| Some((state.floors.of(client, symbol)?, at)));
        let unseen = |id: &&SocketId| {
            floors.is_none_or(|(floors, position)| !floors.has_seen(**id, position))
        };
        let key = Some(FrameKey {
            private: client.is_some(),
            symbol,
        });
        let delivery = match client {
            None => {
                state
                    .snapshots
                    .remember(symbol, &frame, self.inner.limits.max_snapshots);
                offer_each(
                    &state.connections,
                    state.subscriptions.subscribers(symbol).filter(unseen),
                    &Message::Text(frame),
                    key,
                    &mut state.wakes,
                )
            }
            Some(code) => offer_each(
                &state.connections,
                state.connections.group(code).iter().filter(unseen),
                &Message::Text(frame),
                key,
                &mut state.wakes,
            ),
        };
        if let Some(position) = position.filter(|_| !state.floors.is_empty()) {
            state.floors.passed(client, symbol, position);
        }
        self.finish_delivery(state, delivery);
        self.wake_unless_held(guard);
    }

    /// [`Hub::deliver_result`] for a public result without a position.
    #[cfg(test)]
    pub fn publish_public(&self, symbol: &str, frame: Utf8Bytes) {
        self.deliver_result(symbol, None, None, frame);
    }

    /// Keeps `frame` as `symbol`'s snapshot without delivering it: a
    /// gateway seeding snapshots that compute nodes stored in Redis.
    pub fn remember_latest(&self, symbol: &str, frame: Utf8Bytes) {
        if !self.fits_a_socket(frame.len()) {
            return;
        }
        self.state()
            .snapshots
            .remember(symbol, &frame, self.inner.limits.max_snapshots);
    }

    /// Delivers `message` to every socket of the group `client` — the seed's
    /// `send_message(client_code, message)`. Returns how many sockets got it.
    pub fn send_to_group(&self, client: &str, message: Message) -> usize {
        if !self.fits_a_socket(outbox::payload_len(&message)) {
            return 0;
        }
        let mut guard = self.state();
        let state = &mut *guard;
        // A direct message has no key: it is never conflated away.
        let delivery = offer_each(
            &state.connections,
            state.connections.group(client),
            &message,
            None,
            &mut state.wakes,
        );
        let queued = usize::try_from(delivery.queued).unwrap_or(usize::MAX);
        self.finish_delivery(state, delivery);
        self.wake_unless_held(guard);
        queued
    }

    /// Whether a frame of `len` bytes is one a socket that keeps up can take:
    /// at most half its byte bound. A larger one would find most sockets
    /// "full" and evict each as a slow consumer, although none is slow: it is
    /// refused here instead, once for all.
    fn fits_a_socket(&self, len: usize) -> bool {
        let bound = self.inner.limits.send_queue_bytes / 2;
        if len <= bound {
            return true;
        }
        self.inner.stats.frames_too_large.fetch_add(1, Relaxed);
        if !self.inner.logged_too_large.swap(true, Relaxed) {
            tracing::warn!(
                bytes = len,
                limit = bound,
                "frame larger than half of websocket.send_queue_bytes refused (logged once; counted in frames_too_large)"
            );
        }
        false
    }

    /// Counts what was queued and evicts the sockets whose outbox was full.
    /// Dropping an evicted socket's sender ends its outbox, which tells its
    /// session to close with "slow consumer" once it has drained what is queued.
    fn finish_delivery(&self, state: &mut State, delivery: Delivery) {
        let stats = &self.inner.stats;
        stats.frames_queued.fetch_add(delivery.queued, Relaxed);
        if delivery.conflated > 0 {
            stats
                .frames_conflated
                .fetch_add(delivery.conflated, Relaxed);
        }
        for id in delivery.slow {
            if let Some(group) = state.remove(id) {
                self.inner.stats.slow_consumer_closes.fetch_add(1, Relaxed);
                tracing::warn!(client = %group, socket = id, "socket fell behind; closing it as a slow consumer");
            }
        }
    }

    /// Wakes the sessions frames were queued for, unless a hold defers it.
    /// Outside the hub's lock: thousands of wakes would keep joins and
    /// subscribes waiting.
    fn wake_unless_held(&self, mut state: MutexGuard<'_, State>) {
        state.wakes.settle(&self.inner.queued);
        let Some(mut wakes) = state.wakes.take_due() else {
            return;
        };
        drop(state);
        wakes.drain(..).for_each(Waker::wake);
        // Kept for reuse: no allocation per delivery.
        self.state().wakes.give_back(wakes);
    }

    /// Defers waking sessions until the returned hold is dropped: the
    /// listener queues everything that has arrived, then each session wakes
    /// once and writes it all. Woken per frame, a session on the other core
    /// would drain its outbox while the listener is still filling it, and
    /// both cores would fight over its lock. A hold cannot be kept across an
    /// `.await` in a spawned task (it is not `Send`); an outbox past half
    /// full wakes its session regardless.
    pub fn hold_wakes(&self) -> WakeHold {
        self.state().wakes.hold();
        WakeHold {
            hub: self.clone(),
            _not_send: std::marker::PhantomData,
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
        if !state.floors.is_empty() {
            for (client, symbol) in &released {
                state.floors.forget(client.as_deref(), symbol);
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
        self.inner.history_bytes.load(Relaxed)
    }

    /// Makes a held socket live, subscribed to `last_seen.symbols` (else
    /// its initial set), and finds what it missed since `last_seen` — in
    /// one step under the lock, so every result is either among the frames
    /// returned or queued to the socket after them, never both and never
    /// neither.
    fn resume(
        &self,
        id: SocketId,
        last_seen: &LastSeen,
        with_latest: bool,
    ) -> Result<Resumed, ResumeError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let initial = state.held.get(&id).ok_or(ResumeError::NotHeld)?;
        let mut subscriptions = last_seen.symbols.clone().unwrap_or_else(|| initial.clone());
        subscriptions.sort();
        subscriptions.dedup();
        let max_symbols = self.inner.limits.max_symbols;
        if subscriptions.len() > max_symbols {
            return Err(ResumeError::TooManySymbols(max_symbols));
        }
        // What resumes naming keys may send, per client code: a client that
        // resumes over and over (on new sockets, each within its limits)
        // gets its allowance, then refusals that cost nothing.
        let names_keys = !last_seen.public.is_empty() || !last_seen.private.is_empty();
        let rate = self.inner.limits.resume_frames_per_second;
        let now = std::time::Instant::now();
        let group = state.connections.get(id).map(|socket| socket.group.clone());
        let allowance = match &group {
            Some(group) if names_keys => state
                .admissions
                .replay_allowance(group, now)
                .ok_or(ResumeError::RateLimited(rate))?,
            _ => usize::MAX,
        };
        state.held.remove(&id);
        let client = state
            .connections
            .make_live(id)
            .ok_or(ResumeError::NotHeld)?;
        state.subscriptions.add(id, &subscriptions);
        let everything = subscriptions.iter().any(|s| s == ALL_SYMBOLS);
        let wants = |symbol: &str| {
            everything
                || subscriptions
                    .binary_search_by(|s| s.as_str().cmp(symbol))
                    .is_ok()
        };
        let mut resumed = Resumed::default();
        let mut ahead: Vec<(bool, &str, Position<'_>)> = Vec::new();
        // A replay bypasses the socket's queue; it is held to the queue's
        // bounds all the same (the budget). A key whose missed results would
        // pass them is not recovered, and it spends the budget: the keys
        // after it are sent their latest result, without their missed ones
        // being read, so a resume costs its request's size plus the budget,
        // however many keys it names.
        let limits = &self.inner.limits;
        let mut budget = Budget {
            frames: limits.send_queue.min(allowance),
            bytes: limits.send_queue_bytes,
            replaying: true,
        };
        let history = &state.history;
        for (epoch, symbols) in &last_seen.public {
            for (symbol, &seq) in symbols {
                if !wants(symbol) {
                    // Named but not subscribed: not recovered, and not sent.
                    budget.answer(&mut resumed, Replay::Gap(None), symbol, false, None);
                    continue;
                }
                let seen = Position { seq, epoch };
                let replay = history.replay(None, symbol, seen);
                let replay = floored(replay, &mut ahead, (false, symbol, seen));
                // Past the floor cap: not recovered, and nothing sent.
                let stand_in = replay.is_some().then(|| state.snapshots.get(symbol));
                let replay = replay.unwrap_or(Replay::Gap(None));
                budget.answer(&mut resumed, replay, symbol, false, stand_in.flatten());
            }
        }
        for (epoch, symbols) in &last_seen.private {
            for (symbol, &seq) in symbols {
                let seen = Position { seq, epoch };
                let replay = history.replay(Some(&client), symbol, seen);
                let replay = floored(replay, &mut ahead, (true, symbol, seen));
                let replay = replay.unwrap_or(Replay::Gap(None));
                budget.answer(&mut resumed, replay, symbol, true, None);
            }
        }
        for (private, symbol, seen) in ahead {
            let owner = private.then_some(&*client);
            state.floors.add(id, owner, symbol, seen);
        }
        if with_latest {
            let named = |symbol: &str| {
                last_seen
                    .public
                    .values()
                    .any(|symbols| symbols.contains_key(symbol))
            };
            // Taken lazily: the bounds, not the number of symbols, bound the work.
            let latest: Box<dyn Iterator<Item = &Utf8Bytes>> = if everything {
                Box::new(
                    state
                        .snapshots
                        .iter()
                        .filter(|(symbol, _)| !named(symbol))
                        .map(|(_, frame)| frame),
                )
            } else {
                Box::new(
                    subscriptions
                        .iter()
                        .filter(|symbol| !named(symbol))
                        .filter_map(|symbol| state.snapshots.get(symbol)),
                )
            };
            for frame in latest {
                if !budget.take(1, frame.len()) {
                    break;
                }
                resumed.frames.push(frame.clone());
            }
        }
        if names_keys && let Some(group) = &group {
            let sent = resumed.frames.len();
            state.admissions.spend_replay(group, sent);
        }
        Ok(resumed)
    }

    /// Makes a held socket live without resuming; false when it was not held.
    fn go_live(&self, id: SocketId) -> bool {
        let mut state = self.state();
        let Some(subscriptions) = state.held.remove(&id) else {
            return false;
        };
        state.connections.make_live(id);
        state.subscriptions.add(id, &subscriptions);
        true
    }

    /// How many sockets the group `client` has (the tests' view of a group).
    #[cfg(test)]
    #[must_use]
    pub fn group_size(&self, client: &str) -> usize {
        self.state().connections.group(client).len()
    }

    fn subscribe(
        &self,
        id: SocketId,
        symbols: &[String],
        rate: (&outbox::Rates, Option<Duration>),
    ) -> Result<Subscribed, SubscribeError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let Some(socket) = state.connections.get(id) else {
            return Ok(Subscribed {
                symbols: Vec::new(),
                snapshots: 0,
            });
        };
        let empty = BTreeSet::new();
        let own = state.subscriptions.of(id).unwrap_or(&empty);
        let new: BTreeSet<&String> = symbols.iter().filter(|s| !own.contains(*s)).collect();
        let max_symbols = self.inner.limits.max_symbols;
        if own.len() + new.len() > max_symbols {
            return Err(SubscribeError::TooManySymbols(max_symbols));
        }
        // Every named symbol takes the request's rate (or none), new or not,
        // before any live result of a new symbol can reach the socket: work
        // in the symbols named (the socket's own limits), not in its keys.
        let (rates, max_rate) = rate;
        rates.set_rate(symbols, max_rate);
        // The snapshots go into the socket's own outbox, under the lock so
        // no newer live frame can be queued ahead of them, and within the
        // outbox's bounds: a client that subscribes to "*" again and again
        // gets no more than its queue holds, and the copying stops there.
        let everything = new.iter().any(|s| s.as_str() == ALL_SYMBOLS);
        let latest = &state.snapshots;
        let wanted = if everything {
            latest.len()
        } else {
            new.iter()
                .filter(|s| latest.get(s.as_str()).is_some())
                .count()
        };
        let snapshots = if everything {
            socket
                .outbox
                .offer_while_room(latest.all(), state.wakes.pending())
        } else {
            let frames = new.iter().filter_map(|s| latest.get(s.as_str()));
            socket
                .outbox
                .offer_while_room(frames, state.wakes.pending())
        };
        let skipped = wanted - snapshots;
        if skipped > 0 {
            self.inner
                .stats
                .snapshots_skipped
                .fetch_add(skipped as u64, Relaxed);
        }
        self.inner
            .stats
            .frames_queued
            .fetch_add(snapshots as u64, Relaxed);
        let new: Vec<String> = new.into_iter().cloned().collect();
        state.subscriptions.add(id, &new);
        let symbols = state.subscriptions_of(id);
        self.wake_unless_held(guard);
        Ok(Subscribed { symbols, snapshots })
    }

    fn unsubscribe(&self, id: SocketId, symbols: &[String]) -> Subscribed {
        let mut state = self.state();
        for symbol in symbols {
            state.subscriptions.remove(id, symbol);
        }
        Subscribed {
            symbols: state.subscriptions_of(id),
            snapshots: 0,
        }
    }
}

/// Keeps sessions from being woken until it is dropped; see [`Hub::hold_wakes`].
///
/// Not `Send`: held across an `.await` it would keep every session asleep
/// while the task waits, and a future holding it there cannot be spawned.
#[derive(Debug)]
#[must_use = "the hold ends, and sessions wake, when it is dropped"]
pub struct WakeHold {
    hub: Hub,
    _not_send: std::marker::PhantomData<std::rc::Rc<()>>,
}

// Fails to compile if `WakeHold` ever becomes `Send`: the two impls below
// then both apply and the call is ambiguous.
const _: fn() = || {
    trait AmbiguousIfSend<A> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfSend<()> for T {}
    impl<T: ?Sized + Send> AmbiguousIfSend<u8> for T {}
    <WakeHold as AmbiguousIfSend<_>>::check();
};

impl Drop for WakeHold {
    fn drop(&mut self) {
        let mut state = self.hub.state();
        state.wakes.release();
        self.hub.wake_unless_held(state);
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
        self.floors.remove(id);
        self.subscriptions.remove_all(id);
        self.connections.remove(id)
    }
}

/// What a resume may still send: the socket's queue bounds, in frames and
/// bytes.
struct Budget {
    frames: usize,
    bytes: usize,
    /// Whether missed results are still replayed: not once a key's did not
    /// fit (the keys after it are sent their latest result, and no missed
    /// result is read).
    replaying: bool,
}

impl Budget {
    /// Takes `frames` frames of `bytes` bytes if they fit.
    fn take(&mut self, frames: usize, bytes: usize) -> bool {
        if frames > self.frames || bytes > self.bytes {
            return false;
        }
        self.frames -= frames;
        self.bytes -= bytes;
        true
    }

    /// Answers one named key: its missed results if they fit; otherwise the
    /// key is not recovered, and its latest result (else `stand_in`, the
    /// symbol's snapshot) is sent if that fits. Missed results that do not
    /// fit spend the budget: the keys after are not read (see `resume`).
    fn answer(
        &mut self,
        resumed: &mut Resumed,
        replay: Replay<'_>,
        symbol: &str,
        private: bool,
        stand_in: Option<&Utf8Bytes>,
    ) {
        let mut spent = false;
        let latest = match replay {
            Replay::Ahead => return,
            Replay::Recovered(missed) if missed.len() == 0 => return,
            Replay::Recovered(missed) => {
                let count = missed.len();
                // Read only when the count fits, and no further than it.
                let bytes = if self.replaying && count <= self.frames {
                    missed.clone().map(|frame| frame.len()).sum()
                } else {
                    usize::MAX
                };
                if self.take(count, bytes) {
                    resumed.replayed += count;
                    resumed.frames.extend(missed.cloned());
                    return;
                }
                spent = true;
                missed.newest()
            }
            Replay::Gap(latest) => latest.or(stand_in),
        };
        let unrecovered = if private {
            &mut resumed.unrecovered_private
        } else {
            &mut resumed.unrecovered_public
        };
        unrecovered.push(symbol.to_owned());
        if let Some(latest) = latest
            && self.take(1, latest.len())
        {
            resumed.frames.push(latest.clone());
        }
        if spent {
            // Past the budget: the keys after this one are not read.
            self.replaying = false;
        }
    }
}

/// A key the client is ahead on needs a floor. Past
/// [`floors::MAX_PER_SOCKET`] of them, `None`: the key is reported not
/// recovered and nothing of it is sent (this node's latest is older than
/// what the client has; what comes live may repeat what it saw).
fn floored<'a>(
    replay: Replay<'a>,
    ahead: &mut Vec<(bool, &'a str, Position<'a>)>,
    key: (bool, &'a str, Position<'a>),
) -> Option<Replay<'a>> {
    if !matches!(replay, Replay::Ahead) {
        return Some(replay);
    }
    if ahead.len() >= floors::MAX_PER_SOCKET {
        return None;
    }
    ahead.push(key);
    Some(replay)
}

/// Offers `message` (of `key`, if it is a result) to each socket of `ids`:
/// the one loop both public and group delivery run.
fn offer_each<'a>(
    connections: &Connections,
    ids: impl IntoIterator<Item = &'a SocketId>,
    message: &Message,
    key: Option<FrameKey<'_>>,
    wakes: &mut Wakes,
) -> Delivery {
    let mut delivery = Delivery::default();
    for id in ids {
        if let Some(socket) = connections.get(*id) {
            match socket.outbox.offer(message.clone(), key, wakes.pending()) {
                Offer::Queued => delivery.queued += 1,
                Offer::Conflated { replaced } | Offer::Throttled { replaced } => {
                    delivery.queued += 1;
                    delivery.conflated += replaced;
                }
                Offer::Full => delivery.slow.push(*id),
                Offer::Gone => {}
            }
        }
    }
    delivery
}

/// One socket's place in the hub. Dropping it removes the socket, and its
/// group with it when it was the last, whatever way the session ended.
#[derive(Debug)]
pub struct Membership {
    hub: Hub,
    id: SocketId,
    /// Its outbox's rate limits.
    rates: outbox::Rates,
    _admission: Admission,
}

impl Membership {
    /// This socket's id (for logs).
    #[must_use]
    pub fn id(&self) -> SocketId {
        self.id
    }

    /// Adds symbols, each limited to one result per `max_rate` interval
    /// (or unlimited); returns the whole set and the snapshots of what is new.
    pub fn subscribe(
        &self,
        symbols: &[String],
        max_rate: Option<Duration>,
    ) -> Result<Subscribed, SubscribeError> {
        self.hub
            .subscribe(self.id, symbols, (&self.rates, max_rate))
    }

    /// Removes symbols; returns the whole remaining set.
    pub fn unsubscribe(&self, symbols: &[String]) -> Subscribed {
        let unsubscribed = self.hub.unsubscribe(self.id, symbols);
        let everything = unsubscribed.symbols.iter().any(|s| s == ALL_SYMBOLS);
        self.rates.unsubscribe(symbols, everything);
        unsubscribed
    }

    /// Ends the hold of a socket joined to resume: it goes live, subscribed
    /// to `last_seen.symbols` (else its initial set), and the returned
    /// frames (what it missed since `last_seen`) must be sent before
    /// anything its outbox receives.
    pub fn resume(&self, last_seen: &LastSeen) -> Result<Resumed, ResumeError> {
        self.hub.resume(self.id, last_seen, false)
    }

    /// [`Membership::resume`], then the latest result of every subscribed
    /// public symbol `last_seen` does not name (within the same bounds): how
    /// an event stream starts.
    pub fn resume_with_latest(&self, last_seen: &LastSeen) -> Result<Resumed, ResumeError> {
        self.hub.resume(self.id, last_seen, true)
    }

    /// Ends the hold of a socket joined to resume, without resuming; false
    /// when it was not held.
    pub fn go_live(&self) -> bool {
        self.hub.go_live(self.id)
    }

    /// The most symbols a socket may subscribe to (`websocket.max_symbols`).
    #[must_use]
    pub fn max_symbols(&self) -> usize {
        self.hub.inner.limits.max_symbols
    }

    /// Whether the socket is held, waiting for its resume request.
    #[must_use]
    pub fn is_held(&self) -> bool {
        self.hub.state().held.contains_key(&self.id)
    }

    /// The process-wide counters, for the session to count its own events.
    #[must_use]
    pub fn stats(&self) -> &Stats {
        &self.hub.inner.stats
    }

    /// The socket's current subscriptions, sorted.
    #[must_use]
    pub fn subscriptions(&self) -> Vec<String> {
        self.hub.state().subscriptions_of(self.id)
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.state().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    fn limits(send_queue: usize) -> HubLimits {
        HubLimits {
            send_queue,
            send_queue_bytes: 1 << 20,
            conflate: false,
            max_symbols: 10,
            max_sockets_per_client: 4,
            max_snapshots: 100,
            history_size: 16,
            history_bytes: 1 << 20,
            resume_frames_per_second: 100_000,
            connects_per_client_per_second: 1_000,
        }
    }

    fn hub(send_queue: usize) -> Hub {
        Hub::new(limits(send_queue), Arc::new(Stats::default()))
    }

    fn join(hub: &Hub, client: &str, subscriptions: &[&str]) -> (Membership, Outbox) {
        let admission = hub.admit(client).expect("admitted");
        hub.join(admission, &strings(subscriptions), false)
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn text(message: Message) -> String {
        match message {
            Message::Text(t) => t.to_string(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn public_frames_reach_subscribers_once() {
        let hub = hub(8);
        let (_all, mut all_rx) = join(&hub, "a", &["*", "AAPL"]);
        let (_aapl, mut aapl_rx) = join(&hub, "b", &["AAPL"]);
        let (_msft, mut msft_rx) = join(&hub, "c", &["MSFT"]);
        hub.publish_public("AAPL", "f1".into());
        assert_eq!(text(all_rx.recv().await.expect("frame")), "f1");
        assert!(
            all_rx.try_recv().is_none(),
            "a socket in * and AAPL gets one copy"
        );
        assert_eq!(text(aapl_rx.recv().await.expect("frame")), "f1");
        assert!(msft_rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn group_messages_reach_every_socket_of_the_group_only() {
        let hub = hub(8);
        let (_a1, mut a1) = join(&hub, "acme", &[]);
        let (_a2, mut a2) = join(&hub, "acme", &[]);
        let (_b, mut b) = join(&hub, "other", &["*"]);
        assert_eq!(hub.send_to_group("acme", Message::Text("hi".into())), 2);
        assert_eq!(text(a1.recv().await.expect("frame")), "hi");
        assert_eq!(text(a2.recv().await.expect("frame")), "hi");
        assert!(b.try_recv().is_none());
        assert_eq!(hub.send_to_group("nobody", Message::Text("x".into())), 0);
    }

    #[test]
    fn group_disappears_with_its_last_socket() {
        let hub = hub(8);
        let (first, _rx1) = join(&hub, "acme", &["AAPL"]);
        let (second, _rx2) = join(&hub, "acme", &["*"]);
        assert_eq!((hub.group_count(), hub.group_size("acme")), (1, 2));
        drop(first);
        assert_eq!(hub.group_size("acme"), 1);
        drop(second);
        assert_eq!((hub.group_count(), hub.socket_count()), (0, 0));
        assert!(hub.state().subscriptions.is_empty());
    }

    /// Everything queued in `outbox` now, as text.
    fn queued(outbox: &mut Outbox) -> Vec<String> {
        std::iter::from_fn(|| outbox.try_recv()).map(text).collect()
    }

    #[test]
    fn subscribe_returns_sorted_set_and_queues_snapshots_of_new_symbols() {
        let hub = hub(8);
        hub.publish_public("MSFT", "m".into());
        hub.publish_public("AAPL", "a".into());
        let (socket, mut rx) = join(&hub, "acme", &["MSFT"]);
        let got = socket
            .subscribe_now(&strings(&["ZZZ", "AAPL", "MSFT"]))
            .expect("subscribe");
        assert_eq!(got.symbols, strings(&["AAPL", "MSFT", "ZZZ"]));
        assert_eq!(got.snapshots, 1);
        assert_eq!(queued(&mut rx), ["a"], "MSFT was not new, ZZZ has none");
        let got = socket.unsubscribe(&strings(&["MSFT", "nope"]));
        assert_eq!(got.symbols, strings(&["AAPL", "ZZZ"]));
    }

    #[test]
    fn snapshots_are_kept_for_at_most_max_snapshots_symbols() {
        let hub = Hub::new(
            HubLimits {
                max_snapshots: 2,
                ..limits(8)
            },
            Arc::new(Stats::default()),
        );
        for symbol in ["A", "B", "C"] {
            hub.publish_public(symbol, Utf8Bytes::from_static("old"));
        }
        hub.publish_public("A", Utf8Bytes::from_static("new"));
        hub.remember_latest("D", Utf8Bytes::from_static("stored"));
        let (socket, mut rx) = join(&hub, "acme", &[]);
        socket
            .subscribe_now(&strings(&["A", "B", "C", "D"]))
            .expect("subscribed");
        let mut got = queued(&mut rx);
        got.sort();
        assert_eq!(
            got,
            ["new", "old"],
            "A updated, B kept, C and D over the bound"
        );
    }

    #[test]
    fn snapshots_stay_within_the_outbox_bounds_however_often_asked() {
        let stats = Arc::new(Stats::default());
        let hub = Hub::new(
            HubLimits {
                max_snapshots: 1000,
                ..limits(16)
            },
            stats.clone(),
        );
        for i in 0..100 {
            hub.publish_public(&format!("S{i}"), format!("snapshot {i}").into());
        }
        let (socket, mut rx) = join(&hub, "acme", &[]);
        for _ in 0..20 {
            socket.subscribe_now(&strings(&["*"])).expect("subscribed");
            socket.unsubscribe(&strings(&["*"]));
        }
        assert_eq!(
            queued(&mut rx).len(),
            8,
            "never more than half of what the outbox holds"
        );
        assert_eq!(stats.snapshots_skipped.load(Relaxed), 20 * 100 - 8);
        assert_eq!(
            hub.socket_count(),
            1,
            "a full outbox from snapshots evicts nobody"
        );
        // Once drained, the socket still gets live frames.
        hub.send_to_group("acme", Message::Text("live".into()));
        assert_eq!(queued(&mut rx), ["live"]);
    }

    #[test]
    fn a_frame_larger_than_any_outbox_is_refused_without_evicting_anyone() {
        let stats = Arc::new(Stats::default());
        let hub = Hub::new(
            HubLimits {
                send_queue_bytes: 64,
                ..limits(8)
            },
            stats.clone(),
        );
        let (_a1, mut a1) = join(&hub, "acme", &["*"]);
        let (_a2, mut a2) = join(&hub, "acme", &["*"]);
        let huge = "x".repeat(65);
        assert_eq!(
            hub.send_to_group("acme", Message::Text(huge.as_str().into())),
            0
        );
        hub.publish_public("A", huge.as_str().into());
        assert_eq!(stats.frames_too_large.load(Relaxed), 2);
        assert_eq!(stats.slow_consumer_closes.load(Relaxed), 0);
        assert_eq!(hub.group_size("acme"), 2, "nobody evicted");
        assert!(
            hub.state().snapshots.len() == 0,
            "not kept as a snapshot either"
        );
        assert_eq!(hub.send_to_group("acme", Message::Text("ok".into())), 2);
        assert_eq!(queued(&mut a1), ["ok"]);
        assert_eq!(queued(&mut a2), ["ok"]);
    }

    #[test]
    fn subscription_limit_is_enforced_atomically() {
        let hub = Hub::new(
            HubLimits {
                max_symbols: 2,
                ..limits(8)
            },
            Arc::new(Stats::default()),
        );
        let (socket, _rx) = join(&hub, "acme", &["A"]);
        assert_eq!(
            socket.subscribe_now(&strings(&["B", "C"])),
            Err(SubscribeError::TooManySymbols(2))
        );
        assert_eq!(socket.subscriptions(), strings(&["A"]));
        assert!(socket.subscribe_now(&strings(&["B", "A"])).is_ok());
    }

    #[tokio::test]
    async fn a_full_outbox_evicts_only_that_socket() {
        let stats = Arc::new(Stats::default());
        let hub = Hub::new(limits(2), stats.clone());
        let (_slow, mut slow_rx) = join(&hub, "acme", &["*"]);
        let (_fast, mut fast_rx) = join(&hub, "acme", &["*"]);
        for i in 0..3 {
            hub.publish_public("A", format!("{i}").into());
            // The fast socket keeps up.
            assert_eq!(text(fast_rx.recv().await.expect("frame")), format!("{i}"));
        }
        assert_eq!(stats.slow_consumer_closes.load(Relaxed), 1);
        assert_eq!(hub.group_size("acme"), 1);
        // The slow socket still gets what was queued, then its outbox ends.
        assert_eq!(text(slow_rx.recv().await.expect("frame")), "0");
        assert_eq!(text(slow_rx.recv().await.expect("frame")), "1");
        assert!(slow_rx.recv().await.is_none());
    }

    #[test]
    fn a_conflating_socket_is_kept_with_the_latest_of_each_key() {
        let stats = Arc::new(Stats::default());
        let hub = Hub::new(
            HubLimits {
                conflate: true,
                ..limits(2)
            },
            stats.clone(),
        );
        let (_socket, mut outbox) = join(&hub, "acme", &["*"]);
        for seq in 1..=5 {
            result(&hub, None, seq, "e1");
        }
        result(&hub, Some("acme"), 1, "e1");
        assert_eq!(hub.socket_count(), 1, "kept");
        assert_eq!(stats.frames_conflated.load(Relaxed), 2, "A3 and A4 skipped");
        let mut batch = Vec::new();
        let mut take = || {
            batch.clear();
            let taken = outbox
                .recv_many(&mut batch, 10)
                .now_or_never()
                .expect("queued");
            let mut texts: Vec<String> = batch.drain(..).map(text).collect();
            texts.sort();
            (texts, taken.conflated)
        };
        assert_eq!(take(), (strings(&["A1", "A2"]), false));
        assert_eq!(take(), (strings(&["A5", "acme1"]), true));
        // A direct message has no key: to a full conflating socket it is
        // not dropped but ends the socket.
        for seq in 6..=8 {
            result(&hub, None, seq, "e1");
        }
        assert_eq!(hub.send_to_group("acme", Message::Text("direct".into())), 0);
        assert_eq!(stats.slow_consumer_closes.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn the_byte_bound_evicts_too() {
        let stats = Arc::new(Stats::default());
        let hub = Hub::new(
            HubLimits {
                send_queue_bytes: 16,
                ..limits(100)
            },
            stats.clone(),
        );
        let (_socket, mut outbox) = join(&hub, "acme", &["*"]);
        for _ in 0..3 {
            hub.publish_public("A", "123456".into());
        }
        assert_eq!(stats.slow_consumer_closes.load(Relaxed), 1, "18 bytes > 16");
        assert_eq!(text(outbox.recv().await.expect("frame")), "123456");
        assert_eq!(text(outbox.recv().await.expect("frame")), "123456");
        assert!(outbox.recv().await.is_none());
    }

    #[tokio::test]
    async fn draining_the_outbox_frees_its_byte_budget() {
        let hub = Hub::new(
            HubLimits {
                send_queue_bytes: 16,
                ..limits(100)
            },
            Arc::new(Stats::default()),
        );
        let (_socket, mut outbox) = join(&hub, "acme", &["*"]);
        // Two frames fit, three do not: only draining lets a hundred through.
        for _ in 0..100 {
            hub.publish_public("A", "123456".into());
            assert_eq!(text(outbox.recv().await.expect("frame")), "123456");
        }
        assert_eq!(hub.socket_count(), 1);
    }

    #[tokio::test]
    async fn a_hold_defers_waking_sessions_until_it_is_dropped() {
        let hub = hub(8);
        let (_socket, mut outbox) = join(&hub, "acme", &["*"]);
        let session = tokio::spawn(async move {
            let mut batch = Vec::new();
            outbox.recv_many(&mut batch, 8).await;
            batch.len()
        });
        tokio::task::yield_now().await;
        let hold = hub.hold_wakes();
        hub.publish_public("A", "1".into());
        hub.publish_public("B", "2".into());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!session.is_finished(), "woken while the hold was open");
        drop(hold);
        assert_eq!(
            session.await.expect("session ran"),
            2,
            "one wake, both frames"
        );
    }

    impl Membership {
        fn subscribe_now(&self, symbols: &[String]) -> Result<Subscribed, SubscribeError> {
            self.subscribe(symbols, None)
        }
    }

    fn result(hub: &Hub, client: Option<&str>, seq: u64, epoch: &str) {
        let frame = format!("{}{seq}", client.unwrap_or("A"));
        hub.deliver_result("A", client, Some(Position { seq, epoch }), frame.into());
    }

    fn last_seen(public: &[(&str, u64)], private: &[(&str, u64)]) -> LastSeen {
        let map = |keys: &[(&str, u64)]| {
            let mut map = crate::protocol::LastSeenMap::new();
            for (epoch, seq) in keys {
                map.entry((*epoch).to_owned())
                    .or_default()
                    .insert("A".to_owned(), *seq);
            }
            map
        };
        LastSeen {
            public: map(public),
            private: map(private),
            symbols: None,
        }
    }

    #[test]
    fn a_held_socket_gets_nothing_until_it_resumes_then_what_it_missed_first() {
        let hub = hub(64);
        for seq in 1..=3 {
            result(&hub, None, seq, "e1");
            result(&hub, Some("acme"), seq, "e1");
        }
        let admission = hub.admit("acme").expect("admitted");
        let (socket, mut outbox) = hub.join(admission, &strings(&["*"]), true);
        assert!(socket.is_held());
        assert_eq!(socket.subscriptions(), ["*"], "its set, before it is live");
        result(&hub, None, 4, "e1");
        hub.send_to_group("acme", Message::Text("direct".into()));
        assert!(outbox.try_recv().is_none(), "held: nothing queued");
        let resumed = socket
            .resume(&last_seen(&[("e1", 2)], &[("e1", 1)]))
            .expect("it was held");
        let frames: Vec<&str> = resumed.frames.iter().map(Utf8Bytes::as_str).collect();
        assert_eq!(frames, ["A3", "A4", "acme2", "acme3"]);
        assert_eq!(resumed.replayed, 4);
        assert_eq!(
            socket.resume(&LastSeen::default()),
            Err(ResumeError::NotHeld),
            "once only"
        );
        result(&hub, None, 5, "e1");
        assert_eq!(queued(&mut outbox), ["A5"], "then live");
    }

    #[test]
    fn results_a_socket_saw_on_a_gateway_ahead_are_not_sent_again() {
        let hub = hub(64);
        result(&hub, None, 1, "e1");
        let admission = hub.admit("acme").expect("admitted");
        let (socket, mut outbox) = hub.join(admission, &strings(&["A"]), true);
        let resumed = socket
            .resume(&last_seen(&[("e1", 3)], &[("e0", 9)]))
            .expect("it was held");
        assert_eq!(resumed.frames, Vec::<Utf8Bytes>::new());
        assert_eq!(resumed.unrecovered_private, ["A"], "unknown here");
        assert!(resumed.unrecovered_public.is_empty(), "ahead is not a gap");
        for seq in 2..=4 {
            result(&hub, None, seq, "e1");
        }
        assert_eq!(queued(&mut outbox), ["A4"], "2 and 3 it had seen");
        assert!(hub.state().floors.is_empty(), "the floor went once passed");
    }

    #[test]
    fn a_result_its_key_already_had_reaches_no_socket_again() {
        let hub = hub(64);
        let (_socket, mut outbox) = join(&hub, "acme", &["A"]);
        for seq in [1, 2, 2, 1, 3] {
            result(&hub, None, seq, "e1");
        }
        result(&hub, None, 1, "e2");
        assert_eq!(
            queued(&mut outbox),
            ["A1", "A2", "A3", "A1"],
            "repeats dropped; a new epoch starts over"
        );
        assert_eq!(hub.inner.stats.results_repeated.load(Relaxed), 2);
    }

    #[test]
    fn a_forged_result_far_ahead_does_not_silence_its_key() {
        let hub = hub(64);
        let (_socket, mut outbox) = join(&hub, "acme", &["A"]);
        result(&hub, None, 1, "e1");
        let forged = Position {
            seq: u64::MAX,
            epoch: "e1",
        };
        hub.deliver_result("A", None, Some(forged), "forged".into());
        result(&hub, None, 2, "e1");
        result(&hub, None, 3, "e1");
        assert_eq!(queued(&mut outbox), ["A1", "forged", "A2", "A3"]);
        let seen = Position {
            seq: 2,
            epoch: "e1",
        };
        assert!(
            matches!(hub.state().history.replay(None, "A", seen), Replay::Recovered(ref f) if f.len() == 1),
            "the history starts over from the real results"
        );
    }

    #[test]
    fn a_resume_that_claims_to_be_ahead_on_many_keys_gets_few_floors() {
        let limits = HubLimits {
            max_snapshots: 1000,
            ..limits(1024)
        };
        let hub = Hub::new(limits, Arc::new(Stats::default()));
        let keys = floors::MAX_PER_SOCKET + 10;
        let symbols: Vec<String> = (0..keys).map(|k| format!("S{k}")).collect();
        for symbol in &symbols {
            let frame = format!("{symbol}-1");
            hub.deliver_result(
                symbol,
                None,
                Some(Position {
                    seq: 1,
                    epoch: "e1",
                }),
                frame.into(),
            );
        }
        let admission = hub.admit("acme").expect("admitted");
        let (socket, _outbox) = hub.join(admission, &strings(&["*"]), true);
        let mut claimed = LastSeen::default();
        let ahead = symbols.iter().map(|symbol| (symbol.clone(), 2));
        claimed.public.insert("e1".to_owned(), ahead.collect());
        let resumed = socket.resume(&claimed).expect("it was held");
        assert_eq!(
            resumed.unrecovered_public.len(),
            10,
            "past the cap, a key it is ahead on is not recovered"
        );
        assert!(
            resumed.frames.is_empty(),
            "and this node's latest, older than what it saw, is not sent"
        );
        assert_eq!(
            hub.state().floors.by_socket_len(),
            floors::MAX_PER_SOCKET,
            "and no floor"
        );
        drop(socket);
        assert!(hub.state().floors.is_empty(), "they go with the socket");
    }

    #[test]
    fn a_resume_stops_reading_history_once_its_budget_is_spent() {
        // A budget of 8 frames; 50 keys, each 3 results behind.
        let limits = HubLimits {
            max_snapshots: 1000,
            ..limits(8)
        };
        let hub = Hub::new(limits, Arc::new(Stats::default()));
        let symbols: Vec<String> = (0..50).map(|k| format!("S{k:02}")).collect();
        for symbol in &symbols {
            for seq in 1..=4 {
                let frame = format!("{symbol}-{seq}");
                let epoch = "e1";
                hub.deliver_result(symbol, None, Some(Position { seq, epoch }), frame.into());
            }
        }
        let admission = hub.admit("acme").expect("admitted");
        let (socket, _outbox) = hub.join(admission, &strings(&["*"]), true);
        let mut claimed = LastSeen::default();
        let behind = symbols.iter().map(|symbol| (symbol.clone(), 1));
        // Named after the budget is spent: one up to date, one the client
        // saw further on another gateway. Neither is a gap.
        let (up_to_date, ahead) = (("U1".to_owned(), 4), ("U2".to_owned(), 6));
        for symbol in ["U1", "U2"] {
            for seq in 1..=4 {
                let frame = format!("{symbol}-{seq}");
                let epoch = "e1";
                hub.deliver_result(symbol, None, Some(Position { seq, epoch }), frame.into());
            }
        }
        let named = behind.chain([up_to_date, ahead]);
        claimed.public.insert("e1".to_owned(), named.collect());
        let reads_before = history::FRAMES_READ.with(std::cell::Cell::get);
        let resumed = socket.resume(&claimed).expect("it was held");
        let frames: Vec<&str> = resumed.frames.iter().map(Utf8Bytes::as_str).collect();
        assert_eq!(
            frames,
            [
                "S00-2", "S00-3", "S00-4", "S01-2", "S01-3", "S01-4", "S02-4", "S03-4"
            ],
            "two keys recovered; the rest get their latest while it fits"
        );
        assert_eq!(resumed.replayed, 6);
        assert_eq!(resumed.unrecovered_public.len(), 48, "S02 to S49 only");
        assert_eq!(hub.state().floors.by_socket_len(), 1, "U2's floor");
        let read = history::FRAMES_READ.with(std::cell::Cell::get) - reads_before;
        assert!(
            read <= 2 * 8,
            "{read} missed results read: no more than the budget, twice"
        );
    }

    #[test]
    fn keys_without_results_for_the_idle_period_are_released_everywhere() {
        let hub = hub(64);
        let epoch = "e1";
        for seq in 1..=3 {
            result(&hub, None, seq, epoch);
            result(&hub, Some("acme"), seq, epoch);
        }
        hub.deliver_result("B", None, Some(Position { seq: 1, epoch }), "B1".into());
        // A socket ahead on A (from another gateway) holds a floor on it.
        let admission = hub.admit("acme").expect("admitted");
        let (socket, _outbox) = hub.join(admission, &strings(&["*"]), true);
        socket
            .resume(&last_seen(&[(epoch, 4)], &[]))
            .expect("it was held");
        assert!(!hub.state().floors.is_empty());
        // B has a result in every sweep; A (public and private) none.
        for sweep in 1..=crate::idle::SWEEPS_PER_IDLE {
            assert_eq!(hub.release_idle(), 0, "sweep {sweep}: not idle yet");
            let seq = u64::from(sweep) + 1;
            hub.deliver_result("B", None, Some(Position { seq, epoch }), "B".into());
        }
        assert_eq!(hub.release_idle(), 2, "A, public and private");
        let state = hub.state();
        assert!(state.snapshots.get("A").is_none(), "its snapshot went");
        assert!(state.snapshots.get("B").is_some());
        assert!(state.floors.is_empty(), "and the floor on it");
        let seen = Position { seq: 2, epoch };
        assert!(matches!(
            state.history.replay(None, "A", seen),
            Replay::Gap(None)
        ));
        assert!(matches!(
            state.history.replay(Some("acme"), "A", seen),
            Replay::Gap(None)
        ));
        assert_eq!(hub.inner.stats.history_keys_released.load(Relaxed), 2);
    }

    #[test]
    fn a_client_code_s_resumes_share_an_allowance_of_frames() {
        // One frame a second: a second passes before the allowance refills.
        let limits = HubLimits {
            resume_frames_per_second: 1,
            ..limits(64)
        };
        let hub = Hub::new(limits, Arc::new(Stats::default()));
        for seq in 1..=8 {
            result(&hub, None, seq, "e1");
        }
        let resume = || {
            let admission = hub.admit("acme").expect("admitted");
            let (socket, _outbox) = hub.join(admission, &strings(&["A"]), true);
            socket
                .resume(&last_seen(&[("e1", 0)], &[]))
                .map(|r| r.frames.len())
        };
        assert_eq!(
            resume(),
            Ok(1),
            "eight missed do not fit: the latest stands in"
        );
        assert_eq!(
            resume(),
            Err(ResumeError::RateLimited(1)),
            "spent, on a new socket as on the same"
        );
        let other = hub.admit("other").expect("admitted");
        let (socket, _outbox) = hub.join(other, &strings(&["A"]), true);
        assert!(
            socket.resume(&last_seen(&[("e1", 0)], &[])).is_ok(),
            "another client code has its own"
        );
    }

    #[test]
    fn admission_limits_sockets_per_client_and_is_released_on_drop() {
        let hub = hub(8);
        let admitted: Vec<Admission> = (0..4)
            .map(|_| hub.admit("acme").expect("admitted"))
            .collect();
        assert_eq!(hub.admit("acme").err(), Some(AdmitError::TooManySockets(4)));
        assert!(hub.admit("other").is_ok(), "the limit is per client code");
        drop(admitted);
        let (membership, _outbox) = join(&hub, "acme", &[]);
        drop(membership);
        assert!(
            hub.state().admissions.is_empty(),
            "no entry outlives its sockets"
        );
    }
}
