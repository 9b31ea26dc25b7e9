//! Typed, layered configuration: compiled-in defaults, then an optional file,
//! then `QUOTEBRIDGE__SECTION__KEY` environment variables. Validated once when
//! loaded, so the rest of the program can trust every value.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use config::{Config, File, FileFormat};
use serde::Deserialize;

use crate::backoff::Backoff;
use crate::broker::is_pattern;
use crate::broker::{HealthCheck, SubscriptionBuffer};
use crate::names;
use crate::topology::{ChannelNames, Channels, Role, Shard};

/// The process's `QUOTEBRIDGE__…` environment variables.
#[must_use]
pub fn env_settings() -> HashMap<String, String> {
    std::env::vars()
        .filter(|(name, _)| name.starts_with(origins::ENV_PREFIX))
        .collect()
}

/// A setting given on the command line.
#[derive(Debug, Clone)]
pub struct Flag {
    /// The key it sets, e.g. `redis.url`.
    pub key: &'static str,
    /// The flag, e.g. `--redis-url`.
    pub flag: &'static str,
    /// Its value.
    pub value: String,
}

/// `url`, the value of `key`, parses as a Redis URL; the error shows it
/// with its password hidden, and the forms expected.
fn check_redis_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    if redis::Client::open(url).is_err() {
        return invalid(
            key,
            format!(
                "{:?} is not a Redis URL; expected {REDIS_URL_FORMS}",
                redact_url(url)
            ),
        );
    }
    Ok(())
}

/// The keys whose environment variables hold comma-separated lists.
const LIST_KEYS: [&str; 6] = [
    "redis.input",
    "websocket.default_symbols",
    "websocket.default_series",
    "auth.tokens",
    "redis.cluster_nodes",
    "redis.sentinels",
];

/// `value` as the type of `like`, the same key's compiled-in default:
/// text that reads as that type becomes it, lists of text are trimmed.
fn typed_like(value: config::Value, like: &config::Value) -> config::Value {
    use config::{Value, ValueKind};
    let origin = value.origin().map(str::to_owned);
    let new = |kind: ValueKind| Value::new(origin.as_ref(), kind);
    match (&like.kind, &value.kind) {
        (ValueKind::Table(template), ValueKind::Table(table)) => new(ValueKind::Table(
            table
                .iter()
                .map(|(key, value)| {
                    let typed = match template.get(key) {
                        Some(like) => typed_like(value.clone(), like),
                        None => value.clone(),
                    };
                    (key.clone(), typed)
                })
                .collect(),
        )),
        (ValueKind::I64(_) | ValueKind::U64(_), ValueKind::String(_)) => value
            .clone()
            .into_int()
            .map_or(value, |n| new(ValueKind::I64(n))),
        (ValueKind::Boolean(_), ValueKind::String(_)) => value
            .clone()
            .into_bool()
            .map_or(value, |b| new(ValueKind::Boolean(b))),
        (ValueKind::Float(_), ValueKind::String(_)) => value
            .clone()
            .into_float()
            .map_or(value, |f| new(ValueKind::Float(f))),
        (ValueKind::Array(_), ValueKind::Array(items)) => {
            let mut texts: Vec<String> = items
                .iter()
                .filter_map(|item| item.clone().into_string().ok())
                .collect();
            if texts.len() != items.len() {
                return value;
            }
            tidy(&mut texts);
            new(ValueKind::Array(
                texts
                    .into_iter()
                    .map(|text| new(ValueKind::String(text)))
                    .collect(),
            ))
        }
        _ => value,
    }
}

/// What `server.listen` takes, for its error message.
const LISTEN_FORMS: &str = "write host:port, the host an IP address or a name: 127.0.0.1:8080 (this machine only), 0.0.0.0:8080 (every interface), [::1]:8080 or localhost:8080";

/// `server.listen`: an address, or a host name and port resolved to the
/// first address it names. A port alone (`8080`, as a number or text) is
/// refused, saying which forms are taken: which interface it means is a
/// choice the operator should make.
fn listen_address<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<SocketAddr, D::Error> {
    use serde::de::Error;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Port(u64),
        Text(String),
    }
    let text = match Given::deserialize(deserializer)? {
        Given::Port(port) => {
            return Err(D::Error::custom(format!(
                "{port} is a port alone; {LISTEN_FORMS}"
            )));
        }
        Given::Text(text) => text,
    };
    let text = text.trim();
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(D::Error::custom(format!(
            "{text} is a port alone; {LISTEN_FORMS}"
        )));
    }
    let resolved = std::net::ToSocketAddrs::to_socket_addrs(text).map(|mut all| all.next());
    match resolved {
        Ok(Some(address)) => Ok(address),
        Ok(None) => Err(D::Error::custom(format!(
            "{text:?} names no address; {LISTEN_FORMS}"
        ))),
        Err(err) => Err(D::Error::custom(format!(
            "{text:?} is not an address ({err}); {LISTEN_FORMS}"
        ))),
    }
}

/// Trims every item of a list setting and drops the empty ones.
fn tidy(list: &mut Vec<String>) {
    for item in list.iter_mut() {
        if item.trim().len() != item.len() {
            *item = item.trim().to_owned();
        }
    }
    list.retain(|item| !item.is_empty());
}

/// What a Redis URL looks like, for error messages.
const REDIS_URL_FORMS: &str =
    "redis://[[user]:password@]host[:port][/db], rediss://... (TLS) or unix:///path/to/redis.sock";

/// The compiled-in defaults; every key is documented there.
pub const DEFAULTS: &str = include_str!("../../../config/default.toml");

mod explain;
mod origins;
pub mod series;
pub mod show;

pub use self::explain::redact_url;
pub use self::origins::{Origin, Origins, env_var_of};

/// Why configuration could not be loaded, on one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not TOML (`path:line:column: what`).
    #[error("invalid configuration: {0}")]
    File(String),
    /// A key is unknown, or its value has the wrong type, is not one of the
    /// allowed values, is out of range or contradicts another.
    #[error("invalid configuration: {key} (from {origin}): {message}")]
    Key {
        /// The offending key, e.g. `sma.window`.
        key: String,
        /// Where its value came from: a file, an environment variable, the defaults.
        origin: String,
        /// What is wrong with it.
        message: String,
    },
    /// A value is out of range or inconsistent, found where its origin is
    /// not known (it becomes a [`ConfigError::Key`] when loading).
    #[error("invalid configuration: {key}: {message}")]
    Invalid {
        /// The offending key, e.g. `sma.window`.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// Anything else the configuration library reported.
    #[error("invalid configuration: {0}")]
    Other(String),
}

impl ConfigError {
    /// An [`ConfigError::Invalid`] named with where its value came from.
    fn with_origin(self, origins: &Origins) -> Self {
        match self {
            ConfigError::Invalid { key, message } => ConfigError::Key {
                key: key.to_owned(),
                origin: origins.of(key).to_string(),
                message,
            },
            other => other,
        }
    }
}

/// The error for a `key` whose value is out of range or inconsistent.
fn invalid(key: &'static str, message: String) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { key, message })
}

/// `key`'s `value` must lie in `range`; the error names both ends and the value.
fn within<T>(
    key: &'static str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<(), ConfigError>
where
    T: PartialOrd + std::fmt::Display,
{
    if range.contains(&value) {
        return Ok(());
    }
    invalid(
        key,
        format!(
            "must be between {} and {} (got {value})",
            range.start(),
            range.end()
        ),
    )
}

/// All settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The `[redis]` section.
    pub redis: RedisSettings,
    /// The `[sma]` section.
    pub sma: SmaSettings,
    /// The `[websocket]` section.
    pub websocket: WebSocketSettings,
    /// The `[server]` section.
    pub server: ServerSettings,
    /// The `[auth]` section.
    pub auth: AuthSettings,
    /// The `[node]` section.
    pub node: NodeSettings,
    /// The `[[series]]` tables, as written.
    #[serde(default, rename = "series")]
    pub series_tables: Vec<series::SeriesSettings>,
    /// Those series, checked and ready to compute.
    #[serde(skip)]
    pub series: Vec<series::Series>,
    /// The series clients may name (`sma` and the `[[series]]`), and a
    /// socket's default ones.
    #[serde(skip)]
    pub catalog: Arc<series::Catalog>,
    /// Where each value came from, to name it in errors found later.
    #[serde(skip)]
    origins: Arc<Origins>,
}

/// This node's part in a deployment (see the `topology` module).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// `all`, `compute` or `gateway`.
    pub role: Role,
    /// The compute shard, `I/N`.
    pub shard: Shard,
}

/// How clients authenticate (see the `auth` module).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// `none`, `token` or `jwt`.
    pub mode: AuthMode,
    /// `CLIENT_CODE=TOKEN` entries for `token` mode.
    pub tokens: Vec<String>,
    /// `HS256`, `RS256` or `ES256`.
    pub jwt_algorithm: String,
    /// The HS256 secret.
    pub jwt_secret: String,
    /// PEM public key file for RS256/ES256.
    pub jwt_public_key_file: String,
    /// Allowed clock skew for `exp` and `nbf`, in seconds.
    pub jwt_leeway_seconds: u64,
    /// When set, a JWT's `iss` must equal it.
    pub jwt_issuer: String,
    /// When set, a JWT's `aud` must include it; when empty, a JWT that names
    /// an audience is refused.
    pub jwt_audience: String,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens and secrets never reach a log line.
        f.debug_struct("AuthSettings")
            .field("mode", &self.mode)
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .field("jwt_algorithm", &self.jwt_algorithm)
            .field("jwt_secret", &"<redacted>")
            .field("jwt_public_key_file", &self.jwt_public_key_file)
            .field("jwt_leeway_seconds", &self.jwt_leeway_seconds)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .finish()
    }
}

/// The authentication modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No authentication.
    None,
    /// A fixed token per client code.
    Token,
    /// Signed JWTs.
    Jwt,
}

/// How quotes arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InputMode {
    /// Redis pub/sub channels: at most once.
    #[serde(rename = "pubsub")]
    #[value(name = "pubsub")]
    PubSub,
    /// A Redis stream read through a consumer group: nothing lost.
    Stream,
}

/// What becomes of a socket that falls behind its send queue's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumer {
    /// Keep it, with the latest result of each key: it is never stale and
    /// never cut off for being slow.
    Conflate,
    /// Close it with 1008 "slow consumer".
    Close,
}

/// Where quotes come from and where results go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// Redis URL.
    pub url: String,
    /// Pub/sub or stream input.
    pub input_mode: InputMode,
    /// Input channels and patterns.
    pub input: Vec<String>,
    /// Output channel name, optionally containing `{symbol}`.
    pub output: String,
    /// Channel for rejected input; empty disables it.
    pub rejected: String,
    /// Prefix of the per-client direct channels.
    pub direct_prefix: String,
    /// Most SMA messages waiting to be published.
    pub publish_queue: usize,
    /// First reconnect delay, in milliseconds.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, in milliseconds.
    pub reconnect_max_ms: u64,
    /// Time between health-check PINGs on the subscriber connection, in milliseconds.
    pub health_check_interval_ms: u64,
    /// Longest wait for a health-check answer, in milliseconds.
    pub health_check_timeout_ms: u64,
    /// Most messages the subscription holds for a listener that is behind.
    pub subscription_buffer: usize,
    /// Most bytes likewise (payloads, channel names and 128 a message).
    pub subscription_buffer_bytes: usize,
    /// Stream mode: the input stream key.
    pub input_stream: String,
    /// Stream mode: the consumer group.
    pub consumer_group: String,
    /// Stream mode: this consumer's name.
    pub consumer_name: String,
    /// Stream mode: entries per batch.
    pub stream_batch: usize,
    /// Stream mode: idle time before another consumer's entries are claimed, in milliseconds.
    pub claim_idle_ms: u64,
    /// Stream mode: output stream key, or empty to PUBLISH on `output`.
    pub output_stream: String,
    /// Stream mode: approximate length of the output stream.
    pub output_stream_maxlen: usize,
    /// Stream mode: the hash of window states.
    pub state_key: String,
    /// The hash of the latest public result per symbol, which compute nodes
    /// write and gateways read for snapshots.
    pub snapshot_key: String,
    /// Redis Cluster seed nodes; empty for a single server at `url`.
    pub cluster_nodes: Vec<String>,
    /// Cluster only: sharded channels per input/output channel.
    pub partitions: u32,
    /// `rediss://` only: PEM CA certificates the server's must chain to;
    /// empty: the system's roots.
    pub tls_ca_file: String,
    /// `rediss://` only: the client certificate (PEM) for mutual TLS.
    pub tls_cert_file: String,
    /// `rediss://` only: its private key (PEM).
    pub tls_key_file: String,
    /// `rediss://` only: accept any server certificate (test setups only).
    pub tls_insecure: bool,
    /// Redis Sentinel addresses (`host:port`); non-empty: connect to the
    /// primary they name, following failovers.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary by.
    pub sentinel_master: String,
}

impl RedisSettings {
    /// The TLS files of a `rediss://` URL or cluster.
    #[must_use]
    pub fn tls_files(&self) -> crate::broker::TlsFiles {
        let path = |value: &str| (!value.is_empty()).then(|| value.into());
        crate::broker::TlsFiles {
            ca_file: path(&self.tls_ca_file),
            cert_file: path(&self.tls_cert_file),
            key_file: path(&self.tls_key_file),
            insecure: self.tls_insecure,
        }
    }
}

/// The moving average.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmaSettings {
    /// Prices per average.
    pub window: usize,
    /// Emit before the window is full.
    pub emit_partial: bool,
    /// Most distinct (client, symbol) keys alive at once.
    pub max_keys: usize,
    /// A key with no quote for this long is released, in milliseconds.
    pub key_idle_ms: u64,
}

/// WebSocket clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketSettings {
    /// A new socket's subscriptions.
    pub default_symbols: Vec<String>,
    /// The series a socket's subscriptions name when it names none (`sma`:
    /// the `[sma]` section's).
    pub default_series: Vec<String>,
    /// Most frames queued for one socket before it is closed as a slow consumer.
    pub send_queue: usize,
    /// Most bytes queued for one socket before it is closed as a slow consumer.
    pub send_queue_bytes: usize,
    /// Conflate or close a socket past those bounds.
    pub slow_consumer: SlowConsumer,
    /// Most subscriptions per socket.
    pub max_symbols: usize,
    /// Frames the resumes of one client code may send a second (each key a
    /// resume names counts as one).
    pub resume_frames_per_second: usize,
    /// Largest client frame, in bytes.
    pub max_message_bytes: usize,
    /// Most client frames per second.
    pub client_messages_per_second: u32,
    /// Keepalive ping period, in milliseconds.
    pub ping_interval_ms: u64,
    /// How long a write to a socket may wait, in milliseconds.
    pub write_timeout_ms: u64,
    /// How long a socket opened to resume waits for its request, in milliseconds.
    pub resume_wait_ms: u64,
    /// Results kept per key for sockets that resume.
    pub history_size: usize,
    /// Bytes the kept results may take in all.
    pub history_bytes: usize,
}

/// The HTTP server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Listen address for HTTP and WebSocket: `host:port`, the host an IP
    /// address or a name (resolved when the settings are read).
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    /// Most concurrent WebSocket connections.
    pub max_connections: usize,
    /// Most concurrent WebSocket connections per client code.
    pub max_connections_per_client: usize,
    /// New WebSocket connections per client code a second, after a burst.
    pub connects_per_client_per_second: usize,
    /// Seconds allowed for a clean shutdown.
    pub shutdown_timeout: u64,
    /// Milliseconds a connection may take to send a request's head (line
    /// and headers); slower connections are closed.
    pub header_read_timeout_ms: u64,
    /// Milliseconds a plain request has, after its head, to be answered and read.
    pub answer_timeout_ms: u64,
    /// Most connections accepted whose first request has not arrived whole;
    /// further clients wait in the kernel's backlog.
    pub max_pending_connections: usize,
}

impl Settings {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, None)
    }

    /// Like [`Settings::load`], with command-line flags over everything:
    /// each sets its key as its variable would, and errors and `config
    /// show` name the flag.
    pub fn load_with_flags(file: Option<&Path>, flags: &[Flag]) -> Result<Self, ConfigError> {
        let (env, origins) = Self::inputs(file, flags);
        let mut settings =
            Self::load_from(file, env, &origins).map_err(|err| err.with_origin(&origins))?;
        settings.origins = Arc::new(origins);
        Ok(settings)
    }

    /// The environment with `flags` over it, and where each key came from.
    pub fn inputs(file: Option<&Path>, flags: &[Flag]) -> (HashMap<String, String>, Origins) {
        let mut env = env_settings();
        for flag in flags {
            let var = format!(
                "{}__{}",
                origins::ENV_PREFIX,
                flag.key.replace('.', "__").to_uppercase()
            );
            env.insert(var, flag.value.clone());
        }
        let mut origins = Origins::new(file, &env);
        for flag in flags {
            origins.set_flag(flag.key, flag.flag);
        }
        (env, origins)
    }

    /// Like [`Settings::load`], with the environment given as a map (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let env = env.unwrap_or_else(env_settings);
        let origins = Origins::new(file, &env);
        let mut settings =
            Self::load_from(file, env, &origins).map_err(|err| err.with_origin(&origins))?;
        settings.origins = Arc::new(origins);
        Ok(settings)
    }

    /// `err`, about one of these settings, naming where its value came
    /// from: for what is checked where it is used (the `[auth]` keys, when
    /// the authenticator is built).
    #[must_use]
    pub fn named(&self, err: ConfigError) -> ConfigError {
        err.with_origin(&self.origins)
    }

    /// The merged sources as the settings read them: what `config show`
    /// prints. Each value has its key's type (a variable's `20` is the
    /// number 20, `true` the boolean), and lists are trimmed as loading
    /// trims them. The settings are checked first, so what is shown is
    /// what would run.
    pub fn merged(
        file: Option<&Path>,
        env: HashMap<String, String>,
        origins: &Origins,
    ) -> Result<config::Map<String, config::Value>, ConfigError> {
        Self::load_from(file, env.clone(), origins).map_err(|err| err.with_origin(origins))?;
        let read = |sources: Result<
            config::ConfigBuilder<config::builder::DefaultState>,
            config::ConfigError,
        >| {
            sources
                .and_then(|sources| sources.build())
                .and_then(|merged| merged.try_deserialize::<config::Map<String, config::Value>>())
                .map_err(|err| explain::explain(err, file, origins))
        };
        let template = read(Self::sources(None, HashMap::new()))?;
        let merged = read(Self::sources(file, env))?;
        Ok(merged
            .into_iter()
            .map(|(key, value)| {
                let typed = match template.get(&key) {
                    Some(like) => typed_like(value, like),
                    None => value,
                };
                (key, typed)
            })
            .collect())
    }

    /// The defaults, then the file, then the environment. A variable's
    /// value stays the string it is (the config crate's `try_parsing` would
    /// read a secret of digits as a number and drop its leading zeros); the
    /// keys of lists split it at commas.
    fn sources(
        file: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<config::ConfigBuilder<config::builder::DefaultState>, config::ConfigError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).format(FileFormat::Toml));
        }
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter_map(|(var, value)| Some((origins::key_of_env(&var)?, value)))
            .collect();
        vars.sort();
        for (key, value) in vars {
            builder = if LIST_KEYS.contains(&key.as_str()) {
                let items: Vec<String> = value.split(',').map(str::to_owned).collect();
                // Trimmed below, with the file's lists.
                builder.set_override(key, items)?
            } else {
                builder.set_override(key, value)?
            };
        }
        Ok(builder)
    }

    fn load_from(
        file: Option<&Path>,
        env: HashMap<String, String>,
        origins: &Origins,
    ) -> Result<Self, ConfigError> {
        let mut settings: Settings = Self::sources(file, env)
            .and_then(|sources| sources.build())
            .and_then(Config::try_deserialize)
            .map_err(|err| explain::explain(err, file, origins))?;
        // Every list, from the environment or a file, the same way: items
        // trimmed (`quotes, ticks.*` is two channels, not " ticks.*", which
        // nothing would match), empty ones dropped
        // (`QUOTEBRIDGE__WEBSOCKET__DEFAULT_SYMBOLS=` means "none").
        for list in [
            &mut settings.redis.input,
            &mut settings.websocket.default_symbols,
            &mut settings.websocket.default_series,
            &mut settings.auth.tokens,
            &mut settings.redis.cluster_nodes,
        ] {
            tidy(list);
        }
        settings.validate()?;
        let tables = std::mem::take(&mut settings.series_tables);
        settings.with_series(tables)
    }

    /// These settings with `tables` as their `[[series]]`, checked as a
    /// configuration file's are (the demo's, when none are configured).
    pub fn with_series(mut self, tables: Vec<series::SeriesSettings>) -> Result<Self, ConfigError> {
        self.series = series::resolve(&tables, &self.redis)?;
        self.series_tables = tables;
        self.catalog = Arc::new(series::Catalog::new(
            &self.series,
            &self.websocket.default_series,
            &self.websocket.default_symbols,
        )?);
        if self.catalog.initial().len() > self.websocket.max_symbols {
            return Err(ConfigError::Invalid {
                key: "websocket.max_symbols",
                message: "must be at least the number of default_symbols times default_series"
                    .into(),
            });
        }
        Ok(self)
    }

    /// The compiled-in defaults alone.
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::load_with_env(None, Some(HashMap::new()))
    }

    /// Every section's own checks, then those that span sections.
    fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()?;
        self.validate_topology()?;
        self.sma.validate()?;
        self.websocket.validate()?;
        self.server.validate()
    }

    /// These settings with the command line's `--role` and `--shard`, checked again.
    pub fn with_node(
        mut self,
        role: Option<Role>,
        shard: Option<Shard>,
    ) -> Result<Self, ConfigError> {
        self.node.role = role.unwrap_or(self.node.role);
        self.node.shard = shard.unwrap_or(self.node.shard);
        self.validate()?;
        Ok(self)
    }

    /// The `[node]` keys and the cluster keys of `[redis]`, which constrain each other.
    fn validate_topology(&self) -> Result<(), ConfigError> {
        let (redis, node) = (&self.redis, &self.node);
        if node.shard.count() > 1 && node.role != Role::Compute {
            return invalid(
                "node.shard",
                format!(
                    "only compute nodes split the symbols (node.role is {}); use --role compute",
                    node.role
                ),
            );
        }
        if redis.snapshot_key.is_empty() {
            return invalid("redis.snapshot_key", "must not be empty".into());
        }
        if node.role == Role::Gateway && !redis.output_stream.is_empty() {
            return invalid(
                "redis.output_stream",
                "gateways follow results on the redis.output channel; leave output_stream empty"
                    .into(),
            );
        }
        if redis.cluster_nodes.is_empty() {
            return Ok(());
        }
        for url in &redis.cluster_nodes {
            check_redis_url("redis.cluster_nodes", url)?;
        }
        if let Err(err) = redis::cluster::ClusterClient::new(redis.cluster_nodes.clone()) {
            return invalid(
                "redis.cluster_nodes",
                format!("not usable as cluster seeds: {err}"),
            );
        }
        if !(1..=1024).contains(&redis.partitions) {
            return invalid("redis.partitions", "must be between 1 and 1024".into());
        }
        if redis.partitions % node.shard.count() != 0 {
            return invalid(
                "redis.partitions",
                format!(
                    "must be a multiple of the shard count {} so each partition has one shard",
                    node.shard.count()
                ),
            );
        }
        if redis.input_mode == InputMode::Stream {
            return invalid(
                "redis.input_mode",
                "stream mode needs a single Redis server (its MULTI/EXEC spans keys in many slots)"
                    .into(),
            );
        }
        if let Some(pattern) = redis.input.iter().find(|name| is_pattern(name)) {
            return invalid(
                "redis.input",
                format!("{pattern:?} is a pattern; sharded pub/sub on a cluster has none"),
            );
        }
        if redis.output.contains("{symbol}") {
            return invalid(
                "redis.output",
                "{symbol} is not supported on a cluster: results go to partitioned channels".into(),
            );
        }
        // The bridge adds the hash tag `{p}`; another brace would move the
        // slot and split a partition's channel from its snapshot hash.
        for (key, name) in [
            ("redis.output", &redis.output),
            ("redis.snapshot_key", &redis.snapshot_key),
            ("redis.rejected", &redis.rejected),
        ]
        .into_iter()
        .chain(redis.input.iter().map(|name| ("redis.input", name)))
        {
            if name.contains(['{', '}']) {
                return invalid(
                    key,
                    format!(
                        "{name:?}: braces are Redis Cluster hash tags, which the bridge sets itself"
                    ),
                );
            }
        }
        Ok(())
    }

    /// The SMA window as the type the window wants.
    #[must_use]
    pub fn window(&self) -> NonZeroUsize {
        // validate() guarantees 1..=10000.
        NonZeroUsize::new(self.sma.window).unwrap_or(NonZeroUsize::MIN)
    }

    /// The reconnect backoff for Redis.
    #[must_use]
    pub fn reconnect_backoff(&self) -> Backoff {
        Backoff::new(
            Duration::from_millis(self.redis.reconnect_min_ms),
            Duration::from_millis(self.redis.reconnect_max_ms),
        )
    }

    /// What a Redis subscription may hold for a listener that is behind.
    #[must_use]
    pub fn subscription_buffer(&self) -> SubscriptionBuffer {
        SubscriptionBuffer {
            messages: self.redis.subscription_buffer,
            bytes: self.redis.subscription_buffer_bytes,
        }
    }

    /// The health check for the Redis subscriber connection.
    #[must_use]
    pub fn health_check(&self) -> HealthCheck {
        HealthCheck {
            interval: Duration::from_millis(self.redis.health_check_interval_ms),
            timeout: Duration::from_millis(self.redis.health_check_timeout_ms),
        }
    }

    /// Time a connection has to send a request head.
    #[must_use]
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.server.header_read_timeout_ms)
    }

    /// How often idle keys are looked for: `sma.key_idle_ms` in
    /// [`SWEEPS_PER_IDLE`](crate::idle::SWEEPS_PER_IDLE) parts.
    #[must_use]
    pub fn key_sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sma.key_idle_ms) / crate::idle::SWEEPS_PER_IDLE
    }

    /// Time allowed for a clean shutdown.
    #[must_use]
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.server.shutdown_timeout)
    }
}

impl RedisSettings {
    /// The channels and keys these settings name.
    #[must_use]
    pub fn channels(&self) -> Channels {
        Channels::new(ChannelNames {
            input: &self.input,
            output: &self.output,
            rejected: &self.rejected,
            direct_prefix: &self.direct_prefix,
            snapshot_key: &self.snapshot_key,
            partitions: (!self.cluster_nodes.is_empty()).then_some(self.partitions),
        })
    }
}

impl RedisSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        check_redis_url("redis.url", &self.url)?;
        if !self.sentinels.is_empty() {
            if !self.cluster_nodes.is_empty() {
                return invalid(
                    "redis.sentinels",
                    "a Redis Cluster fails over by itself; set redis.sentinels or redis.cluster_nodes, not both".into(),
                );
            }
            if self.sentinel_master.is_empty() {
                return invalid(
                    "redis.sentinel_master",
                    "must name the primary the sentinels monitor".into(),
                );
            }
            if let Err(err) = crate::broker::Sentinels::new(&self.sentinels, &self.sentinel_master)
            {
                return invalid(
                    "redis.sentinels",
                    format!("expected host:port entries: {err}"),
                );
            }
        }
        let tls = |url: &String| crate::broker::is_tls_url(url);
        let uses_tls = if self.cluster_nodes.is_empty() {
            tls(&self.url)
        } else {
            self.cluster_nodes.iter().any(tls)
        };
        let files = self.tls_files();
        if !uses_tls && files != crate::broker::TlsFiles::default() {
            let key = [
                ("redis.tls_ca_file", files.ca_file.is_some()),
                ("redis.tls_cert_file", files.cert_file.is_some()),
                ("redis.tls_key_file", files.key_file.is_some()),
                ("redis.tls_insecure", files.insecure),
            ]
            .into_iter()
            .find_map(|(key, set)| set.then_some(key))
            .unwrap_or("redis.tls_ca_file");
            return invalid(
                key,
                "is for TLS, which a rediss:// URL turns on; redis.url (or every redis.cluster_nodes entry) is redis:// here".into(),
            );
        }
        if self.input.is_empty() || self.input.iter().any(String::is_empty) {
            return invalid(
                "redis.input",
                "must list at least one non-empty channel".into(),
            );
        }
        if self.direct_prefix.is_empty() || is_pattern(&self.direct_prefix) {
            return invalid(
                "redis.direct_prefix",
                "must be non-empty and contain none of * ? [".into(),
            );
        }
        if let Some(ch) = self
            .input
            .iter()
            .find(|ch| !is_pattern(ch) && ch.starts_with(&self.direct_prefix))
        {
            return invalid(
                "redis.input",
                format!(
                    "channel {ch:?} starts with redis.direct_prefix {:?}",
                    self.direct_prefix
                ),
            );
        }
        if self.output.is_empty() {
            return invalid("redis.output", "must not be empty".into());
        }
        if self.input.contains(&self.output) {
            return invalid(
                "redis.output",
                "must differ from every input channel (the bridge would read its own output)"
                    .into(),
            );
        }
        if !self.rejected.is_empty() && self.input.contains(&self.rejected) {
            return invalid(
                "redis.rejected",
                "must differ from every input channel".into(),
            );
        }
        if self.publish_queue == 0 {
            return invalid("redis.publish_queue", "must be at least 1".into());
        }
        if self.input_mode == InputMode::Stream {
            for (key, value) in [
                ("redis.input_stream", &self.input_stream),
                ("redis.consumer_group", &self.consumer_group),
                ("redis.consumer_name", &self.consumer_name),
                ("redis.state_key", &self.state_key),
            ] {
                if value.is_empty() {
                    return invalid(key, "must not be empty in stream mode".into());
                }
            }
            if !(1..=100_000).contains(&self.stream_batch) {
                return invalid("redis.stream_batch", "must be between 1 and 100000".into());
            }
            if self.output_stream == self.input_stream {
                return invalid(
                    "redis.output_stream",
                    "must differ from redis.input_stream".into(),
                );
            }
        }
        if self.reconnect_min_ms == 0 {
            return invalid("redis.reconnect_min_ms", "must be at least 1".into());
        }
        if self.reconnect_max_ms < self.reconnect_min_ms {
            return invalid(
                "redis.reconnect_max_ms",
                "must be at least redis.reconnect_min_ms".into(),
            );
        }
        if self.health_check_interval_ms == 0 {
            return invalid(
                "redis.health_check_interval_ms",
                "must be at least 1".into(),
            );
        }
        if self.subscription_buffer == 0 {
            return invalid("redis.subscription_buffer", "must be at least 1".into());
        }
        if self.subscription_buffer_bytes < 1 << 20 {
            return invalid(
                "redis.subscription_buffer_bytes",
                "must be at least 1048576".into(),
            );
        }
        if self.health_check_timeout_ms == 0 {
            return invalid("redis.health_check_timeout_ms", "must be at least 1".into());
        }
        Ok(())
    }
}

impl SmaSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        within("sma.window", self.window, 1..=crate::protocol::MAX_WINDOW)?;
        if self.max_keys == 0 {
            return invalid("sma.max_keys", "must be at least 1".into());
        }
        within("sma.key_idle_ms", self.key_idle_ms, 100..=31_536_000_000)?;
        Ok(())
    }
}

impl WebSocketSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(bad) = self
            .default_symbols
            .iter()
            .find(|s| !names::is_subscription(s))
        {
            return invalid(
                "websocket.default_symbols",
                format!(
                    "{bad:?} is neither \"*\" nor a symbol of 1-32 characters from [A-Za-z0-9._:/-]"
                ),
            );
        }
        if self.send_queue == 0 {
            return invalid("websocket.send_queue", "must be at least 1".into());
        }
        if self.send_queue_bytes < self.max_message_bytes.min(65_536) {
            return invalid(
                "websocket.send_queue_bytes",
                "must be at least 65536 (or websocket.max_message_bytes if smaller)".into(),
            );
        }
        if self.client_messages_per_second == 0 {
            return invalid(
                "websocket.client_messages_per_second",
                "must be at least 1".into(),
            );
        }
        if self.ping_interval_ms < 10 {
            return invalid("websocket.ping_interval_ms", "must be at least 10".into());
        }
        within(
            "websocket.resume_wait_ms",
            self.resume_wait_ms,
            100..=600_000,
        )?;
        within(
            "websocket.write_timeout_ms",
            self.write_timeout_ms,
            100..=600_000,
        )?;
        if self.max_symbols == 0 || self.default_symbols.len() > self.max_symbols {
            return invalid(
                "websocket.max_symbols",
                "must be at least 1 and at least the number of default_symbols".into(),
            );
        }
        if self.max_message_bytes < 256 {
            return invalid("websocket.max_message_bytes", "must be at least 256".into());
        }
        if self.history_bytes < 65_536 {
            return invalid(
                "websocket.history_bytes",
                format!("must be at least 65536 (got {})", self.history_bytes),
            );
        }
        within("websocket.history_size", self.history_size, 1..=1_000_000)?;
        within(
            "websocket.resume_frames_per_second",
            self.resume_frames_per_second,
            1..=100_000_000,
        )?;
        Ok(())
    }
}

impl ServerSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return invalid("server.max_connections", "must be at least 1".into());
        }
        if self.max_pending_connections == 0 {
            return invalid(
                "server.max_pending_connections",
                "must be at least 1".into(),
            );
        }
        within(
            "server.header_read_timeout_ms",
            self.header_read_timeout_ms,
            100..=600_000,
        )?;
        if self.max_connections_per_client == 0 {
            return invalid(
                "server.max_connections_per_client",
                "must be at least 1".into(),
            );
        }
        within(
            "server.answer_timeout_ms",
            self.answer_timeout_ms,
            100..=600_000,
        )?;
        within(
            "server.connects_per_client_per_second",
            self.connects_per_client_per_second,
            1..=1_000_000,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn error_with_env(pairs: &[(&str, &str)]) -> String {
        Settings::load_with_env(None, env(pairs))
            .expect_err("configuration should be invalid")
            .to_string()
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::defaults().expect("defaults are valid");
        assert_eq!(s.redis.url, "redis://127.0.0.1:6379");
        assert_eq!(s.redis.input, vec!["quotes"]);
        assert_eq!(s.redis.output, "sma");
        assert_eq!(s.redis.rejected, "quotes.rejected");
        assert_eq!(s.redis.direct_prefix, "client.");
        assert_eq!(s.sma.window, 10);
        assert!(!s.sma.emit_partial);
        assert_eq!(s.websocket.default_symbols, vec!["*"]);
        assert_eq!(s.server.listen, "127.0.0.1:8080".parse().expect("address"));
    }

    #[test]
    fn environment_overrides_with_comma_separated_lists() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("QUOTEBRIDGE__REDIS__URL", "redis://10.0.0.1:6380/2"),
                ("QUOTEBRIDGE__REDIS__INPUT", "quotes,ticks.*"),
                ("QUOTEBRIDGE__SMA__WINDOW", "25"),
                ("QUOTEBRIDGE__SMA__EMIT_PARTIAL", "true"),
                ("QUOTEBRIDGE__WEBSOCKET__DEFAULT_SYMBOLS", "AAPL,MSFT"),
                ("QUOTEBRIDGE__SERVER__LISTEN", "0.0.0.0:9000"),
            ]),
        )
        .expect("valid");
        assert_eq!(s.redis.url, "redis://10.0.0.1:6380/2");
        assert_eq!(s.redis.input, vec!["quotes", "ticks.*"]);
        assert_eq!(s.sma.window, 25);
        assert!(s.sma.emit_partial);
        assert_eq!(s.websocket.default_symbols, vec!["AAPL", "MSFT"]);
        assert_eq!(s.server.listen.port(), 9000);
    }

    #[test]
    fn file_overrides_defaults_and_environment_overrides_file() {
        let path =
            std::env::temp_dir().join(format!("quotebridge-config-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "[sma]\nwindow = 3\n[redis]\noutput = \"sma.{symbol}\"\n",
        )
        .expect("write temp config");
        let loaded =
            Settings::load_with_env(Some(&path), env(&[("QUOTEBRIDGE__SMA__WINDOW", "4")]));
        std::fs::remove_file(&path).ok();
        let s = loaded.expect("valid");
        assert_eq!(s.sma.window, 4);
        assert_eq!(s.redis.output, "sma.{symbol}");
    }

    #[test]
    fn window_out_of_range_names_the_key() {
        let err = error_with_env(&[("QUOTEBRIDGE__SMA__WINDOW", "0")]);
        assert!(err.contains("sma.window"), "{err}");
        let err = error_with_env(&[("QUOTEBRIDGE__SMA__WINDOW", "10001")]);
        assert!(err.contains("sma.window"), "{err}");
        let err = error_with_env(&[("QUOTEBRIDGE__SMA__WINDOW", "ten")]);
        assert!(err.contains("sma.window"), "{err}");
    }

    #[test]
    fn bad_url_and_listen_name_their_keys() {
        let err = error_with_env(&[("QUOTEBRIDGE__REDIS__URL", "http://nope")]);
        assert!(err.contains("redis.url"), "{err}");
        let err = error_with_env(&[("QUOTEBRIDGE__SERVER__LISTEN", "localhost")]);
        assert!(err.contains("server.listen"), "{err}");
    }

    #[test]
    fn every_list_is_trimmed_from_the_environment_and_from_files() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("QUOTEBRIDGE__REDIS__INPUT", "quotes, ticks.* ,"),
                ("QUOTEBRIDGE__WEBSOCKET__DEFAULT_SYMBOLS", " AAPL , MSFT"),
                ("QUOTEBRIDGE__AUTH__TOKENS", "alpha, beta"),
            ]),
        )
        .expect("valid");
        assert_eq!(s.redis.input, ["quotes", "ticks.*"]);
        assert_eq!(s.websocket.default_symbols, ["AAPL", "MSFT"]);
        assert_eq!(s.auth.tokens, ["alpha", "beta"]);
        let path =
            std::env::temp_dir().join(format!("quotebridge-lists-{}.toml", std::process::id()));
        std::fs::write(&path, "[redis]\ninput = [\"quotes \", \" ticks.*\"]\n").expect("write");
        let loaded = Settings::load_with_env(Some(&path), env(&[]));
        std::fs::remove_file(&path).ok();
        assert_eq!(loaded.expect("valid").redis.input, ["quotes", "ticks.*"]);
    }

    #[test]
    fn whole_numbers_out_of_their_type_say_the_bound() {
        let err = error_with_env(&[("QUOTEBRIDGE__SMA__WINDOW", "-5")]);
        assert!(
            err.contains("sma.window") && err.ends_with("must not be negative (got -5)"),
            "{err}"
        );
        let err = error_with_env(&[(
            "QUOTEBRIDGE__WEBSOCKET__CLIENT_MESSAGES_PER_SECOND",
            "99999999999",
        )]);
        assert!(
            err.ends_with("must be at most 4294967295 (got 99999999999)"),
            "{err}"
        );
        let err = error_with_env(&[("QUOTEBRIDGE__SMA__WINDOW", "ten")]);
        assert!(
            err.ends_with(r#"expected an integer, got string "ten""#),
            "{err}"
        );
    }

    #[test]
    fn listen_takes_host_names_and_says_which_forms_it_takes() {
        let s = Settings::load_with_env(
            None,
            env(&[("QUOTEBRIDGE__SERVER__LISTEN", "localhost:9001")]),
        )
        .expect("a host name resolves");
        assert!(s.server.listen.ip().is_loopback(), "{}", s.server.listen);
        assert_eq!(s.server.listen.port(), 9001);
        let err = error_with_env(&[("QUOTEBRIDGE__SERVER__LISTEN", "8080")]);
        assert!(
            err.contains("8080 is a port alone") && err.contains("0.0.0.0:8080"),
            "{err}"
        );
    }

    #[test]
    fn merged_settings_have_their_keys_types() {
        let env = env(&[
            ("QUOTEBRIDGE__SMA__WINDOW", "20"),
            ("QUOTEBRIDGE__SMA__EMIT_PARTIAL", "true"),
            ("QUOTEBRIDGE__REDIS__INPUT", "quotes, ticks.*"),
        ])
        .expect("pairs");
        let origins = Origins::new(None, &env);
        let merged = Settings::merged(None, env, &origins).expect("valid");
        let sma = merged["sma"].clone().into_table().expect("a table");
        assert_eq!(sma["window"].kind, config::ValueKind::I64(20));
        assert_eq!(sma["emit_partial"].kind, config::ValueKind::Boolean(true));
        let redis = merged["redis"].clone().into_table().expect("a table");
        let input: Vec<String> = redis["input"]
            .clone()
            .into_array()
            .expect("a list")
            .into_iter()
            .map(|item| item.into_string().expect("text"))
            .collect();
        assert_eq!(input, ["quotes", "ticks.*"]);
    }

    #[test]
    fn unknown_section_and_key_are_errors() {
        let err = error_with_env(&[("QUOTEBRIDGE__BOGUS__KEY", "1")]);
        assert!(err.contains("bogus"), "{err}");
        let err = error_with_env(&[("QUOTEBRIDGE__SMA__WINDOWS", "1")]);
        assert!(err.contains("windows"), "{err}");
    }

    #[test]
    fn inconsistent_channels_are_errors() {
        let err = error_with_env(&[("QUOTEBRIDGE__REDIS__OUTPUT", "quotes")]);
        assert!(err.contains("redis.output"), "{err}");
        let err = error_with_env(&[("QUOTEBRIDGE__REDIS__INPUT", "client.x")]);
        assert!(err.contains("redis.input"), "{err}");
        let err = error_with_env(&[("QUOTEBRIDGE__REDIS__DIRECT_PREFIX", "c*")]);
        assert!(err.contains("redis.direct_prefix"), "{err}");
        let err = error_with_env(&[("QUOTEBRIDGE__WEBSOCKET__DEFAULT_SYMBOLS", "A B")]);
        assert!(err.contains("websocket.default_symbols"), "{err}");
    }

    #[test]
    fn patterns() {
        assert!(is_pattern("quotes.*"));
        assert!(is_pattern("q?"));
        assert!(is_pattern("q[ab]"));
        assert!(!is_pattern("quotes"));
    }

    #[test]
    fn node_role_and_shard() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("QUOTEBRIDGE__NODE__ROLE", "compute"),
                ("QUOTEBRIDGE__NODE__SHARD", "1/2"),
            ]),
        )
        .expect("valid");
        assert_eq!(s.node.role, Role::Compute);
        assert_eq!(s.node.shard.to_string(), "1/2");
        let defaults = Settings::defaults().expect("defaults");
        assert_eq!(
            (defaults.node.role, defaults.node.shard),
            (Role::All, Shard::WHOLE)
        );

        assert!(error_with_env(&[("QUOTEBRIDGE__NODE__SHARD", "0/2")]).contains("node.shard"));
        assert!(error_with_env(&[("QUOTEBRIDGE__NODE__SHARD", "2/2")]).contains("I/N"));
        assert!(error_with_env(&[("QUOTEBRIDGE__NODE__ROLE", "edge")]).contains("edge"));
    }

    #[test]
    fn cluster_settings_are_checked_together() {
        let cluster = (
            "QUOTEBRIDGE__REDIS__CLUSTER_NODES",
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
        );
        let s = Settings::load_with_env(None, env(&[cluster])).expect("valid");
        assert_eq!(s.redis.cluster_nodes.len(), 2);
        for (pairs, key) in [
            (
                vec![("QUOTEBRIDGE__REDIS__PARTITIONS", "0")],
                "redis.partitions",
            ),
            (
                vec![
                    ("QUOTEBRIDGE__REDIS__PARTITIONS", "5"),
                    ("QUOTEBRIDGE__NODE__ROLE", "compute"),
                    ("QUOTEBRIDGE__NODE__SHARD", "0/2"),
                ],
                "redis.partitions",
            ),
            (
                vec![("QUOTEBRIDGE__REDIS__INPUT", "quotes.*")],
                "redis.input",
            ),
            (
                vec![("QUOTEBRIDGE__REDIS__OUTPUT", "sma.{symbol}")],
                "redis.output",
            ),
            (
                vec![("QUOTEBRIDGE__REDIS__INPUT_MODE", "stream")],
                "redis.input_mode",
            ),
            (
                vec![("QUOTEBRIDGE__REDIS__SNAPSHOT_KEY", "latest{x}")],
                "redis.snapshot_key",
            ),
            (vec![("QUOTEBRIDGE__REDIS__INPUT", "q{1}")], "redis.input"),
        ] {
            let mut pairs = pairs;
            pairs.push(cluster);
            assert!(error_with_env(&pairs).contains(key), "{key} refused");
        }
    }
}
