//! One socket's place in the hub ([`Membership`]) and the requests it makes
//! of it: subscribe, unsubscribe, resume.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::{Admission, Hub, ResumeError, Resumed, SocketId, SubscribeError, Subscribed};
use crate::names::StreamName;
use crate::outbox;
use crate::protocol::LastSeen;
use crate::stats::Stats;

impl Hub {
    pub(super) fn subscribe(
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
        // A new wildcard brings its series' every snapshot; a key named
        // beside a new wildcard of its series is among those already.
        let wildcards: Vec<Option<&str>> = new
            .iter()
            .map(|s| StreamName::split(s))
            .filter(|name| name.is_wildcard())
            .map(|name| name.series)
            .collect();
        let latest = &state.snapshots;
        let named = new.iter().filter(|s| {
            let name = StreamName::split(s);
            !name.is_wildcard() && !wildcards.contains(&name.series)
        });
        let wanted = wildcards
            .iter()
            .map(|series| latest.len_in(*series))
            .sum::<usize>()
            + named
                .clone()
                .filter(|s| latest.get(s.as_str()).is_some())
                .count();
        let frames = wildcards
            .iter()
            .flat_map(|series| latest.iter_in(*series))
            .chain(named.filter_map(|s| latest.get(s.as_str())));
        let snapshots = socket
            .outbox
            .offer_while_room(frames, state.wakes.pending());
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

    pub(super) fn unsubscribe(&self, id: SocketId, symbols: &[String]) -> Subscribed {
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

/// One socket's place in the hub. Dropping it removes the socket, and its
/// group with it when it was the last, whatever way the session ended.
#[derive(Debug)]
pub struct Membership {
    pub(super) hub: Hub,
    pub(super) id: SocketId,
    /// Its outbox's rate limits.
    pub(super) rates: outbox::Rates,
    pub(super) _admission: Admission,
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
        let wildcards: Vec<&String> = (unsubscribed.symbols.iter())
            .filter(|entry| StreamName::split(entry).is_wildcard())
            .collect();
        self.rates.unsubscribe(symbols, |symbol| {
            wildcards
                .iter()
                .any(|wildcard| StreamName::wildcard_covers(wildcard, symbol))
        });
        unsubscribed
    }

    /// Waits for this socket's turn to resume; see [`Hub::resume_turn`].
    pub async fn resume_turn(&self) -> super::ResumeTurn<'_> {
        self.hub.resume_turn().await
    }

    /// Ends the hold of a socket joined to resume: it goes live, subscribed
    /// to `last_seen.symbols` (else its initial set), and the returned
    /// frames (what it missed since `last_seen`) must be sent before
    /// anything its outbox receives.
    pub async fn resume<'a>(&self, last_seen: &'a LastSeen) -> Result<Resumed<'a>, ResumeError> {
        self.hub.resume(self.id, last_seen, false).await
    }

    /// [`Membership::resume`], then the latest result of every subscribed
    /// public symbol `last_seen` does not name (within the same bounds): how
    /// an event stream starts.
    pub async fn resume_with_latest<'a>(
        &self,
        last_seen: &'a LastSeen,
    ) -> Result<Resumed<'a>, ResumeError> {
        self.hub.resume(self.id, last_seen, true).await
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
