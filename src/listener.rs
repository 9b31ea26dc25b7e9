//! The listener: the whole data path, top to bottom.
//!
//! ```text
//! input channel ─▶ quote::parse ─▶ SmaWindow::push ─▶ SmaMessage::encode (once)
//!                      │ bad                              ├─▶ publisher ─▶ redis.output
//!                      ▼                                  └─▶ hub ─▶ sockets
//!               redis.rejected
//! direct channel ─────────────────────────────────────────────▶ hub ─▶ one group's sockets
//! ```
//!
//! One task owns every SMA window, so per-key order is input order and no
//! lock guards the windows.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::broker::{Broker, Inbound, Outbound, Topic};
use crate::config::Settings;
use crate::hub::Hub;
use crate::names;
use crate::protocol::SmaMessage;
use crate::quote::{self, Reject};
use crate::sma::SmaWindow;
use crate::stats::Stats;

/// The part of a rejected payload republished with its reason.
const REJECTED_SAMPLE_BYTES: usize = 1024;

/// How often a continuing Redis outage is logged.
const OUTAGE_REPORT_EVERY: Duration = Duration::from_secs(5);

/// The Redis listener: subscribes, then turns every message into its effects.
pub struct Listener<B> {
    broker: B,
    /// Input channels and patterns first, the direct-message pattern last.
    topics: Vec<Topic>,
    direct_prefix: String,
    windows: Windows,
    output: OutputChannel,
    rejected_channel: Option<Arc<str>>,
    emit_partial: bool,
    hub: Hub,
    publish: mpsc::Sender<Outbound>,
    stats: Arc<Stats>,
    subscribed: Arc<AtomicBool>,
    reject_log: RejectLog,
    backoff: Backoff,
}

impl<B: Broker> Listener<B> {
    /// A listener for `settings`, publishing through `publish` and fanning out through `hub`.
    #[must_use]
    pub fn new(
        settings: &Settings,
        broker: B,
        hub: Hub,
        publish: mpsc::Sender<Outbound>,
        stats: Arc<Stats>,
        subscribed: Arc<AtomicBool>,
    ) -> Self {
        let redis = &settings.redis;
        let mut topics: Vec<Topic> = redis.input.iter().map(|n| Topic::from_name(n)).collect();
        topics.push(Topic::Pattern(format!("{}*", redis.direct_prefix)));
        Self {
            broker,
            topics,
            direct_prefix: redis.direct_prefix.clone(),
            windows: Windows::new(settings.sma.window, settings.sma.max_keys),
            output: OutputChannel::new(&redis.output),
            rejected_channel: (!redis.rejected.is_empty()).then(|| redis.rejected.as_str().into()),
            emit_partial: settings.sma.emit_partial,
            hub,
            publish,
            stats,
            subscribed,
            reject_log: RejectLog::default(),
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
        self.stats.quotes_received.fetch_add(1, Relaxed);
        let quote = match quote::parse(payload) {
            Ok(quote) => quote,
            Err(reason) => return self.reject(reason, payload).await,
        };
        let client = quote.client.as_deref();
        let Some(key) = self
            .windows
            .get_or_insert(client, &quote.symbol, &self.output)
        else {
            return self.reject(Reject::TooManyKeys, payload).await;
        };
        let average = key.window.push(quote.price);
        if !self.emit_partial && !key.window.is_full() {
            return;
        }
        let frame = SmaMessage {
            symbol: &quote.symbol,
            price: quote.price,
            sma: average.mean,
            window: key.window.capacity(),
            count: average.count,
            ts: quote.ts.unwrap_or_else(now_ms),
            client,
        }
        .encode();
        let channel = key.channel.clone();
        match client {
            None => self.hub.publish_public(&quote.symbol, frame.clone()),
            Some(code) => {
                self.hub.send_to_group(code, Message::Text(frame.clone()));
            }
        }
        self.stats.smas_emitted.fetch_add(1, Relaxed);
        self.enqueue(Outbound {
            channel,
            payload: frame.into(),
        })
        .await;
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

    async fn reject(&mut self, reason: Reject, payload: &[u8]) {
        self.stats.reject(&reason);
        let sample = &payload[..payload.len().min(REJECTED_SAMPLE_BYTES)];
        let sample = String::from_utf8_lossy(sample);
        self.reject_log.record(&reason, &sample);
        if let Some(channel) = &self.rejected_channel {
            let body = serde_json::json!({ "error": reason.to_string(), "payload": sample });
            let outbound = Outbound {
                channel: channel.clone(),
                payload: body.to_string().into(),
            };
            self.enqueue(outbound).await;
        }
    }

    async fn enqueue(&self, outbound: Outbound) {
        // Waiting here is the backpressure when Redis is slower than input;
        // the queue is bounded by redis.publish_queue.
        if self.publish.send(outbound).await.is_err() {
            self.stats.publish_failed.fetch_add(1, Relaxed);
        }
    }
}

/// One key's window and the output channel its results go to.
struct Key {
    window: SmaWindow,
    channel: Arc<str>,
}

/// Every SMA window, public by symbol and private by client then symbol, so
/// lookups borrow the quote's strings and allocate nothing.
struct Windows {
    window: std::num::NonZeroUsize,
    max_keys: usize,
    len: usize,
    public: HashMap<Box<str>, Key>,
    private: HashMap<Box<str>, HashMap<Box<str>, Key>>,
}

impl Windows {
    fn new(window: usize, max_keys: usize) -> Self {
        Self {
            window: std::num::NonZeroUsize::new(window).unwrap_or(std::num::NonZeroUsize::MIN),
            max_keys,
            len: 0,
            public: HashMap::new(),
            private: HashMap::new(),
        }
    }

    /// The key's state, created on first use; `None` when `max_keys` is reached.
    fn get_or_insert(
        &mut self,
        client: Option<&str>,
        symbol: &str,
        output: &OutputChannel,
    ) -> Option<&mut Key> {
        let full = self.len >= self.max_keys;
        let map = match client {
            None => &mut self.public,
            Some(code) => {
                if !self.private.contains_key(code) {
                    if full {
                        return None;
                    }
                    self.private.insert(code.into(), HashMap::new());
                }
                self.private.get_mut(code)?
            }
        };
        if !map.contains_key(symbol) {
            if full {
                return None;
            }
            self.len += 1;
            let key = Key {
                window: SmaWindow::new(self.window),
                channel: output.for_symbol(symbol),
            };
            map.insert(symbol.into(), key);
        }
        map.get_mut(symbol)
    }
}

/// `redis.output`, with `{symbol}` expanded per symbol.
enum OutputChannel {
    Fixed(Arc<str>),
    PerSymbol { before: String, after: String },
}

impl OutputChannel {
    fn new(template: &str) -> Self {
        match template.split_once("{symbol}") {
            Some((before, after)) => OutputChannel::PerSymbol {
                before: before.to_owned(),
                after: after.to_owned(),
            },
            None => OutputChannel::Fixed(template.into()),
        }
    }

    fn for_symbol(&self, symbol: &str) -> Arc<str> {
        match self {
            OutputChannel::Fixed(name) => name.clone(),
            OutputChannel::PerSymbol { before, after } => format!("{before}{symbol}{after}").into(),
        }
    }
}

/// Logs rejected input at most once a second, with a sample and how many
/// rejections the quiet period hid, so a flood of garbage cannot flood logs.
#[derive(Default)]
struct RejectLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RejectLog {
    fn record(&mut self, reason: &Reject, sample: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            reason = reason.label(),
            error = %reason,
            sample = %sample.chars().take(200).collect::<String>(),
            suppressed = self.suppressed,
            "rejected input"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_channel_template() {
        assert_eq!(&*OutputChannel::new("sma").for_symbol("AAPL"), "sma");
        assert_eq!(
            &*OutputChannel::new("sma.{symbol}").for_symbol("AAPL"),
            "sma.AAPL"
        );
        assert_eq!(
            &*OutputChannel::new("{symbol}:avg").for_symbol("X"),
            "X:avg"
        );
    }

    #[test]
    fn windows_are_per_client_and_symbol_and_bounded() {
        let output = OutputChannel::new("sma");
        let mut windows = Windows::new(2, 3);
        windows
            .get_or_insert(None, "A", &output)
            .expect("key")
            .window
            .push(1.0);
        windows
            .get_or_insert(Some("c1"), "A", &output)
            .expect("key")
            .window
            .push(5.0);
        let public = windows.get_or_insert(None, "A", &output).expect("key");
        assert_eq!(
            public.window.push(3.0).mean,
            2.0,
            "private prices do not mix in"
        );
        assert!(windows.get_or_insert(Some("c2"), "A", &output).is_some());
        assert!(
            windows.get_or_insert(Some("c2"), "B", &output).is_none(),
            "fourth key refused"
        );
        assert!(windows.get_or_insert(Some("c3"), "A", &output).is_none());
        assert!(
            windows.get_or_insert(Some("c1"), "A", &output).is_some(),
            "known keys still work"
        );
    }
}
