//! `quotebridge demo`: the bridge plus a feeder replaying bundled sample
//! quotes, on Redis when it answers and on the embedded broker otherwise.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, MemoryBroker};
use crate::config::Settings;
use crate::config::series::{SeriesKind, SeriesSettings};
use crate::{Error, publish};

/// Sample quotes bundled into the binary: several symbols, a few thousand rows.
pub const SAMPLE_QUOTES: &str = include_str!("../data/quotes.csv");

/// Quotes per second per symbol while replaying.
const QUOTES_PER_SECOND_PER_SYMBOL: f64 = 4.0;

/// How long to wait for Redis before falling back to the embedded broker.
const REDIS_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs the demo until `shutdown`.
pub async fn run(mut settings: Settings, shutdown: CancellationToken) -> Result<(), Error> {
    // One self-contained process on one Redis (or none): the feeder
    // publishes; stream mode, clusters and split roles are for deployments.
    settings.redis.input_mode = crate::config::InputMode::PubSub;
    settings.redis.cluster_nodes.clear();
    settings.node.role = crate::topology::Role::All;
    settings.node.shard = crate::topology::Shard::WHOLE;
    if settings.series_tables.is_empty() {
        settings = settings.with_series(demo_series())?;
    }
    let address = settings.server.listen;
    let listener = crate::cli::listen(address).await?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("cannot read the listen address", e))?;

    let broker = crate::redis_broker(&settings.redis)?
        .with_health_check(settings.health_check())
        .with_subscription_buffer(settings.subscription_buffer());
    match tokio::time::timeout(REDIS_PROBE_TIMEOUT, broker.ping()).await {
        Ok(Ok(())) => {
            println!("quotebridge demo: using {}", broker.describe());
            run_with(settings, listener, local, broker, shutdown).await
        }
        _ => {
            println!(
                "quotebridge demo: no Redis answered at {}; using the embedded in-process broker",
                redacted(&settings.redis.url)
            );
            run_with(settings, listener, local, MemoryBroker::new(), shutdown).await
        }
    }
}

/// The series the demo computes when the configuration names none, so the
/// dashboard has candles to draw within seconds: 5-second candles (an open
/// one updated every second) and an EMA of 20 quotes.
fn demo_series() -> Vec<SeriesSettings> {
    vec![
        SeriesSettings {
            interval: Some("5s".into()),
            update_ms: 1_000,
            ..SeriesSettings::new("candles.5s", SeriesKind::Candles)
        },
        SeriesSettings {
            span: Some(20),
            ..SeriesSettings::new("ema.20", SeriesKind::Ema)
        },
    ]
}

async fn run_with<B: Broker>(
    settings: Settings,
    listener: TcpListener,
    local: std::net::SocketAddr,
    broker: B,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let loaded = publish::parse_csv(SAMPLE_QUOTES, None)?;
    let symbols = count_symbols(&loaded);
    let rate = QUOTES_PER_SECOND_PER_SYMBOL * symbols as f64;
    let channel = settings.redis.input[0].clone();
    let quotes = publish::address(&loaded, &settings.redis.channels())?;

    println!(
        "quotebridge demo: replaying {} sample quotes over {symbols} symbols at {rate} quotes/s on channel {channel:?}",
        loaded.quotes.len()
    );
    // Where this machine reaches it, whatever it listens on.
    let local = crate::health::local_address(local);
    println!("  dashboard:  http://{local}/");
    println!("  WebSocket:  ws://{local}/ws/demo");
    let served: Vec<&str> = settings
        .catalog
        .served()
        .iter()
        .map(String::as_str)
        .collect();
    println!("  series:     {}", served.join(", "));
    println!(
        "  watch it:   cargo run --release -- tail demo --url ws://{local}    (or: websocat ws://{local}/ws/demo)"
    );
    println!("  Ctrl-C stops it.");

    let feeder = {
        let broker = broker.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // Give the listener a moment to subscribe so the first quotes count.
            tokio::time::sleep(Duration::from_millis(200)).await;
            publish::publish(&broker, &quotes, Some(rate), true, &shutdown).await
        })
    };
    let served = crate::serve(settings, listener, broker, shutdown).await;
    if let Ok(Err(err)) = feeder.await {
        tracing::warn!(cause = %err, "demo feeder stopped");
    }
    served
}

fn count_symbols(loaded: &publish::Loaded) -> usize {
    let symbols: std::collections::BTreeSet<&str> = loaded.symbols.iter().map(|s| &**s).collect();
    symbols.len().max(1)
}

/// The URL without credentials, for printing.
fn redacted(url: &str) -> String {
    match url.split_once('@') {
        Some((scheme_and_auth, host)) => {
            let scheme = scheme_and_auth.split("//").next().unwrap_or("redis:");
            format!("{scheme}//***@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_data_is_realistic_and_clean() {
        let loaded = publish::parse_csv(SAMPLE_QUOTES, None).expect("sample CSV parses");
        assert!(
            loaded.rejected.is_empty(),
            "sample has bad lines: {:?}",
            loaded.rejected
        );
        assert!(loaded.quotes.len() >= 2000, "a few thousand rows");
        assert!(count_symbols(&loaded) >= 5, "several symbols");
    }

    #[test]
    fn credentials_are_not_printed() {
        assert_eq!(
            redacted("redis://:secret@host:6379"),
            "redis://***@host:6379"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
