//! An in-process broker with Redis's pub/sub semantics: every subscription
//! whose channel or pattern matches receives the message, patterns follow
//! Redis's glob rules, and a subscriber that falls too far behind loses
//! messages (Redis would disconnect it) instead of stalling the publisher.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use futures_util::StreamExt;
use futures_util::stream;
use tokio::sync::mpsc;

use super::{Broker, BrokerError, Inbound, Outbound, SnapshotSlot, Subscription, Topic};

/// How many messages one subscription may hold before new ones are dropped.
const SUBSCRIPTION_QUEUE: usize = 65_536;

/// A pub/sub broker living inside this process. Clones share the same channels.
#[derive(Debug, Clone, Default)]
pub struct MemoryBroker {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    subscribers: Vec<Subscriber>,
    /// Hash key → field → value, as HSET would leave them.
    snapshots: HashMap<String, HashMap<String, Bytes>>,
}

#[derive(Debug)]
struct Subscriber {
    topics: Vec<Topic>,
    queue: mpsc::Sender<Inbound>,
}

impl MemoryBroker {
    /// A broker with no subscribers.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state inconsistent
        // (every mutation is a single push, insert or retain), so poison is ignored.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Broker for MemoryBroker {
    async fn subscribe(&self, topics: &[Topic]) -> Result<Subscription, BrokerError> {
        let (queue, rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        self.lock().subscribers.push(Subscriber {
            topics: topics.to_vec(),
            queue,
        });
        let messages = stream::unfold(rx, |mut rx| async move {
            let message = rx.recv().await?;
            Some((message, rx))
        });
        Ok(messages.boxed())
    }

    async fn forget_snapshots(&self, slots: &[&SnapshotSlot]) -> Result<(), BrokerError> {
        let mut state = self.lock();
        for slot in slots {
            if let Some(hash) = state.snapshots.get_mut(&*slot.key) {
                hash.remove(&*slot.field);
            }
        }
        Ok(())
    }

    async fn publish(&self, batch: &[Outbound]) -> Result<(), BrokerError> {
        let mut state = self.lock();
        state.subscribers.retain(|s| !s.queue.is_closed());
        for message in batch {
            if let Some(slot) = &message.snapshot {
                state
                    .snapshots
                    .entry(slot.key.to_string())
                    .or_default()
                    .insert(slot.field.to_string(), message.payload.clone());
            }
            for subscriber in &state.subscribers {
                for (topic, _) in subscriber
                    .topics
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.matches(&message.channel))
                {
                    let inbound = Inbound {
                        topic,
                        channel: message.channel.to_string(),
                        payload: message.payload.clone(),
                    };
                    if subscriber.queue.try_send(inbound).is_err() {
                        tracing::warn!(
                            channel = %message.channel,
                            "embedded broker subscriber is full; message dropped"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    async fn read_snapshots(&self, keys: &[String]) -> Result<Vec<(String, Bytes)>, BrokerError> {
        let state = self.lock();
        Ok(keys
            .iter()
            .filter_map(|key| state.snapshots.get(key))
            .flat_map(|hash| hash.iter().map(|(f, v)| (f.clone(), v.clone())))
            .collect())
    }

    fn describe(&self) -> String {
        "embedded broker".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(channel: &str, payload: &'static str) -> Outbound {
        Outbound::new(channel.into(), Bytes::from_static(payload.as_bytes()))
    }

    #[tokio::test]
    async fn routes_by_channel_and_pattern_like_redis() {
        let broker = MemoryBroker::new();
        let mut sub = broker
            .subscribe(&[Topic::from_name("quotes"), Topic::from_name("client.*")])
            .await
            .expect("subscribe");
        broker
            .publish(&[
                out("quotes", "q1"),
                out("other", "x"),
                out("client.acme", "hi"),
            ])
            .await
            .expect("publish");
        let first = sub.next().await.expect("first message");
        assert_eq!((first.topic, first.channel.as_str()), (0, "quotes"));
        assert_eq!(first.payload, "q1");
        let second = sub.next().await.expect("second message");
        assert_eq!((second.topic, second.channel.as_str()), (1, "client.acme"));
        assert_eq!(second.payload, "hi");
    }

    #[tokio::test]
    async fn dropped_subscriptions_are_forgotten() {
        let broker = MemoryBroker::new();
        let sub = broker
            .subscribe(&[Topic::from_name("a")])
            .await
            .expect("subscribe");
        drop(sub);
        broker.publish(&[out("a", "x")]).await.expect("publish");
        assert!(broker.lock().subscribers.is_empty());
    }
}
