//! The latest public result of each symbol: what a new subscriber gets
//! first. Bounded in symbols (`sma.max_keys`).

use hashbrown::HashMap;

use crate::idle::is_idle;

use crate::frame::SharedResult;

#[derive(Debug, Default)]
pub(super) struct Snapshots {
    /// Each symbol's latest result, and the sweep it came in.
    latest: HashMap<Box<str>, (SharedResult, u32)>,
    /// Sweeps so far (see [`Snapshots::release_idle`]).
    sweep: u32,
}

impl Snapshots {
    /// Keeps `frame` as its symbol's snapshot, unless that would make more
    /// than `max` symbols (the result is still delivered, just not kept).
    pub(super) fn remember(&mut self, frame: &SharedResult, max: usize) {
        let symbol = frame.symbol();
        let room = self.latest.len() < max;
        match self.latest.get_mut(symbol) {
            Some(latest) => *latest = (frame.clone(), self.sweep),
            None if room => {
                self.latest
                    .insert(symbol.into(), (frame.clone(), self.sweep));
            }
            None => {}
        }
    }

    pub(super) fn get(&self, symbol: &str) -> Option<&SharedResult> {
        self.latest.get(symbol).map(|(frame, _)| frame)
    }

    /// Every symbol's snapshot.
    pub(super) fn iter(&self) -> impl Iterator<Item = &SharedResult> {
        self.latest.values().map(|(frame, _)| frame)
    }

    /// Starts a new sweep and forgets every symbol whose latest result came
    /// [`SWEEPS_PER_IDLE`](crate::idle::SWEEPS_PER_IDLE) whole sweeps ago
    /// or earlier; returns how many.
    pub(super) fn release_idle(&mut self) -> usize {
        self.sweep = self.sweep.wrapping_add(1);
        let sweep = self.sweep;
        let before = self.latest.len();
        self.latest
            .retain(|_, (_, touched)| !is_idle(*touched, sweep));
        before - self.latest.len()
    }

    pub(super) fn len(&self) -> usize {
        self.latest.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_replaces_and_new_symbols_stop_at_the_bound() {
        let mut snapshots = Snapshots::default();
        snapshots.remember(&SharedResult::detached("a1".into(), "A", None, None), 2);
        snapshots.remember(&SharedResult::detached("b1".into(), "B", None, None), 2);
        snapshots.remember(&SharedResult::detached("c1".into(), "C", None, None), 2);
        snapshots.remember(&SharedResult::detached("a2".into(), "A", None, None), 2);
        assert_eq!(snapshots.len(), 2);
        assert_eq!(snapshots.get("A").map(SharedResult::as_str), Some("a2"));
        assert!(snapshots.get("C").is_none(), "over the bound: not kept");
    }
}
