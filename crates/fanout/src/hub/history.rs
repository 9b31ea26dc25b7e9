//! The last results of each key, by position: what a socket that comes back
//! is sent to fill the gap it left, as Centrifugo keeps a channel's
//! publications for recovery. Kept where the sockets are, so every gateway
//! of a deployment holds the same history and a client may come back to any.
//!
//! Bounded three ways: `size` results per key, `max_keys` keys, and
//! `max_bytes` in all. Past the byte bound, each new result makes its own
//! key give up its two oldest, so the keys that fill the history are the
//! ones that shrink, and each keeps at least its latest result.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

// hashbrown's default hasher (foldhash, seeded at random): several lookups
// per result happen under the hub's lock.
use hashbrown::HashMap;

use crate::frame::SharedResult;
use crate::idle::is_idle;
use crate::protocol::Position;

/// What one kept result costs beyond its frame's bytes: its slot in the
/// ring and the shared text's header.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<(u64, SharedResult)>() + 32;

/// What the history holds, kept as it changes for readers that take no
/// lock (`/stats`, `/metrics`).
#[derive(Debug, Default)]
pub(super) struct HistoryGauges {
    /// Bytes held (frames plus their slots).
    pub(super) bytes: AtomicUsize,
    /// Keys with a history.
    pub(super) keys: AtomicUsize,
}

/// What [`History::record`] did with a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Recorded {
    /// Kept as its key's newest.
    Kept,
    /// Its key holds it already, byte for byte: a repeat, not kept again.
    Repeat,
    /// A new key, and `max_keys` keys have a history already: not kept (the
    /// result is still delivered; a resume of its key reports a gap).
    NotKept,
}

/// What a key's history can do for a client that last saw `seq`.
#[derive(Debug)]
pub(super) enum Replay<'h> {
    /// Every result after `seq`, oldest first (none when it is up to date).
    Recovered(Missed<'h>),
    /// The client has seen results this node has not received yet (it came
    /// from a gateway that is ahead): nothing to send, and the results up
    /// to `seq` must not be sent again when they arrive.
    Ahead,
    /// The history does not reach back to `seq`, or the key's sequence was
    /// restarted (another epoch), or the key is unknown here: its latest
    /// result, if any, stands in for what was missed.
    Gap(Option<&'h SharedResult>),
}

/// The results a key's history holds after a position, read only as far as
/// they are taken: how many is known without reading them.
#[derive(Debug, Clone)]
pub(super) struct Missed<'h> {
    frames: std::iter::Skip<std::collections::vec_deque::Iter<'h, (u64, SharedResult)>>,
}

#[cfg(test)]
thread_local! {
    /// Missed results read, one by one (the tests' view of a resume's work).
    pub(super) static FRAMES_READ: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl<'h> Missed<'h> {
    /// The newest of them, without reading the others.
    pub(super) fn newest(mut self) -> Option<&'h SharedResult> {
        self.frames.next_back().map(|(_, frame)| frame)
    }
}

impl<'h> Iterator for Missed<'h> {
    type Item = &'h SharedResult;

    fn next(&mut self) -> Option<Self::Item> {
        #[cfg(test)]
        FRAMES_READ.with(|read| read.set(read.get() + 1));
        self.frames.next().map(|(_, frame)| frame)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.frames.size_hint()
    }
}

impl ExactSizeIterator for Missed<'_> {}

#[derive(Debug)]
pub(super) struct History {
    /// Results kept per key.
    size: usize,
    max_bytes: usize,
    max_keys: usize,
    bytes: usize,
    keys: usize,
    public: HashMap<Box<str>, Ring>,
    private: HashMap<Box<str>, HashMap<Box<str>, Ring>>,
    /// Sweeps so far (see [`History::release_idle`]).
    sweep: u32,
    /// `bytes` and `keys`, for readers that take no lock.
    gauges: Arc<HistoryGauges>,
}

/// One key's latest results, consecutive in its sequence.
#[derive(Debug)]
struct Ring {
    epoch: Box<str>,
    /// `(seq, frame)`, oldest first, each `seq` one more than the one before.
    entries: VecDeque<(u64, SharedResult)>,
    /// The sweep during which the key last had a result.
    touched: u32,
}

impl History {
    pub(super) fn new(size: usize, max_bytes: usize, max_keys: usize) -> Self {
        Self {
            size: size.max(1),
            max_bytes,
            max_keys,
            bytes: 0,
            keys: 0,
            public: HashMap::new(),
            private: HashMap::new(),
            sweep: 0,
            gauges: Arc::default(),
        }
    }

    /// Keeps `frame`, the result at `position` of its key. A result that does not follow the key's last one (results
    /// were lost on the way here, or the sequence went back) starts the
    /// history over from it, as does a new epoch. One the history holds
    /// already, byte for byte, is a [`Recorded::Repeat`], not kept again.
    /// (Comparing bytes, not only `seq`s, keeps a forged result with a huge
    /// `seq` from silencing its key: the real ones that follow it differ.)
    pub(super) fn record(&mut self, frame: &SharedResult, position: Position<'_>) -> Recorded {
        let (client, symbol) = (frame.client(), frame.key());
        let room = self.keys < self.max_keys;
        let map = match client {
            None => &mut self.public,
            Some(code) => match self.private.get_mut(code) {
                Some(map) => map,
                None if room => self.private.entry(code.into()).or_default(),
                None => return Recorded::NotKept,
            },
        };
        let ring = match map.get_mut(symbol) {
            Some(ring) => ring,
            None if room => {
                self.keys += 1;
                self.gauges.keys.store(self.keys, Relaxed);
                map.entry(symbol.into()).or_insert_with(|| Ring {
                    epoch: position.epoch.into(),
                    entries: VecDeque::new(),
                    touched: 0,
                })
            }
            None => return Recorded::NotKept,
        };
        ring.touched = self.sweep;
        let last = ring.entries.back().map(|(seq, _)| *seq);
        if *ring.epoch != *position.epoch {
            ring.epoch = position.epoch.into();
            self.bytes -= ring.clear();
        } else if ring.holds(position.seq, frame) {
            return Recorded::Repeat;
        } else if last.is_some_and(|last| last.checked_add(1) != Some(position.seq)) {
            self.bytes -= ring.clear();
        }
        ring.entries.push_back((position.seq, frame.clone()));
        self.bytes += frame.text().len() + ENTRY_OVERHEAD;
        let over_size = ring.entries.len() > self.size;
        let mut evict = usize::from(over_size);
        if self.bytes > self.max_bytes {
            evict = 2;
        }
        for _ in 0..evict {
            if ring.entries.len() <= 1 {
                break;
            }
            if let Some((_, old)) = ring.entries.pop_front() {
                self.bytes -= old.text().len() + ENTRY_OVERHEAD;
            }
        }
        self.gauges.bytes.store(self.bytes, Relaxed);
        // A key the byte bound shrank gives back its slots too.
        if ring.entries.capacity() > 4 * ring.entries.len().max(4) {
            ring.entries.shrink_to(2 * ring.entries.len());
        }
        Recorded::Kept
    }

    /// What the key's history holds after `last_seen`.
    pub(super) fn replay(
        &self,
        client: Option<&str>,
        symbol: &str,
        last_seen: Position<'_>,
    ) -> Replay<'_> {
        let ring = match client {
            None => self.public.get(symbol),
            Some(code) => self.private.get(code).and_then(|map| map.get(symbol)),
        };
        let Some(ring) = ring else {
            return Replay::Gap(None);
        };
        let latest = ring.entries.back();
        let (Some((oldest, _)), Some((newest, frame))) = (ring.entries.front(), latest) else {
            return Replay::Gap(None);
        };
        if *ring.epoch != *last_seen.epoch || last_seen.seq.saturating_add(1) < *oldest {
            return Replay::Gap(Some(frame));
        }
        if last_seen.seq == *newest {
            // Up to date: nothing missed.
            return Replay::Recovered(Missed {
                frames: ring.entries.iter().skip(ring.entries.len()),
            });
        }
        if last_seen.seq > *newest {
            // A gateway trails another by a few results, not by more than
            // its history holds: a position further ahead is not one this
            // key's sequence reached, and is treated as a gap.
            let reachable = newest.saturating_add(self.size as u64);
            return if last_seen.seq <= reachable {
                Replay::Ahead
            } else {
                Replay::Gap(Some(frame))
            };
        }
        // `last_seen.seq` is below `newest` here: no overflow.
        let skip = usize::try_from(last_seen.seq + 1 - oldest).unwrap_or(usize::MAX);
        Replay::Recovered(Missed {
            frames: ring.entries.iter().skip(skip),
        })
    }

    /// Starts a new sweep and releases every key whose last result came
    /// [`SWEEPS_PER_IDLE`](crate::idle::SWEEPS_PER_IDLE) whole sweeps ago or
    /// earlier; returns them as (client,
    /// symbol). One walk over every key: for a sweep every quarter of
    /// `sma.key_idle_ms`, not for a hot path.
    pub(super) fn release_idle(&mut self) -> Vec<(Option<Box<str>>, Box<str>)> {
        self.sweep = self.sweep.wrapping_add(1);
        let sweep = self.sweep;
        let mut freed = 0;
        let mut released = Vec::new();
        let mut keep = |client: Option<&str>, symbol: &str, ring: &mut Ring| {
            if !is_idle(ring.touched, sweep) {
                return true;
            }
            freed += ring.clear();
            released.push((client.map(Box::from), Box::from(symbol)));
            false
        };
        self.public.retain(|symbol, ring| keep(None, symbol, ring));
        self.private.retain(|client, symbols| {
            symbols.retain(|symbol, ring| keep(Some(client), symbol, ring));
            !symbols.is_empty()
        });
        self.bytes -= freed;
        self.keys -= released.len();
        self.gauges.bytes.store(self.bytes, Relaxed);
        self.gauges.keys.store(self.keys, Relaxed);
        released
    }

    /// The bytes and keys held, kept as they change for readers that take
    /// no lock.
    pub(super) fn gauges(&self) -> Arc<HistoryGauges> {
        self.gauges.clone()
    }

    /// Bytes held (frames plus their slots).
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Ring {
    /// Whether the ring holds the result at `seq`, and it is `frame`.
    /// Entries are consecutive `seq`s, so that is one look.
    fn holds(&self, seq: u64, frame: &SharedResult) -> bool {
        let Some(&(oldest, _)) = self.entries.front() else {
            return false;
        };
        let at = seq
            .checked_sub(oldest)
            .and_then(|i| usize::try_from(i).ok());
        at.and_then(|i| self.entries.get(i))
            .is_some_and(|(held, kept)| *held == seq && kept.text() == frame.text())
    }

    /// Empties the ring; returns the bytes that frees.
    fn clear(&mut self) -> usize {
        let freed = self
            .entries
            .drain(..)
            .map(|(_, frame)| frame.text().len() + ENTRY_OVERHEAD)
            .sum();
        self.entries.shrink_to(4);
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: u64, epoch: &str) -> Position<'_> {
        Position { seq, epoch }
    }

    /// Records `text` as the result at `position` of the key (`client`, `symbol`).
    fn record(
        history: &mut History,
        client: Option<&str>,
        symbol: &str,
        position: Position<'_>,
        text: &str,
    ) -> Recorded {
        let frame = SharedResult::detached(text.into(), symbol, client, Some(position));
        history.record(&frame, position)
    }

    fn frames(replay: Replay<'_>) -> Vec<String> {
        match replay {
            Replay::Recovered(frames) => frames.map(|f| f.as_str().to_owned()).collect(),
            other => panic!("expected a recovery, got {other:?}"),
        }
    }

    fn gap(replay: Replay<'_>) -> Option<String> {
        match replay {
            Replay::Gap(latest) => latest.map(|f| f.as_str().to_owned()),
            other => panic!("expected a gap, got {other:?}"),
        }
    }

    fn record_run(
        history: &mut History,
        client: Option<&str>,
        seqs: std::ops::RangeInclusive<u64>,
    ) {
        for seq in seqs {
            record(history, client, "A", at(seq, "e1"), &format!("A{seq}"));
        }
    }

    #[test]
    fn replays_what_followed_the_last_seen_result() {
        let mut history = History::new(5, 1 << 20, 10);
        record_run(&mut history, None, 1..=8);
        assert_eq!(
            frames(history.replay(None, "A", at(5, "e1"))),
            ["A6", "A7", "A8"]
        );
        assert_eq!(
            frames(history.replay(None, "A", at(3, "e1"))),
            ["A4", "A5", "A6", "A7", "A8"]
        );
        assert!(
            frames(history.replay(None, "A", at(8, "e1"))).is_empty(),
            "up to date"
        );
        assert!(
            matches!(history.replay(None, "A", at(9, "e1")), Replay::Ahead),
            "ahead of this node"
        );
        assert_eq!(
            gap(history.replay(None, "A", at(99, "e1"))).as_deref(),
            Some("A8"),
            "further ahead than any gateway trails: a gap"
        );
        assert_eq!(
            gap(history.replay(None, "A", at(2, "e1"))).as_deref(),
            Some("A8"),
            "beyond the history"
        );
        assert_eq!(
            gap(history.replay(None, "A", at(7, "e0"))).as_deref(),
            Some("A8"),
            "another epoch"
        );
        assert_eq!(
            gap(history.replay(None, "B", at(1, "e1"))),
            None,
            "unknown key"
        );
    }

    #[test]
    fn private_history_is_kept_per_client() {
        let mut history = History::new(5, 1 << 20, 10);
        record_run(&mut history, Some("acme"), 1..=3);
        assert_eq!(
            frames(history.replay(Some("acme"), "A", at(1, "e1"))),
            ["A2", "A3"]
        );
        assert_eq!(gap(history.replay(Some("other"), "A", at(1, "e1"))), None);
        assert_eq!(gap(history.replay(None, "A", at(1, "e1"))), None);
    }

    #[test]
    fn a_hole_or_a_new_epoch_starts_the_history_over() {
        let mut history = History::new(10, 1 << 20, 10);
        record_run(&mut history, None, 1..=4);
        record(&mut history, None, "A", at(6, "e1"), "A6");
        assert_eq!(
            gap(history.replay(None, "A", at(3, "e1"))).as_deref(),
            Some("A6"),
            "5 never came"
        );
        assert_eq!(frames(history.replay(None, "A", at(5, "e1"))), ["A6"]);
        assert_eq!(
            record(&mut history, None, "A", at(6, "e1"), "A6"),
            Recorded::Repeat
        );
        assert_eq!(
            frames(history.replay(None, "A", at(5, "e1"))),
            ["A6"],
            "is not kept twice"
        );
        assert_eq!(
            record(&mut history, None, "A", at(6, "e1"), "other"),
            Recorded::Kept
        );
        assert_eq!(
            frames(history.replay(None, "A", at(5, "e1"))),
            ["other"],
            "another result at a seq already had: the sequence went back, and starts over"
        );
        record(&mut history, None, "A", at(1, "e2"), "B1");
        assert_eq!(
            gap(history.replay(None, "A", at(6, "e1"))).as_deref(),
            Some("B1")
        );
        assert!(frames(history.replay(None, "A", at(1, "e2"))).is_empty());
    }

    #[test]
    fn memory_stays_within_its_bounds() {
        let frame_cost = 2 + ENTRY_OVERHEAD;
        let mut history = History::new(100, 10 * frame_cost, 2);
        record_run(&mut history, None, 1..=50);
        assert!(history.bytes() <= 10 * frame_cost, "{}", history.bytes());
        // The key that filled it shrank; it still has its latest.
        assert_eq!(
            gap(history.replay(None, "A", at(1, "e1"))).as_deref(),
            Some("A50")
        );
        record(&mut history, Some("x"), "B", at(1, "e1"), "B1");
        assert_eq!(
            record(&mut history, Some("y"), "C", at(1, "e1"), "C1"),
            Recorded::NotKept
        );
        assert_eq!(
            gap(history.replay(Some("y"), "C", at(0, "e1"))),
            None,
            "over max_keys: not kept"
        );
        let gauges = history.gauges();
        assert_eq!(gauges.keys.load(Relaxed), 2, "A and B");
        assert_eq!(gauges.bytes.load(Relaxed), history.bytes());
        let mut small = History::new(3, 1 << 20, 10);
        record_run(&mut small, None, 1..=10);
        assert_eq!(
            small.bytes(),
            "A8A9A10".len() + 3 * ENTRY_OVERHEAD,
            "three results kept"
        );
    }
}
