//! A conflating outbox's latest frame of each key: what a socket that fell
//! behind receives once its queue is drained, instead of everything it missed.
//! A closed candle is never replaced: it stays, ahead of its key's latest.

use std::collections::HashMap;

use crate::frame::{BarState, Frame, SharedResult};

/// The latest frame of each key of a conflating outbox.
#[derive(Debug, Default)]
pub(super) struct Latest {
    public: HashMap<Box<str>, Slot>,
    private: HashMap<Box<str>, Slot>,
    /// Frames held (a key's latest and its closed candles).
    frames: usize,
    /// Payload bytes held.
    pub(super) bytes: usize,
}

/// One key's frames: its latest, and before it the closed candles a later
/// result may not replace, in order.
#[derive(Debug)]
struct Slot {
    closed: Vec<SharedResult>,
    latest: SharedResult,
}

impl Latest {
    /// Keeps `result` as its key's latest; returns how many it replaced.
    pub(super) fn keep(&mut self, result: SharedResult) -> u64 {
        let map = if result.client().is_some() {
            &mut self.private
        } else {
            &mut self.public
        };
        self.bytes += result.text().len();
        match map.get_mut(result.key()) {
            Some(slot) => {
                let older = std::mem::replace(&mut slot.latest, result);
                if older.bar() == BarState::Closed {
                    slot.closed.push(older);
                    self.frames += 1;
                    0
                } else {
                    self.bytes -= older.text().len();
                    1
                }
            }
            None => {
                map.insert(
                    result.key().into(),
                    Slot {
                        closed: Vec::new(),
                        latest: result,
                    },
                );
                self.frames += 1;
                0
            }
        }
    }

    /// The bytes held once `result` (of `len` bytes) is kept as its key's latest.
    pub(super) fn bytes_with(&self, result: &SharedResult, len: usize) -> usize {
        let map = if result.client().is_some() {
            &self.private
        } else {
            &self.public
        };
        let replaced = map
            .get(result.key())
            .filter(|slot| slot.latest.bar() != BarState::Closed)
            .map_or(0, |slot| slot.latest.text().len());
        self.bytes - replaced + len
    }

    /// Drops the frames `replayed` says a resume sent already.
    pub(super) fn forget(&mut self, replayed: impl Fn(&SharedResult) -> bool) {
        let (mut frames, mut bytes) = (0, 0);
        for map in [&mut self.public, &mut self.private] {
            map.retain(|_, slot| {
                slot.closed.retain(|result| {
                    let keep = !replayed(result);
                    if !keep {
                        frames += 1;
                        bytes += result.text().len();
                    }
                    keep
                });
                if !replayed(&slot.latest) {
                    return true;
                }
                bytes += slot.latest.text().len();
                frames += 1 + slot.closed.len();
                bytes += slot.closed.iter().map(|r| r.text().len()).sum::<usize>();
                false
            });
        }
        self.frames -= frames;
        self.bytes -= bytes;
    }

    /// The frames held: what the `conflated` notice announces.
    pub(super) fn len(&self) -> usize {
        self.frames
    }

    pub(super) fn into_frames(self) -> impl Iterator<Item = Frame> {
        let all = self.public.into_values().chain(self.private.into_values());
        all.flat_map(|slot| slot.closed.into_iter().chain([slot.latest]))
            .map(Frame::Result)
    }
}
