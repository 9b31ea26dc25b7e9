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
//! start the consumer restores the windows, replays its pending entries
//! (then claims other consumers' stale ones), and computes exactly what the
//! lost run would have. A crash after EXEC replays nothing. Sockets are fed
//! only after EXEC succeeds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamInfoGroupsReply,
    StreamReadOptions, StreamReadReply,
};
use redis::{AsyncConnectionConfig, RedisResult, Value};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::broker::snapshot_writes;
use crate::config::{RedisSettings, Settings};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::pipeline::{Outcome, Pipeline, Sma};
use crate::quote::Quote;
use crate::sma::WindowState;
use crate::stats::Stats;
use crate::topology::Role;

/// The field of an input entry that holds the quote JSON.
pub const QUOTE_FIELD: &str = "quote";

/// The field of an output entry that holds the SMA JSON.
pub const SMA_FIELD: &str = "sma";

/// How long one XREADGROUP waits for new entries; also how often shutdown is noticed.
const BLOCK: Duration = Duration::from_millis(1000);

/// The durable consumer.
pub struct StreamConsumer {
    client: redis::Client,
    redis: RedisSettings,
    pipeline: Pipeline,
    hub: Hub,
    stats: Arc<Stats>,
    consuming: Arc<AtomicBool>,
    backoff: Backoff,
    metrics: Arc<Metrics>,
    /// For a compute shard: the unsharded group its own group takes over from.
    unsharded_group: Option<String>,
    /// Whether results are also published on the output channel although
    /// they go to `output_stream`: a compute node's gateways follow the channel.
    feeds_gateways: bool,
}

impl StreamConsumer {
    /// A consumer for `settings`' stream, feeding `hub`.
    pub fn new(
        metrics: Arc<Metrics>,
        settings: &Settings,
        hub: Hub,
        stats: Arc<Stats>,
        consuming: Arc<AtomicBool>,
    ) -> RedisResult<Self> {
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
        Ok(Self {
            client: crate::broker::redis_client(&settings.redis.url)?,
            redis,
            pipeline: Pipeline::new(settings, stats.clone()),
            hub,
            stats,
            consuming,
            backoff: settings.reconnect_backoff(),
            metrics,
            unsharded_group,
            feeds_gateways: settings.node.role == Role::Compute,
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
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        self.create_group(&mut conn).await?;
        let restored = self.restore_windows(&mut conn).await?;
        self.consuming.store(true, Relaxed);
        self.backoff.reset();
        tracing::info!(windows = restored, "stream consumer ready");

        // First what this consumer read but never applied, then what others
        // abandoned, then new entries.
        let replayed = self.replay_pending(&mut conn).await?;
        if replayed > 0 {
            tracing::info!(entries = replayed, "replayed unacknowledged entries");
        }
        self.claim_stale(&mut conn).await?;
        let mut last_claim = Instant::now();
        let claim_every = Duration::from_millis(self.redis.claim_idle_ms.max(1000));
        while !shutdown.is_cancelled() {
            let entries = self.read_group(&mut conn, ">", Some(BLOCK)).await?;
            if !entries.is_empty() {
                self.apply(&mut conn, &entries).await?;
            }
            if last_claim.elapsed() >= claim_every {
                self.claim_stale(&mut conn).await?;
                last_claim = Instant::now();
            }
        }
        Ok(())
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
            let key = serde_json::from_slice::<(Option<String>, String)>(&field);
            let state = serde_json::from_slice::<WindowState>(&value);
            match (key, state) {
                // Another compute shard's window.
                (Ok((_, symbol)), Ok(_)) if !self.pipeline.owns(&symbol) => {}
                (Ok((client, symbol)), Ok(state)) => {
                    self.pipeline
                        .restore_window(client.as_deref(), &symbol, state);
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

    /// Re-reads and applies this consumer's own pending entries.
    async fn replay_pending(&mut self, conn: &mut MultiplexedConnection) -> RedisResult<usize> {
        let mut replayed = 0;
        loop {
            let entries = self.read_group(conn, "0", None).await?;
            if entries.is_empty() {
                return Ok(replayed);
            }
            replayed += entries.len();
            self.stats
                .stream_replayed
                .fetch_add(entries.len() as u64, Relaxed);
            self.apply(conn, &entries).await?;
        }
    }

    /// One XREADGROUP of up to a batch: `">"` for new entries (waiting up to
    /// `block`), `"0"` for this consumer's own pending ones.
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

    /// Claims and applies entries other consumers left pending too long.
    async fn claim_stale(&mut self, conn: &mut MultiplexedConnection) -> RedisResult<()> {
        let mut cursor = "0-0".to_owned();
        loop {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&self.redis.input_stream)
                .arg(&self.redis.consumer_group)
                .arg(&self.redis.consumer_name)
                .arg(self.redis.claim_idle_ms)
                .arg(&cursor)
                .arg(StreamAutoClaimOptions::default().count(self.redis.stream_batch))
                .query_async(conn)
                .await?;
            if !reply.claimed.is_empty() {
                tracing::info!(
                    entries = reply.claimed.len(),
                    "claimed entries abandoned by another consumer"
                );
                self.stats
                    .stream_replayed
                    .fetch_add(reply.claimed.len() as u64, Relaxed);
                self.apply(conn, &reply.claimed).await?;
            }
            if reply.next_stream_id == "0-0" {
                return Ok(());
            }
            cursor = reply.next_stream_id;
        }
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
        let mut touched: HashSet<(Option<String>, String)> = HashSet::new();
        let mut deliveries: Vec<(Quote<'_>, Sma)> = Vec::new();
        let mut notices = 0u64;
        for entry in entries {
            let payload = match entry.map.get(QUOTE_FIELD) {
                Some(Value::BulkString(bytes)) => bytes.as_slice(),
                // A trimmed or foreign entry: the parser rejects it, visibly.
                _ => b"".as_slice(),
            };
            match self.pipeline.process(payload) {
                Outcome::Accepted { quote, sma } => {
                    touched.insert((
                        quote.client.as_deref().map(str::to_owned),
                        quote.symbol.to_string(),
                    ));
                    if let Some(sma) = sma {
                        self.add_output(&mut transaction, &sma);
                        deliveries.push((quote, sma));
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
            .filter_map(|(_, sma)| Some((sma.snapshot.as_deref()?, sma.frame.as_bytes())));
        for hset in snapshot_writes(snapshots) {
            transaction.add_command(hset).ignore();
        }
        for (client, symbol) in &touched {
            if let Some(state) = self.pipeline.window_state(client.as_deref(), symbol) {
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
        for (quote, sma) in &deliveries {
            self.metrics.record_publish_latency(latency);
            sma.deliver(&self.hub, quote);
        }
        Ok(())
    }

    fn add_output(&self, transaction: &mut redis::Pipeline, sma: &Sma) {
        if self.redis.output_stream.is_empty() || self.feeds_gateways {
            transaction
                .publish(&*sma.channel, sma.frame.as_bytes())
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
                .arg(sma.frame.as_bytes())
                .ignore();
        }
    }
}
