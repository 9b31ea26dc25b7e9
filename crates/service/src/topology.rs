//! Where this node sits in a deployment, and what it calls things in Redis.
//!
//! ```text
//!            ┌─ compute 0/2 ─┐                     ┌─ gateway ─▶ sockets
//! quotes ────┤               ├─▶ output channel(s) ┤
//!            └─ compute 1/2 ─┘   + latest hash     └─ gateway ─▶ sockets
//! ```
//!
//! A node's [`Role`] says which half of the bridge it runs; `all` runs both
//! and feeds its sockets in-process. Compute nodes split the symbols with a
//! [`Shard`]: symbol `s` belongs to shard `fnv1a64(s) mod N`. On a Redis
//! Cluster every channel is split into [`Channels::partitions`] sharded
//! channels named `base.{p}` (a hash tag, so one partition's input, output
//! and snapshot hash live in one slot) with `p = fnv1a64(s) mod partitions`.
//! The partition count is a multiple of N, so a compute shard subscribes to
//! its partitions only (`p mod N == I`) and no message crosses to a shard
//! that would drop it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;

use crate::broker::{SnapshotSlot, Topic, is_pattern};

/// Which half of the bridge a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Computes SMAs and serves WebSockets in one process.
    All,
    /// Computes SMAs and publishes them; no WebSocket listener.
    Compute,
    /// Serves WebSockets from the published results; computes nothing.
    Gateway,
}

impl Role {
    /// Whether this node reads quotes and computes SMAs.
    #[must_use]
    pub fn computes(self) -> bool {
        matches!(self, Role::All | Role::Compute)
    }

    /// Whether this node accepts WebSocket clients.
    #[must_use]
    pub fn serves_sockets(self) -> bool {
        matches!(self, Role::All | Role::Gateway)
    }

    /// Whether this node writes the latest public SMA per symbol to Redis
    /// for gateways' snapshots. An `all` node answers its own sockets from memory.
    #[must_use]
    pub fn stores_snapshots(self) -> bool {
        self == Role::Compute
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::All => "all",
            Role::Compute => "compute",
            Role::Gateway => "gateway",
        })
    }
}

/// The stable hash that places a symbol: 64-bit FNV-1a over its UTF-8 bytes.
///
/// Written out rather than taken from a hasher crate so that every version
/// of every node, and any producer in any language, agrees on it forever.
#[must_use]
pub fn symbol_hash(symbol: &str) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    symbol.bytes().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// The share of symbols a compute node handles: shard `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Shard {
    index: u32,
    count: u32,
}

impl Shard {
    /// Every symbol (`0/1`).
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`; `None` unless `index < count`.
    #[must_use]
    pub fn new(index: u32, count: u32) -> Option<Self> {
        (index < count).then_some(Self { index, count })
    }

    /// This shard's number, from 0.
    #[must_use]
    pub fn index(self) -> u32 {
        self.index
    }

    /// How many shards split the symbols.
    #[must_use]
    pub fn count(self) -> u32 {
        self.count
    }

    /// Whether this shard handles `symbol`.
    #[must_use]
    pub fn owns(self, symbol: &str) -> bool {
        self.count == 1 || symbol_hash(symbol) % u64::from(self.count) == u64::from(self.index)
    }

    /// Whether this shard handles the symbols of partition `partition`
    /// (given a partition count that is a multiple of the shard count).
    #[must_use]
    pub fn owns_partition(self, partition: u32) -> bool {
        partition % self.count == self.index
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("{text:?} is not a shard I/N with 0 <= I < N, e.g. 0/2");
        let (index, count) = text.trim().split_once('/').ok_or_else(invalid)?;
        let index = index.trim().parse().map_err(|_| invalid())?;
        let count = count.trim().parse().map_err(|_| invalid())?;
        Shard::new(index, count).ok_or_else(invalid)
    }
}

impl TryFrom<String> for Shard {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

/// The configured names [`Channels`] are built from (`[redis]` keys of
/// the same names).
#[derive(Debug, Clone, Copy)]
pub struct ChannelNames<'a> {
    /// Input channels and patterns.
    pub input: &'a [String],
    /// The output channel, possibly with `{symbol}`.
    pub output: &'a str,
    /// Where rejection notices go (empty: nowhere).
    pub rejected: &'a str,
    /// The prefix of direct channels.
    pub direct_prefix: &'a str,
    /// The hash of latest results.
    pub snapshot_key: &'a str,
    /// On a Redis Cluster: how many partitions the channels are split into.
    pub partitions: Option<u32>,
}

/// The names of every channel and key the bridge uses, for a single Redis
/// server or, partitioned, for a Redis Cluster.
#[derive(Debug, Clone)]
pub struct Channels {
    input: Vec<String>,
    output: Output,
    rejected: String,
    direct_prefix: String,
    snapshot_key: String,
    /// Partitions per channel on a cluster; `None` on a single server.
    partitions: Option<u32>,
}

#[derive(Debug, Clone)]
enum Output {
    Fixed(String),
    PerSymbol { before: String, after: String },
}

impl Channels {
    /// The channels and keys built from `names`.
    #[must_use]
    pub fn new(names: ChannelNames<'_>) -> Self {
        let output = match names.output.split_once("{symbol}") {
            Some((before, after)) => Output::PerSymbol {
                before: before.to_owned(),
                after: after.to_owned(),
            },
            None => Output::Fixed(names.output.to_owned()),
        };
        Self {
            input: names.input.to_vec(),
            output,
            rejected: names.rejected.to_owned(),
            direct_prefix: names.direct_prefix.to_owned(),
            snapshot_key: names.snapshot_key.to_owned(),
            partitions: names.partitions,
        }
    }

    /// Whether channels are partitioned for a Redis Cluster.
    #[must_use]
    pub fn is_partitioned(&self) -> bool {
        self.partitions.is_some()
    }

    /// How many partitions each channel has on a cluster (1 on a single server).
    #[must_use]
    pub fn partitions(&self) -> u32 {
        self.partitions.unwrap_or(1)
    }

    /// The partition `symbol` belongs to on a cluster.
    #[must_use]
    pub fn partition(&self, symbol: &str) -> u32 {
        let partitions = u64::from(self.partitions());
        // The remainder is below `partitions`, itself a u32.
        u32::try_from(symbol_hash(symbol) % partitions).unwrap_or_default()
    }

    /// `base` split for partition `p`: `base.{p}`. The braces are a Redis
    /// Cluster hash tag, so the slot is that of `p` alone and one partition's
    /// channels and snapshot hash share a slot (and a master).
    fn partitioned(base: &str, partition: u32) -> String {
        format!("{base}.{{{partition}}}")
    }

    /// What a compute node of `shard` subscribes to for quotes.
    #[must_use]
    pub fn input_topics(&self, shard: Shard) -> Vec<Topic> {
        match self.partitions {
            None => self.input.iter().map(|n| Topic::from_name(n)).collect(),
            Some(partitions) => (0..partitions)
                .filter(|&p| shard.owns_partition(p))
                .flat_map(|p| {
                    self.input
                        .iter()
                        .map(move |base| Topic::Sharded(Self::partitioned(base, p)))
                })
                .collect(),
        }
    }

    /// The channel a producer publishes `symbol`'s quotes on: the first
    /// input channel, partitioned on a cluster. `None` when that is a pattern.
    #[must_use]
    pub fn input_channel(&self, symbol: &str) -> Option<String> {
        let base = self.input.first().filter(|name| !is_pattern(name))?;
        Some(match self.partitions {
            None => base.clone(),
            Some(_) => Self::partitioned(base, self.partition(symbol)),
        })
    }

    /// The channel `symbol`'s results are published on.
    #[must_use]
    pub fn output_channel(&self, symbol: &str) -> Arc<str> {
        match (&self.output, self.partitions) {
            (Output::Fixed(name), None) => name.as_str().into(),
            (Output::Fixed(name), Some(_)) => {
                Self::partitioned(name, self.partition(symbol)).into()
            }
            // Validation refuses {symbol} on a cluster: a gateway could not
            // subscribe to every symbol's channel without patterns.
            (Output::PerSymbol { before, after }, _) => format!("{before}{symbol}{after}").into(),
        }
    }

    /// The channel a `[[series]]` whose channel is `template` publishes
    /// `symbol`'s results on: `{symbol}` filled in; on a cluster, the
    /// template's partition of the symbol (`template.{p}`, as the output's).
    #[must_use]
    pub fn series_channel(&self, template: &str, symbol: &str) -> Arc<str> {
        match self.partitions {
            None => template.replace("{symbol}", symbol).into(),
            Some(_) => Self::partitioned(template, self.partition(symbol)).into(),
        }
    }

    /// What a gateway subscribes to for the results of a series whose
    /// channel is `template`: the channel, a pattern for `{symbol}`, or on a
    /// cluster every partition of it.
    #[must_use]
    pub fn series_topics(&self, template: &str) -> Vec<Topic> {
        match (self.partitions, template.split_once("{symbol}")) {
            (Some(partitions), _) => (0..partitions)
                .map(|p| Topic::Sharded(Self::partitioned(template, p)))
                .collect(),
            (None, Some((before, after))) => vec![Topic::Pattern(format!("{before}*{after}"))],
            (None, None) => vec![Topic::Channel(template.to_owned())],
        }
    }

    /// What a gateway subscribes to for results: every output channel.
    #[must_use]
    pub fn output_topics(&self) -> Vec<Topic> {
        match (&self.output, self.partitions) {
            (Output::Fixed(name), None) => vec![Topic::Channel(name.clone())],
            (Output::PerSymbol { before, after }, None) => {
                vec![Topic::Pattern(format!("{before}*{after}"))]
            }
            (Output::Fixed(name), Some(partitions)) => (0..partitions)
                .map(|p| Topic::Sharded(Self::partitioned(name, p)))
                .collect(),
            (Output::PerSymbol { .. }, Some(_)) => Vec::new(),
        }
    }

    /// The channel rejected input is reported on, if enabled.
    #[must_use]
    pub fn rejected_channel(&self) -> Option<Arc<str>> {
        (!self.rejected.is_empty()).then(|| self.rejected.as_str().into())
    }

    /// The pattern of every client's direct channel. Classic pub/sub even on
    /// a cluster: sharded pub/sub has no patterns, and direct messages are few.
    #[must_use]
    pub fn direct_topic(&self) -> Topic {
        Topic::Pattern(format!("{}*", self.direct_prefix))
    }

    /// The client code a direct channel addresses.
    #[must_use]
    pub fn direct_client<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(&self.direct_prefix)
    }

    /// Where `symbol`'s latest public result is kept.
    #[must_use]
    pub fn snapshot_slot(&self, symbol: &str) -> SnapshotSlot {
        let key = match self.partitions {
            None => self.snapshot_key.clone(),
            Some(_) => Self::partitioned(&self.snapshot_key, self.partition(symbol)),
        };
        SnapshotSlot {
            key: key.into(),
            field: symbol.into(),
        }
    }

    /// Where the latest public result of `symbol` in `series` is kept: the
    /// symbol's hash, under the key's name `symbol@series`.
    #[must_use]
    pub fn series_snapshot_slot(&self, symbol: &str, series: &str) -> SnapshotSlot {
        let slot = self.snapshot_slot(symbol);
        SnapshotSlot {
            field: format!("{symbol}{}{series}", crate::names::SERIES_SEPARATOR).into(),
            ..slot
        }
    }

    /// Every hash holding latest results, for a gateway to load.
    #[must_use]
    pub fn snapshot_keys(&self) -> Vec<String> {
        match self.partitions {
            None => vec![self.snapshot_key.clone()],
            Some(partitions) => (0..partitions)
                .map(|p| Self::partitioned(&self.snapshot_key, p))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn channels(cluster: bool) -> Channels {
        let mut settings = Settings::defaults().expect("defaults");
        if cluster {
            settings.redis.cluster_nodes = vec!["redis://127.0.0.1:7000".into()];
            settings.redis.partitions = 4;
        }
        settings.redis.channels()
    }

    #[test]
    fn symbol_hash_is_fnv1a_64() {
        // Published FNV-1a 64 test vectors: the hash must never change.
        assert_eq!(symbol_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(symbol_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(symbol_hash("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn shards_split_symbols_without_overlap() {
        let shards: Vec<Shard> = (0..3).map(|i| Shard::new(i, 3).expect("shard")).collect();
        let mut per_shard = [0; 3];
        for n in 0..3000 {
            let symbol = format!("SYM{n}");
            let owners: Vec<_> = shards.iter().filter(|s| s.owns(&symbol)).collect();
            assert_eq!(owners.len(), 1, "{symbol} has exactly one owner");
            per_shard[owners[0].index() as usize] += 1;
        }
        assert!(
            per_shard.iter().all(|&n| n > 800),
            "roughly even: {per_shard:?}"
        );
        assert!(Shard::WHOLE.owns("ANY"));
    }

    #[test]
    fn shard_parses_i_of_n() {
        assert_eq!("1/4".parse(), Ok(Shard::new(1, 4).expect("shard")));
        assert_eq!(
            " 0 / 1 ".parse::<Shard>().map(|s| s.to_string()),
            Ok("0/1".into())
        );
        for bad in ["", "1", "2/2", "-1/2", "a/b", "0/0", "1/2/3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad:?} refused");
        }
    }

    #[test]
    fn single_server_names_are_the_configured_ones() {
        let names = channels(false);
        assert_eq!(
            names.input_topics(Shard::WHOLE),
            vec![Topic::Channel("quotes".into())]
        );
        assert_eq!(names.input_channel("AAPL").as_deref(), Some("quotes"));
        assert_eq!(&*names.output_channel("AAPL"), "sma");
        assert_eq!(names.output_topics(), vec![Topic::Channel("sma".into())]);
        assert_eq!(names.snapshot_keys(), vec!["quotebridge:latest".to_owned()]);
        assert_eq!(&*names.snapshot_slot("AAPL").field, "AAPL");
        assert_eq!(names.direct_client("client.acme"), Some("acme"));
    }

    #[test]
    fn per_symbol_output_is_followed_with_a_pattern() {
        let mut settings = Settings::defaults().expect("defaults");
        settings.redis.output = "sma.{symbol}.v1".into();
        let names = settings.redis.channels();
        assert_eq!(&*names.output_channel("AAPL"), "sma.AAPL.v1");
        assert_eq!(
            names.output_topics(),
            vec![Topic::Pattern("sma.*.v1".into())]
        );
    }

    #[test]
    fn cluster_names_are_partitioned_with_hash_tags() {
        let names = channels(true);
        let p = names.partition("AAPL");
        assert!(p < 4);
        assert_eq!(names.input_channel("AAPL"), Some(format!("quotes.{{{p}}}")));
        assert_eq!(&*names.output_channel("AAPL"), format!("sma.{{{p}}}"));
        assert_eq!(
            &*names.snapshot_slot("AAPL").key,
            format!("quotebridge:latest.{{{p}}}")
        );
        assert_eq!(names.output_topics().len(), 4);
        assert_eq!(names.snapshot_keys().len(), 4);
        // Shard 1 of 2 takes partitions 1 and 3, and the symbols in them.
        let shard = Shard::new(1, 2).expect("shard");
        assert_eq!(
            names.input_topics(shard),
            vec![
                Topic::Sharded("quotes.{1}".into()),
                Topic::Sharded("quotes.{3}".into())
            ]
        );
        for n in 0..200 {
            let symbol = format!("S{n}");
            assert_eq!(
                shard.owns(&symbol),
                shard.owns_partition(names.partition(&symbol)),
                "{symbol}: shard and partition agree"
            );
        }
    }
}
