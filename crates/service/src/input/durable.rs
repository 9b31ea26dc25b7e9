//! Durable input: quotes from a Redis stream, read through a consumer group,
//! with nothing lost and nothing applied twice.
//!
//! ```text
//! XREADGROUP batch ─▶ Pipeline (per entry) ─▶ MULTI
//!                                               PUBLISH/XADD every SMA and rejection notice
//!                                               HSET the touched windows' state
//!                                               XACK every entry of the batch
//!                                             EXEC ─▶ hub ─▶ sockets
//! ```
//!
//! A batch's effects land in Redis together or not at all. A crash before
//! EXEC leaves the entries pending and the stored windows as they were; on
//! start the consumer restores the windows and, before it reads any new
//! entry, applies every pending one in stream order: its own at once, one
//! another consumer left behind once that has been idle `claim_idle_ms`
//! (a takeover under another name waits that long). So it computes exactly
//! what the lost run would have, in per-key order. A crash after EXEC
//! replays nothing. Sockets are fed only after EXEC succeeds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use redis::aio::MultiplexedConnection;
use redis::streams::{
    StreamClaimReply, StreamId, StreamInfoGroupsReply, StreamPendingCountReply, StreamPendingId,
    StreamRangeReply, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncConnectionConfig, RedisResult, Value};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::broker::{snapshot_deletes, snapshot_writes};
use crate::config::{RedisSettings, Settings};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::pipeline::{Emitted, KeyState, Outcome, Pipeline, unix_ms};
use crate::stats::Stats;
use crate::topology::Role;

/// The field of an input entry that holds the quote JSON.
pub const QUOTE_FIELD: &str = "quote";

/// The field of an output entry that holds the SMA JSON.
pub const SMA_FIELD: &str = "sma";

/// How long one XREADGROUP waits for new entries; also how often shutdown is noticed.
const BLOCK: Duration = Duration::from_millis(1000);

/// How often the group's lag (`stream_lag`) is measured while it is zero
/// (while it is not, after every batch).
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Where the group's pending entries stand.
enum Pending {
    /// None are left: new entries may be read.
    Drained,
    /// The oldest is held by another consumer that may still be alive; it
    /// can be claimed in `wait` at the earliest.
    HeldElsewhere { consumer: String, wait: Duration },
    /// Shutdown began: the rest waits for the next start.
    Stopped,
}

/// A stream entry ID (`<ms>-<seq>`) as numbers, for ordering.
fn stream_position(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (
        ms.parse().unwrap_or(u64::MAX),
        seq.parse().unwrap_or(u64::MAX),
    )
}

/// The durable consumer.
pub struct DurableInput {
    /// Where the stream is: the server of `redis.url`, or the primary
    /// Sentinel names, asked again for every connection.
    redis_server: crate::broker::RedisBroker,
    redis: RedisSettings,
    pipeline: Pipeline,
    hub: Hub,
    stats: Arc<Stats>,
    consuming: Arc<AtomicBool>,
    backoff: Backoff,
    metrics: Arc<Metrics>,
    /// For a compute shard: the unsharded group its own group takes over from.
    unsharded_group: Option<String>,
    /// The field of `redis.state_key` holding this shard's feed event time
    /// (which closes quiet keys' candles, see the pipeline): `feed:I/N`.
    feed_field: String,
    /// Whether results are also published on the output channel although
    /// they go to `output_stream`: a compute node's gateways follow the channel.
    feeds_gateways: bool,
    /// How often idle keys are released.
    key_sweep: Duration,
    /// When they are next looked for; kept across reconnects, so that
    /// failures cannot put the sweep off for ever.
    next_sweep: Instant,
}

impl DurableInput {
    /// A consumer for `settings`' stream, feeding `hub`.
    pub fn new(
        metrics: Arc<Metrics>,
        settings: &Settings,
        hub: Hub,
        stats: Arc<Stats>,
        consuming: Arc<AtomicBool>,
    ) -> Result<Self, crate::broker::BrokerError> {
        let mut redis = settings.redis.clone();
        let shard = settings.node.shard;
        let unsharded_group = (shard.count() > 1).then(|| redis.consumer_group.clone());
        if shard.count() > 1 {
            // A group hands each entry to one of its consumers, whatever the
            // symbol; every shard needs every entry, so each reads through a
            // group of its own and skips the symbols it does not own.
            redis.consumer_group = format!(
                "{}.shard-{}-of-{}",
                redis.consumer_group,
                shard.index(),
                shard.count()
            );
        }
        // Each batch saves the state of the keys it touched.
        let mut pipeline = Pipeline::new(settings, stats.clone());
        pipeline.track_touched();
        Ok(Self {
            redis_server: crate::redis_broker(&settings.redis)?,
            redis,
            pipeline,
            hub,
            stats,
            consuming,
            backoff: settings.reconnect_backoff(),
            metrics,
            unsharded_group,
            feed_field: format!("feed:{}/{}", shard.index(), shard.count()),
            feeds_gateways: settings.node.role == Role::Compute,
            key_sweep: settings.key_sweep_interval(),
            next_sweep: Instant::now() + settings.key_sweep_interval(),
        })
    }

    /// Consumes until `shutdown`, finishing the batch in hand; reconnects
    /// with backoff after any failure, restoring state from Redis each time.
    #[tracing::instrument(name = "stream", skip_all, fields(stream = %self.redis.input_stream, consumer = %self.redis.consumer_name))]
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            match self.consume(&shutdown).await {
                Ok(()) => return,
                Err(err) => {
                    self.consuming.store(false, Relaxed);
                    tracing::warn!(cause = %err, "stream consumer failed; restoring from redis and retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(self.backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    async fn consume(&mut self, shutdown: &CancellationToken) -> RedisResult<()> {
        // A connection of its own: XREADGROUP BLOCK would hold up anything
        // else multiplexed on it.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(BLOCK + Duration::from_secs(5)));
        let client = self.redis_server.client_now().await.map_err(|err| {
            redis::RedisError::from((redis::ErrorKind::Io, "no Redis primary", err.to_string()))
        })?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        if self.redis_server.follows_sentinel() && !crate::broker::is_primary(&mut conn).await? {
            // A demoted primary the sentinel asked has not heard of yet:
            // applying a batch there would be lost to the new one.
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "not a primary (ROLE); a failover is under way",
            )));
        }
        self.create_group(&mut conn).await?;
        let restored = self.restore_windows(&mut conn).await?;
        self.consuming.store(true, Relaxed);
        self.backoff.reset();
        tracing::info!(windows = restored, "stream consumer ready");

        // Per-key order across crashes and takeovers: every entry delivered
        // earlier (to this consumer or another) is applied before any new
        // one is read.
        let mut held_since: Option<Instant> = None;
        let mut lag_measured: Option<Instant> = None;
        let mut batches_measured = 0;
        while !shutdown.is_cancelled() {
            // A lag shown must not outlive the entries it counted: while it
            // is not zero, it is measured again after every batch applied.
            let batches = self.stats.stream_batches.load(Relaxed);
            let stale = self.stats.stream_lag.load(Relaxed) > 0 && batches != batches_measured;
            if stale || lag_measured.is_none_or(|at| at.elapsed() >= LAG_EVERY) {
                self.measure_lag(&mut conn).await;
                lag_measured = Some(Instant::now());
                batches_measured = batches;
            }
            match self.drain_pending(&mut conn, shutdown).await? {
                Pending::Stopped => break,
                Pending::Drained => {
                    if held_since.take().is_some() {
                        tracing::info!("older entries applied; reading new ones");
                    }
                    // Only with every older entry applied: one waiting for
                    // another consumer must find its key's window as it was.
                    if Instant::now() >= self.next_sweep {
                        self.release_idle_keys(&mut conn).await?;
                        self.next_sweep = Instant::now() + self.key_sweep;
                    }
                    let entries = self.read_group(&mut conn, ">", Some(BLOCK)).await?;
                    if !entries.is_empty() {
                        self.apply(&mut conn, &entries).await?;
                    }
                }
                Pending::HeldElsewhere { consumer, wait } => {
                    if held_since.is_none() {
                        held_since = Some(Instant::now());
                        tracing::info!(
                            consumer = ?consumer,
                            claimable_in = ?wait,
                            "older entries are pending with another consumer; \
                             waiting to claim them before reading new ones"
                        );
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(wait.min(BLOCK)) => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Stores in `stream_lag` how many entries the group has yet to
    /// acknowledge: those pending plus those not yet delivered (XINFO
    /// GROUPS's `pending` and `lag`; `lag` is unknown after some deletions,
    /// and then only the pending count).
    async fn measure_lag(&self, conn: &mut MultiplexedConnection) {
        let groups: RedisResult<Vec<HashMap<String, Value>>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.redis.input_stream)
            .query_async(conn)
            .await;
        let number = |group: &HashMap<String, Value>, field: &str| match group.get(field) {
            Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        };
        match groups {
            Ok(groups) => {
                let ours = groups.iter().find(|group| {
                    matches!(group.get("name"), Some(Value::BulkString(name))
                        if name == self.redis.consumer_group.as_bytes())
                });
                if let Some(group) = ours {
                    let lag = number(group, "pending") + number(group, "lag");
                    self.stats.stream_lag.store(lag, Relaxed);
                }
            }
            Err(err) => tracing::debug!(cause = ?err, "could not measure the stream's lag"),
        }
    }

    async fn create_group(&self, conn: &mut MultiplexedConnection) -> RedisResult<()> {
        // From "0": entries added before the group existed are processed too.
        // A shard's new group starts where the unsharded group stopped, so
        // switching one consumer for N shards applies nothing twice (stop
        // the unsharded consumer cleanly first: what it left pending stays
        // with its group).
        let mut start = "0".to_owned();
        if let Some(unsharded) = &self.unsharded_group {
            let groups: RedisResult<StreamInfoGroupsReply> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&self.redis.input_stream)
                .query_async(conn)
                .await;
            if let Some(group) = groups
                .ok()
                .and_then(|reply| reply.groups.into_iter().find(|g| &g.name == unsharded))
            {
                start = group.last_delivered_id;
            }
        }
        let created: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.redis.input_stream)
            .arg(&self.redis.consumer_group)
            .arg(&start)
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match created {
            Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Loads every window's state as of the last applied batch.
    async fn restore_windows(&mut self, conn: &mut MultiplexedConnection) -> RedisResult<usize> {
        let stored: HashMap<Vec<u8>, Vec<u8>> = redis::cmd("HGETALL")
            .arg(&self.redis.state_key)
            .query_async(conn)
            .await?;
        self.pipeline.clear();
        let mut restored = 0;
        for (field, value) in stored {
            if field.starts_with(b"feed:") {
                // This shard's feed event time; another's is not ours.
                let feed = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|v| v.parse().ok());
                if let (true, Some(feed)) = (field == self.feed_field.as_bytes(), feed) {
                    self.pipeline.restore_feed(feed);
                }
                continue;
            }
            let key = serde_json::from_slice::<(Option<String>, String)>(&field);
            let state = serde_json::from_slice::<KeyState>(&value);
            match (key, state) {
                // Another compute shard's window.
                (Ok((_, symbol)), Ok(_)) if !self.pipeline.owns(&symbol) => {}
                (Ok((client, symbol)), Ok(state)) => {
                    self.pipeline.restore_key(client.as_deref(), &symbol, state);
                    restored += 1;
                }
                _ => tracing::warn!(
                    field = %String::from_utf8_lossy(&field),
                    "unreadable window state ignored"
                ),
            }
        }
        Ok(restored)
    }

    /// Applies the group's pending entries, oldest first: this consumer's
    /// own (read before a crash, never applied), and those another consumer
    /// has held for `claim_idle_ms` (it died with a batch in flight). Stops
    /// at the oldest entry that may not be taken yet, so nothing newer is
    /// applied before it; a batch whose EXEC never ran left no effects, so
    /// applying its entries now on the restored windows is exact.
    async fn drain_pending(
        &mut self,
        conn: &mut MultiplexedConnection,
        shutdown: &CancellationToken,
    ) -> RedisResult<Pending> {
        let claim_idle = self.redis.claim_idle_ms;
        loop {
            if shutdown.is_cancelled() {
                return Ok(Pending::Stopped);
            }
            let reply: StreamPendingCountReply = redis::cmd("XPENDING")
                .arg(&self.redis.input_stream)
                .arg(&self.redis.consumer_group)
                .arg("-")
                .arg("+")
                .arg(self.redis.stream_batch)
                .query_async(conn)
                .await?;
            let Some(oldest) = reply.ids.first() else {
                return Ok(Pending::Drained);
            };
            let me = self.redis.consumer_name.as_str();
            let takeable = reply
                .ids
                .iter()
                .take_while(|p| p.consumer == me || p.last_delivered_ms as u64 >= claim_idle);
            let (own, others): (Vec<&StreamPendingId>, Vec<&StreamPendingId>) =
                takeable.partition(|p| p.consumer == me);
            if own.is_empty() && others.is_empty() {
                let wait = claim_idle.saturating_sub(oldest.last_delivered_ms as u64);
                return Ok(Pending::HeldElsewhere {
                    consumer: oldest.consumer.clone(),
                    wait: Duration::from_millis(wait.max(10)),
                });
            }
            let own_ids: Vec<&str> = own.iter().map(|p| p.id.as_str()).collect();
            let other_ids: Vec<&str> = others.iter().map(|p| p.id.as_str()).collect();
            let mut entries = self.claim(conn, 0, &own_ids).await?;
            let mut vanished = self.vanished(conn, &own_ids, &entries).await?;
            if !other_ids.is_empty() {
                // Atomically only if still idle: a consumer that is alive
                // after all keeps what it re-read (and we look again; it is
                // then not idle, so we wait).
                let claimed = self.claim(conn, claim_idle, &other_ids).await?;
                let gone = self.vanished(conn, &other_ids, &claimed).await?;
                let kept_elsewhere = claimed.len() + gone.len() < other_ids.len();
                vanished.extend(gone);
                if !claimed.is_empty() {
                    tracing::info!(
                        entries = claimed.len(),
                        "claimed entries abandoned by another consumer"
                    );
                }
                entries.extend(claimed);
                if kept_elsewhere {
                    self.acknowledge(conn, &vanished).await?;
                    continue;
                }
            }
            // Trimmed from the stream before anyone applied them: nothing
            // to apply, but they must leave the pending list.
            self.acknowledge(conn, &vanished).await?;
            entries.sort_by_key(|entry| stream_position(&entry.id));
            self.stats
                .stream_replayed
                .fetch_add(entries.len() as u64, Relaxed);
            if !entries.is_empty() {
                self.apply(conn, &entries).await?;
            }
        }
    }

    /// Which of `asked` are not among `got` and no longer in the stream
    /// (trimmed or deleted): Redis before 7.0 leaves those pending.
    async fn vanished(
        &self,
        conn: &mut MultiplexedConnection,
        asked: &[&str],
        got: &[StreamId],
    ) -> RedisResult<Vec<String>> {
        let returned: HashSet<&str> = got.iter().map(|entry| entry.id.as_str()).collect();
        let missing: Vec<&str> = asked
            .iter()
            .copied()
            .filter(|id| !returned.contains(id))
            .collect();
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let mut lookups = redis::pipe();
        for id in &missing {
            lookups
                .cmd("XRANGE")
                .arg(&self.redis.input_stream)
                .arg(*id)
                .arg(*id);
        }
        let found: Vec<StreamRangeReply> = lookups.query_async(conn).await?;
        Ok(missing
            .iter()
            .zip(found)
            .filter(|(_, range)| range.ids.is_empty())
            .map(|(id, _)| (*id).to_owned())
            .collect())
    }

    /// XACK of `ids` in this consumer's group.
    async fn acknowledge(
        &self,
        conn: &mut MultiplexedConnection,
        ids: &[String],
    ) -> RedisResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        redis::cmd("XACK")
            .arg(&self.redis.input_stream)
            .arg(&self.redis.consumer_group)
            .arg(ids)
            .query_async::<()>(conn)
            .await
    }

    /// XCLAIM of `ids` for this consumer if idle at least `min_idle_ms`:
    /// the entries it now owns. (Entries trimmed from the stream meanwhile
    /// leave the pending list without being returned.)
    async fn claim(
        &self,
        conn: &mut MultiplexedConnection,
        min_idle_ms: u64,
        ids: &[&str],
    ) -> RedisResult<Vec<StreamId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let reply: StreamClaimReply = redis::cmd("XCLAIM")
            .arg(&self.redis.input_stream)
            .arg(&self.redis.consumer_group)
            .arg(&self.redis.consumer_name)
            .arg(min_idle_ms)
            .arg(ids)
            .query_async(conn)
            .await?;
        Ok(reply.ids)
    }

    /// One XREADGROUP of up to a batch of new entries (`from` = `">"`),
    /// waiting up to `block`.
    async fn read_group(
        &self,
        conn: &mut MultiplexedConnection,
        from: &str,
        block: Option<Duration>,
    ) -> RedisResult<Vec<StreamId>> {
        let mut options = StreamReadOptions::default()
            .group(&self.redis.consumer_group, &self.redis.consumer_name)
            .count(self.redis.stream_batch);
        if let Some(block) = block {
            options = options.block(block.as_millis() as usize);
        }
        let reply: StreamReadReply = redis::cmd("XREADGROUP")
            .arg(&options)
            .arg("STREAMS")
            .arg(&self.redis.input_stream)
            .arg(from)
            .query_async(conn)
            .await?;
        Ok(reply.keys.into_iter().flat_map(|k| k.ids).collect())
    }

    /// Releases the keys idle for `sma.key_idle_ms`: their windows here, and
    /// their saved state and snapshots in Redis in one MULTI/EXEC. Should
    /// that fail, the caller reconnects and restores every window saved,
    /// the released ones included, to be released at a later sweep.
    async fn release_idle_keys(&mut self, conn: &mut MultiplexedConnection) -> RedisResult<()> {
        let released = self.pipeline.release_idle();
        if released.is_empty() {
            return Ok(());
        }
        tracing::info!(
            keys = released.len(),
            "released keys idle for sma.key_idle_ms"
        );
        let mut transaction = redis::pipe();
        transaction.atomic();
        let fields: Vec<String> = released
            .iter()
            .map(|key| serde_json::to_string(&(&key.client, &key.symbol)).unwrap_or_default())
            .collect();
        transaction.hdel(&self.redis.state_key, &fields).ignore();
        let slots = released
            .iter()
            .flat_map(|key| key.snapshots.iter().map(|slot| &**slot));
        for hdel in snapshot_deletes(slots) {
            transaction.add_command(hdel).ignore();
        }
        transaction.query_async::<()>(conn).await
    }

    /// Runs a batch through the pipeline and applies all its effects in one
    /// MULTI/EXEC; then feeds the sockets.
    async fn apply(
        &mut self,
        conn: &mut MultiplexedConnection,
        entries: &[StreamId],
    ) -> RedisResult<()> {
        let arrived = Instant::now();
        let mut transaction = redis::pipe();
        transaction.atomic();
        // A batch that failed left its keys behind: they are restored, and
        // this batch notes its own.
        self.pipeline.take_touched();
        let mut deliveries: Vec<Emitted> = Vec::new();
        let mut notices = 0u64;
        for entry in entries {
            let payload = match entry.map.get(QUOTE_FIELD) {
                Some(Value::BulkString(bytes)) => bytes.as_slice(),
                // A trimmed or foreign entry: the parser rejects it, visibly.
                _ => b"".as_slice(),
            };
            match self.pipeline.process(payload) {
                Outcome::Accepted { sma } => {
                    if let Some(sma) = sma {
                        self.add_output(&mut transaction, &sma);
                        deliveries.push(sma);
                    }
                    // Published in the same MULTI/EXEC as the key's state,
                    // which holds every series' state too.
                    for result in self.pipeline.take_series() {
                        transaction
                            .publish(&*result.channel, result.frame.as_str().as_bytes())
                            .ignore();
                        deliveries.push(result);
                    }
                }
                Outcome::Rejected {
                    notice: Some(notice),
                } => {
                    transaction
                        .publish(&*notice.channel, notice.payload.as_ref())
                        .ignore();
                    notices += 1;
                }
                Outcome::Rejected { notice: None } | Outcome::OtherShard => {}
            }
        }
        // Inside MULTI/EXEC, so the latest results land with the publishes.
        let snapshots = deliveries
            .iter()
            .filter_map(|sma| Some((sma.snapshot.as_deref()?, sma.frame.as_str().as_bytes())));
        for hset in snapshot_writes(snapshots) {
            transaction.add_command(hset).ignore();
        }
        // With the keys' states: the event time that closes quiet candles.
        if self.pipeline.feed_ms() > 0 {
            transaction
                .hset(
                    &self.redis.state_key,
                    &self.feed_field,
                    self.pipeline.feed_ms(),
                )
                .ignore();
        }
        let quoted_at = unix_ms(SystemTime::now());
        for (client, symbol) in &self.pipeline.take_touched() {
            if let Some(mut state) = self.pipeline.key_state(client.as_deref(), symbol) {
                state.last_quote_ms = Some(quoted_at);
                let field = serde_json::to_string(&(client, symbol)).unwrap_or_default();
                let value = serde_json::to_string(&state).unwrap_or_default();
                transaction
                    .hset(&self.redis.state_key, field, value)
                    .ignore();
            }
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        transaction
            .xack(&self.redis.input_stream, &self.redis.consumer_group, &ids)
            .ignore();
        // If this fails the windows in memory are ahead of Redis; the caller
        // reconnects and restores them from the state EXEC did (or did not) write.
        transaction.query_async::<()>(conn).await?;

        self.stats.stream_batches.fetch_add(1, Relaxed);
        // Every output and rejection notice went out inside the EXEC.
        self.stats
            .published
            .fetch_add(deliveries.len() as u64 + notices, Relaxed);
        let latency = arrived.elapsed();
        let _hold = self.hub.hold_wakes();
        for sma in deliveries {
            self.metrics.record_publish_latency(latency);
            self.hub.deliver_result(sma.frame);
        }
        Ok(())
    }

    fn add_output(&self, transaction: &mut redis::Pipeline, sma: &Emitted) {
        if self.redis.output_stream.is_empty() || self.feeds_gateways {
            transaction
                .publish(&*sma.channel, sma.frame.as_str().as_bytes())
                .ignore();
        }
        if !self.redis.output_stream.is_empty() {
            transaction
                .cmd("XADD")
                .arg(&self.redis.output_stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.redis.output_stream_maxlen)
                .arg("*")
                .arg(SMA_FIELD)
                .arg(sma.frame.as_str().as_bytes())
                .ignore();
        }
    }
}
