//! The bridge on a 3-master Redis Cluster of the test's own, end to end with
//! sharded pub/sub, including a slot moving to another master under load.

use std::process::{Child, Command};

use quotebridge::broker::{Broker, ClusterBroker, Outbound};
use quotebridge::config::Settings;
use quotebridge::series::ema::Ema;
use quotebridge::topology::Channels;
use redis::Value as RedisValue;
use serde_json::json;

use crate::binary::BIN;
use crate::scale_out::{Round, connect, start_node};
use crate::support::*;

/// Three masters, no replicas, on free loopback ports; killed on drop.
struct RedisCluster {
    /// Each master's process, port and cluster bus port.
    nodes: Vec<(Child, u16, u16)>,
    dir: std::path::PathBuf,
}

/// A cluster-enabled redis-server in `dir`; its node table persists there,
/// so a restart on the same ports rejoins the cluster as the same node.
fn spawn_node(dir: &std::path::Path, port: u16, bus: u16) -> Child {
    let (bus, table) = (bus.to_string(), format!("nodes-{port}.conf"));
    let cluster = [
        "--cluster-enabled",
        "yes",
        "--cluster-port",
        &bus,
        "--cluster-config-file",
        &table,
    ];
    spawn_redis_server(port, &cluster, Some(dir))
}

/// A new cluster node on free ports, answering; other ports are tried when
/// it exits instead (something else took one of them first).
async fn start_cluster_node(dir: &std::path::Path) -> (Child, u16, u16) {
    for _ in 0..5 {
        let (port, bus) = (free_port(), free_port());
        let mut child = spawn_node(dir, port, bus);
        if wait_until_ready(&mut child, port).await {
            return (child, port, bus);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("no cluster node came up on any of five pairs of free ports");
}

/// Waits until the cluster node on `port` answers PING.
async fn answering(child: &mut Child, port: u16) {
    assert!(
        wait_until_ready(child, port).await,
        "the cluster node on port {port} exited instead of answering"
    );
}

impl RedisCluster {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "quotebridge-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("cluster directory");
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(start_cluster_node(&dir).await);
        }
        let cluster = RedisCluster { nodes, dir };
        let addresses: Vec<String> = cluster.ports().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|err| {
                panic!("cannot run redis-cli ({err}); install it with `sudo apt-get install -y redis-tools`")
            });
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        cluster.wait_until_healthy().await;
        cluster
    }

    /// Waits until every node reports `cluster_state:ok`.
    async fn wait_until_healthy(&self) {
        for port in self.ports() {
            eventually("the cluster to agree", async || {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut node(port).await)
                    .await
                    .expect("CLUSTER INFO");
                info.contains("cluster_state:ok").then_some(())
            })
            .await;
        }
    }

    /// Kills the master on `port` and starts it again as the same node.
    async fn restart(&mut self, port: u16) {
        let dir = self.dir.clone();
        let (child, _, bus) = self
            .nodes
            .iter_mut()
            .find(|(_, p, _)| *p == port)
            .expect("a node on that port");
        let _ = child.kill();
        let _ = child.wait();
        *child = spawn_node(&dir, port, *bus);
        answering(child, port).await;
        self.wait_until_healthy().await;
    }

    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes.iter().map(|(_, port, _)| *port)
    }

    /// `redis://127.0.0.1:P1,redis://127.0.0.1:P2,...`
    fn urls(&self) -> String {
        self.ports()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of the master serving `slot`.
    async fn owner(&self, slot: u16) -> u16 {
        for port in self.ports() {
            let slots: RedisValue = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut node(port).await)
                .await
                .expect("CLUSTER SLOTS");
            if let Some(owner) = slot_owner(&slots, slot) {
                return owner;
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// Moves `slot`, with its keys, from the master on `from` to the one on
    /// `to`, as `redis-cli --cluster reshard` would.
    async fn move_slot(&self, slot: u16, from: u16, to: u16) {
        let id = |port| async move {
            redis::cmd("CLUSTER")
                .arg("MYID")
                .query_async::<String>(&mut node(port).await)
                .await
                .expect("MYID")
        };
        let (from_id, to_id) = (id(from).await, id(to).await);
        let mut source = node(from).await;
        let mut target = node(to).await;
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&from_id)
            .query_async::<()>(&mut target)
            .await
            .expect("IMPORTING");
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&to_id)
            .query_async::<()>(&mut source)
            .await
            .expect("MIGRATING");
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(1000)
            .query_async(&mut source)
            .await
            .expect("GETKEYSINSLOT");
        if !keys.is_empty() {
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async::<()>(&mut source)
                .await
                .expect("MIGRATE");
        }
        for port in [to, from]
            .into_iter()
            .chain(self.ports().filter(|p| *p != to && *p != from))
        {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&to_id)
                .query_async::<()>(&mut node(port).await)
                .await
                .expect("SETSLOT NODE");
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (child, _, _) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn node(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to a cluster node")
}

/// The port of the master for `slot` in a CLUSTER SLOTS reply.
fn slot_owner(reply: &RedisValue, slot: u16) -> Option<u16> {
    let RedisValue::Array(ranges) = reply else {
        return None;
    };
    ranges.iter().find_map(|range| {
        let RedisValue::Array(fields) = range else {
            return None;
        };
        let int = |v: &RedisValue| match v {
            RedisValue::Int(n) => Some(*n),
            _ => None,
        };
        let (start, end) = (int(fields.first()?)?, int(fields.get(1)?)?);
        if !(start..=end).contains(&i64::from(slot)) {
            return None;
        }
        let RedisValue::Array(master) = fields.get(2)? else {
            return None;
        };
        u16::try_from(int(master.get(1)?)?).ok()
    })
}

/// Publishes a round: quotes with SPUBLISH through the bridge's own cluster
/// broker, direct messages with classic PUBLISH on one node.
async fn publish_round(broker: &ClusterBroker, any_node: u16, round: &Round) {
    let mut direct = node(any_node).await;
    for (channel, payload) in &round.messages {
        if channel.starts_with("client.") {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload)
                .query_async::<()>(&mut direct)
                .await
                .expect("PUBLISH");
        } else {
            let message = Outbound::new(channel.as_str().into(), payload.clone().into());
            broker.publish(&[message]).await.expect("SPUBLISH");
        }
    }
}

/// Round `number`'s sentinels: one symbol per partition, since results of
/// different partitions travel through different masters, in no common order.
fn sentinels(number: u64, channels: &Channels) -> Vec<String> {
    (0..channels.partitions())
        .map(|p| {
            (0..)
                .map(|n| format!("END{number}x{n}"))
                .find(|symbol| channels.partition(symbol) == p)
                .expect("a symbol in every partition")
        })
        .collect()
}

/// Rounds of input published on the cluster and checked on two sockets.
struct Rounds {
    broker: ClusterBroker,
    any_node: u16,
    channels: Channels,
    reference: ReferenceSma,
}

impl Rounds {
    /// Publishes round `number` and checks what `acme` and `beta` receive.
    async fn check(&mut self, number: u64, acme: &mut Socket, beta: &mut Socket) {
        let symbols: Vec<String> = (0..12).map(|n| format!("S{n}")).collect();
        let channels = &self.channels;
        let to_input = |symbol: &str| channels.input_channel(symbol).expect("a channel");
        let to_direct = |code: &str| format!("client.{code}");
        let round = Round::new(
            number,
            &symbols,
            sentinels(number, channels),
            &mut self.reference,
            &to_input,
            &to_direct,
        );
        publish_round(&self.broker, self.any_node, &round).await;
        round.check_socket(acme, "acme").await;
        round.check_socket(beta, "beta").await;
    }
}

/// Waits until one compute shard and the gateway are subscribed to the
/// `moved` input and output channels at the master on `port`, and every
/// node of the bridge has subscribed again to everything else: a slot move
/// or a restart makes each node start its subscription over, and a round
/// published before one has would be lost (pub/sub is at most once).
async fn resubscribed(
    what: &str,
    cluster: &RedisCluster,
    port: u16,
    moved: &[String],
    all: &[String],
) {
    eventually(what, async || {
        if shard_subscribers(port, moved).await != [1, 1] {
            return None;
        }
        // Each partition channel has exactly one subscriber, at its master.
        let mut counts = vec![0; all.len()];
        let mut patterns = 0;
        for node_port in cluster.ports() {
            for (count, here) in counts
                .iter_mut()
                .zip(shard_subscribers(node_port, all).await)
            {
                *count += here;
            }
            let numpat: i64 = redis::cmd("PUBSUB")
                .arg("NUMPAT")
                .query_async(&mut node(node_port).await)
                .await
                .expect("NUMPAT");
            patterns += numpat;
        }
        // And the gateway's direct-channel pattern is back.
        (counts.iter().all(|&n| n == 1) && patterns >= 1).then_some(())
    })
    .await;
}

/// How many subscribers each of `channels` has on the master on `port`.
async fn shard_subscribers(port: u16, channels: &[String]) -> Vec<i64> {
    let reply: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("SHARDNUMSUB")
        .arg(channels)
        .query_async(&mut node(port).await)
        .await
        .expect("SHARDNUMSUB");
    reply.into_iter().map(|(_, n)| n).collect()
}

#[tokio::test]
async fn sharded_pub_sub_on_a_three_master_cluster_survives_a_slot_move_and_a_restart() {
    let mut cluster = RedisCluster::start().await;
    let urls = cluster.urls();
    let env = [("QUOTEBRIDGE__REDIS__CLUSTER_NODES", urls.as_str())];
    let _compute = [
        start_node("compute", Some("0/2"), &env).await,
        start_node("compute", Some("1/2"), &env).await,
    ];
    let gateway = start_node("gateway", None, &env).await;
    let mut acme = connect(&gateway, "acme").await;
    let mut beta = connect(&gateway, "beta").await;

    let mut settings = Settings::defaults().expect("defaults");
    settings.redis.cluster_nodes = urls.split(',').map(str::to_owned).collect();
    let channels = settings.redis.channels();
    let broker = ClusterBroker::new(&settings.redis.cluster_nodes).expect("cluster broker");
    let any_node = cluster.ports().next().expect("a node");

    let mut rounds = Rounds {
        broker,
        any_node,
        channels: channels.clone(),
        reference: ReferenceSma::default(),
    };
    rounds.check(1, &mut acme, &mut beta).await;

    // The partitions spread over every master: each one carries part of the
    // input and output subscriptions, none carries all of them.
    let partitions: Vec<String> = (0..channels.partitions())
        .flat_map(|p| [format!("quotes.{{{p}}}"), format!("sma.{{{p}}}")])
        .collect();
    let mut per_master = Vec::new();
    for port in cluster.ports() {
        let here: Vec<String> = redis::cmd("PUBSUB")
            .arg("SHARDCHANNELS")
            .query_async(&mut node(port).await)
            .await
            .expect("SHARDCHANNELS");
        assert!(here.iter().all(|c| partitions.contains(c)), "{here:?}");
        per_master.push(here.len());
    }
    assert!(
        per_master.iter().all(|&n| n > 0 && n < partitions.len()),
        "subscriptions per master: {per_master:?}"
    );

    // Move the slot of S0's partition to another master. The old master
    // ends its subscriptions with a sunsubscribe push; the bridge must
    // subscribe again at the new one.
    let partition = channels.partition("S0");
    let moved = [
        format!("quotes.{{{partition}}}"),
        format!("sma.{{{partition}}}"),
    ];
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&moved[0])
        .query_async(&mut node(any_node).await)
        .await
        .expect("KEYSLOT");
    let from = cluster.owner(slot).await;
    let to = cluster
        .ports()
        .find(|p| *p != from)
        .expect("another master");
    cluster.move_slot(slot, from, to).await;
    resubscribed(
        "the bridge to resubscribe at the slot's new master",
        &cluster,
        to,
        &moved,
        &partitions,
    )
    .await;
    rounds.check(2, &mut acme, &mut beta).await;

    // Restart that master: its connections drop, and the bridge
    // (redis-rs, per node) reconnects and subscribes again.
    cluster.restart(to).await;
    resubscribed(
        "the bridge to resubscribe at the restarted master",
        &cluster,
        to,
        &moved,
        &partitions,
    )
    .await;
    rounds.check(3, &mut acme, &mut beta).await;

    // Both the slot move and the restart made the gateway start over
    // (and reload its snapshots), as a lost single-server subscription does.
    let resubscribes = gateway.stats().await["redis_resubscribes"].as_u64();
    assert!(
        resubscribes >= Some(2),
        "gateway resubscribed {resubscribes:?} times"
    );

    // `quotebridge publish` addresses each quote to its partition too.
    let csv = std::env::temp_dir().join(format!("quotebridge-cluster-{}.csv", std::process::id()));
    std::fs::write(&csv, "symbol,price,ts\nS0,100,1\nS1,200,2\n").expect("write csv");
    let published = Command::new(BIN)
        .args(["publish", csv.to_str().expect("utf-8 path")])
        .env("QUOTEBRIDGE__REDIS__CLUSTER_NODES", &urls)
        .output()
        .expect("run quotebridge publish");
    std::fs::remove_file(&csv).ok();
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(next_json(&mut acme).await);
    }
    got.sort_by_key(|frame| frame["symbol"].as_str().map(str::to_owned));
    assert_eq!(
        (got[0]["symbol"].clone(), got[0]["price"].clone()),
        (json!("S0"), json!(100.0))
    );
    assert_eq!(
        (got[1]["symbol"].clone(), got[1]["price"].clone()),
        (json!("S1"), json!(200.0))
    );
}

/// `[[series]]` on a cluster: each series' channel is split into partitions
/// as the output is (`NAME.{p}`), compute nodes SPUBLISH each result to its
/// symbol's partition, and a gateway relays them to the sockets that
/// subscribe to the series.
#[tokio::test]
async fn series_on_a_cluster_go_to_their_partitions_and_a_gateway_relays_them() {
    let cluster = RedisCluster::start().await;
    let urls = cluster.urls();
    let path = std::env::temp_dir().join(format!(
        "quotebridge-cluster-series-{}.toml",
        std::process::id()
    ));
    std::fs::write(
        &path,
        "[[series]]\nname = \"ema.2\"\nkind = \"ema\"\nspan = 2\n",
    )
    .expect("config file written");
    let config = path.to_str().expect("a UTF-8 path");
    let env = [("QUOTEBRIDGE__REDIS__CLUSTER_NODES", urls.as_str())];
    let node_of = |role: &'static str| {
        let args = ["--config", config, "serve", "--role", role];
        async move { crate::binary::Serve::launch(&args, &env, std::process::Stdio::null()).await }
    };
    let _compute = node_of("compute").await;
    let gateway = node_of("gateway").await;
    let _ = std::fs::remove_file(&path);

    let mut socket = connect(&gateway, "acme").await;
    send_json(
        &mut socket,
        json!({"op": "subscribe", "symbols": ["*"], "series": ["ema.2"]}),
    )
    .await;
    send_json(
        &mut socket,
        json!({"op": "unsubscribe", "symbols": ["*"], "series": ["sma"]}),
    )
    .await;
    next_json(&mut socket).await;
    next_json(&mut socket).await;

    let mut settings = Settings::defaults().expect("defaults");
    settings.redis.cluster_nodes = urls.split(',').map(str::to_owned).collect();
    let channels = settings.redis.channels();
    let broker = ClusterBroker::new(&settings.redis.cluster_nodes).expect("cluster broker");
    // Symbols in different partitions, two quotes each.
    let symbols: Vec<String> = (0..12).map(|n| format!("S{n}")).collect();
    for price in [10, 20] {
        for symbol in &symbols {
            let quote = json!({"symbol": symbol, "price": price}).to_string();
            let channel = channels.input_channel(symbol).expect("a channel");
            let message = Outbound::new(channel.as_str().into(), quote.into_bytes().into());
            broker.publish(&[message]).await.expect("SPUBLISH");
        }
    }
    let mut emas: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for _ in 0..2 * symbols.len() {
        let frame = next_json(&mut socket).await;
        assert_eq!(frame["series"], "ema.2", "{frame}");
        let symbol = frame["symbol"].as_str().expect("a symbol").to_owned();
        emas.entry(symbol)
            .or_default()
            .push(frame["ema"].as_f64().expect("an ema"));
    }
    // Bit for bit what the EMA (pandas' order of operations) gives.
    let mut ema = Ema::new(std::num::NonZeroU32::new(2).expect("non-zero"));
    let want = vec![ema.push(10.0), ema.push(20.0)];
    for symbol in &symbols {
        assert_eq!(emas[symbol], want, "{symbol}");
    }
    // Each result went to its symbol's partition of the series' channel.
    let mut partitions = std::collections::BTreeSet::new();
    for port in cluster.ports() {
        let here: Vec<String> = redis::cmd("PUBSUB")
            .arg("SHARDCHANNELS")
            .arg("ema.2.*")
            .query_async(&mut node(port).await)
            .await
            .expect("SHARDCHANNELS");
        partitions.extend(here);
    }
    let expected: std::collections::BTreeSet<String> = (0..channels.partitions())
        .map(|p| format!("ema.2.{{{p}}}"))
        .collect();
    assert_eq!(partitions, expected, "the gateway follows every partition");
}
