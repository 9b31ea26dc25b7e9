//! The data path, top to bottom, shared by both input modes:
//!
//! ```text
//! payload ─▶ quote::parse ─▶ SmaWindow::push ─▶ SmaMessage::encode (once) ─▶ Sma { channel, frame }
//!                │ bad                                                          ├─▶ Redis (publish / MULTI)
//!                ▼                                                              └─▶ hub ─▶ sockets
//!        notice for redis.rejected
//! ```
//!
//! [`Pipeline`] does no I/O: the pub/sub input (`input/pubsub.rs`) and the
//! durable stream consumer (`input/durable.rs`) decide when its results go out.
//! One task owns a pipeline, so per-key order is input order and no lock
//! guards the windows.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_tungstenite::tungstenite::Utf8Bytes;
// hashbrown for `entry_ref` (look up by &str, allocate only on insert) and its
// fast, randomly seeded default hasher. Keys come from publishers, so the
// number of keys is capped by sma.max_keys as well.
use hashbrown::HashMap;
use hashbrown::hash_map::EntryRef;

use crate::broker::Outbound;
use crate::broker::SnapshotSlot;
use crate::config::Settings;
use crate::config::series::Series;
use crate::frame::{ResultFrame, SharedResult};
use crate::idle::is_idle;
use crate::names;
use crate::protocol::{KeyFraming, Position, SmaMessage, WindowFraming};
use crate::quote::{self, Quote, Reject};
use crate::series;
use crate::sma::{SmaWindow, WindowState};
use crate::stats::Stats;
use crate::topology::{Channels, Shard};
use serde::{Deserialize, Serialize};

/// The part of a rejected payload republished with its reason.
const REJECTED_SAMPLE_BYTES: usize = 1024;

/// Quote → SMA → encoded result, for every key.
pub struct Pipeline {
    windows: Windows,
    addressing: ResultAddressing,
    rejected_channel: Option<Arc<str>>,
    emit_partial: bool,
    shard: Shard,
    /// `sma.window` written out once, for every message.
    window_framing: WindowFraming,
    /// The epoch of every key this run of the pipeline starts (a fresh one
    /// per process): a key restored from saved state keeps its own.
    epoch: Arc<str>,
    /// `sma.key_idle_ms` in sweeps, in milliseconds (see [`crate::idle`]).
    sweep_ms: u64,
    /// Whether payloads that are not quotes at all are reported here.
    reports_unparseable: bool,
    /// Whether each input channel carries only this shard's symbols (a
    /// cluster's partitions), so a stranger is misaddressed, not another's.
    partitioned: bool,
    /// The `[[series]]` computed beside the SMA, in configuration order.
    series: Arc<[Series]>,
    /// The series results of the last quote, until taken
    /// ([`Pipeline::take_series`]): a buffer kept, so the outcome of every
    /// quote stays small whether or not series are configured.
    series_out: Vec<Emitted>,
    /// The keys that took a quote since [`Pipeline::take_touched`], when
    /// tracked (stream mode saves their state): `None` otherwise.
    touched: Option<HashSet<(Option<String>, String)>>,
    /// The feed's event time: the newest `ts` the time-based series took,
    /// never past the bridge's clock (a `ts` refused as too far ahead of it
    /// does not move it at all).
    feed_ms: u64,
    /// Open candles by when the feed's progress closes them (their end plus
    /// `lateness_ms`), should their keys go quiet: (when, series index,
    /// client, symbol). One entry per candle opened; an entry whose candle
    /// closed otherwise (the key's own next bucket, or its release) is
    /// dropped when due.
    quiet_closes: BTreeSet<QuietClose>,
    stats: Arc<Stats>,
    reject_log: RejectLog,
}

/// What one input payload produced.
pub enum Outcome {
    /// A valid quote; its key's window took the price. `sma` is set when the
    /// key emits a result (always, once the window is full). Its
    /// `[[series]]` results, if any, follow with [`Pipeline::take_series`].
    Accepted {
        /// The result to publish and fan out.
        sma: Option<Emitted>,
    },
    /// A valid quote for a symbol another compute shard handles: ignored.
    OtherShard,
    /// Not a valid quote: counted and logged. `notice` is the message for
    /// `redis.rejected`, unless that is disabled.
    Rejected {
        /// The rejection notice to publish.
        notice: Option<Outbound>,
    },
}

/// One result (the SMA's or a series'), encoded once.
pub struct Emitted {
    /// The output channel of its key.
    pub channel: Arc<str>,
    /// The JSON message, shared by Redis and every socket, with its key
    /// and position.
    pub frame: SharedResult,
    /// Where the result is kept for gateways' snapshots, if it is.
    pub snapshot: Option<Arc<SnapshotSlot>>,
}

impl Emitted {
    /// The message to publish on Redis (the same bytes as the frame).
    #[must_use]
    pub fn outbound(&self) -> Outbound {
        Outbound {
            channel: self.channel.clone(),
            payload: self.frame.text().clone().into(),
            snapshot: self.snapshot.clone(),
        }
    }
}

impl Pipeline {
    /// A pipeline with no windows yet.
    #[must_use]
    pub fn new(settings: &Settings, stats: Arc<Stats>) -> Self {
        let channels = settings.redis.channels();
        let shard = settings.node.shard;
        Self {
            windows: Windows::new(settings.window(), settings.sma.max_keys, stats.clone()),
            rejected_channel: channels.rejected_channel(),
            window_framing: WindowFraming::new(settings.window().get()),
            epoch: new_epoch(),
            sweep_ms: u64::try_from(settings.key_sweep_interval().as_millis()).unwrap_or(u64::MAX),
            // On one server every shard reads every payload: shard 0 alone
            // reports the unparseable ones, so each yields one notice, not N.
            // A cluster partition's channel reaches one shard only.
            reports_unparseable: shard.index() == 0 || channels.is_partitioned(),
            partitioned: channels.is_partitioned(),
            addressing: ResultAddressing {
                channels,
                snapshots: settings.node.role.stores_snapshots(),
            },
            emit_partial: settings.sma.emit_partial,
            shard,
            series: settings.series.clone().into(),
            series_out: Vec::new(),
            touched: None,
            feed_ms: 0,
            quiet_closes: BTreeSet::new(),
            stats,
            reject_log: RejectLog::default(),
        }
    }

    /// Runs one payload through parse → window → encode.
    pub fn process(&mut self, payload: &[u8]) -> Outcome {
        self.stats.quotes_received.fetch_add(1, Relaxed);
        let (quote, spelled) = match quote::parse_spelled(payload) {
            Ok(parsed) => parsed,
            Err(reason) => return self.reject(&reason, payload),
        };
        if !self.shard.owns(&quote.symbol) {
            if self.partitioned {
                return self.reject(&Reject::WrongPartition, payload);
            }
            self.stats.quotes_other_shard.fetch_add(1, Relaxed);
            return Outcome::OtherShard;
        }
        let client = quote.client.as_deref();
        let Some(key) = self.windows.get_or_insert(
            client,
            &quote.symbol,
            &self.addressing,
            &self.epoch,
            &self.series,
        ) else {
            return self.reject(&Reject::TooManyKeys, payload);
        };
        if let Some(touched) = &mut self.touched {
            touched.insert((client.map(str::to_owned), quote.symbol.to_string()));
        }
        let ts = quote.ts.unwrap_or_else(now_ms);
        let mut feed_to = None;
        if !self.series.is_empty() {
            self.series_out.clear();
            let out = &mut self.series_out;
            let closes = &mut self.quiet_closes;
            let reached = series_results(&self.series, key, &quote, ts, &self.stats, out, closes);
            feed_to = reached.filter(|&reached| reached > self.feed_ms);
        }
        let average = key.window.push(quote.price, quote.decimal);
        let sma = if !self.emit_partial && !key.window.is_full() {
            None
        } else {
            key.seq += 1;
            let frame = SmaMessage {
                symbol: &quote.symbol,
                price: quote.price,
                sma: average.mean,
                window: key.window.capacity(),
                count: average.count,
                ts,
                seq: key.seq,
                epoch: &key.epoch,
                client,
            }
            // The parser admitted only valid names.
            .encode_framed(&key.framing, &self.window_framing, spelled);
            let sma = Emitted {
                channel: key.channel.clone(),
                frame: ResultFrame::encoded(Utf8Bytes::from(frame), &key.framing, key.seq),
                snapshot: key.snapshot.clone(),
            };
            self.stats.smas_emitted.fetch_add(1, Relaxed);
            if !average.exact {
                self.stats.smas_inexact.fetch_add(1, Relaxed);
            }
            Some(sma)
        };
        if let Some(reached) = feed_to {
            self.feed_ms = reached;
            self.close_quiet_keys(quote.price);
        }
        Outcome::Accepted { sma }
    }

    /// Closes the open candles of keys that went quiet while the feed's
    /// event time passed their end by `lateness_ms`, each closed candle a
    /// result of its key (after the triggering quote's own, with its `ts`).
    /// Deterministic: the same input closes the same candles at the same
    /// quote, however fast it comes.
    fn close_quiet_keys(&mut self, price: f64) {
        while let Some(first) = self.quiet_closes.first() {
            if first.0 > self.feed_ms {
                break;
            }
            let Some((_, index, client, symbol)) = self.quiet_closes.pop_first() else {
                break;
            };
            let (Some(key), Some(config)) = (
                self.windows.get_mut(client.as_deref(), &symbol),
                self.series.get(index),
            ) else {
                continue;
            };
            let Some(own) = key.series.get_mut(index) else {
                continue;
            };
            let Some(output) = own.state.close_quiet(&config.spec, self.feed_ms) else {
                continue;
            };
            let at = (symbol.as_ref(), client.as_deref(), self.feed_ms, price);
            emit(
                config,
                own,
                &key.epoch,
                at,
                &output,
                &self.stats,
                &mut self.series_out,
            );
            if let Some(touched) = &mut self.touched {
                touched.insert((client.as_deref().map(str::to_owned), symbol.to_string()));
            }
        }
    }

    /// The feed's event time (see [`Pipeline::close_quiet_keys`]), for
    /// stream mode to save with each batch.
    #[must_use]
    pub fn feed_ms(&self) -> u64 {
        self.feed_ms
    }

    /// Continues the feed's event time from a saved one.
    pub fn restore_feed(&mut self, feed_ms: u64) {
        self.feed_ms = feed_ms;
    }

    /// The `[[series]]` results of the quote just processed, in order
    /// (none unless series are configured and the quote was accepted).
    pub fn take_series(&mut self) -> std::vec::Drain<'_, Emitted> {
        self.series_out.drain(..)
    }

    /// From now on, notes every key that takes a quote, until taken.
    pub fn track_touched(&mut self) {
        self.touched.get_or_insert_with(HashSet::new);
    }

    /// The keys (client, symbol) that took a quote since the last call
    /// (none unless [`Pipeline::track_touched`]).
    pub fn take_touched(&mut self) -> HashSet<(Option<String>, String)> {
        self.touched
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn reject(&mut self, reason: &Reject, payload: &[u8]) -> Outcome {
        self.stats.reject(reason);
        let sample = &payload[..payload.len().min(REJECTED_SAMPLE_BYTES)];
        let sample = String::from_utf8_lossy(sample);
        self.reject_log.record(reason, &sample);
        // Only the owning shard meets these; any shard meets the rest.
        let own = matches!(reason, Reject::TooManyKeys | Reject::WrongPartition);
        let channel = self
            .rejected_channel
            .as_ref()
            .filter(|_| own || self.reports_unparseable);
        let notice = channel.map(|channel| {
            let body = serde_json::json!({ "error": reason.to_string(), "payload": sample });
            Outbound::new(channel.clone(), body.to_string().into())
        });
        Outcome::Rejected { notice }
    }

    /// Whether this pipeline's shard handles `symbol`.
    #[must_use]
    pub fn owns(&self, symbol: &str) -> bool {
        self.shard.owns(symbol)
    }

    /// Whether the key (`client`, `symbol`) is alive.
    #[must_use]
    pub fn has_key(&self, client: Option<&str>, symbol: &str) -> bool {
        self.windows.get(client, symbol).is_some()
    }

    /// The most keys alive at once (`sma.max_keys`).
    #[must_use]
    pub fn max_keys(&self) -> usize {
        self.windows.max_keys
    }

    /// The state of one key (its window, its series and its positions), if
    /// the key exists.
    #[must_use]
    pub fn key_state(&self, client: Option<&str>, symbol: &str) -> Option<KeyState> {
        self.windows.get(client, symbol).map(|key| KeyState {
            window: key.window.state(),
            seq: Some(key.seq),
            epoch: Some(key.epoch.to_string()),
            last_quote_ms: None,
            series: self
                .series
                .iter()
                .zip(&key.series)
                .map(|(config, own)| {
                    let saved = SavedSeries {
                        state: own.state.save(),
                        seq: own.seq,
                    };
                    (config.spec.name.to_string(), saved)
                })
                .collect(),
        })
    }

    /// Replaces one key's state with `state` (restoring after a restart).
    /// Names that are not valid (a hand-edited state hash) are skipped:
    /// results are encoded on the assumption that every key's names are.
    /// A state saved without a valid position cannot be continued: the key
    /// starts a new sequence in an epoch of its own, which no result before
    /// has used.
    pub fn restore_key(&mut self, client: Option<&str>, symbol: &str, state: KeyState) {
        if !names::is_symbol(symbol) || !client.is_none_or(names::is_client_code) {
            tracing::warn!(symbol, client, "window state for invalid names ignored");
            return;
        }
        let capacity = self.windows.window;
        let sweep = self.windows.sweep;
        let epoch = &self.epoch;
        if let Some(key) =
            self.windows
                .get_or_insert(client, symbol, &self.addressing, epoch, &self.series)
        {
            key.window = SmaWindow::restore(capacity, state.window);
            // A saved seq at the end of u64 could not be continued.
            let saved = state.epoch.filter(|e| names::is_epoch(e)).zip(state.seq);
            let saved = saved.filter(|(_, seq)| *seq < u64::MAX);
            let continued = saved.is_some();
            let (epoch, seq) = match saved {
                Some((epoch, seq)) => (Arc::from(epoch), seq),
                None => (new_epoch(), 0),
            };
            key.seq = seq;
            let mut saved_series = state.series;
            for (index, (config, own)) in self.series.iter().zip(&mut key.series).enumerate() {
                // A series added since starts afresh; one removed is gone.
                if let Some(saved) = saved_series.remove(&*config.spec.name) {
                    own.state = config.spec.restore(saved.state);
                    if let Some(at) = own.state.closes_at(&config.spec) {
                        let key_name = (client.map(Box::from), symbol.into());
                        self.quiet_closes
                            .insert((at, index, key_name.0, key_name.1));
                    }
                    // In a new epoch, every sequence of the key starts over.
                    own.seq = if continued && saved.seq < u64::MAX {
                        saved.seq
                    } else {
                        0
                    };
                }
            }
            // Idle since its last quote: as many sweeps ago as that was.
            if let Some(last) = state.last_quote_ms {
                let idle_ms = now_ms().saturating_sub(last);
                let sweep_ms = self.sweep_ms.max(1);
                let ago = (idle_ms / sweep_ms).min(u64::from(crate::idle::SWEEPS_PER_IDLE) + 1);
                key.touched = sweep.wrapping_sub(ago as u32);
            }
            if epoch != key.epoch {
                key.epoch = epoch;
                key.framing = KeyFraming::new(symbol, &key.epoch, client);
            }
        }
    }

    /// Releases the keys that had no quote for about `sma.key_idle_ms`:
    /// called every [`Settings::key_sweep_interval`], it walks every key
    /// once (one task owns the pipeline; no lock is held). A released key's
    /// next quote starts a new window in a new epoch: the run's epoch for
    /// new keys changes whenever keys are released, so a key created again
    /// never repeats a `seq` of its old epoch.
    pub fn release_idle(&mut self) -> Vec<Released> {
        let released = self.windows.release_idle();
        self.windows.shrink();
        if !released.is_empty() {
            self.epoch = new_epoch();
            self.stats
                .keys_released
                .fetch_add(released.len() as u64, Relaxed);
        }
        released
    }

    /// Forgets every window (before restoring them all again). A key that
    /// is not restored starts over, so the run's epoch for new keys changes
    /// too: a key created again must not repeat `seq`s of its old epoch.
    pub fn clear(&mut self) {
        let stats = self.stats.clone();
        self.windows = Windows::new(self.windows.window, self.windows.max_keys, stats);
        self.stats.keys.store(0, Relaxed);
        self.epoch = new_epoch();
        self.quiet_closes.clear();
        self.feed_ms = 0;
    }
}

/// What durable stream mode saves of a key, to continue it after a restart
/// or a takeover: its window, and its position, so the sequence continues
/// in the same epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyState {
    /// The window.
    #[serde(flatten)]
    pub window: WindowState,
    /// The key's last `seq` (0: no result yet; absent in state saved
    /// before positions existed).
    #[serde(default)]
    pub seq: Option<u64>,
    /// The epoch `seq` counts in (absent in state saved before positions
    /// existed: such a key starts a new epoch).
    #[serde(default)]
    pub epoch: Option<String>,
    /// When the key last had a quote, in Unix milliseconds (absent in state
    /// saved before keys expired: such a key is as if just used). A key
    /// restored after a restart keeps its idle time, so restarts cannot keep
    /// an idle key alive for ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_quote_ms: Option<u64>,
    /// Each `[[series]]`' state and last `seq`, by name (absent when none
    /// are configured).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub series: BTreeMap<String, SavedSeries>,
}

/// What durable stream mode saves of one series of a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedSeries {
    /// The series' state.
    pub state: series::SavedState,
    /// Its last `seq` (in the key's epoch).
    pub seq: u64,
}

/// One key's window and where its results go.
struct Key {
    window: SmaWindow,
    /// The key's state of each `[[series]]`, in configuration order.
    series: Vec<SeriesKey>,
    channel: Arc<str>,
    snapshot: Option<Arc<SnapshotSlot>>,
    /// The key's last `seq`.
    seq: u64,
    epoch: Arc<str>,
    /// The key's fixed parts of every message, written out once.
    framing: KeyFraming,
    /// The sweep during which the key last had a quote.
    touched: u32,
}

/// Where a new key's results go: its output channel and snapshot slot.
struct ResultAddressing {
    channels: Channels,
    /// Whether public results are kept for gateways.
    snapshots: bool,
}

impl ResultAddressing {
    fn key(
        &self,
        client: Option<&str>,
        symbol: &str,
        window: NonZeroUsize,
        epoch: &Arc<str>,
        series: &[Series],
    ) -> Key {
        Key {
            window: SmaWindow::new(window),
            series: series
                .iter()
                .map(|series| SeriesKey {
                    state: series.spec.start(),
                    channel: self.channels.series_channel(&series.channel, symbol),
                    snapshot: (self.snapshots && client.is_none()).then(|| {
                        Arc::new(
                            self.channels
                                .series_snapshot_slot(symbol, &series.spec.name),
                        )
                    }),
                    seq: 0,
                })
                .collect(),
            channel: self.channels.output_channel(symbol),
            snapshot: (self.snapshots && client.is_none())
                .then(|| Arc::new(self.channels.snapshot_slot(symbol))),
            seq: 0,
            epoch: epoch.clone(),
            framing: KeyFraming::new(symbol, epoch, client),
            touched: 0,
        }
    }
}

/// One key's state of one `[[series]]`, and where its results go.
struct SeriesKey {
    state: series::State,
    channel: Arc<str>,
    /// Where its latest public result is kept for gateways, if it is.
    snapshot: Option<Arc<SnapshotSlot>>,
    /// The series key's last `seq` (in the key's epoch).
    seq: u64,
}

/// An open candle that the feed's progress closes if its key goes quiet:
/// when (its end plus `lateness_ms`), the series' index, client and symbol.
type QuietClose = (u64, usize, Option<Box<str>>, Box<str>);

/// Runs one quote through every series of its key: the results to publish,
/// each with its own position, go to `out`, and each candle it opens to
/// `quiet_closes`. A time-based series refuses a quote that is late for it,
/// or whose `ts` is further ahead of the clock than its `max_future_ms`
/// (one bad timestamp must not close every candle). When a time-based
/// series took the quote, returns how far the feed's event time may move
/// for it: its `ts`, but never past the bridge's clock, so a quote dated
/// ahead (within `max_future_ms`) cannot close other keys' candles early.
fn series_results(
    configured: &[Series],
    key: &mut Key,
    quote: &Quote<'_>,
    ts: u64,
    stats: &Stats,
    out: &mut Vec<Emitted>,
    quiet_closes: &mut BTreeSet<QuietClose>,
) -> Option<u64> {
    let input = series::Input {
        ts,
        price: quote.price,
        decimal: quote.decimal,
        volume: quote.volume.map(|v| (v, quote.volume_decimal)),
    };
    let mut now = None;
    let mut reached = None;
    for (index, (config, own)) in configured.iter().zip(&mut key.series).enumerate() {
        if config.spec.is_timed() {
            let now = *now.get_or_insert_with(now_ms);
            if ts > now.saturating_add(config.max_future_ms) {
                stats.series_future.fetch_add(1, Relaxed);
                continue;
            }
            reached = Some(ts.min(now));
        }
        let closes_at = own.state.closes_at(&config.spec);
        let outputs = own.state.push(&config.spec, &input);
        if outputs.late {
            stats.series_late.fetch_add(1, Relaxed);
        }
        // A new candle: the feed's progress closes it, should the key go quiet.
        if let Some(at) = own.state.closes_at(&config.spec)
            && closes_at != Some(at)
        {
            let client = quote.client.as_deref().map(Box::from);
            quiet_closes.insert((at, index, client, quote.symbol.as_ref().into()));
        }
        let at = (
            quote.symbol.as_ref(),
            quote.client.as_deref(),
            ts,
            quote.price,
        );
        for output in &outputs.results {
            emit(config, own, &key.epoch, at, output, stats, out);
        }
    }
    reached
}

/// One result of a series key, at its next `seq`: encoded, and framed for
/// the sockets under its key `symbol@series`. `at` is the key's symbol and
/// client, and the `ts` and price of the quote that made it.
fn emit(
    config: &Series,
    own: &mut SeriesKey,
    epoch: &str,
    (symbol, client, ts, price): (&str, Option<&str>, u64, f64),
    output: &series::Output,
    stats: &Stats,
    out: &mut Vec<Emitted>,
) {
    own.seq += 1;
    let position = series::Position {
        symbol,
        client,
        ts,
        seq: own.seq,
        epoch,
    };
    let text = output.encode(&config.spec, price, &position);
    let frame = ResultFrame::series(
        Utf8Bytes::from(text),
        &config.spec.name,
        symbol,
        client,
        Position {
            seq: own.seq,
            epoch,
        },
        output.bar_state(),
    );
    stats.series_results.fetch_add(1, Relaxed);
    out.push(Emitted {
        channel: own.channel.clone(),
        frame,
        snapshot: own.snapshot.clone(),
    });
}

/// A fresh epoch: 8 random hex digits. Two runs share one with odds of
/// 1 in 4 billion, and a client that resumes across them could then be
/// told a gap is none; the digits are few because every message carries them.
fn new_epoch() -> Arc<str> {
    format!("{:08x}", rand::random::<u32>()).into()
}

/// Every SMA window, public by symbol and private by client then symbol, so
/// lookups borrow the quote's strings and allocate nothing.
struct Windows {
    window: NonZeroUsize,
    max_keys: usize,
    len: usize,
    /// Sweeps so far: a key records the one it was last used in.
    sweep: u32,
    /// Where the number of keys is shown (the `keys` gauge).
    stats: Arc<Stats>,
    public: HashMap<Box<str>, Key>,
    private: HashMap<Box<str>, HashMap<Box<str>, Key>>,
}

impl Windows {
    fn new(window: NonZeroUsize, max_keys: usize, stats: Arc<Stats>) -> Self {
        Self {
            window,
            max_keys,
            len: 0,
            sweep: 0,
            stats,
            public: HashMap::default(),
            private: HashMap::default(),
        }
    }

    fn get(&self, client: Option<&str>, symbol: &str) -> Option<&Key> {
        match client {
            None => self.public.get(symbol),
            Some(code) => self.private.get(code)?.get(symbol),
        }
    }

    fn get_mut(&mut self, client: Option<&str>, symbol: &str) -> Option<&mut Key> {
        match client {
            None => self.public.get_mut(symbol),
            Some(code) => self.private.get_mut(code)?.get_mut(symbol),
        }
    }

    /// The key's state, created on first use; `None` when `max_keys` is reached.
    /// One hash per map on the hot path, and an allocation only for a new key.
    fn get_or_insert(
        &mut self,
        client: Option<&str>,
        symbol: &str,
        addressing: &ResultAddressing,
        epoch: &Arc<str>,
        series: &[Series],
    ) -> Option<&mut Key> {
        let full = self.len >= self.max_keys;
        let map = match client {
            None => &mut self.public,
            Some(code) => match self.private.entry_ref(code) {
                EntryRef::Occupied(entry) => entry.into_mut(),
                EntryRef::Vacant(_) if full => return None,
                EntryRef::Vacant(entry) => entry.insert(HashMap::default()),
            },
        };
        let key = match map.entry_ref(symbol) {
            EntryRef::Occupied(entry) => entry.into_mut(),
            EntryRef::Vacant(_) if full => return None,
            EntryRef::Vacant(entry) => {
                self.len += 1;
                self.stats.keys.store(self.len as u64, Relaxed);
                entry.insert(addressing.key(client, symbol, self.window, epoch, series))
            }
        };
        key.touched = self.sweep;
        Some(key)
    }

    /// Starts a new sweep and releases every key last used
    /// `SWEEPS_PER_IDLE` full sweeps ago or earlier; returns them.
    fn release_idle(&mut self) -> Vec<Released> {
        self.sweep = self.sweep.wrapping_add(1);
        let sweep = self.sweep;
        let idle = |key: &Key| is_idle(key.touched, sweep);
        let mut released = Vec::new();
        self.public.retain(|symbol, key| {
            let keep = !idle(key);
            if !keep {
                let series = key.series.iter_mut().filter_map(|own| own.snapshot.take());
                released.push(Released {
                    client: None,
                    symbol: symbol.clone(),
                    snapshots: key.snapshot.take().into_iter().chain(series).collect(),
                });
            }
            keep
        });
        self.private.retain(|client, symbols| {
            symbols.retain(|symbol, key| {
                let keep = !idle(key);
                if !keep {
                    released.push(Released {
                        client: Some(client.clone()),
                        symbol: symbol.clone(),
                        snapshots: Vec::new(),
                    });
                }
                keep
            });
            !symbols.is_empty()
        });
        self.len -= released.len();
        if !released.is_empty() {
            self.stats.keys.store(self.len as u64, Relaxed);
        }
        released
    }

    /// Gives back the room of keys released: a burst of junk keys must
    /// not keep its tables at their peak size.
    fn shrink(&mut self) {
        if self.public.capacity() > 4 * self.public.len().max(16) {
            self.public.shrink_to_fit();
        }
        if self.private.capacity() > 4 * self.private.len().max(16) {
            self.private.shrink_to_fit();
        }
    }
}

/// A key released for having had no quote for `sma.key_idle_ms`: what is
/// kept of it elsewhere (saved state, the snapshot hash) goes too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Its client, for a private key.
    pub client: Option<Box<str>>,
    /// Its symbol.
    pub symbol: Box<str>,
    /// Where its latest results (the SMA's and each series') were kept
    /// for gateways, if they were.
    pub snapshots: Vec<Arc<SnapshotSlot>>,
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

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_per_client_and_symbol_and_bounded() {
        let settings = Settings::defaults().expect("defaults");
        let output = ResultAddressing {
            channels: settings.redis.channels(),
            snapshots: false,
        };
        let stats = Arc::new(Stats::default());
        let mut windows = Windows::new(NonZeroUsize::new(2).expect("non-zero"), 3, stats);
        let epoch = new_epoch();
        windows
            .get_or_insert(None, "A", &output, &epoch, &[])
            .expect("key")
            .window
            .push(1.0, None);
        windows
            .get_or_insert(Some("c1"), "A", &output, &epoch, &[])
            .expect("key")
            .window
            .push(5.0, None);
        let public = windows
            .get_or_insert(None, "A", &output, &epoch, &[])
            .expect("key");
        assert_eq!(
            public.window.push(3.0, None).mean,
            2.0,
            "private prices do not mix in"
        );
        assert!(
            windows
                .get_or_insert(Some("c2"), "A", &output, &epoch, &[])
                .is_some()
        );
        assert!(
            windows
                .get_or_insert(Some("c2"), "B", &output, &epoch, &[])
                .is_none(),
            "fourth key refused"
        );
        assert!(
            windows
                .get_or_insert(Some("c3"), "A", &output, &epoch, &[])
                .is_none()
        );
        assert!(
            windows
                .get_or_insert(Some("c1"), "A", &output, &epoch, &[])
                .is_some(),
            "known keys still work"
        );
    }

    fn position_of(outcome: Outcome) -> (u64, String) {
        match outcome {
            Outcome::Accepted { sma: Some(sma), .. } => {
                let message: serde_json::Value =
                    serde_json::from_str(sma.frame.as_str()).expect("json");
                let position = sma.frame.position().expect("a position");
                assert_eq!(
                    message["seq"], position.seq,
                    "the frame carries the position"
                );
                assert_eq!(message["epoch"], position.epoch);
                (position.seq, position.epoch.to_owned())
            }
            _ => panic!("expected a result"),
        }
    }

    #[test]
    fn each_key_counts_its_results_and_saved_state_continues_the_count() {
        let mut settings = Settings::defaults().expect("defaults");
        settings.sma.emit_partial = true;
        let stats = Arc::new(Stats::default());
        let mut pipeline = Pipeline::new(&settings, stats.clone());
        let public = br#"{"symbol":"A","price":1}"#;
        let private = br#"{"symbol":"A","price":1,"client":"acme"}"#;
        let (seq, epoch) = position_of(pipeline.process(public));
        assert_eq!(seq, 1);
        assert_eq!(position_of(pipeline.process(public)), (2, epoch.clone()));
        assert_eq!(
            position_of(pipeline.process(private)).0,
            1,
            "its own sequence"
        );

        // Saved and restored (stream mode): the sequence goes on in its epoch.
        let state = pipeline.key_state(None, "A").expect("state");
        let saved = serde_json::to_string(&state).expect("serializes");
        let mut restarted = Pipeline::new(&settings, stats.clone());
        assert_ne!(restarted.epoch, pipeline.epoch, "a new run, a new epoch");
        let state: KeyState = serde_json::from_str(&saved).expect("parses");
        restarted.restore_key(None, "A", state);
        assert_eq!(position_of(restarted.process(public)), (3, epoch.clone()));

        // State saved before positions existed: a new sequence, a new epoch.
        let old = r#"{"prices":[1.0],"sum":1.0,"compensation":0.0}"#;
        let state: KeyState = serde_json::from_str(old).expect("old state parses");
        let mut upgraded = Pipeline::new(&settings, stats);
        upgraded.restore_key(None, "A", state);
        let (seq, new_epoch) = position_of(upgraded.process(public));
        assert_eq!(seq, 1);
        assert_ne!(new_epoch, epoch);
    }

    #[test]
    fn idle_keys_are_released_and_come_back_in_a_new_epoch() {
        let mut settings = Settings::defaults().expect("defaults");
        settings.sma.emit_partial = true;
        settings.sma.max_keys = 2;
        let stats = Arc::new(Stats::default());
        let mut pipeline = Pipeline::new(&settings, stats.clone());
        let (busy, idle, new) = (
            br#"{"symbol":"BUSY","price":1}"#,
            br#"{"symbol":"IDLE","price":1}"#,
            br#"{"symbol":"NEW","price":1}"#,
        );
        position_of(pipeline.process(busy));
        let (_, old_epoch) = position_of(pipeline.process(idle));
        position_of(pipeline.process(idle));
        assert!(
            matches!(pipeline.process(new), Outcome::Rejected { .. }),
            "two keys alive: a third is refused"
        );
        // BUSY has a quote in every sweep; IDLE none after the first.
        for sweep in 1..=crate::idle::SWEEPS_PER_IDLE {
            assert!(
                pipeline.release_idle().is_empty(),
                "sweep {sweep}: not idle yet"
            );
            position_of(pipeline.process(busy));
        }
        let released = pipeline.release_idle();
        assert_eq!(
            released.iter().map(|k| &*k.symbol).collect::<Vec<_>>(),
            ["IDLE"]
        );
        assert_eq!(stats.keys_released.load(Relaxed), 1);
        assert_eq!(stats.keys.load(Relaxed), 1);
        assert!(
            pipeline.key_state(None, "IDLE").is_none(),
            "its window went"
        );
        // Room again: a new key is taken, and IDLE starts over in a new epoch.
        position_of(pipeline.process(new));
        position_of(pipeline.process(busy));
        pipeline.release_idle();
        let (seq, epoch) = position_of(pipeline.process(busy));
        assert!(seq > 1, "a key in use keeps its sequence");
        assert_eq!(pipeline.release_idle().len(), 0);
        for _ in 0..=crate::idle::SWEEPS_PER_IDLE {
            pipeline.release_idle();
        }
        let (seq, again) = position_of(pipeline.process(idle));
        assert_eq!(seq, 1, "a new window");
        assert_ne!(again, old_epoch, "in a new epoch");
        assert_ne!(again, epoch);
    }

    #[test]
    fn a_restored_key_keeps_its_idle_time_across_restarts() {
        let mut settings = Settings::defaults().expect("defaults");
        settings.sma.emit_partial = true;
        settings.sma.key_idle_ms = 60_000;
        let stats = Arc::new(Stats::default());
        let mut pipeline = Pipeline::new(&settings, stats.clone());
        position_of(pipeline.process(br#"{"symbol":"OLD","price":1}"#));
        position_of(pipeline.process(br#"{"symbol":"NEW","price":1}"#));
        let saved = |symbol: &str, ago_ms: u64| {
            let mut state = pipeline.key_state(None, symbol).expect("state");
            state.last_quote_ms = Some(now_ms() - ago_ms);
            serde_json::to_string(&state).expect("serializes")
        };
        let (old, new) = (saved("OLD", 61_000), saved("NEW", 1_000));
        // A restart: restored from what was saved.
        let mut restarted = Pipeline::new(&settings, stats);
        for (symbol, state) in [("OLD", old), ("NEW", new)] {
            let state: KeyState = serde_json::from_str(&state).expect("parses");
            restarted.restore_key(None, symbol, state);
        }
        let released = restarted.release_idle();
        assert_eq!(
            released.iter().map(|k| &*k.symbol).collect::<Vec<_>>(),
            ["OLD"],
            "idle for longer than key_idle_ms before the restart"
        );
    }

    fn notice(outcome: Outcome) -> Option<String> {
        match outcome {
            Outcome::Rejected { notice } => {
                notice.map(|n| String::from_utf8_lossy(&n.payload).into_owned())
            }
            _ => None,
        }
    }

    #[test]
    fn shards_of_one_server_report_unparseable_input_once() {
        let mut settings = Settings::defaults().expect("defaults");
        settings.node.role = crate::topology::Role::Compute;
        settings.sma.max_keys = 1;
        let stats = Arc::new(Stats::default());
        let mut shards: Vec<Pipeline> = (0..2)
            .map(|i| {
                settings.node.shard = Shard::new(i, 2).expect("shard");
                Pipeline::new(&settings, stats.clone())
            })
            .collect();
        let reported: Vec<bool> = shards
            .iter_mut()
            .map(|p| notice(p.process(b"not a quote")).is_some())
            .collect();
        assert_eq!(reported, [true, false], "shard 0 alone reports it");

        // A key refused for max_keys is reported by the shard that owns it.
        let owner = |symbol: &str| usize::from(!Shard::new(0, 2).expect("shard").owns(symbol));
        let symbols: Vec<String> = (0..40).map(|n| format!("S{n}")).collect();
        let on_1: Vec<&String> = symbols.iter().filter(|s| owner(s) == 1).take(2).collect();
        let quote = |s: &str| format!(r#"{{"symbol":"{s}","price":1}}"#);
        assert!(matches!(
            shards[1].process(quote(on_1[0]).as_bytes()),
            Outcome::Accepted { .. }
        ));
        let refused = notice(shards[1].process(quote(on_1[1]).as_bytes())).expect("a notice");
        assert!(refused.contains("too many distinct keys"), "{refused}");
        assert!(matches!(
            shards[0].process(quote(on_1[1]).as_bytes()),
            Outcome::OtherShard
        ));
    }

    #[test]
    fn a_cluster_shard_rejects_quotes_on_the_wrong_partition() {
        let mut settings = Settings::defaults().expect("defaults");
        settings.node.role = crate::topology::Role::Compute;
        settings.node.shard = Shard::new(1, 2).expect("shard");
        settings.redis.cluster_nodes = vec!["redis://127.0.0.1:7000".into()];
        let mut pipeline = Pipeline::new(&settings, Arc::new(Stats::default()));
        let stranger = (0..)
            .map(|n| format!("S{n}"))
            .find(|s| !pipeline.owns(s))
            .expect("a symbol of shard 0");
        let payload = format!(r#"{{"symbol":"{stranger}","price":1}}"#);
        let refused = notice(pipeline.process(payload.as_bytes())).expect("a notice");
        assert!(refused.contains("wrong partition"), "{refused}");
        assert!(
            notice(pipeline.process(b"{")).is_some(),
            "unparseable input is reported too"
        );
    }
}

#[cfg(test)]
mod quiet_candles {
    use super::*;
    use crate::config::series::{SeriesKind, SeriesSettings};

    fn candles_pipeline() -> (Pipeline, Arc<Stats>) {
        candles_of_interval("1m")
    }

    fn candles_of_interval(interval: &str) -> (Pipeline, Arc<Stats>) {
        let minute = SeriesSettings {
            interval: Some(interval.into()),
            update_ms: 0,
            ..SeriesSettings::new("candles.1m", SeriesKind::Candles)
        };
        let settings = Settings::defaults()
            .expect("defaults")
            .with_series(vec![minute])
            .expect("a valid series");
        let stats = Arc::new(Stats::default());
        (Pipeline::new(&settings, stats.clone()), stats)
    }

    /// The series results of one quote: (key, closed, start, seq, ts).
    fn candles_of(
        pipeline: &mut Pipeline,
        symbol: &str,
        ts: u64,
    ) -> Vec<(String, bool, u64, u64, u64)> {
        let quote = format!(r#"{{"symbol":"{symbol}","price":1,"ts":{ts}}}"#);
        assert!(matches!(
            pipeline.process(quote.as_bytes()),
            Outcome::Accepted { .. }
        ));
        pipeline
            .take_series()
            .map(|result| {
                let candle: serde_json::Value =
                    serde_json::from_str(result.frame.as_str()).expect("JSON");
                (
                    result.frame.key().to_owned(),
                    candle["closed"] == true,
                    candle["start"].as_u64().expect("start"),
                    candle["seq"].as_u64().expect("seq"),
                    candle["ts"].as_u64().expect("ts"),
                )
            })
            .collect()
    }

    #[test]
    fn the_feed_s_progress_closes_a_quiet_key_s_candle_once() {
        let (mut pipeline, stats) = candles_pipeline();
        let key = |s: &str| format!("{s}@candles.1m");
        assert_eq!(
            candles_of(&mut pipeline, "A", 60_000),
            [(key("A"), false, 60_000, 1, 60_000)]
        );
        assert_eq!(candles_of(&mut pipeline, "B", 61_000).len(), 1);
        // The feed at 124,999 ms: A's candle [60 s, 120 s) has 5 s of
        // lateness left, and stays open.
        assert_eq!(
            candles_of(&mut pipeline, "B", 124_999),
            [
                (key("B"), true, 60_000, 2, 124_999),
                (key("B"), false, 120_000, 3, 124_999)
            ]
        );
        // At 125,000 ms it closes, after the quote's own result.
        assert_eq!(
            candles_of(&mut pipeline, "B", 125_000),
            [
                (key("B"), false, 120_000, 4, 125_000),
                (key("A"), true, 60_000, 2, 125_000)
            ]
        );
        assert_eq!(pipeline.feed_ms(), 125_000);
        // Once: a later feed closes nothing more of A.
        assert_eq!(candles_of(&mut pipeline, "B", 126_000).len(), 1);
        // A quote for A's closed bucket is late; its next bucket opens at once.
        assert!(candles_of(&mut pipeline, "A", 119_000).is_empty());
        assert_eq!(stats.series_late.load(Relaxed), 1);
        assert_eq!(
            candles_of(&mut pipeline, "A", 126_500),
            [(key("A"), false, 120_000, 3, 126_500)]
        );
    }

    #[test]
    fn a_quote_dated_ahead_of_the_clock_closes_no_other_key_s_candle() {
        let (mut pipeline, _) = candles_of_interval("1s");
        let now = now_ms();
        assert_eq!(candles_of(&mut pipeline, "A", now).len(), 1);
        // 30 s ahead: taken (max_future_ms is 60 s), but the feed stops at
        // the clock, and A's second [now, now + 1 s) has 5 s of lateness left.
        let ahead = candles_of(&mut pipeline, "B", now + 30_000);
        assert_eq!(ahead.len(), 1, "B's own candle only: {ahead:?}");
        assert!(pipeline.feed_ms() <= now_ms());
    }

    #[test]
    fn a_restored_pipeline_closes_what_the_uninterrupted_one_does() {
        let (mut whole, _) = candles_pipeline();
        let (mut first, _) = candles_pipeline();
        for (symbol, ts) in [("A", 60_000), ("B", 61_000), ("B", 100_000)] {
            assert_eq!(
                candles_of(&mut whole, symbol, ts),
                candles_of(&mut first, symbol, ts)
            );
        }
        // What stream mode saves, restored into a new pipeline.
        let (mut second, _) = candles_pipeline();
        for symbol in ["A", "B"] {
            let state = first.key_state(None, symbol).expect("a key");
            let state = serde_json::from_str(&serde_json::to_string(&state).expect("JSON"))
                .expect("a state");
            second.restore_key(None, symbol, state);
        }
        second.restore_feed(first.feed_ms());
        assert_eq!(
            candles_of(&mut whole, "B", 130_000),
            candles_of(&mut second, "B", 130_000),
            "A's quiet candle closes in both"
        );
    }
}
