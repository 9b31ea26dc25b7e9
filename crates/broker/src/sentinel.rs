//! Redis Sentinel: where the primary is. With `redis.sentinels` set, the
//! broker asks the sentinels for the primary of `redis.sentinel_master`
//! before every connection it makes (the first, and each after a loss), and
//! connects there with the user, password, database and TLS of `redis.url`.
//! A server that answers `ROLE` with anything but `master` (a primary
//! demoted by a failover, not yet known as such to the sentinel asked) is
//! refused: publishing there would reach no subscriber of the new primary.

use std::time::Duration;

use redis::IntoConnectionInfo;

use super::BrokerError;

/// How long one sentinel may take to answer.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(1);

/// The sentinels of one primary.
#[derive(Debug, Clone)]
pub struct Sentinels {
    /// Each sentinel's address (`host:port` or a `redis://` URL).
    sentinels: Vec<redis::ConnectionInfo>,
    /// The name the sentinels monitor the primary by.
    master: String,
}

impl Sentinels {
    /// The sentinels at `addresses` (each `host:port` or a URL), watching
    /// the primary named `master`.
    pub fn new(addresses: &[String], master: &str) -> Result<Self, BrokerError> {
        let sentinels = addresses
            .iter()
            .map(|address| {
                let url = if address.contains("://") {
                    address.clone()
                } else {
                    format!("redis://{address}")
                };
                url.into_connection_info()
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            sentinels,
            master: master.to_owned(),
        })
    }

    /// The primary's address, from the first sentinel that knows it.
    pub async fn primary(&self) -> Result<(String, u16), BrokerError> {
        let mut last = None;
        for sentinel in &self.sentinels {
            match tokio::time::timeout(SENTINEL_TIMEOUT, self.ask(sentinel)).await {
                Ok(Ok(Some(address))) => return Ok(address),
                Ok(Ok(None)) => {
                    last = Some(format!(
                        "{} does not know a primary named {:?}",
                        sentinel.addr(),
                        self.master
                    ));
                }
                Ok(Err(err)) => last = Some(format!("{}: {err}", sentinel.addr())),
                Err(_) => {
                    last = Some(format!(
                        "{}: no answer within {SENTINEL_TIMEOUT:?}",
                        sentinel.addr()
                    ))
                }
            }
        }
        Err(BrokerError::NoPrimary(
            last.unwrap_or_else(|| "no sentinel configured".into()),
        ))
    }

    async fn ask(
        &self,
        sentinel: &redis::ConnectionInfo,
    ) -> redis::RedisResult<Option<(String, u16)>> {
        let client = redis::Client::open(sentinel.clone())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let address: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.master)
            .query_async(&mut conn)
            .await?;
        Ok(address)
    }
}

/// Whether the server behind `conn` is a primary (`ROLE` says `master`).
pub async fn is_primary(conn: &mut impl redis::aio::ConnectionLike) -> redis::RedisResult<bool> {
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(conn).await?;
    Ok(matches!(role.first(), Some(redis::Value::BulkString(role)) if role == b"master"))
}
