//! The latest public result of each key (a symbol's SMA, or a series' key):
//! what a new subscriber gets first. Bounded in keys.

use hashbrown::HashMap;

use crate::idle::is_idle;
use crate::names::StreamName;

use crate::frame::SharedResult;

/// Each key's latest result, and the sweep it came in.
type Latest = HashMap<Box<str>, (SharedResult, u32)>;

#[derive(Debug, Default)]
pub(super) struct Snapshots {
    /// Series (`""` for the SMA) → each key's latest result, and the sweep
    /// it came in: a series' wildcard reads its own keys only.
    by_series: HashMap<Box<str>, Latest>,
    /// Keys kept, in every series.
    len: usize,
    /// Sweeps so far (see [`Snapshots::release_idle`]).
    sweep: u32,
}

impl Snapshots {
    /// Keeps `frame` as its key's snapshot, unless that would make more
    /// than `max` keys (the result is still delivered, just not kept).
    pub(super) fn remember(&mut self, frame: &SharedResult, max: usize) {
        let key = frame.key();
        let room = self.len < max;
        let series = frame.series_name().unwrap_or_default();
        let latest = match self.by_series.get_mut(series) {
            Some(latest) => latest,
            None if room => self.by_series.entry(series.into()).or_default(),
            None => return,
        };
        match latest.get_mut(key) {
            Some(latest) => *latest = (frame.clone(), self.sweep),
            None if room => {
                latest.insert(key.into(), (frame.clone(), self.sweep));
                self.len += 1;
            }
            None => {}
        }
    }

    /// The snapshot of the key named `key`.
    pub(super) fn get(&self, key: &str) -> Option<&SharedResult> {
        let series = StreamName::split(key).series.unwrap_or_default();
        let (frame, _) = self.by_series.get(series)?.get(key)?;
        Some(frame)
    }

    /// Every key's snapshot in `series` (`None`: the SMA's).
    pub(super) fn iter_in(&self, series: Option<&str>) -> impl Iterator<Item = &SharedResult> {
        let latest = self.by_series.get(series.unwrap_or_default());
        latest.into_iter().flatten().map(|(_, (frame, _))| frame)
    }

    /// How many keys `series` has a snapshot of.
    pub(super) fn len_in(&self, series: Option<&str>) -> usize {
        self.by_series
            .get(series.unwrap_or_default())
            .map_or(0, HashMap::len)
    }

    /// Starts a new sweep and forgets every key whose latest result came
    /// [`SWEEPS_PER_IDLE`](crate::idle::SWEEPS_PER_IDLE) whole sweeps ago
    /// or earlier; returns how many.
    pub(super) fn release_idle(&mut self) -> usize {
        self.sweep = self.sweep.wrapping_add(1);
        let sweep = self.sweep;
        let before = self.len;
        for latest in self.by_series.values_mut() {
            latest.retain(|_, (_, touched)| !is_idle(*touched, sweep));
        }
        self.by_series.retain(|_, latest| !latest.is_empty());
        self.len = self.by_series.values().map(HashMap::len).sum();
        before - self.len
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::BarState;
    use crate::protocol::Position;

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

    #[test]
    fn each_series_keeps_its_own_keys() {
        let mut snapshots = Snapshots::default();
        let at = Position {
            seq: 1,
            epoch: "e1",
        };
        let candle = SharedResult::series("c1".into(), "candles.1m", "A", None, at, BarState::Open);
        snapshots.remember(&SharedResult::detached("a1".into(), "A", None, None), 9);
        snapshots.remember(&candle, 9);
        assert_eq!(snapshots.get("A").map(SharedResult::as_str), Some("a1"));
        assert_eq!(
            snapshots.get("A@candles.1m").map(SharedResult::as_str),
            Some("c1")
        );
        assert_eq!(snapshots.iter_in(None).count(), 1);
        assert_eq!(snapshots.iter_in(Some("candles.1m")).count(), 1);
        assert_eq!(snapshots.len_in(Some("ema")), 0);
        assert_eq!(snapshots.len(), 2);
    }
}
