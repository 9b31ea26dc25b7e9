//! What the hub hands a socket: a result, typed (its key and position
//! travel beside its bytes, see [`ResultFrame`]), or a direct message.

use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

pub use quotebridge_core::frame::{BarState, ResultFrame};

/// A result as every socket shares it: one text, reference-counted.
pub type SharedResult = ResultFrame<Utf8Bytes>;

/// One frame queued for a socket.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A result of a key.
    Result(SharedResult),
    /// A message for a client code's group (the seed's `send_message`):
    /// no key, never conflated or rate-limited.
    Direct(Message),
}

// By hand, to be inlined: fan-out clones a frame once per socket.
impl Clone for Frame {
    #[inline]
    fn clone(&self) -> Self {
        match self {
            Self::Result(result) => Self::Result(result.clone()),
            Self::Direct(message) => Self::Direct(message.clone()),
        }
    }
}

impl Frame {
    /// What the frame counts against an outbox's byte bound.
    #[must_use]
    pub fn payload_len(&self) -> usize {
        match self {
            Self::Result(result) => result.text().len(),
            Self::Direct(Message::Text(text)) => text.len(),
            Self::Direct(Message::Binary(data)) => data.len(),
            Self::Direct(_) => 0,
        }
    }

    /// The WebSocket message that carries it.
    #[must_use]
    pub fn into_message(self) -> Message {
        match self {
            Self::Result(result) => Message::Text(result.into_text()),
            Self::Direct(message) => message,
        }
    }
}

impl From<SharedResult> for Frame {
    fn from(result: SharedResult) -> Self {
        Self::Result(result)
    }
}
