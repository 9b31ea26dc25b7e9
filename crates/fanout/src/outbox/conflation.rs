//! A conflating outbox's latest frame of each key: what a socket that fell
//! behind receives once its queue is drained, instead of everything it missed.

use std::collections::HashMap;

use crate::frame::{Frame, SharedResult};

/// The latest frame of each key of a conflating outbox.
#[derive(Debug, Default)]
pub(super) struct Latest {
    public: HashMap<Box<str>, SharedResult>,
    private: HashMap<Box<str>, SharedResult>,
    /// Payload bytes held.
    pub(super) bytes: usize,
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
        match map.get_mut(result.symbol()) {
            Some(older) => {
                self.bytes -= older.text().len();
                *older = result;
                1
            }
            None => {
                map.insert(result.symbol().into(), result);
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
        let older = map
            .get(result.symbol())
            .map_or(0, |older| older.text().len());
        self.bytes - older + len
    }

    pub(super) fn len(&self) -> usize {
        self.public.len() + self.private.len()
    }

    pub(super) fn into_frames(self) -> impl Iterator<Item = Frame> {
        let all = self.public.into_values().chain(self.private.into_values());
        all.map(Frame::Result)
    }
}
