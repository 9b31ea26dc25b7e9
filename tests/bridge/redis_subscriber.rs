//! The Redis broker's subscriber connection, which speaks the protocol
//! itself: passwords and ACL users from the URL, channels and patterns,
//! refusals that say what Redis said, and Unix sockets.

use std::time::Duration;

use futures_util::StreamExt;
use quotebridge::broker::{Broker, RedisBroker, Subscription, Topic};

use crate::support::*;

fn topics() -> [Topic; 2] {
    [
        Topic::Channel("quotes".into()),
        Topic::Pattern("client.*".into()),
    ]
}

/// Publishes on `quotes` and `client.acme` through `conn` and checks that
/// `messages` receives both, tagged with their topics.
async fn both_arrive(conn: &mut redis::aio::MultiplexedConnection, messages: &mut Subscription) {
    for (channel, payload) in [("quotes", "q1"), ("client.acme", "hello")] {
        let _: () = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(conn)
            .await
            .expect("publish");
    }
    let first = within("the channel's message", messages.next())
        .await
        .expect("a message");
    assert_eq!(
        (first.topic, first.channel.as_str(), &first.payload[..]),
        (0, "quotes", &b"q1"[..])
    );
    let second = within("the pattern's message", messages.next())
        .await
        .expect("a message");
    assert_eq!(
        (second.topic, second.channel.as_str(), &second.payload[..]),
        (1, "client.acme", &b"hello"[..])
    );
}

async fn query(conn: &mut redis::aio::MultiplexedConnection, args: &[&str]) {
    let _: () = redis::cmd(args[0])
        .arg(&args[1..])
        .query_async(conn)
        .await
        .unwrap_or_else(|err| panic!("{args:?}: {err}"));
}

#[tokio::test]
async fn a_password_protected_redis_is_subscribed_with_the_urls_credentials() {
    let redis = RedisServer::start().await;
    // Connected before the password is set, so this one stays authenticated.
    let mut admin = redis.connection().await;
    query(
        &mut admin,
        &[
            "ACL", "SETUSER", "feeder", "on", ">s3cret", "~*", "&*", "+@all",
        ],
    )
    .await;
    query(&mut admin, &["CONFIG", "SET", "requirepass", "hunter2"]).await;
    let address = redis.url().replace("redis://", "");

    for url in [
        format!("redis://:hunter2@{address}"),
        format!("redis://feeder:s3cret@{address}"),
    ] {
        let broker = RedisBroker::new(&url).expect("broker");
        let mut messages = broker.subscribe(&topics()).await.expect("subscribe");
        both_arrive(&mut admin, &mut messages).await;
        // Operators can tell it apart in CLIENT LIST.
        let clients = pubsub_clients(&mut admin).await;
        assert!(
            clients.contains(" name=quotebridge-subscriber "),
            "{clients}"
        );
    }
}

#[tokio::test]
async fn a_wrong_password_or_a_forbidden_channel_is_refused_with_redis_own_words() {
    let redis = RedisServer::start().await;
    let mut admin = redis.connection().await;
    query(
        &mut admin,
        &["ACL", "SETUSER", "narrow", "on", ">pw", "&quotes", "+@all"],
    )
    .await;
    query(&mut admin, &["CONFIG", "SET", "requirepass", "hunter2"]).await;
    let address = redis.url().replace("redis://", "");

    let broker = RedisBroker::new(&format!("redis://:wrong@{address}")).expect("broker");
    let err = broker.subscribe(&topics()).await.err().expect("refused");
    assert!(
        err.to_string().contains("AUTH") && err.to_string().contains("WRONGPASS"),
        "{err}"
    );

    // This user may read `quotes` only.
    let broker = RedisBroker::new(&format!("redis://narrow:pw@{address}")).expect("broker");
    let err = broker.subscribe(&topics()).await.err().expect("refused");
    assert!(err.to_string().contains("NOPERM"), "{err}");
    let mut messages = broker
        .subscribe(&[Topic::Channel("quotes".into())])
        .await
        .expect("subscribe to the allowed channel");
    query(&mut admin, &["PUBLISH", "quotes", "q1"]).await;
    let got = within("the message", messages.next()).await.expect("one");
    assert_eq!(&got.payload[..], b"q1");
}

#[tokio::test]
async fn messages_reach_a_subscriber_over_a_unix_socket() {
    let port = free_port();
    let socket = std::env::temp_dir().join(format!("quotebridge-test-{port}.sock"));
    let socket_arg = socket.to_str().expect("a UTF-8 temp dir");
    let mut child = spawn_redis_server(
        port,
        &["--unixsocket", socket_arg, "--unixsocketperm", "700"],
        None,
    );
    assert!(wait_until_ready(&mut child, port).await, "redis came up");
    let mut admin = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");

    let broker = RedisBroker::new(&format!("unix://{socket_arg}")).expect("broker");
    let mut messages = broker.subscribe(&topics()).await.expect("subscribe");
    both_arrive(&mut admin, &mut messages).await;

    let _ = child.kill();
    let _ = child.wait();
    let ended = tokio::time::timeout(Duration::from_secs(20), messages.next()).await;
    assert!(matches!(ended, Ok(None)), "the stream ends with the server");
    let _ = std::fs::remove_file(&socket);
}

/// A hostile publisher's single message larger than the whole buffer is
/// refused as soon as its length arrives: the subscription ends, counted as
/// an overflow, and the next one works.
#[tokio::test]
async fn a_message_larger_than_the_buffer_ends_the_subscription_and_the_next_one_works() {
    use quotebridge::broker::SubscriptionBuffer;

    let redis = RedisServer::start().await;
    let mut admin = redis.connection().await;
    let broker = RedisBroker::new(&redis.url())
        .expect("broker")
        .with_subscription_buffer(SubscriptionBuffer {
            messages: 1000,
            bytes: 1 << 20,
        });
    let mut messages = broker.subscribe(&topics()).await.expect("subscribe");
    let huge = "x".repeat(2 << 20);
    query(&mut admin, &["PUBLISH", "quotes", &huge]).await;
    let ended = within("the subscription to end", messages.next()).await;
    assert!(ended.is_none(), "no part of it is delivered");
    assert_eq!(broker.overflows(), 1);

    let mut messages = broker.subscribe(&topics()).await.expect("subscribe again");
    both_arrive(&mut admin, &mut messages).await;
}
