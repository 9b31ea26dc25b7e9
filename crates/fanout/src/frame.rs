//! What the hub hands a socket: a result, typed (its key and position
//! travel beside its bytes, see [`ResultFrame`]), a direct message, or a
//! burst of results every socket subscribed to everything takes whole.

use std::sync::Arc;

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
    /// Results, in order, shared by every socket that takes all of them.
    Burst(Arc<Burst>),
}

/// Results that many sockets take whole, each encoded once as WebSocket
/// frames: a socket queues the burst as one entry, and its session writes
/// the frames' bytes as they are, so a result costs each socket neither a
/// reference count nor a slot of its queue.
#[derive(Debug, PartialEq)]
pub struct Burst {
    results: Vec<SharedResult>,
    /// The results as WebSocket text frames, one after another.
    wire: Vec<u8>,
    /// The results' payload bytes.
    payload: usize,
}

impl Burst {
    /// `results` (at least one), encoded once.
    #[must_use]
    pub fn new(results: Vec<SharedResult>) -> Self {
        let payload = results.iter().map(|result| result.text().len()).sum();
        let mut wire = Vec::with_capacity(payload + results.len() * 4);
        for result in &results {
            text_frame_into(&mut wire, result.text().as_bytes());
        }
        Self {
            results,
            wire,
            payload,
        }
    }

    /// The results, in order.
    #[must_use]
    pub fn results(&self) -> &[SharedResult] {
        &self.results
    }

    /// The results' payload bytes.
    #[must_use]
    pub fn payload_len(&self) -> usize {
        self.payload
    }

    /// The results as a server's WebSocket text frames: byte for byte what
    /// the engine writes for each as a [`Message::Text`].
    #[must_use]
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }
}

/// Appends `payload` as one final, unmasked WebSocket text frame (RFC 6455
/// §5.2: a server's frames are never masked): opcode, then the length in 7
/// bits, or 16 or 64 after a marker.
fn text_frame_into(wire: &mut Vec<u8>, payload: &[u8]) {
    const FIN_TEXT: u8 = 0x81;
    let len = payload.len();
    wire.push(FIN_TEXT);
    match u16::try_from(len) {
        Ok(short) if short < 126 => wire.push(short as u8),
        Ok(medium) => {
            wire.push(126);
            wire.extend_from_slice(&medium.to_be_bytes());
        }
        Err(_) => {
            wire.push(127);
            wire.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    wire.extend_from_slice(payload);
}

// By hand, to be inlined: fan-out clones a frame once per socket.
impl Clone for Frame {
    #[inline]
    fn clone(&self) -> Self {
        match self {
            Self::Result(result) => Self::Result(result.clone()),
            Self::Direct(message) => Self::Direct(message.clone()),
            Self::Burst(burst) => Self::Burst(burst.clone()),
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
            Self::Burst(burst) => burst.payload,
        }
    }

    /// The results it carries, in order: none for a direct message.
    #[must_use]
    pub fn results(&self) -> &[SharedResult] {
        match self {
            Self::Result(result) => std::slice::from_ref(result),
            Self::Burst(burst) => &burst.results,
            Self::Direct(_) => &[],
        }
    }

    /// The messages it stands for: its results, or the one direct message.
    #[must_use]
    pub fn count(&self) -> usize {
        match self {
            Self::Direct(_) => 1,
            results => results.results().len(),
        }
    }

    /// The WebSocket message that carries it, or for a burst the frames
    /// to write as they are.
    #[must_use]
    pub fn into_message(self) -> Outgoing {
        match self {
            Self::Result(result) => Outgoing::Message(Message::Text(result.into_text())),
            Self::Direct(message) => Outgoing::Message(message),
            Self::Burst(burst) => Outgoing::Encoded(burst),
        }
    }
}

impl From<SharedResult> for Frame {
    fn from(result: SharedResult) -> Self {
        Self::Result(result)
    }
}

/// What a session writes for a frame.
#[derive(Debug)]
pub enum Outgoing {
    /// A message, for the WebSocket engine to encode.
    Message(Message),
    /// A burst's frames, encoded already.
    Encoded(Arc<Burst>),
}

impl From<Message> for Outgoing {
    fn from(message: Message) -> Self {
        Self::Message(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::Data;
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame as WireFrame, coding::OpCode};

    #[test]
    fn a_burst_is_byte_for_byte_what_the_engine_writes_for_each_result() {
        // Each length encoding: 7 bits, the 16-bit marker's bounds, 64 bits.
        let results: Vec<SharedResult> = [0, 1, 125, 126, 65_535, 65_536]
            .into_iter()
            .map(|len| SharedResult::detached("x".repeat(len).into(), "A", None, None))
            .collect();
        let mut engine = Vec::new();
        for result in &results {
            WireFrame::message(
                result.text().as_bytes().to_vec(),
                OpCode::Data(Data::Text),
                true,
            )
            .format(&mut engine)
            .expect("formats into a vector");
        }
        let burst = Burst::new(results);
        assert_eq!(burst.wire(), engine);
        assert_eq!(Frame::Burst(Arc::new(burst)).count(), 6);
    }
}
