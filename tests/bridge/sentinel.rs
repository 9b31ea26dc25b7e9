//! Redis Sentinel: a real primary, a replica and three sentinels on free
//! ports. The primary is killed (`kill -9`) while a socket is open; the
//! bridge reports not-ready while it has no primary, follows the promoted
//! replica, and the same socket receives results again.

use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde_json::json;

use crate::support::*;

const MASTER: &str = "quotes-primary";

/// A redis-server in sentinel mode with a config file of its own; killed
/// on drop.
struct SentinelProcess {
    child: Child,
    port: u16,
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sentinel(dir: &std::path::Path, primary: u16) -> SentinelProcess {
    start_sentinel_of(dir, MASTER, primary)
}

fn start_sentinel_of(dir: &std::path::Path, name: &str, primary: u16) -> SentinelProcess {
    let port = free_port();
    let file = dir.join(format!("sentinel-{port}.conf"));
    let config = format!(
        "port {port}\nbind 127.0.0.1\nprotected-mode no\n\
         sentinel monitor {name} 127.0.0.1 {primary} 2\n\
         sentinel down-after-milliseconds {name} 1000\n\
         sentinel failover-timeout {name} 5000\n\
         sentinel parallel-syncs {name} 1\n"
    );
    std::fs::write(&file, config).expect("sentinel config");
    let child = Command::new("redis-server")
        .arg(&file)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server --sentinel (the redis-server package has it)");
    SentinelProcess { child, port }
}

async fn ask(port: u16, command: &mut redis::Cmd) -> Option<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    command.query_async(&mut conn).await.ok()
}

/// The port the sentinel on `port` names as the primary's.
async fn primary_port(port: u16) -> Option<u16> {
    let mut command = redis::cmd("SENTINEL");
    command.arg("GET-MASTER-ADDR-BY-NAME").arg(MASTER);
    let value = ask(port, &mut command).await?;
    let (_, port): (String, u16) = redis::from_redis_value(value).ok()?;
    Some(port)
}

/// Text of `INFO section` of the server on `port`.
async fn info(port: u16, section: &str) -> String {
    let mut command = redis::cmd("INFO");
    command.arg(section);
    ask(port, &mut command)
        .await
        .and_then(|value| redis::from_redis_value(value).ok())
        .unwrap_or_default()
}

/// A primary, a synced replica and three sentinels that know both and each
/// other, in a directory of their own.
struct Deployment {
    dir: std::path::PathBuf,
    primary: RedisServer,
    replica: Child,
    replica_port: u16,
    sentinels: Vec<SentinelProcess>,
}

impl Deployment {
    async fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("quotebridge-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let primary = RedisServer::start().await;
        let primary_port: u16 = primary
            .url()
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("port");
        let replica_port = free_port();
        let mut replica = spawn_redis_server(
            replica_port,
            &["--replicaof", "127.0.0.1", &primary_port.to_string()],
            // A replica writes the primary's snapshot to disk on a full
            // sync, whatever `--save` says: keep it out of the checkout.
            Some(&dir),
        );
        assert!(
            wait_until_ready(&mut replica, replica_port).await,
            "replica up"
        );
        eventually("the replica to sync", async || {
            info(replica_port, "replication")
                .await
                .contains("master_link_status:up")
                .then_some(())
        })
        .await;
        let sentinels: Vec<SentinelProcess> =
            (0..3).map(|_| start_sentinel(&dir, primary_port)).collect();
        for sentinel in &sentinels {
            eventually(
                "each sentinel to know the replica and the others",
                async || {
                    let text = info(sentinel.port, "sentinel").await;
                    (text.contains("slaves=1") && text.contains("sentinels=3")).then_some(())
                },
            )
            .await;
        }
        Self {
            dir,
            primary,
            replica,
            replica_port,
            sentinels,
        }
    }

    /// The bridge on this deployment's sentinels, with `env`, ready.
    async fn bridge(&self, env: &[(&str, &str)]) -> Running {
        let addresses: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let addresses = addresses.join(",");
        let mut vars = vec![
            // The host is unused with Sentinel; the URL's other parts apply.
            ("QUOTEBRIDGE__REDIS__URL", "redis://127.0.0.1:1"),
            ("QUOTEBRIDGE__REDIS__SENTINELS", addresses.as_str()),
            ("QUOTEBRIDGE__REDIS__SENTINEL_MASTER", MASTER),
        ];
        vars.extend_from_slice(env);
        bridge_with(&vars).await
    }

    /// A client of the replica (the primary after a failover).
    fn replica_client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.replica_port)).expect("url")
    }

    /// A subscription to the results (`sma`) on the replica.
    async fn replica_results(&self) -> redis::aio::PubSub {
        let mut output = self
            .replica_client()
            .get_async_pubsub()
            .await
            .expect("pubsub");
        output.subscribe("sma").await.expect("subscribe");
        output
    }

    /// Kills the primary (`kill -9`) and waits until the sentinels have
    /// promoted the replica.
    async fn fail_over(&mut self) {
        self.primary.kill();
        let (sentinel, replica) = (self.sentinels[0].port, self.replica_port);
        eventually("the sentinels to promote the replica", async || {
            (primary_port(sentinel).await == Some(replica)).then_some(())
        })
        .await;
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.sentinels.clear();
        let _ = self.replica.kill();
        let _ = self.replica.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn the_bridge_follows_a_sentinel_failover_and_keeps_its_sockets() {
    let mut deployment = Deployment::start("sentinel").await;
    let replica_port = deployment.replica_port;
    let mut bridge = deployment
        .bridge(&[("QUOTEBRIDGE__SMA__WINDOW", "1")])
        .await;
    let (mut socket, _) = connect_ws(&format!("ws://{}/ws/acme", bridge.address)).await;
    let quote = |price: u32| {
        let quote = json!({"symbol": "AAPL", "price": price, "ts": price});
        ("quotes".to_owned(), quote.to_string().into_bytes())
    };
    publish_all(&mut deployment.primary.connection().await, &[quote(1)]).await;
    assert_eq!(next_json(&mut socket).await["ts"], 1);

    // kill -9 the primary: not ready while there is none, then the
    // promoted replica, and the socket that stayed open gets results again.
    let killed = Instant::now();
    let not_ready = async {
        eventually("the bridge to say it has no primary", async || {
            (http_get(bridge.address, "/readyz").await.0 == 503).then_some(())
        })
        .await;
    };
    let ((), ()) = tokio::join!(not_ready, deployment.fail_over());
    bridge.wait_until_ready().await;
    let new_primary =
        redis::Client::open(format!("redis://127.0.0.1:{replica_port}")).expect("url");
    let mut output = new_primary.get_async_pubsub().await.expect("pubsub");
    output.subscribe("sma").await.expect("subscribe");
    let mut output = output.on_message();
    let mut conn = new_primary
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the new primary");
    publish_all(&mut conn, &[quote(2)]).await;
    assert_eq!(next_json(&mut socket).await["ts"], 2, "the same socket");
    let (_, published) = next_redis(&mut output).await;
    assert!(
        published.contains(r#""ts":2"#),
        "published to the new primary: {published}"
    );
    eprintln!(
        "sentinel failover: results flow again {:.1} s after the primary was killed",
        killed.elapsed().as_secs_f64()
    );
    bridge.stop().await;
}

/// Stream mode under Sentinel: quotes applied before the primary dies (and
/// replicated) are not applied again, and the ones after the failover
/// continue every key's window and sequence on the promoted replica.
#[tokio::test]
async fn stream_mode_continues_on_the_promoted_replica_without_loss_or_repeat() {
    let mut deployment = Deployment::start("sentinel-stream").await;
    let mut bridge = deployment
        .bridge(&[
            ("QUOTEBRIDGE__REDIS__INPUT_MODE", "stream"),
            ("QUOTEBRIDGE__SMA__WINDOW", "3"),
        ])
        .await;
    // PUBLISH is replicated: the replica's subscribers see every result,
    // before the failover and after it.
    let mut output = deployment.replica_results().await;
    let mut output = output.on_message();
    let quotes = |prices: std::ops::RangeInclusive<u32>| -> Vec<Vec<u8>> {
        prices
            .map(|p| {
                json!({"symbol": "AAPL", "price": p, "ts": p})
                    .to_string()
                    .into_bytes()
            })
            .collect()
    };
    let mut results = Vec::new();
    crate::durable::xadd_all(&mut deployment.primary.connection().await, &quotes(1..=20)).await;
    // A window of 3: quotes 3 to 20 have a result.
    for _ in 3..=20 {
        results.push(next_redis(&mut output).await.1);
    }

    deployment.fail_over().await;
    bridge.wait_until_ready().await;
    // Sentinel closes the promoted replica's clients: subscribe again. A
    // quote applied twice would shift every seq after it, so the seqs below
    // show a repeat even if its result went out before this subscription.
    let mut output = deployment.replica_results().await;
    let mut output = output.on_message();
    let mut conn = deployment
        .replica_client()
        .get_multiplexed_async_connection()
        .await
        .expect("the new primary");
    crate::durable::xadd_all(&mut conn, &quotes(21..=40)).await;
    for _ in 21..=40 {
        results.push(next_redis(&mut output).await.1);
    }
    let results: Vec<serde_json::Value> = results
        .iter()
        .map(|text| serde_json::from_str(text).expect("JSON"))
        .collect();
    let seqs: Vec<u64> = results.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(
        seqs,
        (1..=38).collect::<Vec<_>>(),
        "each once, in order, one epoch"
    );
    assert!(results.iter().all(|r| r["epoch"] == results[0]["epoch"]));
    // The window went on across the failover: 21's mean is of 19, 20, 21.
    assert_eq!(results[18]["price"], 21.0);
    assert_eq!(results[18]["sma"], 20.0);
    bridge.stop().await;
}

/// The durable chaos check under Sentinel: quotes flow into the stream
/// while the primary is killed. Every quote the replica had (the producer's
/// `WAIT` said so, or it went to the promoted replica) gets exactly one
/// result, and every result's `seq` follows the one before: nothing is
/// applied twice or skipped. (A quote whose `XADD` failed is sent again by
/// the producer, so it may legitimately appear twice, as two entries.)
#[tokio::test]
async fn a_failover_while_quotes_flow_applies_every_replicated_quote_exactly_once() {
    const QUOTES: u64 = 400;
    let mut deployment = Deployment::start("sentinel-chaos").await;
    let mut bridge = deployment
        .bridge(&[
            ("QUOTEBRIDGE__REDIS__INPUT_MODE", "stream"),
            ("QUOTEBRIDGE__SMA__WINDOW", "1"),
        ])
        .await;
    let (mut socket, _) = connect_ws(&format!("ws://{}/ws/acme", bridge.address)).await;
    let (sentinel, replica) = (deployment.sentinels[0].port, deployment.replica_port);

    let producer = tokio::spawn(async move {
        let (mut durable, mut uncertain) = (Vec::new(), Vec::new());
        let mut conn: Option<(u16, redis::aio::MultiplexedConnection)> = None;
        for n in 1..=QUOTES {
            loop {
                let Some(port) = primary_port(sentinel).await else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                if conn.as_ref().is_none_or(|(at, _)| *at != port) {
                    let client =
                        redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("url");
                    let connecting = client.get_multiplexed_async_connection();
                    match tokio::time::timeout(std::time::Duration::from_millis(500), connecting)
                        .await
                    {
                        Ok(Ok(connection)) => conn = Some((port, connection)),
                        _ => {
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                }
                let Some((port, connection)) = conn.as_mut() else {
                    continue;
                };
                let quote = json!({"symbol": "AAPL", "price": n, "ts": n}).to_string();
                let mut xadd = redis::cmd("XADD");
                xadd.arg("quotes.stream").arg("*").arg("quote").arg(quote);
                let added = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    xadd.query_async::<String>(connection),
                )
                .await;
                if !matches!(added, Ok(Ok(_))) {
                    uncertain.push(n);
                    conn = None;
                    continue;
                }
                if *port == replica {
                    durable.push(n); // the promoted replica: the only copy now
                } else {
                    let mut wait = redis::cmd("WAIT");
                    wait.arg(1).arg(1000);
                    let replicas = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        wait.query_async::<u64>(connection),
                    )
                    .await;
                    match replicas {
                        Ok(Ok(1..)) => durable.push(n),
                        _ => uncertain.push(n),
                    }
                }
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        (durable, uncertain)
    });

    let mut results: Vec<serde_json::Value> = Vec::new();
    let mut read = async |results: &mut Vec<serde_json::Value>, until: u64| {
        while results
            .last()
            .and_then(|r| r["ts"].as_u64())
            .is_none_or(|ts| ts < until)
        {
            results.push(next_json(&mut socket).await);
        }
    };
    read(&mut results, QUOTES / 3).await;
    deployment.fail_over().await;
    let (durable, uncertain) = producer.await.expect("the producer");
    read(&mut results, QUOTES).await;

    let seqs: Vec<u64> = results.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(
        seqs,
        (1..=results.len() as u64).collect::<Vec<_>>(),
        "no result repeated or skipped across the failover"
    );
    let count = |n: u64| results.iter().filter(|r| r["ts"] == n).count();
    for n in &durable {
        let expected = if uncertain.contains(n) { 1..=2 } else { 1..=1 };
        assert!(
            expected.contains(&count(*n)),
            "quote {n}: {} results",
            count(*n)
        );
    }
    eprintln!(
        "sentinel chaos: {} quotes replicated or sent after the failover, each applied once; {} uncertain at the kill",
        durable.len(),
        uncertain.len()
    );
    bridge.stop().await;
}
