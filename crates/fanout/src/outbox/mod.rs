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
//!
//! A subscription may also ask for a maximum rate per key ([`throttle`]): a
//! result that comes sooner than `1/max_rate` after its key's last one waits,
//! replaced by any newer one, until its key is due, so the newest value
//! arrives within `1/max_rate` while what waits fits the byte bound (past it,
//! a result that would start to wait is skipped: never more often than asked).
//!
//! What every outbox holds is summed in one [`QueuedBytes`] gauge, kept as
//! frames come and go: reading it walks no socket.

mod conflation;
mod throttle;

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, PoisonError};
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use self::conflation::Latest;
use self::throttle::{Hold, Throttle};
use crate::frame::{Burst, Frame, SharedResult};
use crate::names::StreamName;
use crate::sync::{Mutex, MutexGuard};

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
    /// Its key is rate-limited and not yet due: the frame waits as the
    /// key's next, replacing `replaced` older ones (0 or 1).
    Throttled {
        /// Frames of the key this one replaced.
        replaced: u64,
    },
    /// Its key is rate-limited and not yet due, and the frames waiting for
    /// their rate are at the byte bound: the frame is dropped (its key's next
    /// result is offered as usual), and counted as conflated.
    Skipped,
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

/// What offering one or more frames to one outbox did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offers {
    /// Frames queued (throttled and conflated ones included).
    pub queued: u64,
    /// Older frames of their keys that queued ones replaced.
    pub conflated: u64,
    /// Whether the outbox was found full: the socket is a slow consumer.
    pub full: bool,
}

impl From<Offer> for Offers {
    fn from(offer: Offer) -> Self {
        match offer {
            Offer::Queued => Self {
                queued: 1,
                ..Self::default()
            },
            Offer::Conflated { replaced } | Offer::Throttled { replaced } => Self {
                queued: 1,
                conflated: replaced,
                full: false,
            },
            Offer::Skipped => Self {
                conflated: 1,
                ..Self::default()
            },
            Offer::Full => Self {
                full: true,
                ..Self::default()
            },
            Offer::Gone => Self::default(),
        }
    }
}

/// Payload bytes waiting in every outbox that shares it: queued, conflated
/// and held back by rate limits. Cheap to clone; clones see one sum.
#[derive(Debug, Clone, Default)]
pub struct QueuedBytes(Arc<AtomicI64>);

impl QueuedBytes {
    /// The bytes waiting now.
    #[must_use]
    pub fn get(&self) -> usize {
        // A session may take frames before the hub has added them in: the
        // sum is briefly negative, never wrong for long.
        usize::try_from(self.0.load(Relaxed)).unwrap_or(0)
    }

    fn add(&self, delta: i64) {
        if delta != 0 {
            self.0.fetch_add(delta, Relaxed);
        }
    }
}

/// What offers leave for their caller to do once it has offered all it has:
/// wake the sessions frames were queued for, and add the bytes they queued
/// to the [`QueuedBytes`] gauge (once, not once per socket).
#[derive(Debug, Default)]
pub struct Offered {
    /// Sessions to wake.
    pub wakes: Vec<Waker>,
    /// Bytes the offers added to outboxes, net of what they replaced.
    pub bytes: i64,
}

impl Offered {
    /// Adds the bytes noted so far to `gauge`.
    pub fn settle(&mut self, gauge: &QueuedBytes) {
        gauge.add(std::mem::take(&mut self.bytes));
    }
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

#[derive(Debug)]
struct Queue {
    frames: VecDeque<Frame>,
    /// Messages in `frames`: a burst counts its results.
    count: usize,
    /// Payload bytes in `frames`.
    bytes: usize,
    /// While conflating: the latest frame of each key that did not fit,
    /// sent once `frames` is drained. Allocated only for a socket that
    /// fell behind.
    latest: Option<Box<Latest>>,
    /// The rate limits of the socket's subscriptions, if any asked for one.
    throttle: Option<Box<Throttle>>,
    /// The bridge-wide sum of what outboxes hold.
    gauge: QueuedBytes,
    /// The hub dropped its sender: no more frames will come.
    closed: bool,
    /// The session dropped its outbox: frames would never be taken.
    abandoned: bool,
    /// The session, when it waits on an empty queue.
    waiting: Option<Waker>,
    /// A clone of `waiting` was handed to a caller to wake later.
    wake_handed_out: bool,
}

#[derive(Debug)]
struct Shared(Mutex<Queue>);

impl Queue {
    /// Payload bytes held: queued, conflated and waiting for a rate.
    fn held_bytes(&self) -> usize {
        let latest = self.latest.as_ref().map_or(0, |latest| latest.bytes);
        let throttled = self
            .throttle
            .as_ref()
            .map_or(0, |throttle| throttle.waiting_bytes);
        self.bytes + latest + throttled
    }

    /// Subtracts `freed` bytes, taken or dropped, from the gauge.
    fn freed(&self, freed: usize) {
        self.gauge.add(-(freed as i64));
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while the lock is held, so a poisoned lock still
        // guards a consistent queue.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A new, empty outbox bounded by `bounds`, whose bytes count in `gauge`:
/// the hub's end and the session's.
#[must_use]
pub fn bounded(bounds: Bounds, gauge: QueuedBytes) -> (Sender, Outbox) {
    let shared = Arc::new(Shared(Mutex::new(Queue {
        frames: VecDeque::new(),
        count: 0,
        bytes: 0,
        latest: None,
        throttle: None,
        gauge,
        closed: false,
        abandoned: false,
        waiting: None,
        wake_handed_out: false,
    })));
    (
        Sender {
            shared: shared.clone(),
            bounds,
        },
        Outbox { shared, due: None },
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
    /// Payload bytes waiting in the outbox: queued, kept as their keys'
    /// latest while conflating, and held back by rate limits.
    #[must_use]
    #[cfg(test)]
    pub fn queued_bytes(&self) -> usize {
        self.shared.lock().held_bytes()
    }

    /// Queues `frame` unless the outbox is full or its session has ended.
    /// When the session must be woken to take it, its waker is added to
    /// `offered`: the caller wakes it, once it has queued all it has; so are
    /// the bytes it added. An outbox past half of either bound wakes its
    /// session at once instead, so deferring never makes a socket that keeps
    /// up a slow consumer.
    pub fn offer(&self, frame: Frame, offered: &mut Offered) -> Offer {
        let mut queue = self.shared.lock();
        let before = queue.held_bytes();
        let (offer, wake_now) = self.offer_locked(&mut queue, frame, &mut offered.wakes);
        offered.bytes += queue.held_bytes() as i64 - before as i64;
        drop(queue);
        if let Some(waker) = wake_now {
            waker.wake();
        }
        offer
    }

    /// [`Sender::offer`] for several results under one lock of the outbox:
    /// a burst, for a socket that wants all of it. Stops at the first that
    /// finds the outbox full (the socket is then a slow consumer) or its
    /// session gone.
    pub fn offer_results<'f>(
        &self,
        results: impl IntoIterator<Item = &'f SharedResult>,
        offered: &mut Offered,
    ) -> Offers {
        let mut offers = Offers::default();
        let mut results = results.into_iter().peekable();
        if results.peek().is_none() {
            return offers;
        }
        let mut queue = self.shared.lock();
        let before = queue.held_bytes();
        let mut wake_now = None;
        for result in results {
            let (offer, wake) = self.offer_locked(
                &mut queue,
                Frame::Result(result.clone()),
                &mut offered.wakes,
            );
            wake_now = wake_now.or(wake);
            let stop = matches!(offer, Offer::Full | Offer::Gone);
            let offer = Offers::from(offer);
            offers.queued += offer.queued;
            offers.conflated += offer.conflated;
            if stop {
                offers.full = offer.full;
                break;
            }
        }
        offered.bytes += queue.held_bytes() as i64 - before as i64;
        drop(queue);
        if let Some(waker) = wake_now {
            waker.wake();
        }
        offers
    }

    /// [`Sender::offer`] under the outbox's lock; also returns a session to
    /// wake at once, after the lock is released.
    fn offer_locked(
        &self,
        queue: &mut Queue,
        frame: Frame,
        wakes: &mut Vec<Waker>,
    ) -> (Offer, Option<Waker>) {
        let len = frame.payload_len();
        if queue.abandoned {
            return (Offer::Gone, None);
        }
        let frame = match (queue.throttle.as_deref_mut(), frame) {
            (Some(throttle), Frame::Result(result)) => {
                match throttle.hold(result, self.bounds.bytes) {
                    Ok(Hold::Waiting { replaced }) => return (Offer::Throttled { replaced }, None),
                    Ok(Hold::Skipped) => return (Offer::Skipped, None),
                    Ok(Hold::First { due }) => {
                        // A deadline before the armed one: the session re-arms.
                        let sooner = throttle.armed.is_none_or(|armed| due < armed);
                        let wake = if sooner { queue.waiting.take() } else { None };
                        return (Offer::Throttled { replaced: 0 }, wake);
                    }
                    Err(result) => Frame::Result(result),
                }
            }
            (_, frame) => frame,
        };
        let full = queue.count >= self.bounds.frames || queue.bytes + len > self.bounds.bytes;
        // Once a key's frame waits among the latest, every keyed frame goes
        // there too, so none overtakes an older one of its key.
        let conflating = queue.latest.is_some();
        if self.bounds.conflate
            && (full || conflating)
            && let Frame::Result(result) = frame
        {
            let latest = queue.latest.get_or_insert_default();
            if latest.bytes_with(&result, len) > self.bounds.bytes {
                return (Offer::Full, None);
            }
            let replaced = latest.keep(result);
            // It is behind: wake it now, not at the end of the burst.
            return (Offer::Conflated { replaced }, queue.waiting.take());
        }
        if full {
            return (Offer::Full, None);
        }
        (Offer::Queued, self.queue(queue, frame, wakes))
    }

    /// Queues `frame`, which fits; returns a session to wake at once, after
    /// the lock is released.
    fn queue(&self, queue: &mut Queue, frame: Frame, wakes: &mut Vec<Waker>) -> Option<Waker> {
        queue.count += frame.count();
        queue.bytes += frame.payload_len();
        queue.frames.push_back(frame);
        // Only a parked session needs waking: once by the caller, and once
        // more, directly, should the queue fill up before the caller does.
        let filling = queue.count * 2 > self.bounds.frames || queue.bytes * 2 > self.bounds.bytes;
        if filling {
            return queue.waiting.take();
        }
        if !queue.wake_handed_out
            && let Some(waiting) = &queue.waiting
        {
            wakes.push(waiting.clone());
            queue.wake_handed_out = true;
        }
        None
    }

    /// Queues `burst` whole, as one entry, when the outbox can take all of
    /// it as it is: not rate-limited, not conflating, and within its
    /// bounds. `None` otherwise: the caller offers its results one by one
    /// (see [`Sender::offer_results`]), which queues what fits.
    pub fn offer_burst(&self, burst: &Arc<Burst>, offered: &mut Offered) -> Option<Offers> {
        let mut queue = self.shared.lock();
        if queue.abandoned {
            return Some(Offers::default());
        }
        let (count, bytes) = (burst.results().len(), burst.payload_len());
        let fits =
            queue.count + count <= self.bounds.frames && queue.bytes + bytes <= self.bounds.bytes;
        if !fits || queue.throttle.is_some() || queue.latest.is_some() {
            return None;
        }
        let wake_now = self.queue(&mut queue, Frame::Burst(burst.clone()), &mut offered.wakes);
        drop(queue);
        offered.bytes += bytes as i64;
        if let Some(waker) = wake_now {
            waker.wake();
        }
        Some(Offers {
            queued: count as u64,
            ..Offers::default()
        })
    }
}

impl Sender {
    /// Queues frames from `frames` while the outbox stays within half of
    /// each bound, never evicting: what does not fit is left out. Half, so
    /// that live frames arriving before the session drains these still find
    /// room (past half full, `offer` wakes the session at once). Returns how
    /// many were queued. Frames are cloned only once they are queued, so the
    /// work is bounded by the outbox's room, not by the offer. Each is the
    /// latest public result of its symbol: a frame of that key waiting for
    /// its rate (the same result, or an older one) is dropped, so the
    /// socket never gets one result twice.
    pub fn offer_while_room<'f>(
        &self,
        frames: impl IntoIterator<Item = &'f SharedResult>,
        offered: &mut Offered,
    ) -> usize {
        let mut queue = self.shared.lock();
        if queue.abandoned {
            return 0;
        }
        let before = queue.held_bytes();
        let (max_frames, max_bytes) = (self.bounds.frames / 2, self.bounds.bytes / 2);
        let mut queued = 0;
        for frame in frames {
            let len = frame.text().len();
            if queue.count >= max_frames || queue.bytes + len > max_bytes {
                break;
            }
            queue.bytes += len;
            queue.count += 1;
            if let Some(throttle) = queue.throttle.as_deref_mut() {
                throttle.drop_waiting(frame.key());
            }
            queue.frames.push_back(Frame::Result(frame.clone()));
            queued += 1;
        }
        offered.bytes += queue.held_bytes() as i64 - before as i64;
        if queued > 0
            && !queue.wake_handed_out
            && let Some(waiting) = &queue.waiting
        {
            offered.wakes.push(waiting.clone());
            queue.wake_handed_out = true;
        }
        queued
    }
}

impl Sender {
    /// The socket's rate limits, set by its own requests outside the hub.
    #[must_use]
    pub fn rates(&self) -> Rates {
        Rates {
            shared: self.shared.clone(),
            bytes: self.bounds.bytes,
        }
    }

    /// [`Rates::set_rate`].
    #[cfg(test)]
    pub fn set_rate(&self, symbols: &[String], interval: Option<Duration>) {
        self.rates().set_rate(symbols, interval);
    }

    /// [`Rates::unsubscribe`].
    #[cfg(test)]
    pub fn unsubscribe(&self, symbols: &[String]) {
        self.rates().unsubscribe(symbols, |_| false);
    }
}

/// A handle on one outbox, for what its own socket's requests change
/// without the hub's lock: rate limits its session sets, and what a resume
/// replayed.
#[derive(Debug)]
pub struct Rates {
    shared: Arc<Shared>,
    /// The outbox's byte bound, which also bounds what the limits keep.
    bytes: usize,
}

impl Rates {
    /// Limits each of the public `symbols` (`"*"`: every public symbol not
    /// limited by name) to one frame per `interval`, or lifts the limit
    /// (`None`). Work: the symbols named, whatever the keys the socket has.
    pub fn set_rate(&self, symbols: &[String], interval: Option<Duration>) {
        let mut queue = self.shared.lock();
        if interval.is_none() && queue.throttle.is_none() {
            return;
        }
        let bytes = self.bytes;
        let throttle = queue
            .throttle
            .get_or_insert_with(|| Box::new(Throttle::new(bytes)));
        let mut sooner = false;
        for symbol in symbols {
            sooner |= throttle.set(symbol, interval);
        }
        if throttle.is_empty() {
            queue.throttle = None;
        } else if sooner {
            throttle.armed = None;
            if let Some(waiting) = queue.waiting.take() {
                drop(queue);
                waiting.wake();
            }
        }
    }

    /// Drops the queued results `replayed` says a resume sent already, and
    /// returns the bytes that frees: a resume answers its keys while live
    /// results are queued to its socket (see `Hub::resume`). Work: the
    /// socket's queue.
    pub fn forget_replayed(&self, replayed: impl Fn(&SharedResult) -> bool) -> usize {
        let mut queue = self.shared.lock();
        let queue = &mut *queue;
        let before = queue.held_bytes();
        let queued = std::mem::take(&mut queue.frames);
        for frame in queued {
            // A frame holding a replayed result stays result by result,
            // less those (a result alone, or a burst).
            if frame.results().iter().any(&replayed) {
                let kept = frame.results().iter().filter(|result| !replayed(result));
                queue.frames.extend(kept.cloned().map(Frame::Result));
            } else {
                queue.frames.push_back(frame);
            }
        }
        queue.count = queue.frames.iter().map(Frame::count).sum();
        queue.bytes = queue.frames.iter().map(Frame::payload_len).sum();
        if let Some(latest) = queue.latest.as_deref_mut() {
            latest.forget(&replayed);
            if latest.len() == 0 {
                queue.latest = None;
            }
        }
        let freed = before - queue.held_bytes();
        queue.freed(freed);
        freed
    }

    /// Forgets what waits for the unsubscribed `symbols` and lifts their limits.
    /// While a wildcard still covers a symbol (`covered`: `"*"`, or its
    /// series' `"*@series"`), the symbol unsubscribed by name is still
    /// delivered: its own limit goes, the wildcard's rate applies, and its
    /// waiting result stays (it is the newest it has).
    pub fn unsubscribe(&self, symbols: &[String], covered: impl Fn(&str) -> bool) {
        let mut queue = self.shared.lock();
        let Some(throttle) = queue.throttle.as_deref_mut() else {
            return;
        };
        let before = throttle.waiting_bytes;
        for symbol in symbols {
            if !covered(symbol) || StreamName::split(symbol).is_wildcard() {
                throttle.forget(symbol);
            }
        }
        let freed = before - throttle.waiting_bytes;
        queue.freed(freed);
        drop(queue);
        self.set_rate(symbols, None);
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
    /// PendingWakes the session when a rate-limited key's waiting frame is due.
    due: Option<Pin<Box<Sleep>>>,
}

impl Outbox {
    /// Waits for queued frames and moves up to `max` (at least one) of them
    /// into `batch`, and with them, once the queue is drained, the frames of
    /// rate-limited keys that are due; returns how many. 0 means the hub closed the outbox and
    /// everything queued before that has been taken. Cancel-safe: nothing is
    /// taken unless it returns.
    /// Once the queue is drained, the latest frames of a conflating outbox
    /// come all at once, marked [`Taken::conflated`].
    pub async fn recv_many(&mut self, batch: &mut Vec<Frame>, max: usize) -> Taken {
        let Self { shared, due } = self;
        poll_fn(|cx| {
            let mut queue = shared.lock();
            if !queue.frames.is_empty() {
                let take = queue.frames.len().min(max.max(1));
                let (mut freed, mut count) = (0, 0);
                let queue = &mut *queue;
                batch.extend(queue.frames.drain(..take).inspect(|frame| {
                    freed += frame.payload_len();
                    count += frame.count();
                }));
                queue.bytes -= freed;
                queue.count -= count;
                queue.freed(freed);
                // Running now; offers need not wake it until it parks again.
                queue.waiting = None;
                // Rate-limited keys' due frames follow what was queued before
                // them, in the same batch once the queue is drained: steady
                // unlimited traffic must not hold them back for good.
                let mut released = 0;
                if queue.frames.is_empty()
                    && queue.latest.is_none()
                    && let Some(throttle) = queue.throttle.as_deref_mut()
                {
                    let before = throttle.waiting_bytes;
                    released = throttle.release_due(Instant::now(), batch);
                    let freed = before - throttle.waiting_bytes;
                    queue.freed(freed);
                }
                return Poll::Ready(Taken {
                    frames: count + released,
                    conflated: false,
                });
            }
            if let Some(latest) = queue.latest.take() {
                queue.freed(latest.bytes);
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
            // Rate-limited keys' frames go out once due, and only behind
            // everything queued before them, so none overtakes its key's older.
            if let Some(throttle) = queue.throttle.as_deref_mut() {
                let now = Instant::now();
                let before = throttle.waiting_bytes;
                let released = throttle.release_due(now, batch);
                if released > 0 {
                    let freed = before - throttle.waiting_bytes;
                    queue.freed(freed);
                    queue.waiting = None;
                    return Poll::Ready(Taken {
                        frames: released,
                        conflated: false,
                    });
                }
                throttle.armed = throttle.next_due();
                if let Some(deadline) = throttle.armed {
                    let timer =
                        due.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if timer.deadline() != deadline {
                        timer.as_mut().reset(deadline);
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        // Due meanwhile: look again at once.
                        cx.waker().wake_by_ref();
                    }
                }
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
    pub async fn recv(&mut self) -> Option<Frame> {
        let mut one = Vec::with_capacity(1);
        self.recv_many(&mut one, 1).await;
        assert!(one.len() <= 1, "recv is for outboxes that do not conflate");
        one.pop()
    }

    /// A frame queued now, if any.
    pub fn try_recv(&mut self) -> Option<Frame> {
        use futures_util::FutureExt;
        self.recv().now_or_never().flatten()
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.abandoned = true;
        let held = queue.held_bytes();
        queue.freed(held);
        // Frees what was queued now, not when the hub drops its sender.
        queue.frames = VecDeque::new();
        queue.count = 0;
        queue.bytes = 0;
        queue.latest = None;
        queue.throttle = None;
    }
}

#[cfg(test)]
mod tests;
