//! The producer behind `quotebridge publish` (and `demo`): reads quotes from a
//! CSV or JSON-lines file, checks each one with the bridge's own parser, and
//! publishes them pipelined, optionally paced and looped.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, Outbound};
use crate::quote::{self, Quote};
use crate::topology::Channels;

/// Most quotes in one pipeline when publishing as fast as possible.
const MAX_PIPELINE: usize = 1000;

/// Quotes read from a file, ready to publish, and the lines that were not.
#[derive(Debug, Default)]
pub struct Loaded {
    /// One JSON payload per good line, in file order.
    pub quotes: Vec<Bytes>,
    /// The symbol of each of `quotes`, which decides its channel on a cluster.
    pub symbols: Vec<Box<str>>,
    /// `(line number, reason)` for every line that is not a valid quote.
    pub rejected: Vec<(u64, String)>,
}

/// What a publish run did.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Quotes published.
    pub published: u64,
    /// Wall time from first to last publish.
    pub elapsed: Duration,
}

impl Summary {
    /// Quotes per second over the run.
    #[must_use]
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.published as f64 / secs
        } else {
            self.published as f64
        }
    }
}

/// Reads `path` (`-`: standard input, to its end): CSV when it ends in
/// `.csv` or its first line does not start with `{`, JSON lines otherwise.
/// `client` makes every quote private to it.
pub fn load(path: &Path, client: Option<&str>) -> Result<Loaded, crate::Error> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| crate::Error::io("cannot read standard input", e))?
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| crate::Error::io(format!("cannot read {}", path.display()), e))?
    };
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
        || !text.trim_start().starts_with('{');
    if csv {
        parse_csv(&text, client)
    } else {
        Ok(parse_json_lines(&text, client))
    }
}

/// Parses JSON lines; blank lines are skipped.
#[must_use]
pub fn parse_json_lines(text: &str, client: Option<&str>) -> Loaded {
    let mut loaded = Loaded::default();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_number = index as u64 + 1;
        match quote::parse(line.as_bytes()) {
            // The line as written: its numbers keep the digits the file
            // gave them, which are what the bridge averages exactly.
            Ok(quote) if client.is_none() => {
                loaded.symbols.push(quote.symbol.into());
                loaded
                    .quotes
                    .push(Bytes::copy_from_slice(line.trim().as_bytes()));
            }
            // Re-encoded for the new client: numbers in their shortest
            // round-trip form, the same decimal for any of 15 digits or fewer.
            Ok(mut quote) => {
                quote.client = client.map(Cow::Borrowed);
                loaded.accept(line_number, &quote);
            }
            Err(reason) => loaded.rejected.push((line_number, reason.to_string())),
        }
    }
    loaded
}

/// Parses CSV with a header naming `symbol` and `price`, and optionally `ts`,
/// `client` and `volume`, in any order. Prices and volumes written as JSON
/// numbers are published with the very digits the file gave them.
pub fn parse_csv(text: &str, client: Option<&str>) -> Result<Loaded, crate::Error> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| crate::Error::Input(format!("cannot read the CSV header: {e}")))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let (Some(symbol_col), Some(price_col)) = (column("symbol"), column("price")) else {
        return Err(crate::Error::Input(
            "the CSV header must name the columns symbol and price (optionally ts, client and volume)"
                .into(),
        ));
    };
    let (ts_col, client_col, volume_col) = (column("ts"), column("client"), column("volume"));

    let mut loaded = Loaded::default();
    for record in reader.records() {
        let record = match record {
            Ok(record) => record,
            Err(err) => {
                let line = err.position().map_or(0, csv::Position::line);
                loaded
                    .rejected
                    .push((line, format!("unreadable CSV: {err}")));
                continue;
            }
        };
        let line = record.position().map_or(0, csv::Position::line);
        let field = |col: Option<usize>| col.and_then(|c| record.get(c)).filter(|f| !f.is_empty());
        let Some(price) = field(Some(price_col)).and_then(number_text) else {
            loaded
                .rejected
                .push((line, "invalid price: expected a finite number".into()));
            continue;
        };
        let volume = match field(volume_col).map(number_text) {
            None => None,
            Some(Some(volume)) => Some(volume),
            Some(None) => {
                loaded
                    .rejected
                    .push((line, "invalid volume: expected a finite number >= 0".into()));
                continue;
            }
        };
        let ts = match field(ts_col).map(str::parse::<u64>) {
            None => None,
            Some(Ok(ts)) => Some(ts),
            Some(Err(_)) => {
                loaded.rejected.push((
                    line,
                    "invalid ts: expected milliseconds since the Unix epoch".into(),
                ));
                continue;
            }
        };
        let symbol = field(Some(symbol_col)).unwrap_or_default();
        let client = client.or(field(client_col));
        loaded.accept_payload(
            line,
            csv_payload(symbol, &price, ts, client, volume.as_deref()),
        );
    }
    Ok(loaded)
}

/// A CSV number as JSON number text: the field itself when it is one
/// (`189.50`, `1.5e3`), so its digits reach the bridge unchanged; else the
/// shortest form of the finite number Rust reads in it (`12.`, `+3`).
fn number_text(field: &str) -> Option<Cow<'_, str>> {
    if serde_json::from_str::<serde_json::Number>(field).is_ok() {
        return Some(Cow::Borrowed(field));
    }
    let value = field.parse::<f64>().ok().filter(|v| v.is_finite())?;
    serde_json::to_string(&value).ok().map(Cow::Owned)
}

/// The quote payload of one CSV row; names are JSON-escaped, numbers are
/// JSON number text already.
fn csv_payload(
    symbol: &str,
    price: &str,
    ts: Option<u64>,
    client: Option<&str>,
    volume: Option<&str>,
) -> Vec<u8> {
    let string = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut payload = format!(r#"{{"symbol":{},"price":{price}"#, string(symbol));
    if let Some(ts) = ts {
        payload.push_str(&format!(r#","ts":{ts}"#));
    }
    if let Some(client) = client {
        payload.push_str(&format!(r#","client":{}"#, string(client)));
    }
    if let Some(volume) = volume {
        payload.push_str(&format!(r#","volume":{volume}"#));
    }
    payload.push('}');
    payload.into_bytes()
}

impl Loaded {
    /// Encodes `quote` and keeps it if the bridge itself would accept it.
    fn accept(&mut self, line: u64, quote: &Quote<'_>) {
        match serde_json::to_vec(quote) {
            Ok(payload) => self.accept_payload(line, payload),
            Err(err) => self.rejected.push((line, format!("cannot encode: {err}"))),
        }
    }

    /// Keeps `payload` if the bridge itself would accept it.
    fn accept_payload(&mut self, line: u64, payload: Vec<u8>) {
        match quote::parse(&payload) {
            Ok(parsed) => {
                self.symbols.push(parsed.symbol.into());
                self.quotes.push(payload.into());
            }
            Err(reason) => self.rejected.push((line, reason.to_string())),
        }
    }
}

/// Addresses each quote to the input channel its symbol goes to: the first
/// `redis.input` channel, or its partition on a Redis Cluster.
pub fn address(loaded: &Loaded, channels: &Channels) -> Result<Vec<Outbound>, crate::Error> {
    // One shared name per channel, however many quotes go to it.
    let mut names: HashMap<String, Arc<str>> = HashMap::new();
    loaded
        .quotes
        .iter()
        .zip(&loaded.symbols)
        .map(|(payload, symbol)| {
            let channel = channels.input_channel(symbol).ok_or_else(|| {
                crate::Error::Usage(
                    "the first redis.input entry is a pattern; publish needs a channel".into(),
                )
            })?;
            let channel = names
                .entry(channel)
                .or_insert_with_key(|name| name.as_str().into())
                .clone();
            Ok(Outbound::new(channel, payload.clone()))
        })
        .collect()
}

/// Publishes `quotes`: pipelined as fast as the broker takes them, or paced
/// at `rate` quotes per second; once, or looping until `shutdown` when
/// `repeat` is set.
pub async fn publish<B: Broker>(
    broker: &B,
    quotes: &[Outbound],
    rate: Option<f64>,
    repeat: bool,
    shutdown: &CancellationToken,
) -> Result<Summary, BrokerError> {
    let mut pacer = Pacer::new(quotes, rate, repeat);
    while let Some(due) = pacer.next_batch(shutdown).await {
        broker.publish(due).await?;
    }
    Ok(pacer.summary())
}

/// Appends `quotes` to the stream `key` (for the durable stream mode), each
/// as the field `quote`, pipelined and paced like [`publish`]. The stream is
/// trimmed to about `maxlen` entries.
pub async fn append_to_stream(
    client: &redis::Client,
    key: &str,
    maxlen: usize,
    quotes: &[Bytes],
    rate: Option<f64>,
    repeat: bool,
    shutdown: &CancellationToken,
) -> Result<Summary, BrokerError> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut pacer = Pacer::new(quotes, rate, repeat);
    while let Some(due) = pacer.next_batch(shutdown).await {
        let mut pipe = redis::pipe();
        for quote in due {
            pipe.cmd("XADD")
                .arg(key)
                .arg("MAXLEN")
                .arg("~")
                .arg(maxlen)
                .arg("*")
                .arg(quotebridge_service::QUOTE_FIELD)
                .arg(quote.as_ref())
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    Ok(pacer.summary())
}

/// Hands out `quotes` in batches: [`MAX_PIPELINE`] at a time when unpaced,
/// else, at `rate` quotes per second, as many as are due. On a terminal it
/// shows its progress (count, rate, time left); elsewhere (a pipe, CI) it
/// draws nothing, and the summary line says it all.
struct Pacer<'q, T> {
    quotes: &'q [T],
    rate: Option<f64>,
    repeat: bool,
    start: Instant,
    handed_out: u64,
    next: usize,
    batch: Vec<T>,
    progress: indicatif::ProgressBar,
}

/// The progress of a run: a bar to the end of the file, or, looping, a
/// count and a rate.
fn progress(total: u64, repeat: bool) -> indicatif::ProgressBar {
    let (bar, template) = if repeat {
        (
            indicatif::ProgressBar::no_length(),
            "{spinner} {human_pos} quotes published ({elapsed})",
        )
    } else {
        (
            indicatif::ProgressBar::new(total),
            "{bar:30} {human_pos}/{human_len} quotes, {eta} left",
        )
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

impl<'q, T: Clone> Pacer<'q, T> {
    fn new(quotes: &'q [T], rate: Option<f64>, repeat: bool) -> Self {
        Self {
            quotes,
            rate: rate.filter(|r| *r > 0.0),
            repeat,
            start: Instant::now(),
            handed_out: 0,
            next: 0,
            batch: Vec::with_capacity(MAX_PIPELINE),
            progress: progress(quotes.len() as u64, repeat),
        }
    }

    /// The next batch, once it is due; `None` when done or shut down.
    async fn next_batch(&mut self, shutdown: &CancellationToken) -> Option<&[T]> {
        let total = self.quotes.len() as u64;
        if self.quotes.is_empty() || (!self.repeat && self.handed_out >= total) {
            return None;
        }
        let mut room = MAX_PIPELINE as u64;
        if let Some(rate) = self.rate {
            // Sleep until the next quote is due, then take every quote that is.
            let due_at = self.start + Duration::from_secs_f64(self.handed_out as f64 / rate);
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep_until(due_at) => {}
            }
            let due = (self.start.elapsed().as_secs_f64() * rate) as u64 + 1;
            room = due
                .saturating_sub(self.handed_out)
                .clamp(1, MAX_PIPELINE as u64);
        } else if shutdown.is_cancelled() {
            return None;
        }
        if !self.repeat {
            room = room.min(total - self.handed_out);
        }
        self.batch.clear();
        for _ in 0..room {
            self.batch.push(self.quotes[self.next].clone());
            self.next = (self.next + 1) % self.quotes.len();
        }
        self.handed_out += room;
        self.progress.set_position(self.handed_out);
        Some(&self.batch)
    }

    /// What was handed out, and over how long.
    fn summary(&self) -> Summary {
        self.progress.finish_and_clear();
        Summary {
            published: self.handed_out,
            elapsed: self.start.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    /// The fast path exists for what producers send: it must take nearly
    /// all of it, or it is only a detour. (That it agrees with the full
    /// parser where it accepts is checked in tests/bridge/properties.rs.)
    #[test]
    fn the_fast_path_takes_what_publish_sends() {
        for (name, loaded) in [
            (
                "data/quotes.csv",
                super::parse_csv(crate::demo::SAMPLE_QUOTES, None).expect("sample"),
            ),
            (
                "data/quotes.csv, private",
                super::parse_csv(crate::demo::SAMPLE_QUOTES, Some("acme")).expect("sample"),
            ),
            (
                "data/ticks.jsonl",
                super::load(
                    std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/data/ticks.jsonl")),
                    None,
                )
                .expect("ticks"),
            ),
        ] {
            let taken = loaded
                .quotes
                .iter()
                .filter(|payload| crate::quote::parse_fast(payload).is_some())
                .count();
            assert!(
                taken * 100 >= loaded.quotes.len() * 99 && !loaded.quotes.is_empty(),
                "{name}: the fast path took {taken} of {}",
                loaded.quotes.len()
            );
        }
    }

    use super::*;

    fn payloads(loaded: &Loaded) -> Vec<&str> {
        loaded
            .quotes
            .iter()
            .map(|q| std::str::from_utf8(q).expect("utf-8"))
            .collect()
    }

    #[test]
    fn csv_with_optional_columns_in_any_order() {
        let text = "price,symbol,client,ts\n1.5,AAPL,,\n2,MSFT,acme,17\n";
        let loaded = parse_csv(text, None).expect("valid CSV");
        assert_eq!(
            payloads(&loaded),
            vec![
                r#"{"symbol":"AAPL","price":1.5}"#,
                r#"{"symbol":"MSFT","price":2,"ts":17,"client":"acme"}"#
            ]
        );
        assert!(loaded.rejected.is_empty());
    }

    #[test]
    fn csv_bad_lines_are_reported_with_line_numbers() {
        let text = "symbol,price\nAAPL,1\nAAPL,abc\nBAD SYMBOL,2\n,3\nMSFT,4\nAAPL,NaN\n";
        let loaded = parse_csv(text, None).expect("valid CSV");
        assert_eq!(loaded.quotes.len(), 2);
        let lines: Vec<u64> = loaded.rejected.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, vec![3, 4, 5, 7]);
        assert!(loaded.rejected[0].1.contains("price"));
        assert!(loaded.rejected[1].1.contains("symbol"));
    }

    #[test]
    fn csv_numbers_keep_their_digits_and_volumes_are_read() {
        let text = "symbol,price,volume\nA,189.50,1200\nB,12.,0.5\nC,1,-3\nD,1,many\n";
        let loaded = parse_csv(text, None).expect("valid CSV");
        assert_eq!(
            payloads(&loaded),
            vec![
                r#"{"symbol":"A","price":189.50,"volume":1200}"#,
                r#"{"symbol":"B","price":12.0,"volume":0.5}"#,
            ]
        );
        let lines: Vec<u64> = loaded.rejected.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, vec![4, 5]);
        assert!(
            loaded
                .rejected
                .iter()
                .all(|(_, why)| why.contains("volume"))
        );
    }

    #[test]
    fn json_lines_are_published_as_written() {
        let line = r#"{"symbol":"A","price":168.80,"volume":5,"venue":"X"}"#;
        let loaded = parse_json_lines(&format!("  {line}  \n"), None);
        assert_eq!(payloads(&loaded), vec![line]);
    }

    #[test]
    fn csv_without_required_columns_is_an_error() {
        assert!(parse_csv("sym,px\nA,1\n", None).is_err());
    }

    #[test]
    fn client_override_makes_quotes_private() {
        let loaded = parse_csv("symbol,price,client\nA,1,other\n", Some("acme")).expect("valid");
        assert_eq!(
            payloads(&loaded),
            vec![r#"{"symbol":"A","price":1,"client":"acme"}"#]
        );
        let loaded = parse_json_lines("{\"symbol\":\"A\",\"price\":1}\n", Some("acme"));
        assert_eq!(
            payloads(&loaded),
            vec![r#"{"symbol":"A","price":1.0,"client":"acme"}"#]
        );
    }

    #[test]
    fn json_lines_skip_blanks_and_report_bad_lines() {
        let text =
            "{\"symbol\":\"A\",\"price\":1}\n\nnot json\n{\"symbol\":\"B\",\"price\":2,\"ts\":5}\n";
        let loaded = parse_json_lines(text, None);
        assert_eq!(loaded.quotes.len(), 2);
        assert_eq!(loaded.rejected.len(), 1);
        assert_eq!(loaded.rejected[0].0, 3);
    }

    #[tokio::test]
    async fn publishes_everything_once_in_order() {
        use crate::broker::{MemoryBroker, Topic};
        use futures_util::StreamExt;
        let broker = MemoryBroker::new();
        let mut sub = broker
            .subscribe(&[Topic::from_name("q")])
            .await
            .expect("subscribe");
        let quotes: Vec<Outbound> = (0..2500)
            .map(|i| Outbound::new("q".into(), Bytes::from(format!("{i}"))))
            .collect();
        let summary = publish(&broker, &quotes, None, false, &CancellationToken::new())
            .await
            .expect("publish");
        assert_eq!(summary.published, 2500);
        for i in 0..2500 {
            let got = sub.next().await.expect("message");
            assert_eq!(got.payload, format!("{i}"));
        }
    }

    #[test]
    fn quotes_are_addressed_to_their_partition_on_a_cluster() {
        let quotes = parse_json_lines(
            &["A", "B", "C", "A"]
                .map(|s| format!(r#"{{"symbol":"{s}","price":1}}"#))
                .join("\n"),
            None,
        );
        let mut settings = crate::config::Settings::defaults().expect("defaults");
        let single = address(&quotes, &settings.redis.channels()).expect("addressed");
        assert!(single.iter().all(|o| &*o.channel == "quotes"));
        settings.redis.cluster_nodes = vec!["redis://127.0.0.1:7000".into()];
        let channels = settings.redis.channels();
        let cluster = address(&quotes, &channels).expect("addressed");
        for (outbound, symbol) in cluster.iter().zip(["A", "B", "C", "A"]) {
            assert_eq!(
                Some(outbound.channel.to_string()),
                channels.input_channel(symbol)
            );
        }
        assert!(
            Arc::ptr_eq(&cluster[0].channel, &cluster[3].channel),
            "names are shared"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn paced_publishing_follows_the_rate() {
        use crate::broker::MemoryBroker;
        let quotes: Vec<Outbound> = (0..10)
            .map(|i| Outbound::new("q".into(), Bytes::from(format!("{i}"))))
            .collect();
        let summary = publish(
            &MemoryBroker::new(),
            &quotes,
            Some(100.0),
            false,
            &CancellationToken::new(),
        )
        .await
        .expect("publish");
        assert_eq!(summary.published, 10);
        // Paused time advances exactly to each due instant: 10 quotes at 100/s.
        assert_eq!(summary.elapsed, Duration::from_millis(90));
    }
}
