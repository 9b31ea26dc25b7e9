//! Server-Sent Events: `GET /sse/{client_code}` carries what a socket of
//! that client code would receive, each result with an id to resume from.

use std::net::SocketAddr;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::*;

/// One event as a client assembles it.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Event {
    pub(crate) id: Option<String>,
    pub(crate) event: Option<String>,
    pub(crate) data: String,
}

/// An event stream read straight off the connection (HTTP/1.0, so the body
/// is the stream itself, as `curl -N` shows it).
pub(crate) struct Events {
    reader: BufReader<TcpStream>,
}

impl Events {
    /// Opens `path`; returns the status line and headers, and the stream.
    pub(crate) async fn open(
        address: SocketAddr,
        path: &str,
        last_event_id: Option<&str>,
    ) -> (String, Self) {
        let mut stream = within("connect", TcpStream::connect(address))
            .await
            .expect("connect");
        let mut request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n");
        if let Some(id) = last_event_id {
            request.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            within("the response head", reader.read_line(&mut line))
                .await
                .expect("read");
            if line.trim_end().is_empty() {
                break;
            }
            head.push_str(&line.to_ascii_lowercase());
        }
        (head, Self { reader })
    }

    /// The next event with data (comments and `retry:` alone are skipped).
    pub(crate) async fn next(&mut self) -> Event {
        let mut event = Event::default();
        let mut data: Vec<String> = Vec::new();
        loop {
            let mut line = String::new();
            let read = within("an event", self.reader.read_line(&mut line))
                .await
                .expect("read");
            assert!(read > 0, "the stream ended");
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if data.is_empty() {
                    continue;
                }
                event.data = data.join("\n");
                return event;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
            match field {
                "id" => event.id = Some(value),
                "event" => event.event = Some(value),
                "data" => data.push(value),
                _ => {}
            }
        }
    }

    /// The next event's data as JSON.
    pub(crate) async fn next_json(&mut self) -> (Event, Value) {
        let event = self.next().await;
        let json = serde_json::from_str(&event.data).expect("JSON data");
        (event, json)
    }
}

fn quote(symbol: &str, price: u32, client: Option<&str>) -> (String, Vec<u8>) {
    let mut quote = json!({"symbol": symbol, "price": price});
    if let Some(code) = client {
        quote["client"] = json!(code);
    }
    ("quotes".to_owned(), quote.to_string().into_bytes())
}

#[tokio::test]
async fn an_event_stream_carries_what_a_socket_would_and_resumes_from_its_last_id() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__SMA__WINDOW", "1")]).await;
    let mut output = app.redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    let mut conn = app.redis.connection().await;
    publish_all(&mut conn, &[quote("AAPL", 1, None)]).await;
    next_redis(&mut output).await;

    // It starts with the latest value of its symbols...
    let (head, mut events) = Events::open(app.address, "/sse/acme?symbols=AAPL", None).await;
    assert!(
        head.starts_with("http/1.0 200") || head.starts_with("http/1.1 200"),
        "{head}"
    );
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let (first, sma) = events.next_json().await;
    let epoch = sma["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(first.id, Some(format!("{epoch}:1:p:AAPL")));
    assert_eq!(sma["price"], 1.0);

    // ...then routes as a socket of acme: its symbols, its private results,
    // its direct messages (a line break kept), nothing of other symbols.
    publish_all(
        &mut conn,
        &[
            quote("AAPL", 2, None),
            quote("MSFT", 1, None),
            quote("AAPL", 3, Some("acme")),
            quote("AAPL", 4, Some("beta")),
            ("client.acme".to_owned(), b"margin\ncall".to_vec()),
        ],
    )
    .await;
    let (public, sma) = events.next_json().await;
    assert_eq!(
        (public.id.as_deref(), &sma["price"]),
        (Some(&*format!("{epoch}:2:p:AAPL")), &json!(2.0))
    );
    let (private, sma) = events.next_json().await;
    assert_eq!(private.id, Some(format!("{epoch}:1:c:AAPL")));
    assert_eq!(sma["client"], "acme");
    let direct = events.next().await;
    assert_eq!(
        (direct.event.as_deref(), direct.id, direct.data.as_str()),
        (Some("direct"), None, "margin\ncall")
    );

    // Gone, then back with Last-Event-ID: what it missed of that key, then live.
    drop(events);
    publish_all(&mut conn, &[quote("AAPL", 5, None), quote("AAPL", 6, None)]).await;
    for _ in 0..6 {
        next_redis(&mut output).await;
    }
    let last_id = format!("{epoch}:2:p:AAPL");
    let (_, mut events) = Events::open(app.address, "/sse/acme?symbols=AAPL", Some(&last_id)).await;
    let (resumed, reply) = events.next_json().await;
    assert_eq!(resumed.event.as_deref(), Some("resumed"));
    assert_eq!(
        (reply["recovered"].as_bool(), reply["replayed"].as_u64()),
        (Some(true), Some(2))
    );
    for price in [5.0, 6.0] {
        assert_eq!(events.next_json().await.1["price"], price);
    }
    publish_all(&mut conn, &[quote("AAPL", 7, None)]).await;
    let (live, sma) = events.next_json().await;
    assert_eq!(
        (live.id, &sma["seq"]),
        (Some(format!("{epoch}:5:p:AAPL")), &json!(5))
    );
    app.shutdown().await;
}

#[tokio::test]
async fn an_event_stream_obeys_auth_limits_and_outlives_the_request_deadline() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__SMA__WINDOW", "1"),
        ("QUOTEBRIDGE__AUTH__MODE", "token"),
        ("QUOTEBRIDGE__AUTH__TOKENS", "acme=t0ken-of-acme"),
        ("QUOTEBRIDGE__SERVER__MAX_CONNECTIONS_PER_CLIENT", "1"),
        ("QUOTEBRIDGE__WEBSOCKET__MAX_SYMBOLS", "3"),
        ("QUOTEBRIDGE__SERVER__HEADER_READ_TIMEOUT_MS", "100"),
        ("QUOTEBRIDGE__SERVER__ANSWER_TIMEOUT_MS", "1000"),
    ])
    .await;
    for (path, status) in [
        ("/sse/acme", "401"),
        ("/sse/acme?token=wrong", "401"),
        ("/sse/bad.code?token=t0ken-of-acme", "400"),
        ("/sse/acme?token=t0ken-of-acme&symbols=A%20B", "400"),
        ("/sse/acme?token=t0ken-of-acme&symbols=A,B,C,D", "400"),
    ] {
        let (head, _) = Events::open(app.address, path, None).await;
        assert!(
            head.split_whitespace().nth(1) == Some(status),
            "{path}: {head}"
        );
    }
    // HEAD would build a whole stream to send nothing: refused.
    let mut raw = TcpStream::connect(app.address).await.expect("connect");
    let head_request = format!(
        "HEAD /sse/acme?token=t0ken-of-acme HTTP/1.0\r\nHost: {}\r\n\r\n",
        app.address
    );
    raw.write_all(head_request.as_bytes()).await.expect("send");
    let mut status = String::new();
    within(
        "the HEAD answer",
        BufReader::new(raw).read_line(&mut status),
    )
    .await
    .expect("read");
    assert!(status.contains(" 405 "), "{status}");

    // A Last-Event-ID that names nothing is ignored: the stream starts afresh.
    let (head, mut events) = Events::open(
        app.address,
        "/sse/acme?token=t0ken-of-acme&symbols=AAPL",
        Some("not:an:event:id%00"),
    )
    .await;
    assert!(head.contains(" 200 "), "{head}");
    let (second, _) = Events::open(app.address, "/sse/acme?token=t0ken-of-acme", None).await;
    assert!(
        second.contains(" 429 "),
        "one stream per client here: {second}"
    );

    // Plain requests on a connection are cut off after twice the header
    // timeout plus the answer timeout (1.2 s here); a stream is not.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let mut conn = app.redis.connection().await;
    publish_all(&mut conn, &[quote("AAPL", 1, None)]).await;
    assert_eq!(events.next_json().await.1["symbol"], "AAPL");
    app.shutdown().await;
}

/// An event stream whose resume finds its client code's allowance spent is
/// not refused (a browser would give up): it starts as a new stream does,
/// told that its key was not recovered.
#[tokio::test]
async fn an_event_stream_past_the_resume_allowance_starts_live() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__SMA__WINDOW", "1"),
        ("QUOTEBRIDGE__WEBSOCKET__RESUME_FRAMES_PER_SECOND", "1"),
    ])
    .await;
    let mut output = app.redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    let mut conn = app.redis.connection().await;
    publish_all(&mut conn, &[quote("AAPL", 1, None), quote("AAPL", 2, None)]).await;
    let (_, first) = next_redis(&mut output).await;
    next_redis(&mut output).await;
    let first: Value = serde_json::from_str(&first).expect("json");
    let last_id = format!("{}:1:p:AAPL", first["epoch"].as_str().expect("epoch"));
    let path = "/sse/acme?symbols=AAPL";

    // The first resume sends the one frame a second allows.
    let (_, mut spent) = Events::open(app.address, path, Some(&last_id)).await;
    let (resumed, reply) = spent.next_json().await;
    assert_eq!(resumed.event.as_deref(), Some("resumed"));
    assert_eq!(reply["replayed"], 1);
    // The second, at once: live, not recovered, and still a stream.
    let (head, mut refused) = Events::open(app.address, path, Some(&last_id)).await;
    assert!(head.contains(" 200 "), "{head}");
    let (resumed, reply) = refused.next_json().await;
    assert_eq!(resumed.event.as_deref(), Some("resumed"));
    assert_eq!(
        (
            reply["recovered"].as_bool(),
            &reply["unrecovered"]["public"]
        ),
        (Some(false), &json!(["AAPL"]))
    );
    assert_eq!(
        refused.next_json().await.1["price"],
        2.0,
        "its latest, as a new stream gets"
    );
    publish_all(&mut conn, &[quote("AAPL", 3, None)]).await;
    assert_eq!(refused.next_json().await.1["price"], 3.0, "then live");
    app.shutdown().await;
}

/// An event stream ends when its token expires, with an `expired` event:
/// the client connects again with a fresh token and its `Last-Event-ID`.
#[tokio::test]
async fn an_event_stream_ends_when_its_token_expires() {
    const SECRET: &str = "a-test-secret-of-32-bytes-length";
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__SMA__WINDOW", "1"),
        ("QUOTEBRIDGE__AUTH__MODE", "jwt"),
        ("QUOTEBRIDGE__AUTH__JWT_SECRET", SECRET),
        // The grant ends at exp plus the leeway (30 s by default).
        ("QUOTEBRIDGE__AUTH__JWT_LEEWAY_SECONDS", "0"),
        // What is left of an ended stream has this long to be read before
        // the connection is closed (10 s by default).
        ("QUOTEBRIDGE__SERVER__ANSWER_TIMEOUT_MS", "500"),
    ])
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "acme", "exp": now + 2}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    let path = format!("/sse/acme?token={token}&symbols=AAPL");
    let (head, mut events) = Events::open(app.address, &path, None).await;
    assert!(head.contains(" 200 "), "{head}");
    let (event, data) = events.next_json().await;
    assert_eq!(event.event.as_deref(), Some("expired"));
    assert_eq!(data, json!({"type": "error", "message": "token expired"}));
    let mut rest = String::new();
    let read = within("the end of the stream", events.reader.read_line(&mut rest))
        .await
        .expect("read");
    assert_eq!((read, rest.as_str()), (0, ""), "and the stream ends");
    assert_eq!(app.stats().await["token_expiry_closes"], 1);
    app.shutdown().await;
}
