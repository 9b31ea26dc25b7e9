//! The quotebridge service: Redis pub/sub quotes in, per-symbol moving
//! averages out, to a Redis channel and to WebSocket clients grouped by
//! client code. Settings, the HTTP/WebSocket/SSE server and its sessions,
//! the Redis input loops and output, and [`run`]/[`serve`], which wire them.
//!
//! Tests call the same [`run`]/[`serve`] as the binary, with a listener
//! bound to port 0.

#![forbid(unsafe_code)]

pub mod auth;
pub(crate) mod backoff;
pub mod config;
mod error;
pub(crate) mod input;
pub mod metrics;
pub(crate) mod output;
pub mod pipeline;
pub(crate) mod rate;
pub(crate) mod server;
pub(crate) mod session;
pub mod shutdown;
pub(crate) mod sse;
pub mod telemetry;
pub mod topology;
pub(crate) mod websocket;

pub use self::input::durable::QUOTE_FIELD;
pub use self::server::raise_descriptor_limit;
pub use quotebridge_broker as broker;
use quotebridge_core::{idle, names, protocol, quote, series, sma, stats};
use quotebridge_fanout::{frame, hub, outbox};

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, BrokerError, ClusterBroker, RedisBroker};
use crate::config::{InputMode, Settings};
use crate::hub::{Hub, HubLimits};
use crate::input::pubsub::PubSubInput;
use crate::stats::Stats;

pub use self::error::Error;

/// Runs the bridge against the Redis server of `settings` until `shutdown`.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    if settings.redis.cluster_nodes.is_empty() {
        let broker = redis_broker(&settings.redis)?
            .with_health_check(settings.health_check())
            .with_subscription_buffer(settings.subscription_buffer());
        serve(settings, listener, broker, shutdown).await
    } else {
        let broker =
            ClusterBroker::with_tls(&settings.redis.cluster_nodes, &settings.redis.tls_files())?
                .with_health_check(settings.health_check())
                .with_subscription_buffer(settings.subscription_buffer());
        serve(settings, listener, broker, shutdown).await
    }
}

/// The broker `[redis]` describes for a single server: its URL, TLS, and
/// Sentinel when `redis.sentinels` is set.
pub fn redis_broker(redis: &config::RedisSettings) -> Result<RedisBroker, BrokerError> {
    let broker = RedisBroker::with_tls(&redis.url, &redis.tls_files())?;
    if redis.sentinels.is_empty() {
        return Ok(broker);
    }
    let sentinels = crate::broker::Sentinels::new(&redis.sentinels, &redis.sentinel_master)?;
    Ok(broker.with_sentinels(sentinels))
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
            // Each live key has one key in the SMA and one in each series.
            max_snapshots: (settings.sma.max_keys).saturating_mul(1 + settings.series.len()),
            history_size: settings.websocket.history_size,
            history_bytes: settings.websocket.history_bytes,
            resume_frames_per_second: settings.websocket.resume_frames_per_second,
            connects_per_client_per_second: settings.server.connects_per_client_per_second,
        },
        stats.clone(),
    );
    let role = settings.node.role;
    let subscribed = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(metrics::Metrics::new());
    let mut ready = Vec::new();
    let durable_task = match settings.redis.input_mode {
        InputMode::Stream if role.computes() => {
            let consuming = Arc::new(AtomicBool::new(false));
            ready.push(consuming.clone());
            let consumer = input::durable::DurableInput::new(
                metrics.clone(),
                &settings,
                hub.clone(),
                stats.clone(),
                consuming,
            )?;
            Some(tokio::spawn(consumer.run(shutdown.clone())))
        }
        InputMode::Stream | InputMode::PubSub => None,
    };

    let (publish, publish_queue) = mpsc::channel(settings.redis.publish_queue);
    let publisher = tokio::spawn(output::run(
        broker.clone(),
        publish_queue,
        stats.clone(),
        metrics.clone(),
    ));
    let pubsub_input = PubSubInput::new(
        &settings,
        broker,
        hub.clone(),
        publish,
        stats.clone(),
        subscribed.clone(),
    );
    // A compute node in stream mode reads only the stream.
    let pubsub_task = pubsub_input.has_topics().then(|| {
        ready.push(subscribed.clone());
        tokio::spawn(pubsub_input.run(shutdown.clone()))
    });

    if role.serves_sockets() {
        tokio::spawn(release_idle_keys(
            hub.clone(),
            settings.key_sweep_interval(),
            shutdown.clone(),
        ));
    }
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
        if let Some(pubsub_task) = pubsub_task {
            let _ = pubsub_task.await;
        }
        if let Some(durable_task) = durable_task {
            let _ = durable_task.await;
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

/// Releases the history and snapshots of keys that had no result for
/// `sma.key_idle_ms`, every `interval`, until `shutdown`.
async fn release_idle_keys(hub: Hub, interval: std::time::Duration, shutdown: CancellationToken) {
    let mut sweeps = tokio::time::interval(interval);
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweeps.reset();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = sweeps.tick() => {
                let released = hub.release_idle();
                if released > 0 {
                    tracing::info!(keys = released, "released the history of keys idle for sma.key_idle_ms");
                }
            }
        }
    }
}
