//! The same bridge on the embedded broker: the seam `demo` uses without Redis.

use bytes::Bytes;
use futures_util::StreamExt;
use quotebridge::broker::{Broker, MemoryBroker, Outbound, Subscription, Topic};
use quotebridge::config::Settings;
use serde_json::Value;

use crate::support::*;

/// A bridge with `settings` on a fresh embedded broker, the broker's `sma`
/// channel subscribed, and one `acme` socket past its welcome.
struct Embedded {
    broker: MemoryBroker,
    output: Subscription,
    socket: Socket,
    bridge: Running,
}

impl Embedded {
    async fn start(settings: Settings) -> Self {
        let broker = MemoryBroker::new();
        let output = broker
            .subscribe(&[Topic::from_name("sma")])
            .await
            .expect("subscribe");
        let bridge = Running::on_broker(settings, broker.clone());
        bridge.wait_until_ready().await;
        let (socket, welcome) = connect_ws(&format!("ws://{}/ws/acme", bridge.address)).await;
        assert_eq!(welcome["type"], "welcome");
        Self {
            broker,
            output,
            socket,
            bridge,
        }
    }

    /// Publishes `{"symbol":"A","price":P,"ts":9}` for each price, in one batch.
    async fn publish_prices(&self, prices: impl Iterator<Item = f64>) {
        let quotes: Vec<Outbound> = prices
            .map(|p| {
                Outbound::new(
                    "quotes".into(),
                    Bytes::from(format!(r#"{{"symbol":"A","price":{p},"ts":9}}"#)),
                )
            })
            .collect();
        self.broker.publish(&quotes).await.expect("publish");
    }

    async fn stop(mut self) {
        self.bridge.stop().await;
    }
}

#[tokio::test]
async fn the_bridge_runs_on_the_embedded_broker() {
    let mut settings = Settings::defaults().expect("defaults");
    settings.sma.window = 2;
    let mut bridge = Embedded::start(settings).await;
    bridge.publish_prices([1.0, 3.0, 5.0].into_iter()).await;
    for want in [2.0, 4.0] {
        let published = within("an SMA on the embedded broker", bridge.output.next())
            .await
            .expect("message");
        let frame = next_text(&mut bridge.socket).await;
        assert_eq!(
            published.payload,
            frame.as_bytes(),
            "same bytes to broker and socket"
        );
        let got: Value = serde_json::from_str(&frame).expect("json");
        assert_eq!(got["sma"].as_f64(), Some(want));
    }
    bridge.stop().await;
}

#[tokio::test]
async fn a_burst_larger_than_the_publish_queue_reaches_redis_whole_and_in_order() {
    const QUOTES: usize = 300;
    let mut settings = Settings::defaults().expect("defaults");
    settings.sma.emit_partial = true;
    // Far smaller than a burst: most of each burst waits for room.
    settings.redis.publish_queue = 1;
    let mut bridge = Embedded::start(settings).await;
    bridge.publish_prices((1..=QUOTES).map(|p| p as f64)).await;
    for want in 1..=QUOTES {
        let published = within("every SMA on the output channel", bridge.output.next())
            .await
            .expect("message");
        let got: Value = serde_json::from_slice(&published.payload).expect("json");
        assert_eq!(got["price"].as_f64(), Some(want as f64), "in order");
        let frame: Value =
            serde_json::from_str(&next_text(&mut bridge.socket).await).expect("json");
        assert_eq!(frame["price"].as_f64(), Some(want as f64));
    }
    bridge.stop().await;
}

/// Patterns over an alphabet that exercises every glob rule: each of these
/// bytes is a literal, a wildcard, or part of a class or escape.
fn glob_corpus() -> (Vec<String>, Vec<String>) {
    const ALPHABET: &[u8] = b"ab*?[]^-\\";
    let mut patterns: Vec<String> = [
        "", "*", "**", "?", "a*", "*a", "a[bc", "a[", "[", "[]", "[]a]", "[^]", "[^a]", "[a-]",
        "[a-]b]", "[-a]", "[b-a]", "[\\]]", "[a\\", "\\", "a\\", "\\*", "\\\\", "a*b*a", "*?*",
        "[*]", "[?]", "?[ab]*", "[^-]", "[a-b-]",
    ]
    .iter()
    .map(|p| (*p).to_owned())
    .collect();
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    for _ in 0..600 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = (state % 7) as usize;
        let pattern = (0..len)
            .map(|i| ALPHABET[((state >> (8 + 5 * i)) % ALPHABET.len() as u64) as usize] as char)
            .collect();
        patterns.push(pattern);
    }
    patterns.sort();
    patterns.dedup();
    const NAME_BYTES: &[u8] = b"ab-]^*\\[";
    let mut names = vec![String::new()];
    let mut shorter = names.clone();
    for _ in 0..3 {
        shorter = shorter
            .iter()
            .flat_map(|s| NAME_BYTES.iter().map(move |&c| format!("{s}{}", c as char)))
            .collect();
        names.extend(shorter.iter().cloned());
    }
    (patterns, names)
}

/// The embedded broker promises Redis's pattern matching: the same patterns
/// and channel names through a real redis-server and through it agree.
#[tokio::test]
async fn glob_patterns_match_exactly_as_in_redis() {
    use quotebridge::broker::glob_match;

    let redis = RedisServer::start().await;
    let (patterns, names) = glob_corpus();
    let mut subscriber = redis
        .client()
        .get_async_pubsub()
        .await
        .expect("pubsub connection");
    for pattern in &patterns {
        subscriber.psubscribe(pattern).await.expect("psubscribe");
    }
    let mut conn = redis.connection().await;
    let mut messages = subscriber.on_message();
    let mut disagreements = Vec::new();
    for name in &names {
        let receivers: usize = redis::cmd("PUBLISH")
            .arg(name)
            .arg("x")
            .query_async(&mut conn)
            .await
            .expect("PUBLISH");
        let mut by_redis = Vec::with_capacity(receivers);
        for _ in 0..receivers {
            let message = within("a pattern message", messages.next())
                .await
                .expect("subscription open");
            by_redis.push(message.get_pattern::<String>().expect("a pattern"));
        }
        by_redis.sort();
        let by_us: Vec<String> = patterns
            .iter()
            .filter(|p| glob_match(p.as_bytes(), name.as_bytes()))
            .cloned()
            .collect();
        if by_redis != by_us {
            disagreements.push(format!("{name:?}: redis {by_redis:?}, embedded {by_us:?}"));
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {} names disagree, e.g.:\n{}",
        disagreements.len(),
        names.len(),
        disagreements[..disagreements.len().min(5)].join("\n")
    );
}
