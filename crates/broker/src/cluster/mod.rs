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
//! Resubscription: when a slot moves, the old owner ends its subscriptions
//! with an unsolicited `sunsubscribe` push, which redis-rs takes as final;
//! when a node's connection drops, redis-rs reconnects and replays its
//! subscriptions once, which a master still starting up refuses. Either way
//! (and when the cluster stops answering PING) the subscription stream ends
//! and the listener subscribes again on a fresh connection, with backoff,
//! reloading snapshots and answering `/readyz` with 503 meanwhile — the same
//! path as a lost single-server subscription.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::try_join_all;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use tokio::sync::OnceCell;

mod push_queue;

use super::queue::SubscriptionBuffer;
use super::tls::{Tls, TlsFiles};
use super::{
    Broker, BrokerError, HealthCheck, Outbound, SnapshotSlot, Subscription, Topic,
    snapshot_deletes, snapshot_writes, until_unanswered,
};

/// How long connecting or a single request may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A broker backed by a Redis Cluster.
#[derive(Clone)]
pub struct ClusterBroker {
    nodes: Arc<[String]>,
    health_check: HealthCheck,
    /// Connected on first use; redis-rs reconnects and follows slots after that.
    publisher: Arc<OnceCell<ClusterConnection>>,
    /// Subscriptions ended because the listener fell behind.
    overflows: Arc<AtomicU64>,
    buffer: SubscriptionBuffer,
    /// For `rediss://` nodes: the certificates every connection uses.
    tls: Option<Tls>,
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
        Self::with_tls(nodes, &TlsFiles::default())
    }

    /// A broker for the cluster of `nodes`; `rediss://` nodes connect over
    /// TLS as `files` say (read now).
    pub fn with_tls(nodes: &[String], files: &TlsFiles) -> Result<Self, BrokerError> {
        let tls = Tls::for_urls(nodes.iter().map(String::as_str), files)?;
        let broker = Self {
            nodes: nodes.into(),
            health_check: HealthCheck::default(),
            publisher: Arc::new(OnceCell::new()),
            overflows: Arc::default(),
            buffer: SubscriptionBuffer::default(),
            tls,
        };
        // Fails early on malformed URLs.
        broker.builder().build()?;
        Ok(broker)
    }

    /// Uses `health_check` on every subscription.
    #[must_use]
    pub fn with_health_check(mut self, health_check: HealthCheck) -> Self {
        self.health_check = health_check;
        self
    }

    /// Bounds what each subscription holds for a listener that is behind.
    #[must_use]
    pub fn with_subscription_buffer(mut self, buffer: SubscriptionBuffer) -> Self {
        self.buffer = buffer;
        self
    }

    fn builder(&self) -> ClusterClientBuilder {
        let builder = ClusterClientBuilder::new(self.nodes.iter().map(String::as_str))
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            // Small, latency-sensitive writes: no Nagle delay (see `redis_client`).
            .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        match &self.tls {
            None => builder,
            Some(tls) if tls.is_insecure() => builder
                .tls(redis::TlsMode::Insecure)
                .certs(tls.certificates()),
            Some(tls) => builder.certs(tls.certificates()),
        }
    }

    async fn publisher(&self) -> Result<ClusterConnection, BrokerError> {
        let connect = || async { self.builder().build()?.get_async_connection().await };
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

async fn subscribe_to(connection: &mut ClusterConnection, topic: &Topic) -> redis::RedisResult<()> {
    match topic {
        Topic::Sharded(name) => connection.ssubscribe(name).await,
        Topic::Channel(name) => connection.subscribe(name).await,
        Topic::Pattern(pattern) => connection.psubscribe(pattern).await,
    }
}

impl Broker for ClusterBroker {
    /// Subscribes on a connection of its own. The stream ends — and the
    /// listener subscribes again from scratch, reloading snapshots and
    /// reporting itself unready meanwhile — whenever subscriptions may have
    /// been lost: a slot moved, a node connection dropped, the cluster
    /// stopped answering, or this side fell a [`SubscriptionBuffer`] behind.
    async fn subscribe(&self, topics: &[Topic]) -> Result<Subscription, BrokerError> {
        let (push_sender, pushes) = push_queue::bounded(self.buffer);
        let client = self
            .builder()
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(push_sender)
            .build()?;
        let mut connection = client.get_async_connection().await?;
        for topic in topics {
            subscribe_to(&mut connection, topic).await?;
        }
        // A node that died silently sends no disconnection.
        let dead = Box::pin(until_unanswered(
            self.health_check,
            "redis cluster",
            move || {
                let mut connection = connection.clone();
                async move { redis::cmd("PING").query_async::<()>(&mut connection).await }
            },
        ));
        let messages =
            pushes.into_messages(topics, "redis cluster subscription", self.overflows.clone());
        Ok(messages.take_until(dead).boxed())
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
            for hset in snapshot_writes(messages.iter().filter_map(|m| m.snapshot_write())) {
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

    async fn forget_snapshots(&self, slots: &[&SnapshotSlot]) -> Result<(), BrokerError> {
        if slots.is_empty() {
            return Ok(());
        }
        // One HDEL per hash: each goes to the node of its key's slot.
        let mut connection = self.publisher().await?;
        for hdel in snapshot_deletes(slots.iter().copied()) {
            hdel.query_async::<()>(&mut connection).await?;
        }
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

    fn overflows(&self) -> u64 {
        self.overflows.load(Relaxed)
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
