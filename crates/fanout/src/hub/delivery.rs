//! Delivery: a result or a direct message offered to every socket that
//! wants it, each session woken once per burst, and a socket whose outbox is
//! full evicted as a slow consumer.

use crate::sync::HubGuard;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Waker;

use tokio_tungstenite::tungstenite::Message;

use super::connections::Connections;
use super::history::Recorded;
use super::pending_wakes::PendingWakes;
use super::seen_ahead::SeenOnKey;
use super::{Hub, SocketId, State};
use crate::frame::{Burst, Frame, SharedResult};
use crate::outbox::Offers;

impl Hub {
    /// Fans out one SMA result: a public one to every socket subscribed to
    /// its symbol (by name or through `"*"`), kept as the symbol's
    /// snapshot; a private one to every socket of its client's group. A
    /// result with a position is kept in its key's history too.
    ///
    /// While a [`WakeHold`] is open the result joins the hold's burst, and
    /// is offered with the rest of it (see [`super::burst`]).
    pub fn deliver_result(&self, frame: SharedResult) {
        if !self.fits_a_socket(frame.text().len()) {
            return;
        }
        let mut state = self.lock();
        state.burst.push(frame);
        if state.wakes.is_held() && !state.burst.is_full(self.inner.limits.send_queue_bytes) {
            return;
        }
        self.offer_burst(&mut state);
        self.wake_unless_held(state);
    }

    /// Offers the results of the burst, in order, to the sockets that want
    /// them, socket by socket: each socket subscribed to every symbol takes
    /// all the burst's public results, and its group's private ones, under
    /// one lock of its outbox; the rest (sockets subscribed by name, a
    /// client's group) are offered each result in turn. Every socket gets
    /// its results in the order they were delivered.
    pub(super) fn offer_burst(&self, state: &mut State) {
        let mut burst = state.burst.take();
        // A result its key already had (the output channel repeated it, or
        // a stale node published it) reaches no socket a second time.
        burst.retain(|frame| {
            let Some(position) = frame.position() else {
                return true;
            };
            let stats = &self.inner.stats;
            match state.history.record(frame, position) {
                Recorded::Kept => true,
                Recorded::NotKept => {
                    stats.history_keys_refused.fetch_add(1, Relaxed);
                    true
                }
                Recorded::Repeat => {
                    stats.results_repeated.fetch_add(1, Relaxed);
                    false
                }
            }
        });
        let limits = &self.inner.limits;
        for frame in burst.iter().filter(|frame| frame.client().is_none()) {
            state.snapshots.remember(frame, limits.max_snapshots);
        }
        let mut delivery = Delivery::default();
        // Each result's floors, looked up once: each socket is then one
        // probe. Sockets resumed from a gateway ahead of this one are rare:
        // without any, nothing is looked up (or allocated).
        let floors: Vec<Option<&SeenOnKey>> = if state.seen_ahead.is_empty() {
            Vec::new()
        } else {
            burst
                .iter()
                .map(|frame| {
                    frame.position()?;
                    state.seen_ahead.of(frame.client(), frame.key())
                })
                .collect()
        };
        let unseen = |index: usize, frame: &SharedResult, id: SocketId| {
            let (Some(Some(floors)), Some(position)) = (floors.get(index), frame.position()) else {
                return true;
            };
            !floors.has_seen(id, position)
        };
        // A socket subscribed to every symbol gets each public result of
        // the burst and its own group's private ones: in one offer, in the
        // burst's order. Only when there is a public result: otherwise its
        // group's results find it below, without a pass over everyone.
        let to_everything = burst.iter().any(is_public_sma);
        if to_everything {
            // The public results are what every such socket takes, unless
            // its group has private ones here or it has seen some (floors):
            // encoded once, and queued whole to each (see [`Burst`]).
            let mut shared: Option<Arc<Burst>> = None;
            // The groups with a private SMA result here: their sockets on
            // `"*"` take it too, between the public ones.
            let mut private_for: Vec<&str> = (burst.iter())
                .filter(|frame| frame.series_name().is_none())
                .filter_map(|frame| frame.client())
                .collect();
            private_for.sort_unstable();
            private_for.dedup();
            for &id in state.subscriptions.to_everything() {
                let Some(socket) = state.connections.get(id) else {
                    continue;
                };
                let takes_all =
                    floors.is_empty() && private_for.binary_search(&&*socket.group).is_err();
                if takes_all
                    && let Some(offers) = socket.outbox.offer_burst(
                        shared.get_or_insert_with(|| Arc::new(public_burst(&burst))),
                        state.wakes.pending(),
                    )
                {
                    delivery.count(id, offers);
                    continue;
                }
                let wanted = burst
                    .iter()
                    .enumerate()
                    .filter(|(index, frame)| {
                        frame.series_name().is_none()
                            && frame.client().is_none_or(|code| *code == *socket.group)
                            && unseen(*index, frame, id)
                    })
                    .map(|(_, frame)| frame);
                let offers = socket.outbox.offer_results(wanted, state.wakes.pending());
                delivery.count(id, offers);
            }
        }
        // Everyone else, result by result: sockets subscribed by name, and
        // the group of a private result.
        for (index, frame) in burst.iter().enumerate() {
            let message = Frame::Result(frame.clone());
            let (connections, subscriptions) = (&state.connections, &state.subscriptions);
            let pending = state.wakes.pending();
            let mut offer_to = |id: SocketId| {
                if !unseen(index, frame, id) || delivery.slow.contains(&id) {
                    return;
                }
                if let Some(socket) = connections.get(id) {
                    let offer = socket.outbox.offer(message.clone(), pending);
                    delivery.count(id, Offers::from(offer));
                }
            };
            match (frame.client(), frame.series_name()) {
                (None, None) => subscriptions
                    .by_name_only(frame.key())
                    .for_each(|&id| offer_to(id)),
                (Some(code), None) => connections
                    .group(code)
                    .iter()
                    .filter(|&&id| !(to_everything && subscriptions.is_to_everything(id)))
                    .for_each(|&id| offer_to(id)),
                // A series' results, public or private, go to the sockets
                // subscribed to their key (by name or through the series'
                // wildcard); a private one only within its client's group.
                (client, Some(series)) => subscriptions
                    .by_name_only(frame.key())
                    .chain(subscriptions.to_everything_in(series))
                    .filter(|&&id| {
                        client.is_none_or(|code| {
                            connections
                                .get(id)
                                .is_some_and(|socket| *socket.group == *code)
                        })
                    })
                    .for_each(|&id| offer_to(id)),
            }
        }
        drop(floors);
        if !state.seen_ahead.is_empty() {
            for frame in &burst {
                if let Some(position) = frame.position() {
                    state
                        .seen_ahead
                        .passed(frame.client(), frame.key(), position);
                }
            }
        }
        state.burst.give_back(burst);
        self.finish_delivery(state, delivery);
    }

    /// [`Hub::deliver_result`] for a public result without a position.
    #[cfg(test)]
    pub fn publish_public(&self, symbol: &str, frame: &str) {
        self.deliver_result(SharedResult::detached(frame.into(), symbol, None, None));
    }

    /// Keeps `frame`, a public result, as its symbol's snapshot without
    /// delivering it: a gateway seeding snapshots that compute nodes stored
    /// in Redis.
    pub fn remember_latest(&self, frame: SharedResult) {
        if frame.client().is_some() || !self.fits_a_socket(frame.text().len()) {
            return;
        }
        self.state()
            .snapshots
            .remember(&frame, self.inner.limits.max_snapshots);
    }

    /// Delivers `message` to every socket of the group `client` — the seed's
    /// `send_message(client_code, message)`. Returns how many sockets got it.
    pub fn send_to_group(&self, client: &str, message: Message) -> usize {
        let frame = Frame::Direct(message);
        if !self.fits_a_socket(frame.payload_len()) {
            return 0;
        }
        let mut guard = self.state();
        let state = &mut *guard;
        // A direct message has no key: it is never conflated away.
        let delivery = offer_each(
            &state.connections,
            state.connections.group(client),
            &frame,
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

    /// PendingWakes the sessions frames were queued for, unless a hold defers it.
    /// Outside the hub's lock: thousands of wakes would keep joins and
    /// subscribes waiting.
    pub(super) fn wake_unless_held(&self, mut state: HubGuard<'_, State>) {
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
}

/// What one delivery did: frames queued, frames a newer one of their key
/// replaced, and the sockets found full.
#[derive(Debug, Default)]
struct Delivery {
    queued: u64,
    conflated: u64,
    /// A set: the burst's per-result loop asks it once per offer, and many
    /// sockets may fall behind in one burst (allocated only when one does).
    slow: hashbrown::HashSet<SocketId>,
}

impl Delivery {
    fn count(&mut self, id: SocketId, offers: Offers) {
        self.queued += offers.queued;
        self.conflated += offers.conflated;
        if offers.full {
            self.slow.insert(id);
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

/// Whether `frame` is a public SMA result: what every socket on `"*"` takes.
fn is_public_sma(frame: &SharedResult) -> bool {
    frame.client().is_none() && frame.series_name().is_none()
}

/// The public SMA results of `burst`: what a socket subscribed to `"*"`
/// takes of it when its group has no private SMA result in it.
fn public_burst(burst: &[SharedResult]) -> Burst {
    Burst::new(
        burst
            .iter()
            .filter(|frame| is_public_sma(frame))
            .cloned()
            .collect(),
    )
}

/// Offers `frame` to each socket of `ids`.
fn offer_each<'a>(
    connections: &Connections,
    ids: impl IntoIterator<Item = &'a SocketId>,
    frame: &Frame,
    wakes: &mut PendingWakes,
) -> Delivery {
    let mut delivery = Delivery::default();
    for &id in ids {
        if let Some(socket) = connections.get(id) {
            let offer = socket.outbox.offer(frame.clone(), wakes.pending());
            delivery.count(id, Offers::from(offer));
        }
    }
    delivery
}
