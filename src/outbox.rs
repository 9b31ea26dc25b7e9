//! One socket's outbox: the queue between the hub, which fills it, and the
//! socket's session, which empties it.
//!
//! Fan-out puts every result into every subscribed socket's outbox, so a push
//! must be cheap: here it is one uncontended lock and a `VecDeque` push, and
//! the session takes everything queued under a single lock. A tokio channel
//! costs several atomic read-modify-writes per frame on each end (and a
//! semaphore, bounded or not); it was the bridge's top symbol in fan-out
//! profiles. An idle socket's outbox allocates nothing beyond its header.
//!
//! A socket past its bound is either cut off, or, when its outbox
//! *conflates*, kept: each result that does not fit replaces the pending
//! result of its key, so the socket catches up with the latest value of
//! every key (as Lightstreamer's MERGE mode does) and holds at most one
//! frame per key beyond the bound.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

use axum::extract::ws::{Message, Utf8Bytes};

/// How much one outbox may hold before its socket is a slow consumer.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Queued frames.
    pub frames: usize,
    /// Queued payload bytes.
    pub bytes: usize,
    /// Past the bounds, keep the latest frame of each key (up to `bytes`
    /// of them) instead of refusing.
    pub conflate: bool,
}

/// What happened when a frame was offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// It is queued.
    Queued,
    /// The outbox is past its bound: the frame is kept as its key's latest,
    /// replacing `replaced` older ones (0 or 1).
    Conflated {
        /// Frames of the key this one replaced.
        replaced: u64,
    },
    /// The outbox is at its frame or byte bound (and cannot conflate this
    /// frame: it has no key, or one frame per key exceeds the byte bound);
    /// the frame was not queued.
    Full,
    /// The session has ended; nobody will take the frame.
    Gone,
}

/// Which key a result belongs to, for conflation: the socket's client is
/// fixed, so a private flag and the symbol name it.
#[derive(Debug, Clone, Copy)]
pub struct FrameKey<'a> {
    /// A private result of the socket's client (else a public one).
    pub private: bool,
    /// Its symbol.
    pub symbol: &'a str,
}

/// What one take from the outbox brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Frames moved into the batch; 0 means the hub closed the outbox.
    pub frames: usize,
    /// Whether they are the latest of each key after some were skipped
    /// (conflated): the client should be told before them.
    pub conflated: bool,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Message>,
    /// Payload bytes in `frames`.
    bytes: usize,
    /// While conflating: the latest frame of each key that did not fit,
    /// sent once `frames` is drained. Allocated only for a socket that
    /// fell behind.
    latest: Option<Box<Latest>>,
    /// The hub dropped its sender: no more frames will come.
    closed: bool,
    /// The session dropped its outbox: frames would never be taken.
    abandoned: bool,
    /// The session, when it waits on an empty queue.
    waiting: Option<Waker>,
    /// A clone of `waiting` was handed to a caller to wake later.
    wake_handed_out: bool,
}

#[derive(Debug, Default)]
struct Shared(Mutex<Queue>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while the lock is held, so a poisoned lock still
        // guards a consistent queue.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A new, empty outbox bounded by `bounds`: the hub's end and the session's.
#[must_use]
pub fn bounded(bounds: Bounds) -> (Sender, Outbox) {
    let shared = Arc::new(Shared::default());
    (
        Sender {
            shared: shared.clone(),
            bounds,
        },
        Outbox { shared },
    )
}

/// The hub's end. Dropping it closes the outbox: the session takes what is
/// queued, then learns it was evicted.
#[derive(Debug)]
pub struct Sender {
    shared: Arc<Shared>,
    bounds: Bounds,
}

impl Sender {
    /// Queues `message` unless the outbox is full or its session has ended.
    /// When the session must be woken to take it, its waker is added to
    /// `wakes`: the caller wakes it, once it has queued all it has. An
    /// outbox past half of either bound wakes its session at once instead,
    /// so deferring never makes a socket that keeps up a slow consumer.
    pub fn offer(
        &self,
        message: Message,
        key: Option<FrameKey<'_>>,
        wakes: &mut Vec<Waker>,
    ) -> Offer {
        let len = payload_len(&message);
        let mut queue = self.shared.lock();
        if queue.abandoned {
            return Offer::Gone;
        }
        let full =
            queue.frames.len() >= self.bounds.frames || queue.bytes + len > self.bounds.bytes;
        // Once a key's frame waits among the latest, every keyed frame goes
        // there too, so none overtakes an older one of its key.
        let conflating = queue.latest.is_some();
        if let Some(key) = key.filter(|_| self.bounds.conflate && (full || conflating)) {
            let latest = queue.latest.get_or_insert_default();
            let replaced = latest.keep(key, message);
            if latest.bytes > self.bounds.bytes {
                return Offer::Full;
            }
            // It is behind: wake it now, not at the end of the burst.
            if let Some(waiting) = queue.waiting.take() {
                drop(queue);
                waiting.wake();
            }
            return Offer::Conflated { replaced };
        }
        if full {
            return Offer::Full;
        }
        queue.frames.push_back(message);
        queue.bytes += len;
        // Only a parked session needs waking: once by the caller, and once
        // more, directly, should the queue fill up before the caller does.
        let filling =
            queue.frames.len() * 2 > self.bounds.frames || queue.bytes * 2 > self.bounds.bytes;
        if filling {
            if let Some(waiting) = queue.waiting.take() {
                drop(queue);
                waiting.wake();
            }
        } else if !queue.wake_handed_out
            && let Some(waiting) = &queue.waiting
        {
            wakes.push(waiting.clone());
            queue.wake_handed_out = true;
        }
        Offer::Queued
    }
}

impl Sender {
    /// Queues frames from `frames` while the outbox stays within half of
    /// each bound, never evicting: what does not fit is left out. Half, so
    /// that live frames arriving before the session drains these still find
    /// room (past half full, `offer` wakes the session at once). Returns how
    /// many were queued. Frames are cloned only once they are queued, so the
    /// work is bounded by the outbox's room, not by the offer.
    pub fn offer_while_room<'f>(
        &self,
        frames: impl IntoIterator<Item = &'f Utf8Bytes>,
        wakes: &mut Vec<Waker>,
    ) -> usize {
        let mut queue = self.shared.lock();
        if queue.abandoned {
            return 0;
        }
        let (max_frames, max_bytes) = (self.bounds.frames / 2, self.bounds.bytes / 2);
        let mut queued = 0;
        for frame in frames {
            if queue.frames.len() >= max_frames || queue.bytes + frame.len() > max_bytes {
                break;
            }
            queue.bytes += frame.len();
            queue.frames.push_back(Message::Text(frame.clone()));
            queued += 1;
        }
        if queued > 0
            && !queue.wake_handed_out
            && let Some(waiting) = &queue.waiting
        {
            wakes.push(waiting.clone());
            queue.wake_handed_out = true;
        }
        queued
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.closed = true;
        let waiting = queue.waiting.take();
        drop(queue);
        if let Some(waker) = waiting {
            waker.wake();
        }
    }
}

/// The session's end.
#[derive(Debug)]
pub struct Outbox {
    shared: Arc<Shared>,
}

impl Outbox {
    /// Waits for queued frames and moves up to `max` (at least one) of them
    /// into `batch`; returns how many. 0 means the hub closed the outbox and
    /// everything queued before that has been taken. Cancel-safe: nothing is
    /// taken unless it returns.
    /// Once the queue is drained, the latest frames of a conflating outbox
    /// come all at once, marked [`Taken::conflated`].
    pub async fn recv_many(&mut self, batch: &mut Vec<Message>, max: usize) -> Taken {
        poll_fn(|cx| {
            let mut queue = self.shared.lock();
            if !queue.frames.is_empty() {
                let take = queue.frames.len().min(max.max(1));
                let mut freed = 0;
                let queue = &mut *queue;
                batch.extend(
                    queue
                        .frames
                        .drain(..take)
                        .inspect(|m| freed += payload_len(m)),
                );
                queue.bytes -= freed;
                // Running now; offers need not wake it until it parks again.
                queue.waiting = None;
                return Poll::Ready(Taken {
                    frames: take,
                    conflated: false,
                });
            }
            if let Some(latest) = queue.latest.take() {
                queue.waiting = None;
                let frames = latest.len();
                batch.extend(latest.into_frames());
                return Poll::Ready(Taken {
                    frames,
                    conflated: true,
                });
            }
            if queue.closed {
                return Poll::Ready(Taken {
                    frames: 0,
                    conflated: false,
                });
            }
            match &mut queue.waiting {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                waiting => *waiting = Some(cx.waker().clone()),
            }
            queue.wake_handed_out = false;
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
impl Outbox {
    /// The next frame; `None` once closed and drained.
    pub async fn recv(&mut self) -> Option<Message> {
        let mut one = Vec::with_capacity(1);
        self.recv_many(&mut one, 1).await;
        assert!(one.len() <= 1, "recv is for outboxes that do not conflate");
        one.pop()
    }

    /// A frame queued now, if any.
    pub fn try_recv(&mut self) -> Option<Message> {
        use futures_util::FutureExt;
        self.recv().now_or_never().flatten()
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.abandoned = true;
        // Frees what was queued now, not when the hub drops its sender.
        queue.frames = VecDeque::new();
        queue.bytes = 0;
        queue.latest = None;
    }
}

/// The latest frame of each key of a conflating outbox.
#[derive(Debug, Default)]
struct Latest {
    public: HashMap<Box<str>, Message>,
    private: HashMap<Box<str>, Message>,
    /// Payload bytes held.
    bytes: usize,
}

impl Latest {
    /// Keeps `message` as its key's latest; returns how many it replaced.
    fn keep(&mut self, key: FrameKey<'_>, message: Message) -> u64 {
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

    fn len(&self) -> usize {
        self.public.len() + self.private.len()
    }

    fn into_frames(self) -> impl Iterator<Item = Message> {
        self.public.into_values().chain(self.private.into_values())
    }
}

/// What a frame counts against the byte bound.
pub(crate) fn payload_len(message: &Message) -> usize {
    match message {
        Message::Text(text) => text.len(),
        Message::Binary(data) => data.len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(frames: usize, bytes: usize) -> Bounds {
        Bounds {
            frames,
            bytes,
            conflate: false,
        }
    }

    /// Offers `text` (a frame of no key) and wakes the session at once.
    fn offer(sender: &Sender, text: &str) -> Offer {
        offer_keyed(sender, text, None)
    }

    fn offer_keyed(sender: &Sender, text: &str, key: Option<FrameKey<'_>>) -> Offer {
        let mut wakes = Vec::new();
        let offer = sender.offer(Message::Text(text.to_owned().into()), key, &mut wakes);
        wakes.into_iter().for_each(Waker::wake);
        offer
    }

    fn text(message: &Message) -> &str {
        match message {
            Message::Text(t) => t.as_str(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn frames_come_out_in_order_and_at_most_max_at_a_time() {
        let (sender, mut outbox) = bounded(bounds(10, 1000));
        for i in 0..5 {
            assert_eq!(offer(&sender, &i.to_string()), Offer::Queued);
        }
        let mut batch = Vec::new();
        assert_eq!(outbox.recv_many(&mut batch, 3).await.frames, 3);
        assert_eq!(outbox.recv_many(&mut batch, 3).await.frames, 2);
        let got: Vec<&str> = batch.iter().map(text).collect();
        assert_eq!(got, ["0", "1", "2", "3", "4"]);
    }

    #[tokio::test]
    async fn a_waiting_session_is_woken_by_the_next_frame() {
        let (sender, mut outbox) = bounded(bounds(10, 1000));
        let waiting = tokio::spawn(async move {
            let mut batch = Vec::new();
            outbox.recv_many(&mut batch, 10).await;
            batch
        });
        tokio::task::yield_now().await;
        offer(&sender, "late");
        let batch = waiting.await.expect("receiver ran");
        assert_eq!(batch.iter().map(text).collect::<Vec<_>>(), ["late"]);
    }

    #[tokio::test]
    async fn both_bounds_hold_and_taking_frees_room() {
        let (sender, mut outbox) = bounded(bounds(2, 10));
        assert_eq!(offer(&sender, "12345"), Offer::Queued);
        assert_eq!(offer(&sender, "123456"), Offer::Full, "11 bytes > 10");
        assert_eq!(offer(&sender, "1"), Offer::Queued);
        assert_eq!(offer(&sender, "2"), Offer::Full, "3 frames > 2");
        let mut batch = Vec::new();
        assert_eq!(outbox.recv_many(&mut batch, 10).await.frames, 2);
        assert_eq!(offer(&sender, "123456789"), Offer::Queued);
        assert_eq!(offer(&sender, "12"), Offer::Full, "11 bytes > 10");
    }

    fn key(symbol: &str) -> Option<FrameKey<'_>> {
        Some(FrameKey {
            private: false,
            symbol,
        })
    }

    fn texts(batch: &[Message]) -> Vec<&str> {
        let mut texts: Vec<&str> = batch.iter().map(text).collect();
        texts.sort_unstable();
        texts
    }

    #[tokio::test]
    async fn past_its_bound_a_conflating_outbox_keeps_the_latest_of_each_key() {
        let (sender, mut outbox) = bounded(Bounds {
            conflate: true,
            ..bounds(2, 1000)
        });
        assert_eq!(offer_keyed(&sender, "A1", key("A")), Offer::Queued);
        assert_eq!(offer_keyed(&sender, "B1", key("B")), Offer::Queued);
        for (frame, symbol, replaced) in [("A2", "A", 0), ("A3", "A", 1), ("B2", "B", 0)] {
            assert_eq!(
                offer_keyed(&sender, frame, key(symbol)),
                Offer::Conflated { replaced }
            );
        }
        let private = Some(FrameKey {
            private: true,
            symbol: "A",
        });
        assert_eq!(
            offer_keyed(&sender, "pA1", private),
            Offer::Conflated { replaced: 0 },
            "a private key is its own"
        );
        assert_eq!(
            offer(&sender, "direct"),
            Offer::Full,
            "no key: not conflated"
        );
        let mut batch = Vec::new();
        let taken = outbox.recv_many(&mut batch, 10).await;
        assert_eq!(
            (taken.frames, taken.conflated),
            (2, false),
            "the queue first"
        );
        assert_eq!(texts(&batch), ["A1", "B1"]);
        batch.clear();
        // Keyed frames wait behind the latest while it is held: none overtakes.
        assert_eq!(
            offer_keyed(&sender, "A4", key("A")),
            Offer::Conflated { replaced: 1 }
        );
        let taken = outbox.recv_many(&mut batch, 10).await;
        assert_eq!((taken.frames, taken.conflated), (3, true));
        assert_eq!(texts(&batch), ["A4", "B2", "pA1"]);
        batch.clear();
        assert_eq!(
            offer_keyed(&sender, "A5", key("A")),
            Offer::Queued,
            "caught up"
        );
    }

    #[test]
    fn a_conflating_outbox_is_full_when_one_frame_per_key_exceeds_the_byte_bound() {
        let (sender, _outbox) = bounded(Bounds {
            conflate: true,
            ..bounds(1, 10)
        });
        assert_eq!(offer_keyed(&sender, "12345", key("A")), Offer::Queued);
        assert_eq!(
            offer_keyed(&sender, "123456", key("B")),
            Offer::Conflated { replaced: 0 }
        );
        assert_eq!(
            offer_keyed(&sender, "123", key("B")),
            Offer::Conflated { replaced: 1 },
            "replacing frees the older one's bytes"
        );
        assert_eq!(
            offer_keyed(&sender, "12345678", key("C")),
            Offer::Full,
            "3 + 8 > 10"
        );
    }

    #[tokio::test]
    async fn closing_lets_the_session_drain_then_ends_it() {
        let (sender, mut outbox) = bounded(bounds(10, 1000));
        offer(&sender, "last");
        drop(sender);
        let mut batch = Vec::new();
        assert_eq!(outbox.recv_many(&mut batch, 10).await.frames, 1);
        assert_eq!(outbox.recv_many(&mut batch, 10).await.frames, 0);
    }

    #[test]
    fn offers_to_an_ended_session_are_refused() {
        let (sender, outbox) = bounded(bounds(10, 1000));
        drop(outbox);
        assert_eq!(offer(&sender, "x"), Offer::Gone);
    }

    #[tokio::test]
    async fn an_outbox_past_half_full_wakes_its_session_at_once() {
        let (sender, mut outbox) = bounded(bounds(4, 1000));
        let session = tokio::spawn(async move {
            let mut batch = Vec::new();
            outbox.recv_many(&mut batch, 10).await;
            batch.len()
        });
        tokio::task::yield_now().await;
        let mut wakes = Vec::new();
        for text in ["1", "2", "3"] {
            assert_eq!(
                sender.offer(Message::Text(text.into()), None, &mut wakes),
                Offer::Queued
            );
        }
        assert_eq!(wakes.len(), 1, "the first frame's wake is deferred");
        // 3 of 4 frames: the session is woken directly, while the deferred
        // wake is still held.
        let taken = tokio::time::timeout(std::time::Duration::from_secs(10), session)
            .await
            .expect("woken without the deferred wake")
            .expect("session ran");
        assert!(taken >= 3);
    }
}
