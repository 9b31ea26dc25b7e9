//! The pub/sub seam: one small trait, two implementations.
//!
//! [`RedisBroker`] is what `serve` uses; [`MemoryBroker`] is an in-process
//! stand-in with Redis's channel and pattern semantics, used by `demo` when no
//! Redis answers and by fast tests.

#![forbid(unsafe_code)]

mod cluster;
mod glob;
mod memory;
mod queue;
mod redis;
mod sentinel;
mod subscriber;
mod tls;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;

pub use self::cluster::ClusterBroker;
pub use self::glob::{glob_match, is_pattern};
pub use self::memory::MemoryBroker;
pub use self::queue::SubscriptionBuffer;
pub use self::redis::{HealthCheck, RedisBroker, client_with_tls as redis_client};
pub use self::sentinel::{Sentinels, is_primary};
pub use self::tls::{Tls, TlsError, TlsFiles, is_tls_url};

/// Something to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// An exact channel name (SUBSCRIBE).
    Channel(String),
    /// A glob pattern (PSUBSCRIBE).
    Pattern(String),
    /// A sharded channel of a Redis Cluster (SSUBSCRIBE).
    Sharded(String),
}

impl Topic {
    /// A pattern when the name contains `*`, `?` or `[`, else a channel.
    #[must_use]
    pub fn from_name(name: &str) -> Self {
        if is_pattern(name) {
            Topic::Pattern(name.to_owned())
        } else {
            Topic::Channel(name.to_owned())
        }
    }

    /// Whether a message published on `channel` reaches this topic.
    #[must_use]
    pub fn matches(&self, channel: &str) -> bool {
        match self {
            Topic::Channel(name) | Topic::Sharded(name) => name == channel,
            Topic::Pattern(pattern) => glob_match(pattern.as_bytes(), channel.as_bytes()),
        }
    }
}

/// A message received through a subscription.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Index, in the list given to [`Broker::subscribe`], of the topic it arrived through.
    pub topic: usize,
    /// The channel it was published on.
    pub channel: String,
    /// The payload, as published.
    pub payload: Bytes,
}

/// Where one public symbol's latest result is kept for gateways: field
/// `symbol` of hash `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSlot {
    /// The hash.
    pub key: Arc<str>,
    /// The field: the symbol.
    pub field: Arc<str>,
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Channel name, shared by every message for the same key.
    pub channel: Arc<str>,
    /// The payload.
    pub payload: Bytes,
    /// Also store the payload here, before publishing it (the latest result
    /// of a public symbol, for gateways' snapshots).
    pub snapshot: Option<Arc<SnapshotSlot>>,
}

impl Outbound {
    /// Where to store this message, with the bytes to store, if anywhere.
    pub(crate) fn snapshot_write(&self) -> Option<(&SnapshotSlot, &[u8])> {
        Some((self.snapshot.as_deref()?, self.payload.as_ref()))
    }

    /// A message to publish on `channel`, stored nowhere.
    #[must_use]
    pub fn new(channel: Arc<str>, payload: Bytes) -> Self {
        Self {
            channel,
            payload,
            snapshot: None,
        }
    }
}

/// Completes when `ping` fails or is not answered within `check.timeout`,
/// asked every `check.interval`: how a subscription that died silently
/// (a half-open connection sends no error) is noticed. `what` names the
/// connection in the log line.
pub(crate) async fn until_unanswered<F, Fut>(check: HealthCheck, what: &str, mut ping: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ::redis::RedisResult<()>>,
{
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match tokio::time::timeout(check.timeout, ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(cause = %err, "{what} failed its health check");
                return;
            }
            Err(_) => {
                tracing::warn!(timeout = ?check.timeout, "{what} did not answer PING; treating it as dead");
                return;
            }
        }
    }
}

/// One HSET per snapshot hash for every `(slot, payload)` of a batch of
/// results, in order. One command with many fields costs Redis far less
/// than one per result; a field given twice ends with its later value, as
/// the results' order requires.
pub fn snapshot_writes<'a>(
    snapshots: impl IntoIterator<Item = (&'a SnapshotSlot, &'a [u8])>,
) -> Vec<::redis::Cmd> {
    per_hash(
        "HSET",
        snapshots
            .into_iter()
            .map(|(slot, payload)| (slot, Some(payload))),
    )
}

/// One HDEL per snapshot hash for the fields of `slots`: the snapshots of
/// keys released for being idle.
pub fn snapshot_deletes<'a>(
    slots: impl IntoIterator<Item = &'a SnapshotSlot>,
) -> Vec<::redis::Cmd> {
    per_hash("HDEL", slots.into_iter().map(|slot| (slot, None)))
}

/// One `command` per hash of `fields`, in the order each hash first comes,
/// with each field (and its value, if any) in order.
fn per_hash<'a>(
    command: &str,
    fields: impl Iterator<Item = (&'a SnapshotSlot, Option<&'a [u8]>)>,
) -> Vec<::redis::Cmd> {
    let mut commands: Vec<(&str, ::redis::Cmd)> = Vec::new();
    for (slot, value) in fields {
        let at = match commands.iter().position(|(key, _)| *key == &*slot.key) {
            Some(at) => at,
            None => {
                let mut cmd = ::redis::cmd(command);
                cmd.arg(&*slot.key);
                commands.push((&slot.key, cmd));
                commands.len() - 1
            }
        };
        commands[at].1.arg(&*slot.field);
        if let Some(value) = value {
            commands[at].1.arg(value);
        }
    }
    commands.into_iter().map(|(_, cmd)| cmd).collect()
}

/// The messages of one subscription, in the order the broker delivered them.
/// The stream ends when the subscription is lost (for Redis: the connection).
pub type Subscription = BoxStream<'static, Inbound>;

/// Errors talking to a broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The Redis server failed or could not be reached.
    #[error("redis: {}", RedisWords(.0))]
    Redis(#[from] ::redis::RedisError),
    /// The broker is gone (the in-process broker was shut down).
    #[error("broker closed")]
    Closed,
    /// The broker cannot do what was asked.
    #[error("{0}")]
    Unsupported(&'static str),
    /// No sentinel named a primary, or the server named is not one.
    #[error("no Redis primary: {0}")]
    NoPrimary(String),
    /// The TLS settings cannot be used.
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}

/// A Redis error in Redis's own words, once: a pipeline whose every command
/// was refused (NOPERM for each of 1,000 publishes) is one line, not a
/// thousand.
struct RedisWords<'a>(&'a ::redis::RedisError);

impl std::fmt::Display for RedisWords<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.kind() == ::redis::ErrorKind::AuthenticationFailed && self.0.detail().is_none() {
            // The client library kept no more of what Redis said than this
            // (our own subscriber keeps Redis's words, in the detail).
            return f.write_str(
                "authentication failed: Redis refused the user name and password in the URL",
            );
        }
        let Some(refused) = self.0.clone().into_server_errors() else {
            return self.0.fmt(f);
        };
        let Some((_, first)) = refused.first() else {
            return self.0.fmt(f);
        };
        f.write_str(first.code())?;
        if let Some(details) = first.details() {
            write!(f, " {details}")?;
        }
        if refused.len() > 1 {
            let same = refused.iter().all(|(_, err)| err.code() == first.code());
            let how = if same { "each" } else { "the first" };
            write!(f, " ({how} of {} commands refused)", refused.len())?;
        }
        Ok(())
    }
}

/// A publish/subscribe broker.
pub trait Broker: Clone + Send + Sync + 'static {
    /// Subscribes to every topic at once; messages of all of them arrive on
    /// one stream, each tagged with the index of the topic that matched.
    fn subscribe(
        &self,
        topics: &[Topic],
    ) -> impl Future<Output = Result<Subscription, BrokerError>> + Send;

    /// Publishes the messages in order, in as few round trips as the broker allows.
    fn publish(&self, batch: &[Outbound]) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Deletes the snapshots kept in `slots` (keys released for being idle).
    fn forget_snapshots(
        &self,
        slots: &[&SnapshotSlot],
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Every `(field, value)` of the snapshot hashes `keys`.
    fn read_snapshots(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<Vec<(String, Bytes)>, BrokerError>> + Send;

    /// Whether the publishing side answers, reconnecting it if its
    /// connection went stale in an outage: the listener asks before it
    /// reports ready, so the first results after an outage are not lost to
    /// a dead connection.
    fn check_publisher(&self) -> impl Future<Output = Result<(), BrokerError>> + Send {
        async { Ok(()) }
    }

    /// How many subscriptions so far ended because the listener fell a
    /// whole buffer behind (and so lost messages).
    fn overflows(&self) -> u64 {
        0
    }

    /// A short description for logs ("redis://host:port", "embedded").
    fn describe(&self) -> String;
}
