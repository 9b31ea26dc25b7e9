//! The Redis Cluster broker: sharded pub/sub (SSUBSCRIBE / SPUBLISH).
//!
//! Classic PUBLISH on a cluster is broadcast over the cluster bus to every
//! node, so each node carries all of the traffic and adding masters adds no
//! pub/sub capacity. A sharded channel lives on the master that owns its
//! slot: SPUBLISH goes there alone and SSUBSCRIBE reads from there alone, so
//! the partitioned channels of `topology::Channels` spread the load over the
//! masters. Direct messages stay on classic PSUBSCRIBE (sharded pub/sub has
//! no patterns); they are few.
//!
//! redis-rs resubscribes by itself after a reconnect or a topology refresh.
//! When a slot moves, the old owner ends its subscriptions with an
//! unsolicited `sunsubscribe` push; redis-rs takes that as final, so this
//! broker subscribes again, and the new SSUBSCRIBE follows the slot's
//! `MOVED` redirect to the new owner.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::try_join_all;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{OnceCell, mpsc};

use super::{Broker, BrokerError, Inbound, Outbound, Subscription, Topic, snapshot_writes};
use crate::backoff::Backoff;

/// How long connecting or a single request may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A broker backed by a Redis Cluster.
#[derive(Clone)]
pub struct ClusterBroker {
    nodes: Arc<[String]>,
    /// Connected on first use; redis-rs reconnects and follows slots after that.
    publisher: Arc<OnceCell<ClusterConnection>>,
}

impl std::fmt::Debug for ClusterBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URLs may carry passwords.
        f.debug_struct("ClusterBroker")
            .field("seed_nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

impl ClusterBroker {
    /// A broker for the cluster that `nodes` (seed URLs) belong to. Nothing is connected yet.
    pub fn new(nodes: &[String]) -> Result<Self, BrokerError> {
        // Fails early on malformed URLs.
        Self::builder(nodes).build()?;
        Ok(Self {
            nodes: nodes.into(),
            publisher: Arc::new(OnceCell::new()),
        })
    }

    fn builder(nodes: &[String]) -> ClusterClientBuilder {
        ClusterClientBuilder::new(nodes.iter().map(String::as_str))
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            // Small, latency-sensitive writes: no Nagle delay (see `redis_client`).
            .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
    }

    async fn publisher(&self) -> Result<ClusterConnection, BrokerError> {
        let connect = || async {
            Self::builder(&self.nodes)
                .build()?
                .get_async_connection()
                .await
        };
        Ok(self.publisher.get_or_try_init(connect).await?.clone())
    }
}

/// The part of a key or channel name that picks its slot: the first
/// non-empty `{tag}`, else the whole name (the Redis Cluster rule).
fn hash_tag(name: &str) -> &str {
    name.split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(tag, _)| tag)
        .filter(|tag| !tag.is_empty())
        .unwrap_or(name)
}

/// Routes subscription pushes to topic indexes.
struct Router {
    /// Channel name → topic index, for sharded and plain channels.
    channels: HashMap<Vec<u8>, usize>,
    /// Pattern → topic index.
    patterns: HashMap<Vec<u8>, usize>,
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

    /// What must be subscribed again after `push`, if anything.
    fn repair(&self, push: &PushInfo) -> Option<Repair> {
        match push.kind {
            // Unsolicited: the slot of a channel of ours moved away.
            PushKind::SUnsubscribe => {
                let channel = push.data.first().cloned().and_then(bulk)?;
                self.channels.get(&channel).copied().map(Repair::Topic)
            }
            // A node's connection dropped: redis-rs reconnects and replays
            // its subscriptions once, which a node still starting up (or
            // refusing with CLUSTERDOWN) loses.
            PushKind::Disconnection => Some(Repair::All),
            _ => None,
        }
    }
}

/// Subscriptions to restore.
#[derive(Debug, Clone, Copy)]
enum Repair {
    /// The topic with this index.
    Topic(usize),
    /// Every topic (repeating a live subscription is harmless).
    All,
}

async fn subscribe_to(connection: &mut ClusterConnection, topic: &Topic) -> redis::RedisResult<()> {
    match topic {
        Topic::Sharded(name) => connection.ssubscribe(name).await,
        Topic::Channel(name) => connection.subscribe(name).await,
        Topic::Pattern(pattern) => connection.psubscribe(pattern).await,
    }
}

/// Restores subscriptions on request, retrying each until Redis accepts it,
/// beside the message stream so a node that stays down delays no messages
/// from the others. Ends when the subscription is dropped.
async fn keep_subscribed(
    mut connection: ClusterConnection,
    topics: Vec<Topic>,
    mut requests: mpsc::UnboundedReceiver<Repair>,
) {
    let mut pending: Vec<usize> = Vec::new();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let add = |pending: &mut Vec<usize>, repair: Repair| match repair {
        Repair::Topic(index) if !pending.contains(&index) => pending.push(index),
        Repair::Topic(_) => {}
        Repair::All => {
            pending.clear();
            pending.extend(0..topics.len());
        }
    };
    loop {
        if pending.is_empty() {
            match requests.recv().await {
                Some(repair) => add(&mut pending, repair),
                None => return,
            }
        }
        while let Ok(repair) = requests.try_recv() {
            add(&mut pending, repair);
        }
        let mut failed = None;
        let mut still = Vec::new();
        for index in pending.drain(..) {
            if let Err(err) = subscribe_to(&mut connection, &topics[index]).await {
                failed = Some(err);
                still.push(index);
            }
        }
        pending = still;
        match failed {
            None => {
                backoff.reset();
                tracing::info!("redis cluster subscriptions restored");
            }
            Some(err) => {
                tracing::debug!(cause = %err, topics = pending.len(), "cannot restore redis cluster subscriptions yet; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    closed = requests.recv() => match closed {
                        Some(repair) => add(&mut pending, repair),
                        None => return,
                    },
                }
            }
        }
    }
}

fn bulk(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        _ => None,
    }
}

impl Broker for ClusterBroker {
    async fn subscribe(&self, topics: &[Topic]) -> Result<Subscription, BrokerError> {
        let (pushes, received) = mpsc::unbounded_channel::<PushInfo>();
        let client = Self::builder(&self.nodes)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(pushes)
            .build()?;
        let mut connection = client.get_async_connection().await?;
        for topic in topics {
            subscribe_to(&mut connection, topic).await?;
        }
        let router = Router::new(topics);
        let (repairs, requests) = mpsc::unbounded_channel();
        tokio::spawn(keep_subscribed(connection, topics.to_vec(), requests));
        // redis-rs reconnects on its own, so this stream ends only when the
        // subscriber drops it (and with it the connection and the keeper).
        let messages = futures_util::stream::unfold(
            (router, received, repairs),
            |(router, mut pushes, repairs)| async move {
                while let Some(push) = pushes.recv().await {
                    if let Some(repair) = router.repair(&push) {
                        if matches!(repair, Repair::All) {
                            tracing::warn!(
                                "a redis cluster connection dropped; reconnecting and resubscribing"
                            );
                        }
                        let _ = repairs.send(repair);
                    } else if let Some(inbound) = router.message(push) {
                        return Some((inbound, (router, pushes, repairs)));
                    }
                }
                None
            },
        );
        Ok(messages.boxed())
    }

    async fn publish(&self, batch: &[Outbound]) -> Result<(), BrokerError> {
        if batch.is_empty() {
            return Ok(());
        }
        // A pipeline must stay within one slot: one per hash tag, sent
        // concurrently. A channel's messages share a tag, so their order holds.
        let mut slots: HashMap<&str, Vec<&Outbound>> = HashMap::new();
        for message in batch {
            slots
                .entry(hash_tag(&message.channel))
                .or_default()
                .push(message);
        }
        let pipes = slots.into_values().map(|messages| {
            let mut pipe = redis::pipe();
            // Snapshots first, as on a single server (see `RedisBroker::publish`).
            for hset in snapshot_writes(messages.iter().copied()) {
                pipe.add_command(hset).ignore();
            }
            for message in messages {
                pipe.spublish(&*message.channel, message.payload.as_ref())
                    .ignore();
            }
            pipe
        });
        let connection = self.publisher().await?;
        try_join_all(pipes.map(|pipe| {
            let mut connection = connection.clone();
            async move { pipe.query_async::<()>(&mut connection).await }
        }))
        .await?;
        Ok(())
    }

    async fn read_snapshots(&self, keys: &[String]) -> Result<Vec<(String, Bytes)>, BrokerError> {
        let mut connection = self.publisher().await?;
        let mut snapshots = Vec::new();
        for key in keys {
            let entries: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
                .arg(key)
                .query_async(&mut connection)
                .await?;
            snapshots.extend(entries.into_iter().map(|(f, v)| (f, Bytes::from(v))));
        }
        Ok(snapshots)
    }

    fn describe(&self) -> String {
        format!("redis cluster ({} seed nodes)", self.nodes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::hash_tag;

    #[test]
    fn hash_tags_follow_the_cluster_rule() {
        assert_eq!(hash_tag("sma.{7}"), "7");
        assert_eq!(hash_tag("quotebridge:latest.{7}"), "7");
        assert_eq!(hash_tag("quotes.rejected"), "quotes.rejected");
        assert_eq!(hash_tag("a{}b"), "a{}b");
        assert_eq!(hash_tag("a{x}{y}"), "x");
    }
}
