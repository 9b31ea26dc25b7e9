//! A RESP3 connection's subscription pushes, queued bounded.
//!
//! redis-rs hands every push (message, confirmation, disconnection) to a
//! sender of our choosing: here a [`bounded`](crate::queue::bounded) queue,
//! whose receiving side routes each message to its topic. The cluster broker
//! subscribes this way.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use futures_util::Stream;
use redis::{PushInfo, PushKind, Value};

use crate::queue::{self, OVERHEAD_BYTES, Queue, Step, SubscriptionBuffer, TopicIndex, Weighed};
use crate::{Inbound, Topic};

impl Weighed for PushInfo {
    fn bytes(&self) -> usize {
        let data: usize = self
            .data
            .iter()
            .map(|value| match value {
                Value::BulkString(bytes) => bytes.len(),
                _ => 0,
            })
            .sum();
        data + OVERHEAD_BYTES
    }
}

/// The pushes of one connection, queued.
pub(super) struct Pushes(Queue<PushInfo>);

/// A push sender for redis-rs that queues into a new [`Pushes`] and, once
/// full, drops pushes and marks the queue overflowed (redis-rs must not
/// block its connection on us).
pub(super) fn bounded(
    buffer: SubscriptionBuffer,
) -> (
    impl Fn(PushInfo) -> Result<(), redis::aio::SendError> + Send + Sync + 'static,
    Pushes,
) {
    let (sender, queue) = queue::bounded(buffer);
    let send = move |push: PushInfo| {
        sender.offer(push);
        Ok(())
    };
    (send, Pushes(queue))
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
        let index = TopicIndex::new(topics);
        self.0
            .into_messages(what, overflows, move |push| step(&index, push))
    }
}

/// What a push means for the subscription.
fn step(index: &TopicIndex, push: PushInfo) -> Step {
    match push.kind {
        PushKind::SMessage | PushKind::Message | PushKind::PMessage => {
            message(index, push).map_or(Step::Ignore, Step::Message)
        }
        // Unsolicited (this side never unsubscribes): the slot of a channel
        // of ours moved to another master.
        PushKind::SUnsubscribe => {
            let ours = push
                .data
                .into_iter()
                .next()
                .and_then(bulk)
                .is_some_and(|channel| index.channel(&channel).is_some());
            if ours {
                Step::Lost("a slot moved to another master")
            } else {
                Step::Ignore
            }
        }
        // redis-rs reconnects the node and replays its subscriptions once,
        // which a master still starting up (CLUSTERDOWN) loses.
        PushKind::Disconnection => Step::Lost("a node connection dropped"),
        _ => Step::Ignore,
    }
}

/// The message a push carries, if it is one for a topic of ours.
fn message(index: &TopicIndex, push: PushInfo) -> Option<Inbound> {
    let mut data = push.data.into_iter();
    let (topic, channel) = match push.kind {
        PushKind::SMessage | PushKind::Message => {
            let channel = bulk(data.next()?)?;
            (index.channel(&channel)?, channel)
        }
        PushKind::PMessage => {
            let pattern = bulk(data.next()?)?;
            let channel = bulk(data.next()?)?;
            (index.pattern(&pattern)?, channel)
        }
        _ => return None,
    };
    Some(Inbound {
        topic,
        channel: String::from_utf8(channel).ok()?,
        payload: Bytes::from(bulk(data.next()?)?),
    })
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

    fn buffer(messages: usize) -> SubscriptionBuffer {
        SubscriptionBuffer {
            messages,
            bytes: 1 << 20,
        }
    }

    #[tokio::test]
    async fn messages_are_routed_to_their_topics_and_others_ignored() {
        let (send, pushes) = bounded(buffer(8));
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
    async fn a_disconnection_ends_the_subscription() {
        let (send, pushes) = bounded(buffer(8));
        send(message("quotes", "q1")).expect("queued");
        send(PushInfo {
            kind: PushKind::Disconnection,
            data: vec![],
        })
        .expect("queued");
        send(message("quotes", "q2")).expect("queued");
        let got: Vec<Inbound> = pushes
            .into_messages(&[Topic::Channel("quotes".into())], "test", Arc::default())
            .collect()
            .await;
        assert_eq!(got.len(), 1);
    }

    #[tokio::test]
    async fn a_moved_slot_of_ours_ends_the_subscription_and_others_do_not() {
        let (send, pushes) = bounded(buffer(8));
        let unsubscribed = |channel: &str| PushInfo {
            kind: PushKind::SUnsubscribe,
            data: vec![Value::BulkString(channel.as_bytes().to_vec())],
        };
        send(unsubscribed("elsewhere")).expect("queued");
        send(message("quotes", "q1")).expect("queued");
        send(unsubscribed("quotes")).expect("queued");
        send(message("quotes", "q2")).expect("queued");
        let got: Vec<Inbound> = pushes
            .into_messages(&[Topic::Sharded("quotes".into())], "test", Arc::default())
            .collect()
            .await;
        assert_eq!(got.len(), 1);
    }
}
