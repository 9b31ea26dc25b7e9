//! The Redis pub/sub input (the seed's `ThreadedRedisMessageListener`): one
//! subscription for everything this node's role reads.
//!
//! ```text
//! input channel ─▶ Pipeline ─▶ SMA ─┬─▶ output ─▶ redis.output       (all, compute)
//!                     │ bad          └─▶ hub ─▶ sockets              (all)
//!                     └─▶ output ─▶ redis.rejected
//! output channel ─────────────────────▶ hub ─▶ sockets              (gateway)
//! direct channel ─────────────────────▶ hub ─▶ one group's sockets  (all, gateway)
//! ```
//!
//! In durable stream mode quotes come from `durable.rs` instead and this
//! listener carries only the direct messages.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::broker::{Broker, Inbound, SnapshotSlot, Topic};
use crate::config::{InputMode, Settings};
use crate::frame::SharedResult;
use crate::hub::Hub;
use crate::names;
use crate::output::Queued;
use crate::pipeline::{Emitted, Outcome, Pipeline, Released, unix_ms};
use crate::stats::Stats;
use crate::topology::{Channels, Role};

/// Most messages handled before the sessions they fed are woken...
const MAX_BURST: usize = 64;

/// ...and the longest: at 10,000 sockets one message is 10,000 frames.
const MAX_BURST_TIME: Duration = Duration::from_micros(250);

/// How many times the publisher is asked to answer before the listener
/// reports ready regardless.
const PUBLISHER_CHECKS: u32 = 5;

/// How often a continuing Redis outage is logged.
const OUTAGE_REPORT_EVERY: Duration = Duration::from_secs(5);

/// What arrives through a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// Quotes to compute.
    Quotes,
    /// Results compute nodes published, for a gateway's sockets.
    Results,
    /// Results of the n-th `[[series]]` compute nodes published, for a
    /// gateway's sockets.
    Series(usize),
    /// Payloads for one client group.
    Direct,
}

/// The Redis listener: subscribes, then turns every message into its effects.
pub struct PubSubInput<B> {
    broker: B,
    topics: Vec<Topic>,
    /// What each of `topics` carries.
    feeds: Vec<Feed>,
    channels: Channels,
    /// Snapshot hashes to load after subscribing (gateways only).
    snapshot_keys: Vec<String>,
    pipeline: Pipeline,
    /// Each `[[series]]`' name, by index: what a gateway checks a relayed
    /// series result against.
    series_names: Vec<Box<str>>,
    hub: Hub,
    publish: mpsc::Sender<Queued>,
    /// What a burst could not hand to the full publish queue; sent, with
    /// waiting, once the burst's sessions are woken.
    to_publish: Vec<Queued>,
    /// One quote's results on their way out (kept, not allocated per quote).
    results: Vec<Emitted>,
    stats: Arc<Stats>,
    subscribed: Arc<AtomicBool>,
    backoff: Backoff,
    /// How often the pipeline's idle keys are released.
    key_sweep: Duration,
    /// Released keys whose snapshots Redis did not delete (it was down, or
    /// refused): tried again at the next sweep, unless the key is back.
    unforgotten: Vec<Released>,
}

impl<B: Broker> PubSubInput<B> {
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
        let channels = settings.redis.channels();
        let role = settings.node.role;
        let mut feeds = Vec::new();
        let mut topics = Vec::new();
        let mut add = |feed, more: Vec<Topic>| {
            feeds.extend(std::iter::repeat_n(feed, more.len()));
            topics.extend(more);
        };
        if role.computes() && settings.redis.input_mode == InputMode::PubSub {
            add(Feed::Quotes, channels.input_topics(settings.node.shard));
        }
        if role == Role::Gateway {
            add(Feed::Results, channels.output_topics());
            // Each series' channel: a pattern where it names `{symbol}`,
            // every partition of it on a cluster.
            for (index, series) in settings.series.iter().enumerate() {
                add(Feed::Series(index), channels.series_topics(&series.channel));
            }
        }
        if role.serves_sockets() {
            add(Feed::Direct, vec![channels.direct_topic()]);
        }
        let snapshot_keys = if role == Role::Gateway {
            channels.snapshot_keys()
        } else {
            Vec::new()
        };
        Self {
            broker,
            topics,
            feeds,
            channels,
            snapshot_keys,
            unforgotten: Vec::new(),
            pipeline: Pipeline::new(settings, stats.clone()),
            series_names: settings
                .series
                .iter()
                .map(|series| series.spec.name.clone())
                .collect(),
            hub,
            publish,
            to_publish: Vec::new(),
            results: Vec::new(),
            stats,
            subscribed,
            backoff: settings.reconnect_backoff(),
            key_sweep: settings.key_sweep_interval(),
        }
    }

    /// Whether this node's role needs a subscription at all (a compute node
    /// in stream mode reads only the stream).
    #[must_use]
    pub fn has_topics(&self) -> bool {
        !self.topics.is_empty()
    }

    /// Before reporting ready: the publisher's connection answers (a PING
    /// on a connection that died in the outage fails once and reconnects
    /// it, instead of the first results failing). A few tries, then on:
    /// the subscription works, and failed publishes are counted.
    async fn check_publisher(&mut self, shutdown: &CancellationToken) {
        for attempt in 1..=PUBLISHER_CHECKS {
            match self.broker.check_publisher().await {
                Ok(()) => return,
                Err(err) if attempt == PUBLISHER_CHECKS => {
                    tracing::warn!(cause = %err, "the publisher does not answer yet; going on");
                }
                Err(_) => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.backoff.next_delay()) => {}
            }
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
        let mut sweeps = tokio::time::interval(self.key_sweep);
        sweeps.set_missed_tick_behavior(MissedTickBehavior::Delay);
        sweeps.reset();
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
            self.check_publisher(&shutdown).await;
            self.backoff.reset();
            match outage.take() {
                Some((since, _)) => {
                    self.stats.redis_resubscribes.fetch_add(1, Relaxed);
                    let down_for = since.elapsed().unwrap_or_default();
                    tracing::info!(?down_for, "resubscribed to redis");
                }
                None => tracing::info!(topics = ?self.topics, "subscribed"),
            }
            self.load_snapshots().await;
            self.subscribed.store(true, Relaxed);
            loop {
                let first = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    _ = sweeps.tick() => {
                        self.release_idle_keys().await;
                        continue;
                    }
                    message = messages.next() => message,
                };
                let Some(first) = first else { break };
                let ended = self.handle_burst(first, &mut messages);
                // Publishing may wait (backpressure from Redis); sessions are
                // woken by now and never wait with it.
                for queued in self.to_publish.drain(..) {
                    if self.publish.send(queued).await.is_err() {
                        self.stats.publish_failed.fetch_add(1, Relaxed);
                    }
                }
                if ended {
                    break;
                }
            }
            self.subscribed.store(false, Relaxed);
            self.stats
                .subscription_overflows
                .store(self.broker.overflows(), Relaxed);
            let now = SystemTime::now();
            outage = Some((now, Instant::now()));
            tracing::warn!(disconnected_since = %unix_ms(now), "redis subscription lost; reconnecting");
        }
    }

    /// Releases the pipeline's idle keys, and their snapshots in Redis.
    /// Awaited in the input loop: a key created again after this sweep
    /// stores its first snapshot after the old one is deleted. Deletes that
    /// failed are tried again at the next sweep, for the keys that have not
    /// come back since (a key that has has a new snapshot, to be kept).
    async fn release_idle_keys(&mut self) {
        let released = self.pipeline.release_idle();
        if !released.is_empty() {
            tracing::info!(
                keys = released.len(),
                "released keys idle for sma.key_idle_ms"
            );
        }
        let pipeline = &self.pipeline;
        let mut forget: Vec<Released> = std::mem::take(&mut self.unforgotten)
            .into_iter()
            .filter(|key| !pipeline.has_key(key.client.as_deref(), &key.symbol))
            .chain(released)
            .filter(|key| !key.snapshots.is_empty())
            .collect();
        if forget.is_empty() {
            return;
        }
        let slots: Vec<&SnapshotSlot> = forget
            .iter()
            .flat_map(|key| key.snapshots.iter().map(|slot| &**slot))
            .collect();
        if let Err(err) = self.broker.forget_snapshots(&slots).await {
            tracing::warn!(cause = %err, keys = slots.len(), "could not delete the snapshots of released keys; trying again at the next sweep");
            // At most sma.max_keys wait: what the pipeline itself may hold.
            forget.truncate(self.pipeline.max_keys());
            self.unforgotten = forget;
        }
    }

    /// Handles `first` and whatever else has already arrived — messages come
    /// in bursts (a producer's pipeline, a compute node's batch) — queuing
    /// every frame before any session is woken to write it. The burst ends
    /// after [`MAX_BURST`] messages or [`MAX_BURST_TIME`], and nothing in it
    /// waits: what the publish queue has no room for collects in
    /// `to_publish`. Returns whether the subscription ended.
    fn handle_burst(
        &mut self,
        first: Inbound,
        messages: &mut (impl Stream<Item = Inbound> + Unpin),
    ) -> bool {
        let _hold = self.hub.hold_wakes();
        let started = Instant::now();
        self.handle(first);
        for _ in 1..MAX_BURST {
            if started.elapsed() >= MAX_BURST_TIME {
                break;
            }
            match messages.next().now_or_never() {
                Some(Some(message)) => self.handle(message),
                Some(None) => return true,
                None => break,
            }
        }
        false
    }

    fn handle(&mut self, message: Inbound) {
        match self.feeds.get(message.topic) {
            Some(Feed::Quotes) => self.on_quote(&message.payload),
            Some(Feed::Results) => self.on_result(message.payload),
            Some(&Feed::Series(index)) => self.on_series_result(index, message.payload),
            Some(Feed::Direct) => self.on_direct(&message.channel, message.payload),
            None => {}
        }
    }

    /// A gateway seeds its snapshots from the hashes compute nodes keep.
    /// Called after subscribing, so a result published meanwhile is either
    /// in the hash or on its way through the subscription; a failure only
    /// delays snapshots until the symbols' next results.
    async fn load_snapshots(&self) {
        if self.snapshot_keys.is_empty() {
            return;
        }
        match self.broker.read_snapshots(&self.snapshot_keys).await {
            Ok(snapshots) => {
                let mut loaded = 0usize;
                for (symbol, frame) in snapshots {
                    let Ok(text) = Utf8Bytes::try_from(frame) else {
                        continue;
                    };
                    // Only a public result of the field's own key (a
                    // symbol, or `symbol@series` of a series served here):
                    // the snapshot is sent to every subscriber of that key.
                    let read = match names::StreamName::split(&symbol).series {
                        None => SharedResult::read(text).ok(),
                        Some(series) if self.series_names.iter().any(|s| **s == *series) => {
                            SharedResult::read_series(text, series).ok()
                        }
                        Some(_) => None,
                    };
                    let own =
                        read.filter(|frame| frame.key() == symbol && frame.client().is_none());
                    if let Some(frame) = own {
                        self.hub.remember_latest(frame);
                        loaded += 1;
                    }
                }
                tracing::info!(symbols = loaded, "snapshots loaded");
            }
            Err(err) => {
                tracing::warn!(cause = %err, "cannot load snapshots; they follow with the next results")
            }
        }
    }

    /// A result a compute node published: fanned out as `all` would, with
    /// the very bytes the compute node encoded.
    fn on_result(&mut self, payload: Bytes) {
        let Ok(text) = Utf8Bytes::try_from(payload) else {
            self.stats.results_unroutable.fetch_add(1, Relaxed);
            return;
        };
        // The one place a result's route is read from JSON: where its bytes
        // come in from Redis.
        let frame = match SharedResult::read(text) {
            Ok(frame) => frame,
            Err(text) => {
                self.stats.results_unroutable.fetch_add(1, Relaxed);
                tracing::debug!(message = %text.as_str().chars().take(200).collect::<String>(), "unroutable message on an output channel ignored");
                return;
            }
        };
        self.stats.results_relayed.fetch_add(1, Relaxed);
        self.hub.deliver_result(frame);
    }

    /// A `[[series]]` result a compute node published on the channel of the
    /// series `index`: fanned out under its key `symbol@series`, with the
    /// very bytes the compute node encoded.
    fn on_series_result(&mut self, index: usize, payload: Bytes) {
        let series = self.series_names.get(index).map_or("", |name| &**name);
        let read = Utf8Bytes::try_from(payload)
            .ok()
            .and_then(|text| SharedResult::read_series(text, series).ok());
        let Some(frame) = read else {
            self.stats.results_unroutable.fetch_add(1, Relaxed);
            tracing::debug!(series, "unroutable message on a series channel ignored");
            return;
        };
        self.stats.results_relayed.fetch_add(1, Relaxed);
        self.hub.deliver_result(frame);
    }

    /// quote → SMA → one encoding → sockets, and queued for Redis.
    fn on_quote(&mut self, payload: &[u8]) {
        let arrived = Instant::now();
        match self.pipeline.process(payload) {
            Outcome::Accepted { sma } => {
                // The SMA's result, then the series': a buffer kept, as the
                // pipeline's is borrowed while results go out.
                let mut results = std::mem::take(&mut self.results);
                results.extend(sma);
                results.extend(self.pipeline.take_series());
                for result in results.drain(..) {
                    let outbound = result.outbound();
                    self.hub.deliver_result(result.frame);
                    self.queue_publish(Queued {
                        outbound,
                        since: Some(arrived),
                    });
                }
                self.results = results;
            }
            Outcome::Rejected { notice: None } | Outcome::OtherShard => {}
            Outcome::Rejected {
                notice: Some(notice),
            } => self.queue_publish(Queued {
                outbound: notice,
                since: None,
            }),
        }
    }

    /// Hands a message to the publisher now if its queue has room, so Redis
    /// hears of a result while the burst goes on; otherwise it waits in
    /// `to_publish`, behind which everything else waits too, to keep order.
    fn queue_publish(&mut self, queued: Queued) {
        if !self.to_publish.is_empty() {
            self.to_publish.push(queued);
            return;
        }
        match self.publish.try_send(queued) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(queued)) => self.to_publish.push(queued),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.stats.publish_failed.fetch_add(1, Relaxed);
            }
        }
    }

    /// A payload on `{direct_prefix}{CODE}`, forwarded verbatim to CODE's group.
    fn on_direct(&mut self, channel: &str, payload: Bytes) {
        let code = self.channels.direct_client(channel).unwrap_or_default();
        if !names::is_client_code(code) {
            tracing::debug!(channel, "direct message for an invalid client code ignored");
            return;
        }
        self.stats.direct_messages.fetch_add(1, Relaxed);
        let message = match Utf8Bytes::try_from(payload.clone()) {
            Ok(text) => Message::Text(text),
            Err(_) => Message::Binary(payload),
        };
        self.hub.send_to_group(code, message);
    }
}
