//! A subscription's bounded queue, between the task that reads a Redis
//! connection and the listener.
//!
//! When the listener falls a [`SubscriptionBuffer`] behind, the queue
//! overflows and the subscription ends (the listener then subscribes again),
//! as Redis itself cuts off a subscriber that far behind, instead of memory
//! growing without limit. Both Redis brokers use it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

use futures_util::Stream;
use hashbrown::HashMap;
use tokio::sync::mpsc;

use super::{Inbound, Topic};

/// How much a subscription may hold for a listener that is behind, before
/// it counts as fallen behind (`redis.subscription_buffer`,
/// `redis.subscription_buffer_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionBuffer {
    /// Messages.
    pub messages: usize,
    /// Bytes: payloads and channel names, plus [`OVERHEAD_BYTES`] a message.
    pub bytes: usize,
}

impl Default for SubscriptionBuffer {
    fn default() -> Self {
        Self {
            messages: 1 << 20,
            bytes: 256 << 20,
        }
    }
}

/// What a queued message costs beyond its bytes (its allocations and the
/// queue's slot), so the byte bound is close to the memory held.
pub const OVERHEAD_BYTES: usize = 128;

/// Bytes the receiver takes off the queue's count at a time.
const RELEASE_LUMP: usize = 64 << 10;

/// Something a queue holds, and the bytes it counts against
/// [`SubscriptionBuffer::bytes`] (including [`OVERHEAD_BYTES`]).
pub(super) trait Weighed {
    fn bytes(&self) -> usize;
}

impl Weighed for Inbound {
    fn bytes(&self) -> usize {
        self.payload.len() + self.channel.len() + OVERHEAD_BYTES
    }
}

/// A new bounded queue.
pub(super) fn bounded<T: Weighed>(buffer: SubscriptionBuffer) -> (QueueSender<T>, Queue<T>) {
    let (items, received) = mpsc::channel(buffer.messages);
    let overflowed = Arc::new(AtomicBool::new(false));
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    (
        QueueSender {
            items,
            overflowed: overflowed.clone(),
            queued_bytes: queued_bytes.clone(),
            capacity_bytes: buffer.bytes,
        },
        Queue {
            received,
            overflowed,
            queued_bytes,
        },
    )
}

/// The sending end of a [`Queue`]. It never waits: once the queue is full it
/// drops what it is given and marks the queue overflowed.
pub(super) struct QueueSender<T> {
    items: mpsc::Sender<T>,
    overflowed: Arc<AtomicBool>,
    /// Bytes queued (added here, taken off by the receiver).
    queued_bytes: Arc<AtomicUsize>,
    capacity_bytes: usize,
}

impl<T: Weighed> QueueSender<T> {
    /// Queues `item`; false once the queue overflowed (the item is dropped).
    pub(super) fn offer(&self, item: T) -> bool {
        // Counted before it is queued, so the receiver never takes off what
        // was not yet added.
        let bytes = item.bytes();
        let over = self.queued_bytes.fetch_add(bytes, Relaxed) + bytes > self.capacity_bytes;
        if over || self.items.try_send(item).is_err() {
            self.queued_bytes.fetch_sub(bytes, Relaxed);
            self.overflow();
            return false;
        }
        true
    }

    /// Marks the queue overflowed without offering anything: for a message
    /// that alone is larger than the whole bound.
    pub(super) fn overflow(&self) {
        self.overflowed.store(true, Relaxed);
    }

    /// The most bytes the queue holds.
    pub(super) fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }
}

/// What the receiving side makes of one queued item.
pub(super) enum Step {
    /// A message for the listener.
    Message(Inbound),
    /// Subscriptions were lost: start over.
    Lost(&'static str),
    /// Nothing for the listener (confirmations, other channels).
    Ignore,
}

/// The receiving end of a bounded queue.
pub(super) struct Queue<T> {
    received: mpsc::Receiver<T>,
    overflowed: Arc<AtomicBool>,
    queued_bytes: Arc<AtomicUsize>,
}

impl<T: Weighed + Send + 'static> Queue<T> {
    /// The messages `step` makes of the queued items, in order. Ends when
    /// every sender is gone (the connection ended), when `step` says the
    /// subscriptions were lost, or once the queue overflowed, which is
    /// counted in `overflows`. `what` names the subscription in log lines.
    pub(super) fn into_messages(
        self,
        what: &'static str,
        overflows: Arc<AtomicU64>,
        step: impl FnMut(T) -> Step + Send + 'static,
    ) -> impl Stream<Item = Inbound> + Send + 'static {
        futures_util::stream::unfold(
            (self, step, overflows, 0usize),
            move |(mut queue, mut step, overflows, mut taken)| async move {
                loop {
                    let item = queue.received.recv().await;
                    // Nothing after an overflow is trusted; one may also
                    // have ended the connection with the queue empty.
                    if queue.overflowed.load(Relaxed) {
                        overflows.fetch_add(1, Relaxed);
                        tracing::warn!(
                            subscription = what,
                            "fell behind the subscription; resubscribing"
                        );
                        return None;
                    }
                    let item = item?;
                    // Handed back to the sender's count in lumps: a shared
                    // counter written from both cores on every message would
                    // bounce between their caches. The bound reads at most a
                    // lump high.
                    taken += item.bytes();
                    if taken >= RELEASE_LUMP {
                        queue.queued_bytes.fetch_sub(taken, Relaxed);
                        taken = 0;
                    }
                    match step(item) {
                        Step::Message(inbound) => {
                            return Some((inbound, (queue, step, overflows, taken)));
                        }
                        Step::Lost(why) => {
                            tracing::warn!(
                                why,
                                subscription = what,
                                "subscriptions may be lost; resubscribing"
                            );
                            return None;
                        }
                        Step::Ignore => {}
                    }
                }
            },
        )
    }
}

/// Which topic a channel or pattern named by the server belongs to.
pub(super) struct TopicIndex {
    /// Channel name → topic index, for sharded and plain channels.
    channels: HashMap<Vec<u8>, usize>,
    /// Pattern → topic index.
    patterns: HashMap<Vec<u8>, usize>,
}

impl TopicIndex {
    pub(super) fn new(topics: &[Topic]) -> Self {
        let mut index = TopicIndex {
            channels: HashMap::new(),
            patterns: HashMap::new(),
        };
        for (at, topic) in topics.iter().enumerate() {
            match topic {
                Topic::Sharded(name) | Topic::Channel(name) => {
                    index.channels.insert(name.clone().into_bytes(), at)
                }
                Topic::Pattern(pattern) => index.patterns.insert(pattern.clone().into_bytes(), at),
            };
        }
        index
    }

    /// The topic subscribed to as the channel `name`.
    pub(super) fn channel(&self, name: &[u8]) -> Option<usize> {
        self.channels.get(name).copied()
    }

    /// The topic subscribed to as `pattern`.
    pub(super) fn pattern(&self, pattern: &[u8]) -> Option<usize> {
        self.patterns.get(pattern).copied()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures_util::StreamExt;

    use super::*;

    fn inbound(payload: &str) -> Inbound {
        Inbound {
            topic: 0,
            channel: "quotes".into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        }
    }

    /// Every message the queue yields, and how many overflows it counted.
    async fn drain(queue: Queue<Inbound>) -> (Vec<Inbound>, u64) {
        let overflows = Arc::new(AtomicU64::new(0));
        let got = queue
            .into_messages("test", overflows.clone(), Step::Message)
            .collect()
            .await;
        (got, overflows.load(Relaxed))
    }

    fn buffer(messages: usize, bytes: usize) -> SubscriptionBuffer {
        SubscriptionBuffer { messages, bytes }
    }

    #[tokio::test]
    async fn messages_arrive_in_order_until_the_sender_goes() {
        let (sender, queue) = bounded(buffer(8, 1 << 20));
        assert!(sender.offer(inbound("q1")));
        assert!(sender.offer(inbound("q2")));
        drop(sender);
        let (got, overflows) = drain(queue).await;
        let payloads: Vec<_> = got.iter().map(|m| m.payload.clone()).collect();
        assert_eq!(payloads, [Bytes::from("q1"), Bytes::from("q2")]);
        assert_eq!(overflows, 0);
    }

    #[tokio::test]
    async fn an_overflowing_queue_ends_the_subscription_and_is_counted() {
        let (sender, queue) = bounded(buffer(4, 1 << 20));
        let taken = (0..10)
            .filter(|i| sender.offer(inbound(&i.to_string())))
            .count();
        assert_eq!(taken, 4);
        let (got, overflows) = drain(queue).await;
        assert!(
            got.is_empty(),
            "nothing after an overflow is trusted: {got:?}"
        );
        assert_eq!(overflows, 1);
        drop(sender);
    }

    #[tokio::test]
    async fn a_queue_over_its_byte_bound_overflows_too() {
        let one = inbound(&"x".repeat(50)).bytes();
        let (sender, queue) = bounded(buffer(1000, one + one / 2));
        assert!(sender.offer(inbound(&"x".repeat(50))));
        assert!(!sender.offer(inbound(&"y".repeat(50))));
        let (got, overflows) = drain(queue).await;
        assert!(got.is_empty());
        assert_eq!(overflows, 1);
        drop(sender);
    }

    #[tokio::test]
    async fn an_overflow_marked_on_an_empty_queue_is_counted_when_the_sender_goes() {
        let (sender, queue) = bounded::<Inbound>(buffer(8, 1 << 20));
        sender.overflow();
        drop(sender);
        let (got, overflows) = drain(queue).await;
        assert_eq!((got.len(), overflows), (0, 1));
    }

    #[test]
    fn topics_are_found_by_channel_and_by_pattern() {
        let index = TopicIndex::new(&[
            Topic::Channel("quotes".into()),
            Topic::Pattern("client.*".into()),
        ]);
        assert_eq!(index.channel(b"quotes"), Some(0));
        assert_eq!(index.pattern(b"client.*"), Some(1));
        assert_eq!(index.channel(b"client.*"), None);
        assert_eq!(index.pattern(b"quotes"), None);
    }
}
