//! A conflating outbox's latest frame of each key: what a socket that fell
//! behind receives once its queue is drained, instead of everything it missed.

use std::collections::HashMap;

use axum::extract::ws::Message;

use super::{FrameKey, payload_len};

/// The latest frame of each key of a conflating outbox.
#[derive(Debug, Default)]
pub(super) struct Latest {
    public: HashMap<Box<str>, Message>,
    private: HashMap<Box<str>, Message>,
    /// Payload bytes held.
    pub(super) bytes: usize,
}

impl Latest {
    /// Keeps `message` as its key's latest; returns how many it replaced.
    pub(super) fn keep(&mut self, key: FrameKey<'_>, message: Message) -> u64 {
        let map = if key.private {
            &mut self.private
        } else {
            &mut self.public
        };
        self.bytes += payload_len(&message);
        match map.get_mut(key.symbol) {
            Some(older) => {
                self.bytes -= payload_len(older);
                *older = message;
                1
            }
            None => {
                map.insert(key.symbol.into(), message);
                0
            }
        }
    }

    /// The bytes held once a frame of `len` bytes of `key` is kept.
    pub(super) fn bytes_with(&self, key: FrameKey<'_>, len: usize) -> usize {
        let map = if key.private {
            &self.private
        } else {
            &self.public
        };
        let older = map.get(key.symbol).map_or(0, payload_len);
        self.bytes - older + len
    }

    pub(super) fn len(&self) -> usize {
        self.public.len() + self.private.len()
    }

    pub(super) fn into_frames(self) -> impl Iterator<Item = Message> {
        self.public.into_values().chain(self.private.into_values())
    }
}
