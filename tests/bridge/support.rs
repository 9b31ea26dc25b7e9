//! Shared test helpers: a private redis-server, the whole app on port 0,
//! WebSocket and HTTP clients, and a deadline for every wait.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use quotebridge::config::Settings;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// How long any single expected event may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test with `what` if it misses [`DEADLINE`].
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// How often [`eventually`] asks again.
const POLL: Duration = Duration::from_millis(20);

/// Asks `check` every [`POLL`] until it answers `Some`, and returns that;
/// fails the test with `what` if that takes longer than [`DEADLINE`]. The
/// one way tests wait for a condition.
pub async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    within(what, async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await
}

/// Where [`free_port`] looks: below Linux's ephemeral range (32768 and
/// up), from which every outgoing connection takes its local port. With
/// hundreds of connections open during the suite, a port found free in that
/// range could be taken before the server meant for it binds it (a cluster
/// node then exits instead of answering).
const TEST_PORTS: std::ops::Range<u32> = 15_000..32_000;

/// A loopback port nobody listens on right now, and one no other call in
/// this test process has returned.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Each process starts somewhere else in the range, so two suites on
    // one machine rarely try the same ports.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = TEST_PORTS.end - TEST_PORTS.start;
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = (TEST_PORTS.start + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {TEST_PORTS:?}")
}

/// A redis-server of the test's own, on a free port, killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts redis-server on a free port and waits until it answers PING.
    pub async fn start() -> Self {
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = Self::spawn_ready(port).await {
                return RedisServer { child, port };
            }
        }
        panic!("redis-server did not come up on any of five free ports");
    }

    /// Starts redis-server on `port`; `None` if it does not answer (port taken).
    async fn spawn_ready(port: u16) -> Option<Child> {
        let mut child = spawn_redis_server(port, &[], None);
        if wait_until_ready(&mut child, port).await {
            Some(child)
        } else {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a fresh server on the same port, after [`RedisServer::kill`].
    pub async fn start_again(&mut self) {
        for _ in 0..50 {
            if let Some(child) = Self::spawn_ready(self.port).await {
                self.child = child;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("redis-server could not be restarted on port {}", self.port);
    }

    /// A stand-in that owns no process (what is left behind by `take_redis`).
    fn detached() -> Self {
        let child = Command::new("true").spawn().expect("spawn true");
        RedisServer { child, port: 0 }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A client of this server.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("valid redis url")
    }

    /// A connection for publishing.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }

    /// A pub/sub connection already subscribed to `channels` (confirmed by Redis).
    pub async fn subscribe(&self, channels: &[&str]) -> redis::aio::PubSub {
        let mut pubsub = self
            .client()
            .get_async_pubsub()
            .await
            .expect("pubsub connection");
        for channel in channels {
            pubsub.subscribe(*channel).await.expect("subscribe");
        }
        pubsub
    }
}

/// `redis-server` on `port`, keeping nothing on disk, with `extra`
/// arguments, run in `dir` if given. Fails the test with an install hint
/// when redis-server is missing.
pub fn spawn_redis_server(port: u16, extra: &[&str], dir: Option<&std::path::Path>) -> Child {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    match command.spawn() {
        Ok(child) => child,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server is not installed; the tests need it (and redis-cli). Install it \
             with `sudo apt-get install -y redis-server` (Debian/Ubuntu) or \
             `brew install redis` (macOS)"
        ),
        Err(err) => panic!("cannot start redis-server: {err}"),
    }
}

/// Waits until the server on `port` answers, and is `child` itself; false
/// if it exits first. Checking the answering server's process id matters:
/// when another test's server holds the port, ours exits, and until it has,
/// the other one would answer PING and the two tests would share a server.
pub async fn wait_until_ready(child: &mut Child, port: u16) -> bool {
    let want = format!("process_id:{}\r\n", child.id());
    for _ in 0..200 {
        if let Ok(Some(_)) = child.try_wait() {
            return false; // exited: most likely the port was taken
        }
        if let Some(info) = server_info(port).await {
            return info.contains(&want);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// The `INFO server` text of whatever answers on `port`; `None` if nothing
/// answers it within a second (another process may hold the port and say
/// nothing).
async fn server_info(port: u16) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(1), ask_server_info(port))
        .await
        .ok()
        .flatten()
}

async fn ask_server_info(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(b"INFO server\r\n").await.ok()?;
    // A bulk string: `$LEN\r\n`, LEN bytes, `\r\n`.
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        reply.extend_from_slice(&chunk[..n]);
        let text = std::str::from_utf8(&reply).ok()?;
        let (header, body) = text.split_once("\r\n")?;
        let len: usize = header.strip_prefix('$')?.parse().ok()?;
        if body.len() >= len {
            return Some(body[..len].to_owned());
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `CLIENT LIST TYPE pubsub`: a line per subscribed connection.
pub async fn pubsub_clients(conn: &mut redis::aio::MultiplexedConnection) -> String {
    redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(conn)
        .await
        .expect("CLIENT LIST")
}

/// Publishes every `(channel, payload)` in one pipeline.
pub async fn publish_all(
    conn: &mut redis::aio::MultiplexedConnection,
    messages: &[(String, Vec<u8>)],
) {
    for chunk in messages.chunks(1000) {
        let mut pipe = redis::pipe();
        for (channel, payload) in chunk {
            pipe.publish(channel, payload.as_slice()).ignore();
        }
        pipe.query_async::<()>(conn)
            .await
            .expect("publish pipeline");
    }
}

/// A bridge running in-process, on any broker: where it listens, and how
/// to stop it. Stopped (without waiting) when dropped.
pub struct Running {
    pub address: SocketAddr,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<Result<(), quotebridge::Error>>>,
}

impl Running {
    /// `quotebridge::run` with `settings`: on the Redis they name.
    pub fn on_redis(settings: Settings) -> Self {
        Self::spawn(|listener, shutdown| quotebridge::run(settings, listener, shutdown))
    }

    /// `quotebridge::serve` with `settings` on `broker`.
    pub fn on_broker<B: quotebridge::broker::Broker>(settings: Settings, broker: B) -> Self {
        Self::spawn(|listener, shutdown| quotebridge::serve(settings, listener, broker, shutdown))
    }

    /// Runs `serve` on a listener of a free port, not waiting for readiness.
    fn spawn<F, Fut>(serve: F) -> Self
    where
        F: FnOnce(TcpListener, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = Result<(), quotebridge::Error>> + Send + 'static,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let address = listener.local_addr().expect("local address");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(serve(listener, shutdown.clone()));
        Self {
            address,
            shutdown,
            handle: Some(handle),
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_until_ready(&self) {
        eventually("the bridge to become ready", async || {
            (http_get(self.address, "/readyz").await.0 == 200).then_some(())
        })
        .await;
    }

    /// Stops the bridge the way SIGTERM would and waits for it to finish.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            within("the bridge to stop", handle)
                .await
                .expect("bridge task")
                .expect("bridge stops cleanly");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The bridge running in-process against its own redis-server.
pub struct TestApp {
    pub address: SocketAddr,
    pub redis: RedisServer,
    pub settings: Settings,
    bridge: Running,
}

/// Starts redis-server and the bridge with default settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Starts redis-server and the bridge; `env` overrides settings like
/// `QUOTEBRIDGE__SECTION__KEY` variables would.
pub async fn spawn_app_with(env: &[(&str, &str)]) -> TestApp {
    let app = spawn_app_on(RedisServer::start().await, env);
    app.wait_until_ready().await;
    app
}

/// Settings from `env` alone, as `QUOTEBRIDGE__…` variables would give
/// them (a later pair overrides an earlier one of the same key).
pub fn settings_with(env: &[(&str, &str)]) -> Settings {
    let vars: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Settings::load_with_env(None, Some(vars)).expect("test settings are valid")
}

/// The bridge on `settings_with(env)`, ready: for a Redis the test set up
/// itself (`env` names it).
pub async fn bridge_with(env: &[(&str, &str)]) -> Running {
    let bridge = Running::on_redis(settings_with(env));
    bridge.wait_until_ready().await;
    bridge
}

/// Starts the bridge against `redis` without waiting for it to be ready.
pub fn spawn_app_on(redis: RedisServer, env: &[(&str, &str)]) -> TestApp {
    let url = redis.url();
    let mut env = env.to_vec();
    env.push(("QUOTEBRIDGE__REDIS__URL", &url));
    let settings = settings_with(&env);
    let bridge = Running::on_redis(settings.clone());
    TestApp {
        address: bridge.address,
        redis,
        settings,
        bridge,
    }
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

impl TestApp {
    /// Waits until `/readyz` answers 200.
    pub async fn wait_until_ready(&self) {
        self.bridge.wait_until_ready().await;
    }

    /// `ws://ADDRESS/ws/{code}`.
    pub fn ws_url(&self, code: &str) -> String {
        format!("ws://{}/ws/{code}", self.address)
    }

    /// Opens a socket for `code` and returns it with its welcome frame.
    pub async fn connect(&self, code: &str) -> (Socket, Value) {
        connect_ws(&self.ws_url(code)).await
    }

    /// A plain HTTP GET; returns status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.address, path).await
    }

    /// The `/stats` counters.
    pub async fn stats(&self) -> Value {
        let (status, body) = self.get("/stats").await;
        assert_eq!(status, 200);
        serde_json::from_str(&body).expect("stats are JSON")
    }

    /// Polls `/stats` until `check` holds.
    pub async fn wait_for_stats(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually(what, async || {
            let stats = self.stats().await;
            check(&stats).then_some(stats)
        })
        .await
    }

    /// Stops the bridge and hands back its Redis, still running.
    pub async fn take_redis(mut self) -> RedisServer {
        self.stop().await;
        let placeholder = RedisServer::detached();
        std::mem::replace(&mut self.redis, placeholder)
    }

    /// Stops the bridge the way SIGTERM would and waits for it to finish.
    pub async fn shutdown(mut self) {
        self.stop().await;
    }

    async fn stop(&mut self) {
        self.bridge.stop().await;
    }
}

/// A raw HTTP/1.1 GET.
pub async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_with_headers(address, path).await;
    (status, body)
}

/// A raw HTTP/1.1 GET: the status, the header block (lower-cased) and the
/// body, within [`DEADLINE`].
pub async fn http_get_with_headers(address: SocketAddr, path: &str) -> (u16, String, String) {
    within(
        &format!("an answer to GET {path}"),
        get_with_headers(address, path),
    )
    .await
}

async fn get_with_headers(address: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .expect("read response");
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// Opens a WebSocket to `url` and returns it with its welcome frame.
pub async fn connect_ws(url: &str) -> (Socket, Value) {
    let (mut socket, _) = within(
        "the WebSocket handshake",
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("WebSocket handshake");
    let welcome = next_json(&mut socket).await;
    assert_eq!(
        welcome["type"], "welcome",
        "first frame is the welcome: {welcome}"
    );
    (socket, welcome)
}

/// The next text frame as JSON (pings and pongs skipped).
pub async fn next_json(socket: &mut Socket) -> Value {
    let text = next_text(socket).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("frame is not JSON ({e}): {text}"))
}

/// The next text frame, verbatim.
pub async fn next_text(socket: &mut Socket) -> String {
    within("a WebSocket frame", async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    })
    .await
}

/// The close frame the server sends next, as (code, reason); frames before
/// it are skipped. Fails the test if the socket ends without one.
pub async fn close_frame(socket: &mut Socket) -> (u16, String) {
    within("a close frame", async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
}

/// Sends `request` and checks that the bridge refuses it with an error
/// whose message says `says`.
pub async fn assert_refused(socket: &mut Socket, request: Value, says: &str) {
    send_json(socket, request.clone()).await;
    let reply = next_json(socket).await;
    assert_eq!(reply["type"], "error", "{request} got {reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| m.contains(says)),
        "{request} got {reply}"
    );
}

/// Sends `value` as a text frame.
pub async fn send_json(socket: &mut Socket, value: Value) {
    socket
        .send(Message::text(value.to_string()))
        .await
        .expect("send frame");
}

/// The next message on a Redis subscription: (channel, payload).
pub async fn next_redis(
    messages: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin),
) -> (String, String) {
    let msg = within("a Redis message", messages.next())
        .await
        .expect("subscription open");
    let payload = String::from_utf8(msg.get_payload_bytes().to_vec()).expect("utf-8 payload");
    (msg.get_channel_name().to_owned(), payload)
}

/// The reference SMA: the mean of the last `window` prices, from scratch.
#[derive(Default)]
pub struct ReferenceSma {
    prices: HashMap<(Option<String>, String), Vec<f64>>,
}

impl ReferenceSma {
    /// Adds a price; returns `(mean, count)` of the window after it.
    pub fn push(
        &mut self,
        client: Option<&str>,
        symbol: &str,
        price: f64,
        window: usize,
    ) -> (f64, usize) {
        let prices = self
            .prices
            .entry((client.map(str::to_owned), symbol.to_owned()))
            .or_default();
        prices.push(price);
        let tail = &prices[prices.len().saturating_sub(window)..];
        (tail.iter().sum::<f64>() / tail.len() as f64, tail.len())
    }
}

/// Asserts `got` is the SMA message expected for that quote.
pub fn assert_sma(got: &Value, want: &Value) {
    for field in ["symbol", "price", "window", "count", "ts", "client"] {
        assert_eq!(
            got.get(field),
            want.get(field),
            "field {field}: got {got}, want {want}"
        );
    }
    let (g, w) = (
        got["sma"].as_f64().expect("sma"),
        want["sma"].as_f64().expect("sma"),
    );
    assert!(
        ((g - w) / w).abs() <= 1e-9,
        "sma {g} differs from {w}: got {got}"
    );
}
