//! The Redis listener (the seed's `ThreadedRedisMessageListener`): one
//! subscription for the input channels and the direct-message pattern.
//!
//! ```text
//! input channel ─▶ Pipeline ─▶ SMA ─┬─▶ publisher ─▶ redis.output
//!                     │ bad          └─▶ hub ─▶ sockets
//!                     └─▶ publisher ─▶ redis.rejected
//! direct channel ────────────────────▶ hub ─▶ one group's sockets
//! ```
//!
//! In durable stream mode quotes come from `stream.rs` instead and this
//! listener carries only the direct messages.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::broker::{Broker, Inbound, Outbound, Topic};
use crate::config::{InputMode, Settings};
use crate::hub::Hub;
use crate::names;
use crate::pipeline::{Outcome, Pipeline, unix_ms};
use crate::publisher::Queued;
use crate::stats::Stats;

/// How often a continuing Redis outage is logged.
const OUTAGE_REPORT_EVERY: Duration = Duration::from_secs(5);

/// The Redis listener: subscribes, then turns every message into its effects.
pub struct Listener<B> {
    broker: B,
    /// Input channels and patterns first, the direct-message pattern last.
    topics: Vec<Topic>,
    direct_prefix: String,
    pipeline: Pipeline,
    hub: Hub,
    publish: mpsc::Sender<Queued>,
    stats: Arc<Stats>,
    subscribed: Arc<AtomicBool>,
    backoff: Backoff,
}

impl<B: Broker> Listener<B> {
    /// A listener for `settings`, publishing through `publish` and fanning out through `hub`.
    #[must_use]
    pub fn new(
        settings: &Settings,
        broker: B,
        hub: Hub,
        publish: mpsc::Sender<Queued>,
        stats: Arc<Stats>,
        subscribed: Arc<AtomicBool>,
    ) -> Self {
        let redis = &settings.redis;
        let mut topics: Vec<Topic> = match redis.input_mode {
            InputMode::PubSub => redis.input.iter().map(|n| Topic::from_name(n)).collect(),
            InputMode::Stream => Vec::new(),
        };
        topics.push(Topic::Pattern(format!("{}*", redis.direct_prefix)));
        Self {
            broker,
            topics,
            direct_prefix: redis.direct_prefix.clone(),
            pipeline: Pipeline::new(settings, stats.clone()),
            hub,
            publish,
            stats,
            subscribed,
            backoff: settings.reconnect_backoff(),
        }
    }

    /// Runs until `shutdown`, resubscribing (with backoff) whenever the
    /// subscription is lost. SMA windows survive resubscription.
    #[tracing::instrument(name = "listener", skip_all, fields(broker = %self.broker.describe()))]
    pub async fn run(mut self, shutdown: CancellationToken) {
        // Set while Redis is unreachable: when the outage began, and when it
        // was last reported, so a long outage logs every few seconds, not on
        // every retry.
        let mut outage: Option<(SystemTime, Instant)> = None;
        loop {
            let subscription = tokio::select! {
                () = shutdown.cancelled() => return,
                result = self.broker.subscribe(&self.topics) => result,
            };
            let mut messages = match subscription {
                Ok(messages) => messages,
                Err(err) => {
                    match &mut outage {
                        None => {
                            tracing::warn!(cause = %err, "cannot subscribe to redis; retrying");
                            outage = Some((SystemTime::now(), Instant::now()));
                        }
                        Some((since, reported)) if reported.elapsed() >= OUTAGE_REPORT_EVERY => {
                            *reported = Instant::now();
                            tracing::warn!(cause = %err, disconnected_since = %unix_ms(*since), "redis still unreachable; retrying");
                        }
                        Some(_) => {}
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(self.backoff.next_delay()) => continue,
                    }
                }
            };
            self.backoff.reset();
            match outage.take() {
                Some((since, _)) => {
                    self.stats.redis_resubscribes.fetch_add(1, Relaxed);
                    let down_for = since.elapsed().unwrap_or_default();
                    tracing::info!(?down_for, "resubscribed to redis");
                }
                None => tracing::info!(topics = ?self.topics, "subscribed"),
            }
            self.subscribed.store(true, Relaxed);
            loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    message = messages.next() => match message {
                        Some(message) => self.handle(message).await,
                        None => break,
                    },
                }
            }
            self.subscribed.store(false, Relaxed);
            let now = SystemTime::now();
            outage = Some((now, Instant::now()));
            tracing::warn!(disconnected_since = %unix_ms(now), "redis subscription lost; reconnecting");
        }
    }

    async fn handle(&mut self, message: Inbound) {
        if message.topic == self.topics.len() - 1 {
            self.on_direct(&message.channel, message.payload);
        } else {
            self.on_quote(&message.payload).await;
        }
    }

    /// quote → SMA → one encoding → Redis and sockets.
    async fn on_quote(&mut self, payload: &[u8]) {
        let arrived = Instant::now();
        match self.pipeline.process(payload) {
            Outcome::Accepted {
                quote,
                sma: Some(sma),
            } => {
                sma.deliver(&self.hub, &quote);
                self.enqueue(sma.outbound(), Some(arrived)).await;
            }
            Outcome::Accepted { sma: None, .. } | Outcome::Rejected { notice: None } => {}
            Outcome::Rejected {
                notice: Some(notice),
            } => self.enqueue(notice, None).await,
        }
    }

    /// A payload on `{direct_prefix}{CODE}`, forwarded verbatim to CODE's group.
    fn on_direct(&mut self, channel: &str, payload: Bytes) {
        let code = channel
            .strip_prefix(&self.direct_prefix)
            .unwrap_or_default();
        if !names::is_client_code(code) {
            tracing::debug!(channel, "direct message for an invalid client code ignored");
            return;
        }
        self.stats.direct_received.fetch_add(1, Relaxed);
        let message = match Utf8Bytes::try_from(payload.clone()) {
            Ok(text) => Message::Text(text),
            Err(_) => Message::Binary(payload),
        };
        self.hub.send_to_group(code, message);
    }

    async fn enqueue(&self, outbound: Outbound, since: Option<Instant>) {
        // Waiting here is the backpressure when Redis is slower than input;
        // the queue is bounded by redis.publish_queue.
        if self.publish.send(Queued { outbound, since }).await.is_err() {
            self.stats.publish_failed.fetch_add(1, Relaxed);
        }
    }
}
