//! Results delivered while a [`WakeHold`](super::WakeHold) is open, not yet
//! offered to any socket. The hold defers waking sessions anyway; deferring
//! the offers too lets each socket take the whole burst under one lock of
//! its outbox, instead of one lock (and, with thousands of sockets, one
//! cache miss on a cold outbox) per result. The burst is offered when the
//! hold ends, when it reaches its bound, and before anything else reads or
//! changes the hub, so no request ever sees the hub without it.

use crate::frame::SharedResult;

/// Results in one burst at most. A pub/sub input burst is at most 64
/// messages; a gateway's relayed batch may be more. 256 results of a
/// typical 150 bytes stay far inside any outbox that keeps up.
const MAX_RESULTS: usize = 256;

#[derive(Debug, Default)]
pub(super) struct Burst {
    results: Vec<SharedResult>,
    /// Their payload bytes.
    bytes: usize,
}

impl Burst {
    pub(super) fn push(&mut self, result: SharedResult) {
        self.bytes += result.text().len();
        self.results.push(result);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.results.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    /// Whether the burst must be offered now: it has reached its bound in
    /// results, or in bytes a quarter of an outbox's (so the burst, landing
    /// at once, can never fill the outbox of a socket that keeps up).
    pub(super) fn is_full(&self, outbox_bytes: usize) -> bool {
        self.results.len() >= MAX_RESULTS || self.bytes >= outbox_bytes / 4
    }

    /// The results, in the order they were delivered; the burst is empty
    /// after. Hand the emptied vector back with [`Burst::give_back`].
    pub(super) fn take(&mut self) -> Vec<SharedResult> {
        self.bytes = 0;
        std::mem::take(&mut self.results)
    }

    /// Keeps an emptied vector's capacity: no allocation per burst.
    pub(super) fn give_back(&mut self, mut emptied: Vec<SharedResult>) {
        emptied.clear();
        if self.results.is_empty() {
            self.results = emptied;
        }
    }
}
