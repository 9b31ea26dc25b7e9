//! quotebridge: Redis pub/sub quotes in, per-symbol simple moving averages
//! out — to a Redis channel and to WebSocket clients grouped by client code.
//!
//! The binary is thin: it parses the command line, loads [`config::Settings`]
//! and calls [`run`] (or one of the other [`cli`] commands). Tests call the
//! same [`run`]/[`serve`] with a listener bound to port 0.

#![forbid(unsafe_code)]

pub(crate) mod auth;
pub(crate) mod backoff;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod config;
pub(crate) mod demo;
mod error;
pub(crate) mod hub;
pub(crate) mod listener;
pub mod metrics;
pub mod names;
pub(crate) mod outbox;
pub mod pipeline;
pub(crate) mod probe;
pub(crate) mod producer;
pub mod protocol;
pub(crate) mod publisher;
pub mod quote;
pub(crate) mod server;
pub(crate) mod session;
pub(crate) mod shutdown;
pub mod sma;
pub(crate) mod sse;
pub mod stats;
pub(crate) mod stream;
pub(crate) mod tail;
pub mod telemetry;
pub mod topology;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, BrokerError, ClusterBroker, RedisBroker};
use crate::config::{InputMode, Settings};
use crate::hub::{Hub, HubLimits};
use crate::listener::Listener;
use crate::stats::Stats;

pub use self::error::Error;

/// Runs the bridge against the Redis server of `settings` until `shutdown`.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    if settings.redis.cluster_nodes.is_empty() {
        let broker = RedisBroker::new(&settings.redis.url)?
            .with_health_check(settings.health_check())
            .with_subscription_buffer(settings.subscription_buffer());
        serve(settings, listener, broker, shutdown).await
    } else {
        let broker = ClusterBroker::new(&settings.redis.cluster_nodes)?
            .with_health_check(settings.health_check())
            .with_subscription_buffer(settings.subscription_buffer());
        serve(settings, listener, broker, shutdown).await
    }
}

/// Runs the bridge on any broker until `shutdown` is cancelled, then closes
/// every socket with 1001, flushes pending publishes and returns — all within
/// `server.shutdown_timeout`.
pub async fn serve<B: Broker>(
    settings: Settings,
    listener: TcpListener,
    broker: B,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    // Building the authenticator checks the [auth] keys (and key files),
    // before anything starts.
    let auth = auth::Authenticator::from_settings(&settings.auth).map_err(|e| settings.named(e))?;
    let auth = Arc::new(auth);
    let settings = Arc::new(settings);
    let stats = Arc::new(Stats::default());
    let hub = Hub::new(
        HubLimits {
            send_queue: settings.websocket.send_queue,
            send_queue_bytes: settings.websocket.send_queue_bytes,
            conflate: settings.websocket.slow_consumer == config::SlowConsumer::Conflate,
            max_symbols: settings.websocket.max_symbols,
            max_sockets_per_client: settings.server.max_connections_per_client,
            max_snapshots: settings.sma.max_keys,
            history_size: settings.websocket.history_size,
            history_bytes: settings.websocket.history_bytes,
        },
        stats.clone(),
    );
    let role = settings.node.role;
    let subscribed = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(metrics::Metrics::new());
    let mut ready = Vec::new();
    let stream_task = match settings.redis.input_mode {
        InputMode::Stream if role.computes() => {
            let consuming = Arc::new(AtomicBool::new(false));
            ready.push(consuming.clone());
            let consumer = stream::StreamConsumer::new(
                metrics.clone(),
                &settings,
                hub.clone(),
                stats.clone(),
                consuming,
            )
            .map_err(BrokerError::from)?;
            Some(tokio::spawn(consumer.run(shutdown.clone())))
        }
        InputMode::Stream | InputMode::PubSub => None,
    };

    let (publish, publish_queue) = mpsc::channel(settings.redis.publish_queue);
    let publisher = tokio::spawn(publisher::run(
        broker.clone(),
        publish_queue,
        stats.clone(),
        metrics.clone(),
    ));
    let redis_listener = Listener::new(
        &settings,
        broker,
        hub.clone(),
        publish,
        stats.clone(),
        subscribed.clone(),
    );
    // A compute node in stream mode reads only the stream.
    let listener_task = redis_listener.has_topics().then(|| {
        ready.push(subscribed.clone());
        tokio::spawn(redis_listener.run(shutdown.clone()))
    });

    let sessions = TaskTracker::new();
    if !auth.is_enabled() {
        tracing::warn!(
            "auth.mode = \"none\": any client may connect as any client code; enable token or jwt auth in production"
        );
    }
    let app = server::router(server::AppState {
        settings: settings.clone(),
        hub,
        auth,
        metrics,
        stats: stats.clone(),
        ready,
        shutdown: shutdown.clone(),
        sessions: sessions.clone(),
        connections: Arc::new(Semaphore::new(settings.server.max_connections)),
    });
    let address = listener
        .local_addr()
        .map_err(|e| Error::io("cannot read the listen address", e))?;
    if role.serves_sockets() {
        tracing::info!(%address, %role, shard = %settings.node.shard, "listening for WebSocket clients on ws://{address}/ws/{{client_code}}");
    } else {
        tracing::info!(%address, %role, shard = %settings.node.shard, "no WebSocket listener; /healthz, /readyz, /stats and /metrics on http://{address}");
    }
    let connections = server::serve_http(listener, app, &settings, stats, shutdown.clone()).await;

    // The token is cancelled: sessions are sending 1001 and the listener has
    // stopped, which drops the publish queue's sender so the publisher drains.
    sessions.close();
    let drained = async {
        connections.wait().await;
        sessions.wait().await;
        if let Some(listener_task) = listener_task {
            let _ = listener_task.await;
        }
        if let Some(stream_task) = stream_task {
            let _ = stream_task.await;
        }
        let _ = publisher.await;
    };
    if tokio::time::timeout(settings.shutdown_timeout(), drained)
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?settings.shutdown_timeout(), "shutdown timed out; exiting anyway");
    }
    tracing::info!("stopped");
    Ok(())
}
