//! A subscription's pushes on a RESP3 connection, bounded.
//!
//! redis-rs hands every push (message, confirmation, disconnection) to a
//! sender of our choosing. Here that is a bounded queue: when the listener
//! falls a [`SubscriptionBuffer`] behind, the subscription ends (and the listener
//! subscribes again), as Redis itself would cut off a subscriber that far
//! behind, instead of memory growing without limit. Both Redis brokers use it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

use bytes::Bytes;
use futures_util::Stream;
use hashbrown::HashMap;
use redis::{PushInfo, PushKind, Value};
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

/// Bytes the receiver takes off the queue's count at a time.
const RELEASE_LUMP: usize = 64 << 10;

/// What a queued message costs beyond its bytes (the push, its values and
/// their allocations), so the byte bound is close to the memory held.
pub const OVERHEAD_BYTES: usize = 128;

/// The receiving end of a subscription's bounded push queue.
pub(super) struct Pushes {
    received: mpsc::Receiver<PushInfo>,
    overflowed: Arc<AtomicBool>,
    /// Payload bytes queued (added by the sender, taken off here).
    queued_bytes: Arc<AtomicUsize>,
}

/// The bytes a push holds, as counted against [`SubscriptionBuffer::bytes`].
fn push_bytes(push: &PushInfo) -> usize {
    let data: usize = push
        .data
        .iter()
        .map(|value| match value {
            Value::BulkString(bytes) => bytes.len(),
            _ => 0,
        })
        .sum();
    data + OVERHEAD_BYTES
}

/// A push sender for redis-rs that queues into a new [`Pushes`] and, once
/// full, drops pushes and marks the queue overflowed (redis-rs must not
/// block its connection on us).
pub(super) fn bounded(
    buffer: SubscriptionBuffer,
) -> (
    impl Fn(PushInfo) -> Result<(), redis::aio::SendError> + Send + Sync + 'static,
    Pushes,
) {
    bounded_to(buffer.messages, buffer.bytes)
}

fn bounded_to(
    capacity: usize,
    capacity_bytes: usize,
) -> (
    impl Fn(PushInfo) -> Result<(), redis::aio::SendError> + Send + Sync + 'static,
    Pushes,
) {
    let (pushes, received) = mpsc::channel::<PushInfo>(capacity);
    let overflowed = Arc::new(AtomicBool::new(false));
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let sender = {
        let overflowed = overflowed.clone();
        let queued_bytes = queued_bytes.clone();
        move |push: PushInfo| {
            // Counted before it is queued, so the receiver never takes off
            // what was not yet added.
            let bytes = push_bytes(&push);
            let over = queued_bytes.fetch_add(bytes, Relaxed) + bytes > capacity_bytes;
            if over || pushes.try_send(push).is_err() {
                queued_bytes.fetch_sub(bytes, Relaxed);
                overflowed.store(true, Relaxed);
            }
            Ok(())
        }
    };
    (
        sender,
        Pushes {
            received,
            overflowed,
            queued_bytes,
        },
    )
}

impl Pushes {
    /// The messages for `topics`, in order. Ends when the connection drops
    /// (its sender goes), when subscriptions may have been lost, or once the
    /// queue overflowed, which is counted in `overflows`. `what` names the
    /// subscription in log lines.
    pub(super) fn into_messages(
        self,
        topics: &[Topic],
        what: &'static str,
        overflows: Arc<AtomicU64>,
    ) -> impl Stream<Item = Inbound> + Send + 'static {
        let router = Router::new(topics);
        futures_util::stream::unfold(
            (router, self, overflows, 0usize),
            move |(router, mut pushes, overflows, mut taken)| async move {
                while let Some(push) = pushes.received.recv().await {
                    // Handed back to the sender's count in lumps: a shared
                    // counter written from both cores on every message would
                    // bounce between their caches. The bound reads at most
                    // a lump high.
                    taken += push_bytes(&push);
                    if taken >= RELEASE_LUMP {
                        pushes.queued_bytes.fetch_sub(taken, Relaxed);
                        taken = 0;
                    }
                    if pushes.overflowed.load(Relaxed) {
                        overflows.fetch_add(1, Relaxed);
                        tracing::warn!(
                            subscription = what,
                            "fell behind the subscription; resubscribing"
                        );
                        return None;
                    }
                    match router.event(push) {
                        Event::Message(inbound) => {
                            return Some((inbound, (router, pushes, overflows, taken)));
                        }
                        Event::Lost(why) => {
                            tracing::warn!(
                                why,
                                subscription = what,
                                "subscriptions may be lost; resubscribing"
                            );
                            return None;
                        }
                        Event::Ignore => {}
                    }
                }
                None
            },
        )
    }
}

/// Routes subscription pushes to topic indexes.
struct Router {
    /// Channel name → topic index, for sharded and plain channels.
    channels: HashMap<Vec<u8>, usize>,
    /// Pattern → topic index.
    patterns: HashMap<Vec<u8>, usize>,
}

/// What a push means for the subscription.
enum Event {
    /// A message for the topic it names.
    Message(Inbound),
    /// Subscriptions were lost: start over.
    Lost(&'static str),
    /// Nothing for us (confirmations, other channels).
    Ignore,
}

impl Router {
    fn new(topics: &[Topic]) -> Self {
        let mut router = Router {
            channels: HashMap::new(),
            patterns: HashMap::new(),
        };
        for (index, topic) in topics.iter().enumerate() {
            match topic {
                Topic::Sharded(name) | Topic::Channel(name) => {
                    router.channels.insert(name.clone().into_bytes(), index)
                }
                Topic::Pattern(pattern) => {
                    router.patterns.insert(pattern.clone().into_bytes(), index)
                }
            };
        }
        router
    }

    fn event(&self, push: PushInfo) -> Event {
        match push.kind {
            PushKind::SMessage | PushKind::Message | PushKind::PMessage => {
                self.message(push).map_or(Event::Ignore, Event::Message)
            }
            // Unsolicited (this side never unsubscribes): the slot of a
            // channel of ours moved to another master.
            PushKind::SUnsubscribe => {
                let ours = push
                    .data
                    .into_iter()
                    .next()
                    .and_then(bulk)
                    .is_some_and(|channel| self.channels.contains_key(&channel));
                if ours {
                    Event::Lost("a slot moved to another master")
                } else {
                    Event::Ignore
                }
            }
            // redis-rs reconnects the node and replays its subscriptions
            // once, which a master still starting up (CLUSTERDOWN) loses.
            PushKind::Disconnection => Event::Lost("a node connection dropped"),
            _ => Event::Ignore,
        }
    }

    /// The message a push carries, if it is one for a topic of ours.
    fn message(&self, push: PushInfo) -> Option<Inbound> {
        let mut data = push.data.into_iter();
        let (topic, channel) = match push.kind {
            PushKind::SMessage | PushKind::Message => {
                let channel = bulk(data.next()?)?;
                (*self.channels.get(&channel)?, channel)
            }
            PushKind::PMessage => {
                let pattern = bulk(data.next()?)?;
                let channel = bulk(data.next()?)?;
                (*self.patterns.get(&pattern)?, channel)
            }
            _ => return None,
        };
        Some(Inbound {
            topic,
            channel: String::from_utf8(channel).ok()?,
            payload: Bytes::from(bulk(data.next()?)?),
        })
    }
}

fn bulk(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn message(channel: &str, payload: &str) -> PushInfo {
        PushInfo {
            kind: PushKind::Message,
            data: vec![
                Value::BulkString(channel.as_bytes().to_vec()),
                Value::BulkString(payload.as_bytes().to_vec()),
            ],
        }
    }

    /// Every message `pushes` yields for the channel `quotes`, and how many
    /// overflows it counted.
    async fn drain(pushes: Pushes) -> (Vec<Inbound>, u64) {
        let overflows = Arc::new(AtomicU64::new(0));
        let got = pushes
            .into_messages(
                &[Topic::Channel("quotes".into())],
                "test",
                overflows.clone(),
            )
            .collect()
            .await;
        (got, overflows.load(Relaxed))
    }

    #[tokio::test]
    async fn messages_are_routed_to_their_topics_and_others_ignored() {
        let (send, pushes) = bounded_to(8, 1 << 20);
        let topics = [
            Topic::Channel("quotes".into()),
            Topic::Pattern("client.*".into()),
        ];
        send(message("quotes", "q1")).expect("queued");
        send(message("elsewhere", "x")).expect("queued");
        send(PushInfo {
            kind: PushKind::PMessage,
            data: vec![
                Value::BulkString(b"client.*".to_vec()),
                Value::BulkString(b"client.acme".to_vec()),
                Value::BulkString(b"hi".to_vec()),
            ],
        })
        .expect("queued");
        drop(send);
        let got: Vec<(usize, String, Bytes)> = pushes
            .into_messages(&topics, "test", Arc::default())
            .map(|m| (m.topic, m.channel, m.payload))
            .collect()
            .await;
        assert_eq!(
            got,
            [
                (0, "quotes".into(), Bytes::from("q1")),
                (1, "client.acme".into(), Bytes::from("hi"))
            ]
        );
    }

    #[tokio::test]
    async fn an_overflowing_queue_ends_the_subscription_and_is_counted() {
        let (send, pushes) = bounded_to(4, 1 << 20);
        for i in 0..10 {
            send(message("quotes", &i.to_string())).expect("never blocks");
        }
        let (got, overflows) = drain(pushes).await;
        assert!(
            got.is_empty(),
            "nothing after an overflow is trusted: {got:?}"
        );
        assert_eq!(overflows, 1);
        drop(send);
    }

    #[tokio::test]
    async fn a_queue_over_its_byte_bound_overflows_too() {
        let (send, pushes) = bounded_to(1000, 100 + 2 * OVERHEAD_BYTES);
        send(message("quotes", &"x".repeat(50))).expect("queued");
        send(message("quotes", &"y".repeat(50))).expect("never blocks");
        let (got, overflows) = drain(pushes).await;
        assert!(got.is_empty());
        assert_eq!(overflows, 1);
        drop(send);
    }

    #[tokio::test]
    async fn a_disconnection_ends_the_subscription() {
        let (send, pushes) = bounded_to(8, 1 << 20);
        send(message("quotes", "q1")).expect("queued");
        send(PushInfo {
            kind: PushKind::Disconnection,
            data: vec![],
        })
        .expect("queued");
        send(message("quotes", "q2")).expect("queued");
        let (got, overflows) = drain(pushes).await;
        assert_eq!((got.len(), overflows), (1, 0));
    }
}
