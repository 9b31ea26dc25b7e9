//! The Redis broker: one subscriber connection for every channel and pattern,
//! and one multiplexed, auto-reconnecting connection that publishes in pipelines.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Broker, BrokerError, Inbound, Outbound, Subscription, Topic};

/// How long connecting or a single request may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A broker backed by a Redis server.
#[derive(Clone)]
pub struct RedisBroker {
    client: redis::Client,
    publisher: ConnectionManager,
    address: String,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password; only the address is shown.
        f.debug_struct("RedisBroker")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Connects the publishing connection; fails when Redis does not answer.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let publisher = ConnectionManager::new_with_config(client.clone(), config).await?;
        let address = client.get_connection_info().addr().to_string();
        Ok(Self {
            client,
            publisher,
            address,
        })
    }

    /// Whether the server answers PING.
    pub async fn ping(&self) -> Result<(), BrokerError> {
        let mut conn = self.publisher.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(())
    }
}

impl Broker for RedisBroker {
    async fn subscribe(&self, topics: &[Topic]) -> Result<Subscription, BrokerError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        for topic in topics {
            match topic {
                Topic::Channel(name) => pubsub.subscribe(name).await?,
                Topic::Pattern(pattern) => pubsub.psubscribe(pattern).await?,
            }
        }
        let topics = topics.to_vec();
        let messages = pubsub.into_on_message().filter_map(move |msg| {
            let pattern: Option<String> = msg.get_pattern().ok().flatten();
            let channel = msg.get_channel_name();
            let topic = topics.iter().position(|t| match (t, &pattern) {
                (Topic::Pattern(p), Some(got)) => p == got,
                (Topic::Channel(c), None) => c == channel,
                _ => false,
            });
            let inbound = topic.map(|topic| Inbound {
                topic,
                channel: channel.to_owned(),
                payload: bytes::Bytes::copy_from_slice(msg.get_payload_bytes()),
            });
            std::future::ready(inbound)
        });
        Ok(messages.boxed())
    }

    async fn publish(&self, batch: &[Outbound]) -> Result<(), BrokerError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for message in batch {
            pipe.publish(&*message.channel, message.payload.as_ref())
                .ignore();
        }
        let mut conn = self.publisher.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("redis at {}", self.address)
    }
}
