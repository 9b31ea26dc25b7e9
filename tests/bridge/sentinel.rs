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

#[tokio::test]
async fn the_bridge_follows_a_sentinel_failover_and_keeps_its_sockets() {
    let dir = std::env::temp_dir().join(format!("quotebridge-sentinel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut primary = RedisServer::start().await;
    let primary_port_number: u16 = primary
        .url()
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("port");
    let replica_port = free_port();
    let mut replica = spawn_redis_server(
        replica_port,
        &["--replicaof", "127.0.0.1", &primary_port_number.to_string()],
        None,
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
    let sentinels: Vec<SentinelProcess> = (0..3)
        .map(|_| start_sentinel(&dir, primary_port_number))
        .collect();
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

    // A sentinel that names a replica as the primary (as one that has not
    // seen a failover yet would): the bridge will not publish there.
    let misled = start_sentinel_of(&dir, "misled", replica_port);
    let misled_address = format!("127.0.0.1:{}", misled.port);
    let sentinels_of_misled =
        quotebridge::broker::Sentinels::new(&[misled_address], "misled").expect("address");
    let broker = quotebridge::broker::RedisBroker::new("redis://127.0.0.1:1")
        .expect("url")
        .with_sentinels(sentinels_of_misled);
    let refused = eventually("the misled sentinel to answer", async || {
        match broker.ping().await {
            Err(err) if err.to_string().contains("not a primary") => Some(err.to_string()),
            _ => None,
        }
    })
    .await;
    assert!(refused.contains(&replica_port.to_string()), "{refused}");
    drop(misled);

    let addresses: Vec<String> = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let addresses = addresses.join(",");
    let env = [
        // The host is unused with Sentinel; the URL's other parts apply.
        ("QUOTEBRIDGE__REDIS__URL", "redis://127.0.0.1:1"),
        ("QUOTEBRIDGE__REDIS__SENTINELS", addresses.as_str()),
        ("QUOTEBRIDGE__REDIS__SENTINEL_MASTER", MASTER),
        ("QUOTEBRIDGE__SMA__WINDOW", "1"),
    ];
    let settings = quotebridge::config::Settings::load_with_env(
        None,
        Some(
            env.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
    )
    .expect("valid settings");
    let mut bridge = Running::on_redis(settings);
    bridge.wait_until_ready().await;
    let (mut socket, _) = connect_ws(&format!("ws://{}/ws/acme", bridge.address)).await;
    let quote = |price: u32| {
        let quote = json!({"symbol": "AAPL", "price": price, "ts": price});
        ("quotes".to_owned(), quote.to_string().into_bytes())
    };
    publish_all(&mut primary.connection().await, &[quote(1)]).await;
    assert_eq!(next_json(&mut socket).await["ts"], 1);

    // kill -9 the primary: not ready while there is none, then the
    // promoted replica, and the socket that stayed open gets results again.
    primary.kill();
    let killed = Instant::now();
    eventually("the bridge to say it has no primary", async || {
        (http_get(bridge.address, "/readyz").await.0 == 503).then_some(())
    })
    .await;
    eventually("the sentinels to promote the replica", async || {
        (primary_port(sentinels[0].port).await == Some(replica_port)).then_some(())
    })
    .await;
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
    drop(sentinels);
    let _ = replica.kill();
    let _ = replica.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
