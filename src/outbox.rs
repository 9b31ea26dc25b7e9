//! One socket's outbox: the queue between the hub, which fills it, and the
//! socket's session, which empties it.
//!
//! Fan-out puts every result into every subscribed socket's outbox, so a push
//! must be cheap: here it is one uncontended lock and a `VecDeque` push, and
//! the session takes everything queued under a single lock. A tokio channel
//! costs several atomic read-modify-writes per frame on each end (and a
//! semaphore, bounded or not); it was the bridge's top symbol in fan-out
//! profiles. An idle socket's outbox allocates nothing beyond its header.

use std::collections::VecDeque;
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
}

/// What happened when a frame was offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// It is queued.
    Queued,
    /// The outbox is at its frame or byte bound; the frame was not queued.
    Full,
    /// The session has ended; nobody will take the frame.
    Gone,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Message>,
    /// Payload bytes in `frames`.
    bytes: usize,
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
    pub fn offer(&self, message: Message, wakes: &mut Vec<Waker>) -> Offer {
        let len = payload_len(&message);
        let mut queue = self.shared.lock();
        if queue.abandoned {
            return Offer::Gone;
        }
        if queue.frames.len() >= self.bounds.frames || queue.bytes + len > self.bounds.bytes {
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
    pub async fn recv_many(&mut self, batch: &mut Vec<Message>, max: usize) -> usize {
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
                return Poll::Ready(take);
            }
            if queue.closed {
                return Poll::Ready(0);
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
        Bounds { frames, bytes }
    }

    /// Offers `text` and wakes the session at once.
    fn offer(sender: &Sender, text: &str) -> Offer {
        let mut wakes = Vec::new();
        let offer = sender.offer(Message::Text(text.to_owned().into()), &mut wakes);
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
        assert_eq!(outbox.recv_many(&mut batch, 3).await, 3);
        assert_eq!(outbox.recv_many(&mut batch, 3).await, 2);
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
        assert_eq!(outbox.recv_many(&mut batch, 10).await, 2);
        assert_eq!(offer(&sender, "123456789"), Offer::Queued);
        assert_eq!(offer(&sender, "12"), Offer::Full, "11 bytes > 10");
    }

    #[tokio::test]
    async fn closing_lets_the_session_drain_then_ends_it() {
        let (sender, mut outbox) = bounded(bounds(10, 1000));
        offer(&sender, "last");
        drop(sender);
        let mut batch = Vec::new();
        assert_eq!(outbox.recv_many(&mut batch, 10).await, 1);
        assert_eq!(outbox.recv_many(&mut batch, 10).await, 0);
    }

    #[test]
    fn offers_to_an_ended_session_are_refused() {
        let (sender, outbox) = bounded(bounds(10, 1000));
        drop(outbox);
        assert_eq!(offer(&sender, "x"), Offer::Gone);
    }

    #[tokio::test]
    async fn an_outbox_past_half_full_wakes_its_session_at_once() {
        let (sender, mut outbox) = bounded(Bounds {
            frames: 4,
            bytes: 1000,
        });
        let session = tokio::spawn(async move {
            let mut batch = Vec::new();
            outbox.recv_many(&mut batch, 10).await;
            batch.len()
        });
        tokio::task::yield_now().await;
        let mut wakes = Vec::new();
        for text in ["1", "2", "3"] {
            assert_eq!(
                sender.offer(Message::Text(text.into()), &mut wakes),
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
