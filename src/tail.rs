//! `quotebridge tail`: a WebSocket client that prints what a client group
//! receives, one JSON document per line. With `--resume` it is the
//! reference client of the resume protocol: it remembers each key's last
//! position, and when the connection drops or the bridge restarts it
//! reconnects with `?resume=1` and asks for what it missed.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::names::{self, StreamName};

/// Longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What `tail` connects to and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Base WebSocket URL, e.g. `ws://127.0.0.1:8080` (a query is kept).
    pub base_url: String,
    /// The client code to connect as.
    pub client_code: String,
    /// Subscribe to these instead of the default subscriptions.
    pub symbols: Option<Vec<String>>,
    /// In these series (`sma`, or `[[series]]` names) instead of the
    /// bridge's default ones.
    pub series: Option<Vec<String>>,
    /// Sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// Reconnect after a drop and resume where it left off.
    pub resume: bool,
}

/// Each key's last position: key → (epoch, seq), public and private.
#[derive(Debug, Default)]
struct Positions {
    public: BTreeMap<String, (String, u64)>,
    private: BTreeMap<String, (String, u64)>,
    /// The socket's subscriptions, as its last `subscribed` reply listed
    /// them: what a resume subscribes to again.
    subscribed: Option<Vec<String>>,
}

impl Positions {
    /// Notes the position of `frame` if it is a result.
    fn note(&mut self, frame: &Value) {
        if frame["type"] == "subscribed"
            && let Some(entries) = frame["symbols"].as_array()
        {
            let entries = entries.iter().filter_map(Value::as_str);
            self.subscribed = Some(entries.map(str::to_owned).collect());
            return;
        }
        let (Some(symbol), Some(seq), Some(epoch)) = (
            frame["symbol"].as_str(),
            frame["seq"].as_u64(),
            frame["epoch"].as_str(),
        ) else {
            return;
        };
        let keys = if frame["client"].is_string() {
            &mut self.private
        } else {
            &mut self.public
        };
        // A series' result is a key of its own: `symbol@series`.
        let key = StreamName {
            symbol,
            series: frame["series"].as_str(),
        }
        .joined();
        keys.insert(key, (epoch.to_owned(), seq));
    }

    fn is_empty(&self) -> bool {
        self.public.is_empty() && self.private.is_empty()
    }

    /// The resume request naming every key's last position, grouped by
    /// epoch as the protocol asks.
    fn resume_request(&self, symbols: Option<&[String]>, series: Option<&[String]>) -> Value {
        let grouped = |keys: &BTreeMap<String, (String, u64)>| {
            let mut by_epoch: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
            for (symbol, (epoch, seq)) in keys {
                by_epoch.entry(epoch).or_default().insert(symbol, *seq);
            }
            json!(by_epoch)
        };
        let mut request = json!({
            "op": "resume",
            "public": grouped(&self.public),
            "private": grouped(&self.private),
        });
        if let Some(symbols) = symbols {
            request["symbols"] = json!(symbols);
        }
        if let Some(series) = series {
            request["series"] = json!(series);
        }
        request
    }
}

/// The largest resume request tail sends: within the bridge's default
/// `websocket.max_message_bytes` (64 KiB), with room to spare.
const MAX_RESUME_BYTES: usize = 60 * 1024;

/// `request` cut down to [`MAX_RESUME_BYTES`]: keys past what fits are left
/// out (said on stderr). They are not replayed; their next results come
/// live, as for a key the bridge could not recover.
fn fitted(mut request: Value) -> Value {
    let named = |request: &Value| -> usize {
        ["public", "private"]
            .iter()
            .filter_map(|kind| request[kind].as_object())
            .flat_map(|epochs| epochs.values())
            .filter_map(Value::as_object)
            .map(serde_json::Map::len)
            .sum()
    };
    let all = named(&request);
    while request.to_string().len() > MAX_RESUME_BYTES {
        // Drop a tenth of what is left, from the private keys first.
        let Some(kind) = ["private", "public"]
            .into_iter()
            .find(|kind| request[kind].as_object().is_some_and(|e| !e.is_empty()))
        else {
            break;
        };
        let Some(epochs) = request[kind].as_object_mut() else {
            break;
        };
        let Some((epoch, keys)) = epochs.iter_mut().next() else {
            break;
        };
        let epoch = epoch.clone();
        if let Some(keys) = keys.as_object_mut() {
            let drop = keys.len().div_ceil(10).max(1);
            let gone: Vec<String> = keys.keys().take(drop).cloned().collect();
            for key in gone {
                keys.remove(&key);
            }
            if keys.is_empty() {
                epochs.remove(&epoch);
            }
        } else {
            epochs.remove(&epoch);
        }
    }
    let kept = named(&request);
    if kept < all {
        eprintln!(
            "quotebridge tail: resuming {kept} of {all} keys (a resume request is at most {} KiB); the others continue live",
            MAX_RESUME_BYTES / 1024
        );
    }
    request
}

/// `text` with its control characters written as `\u{..}` escapes.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            shown.extend(c.escape_unicode());
        } else {
            shown.push(c);
        }
    }
    std::borrow::Cow::Owned(shown)
}

/// How one connection ended.
enum Ended {
    /// Asked to stop.
    Shutdown,
    /// Stdout is gone (piped into `head`): nothing left to do.
    StdoutClosed,
    /// The bridge closed the socket, with this code and reason.
    Closed(u16, String),
    /// The connection dropped without a close frame.
    Dropped(String),
}

/// Connects to `{base_url}/ws/{client_code}` and prints every text frame
/// until the server closes the socket or `shutdown`. A close by the
/// server is an error (its code and reason), unless `--resume` makes it a
/// reason to reconnect (a bridge going away, a dropped connection).
pub async fn run(options: Options, shutdown: CancellationToken) -> Result<(), Error> {
    if !crate::names::is_client_code(&options.client_code) {
        return Err(Error::Input(format!(
            "invalid client code {:?}: expected 1-64 characters from [A-Za-z0-9_-]",
            options.client_code
        )));
    }
    let url = socket_url(&options.base_url, &options.client_code, options.resume);
    let mut positions = Positions::default();
    let mut connected_once = false;
    let mut backoff = Duration::from_millis(250);
    loop {
        let ended = match connect(&url, options.token.as_deref()).await {
            Ok(socket) => {
                connected_once = true;
                backoff = Duration::from_millis(250);
                tracing::info!(%url, "connected");
                follow(socket, &options, &mut positions, &shutdown).await?
            }
            // The first connection must work: a wrong URL should fail at once.
            Err(err) if !options.resume || !connected_once => return Err(err),
            Err(err) => Ended::Dropped(err.to_string()),
        };
        match ended {
            Ended::Shutdown | Ended::StdoutClosed => return Ok(()),
            Ended::Closed(code, reason) if options.resume && code == u16::from(CloseCode::Away) => {
                eprintln!(
                    "quotebridge tail: the bridge closed the socket ({code} {reason}); reconnecting to resume"
                );
            }
            Ended::Closed(code, reason) => {
                return Err(Error::Closed { code, reason });
            }
            Ended::Dropped(why) if options.resume => {
                eprintln!("quotebridge tail: connection lost ({why}); reconnecting to resume");
            }
            Ended::Dropped(why) => {
                return Err(Error::Closed {
                    code: u16::from(CloseCode::Abnormal),
                    reason: format!("connection lost: {why}"),
                });
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `{base}/ws/{code}`, any query of `base` kept after it (and `resume=1`
/// added when resuming): `ws://host:8080/?x=1` becomes
/// `ws://host:8080/ws/acme?x=1`.
fn socket_url(base: &str, client_code: &str, resume: bool) -> String {
    let (base, query) = base.split_once('?').unwrap_or((base, ""));
    let mut query: Vec<&str> = query.split('&').filter(|part| !part.is_empty()).collect();
    if resume && !query.iter().any(|part| part.starts_with("resume=")) {
        query.push("resume=1");
    }
    let mut url = format!("{}/ws/{client_code}", base.trim_end_matches('/'));
    if !query.is_empty() {
        url.push('?');
        url.push_str(&query.join("&"));
    }
    url
}

async fn connect(url: &str, token: Option<&str>) -> Result<Socket, Error> {
    let unreachable = |reason: String| Error::Unreachable {
        url: url.to_owned(),
        reason,
    };
    let mut request = url
        .into_client_request()
        .map_err(|err| unreachable(err.to_string()))?;
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| Error::Input("--token: not usable in an HTTP header".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|err| unreachable(err.to_string()))?;
    Ok(socket)
}

/// Prints what one connection receives until it ends. After the welcome:
/// on a resumed connection, the resume request; otherwise the requested
/// subscriptions in place of the defaults.
async fn follow(
    mut socket: Socket,
    options: &Options,
    positions: &mut Positions,
    shutdown: &CancellationToken,
) -> Result<Ended, Error> {
    let mut welcomed = false;
    loop {
        let frame = tokio::select! {
            () = shutdown.cancelled() => {
                let _ = socket.close(None).await;
                return Ok(Ended::Shutdown);
            }
            frame = socket.next() => frame,
        };
        let text: Utf8Bytes = match frame {
            None => return Ok(Ended::Dropped("closed without a close frame".into())),
            Some(Ok(Message::Close(close))) => {
                let (code, reason) = close
                    .map_or((u16::from(CloseCode::Status), String::new()), |close| {
                        (u16::from(close.code), close.reason.to_string())
                    });
                return Ok(Ended::Closed(code, reason));
            }
            Some(Err(err)) => return Ok(Ended::Dropped(err.to_string())),
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(data))) => format!(
                "{{\"binary_base16\":\"{}\"}}",
                data.iter().map(|b| format!("{b:02x}")).collect::<String>()
            )
            .into(),
            Some(Ok(_)) => continue,
        };
        let written = {
            let terminal = std::io::stdout().is_terminal();
            let mut out = std::io::stdout().lock();
            // A terminal would act on control characters a publisher put
            // in a direct message (escape sequences): shown escaped there,
            // passed on as they are into a pipe.
            let line = if terminal {
                printable(&text)
            } else {
                std::borrow::Cow::Borrowed(text.as_str())
            };
            writeln!(out, "{line}").and_then(|()| out.flush())
        };
        // stdout is locked per line, never across an await.
        if written.is_err() {
            return Ok(Ended::StdoutClosed);
        }
        let frame: Value = serde_json::from_str(&text).unwrap_or_default();
        positions.note(&frame);
        if std::mem::replace(&mut welcomed, true) {
            continue;
        }
        // The first frame is the welcome.
        let requests = if options.resume && !positions.is_empty() {
            // The subscriptions it had, entries as they are (plain ones
            // are the sma's); else the ones asked for.
            let sma = [names::SMA_SERIES.to_owned()];
            let request = match &positions.subscribed {
                Some(entries) => positions.resume_request(Some(entries), Some(&sma)),
                None => {
                    positions.resume_request(options.symbols.as_deref(), options.series.as_deref())
                }
            };
            vec![fitted(request)]
        } else if options.symbols.is_some() || options.series.is_some() {
            let defaults = frame["subscriptions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            // Without --symbols, the default symbols, in the series asked for.
            let symbols = options.symbols.clone().unwrap_or_else(|| {
                let mut symbols: Vec<String> = (defaults.iter())
                    .filter_map(Value::as_str)
                    .map(|entry| StreamName::split(entry).symbol.to_owned())
                    .collect();
                symbols.sort();
                symbols.dedup();
                symbols
            });
            let mut subscribe = json!({"op": "subscribe", "symbols": symbols});
            if let Some(series) = &options.series {
                subscribe["series"] = json!(series);
            }
            // The welcome's entries as they are: plain ones are the sma's.
            vec![
                json!({"op": "unsubscribe", "symbols": defaults, "series": ["sma"]}),
                subscribe,
            ]
        } else if options.resume {
            // Held until a first request: an empty resume makes it live.
            vec![json!({"op": "resume"})]
        } else {
            Vec::new()
        };
        for request in requests {
            socket.send(Message::text(request.to_string())).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(printable("plain"), "plain");
        assert_eq!(printable("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\u{a}");
    }

    #[test]
    fn a_resume_request_is_cut_to_what_a_bridge_takes() {
        let mut positions = Positions::default();
        for n in 0..20_000 {
            positions
                .note(&json!({"symbol": format!("SYMBOL{n:05}"), "seq": 123_456, "epoch": "e1"}));
        }
        let request = fitted(positions.resume_request(None, None));
        let text = request.to_string();
        assert!(text.len() <= MAX_RESUME_BYTES, "{} bytes", text.len());
        let kept = request["public"]["e1"]
            .as_object()
            .map_or(0, serde_json::Map::len);
        assert!(kept > 1_000, "{kept} keys kept");
        let small = positions_of(&["A"]).resume_request(None, None);
        assert_eq!(
            fitted(small.clone()),
            small,
            "a request that fits is as it was"
        );
    }

    fn positions_of(symbols: &[&str]) -> Positions {
        let mut positions = Positions::default();
        for symbol in symbols {
            positions.note(&json!({"symbol": symbol, "seq": 1, "epoch": "e1"}));
        }
        positions
    }

    #[test]
    fn the_socket_url_keeps_a_query_and_adds_resume() {
        assert_eq!(socket_url("ws://h:1/", "acme", false), "ws://h:1/ws/acme");
        assert_eq!(
            socket_url("ws://h:1?token=abc", "acme", false),
            "ws://h:1/ws/acme?token=abc"
        );
        assert_eq!(
            socket_url("ws://h:1/?token=abc", "acme", true),
            "ws://h:1/ws/acme?token=abc&resume=1"
        );
    }

    #[test]
    fn the_resume_request_groups_each_keys_last_position_by_epoch() {
        let mut positions = Positions::default();
        for frame in [
            json!({"symbol": "A", "seq": 1, "epoch": "e1", "sma": 1.0}),
            json!({"symbol": "A", "seq": 2, "epoch": "e1", "sma": 1.0}),
            json!({"symbol": "B", "seq": 7, "epoch": "e2", "sma": 1.0}),
            json!({"symbol": "A", "seq": 3, "epoch": "e1", "sma": 1.0, "client": "acme"}),
            json!({"type": "subscribed", "symbols": ["A"]}),
        ] {
            positions.note(&frame);
        }
        assert_eq!(
            positions.resume_request(Some(&["A".to_owned(), "B".to_owned()]), None),
            json!({
                "op": "resume",
                "public": {"e1": {"A": 2}, "e2": {"B": 7}},
                "private": {"e1": {"A": 3}},
                "symbols": ["A", "B"],
            })
        );
        assert_eq!(positions.subscribed, Some(vec!["A".to_owned()]));
    }

    #[test]
    fn a_series_result_is_a_key_of_its_own() {
        let mut positions = Positions::default();
        positions.note(&json!({"symbol": "A", "seq": 4, "epoch": "e1", "sma": 1.0}));
        positions.note(&json!({"symbol": "A", "series": "candles.1m", "seq": 9, "epoch": "e1"}));
        let series = ["candles.1m".to_owned()];
        assert_eq!(
            positions.resume_request(None, Some(&series)),
            json!({
                "op": "resume",
                "public": {"e1": {"A": 4, "A@candles.1m": 9}},
                "private": {},
                "series": ["candles.1m"],
            })
        );
    }
}
