//! The command line: `serve` (default), `publish`, `demo`, `bench`, `tail`,
//! `health`, `config`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::ClusterBroker;
use crate::config::Settings;
use crate::telemetry::LogFormat;
use crate::topology::{Role, Shard};
use crate::{Error, bench, demo, health, publish, shutdown, tail};

/// Bridges Redis pub/sub quotes to WebSocket clients, with a per-symbol moving average.
#[derive(Debug, Parser)]
#[command(name = "quotebridge", version, about)]
pub struct Cli {
    /// Configuration file (TOML) layered over the compiled-in defaults.
    #[arg(long, short, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Redis to use (sets redis.url, over the file and the environment).
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Address to serve HTTP and WebSockets on, host:port (sets
    /// server.listen, over the file and the environment).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bridge (the default).
    Serve(ServeArgs),
    /// Publish quotes from a CSV (symbol,price[,ts][,client][,volume]) or JSON-lines file.
    Publish {
        /// The file to read; `-` reads standard input (CSV or JSON lines,
        /// told apart by the first line).
        file: PathBuf,
        /// Quotes per second (default: as fast as Redis takes them, pipelined).
        #[arg(long, value_name = "N")]
        rate: Option<f64>,
        /// Start over at the end of the file, until interrupted.
        #[arg(long = "loop")]
        repeat: bool,
        /// Make every quote private to this client code.
        #[arg(long, value_name = "CODE")]
        client: Option<String>,
        /// Append to the input stream (redis.input_stream, durable mode)
        /// instead of publishing on the input channel.
        #[arg(long)]
        stream: bool,
    },
    /// See it work: the bridge plus a feeder replaying bundled sample quotes.
    Demo,
    /// Measure the bridge: throughput, latency, fan-out, memory per socket.
    Bench(BenchArgs),
    /// Print what a client group receives, one JSON per line.
    Tail {
        /// The client code to connect as.
        client_code: String,
        /// Subscribe to these symbols instead of the defaults (comma-separated).
        #[arg(long, value_delimiter = ',', value_name = "A,B")]
        symbols: Option<Vec<String>>,
        /// In these series instead of the bridge's default ones
        /// (comma-separated: `sma` or `[[series]]` names, e.g. `sma,candles.1m`).
        #[arg(long, value_delimiter = ',', value_name = "S,T")]
        series: Option<Vec<String>>,
        /// Base WebSocket URL (default: ws:// + server.listen); a query
        /// (`?x=1`) is kept.
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// Token to connect with (sent as `Authorization: Bearer`), when
        /// the bridge requires one.
        #[arg(
            long,
            value_name = "TOKEN",
            env = "QUOTEBRIDGE_TOKEN",
            hide_env_values = true
        )]
        token: Option<String>,
        /// Reconnect after a dropped connection or a bridge restart, and
        /// resume where it left off (each key's last position).
        #[arg(long)]
        resume: bool,
    },
    /// Ask the bridge at server.listen whether it is alive (exit 0) or not
    /// (exit 1): for container health checks.
    Health {
        /// Ask whether it is ready (/readyz: subscribed and serving) instead
        /// of alive (/healthz).
        #[arg(long)]
        ready: bool,
    },
    /// Check or print the configuration: the defaults, then --config FILE,
    /// then QUOTEBRIDGE__SECTION__KEY environment variables.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

/// What to do with the configuration.
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Validate it: exit 0, or 2 with one line naming the key and where its
    /// value came from.
    Check,
    /// Print the effective configuration as TOML, secrets redacted, with
    /// where each value came from.
    Show,
}

/// The `serve` command's options; each overrides its `[node]` key.
#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// all: compute and serve sockets; compute: SMAs only; gateway: sockets only.
    #[arg(long, value_enum, value_name = "ROLE")]
    role: Option<Role>,
    /// Compute shard I/N: handle only symbols whose hash is I modulo N.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
}

/// The `bench` command's options (see docs/BENCHMARKS.md).
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Scenarios to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST")]
    scenario: Vec<bench::Scenario>,
    /// Redis to use (default: a throwaway redis-server on a free port).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Ingest: quotes to push.
    #[arg(long, default_value_t = 1_000_000)]
    quotes: usize,
    /// Distinct symbols.
    #[arg(long, default_value_t = 1_000)]
    symbols: usize,
    /// Latency: input rates in quotes/s.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000")]
    rates: Vec<u64>,
    /// Latency: sockets receiving every public SMA.
    #[arg(long, default_value_t = 100)]
    latency_sockets: usize,
    /// Latency: seconds per rate.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Fan-out: socket counts.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    fanout_sockets: Vec<usize>,
    /// Fan-out: client groups.
    #[arg(long, default_value_t = 10)]
    groups: usize,
    /// Fan-out: frames to deliver per socket count (at least one round).
    #[arg(long, default_value_t = 20_000_000)]
    fanout_frames: u64,
    /// Fan-out: results per round, each sent to every socket (at most
    /// `websocket.send_queue`/2 fit a socket's queue).
    #[arg(long, default_value_t = crate::bench::fanout::ROUND_RESULTS)]
    fanout_round: u64,
    /// Slow fan-out: percent of the sockets that never read.
    #[arg(long, default_value_t = 10)]
    slow_percent: usize,
    /// Resume: sockets coming back at once.
    #[arg(long, default_value_t = 1_000)]
    resume_sockets: usize,
    /// Resume: results each of them missed.
    #[arg(long, default_value_t = 1_000)]
    resume_missed: usize,
    /// Resume: keys those results are spread over.
    #[arg(long, default_value_t = 10)]
    resume_symbols: usize,
    /// Connections: idle sockets.
    #[arg(long, default_value_t = 50_000)]
    idle_sockets: usize,
    /// Micro: quotes through the pipeline.
    #[arg(long, default_value_t = 2_000_000)]
    micro_quotes: usize,
    /// Soak: seconds of steady load (RSS sampled every tenth).
    #[arg(long, default_value_t = 120.0)]
    soak_seconds: f64,
    /// Run bridges as this role: compute (ingest, with snapshot writes) or
    /// gateway (latency, fan-out, connections, fed ready-made results).
    #[arg(long, value_enum, default_value_t = Role::All)]
    role: Role,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl BenchArgs {
    fn into_options(self, redis_tls: crate::broker::TlsFiles) -> bench::Options {
        bench::Options {
            redis_tls,
            scenarios: if self.scenario.is_empty() {
                bench::Options::default().scenarios
            } else {
                self.scenario
            },
            redis_url: self.redis,
            quotes: self.quotes,
            symbols: self.symbols,
            rates: self.rates,
            latency_sockets: self.latency_sockets,
            seconds: self.seconds,
            fanout_sockets: self.fanout_sockets,
            groups: self.groups,
            fanout_frames: self.fanout_frames,
            fanout_round: self.fanout_round,
            slow_percent: self.slow_percent,
            resume_sockets: self.resume_sockets,
            resume_missed: self.resume_missed,
            resume_symbols: self.resume_symbols,
            idle_sockets: self.idle_sockets,
            micro_quotes: self.micro_quotes,
            soak_seconds: self.soak_seconds,
            bridge_binary: bench::environment::current_binary(),
            role: self.role,
        }
    }
}

impl Cli {
    /// The settings given by flags of their own.
    fn setting_flags(&self) -> Vec<crate::config::Flag> {
        let flag = |key, flag, value: &Option<String>| {
            value
                .clone()
                .map(|value| crate::config::Flag { key, flag, value })
        };
        [
            flag("redis.url", "--redis-url", &self.redis_url),
            flag("server.listen", "--listen", &self.listen),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// Warns when no bridge in stream mode reads `key`: the stream has no
/// consumer group at all (entries would wait there until one starts).
/// Any group will do: shards read under groups of their own.
async fn warn_if_nobody_reads(client: &redis::Client, key: &str) {
    let groups: Result<Vec<std::collections::HashMap<String, redis::Value>>, _> = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(key)
            .query_async(&mut conn)
            .await
    }
    .await;
    let read = match groups {
        Ok(groups) => !groups.is_empty(),
        // No such key yet: nobody has created the group either. Other
        // failures are left to the appending, which reports them.
        Err(err) => err.code() != Some("ERR"),
    };
    if !read {
        eprintln!(
            "quotebridge publish: warning: stream {key:?} has no consumer group: no bridge in stream mode reads it yet (the entries wait until one starts: QUOTEBRIDGE__REDIS__INPUT_MODE=stream quotebridge serve)"
        );
    }
}

/// Binds `serve`'s and `demo`'s listener; a failure says how to choose
/// another address, whichever command it was.
pub(crate) async fn listen(address: std::net::SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(address).await.map_err(|e| {
        Error::io(
            format!(
                "cannot listen on {address} (choose another address with --listen HOST:PORT or QUOTEBRIDGE__SERVER__LISTEN)"
            ),
            e,
        )
    })
}

/// Runs the command `cli` names until it finishes or SIGINT/SIGTERM.
pub async fn execute(cli: Cli) -> Result<(), Error> {
    let flags = cli.setting_flags();
    let settings = Settings::load_with_flags(cli.config.as_deref(), &flags)?;
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown::signal().await;
            shutdown.cancel();
        }
    });
    match cli
        .command
        .unwrap_or_else(|| Command::Serve(ServeArgs::default()))
    {
        Command::Serve(args) => {
            let settings = settings.with_node(args.role, args.shard)?;
            quotebridge_service::raise_descriptor_limit(&settings);
            let listener = listen(settings.server.listen).await?;
            crate::run(settings, listener, shutdown).await
        }
        Command::Publish {
            file,
            rate,
            repeat,
            client,
            stream,
        } => {
            let options = PublishOptions {
                rate,
                repeat,
                client: client.as_deref(),
                stream,
            };
            publish(&settings, &file, &options, &shutdown).await
        }
        Command::Demo => {
            quotebridge_service::raise_descriptor_limit(&settings);
            demo::run(settings, shutdown).await
        }
        Command::Bench(args) => {
            let json = args.json;
            let options = args.into_options(settings.redis.tls_files());
            let report = bench::run(&options).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        Command::Tail {
            client_code,
            symbols,
            series,
            url,
            token,
            resume,
        } => {
            let base_url = url.unwrap_or_else(|| {
                format!("ws://{}", health::local_address(settings.server.listen))
            });
            let options = tail::Options {
                base_url,
                client_code,
                symbols,
                series,
                token,
                resume,
            };
            tail::run(options, shutdown).await
        }
        Command::Config { action } => {
            let file = cli.config.as_deref();
            match action {
                ConfigAction::Check => {
                    // The [auth] keys are checked where the authenticator
                    // is built: here too.
                    quotebridge_service::auth::Authenticator::from_settings(&settings.auth)
                        .map_err(|e| settings.named(e))?;
                    let from = file.map_or_else(
                        || "the defaults and the environment".to_owned(),
                        |path| format!("the defaults, {} and the environment", path.display()),
                    );
                    println!("configuration ok ({from})");
                }
                ConfigAction::Show => {
                    let (env, origins) = Settings::inputs(file, &flags);
                    let merged = Settings::merged(file, env, &origins)?;
                    print!("{}", crate::config::show::render(&merged, &origins));
                }
            }
            Ok(())
        }
        Command::Health { ready } => {
            let path = if ready { "/readyz" } else { "/healthz" };
            health::check(health::local_address(settings.server.listen), path).await?;
            println!("ok");
            Ok(())
        }
    }
}

/// The `publish` command's options.
struct PublishOptions<'a> {
    rate: Option<f64>,
    repeat: bool,
    client: Option<&'a str>,
    stream: bool,
}

async fn publish(
    settings: &Settings,
    file: &std::path::Path,
    options: &PublishOptions<'_>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let PublishOptions {
        rate,
        repeat,
        client,
        stream,
    } = *options;
    if let Some(code) = client.filter(|c| !crate::names::is_client_code(c)) {
        return Err(Error::Usage(format!(
            "--client {code:?}: expected 1-64 characters from [A-Za-z0-9_-]"
        )));
    }
    if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(Error::Usage("--rate must be a positive number".into()));
    }
    let loaded = publish::load(file, client)?;
    let source = if file == std::path::Path::new("-") {
        "stdin".to_owned()
    } else {
        file.display().to_string()
    };
    for (line, reason) in &loaded.rejected {
        eprintln!("{source}:{line}: {reason}");
    }
    if loaded.quotes.is_empty() {
        return Err(Error::Input(format!(
            "{}: no valid quotes to publish",
            file.display()
        )));
    }
    let redis = &settings.redis;
    let (summary, target) = if stream {
        if !redis.cluster_nodes.is_empty() {
            return Err(Error::Usage(
                "--stream needs a single Redis server (redis.cluster_nodes is set)".into(),
            ));
        }
        let client = crate::broker::redis_client(&redis.url, &redis.tls_files())?;
        let key = &redis.input_stream;
        warn_if_nobody_reads(&client, key).await;
        let maxlen = redis.output_stream_maxlen;
        let summary =
            publish::append_to_stream(&client, key, maxlen, &loaded.quotes, rate, repeat, shutdown)
                .await?;
        (summary, format!("stream {key:?}"))
    } else {
        let channel = &redis.input[0];
        if crate::broker::is_pattern(channel) {
            return Err(Error::Usage(format!(
                "the first redis.input entry {channel:?} is a pattern; publish needs a channel"
            )));
        }
        let channels = redis.channels();
        let quotes = publish::address(&loaded, &channels)?;
        let summary = if redis.cluster_nodes.is_empty() {
            let broker = crate::redis_broker(redis)?;
            broker.ping().await.map_err(|err| Error::Unreachable {
                url: crate::config::redact_url(&redis.url),
                reason: err.to_string(),
            })?;
            publish::publish(&broker, &quotes, rate, repeat, shutdown).await?
        } else {
            let broker = ClusterBroker::with_tls(&redis.cluster_nodes, &redis.tls_files())?;
            publish::publish(&broker, &quotes, rate, repeat, shutdown).await?
        };
        let target = if channels.is_partitioned() {
            format!(
                "{channel:?} ({} partitions, sharded)",
                channels.partitions()
            )
        } else {
            format!("{channel:?}")
        };
        (summary, target)
    };
    println!(
        "published {} quotes to {target} in {:.2} s ({:.0} quotes/s); {} lines rejected",
        summary.published,
        summary.elapsed.as_secs_f64(),
        summary.rate(),
        loaded.rejected.len()
    );
    Ok(())
}
