//! Sessions with newly queued frames, woken in one go: right after a
//! delivery, or when the last [`WakeHold`](super::WakeHold) ends.

use std::task::Waker;

use crate::outbox::{Offered, QueuedBytes};

#[derive(Debug, Default)]
pub(super) struct PendingWakes {
    /// Sessions with newly queued frames, not yet woken, and the bytes
    /// queued for them, not yet in the gauge.
    pending: Offered,
    /// Open holds; while there are any, `pending` waits.
    holds: usize,
}

impl PendingWakes {
    /// Where an offer notes the session it queued for.
    pub(super) fn pending(&mut self) -> &mut Offered {
        &mut self.pending
    }

    /// Adds the bytes offers queued to `gauge`: at once, held or not.
    pub(super) fn settle(&mut self, gauge: &QueuedBytes) {
        self.pending.settle(gauge);
    }

    /// Whether a hold is open.
    pub(super) fn is_held(&self) -> bool {
        self.holds > 0
    }

    pub(super) fn hold(&mut self) {
        self.holds += 1;
    }

    pub(super) fn release(&mut self) {
        self.holds -= 1;
    }

    /// The sessions to wake now: none while held.
    pub(super) fn take_due(&mut self) -> Option<Vec<Waker>> {
        if self.holds > 0 || self.pending.wakes.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut self.pending.wakes))
    }

    /// Gives an emptied list back, so waking allocates nothing once warm.
    pub(super) fn give_back(&mut self, emptied: Vec<Waker>) {
        if self.pending.wakes.is_empty() {
            self.pending.wakes = emptied;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_due_while_held() {
        let mut wakes = PendingWakes::default();
        assert!(wakes.take_due().is_none(), "nothing pending");
        wakes.pending().wakes.push(Waker::noop().clone());
        wakes.hold();
        assert!(wakes.take_due().is_none(), "held");
        wakes.release();
        let due = wakes.take_due().expect("due once released");
        assert_eq!(due.len(), 1);
        assert!(wakes.take_due().is_none(), "taken");
    }
}
