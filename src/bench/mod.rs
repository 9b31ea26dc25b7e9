//! `quotebridge bench`: the project's own benchmark.
//!
//! It starts what it needs — a throwaway redis-server on a free port unless
//! `--redis` names one, the bridge in-process (or, to measure its memory
//! alone, as a child process) — drives it, and reports a table or JSON.
//! docs/BENCHMARKS.md records the results and how they were produced.
//!
//! Latency is measured on one clock: the benchmark stamps each quote's `ts`
//! with its own nanosecond clock at publish time (the bridge passes `ts`
//! through untouched) and subtracts it on arrival.

mod abuse;
mod clients;
mod connections;
pub mod environment;
pub(crate) mod fanout;
mod ingest;
mod latency;
mod micro;
mod resume;
mod series;
mod soak;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Serialize;

use self::clients::RedisAt;
pub use self::environment::Environment;
use crate::Error;
use crate::topology::Role;

/// One benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Quotes/s end to end through the bridge, against the Redis ceiling.
    Ingest,
    /// Publish → output channel and → socket latency at fixed rates.
    Latency,
    /// Frames/s delivered to many sockets in many groups.
    Fanout,
    /// Memory per idle socket.
    Connections,
    /// Fan-out with a share of the sockets never reading: what the others get.
    SlowFanout,
    /// Time to send missed results to many sockets resuming at once.
    Resume,
    /// Parse + SMA + serialize per quote, no I/O.
    Micro,
    /// An honest reader's latency, quiet and while one client abuses
    /// requests within its limits (not in the default run: about half a
    /// minute at `--seconds 5`).
    Abuse,
    /// Resident memory under steady load for minutes, nobody scraping
    /// `/metrics` (not in the default run: `--soak-seconds`, 120).
    Soak,
    /// What each indicator kind costs per quote, computation alone.
    Series,
}

/// What to run, and how big.
#[derive(Debug, Clone)]
pub struct Options {
    /// Scenarios, in order.
    pub scenarios: Vec<Scenario>,
    /// Redis to use; `None` starts a throwaway redis-server.
    pub redis_url: Option<String>,
    /// TLS for a `rediss://` `redis_url` (the `redis.tls_*` settings).
    pub redis_tls: crate::broker::TlsFiles,
    /// Ingest: quotes to push.
    pub quotes: usize,
    /// Ingest and latency: distinct symbols.
    pub symbols: usize,
    /// Latency: input rates, quotes/s.
    pub rates: Vec<u64>,
    /// Latency: sockets receiving every public SMA.
    pub latency_sockets: usize,
    /// Latency: seconds per rate.
    pub seconds: f64,
    /// Fan-out: socket counts to try.
    pub fanout_sockets: Vec<usize>,
    /// Fan-out: client groups the sockets are spread over.
    pub groups: usize,
    /// Fan-out: frames to deliver per socket count.
    pub fanout_frames: u64,
    /// Fan-out: results per round, each to every socket.
    pub fanout_round: u64,
    /// Slow fan-out: the share of sockets (percent) that never read.
    pub slow_percent: usize,
    /// Resume: sockets coming back at once.
    pub resume_sockets: usize,
    /// Resume: results each socket missed.
    pub resume_missed: usize,
    /// Resume: keys those results are spread over.
    pub resume_symbols: usize,
    /// Connections: idle sockets to open.
    pub idle_sockets: usize,
    /// Micro: quotes to run through the pipeline.
    pub micro_quotes: usize,
    /// Soak: how long the steady load runs, in seconds.
    pub soak_seconds: f64,
    /// The quotebridge binary to run bridges as child processes (so their
    /// memory and descriptors are their own); `None` runs them in-process.
    pub bridge_binary: Option<PathBuf>,
    /// The role bridges run in: `compute` measures ingest with snapshot
    /// writes, `gateway` measures sockets fed with ready results.
    pub role: Role,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            scenarios: vec![
                Scenario::Micro,
                Scenario::Series,
                Scenario::Ingest,
                Scenario::Latency,
                Scenario::Fanout,
                Scenario::SlowFanout,
                Scenario::Resume,
                Scenario::Connections,
            ],
            redis_url: None,
            redis_tls: crate::broker::TlsFiles::default(),
            quotes: 1_000_000,
            symbols: 1_000,
            rates: vec![10_000, 50_000],
            latency_sockets: 100,
            seconds: 5.0,
            fanout_sockets: vec![100, 1_000, 10_000],
            groups: 10,
            fanout_frames: 20_000_000,
            fanout_round: fanout::ROUND_RESULTS,
            slow_percent: 10,
            resume_sockets: 1_000,
            resume_missed: 1_000,
            resume_symbols: 10,
            idle_sockets: 50_000,
            micro_quotes: 2_000_000,
            soak_seconds: 120.0,
            bridge_binary: None,
            role: Role::All,
        }
    }
}

/// One line of results.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Which scenario.
    pub scenario: Scenario,
    /// Its parameters, e.g. `1000 sockets / 10 groups`.
    pub parameters: String,
    /// Named measurements, in display order.
    pub results: Vec<(String, f64)>,
    /// Anything the reader should know about this row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Row {
    fn new(scenario: Scenario, parameters: String) -> Self {
        Self {
            scenario,
            parameters,
            results: Vec::new(),
            note: None,
        }
    }

    /// A row saying the scenario does not apply to `role`.
    fn not_applicable(scenario: Scenario, role: Role) -> Self {
        let mut row = Self::new(scenario, format!("role {role}"));
        row.note = Some(format!(
            "not applicable: a {role} node {}",
            match role {
                Role::Gateway => "computes nothing",
                Role::Compute | Role::All => "serves no sockets",
            }
        ));
        row
    }

    fn with(mut self, name: &str, value: f64) -> Self {
        self.results.push((name.to_owned(), value));
        self
    }

    /// The value of one named result.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<f64> {
        self.results
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What the machine was.
    pub machine: String,
    /// One row per scenario and size.
    pub rows: Vec<Row>,
}

impl Report {
    /// A plain-text table.
    #[must_use]
    pub fn table(&self) -> String {
        let mut out = format!("quotebridge bench — {}\n\n", self.machine);
        let _ = writeln!(out, "{:<12} {:<32} results", "scenario", "parameters");
        for row in &self.rows {
            let results: Vec<String> = row
                .results
                .iter()
                .map(|(name, value)| format!("{name} {}", human(*value)))
                .collect();
            let scenario = format!("{:?}", row.scenario).to_lowercase();
            let _ = writeln!(
                out,
                "{scenario:<12} {:<32} {}",
                row.parameters,
                results.join(", ")
            );
            if let Some(note) = &row.note {
                let _ = writeln!(out, "{:<12} {:<32} note: {note}", "", "");
            }
        }
        out
    }
}

fn human(value: f64) -> String {
    if value.fract() == 0.0 || value.abs() >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// Runs every scenario of `options`.
pub async fn run(options: &Options) -> Result<Report, Error> {
    let role = options.role;
    let environment = Environment::start(
        options
            .redis_url
            .as_deref()
            .map(|url| RedisAt::new(url, &options.redis_tls)),
        options.bridge_binary.clone(),
        role,
    )
    .await?;
    let mut rows = Vec::new();
    // On a terminal: which scenario runs, and for how long (a pipe or CI
    // gets the log lines and the table only).
    let progress = indicatif::ProgressBar::new(options.scenarios.len() as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} scenario {pos}/{len}: {msg} ({elapsed})")
    {
        progress.set_style(style);
    }
    progress.enable_steady_tick(Duration::from_millis(250));
    for &scenario in &options.scenarios {
        tracing::info!(?scenario, %role, "running");
        progress.set_message(format!("{scenario:?}").to_lowercase());
        progress.inc(1);
        let applies = match scenario {
            Scenario::Micro | Scenario::Series => true,
            Scenario::Ingest => role.computes(),
            Scenario::Latency
            | Scenario::Fanout
            | Scenario::SlowFanout
            | Scenario::Resume
            | Scenario::Connections => role.serves_sockets(),
            // Its load and its abuses need both halves in one process.
            Scenario::Abuse => role == Role::All,
            Scenario::Soak => role.serves_sockets(),
        };
        if !applies {
            rows.push(Row::not_applicable(scenario, role));
            continue;
        }
        match scenario {
            Scenario::Micro => rows.push(micro::run(options.micro_quotes, options.symbols)),
            Scenario::Series => rows.extend(series::run(options.micro_quotes, options.symbols)),
            Scenario::Ingest => {
                rows.extend(ingest::run(&environment, options.quotes, options.symbols).await?)
            }
            Scenario::Latency => {
                for &rate in &options.rates {
                    rows.push(latency::run(&environment, rate, options).await?);
                }
            }
            Scenario::Fanout => {
                for &sockets in &options.fanout_sockets {
                    rows.push(fanout::run(&environment, sockets, 0, options).await?);
                }
            }
            Scenario::SlowFanout => {
                for &sockets in &options.fanout_sockets {
                    let slow = options.slow_percent;
                    rows.push(fanout::run(&environment, sockets, slow, options).await?);
                }
            }
            Scenario::Resume => rows.push(resume::run(&environment, options).await?),
            Scenario::Connections => rows.push(connections::run(&environment, options).await?),
            Scenario::Abuse => rows.extend(abuse::run(&environment, options).await?),
            Scenario::Soak => rows.push(soak::run(&environment, options).await?),
        }
    }
    progress.finish_and_clear();
    Ok(Report {
        machine: environment::describe_machine(),
        rows,
    })
}

/// Nanoseconds on the benchmark's one clock.
pub(crate) fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The `ts` of an SMA message, found without a full JSON parse.
pub(crate) fn ts_of(frame: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"ts\":";
    // From the end: only `seq`, `epoch` and `client` follow `ts`.
    let at = frame.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let digits = frame[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut ts: u64 = 0;
    let mut any = false;
    for d in digits {
        ts = ts.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(ts)
}

/// What the benchmark publishes to drive a bridge of `role`, and where: a
/// quote on the input channel, or, for a gateway, the SMA message a compute
/// node would have published on the output channel.
pub(crate) fn feed<'a>(
    role: Role,
    (input, output): (&'a str, &'a str),
    i: usize,
    symbols: usize,
    ts: u64,
) -> (&'a str, bytes::Bytes) {
    if role != Role::Gateway {
        return (input, quote(i, symbols, ts));
    }
    let price = 100.0 + (i % 997) as f64 / 8.0;
    let symbol = format!("S{}", i % symbols.max(1));
    let frame = crate::protocol::SmaMessage {
        symbol: &symbol,
        price,
        sma: price,
        window: 1,
        count: 1,
        ts,
        seq: i as u64 / symbols.max(1) as u64 + 1,
        epoch: "bench",
        client: None,
    }
    .encode();
    (output, frame.into())
}

/// A quote for symbol number `i % symbols`, stamped with `ts`.
pub(crate) fn quote(i: usize, symbols: usize, ts: u64) -> bytes::Bytes {
    let price = 100.0 + (i % 997) as f64 / 8.0;
    format!(
        r#"{{"symbol":"S{}","price":{price},"ts":{ts}}}"#,
        i % symbols.max(1)
    )
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ts_is_found_without_parsing() {
        assert_eq!(
            ts_of(br#"{"symbol":"A","price":1.0,"sma":1.0,"window":1,"count":1,"ts":12345}"#),
            Some(12345)
        );
        assert_eq!(ts_of(br#"{"ts":7,"client":"x"}"#), Some(7));
        assert_eq!(ts_of(b"{}"), None);
    }

    #[test]
    fn quotes_parse() {
        let q = quote(1234, 1000, 99);
        let parsed = crate::quote::parse(&q).expect("bench quotes are valid");
        assert_eq!((parsed.symbol.as_ref(), parsed.ts), ("S234", Some(99)));
    }
}
