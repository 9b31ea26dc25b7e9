//! The Redis broker: one subscriber connection for every channel and pattern,
//! and one multiplexed, auto-reconnecting connection that publishes in pipelines.
//!
//! The subscriber connection is our own (`subscriber`): it reads messages
//! into a bounded queue, where redis-rs's pub/sub connection would buffer
//! them without limit for a listener that falls behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

use super::queue::SubscriptionBuffer;
use super::sentinel::{self, Sentinels};
use super::subscriber::{Subscriber, Timeouts};
use super::tls::{Tls, TlsFiles};
use super::{
    Broker, BrokerError, Outbound, SnapshotSlot, Subscription, Topic, snapshot_deletes,
    snapshot_writes,
};

/// How long connecting or a single request may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A client for `url`; a `rediss://` URL connects over TLS as `files` say
/// (read now).
pub fn client_with_tls(url: &str, files: &TlsFiles) -> Result<redis::Client, BrokerError> {
    let tls = Tls::for_urls([url], files)?;
    client(url, tls.as_ref())
}

/// A client for `url` whose connections send small writes at once; a
/// `rediss://` URL connects over TLS as `tls` says ([`Tls::for_urls`]
/// gives it for every such URL).
///
/// redis-rs leaves Nagle's algorithm on; every message here is small and
/// latency-sensitive, so a publish would otherwise wait for the previous
/// one's ACK (tens of milliseconds with delayed ACKs).
fn client(url: &str, tls: Option<&Tls>) -> Result<redis::Client, BrokerError> {
    use redis::IntoConnectionInfo;
    client_of(url.into_connection_info()?, tls)
}

/// [`client`] for a parsed URL.
fn client_of(info: redis::ConnectionInfo, tls: Option<&Tls>) -> Result<redis::Client, BrokerError> {
    let info = info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    let redis::ConnectionAddr::TcpTls { host, port, .. } = info.addr().clone() else {
        return Ok(redis::Client::open(info)?);
    };
    let Some(tls) = tls else {
        return Err(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "a rediss:// URL needs the broker's TLS settings",
        ))
        .into());
    };
    if tls.is_insecure() {
        tracing::warn!(address = %format!("{host}:{port}"), "TLS to Redis WITHOUT verifying the server (redis.tls_insecure): for test setups only");
    }
    let info = info.set_addr(redis::ConnectionAddr::TcpTls {
        host,
        port,
        insecure: tls.is_insecure(),
        tls_params: None,
    });
    Ok(redis::Client::build_with_tls(info, tls.certificates())?)
}

/// A broker backed by a Redis server.
#[derive(Clone)]
pub struct RedisBroker {
    client: redis::Client,
    /// Subscriptions ended because the listener fell behind.
    overflows: Arc<AtomicU64>,
    buffer: SubscriptionBuffer,
    /// Connected on first use, so the bridge can start before Redis does;
    /// afterwards the manager reconnects by itself.
    publisher: Arc<Mutex<Option<ConnectionManager>>>,
    address: String,
    health_check: HealthCheck,
    /// For a `rediss://` URL: TLS for the subscriber connection.
    tls: Option<Tls>,
    /// With Sentinel: who to ask where the primary is, before each
    /// connection (`client` then stands for the URL's other parts).
    sentinels: Option<Sentinels>,
}

/// How the subscriber connection is checked for a silent (half-open) death:
/// a PING every `interval`, which must be answered within `timeout`.
#[derive(Debug, Clone, Copy)]
pub struct HealthCheck {
    /// Time between PINGs.
    pub interval: Duration,
    /// Longest wait for the answer.
    pub timeout: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
        }
    }
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password; only the address is shown.
        f.debug_struct("RedisBroker")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// A broker for the server at `url`. Nothing is connected yet.
    pub fn new(url: &str) -> Result<Self, BrokerError> {
        Self::with_tls(url, &TlsFiles::default())
    }

    /// A broker for the server at `url`; a `rediss://` URL connects over
    /// TLS as `files` say. Nothing is connected yet; the files are read now.
    pub fn with_tls(url: &str, files: &TlsFiles) -> Result<Self, BrokerError> {
        let tls = Tls::for_urls([url], files)?;
        let client = client(url, tls.as_ref())?;
        let address = client.get_connection_info().addr().to_string();
        Ok(Self {
            tls,
            client,
            overflows: Arc::default(),
            buffer: SubscriptionBuffer::default(),
            publisher: Arc::default(),
            address,
            health_check: HealthCheck::default(),
            sentinels: None,
        })
    }

    /// Connects to the primary `sentinels` name, not to `url`'s host: the
    /// URL still gives the user, password, database and TLS.
    #[must_use]
    pub fn with_sentinels(mut self, sentinels: Sentinels) -> Self {
        self.address = "the primary Sentinel names".into();
        self.sentinels = Some(sentinels);
        self
    }

    /// Whether connections go to the primary Sentinel names.
    #[must_use]
    pub fn follows_sentinel(&self) -> bool {
        self.sentinels.is_some()
    }

    /// The client to connect with now: the URL's, or, with Sentinel, the
    /// primary's as the sentinels say (check its `ROLE` once connected:
    /// [`is_primary`](crate::is_primary)).
    pub async fn client_now(&self) -> Result<redis::Client, BrokerError> {
        let Some(sentinels) = &self.sentinels else {
            return Ok(self.client.clone());
        };
        let (host, port) = sentinels.primary().await?;
        let info = self.client.get_connection_info().clone();
        let addr = match info.addr() {
            redis::ConnectionAddr::TcpTls { .. } => redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            },
            _ => redis::ConnectionAddr::Tcp(host, port),
        };
        client_of(info.set_addr(addr), self.tls.as_ref())
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

    /// Whether the server answers PING (connecting the publisher if needed).
    /// A first connection is tried once, directly: a permanent refusal
    /// (a wrong password, an ACL user without the right) is answered at
    /// once, in Redis's words, not after the publisher's reconnection
    /// attempts.
    pub async fn ping(&self) -> Result<(), BrokerError> {
        if self.publisher.lock().await.is_none() {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(RESPONSE_TIMEOUT));
            let mut once = self
                .client_now()
                .await?
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|err| self.explain(err))?;
            redis::cmd("PING").query_async::<()>(&mut once).await?;
        }
        let mut conn = self.publisher().await?;
        self.after(redis::cmd("PING").query_async::<()>(&mut conn).await)
            .await
    }

    /// A connection over TLS that times out has most likely reached a
    /// plain-text port, which waits for a command the handshake never
    /// sends: said so, rather than a bare "timed out".
    fn explain(&self, err: redis::RedisError) -> redis::RedisError {
        if self.tls.is_none() || !err.is_timeout() {
            return err;
        }
        redis::RedisError::from((
            redis::ErrorKind::Io,
            "no TLS handshake",
            format!(
                "{} did not answer one within {CONNECT_TIMEOUT:?}; is it redis-server's TLS port (--tls-port)?",
                self.address
            ),
        ))
    }

    /// The publishing connection, connected on first use. redis-rs's
    /// manager reconnects by itself to the address it has; with Sentinel
    /// the address may change, so a failed request drops the manager
    /// ([`Self::after`]) and the next one asks the sentinels again, and
    /// connects only to a server whose `ROLE` is `master`.
    async fn publisher(&self) -> Result<ConnectionManager, BrokerError> {
        let mut publisher = self.publisher.lock().await;
        if let Some(manager) = publisher.as_ref() {
            return Ok(manager.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let client = self.client_now().await?;
        let mut manager = ConnectionManager::new_with_config(client.clone(), config).await?;
        if self.sentinels.is_some() && !sentinel::is_primary(&mut manager).await? {
            return Err(BrokerError::NoPrimary(format!(
                "{} is not a primary (ROLE); a failover is under way",
                client.get_connection_info().addr()
            )));
        }
        *publisher = Some(manager.clone());
        Ok(manager)
    }

    /// Passes `outcome` on; with Sentinel, a failure forgets the publishing
    /// connection, so the next request finds the primary anew.
    async fn after<T>(&self, outcome: redis::RedisResult<T>) -> Result<T, BrokerError> {
        if outcome.is_err() && self.sentinels.is_some() {
            self.publisher.lock().await.take();
        }
        Ok(outcome?)
    }
}

impl Broker for RedisBroker {
    async fn subscribe(&self, topics: &[Topic]) -> Result<Subscription, BrokerError> {
        if topics.iter().any(|t| matches!(t, Topic::Sharded(_))) {
            return Err(BrokerError::Unsupported(
                "sharded channels need redis.cluster_nodes",
            ));
        }
        let client = self.client_now().await?;
        let subscriber = Subscriber {
            info: client.get_connection_info(),
            timeouts: Timeouts {
                connect: CONNECT_TIMEOUT,
                response: RESPONSE_TIMEOUT,
            },
            buffer: self.buffer,
            health_check: self.health_check,
            overflows: self.overflows.clone(),
            tls: self.tls.as_ref(),
        };
        Ok(subscriber.subscribe(topics).await?)
    }

    async fn forget_snapshots(&self, slots: &[&SnapshotSlot]) -> Result<(), BrokerError> {
        if slots.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for hdel in snapshot_deletes(slots.iter().copied()) {
            pipe.add_command(hdel).ignore();
        }
        let mut conn = self.publisher().await?;
        self.after(pipe.query_async::<()>(&mut conn).await).await
    }

    async fn publish(&self, batch: &[Outbound]) -> Result<(), BrokerError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        // Stored first, so a gateway that reads the hash after subscribing
        // misses no result: it either finds it there or receives it on the channel.
        for hset in snapshot_writes(batch.iter().filter_map(Outbound::snapshot_write)) {
            pipe.add_command(hset).ignore();
        }
        for message in batch {
            pipe.publish(&*message.channel, message.payload.as_ref())
                .ignore();
        }
        let mut conn = self.publisher().await?;
        self.after(pipe.query_async::<()>(&mut conn).await).await
    }

    async fn read_snapshots(&self, keys: &[String]) -> Result<Vec<(String, Bytes)>, BrokerError> {
        let mut conn = self.publisher().await?;
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.hgetall(key);
        }
        let hashes: Vec<Vec<(String, Vec<u8>)>> =
            self.after(pipe.query_async(&mut conn).await).await?;
        Ok(hashes
            .into_iter()
            .flatten()
            .map(|(field, value)| (field, Bytes::from(value)))
            .collect())
    }

    async fn check_publisher(&self) -> Result<(), BrokerError> {
        self.ping().await
    }

    fn overflows(&self) -> u64 {
        self.overflows.load(Relaxed)
    }

    fn describe(&self) -> String {
        format!("redis at {}", self.address)
    }
}
