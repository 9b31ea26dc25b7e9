//! The real binary: `serve` + `publish` end to end, SIGTERM, and exit codes.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use serde_json::Value;

use crate::support::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_quotebridge");

/// `quotebridge serve` as a child process, killed on drop.
pub struct Serve {
    pub child: std::process::Child,
    pub address: std::net::SocketAddr,
}

impl Serve {
    /// Starts `quotebridge serve` against `redis` with extra environment
    /// settings, and waits until it is ready.
    pub async fn start(redis: &RedisServer, env: &[(&str, &str)]) -> Self {
        Self::start_with(redis, &[], env, Stdio::null()).await
    }

    /// Like [`Serve::start`], with options before `serve` and a chosen stderr.
    pub async fn start_with(
        redis: &RedisServer,
        options: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Self {
        let args: Vec<&str> = options.iter().copied().chain(["serve"]).collect();
        let url = redis.url();
        let env: Vec<(&str, &str)> = [("QUOTEBRIDGE__REDIS__URL", url.as_str())]
            .into_iter()
            .chain(env.iter().copied())
            .collect();
        Self::launch(&args, &env, stderr).await
    }

    /// Runs the binary with `args` (which must serve) and `env`, on a free
    /// port, and waits until `/readyz` says it is ready.
    pub async fn launch(args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Self {
        Self::launch_on(free_port(), args, env, stderr).await
    }

    /// [`Serve::launch`] on `port`: a bridge restarted where clients knew it.
    pub async fn launch_on(port: u16, args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Self {
        let child = Command::new(BIN)
            .args(args)
            .env("QUOTEBRIDGE__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start quotebridge serve");
        let address = ([127, 0, 0, 1], port).into();
        let serve = Serve { child, address };
        eventually("quotebridge serve to become ready", async || {
            tokio::net::TcpStream::connect(address).await.ok()?;
            (http_get(address, "/readyz").await.0 == 200).then_some(())
        })
        .await;
        serve
    }

    /// This process's `/stats`.
    pub async fn stats(&self) -> Value {
        let (status, body) = http_get(self.address, "/stats").await;
        assert_eq!(status, 200, "GET /stats: {body}");
        serde_json::from_str(&body).expect("stats are JSON")
    }

    /// Asks `/stats` until `check` accepts it; returns those stats.
    pub async fn wait_for_stats(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually(what, async || {
            let stats = self.stats().await;
            check(&stats).then_some(stats)
        })
        .await
    }

    /// The WebSocket URL of client code `code`.
    pub fn ws_url(&self, code: &str) -> String {
        format!("ws://{}/ws/{code}", self.address)
    }

    /// Opens a socket for `code` and returns it with its welcome frame.
    pub async fn connect(&self, code: &str) -> (Socket, Value) {
        connect_ws(&self.ws_url(code)).await
    }

    /// Kills the process at once (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("send SIGTERM");
        assert!(killed.success());
        eventually("quotebridge serve to exit", async || {
            self.child.try_wait().expect("wait for child")
        })
        .await
    }

    /// How many file descriptors the process has open, from /proc.
    pub fn descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .expect("read /proc/PID/fd")
            .count()
    }

    /// The resident set size of the process, in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

/// Sockets of `serve` (client codes `healthy0`, `healthy1`, ...) that read
/// everything and count the SMA frames among it. Socket `i` subscribes to
/// `symbols(i)` first, when that is `Some`; else it keeps the default
/// subscriptions.
pub async fn counting_sockets(
    serve: &Serve,
    count: usize,
    symbols: impl Fn(usize) -> Option<Vec<String>>,
) -> Vec<Arc<AtomicUsize>> {
    let mut received = Vec::new();
    for i in 0..count {
        let url = format!("ws://{}/ws/healthy{i}", serve.address);
        let (mut socket, _) = connect_ws(&url).await;
        if let Some(symbols) = symbols(i) {
            send_json(
                &mut socket,
                serde_json::json!({"op": "subscribe", "symbols": symbols}),
            )
            .await;
            assert_eq!(next_json(&mut socket).await["type"], "subscribed");
        }
        let frames = Arc::new(AtomicUsize::new(0));
        let counter = frames.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = socket.next().await {
                if let Message::Text(text) = message
                    && text.starts_with("{\"symbol\"")
                {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        received.push(frames);
    }
    received
}

/// Quotes to publish: `quotes` of them over `keys` symbols (`S0`...), one
/// result each with a window of 1, at most `per_second` a second.
pub struct Load {
    pub quotes: usize,
    pub keys: usize,
    pub per_second: Option<usize>,
}

/// The most `serve` held while a [`Load`] was published.
pub struct Peaks {
    /// Its resident set, in KiB.
    pub rss_kib: u64,
    /// Its `queued_bytes` gauge, read each time the readers had caught up
    /// (so the bytes are those of the sockets that did not).
    pub queued_bytes: u64,
}

/// Publishes `load` in chunks of 1,000 quotes, letting every counter of
/// `received` catch up after each (to `share(published)` frames), so those
/// readers are never more than a chunk behind however slow the machine.
pub async fn publish_keeping_up(
    serve: &Serve,
    conn: &mut redis::aio::MultiplexedConnection,
    load: &Load,
    received: &[Arc<AtomicUsize>],
    share: impl Fn(usize) -> usize,
) -> Peaks {
    const CHUNK: usize = 1000;
    let mut peaks = Peaks {
        rss_kib: serve.rss_kib(),
        queued_bytes: 0,
    };
    let mut pace = load.per_second.map(|rate| {
        let mut ticks = tokio::time::interval(std::time::Duration::from_secs_f64(
            CHUNK as f64 / rate as f64,
        ));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    });
    for chunk in 0..load.quotes / CHUNK {
        if let Some(ticks) = &mut pace {
            ticks.tick().await;
        }
        let batch: Vec<(String, Vec<u8>)> = (0..CHUNK)
            .map(|i| {
                let n = chunk * CHUNK + i;
                let symbol = n % load.keys;
                let quote = format!(r#"{{"symbol":"S{symbol}","price":{n},"ts":{n}}}"#);
                ("quotes".to_owned(), quote.into_bytes())
            })
            .collect();
        publish_all(conn, &batch).await;
        let want = share((chunk + 1) * CHUNK);
        eventually("healthy sockets to keep up", async || {
            received
                .iter()
                .all(|c| c.load(Ordering::Relaxed) >= want)
                .then_some(())
        })
        .await;
        peaks.rss_kib = peaks.rss_kib.max(serve.rss_kib());
        let queued = serve.stats().await["queued_bytes"].as_u64();
        peaks.queued_bytes = peaks
            .queued_bytes
            .max(queued.expect("stats have queued_bytes"));
    }
    peaks
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("quotebridge-test-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).expect("write temp file");
    path
}

#[tokio::test]
async fn publishing_a_csv_into_serve_produces_the_expected_smas_and_sigterm_stops_it() {
    let redis = RedisServer::start().await;
    let mut serve = Serve::start(&redis, &[("QUOTEBRIDGE__SMA__WINDOW", "3")]).await;
    let mut pubsub = redis.subscribe(&["sma"]).await;
    let mut output = pubsub.on_message();

    let csv = temp_file(
        "quotes.csv",
        "symbol,price,ts\nAAPL,1,10\nAAPL,2,11\nMSFT,5,12\nAAPL,oops,13\nAAPL,3,14\nAAPL,7,15\n",
    );
    let published = Command::new(BIN)
        .args(["publish", csv.to_str().expect("utf-8 path")])
        .env("QUOTEBRIDGE__REDIS__URL", redis.url())
        .output()
        .expect("run quotebridge publish");
    std::fs::remove_file(&csv).ok();
    let stdout = String::from_utf8_lossy(&published.stdout);
    let stderr = String::from_utf8_lossy(&published.stderr);
    assert!(published.status.success(), "publish failed: {stderr}");
    assert!(stdout.contains("published 5 quotes"), "summary: {stdout}");
    assert!(stdout.contains("1 lines rejected"), "summary: {stdout}");
    assert!(
        stderr.contains(":5: invalid price"),
        "rejected line is reported with its number: {stderr}"
    );

    // `publish -` reads standard input: JSON lines here.
    let mut piped = Command::new(BIN)
        .args(["publish", "-"])
        .env("QUOTEBRIDGE__REDIS__URL", redis.url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run quotebridge publish -");
    std::io::Write::write_all(
        &mut piped.stdin.take().expect("stdin"),
        b"{\"symbol\":\"AAPL\",\"price\":9,\"ts\":16}\nnot json\n",
    )
    .expect("write stdin");
    let piped = piped.wait_with_output().expect("publish - exits");
    let stdout = String::from_utf8_lossy(&piped.stdout);
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(piped.status.success(), "publish - failed: {stderr}");
    assert!(stdout.contains("published 1 quotes"), "summary: {stdout}");
    assert!(stderr.contains("stdin:2:"), "{stderr}");

    // Window 3: AAPL 1,2,3 → 2; then 2,3,7 → 4; then 3,7,9 → 6.33.
    for (sma, ts) in [(2.0, 14), (4.0, 15), (19.0 / 3.0, 16)] {
        let (_, payload) = next_redis(&mut output).await;
        let got: Value = serde_json::from_str(&payload).expect("json");
        assert_eq!(
            (
                got["symbol"].as_str(),
                got["sma"].as_f64(),
                got["ts"].as_u64()
            ),
            (Some("AAPL"), Some(sma), Some(ts))
        );
    }
    drop(output);

    // SIGTERM: every socket is closed with 1001, then a clean exit with code 0.
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws/acme", serve.address))
            .await
            .expect("connect");
    assert_eq!(next_json(&mut socket).await["type"], "welcome");
    let status = serve.terminate().await;
    assert_eq!(status.code(), Some(0), "serve exits 0 on SIGTERM");
    assert_eq!(close_frame(&mut socket).await.0, 1001);
    assert!(
        http_get_refused(serve.address).await,
        "the port is released"
    );
}

async fn http_get_refused(address: std::net::SocketAddr) -> bool {
    tokio::net::TcpStream::connect(address).await.is_err()
}

fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run quotebridge")
}

#[test]
fn invalid_configuration_exits_2_naming_the_key() {
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("QUOTEBRIDGE__SMA__WINDOW", "0")], "sma.window"),
        (&[("QUOTEBRIDGE__REDIS__URL", "not a url")], "redis.url"),
        (
            &[("QUOTEBRIDGE__SERVER__LISTEN", "nowhere")],
            "server.listen",
        ),
        (&[("QUOTEBRIDGE__NOPE__KEY", "1")], "nope"),
    ];
    for (env, key) in cases {
        let out = run_with_env(&["serve"], env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(
            stderr.contains(key),
            "{env:?}: stderr should name {key}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "no panic: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    let file = temp_file("bad.toml", "[sma]\nwindow = -3\n");
    let out = run_with_env(&["--config", file.to_str().expect("utf-8"), "serve"], &[]);
    std::fs::remove_file(&file).ok();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("window"));
}

/// `config check`'s one line for a bad configuration.
fn config_check_error(args: &[&str], env: &[(&str, &str)]) -> String {
    let args: Vec<&str> = args.iter().copied().chain(["config", "check"]).collect();
    let out = run_with_env(&args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn config_check_names_the_key_where_it_came_from_and_what_is_allowed() {
    let out = run_with_env(&["config", "check"], &[]);
    assert!(out.status.success(), "the defaults are valid");
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok"));

    let from_env = [
        (
            ("QUOTEBRIDGE__REDIS__INPUT_MODE", "foo"),
            r#"redis.input_mode (from QUOTEBRIDGE__REDIS__INPUT_MODE): "foo" is not a valid value; expected one of: pubsub, stream"#,
        ),
        (
            ("QUOTEBRIDGE__AUTH__MODE", "x"),
            "expected one of: none, token, jwt",
        ),
        (
            ("QUOTEBRIDGE__NODE__ROLE", "boss"),
            "expected one of: all, compute, gateway",
        ),
        (
            ("QUOTEBRIDGE__SMA__WINDOW", "abc"),
            r#"sma.window (from QUOTEBRIDGE__SMA__WINDOW): expected an integer, got string "abc""#,
        ),
        (
            ("QUOTEBRIDGE__SMA__WINDOWW", "3"),
            "sma.windoww (from QUOTEBRIDGE__SMA__WINDOWW): no such key; [sma] has window",
        ),
        (
            ("QUOTEBRIDGE__REDIS__URL", "redis://:hunter2@host:notaport"),
            r#"redis.url (from QUOTEBRIDGE__REDIS__URL): "redis://:***@host:notaport" is not a Redis URL; expected redis://"#,
        ),
        (
            ("QUOTEBRIDGE__REDIS__TLS_CA_FILE", "/etc/ca.pem"),
            "redis.tls_ca_file (from QUOTEBRIDGE__REDIS__TLS_CA_FILE): is for TLS, which a rediss:// URL turns on",
        ),
    ];
    for ((var, value), want) in from_env {
        let stderr = config_check_error(&[], &[(var, value)]);
        assert!(stderr.contains(want), "{var}={value}: {stderr}");
        assert!(!stderr.contains("hunter2"), "no password: {stderr}");
    }

    // The [auth] keys are checked where the authenticator is built, and
    // named alike; `serve` refuses them the same way before it starts.
    let bad_auth = [
        ("QUOTEBRIDGE__AUTH__MODE", "jwt"),
        ("QUOTEBRIDGE__AUTH__JWT_SECRET", "short"),
    ];
    let stderr = config_check_error(&[], &bad_auth);
    assert!(
        stderr.contains("auth.jwt_secret (from QUOTEBRIDGE__AUTH__JWT_SECRET)"),
        "{stderr}"
    );
    let out = run_with_env(&["serve"], &bad_auth);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).ends_with(&stderr));

    let from_file = [
        ("[sma]\nwindow = \n", ":2:10: string values must be quoted"),
        ("[sma]\nwindw = 3\n", "sma.windw (from FILE): no such key"),
        (
            "[node]\nrole = \"boss\"\n",
            "node.role (from FILE): \"boss\"",
        ),
        (
            "[sma]\nwindow = 0\n",
            "sma.window (from FILE): must be between 1",
        ),
    ];
    for (contents, want) in from_file {
        let file = temp_file("check.toml", contents);
        let path = file.to_str().expect("utf-8").to_owned();
        let stderr = config_check_error(&["--config", &path], &[]);
        std::fs::remove_file(&file).ok();
        let want = want.replace("FILE", &path);
        assert!(stderr.contains(&want), "{contents:?}: {stderr}");
    }
}

#[test]
fn config_show_prints_toml_with_origins_and_without_secrets() {
    let file = temp_file(
        "show.toml",
        "[sma]\nwindow = 5\n[auth]\nmode = \"token\"\ntokens = [\"acme=supersecret123\"]\n",
    );
    let path = file.to_str().expect("utf-8").to_owned();
    let out = run_with_env(
        &["--config", &path, "config", "show"],
        &[("QUOTEBRIDGE__REDIS__URL", "redis://:hunter2@127.0.0.1:6380")],
    );
    std::fs::remove_file(&file).ok();
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "[redis]\nurl = \"redis://:***@127.0.0.1:6380\"  # QUOTEBRIDGE__REDIS__URL\n",
        &format!("window = 5  # {path}\n"),
        "emit_partial = false  # the defaults\n",
        &format!("tokens = [\"acme=***\"]  # {path}\n"),
    ] {
        assert!(shown.contains(want), "{want:?} in:\n{shown}");
    }
    assert!(!shown.contains("hunter2") && !shown.contains("supersecret123"));

    // Secrets in every form: a JWT secret of digits (kept a string, with
    // its leading zero), a Unix socket URL's password.
    let out = run_with_env(
        &["config", "show"],
        &[
            ("QUOTEBRIDGE__AUTH__MODE", "jwt"),
            ("QUOTEBRIDGE__AUTH__JWT_SECRET", "0123456789012345678"),
            (
                "QUOTEBRIDGE__REDIS__URL",
                "unix:///run/redis.sock?pass=hunter2",
            ),
        ],
    );
    let secrets = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(secrets.contains("jwt_secret = \"***\""), "{secrets}");
    assert!(
        secrets.contains("url = \"unix:///run/redis.sock?pass=***\""),
        "{secrets}"
    );
    assert!(!secrets.contains("123456789012345678") && !secrets.contains("hunter2"));
    // A wrongly typed secret is not repeated in the error either.
    let file = temp_file("typed.toml", "[auth]\ntokens = \"acme=supersecret123\"\n");
    let path = file.to_str().expect("utf-8").to_owned();
    let stderr = config_check_error(&["--config", &path], &[]);
    std::fs::remove_file(&file).ok();
    assert!(
        stderr.contains("auth.tokens") && !stderr.contains("supersecret123"),
        "{stderr}"
    );

    // What it prints is a configuration file that loads to the same values
    // (but for the secrets it hides).
    let again = temp_file("shown.toml", &shown);
    let again_path = again.to_str().expect("utf-8").to_owned();
    let out = run_with_env(&["--config", &again_path, "config", "show"], &[]);
    std::fs::remove_file(&again).ok();
    let reshown = String::from_utf8_lossy(&out.stdout).replace(&again_path, "SOURCE");
    let normalized = shown
        .replace(&path, "SOURCE")
        .replace("QUOTEBRIDGE__REDIS__URL", "SOURCE");
    assert_eq!(
        reshown
            .lines()
            .map(|l| l.split("  #").next())
            .collect::<Vec<_>>(),
        normalized
            .lines()
            .map(|l| l.split("  #").next())
            .collect::<Vec<_>>()
    );
}

#[test]
fn unreachable_servers_are_named_with_the_url_tried() {
    let port = free_port();
    let out = run_with_env(
        &["publish", "data/quotes.csv"],
        &[(
            "QUOTEBRIDGE__REDIS__URL",
            &format!("redis://:hunter2@127.0.0.1:{port}"),
        )],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach redis://:***@127.0.0.1:{port}")),
        "{stderr}"
    );
    let out = run_with_env(
        &["tail", "demo", "--url", &format!("ws://127.0.0.1:{port}")],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach ws://127.0.0.1:{port}/ws/demo")),
        "{stderr}"
    );
}

#[test]
fn every_command_has_help() {
    for command in [
        "serve", "publish", "demo", "bench", "tail", "health", "config",
    ] {
        let out = run_with_env(&[command, "--help"], &[]);
        assert!(out.status.success(), "{command} --help");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
    }
    let out = run_with_env(&["publish"], &[]);
    assert_eq!(out.status.code(), Some(2), "missing FILE is a usage error");
}

/// `quotebridge health` is what the container image's HEALTHCHECK runs.
#[tokio::test]
async fn health_answers_for_a_running_bridge_and_fails_naming_the_url_for_none() {
    let redis = RedisServer::start().await;
    let serve = Serve::start(&redis, &[]).await;
    // Listening on every address: the check asks loopback.
    let listen = format!("0.0.0.0:{}", serve.address.port());
    for args in [&["health"][..], &["health", "--ready"]] {
        let out = run_with_env(args, &[("QUOTEBRIDGE__SERVER__LISTEN", &listen)]);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(serve);

    let nobody = format!("127.0.0.1:{}", free_port());
    let out = run_with_env(&["health"], &[("QUOTEBRIDGE__SERVER__LISTEN", &nobody)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("http://{nobody}/healthz")),
        "{stderr}"
    );
}

/// `quotebridge tail ARGS` running, its standard output read a JSON line
/// at a time.
struct Tail {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Tail {
    fn start(args: &[&str]) -> Self {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(BIN)
            .arg("tail")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start quotebridge tail");
        let stdout = child.stdout.take().expect("stdout");
        let lines = tokio::io::BufReader::new(stdout).lines();
        Self { child, lines }
    }

    /// The next line it prints, as JSON.
    async fn next(&mut self) -> Value {
        let line = within("a line from tail", self.lines.next_line())
            .await
            .expect("read stdout")
            .expect("tail is still running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }
}

#[tokio::test]
async fn tail_prints_what_the_group_receives_one_json_per_line() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__SMA__WINDOW", "1")]).await;
    let url = format!("ws://{}", app.address);
    let mut tail = Tail::start(&["acme", "--symbols", "AAPL", "--url", &url]);
    assert_eq!(tail.next().await["type"], "welcome");
    // tail swaps the default "*" for AAPL: two replies, the last one final.
    assert_eq!(tail.next().await["type"], "subscribed");
    assert_eq!(tail.next().await["symbols"], serde_json::json!(["AAPL"]));

    let mut conn = app.redis.connection().await;
    let quote = |s: &str| {
        (
            "quotes".to_owned(),
            format!(r#"{{"symbol":"{s}","price":3,"ts":1}}"#).into_bytes(),
        )
    };
    publish_all(&mut conn, &[quote("MSFT"), quote("AAPL")]).await;
    let sma = tail.next().await;
    assert_eq!(
        (sma["symbol"].as_str(), sma["sma"].as_f64()),
        (Some("AAPL"), Some(3.0))
    );
    publish_all(
        &mut conn,
        &[("client.acme".to_owned(), br#"{"note":"hi"}"#.to_vec())],
    )
    .await;
    assert_eq!(tail.next().await["note"], "hi");
    app.shutdown().await;
    let out = within(
        "tail to exit when the server closes",
        tail.child.wait_with_output(),
    )
    .await
    .expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a close it did not ask for: {stderr}"
    );
    assert!(
        stderr.contains("the bridge closed the connection: 1001 going away"),
        "{stderr}"
    );
}

/// `tail --token`: the token goes in the Authorization header; without it
/// the bridge's refusal is what tail reports.
#[tokio::test]
async fn tail_connects_with_a_token() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__AUTH__MODE", "token"),
        ("QUOTEBRIDGE__AUTH__TOKENS", "acme=s3cret-acme"),
    ])
    .await;
    let url = format!("ws://{}", app.address);
    // The bridge runs on this test's runtime: the refused tail is awaited.
    let out = tokio::process::Command::new(BIN)
        .args(["tail", "acme", "--url", &url])
        .output();
    let out = within("tail to be refused", out).await.expect("run tail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");

    let mut tail = Tail::start(&["acme", "--url", &url, "--token", "s3cret-acme"]);
    let welcome = tail.next().await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["client"], "acme");
    app.shutdown().await;
}

/// `tail --resume` follows a bridge that restarts: it reconnects, asks for
/// what it missed after each key's last position, and goes on printing.
#[tokio::test]
async fn tail_resumes_after_the_bridge_restarts() {
    let redis = RedisServer::start().await;
    let port = free_port();
    let url = redis.url();
    let env = [
        ("QUOTEBRIDGE__REDIS__URL", url.as_str()),
        ("QUOTEBRIDGE__SMA__WINDOW", "1"),
    ];
    let mut first = Serve::launch_on(port, &["serve"], &env, Stdio::null()).await;
    let url = format!("ws://127.0.0.1:{port}");
    let mut tail = Tail::start(&["acme", "--resume", "--url", &url]);
    assert_eq!(tail.next().await["type"], "welcome");
    assert_eq!(
        tail.next().await["type"],
        "resumed",
        "an empty resume makes it live"
    );
    let mut conn = redis.connection().await;
    let quote = |price: u32| {
        (
            "quotes".to_owned(),
            format!(r#"{{"symbol":"AAPL","price":{price},"ts":{price}}}"#).into_bytes(),
        )
    };
    publish_all(&mut conn, &[quote(1)]).await;
    assert_eq!(tail.next().await["seq"], 1);

    first.terminate().await;
    let _second = Serve::launch_on(port, &["serve"], &env, Stdio::null()).await;
    assert_eq!(tail.next().await["type"], "welcome", "reconnected");
    let resumed = tail.next().await;
    assert_eq!(resumed["type"], "resumed", "{resumed}");
    // A restarted pub/sub bridge starts AAPL over in a new epoch: the gap
    // is reported, as the protocol says, not hidden.
    assert_eq!(
        resumed["unrecovered"]["public"],
        serde_json::json!(["AAPL"])
    );
    publish_all(&mut conn, &[quote(2)]).await;
    let sma = tail.next().await;
    assert_eq!(
        (sma["symbol"].as_str(), sma["seq"].as_u64()),
        (Some("AAPL"), Some(1))
    );
    assert!(
        tail.child.try_wait().expect("poll").is_none(),
        "tail goes on"
    );
}

/// `--redis-url` and `--listen` set their keys over the environment, for
/// every command.
#[tokio::test]
async fn flags_set_the_redis_url_and_the_listen_address() {
    let redis = RedisServer::start().await;
    let (env_port, flag_port) = (free_port(), free_port());
    let listen = format!("127.0.0.1:{flag_port}");
    let mut serve = Command::new(BIN)
        .args(["serve", "--redis-url", &redis.url(), "--listen", &listen])
        .env(
            "QUOTEBRIDGE__SERVER__LISTEN",
            format!("127.0.0.1:{env_port}"),
        )
        .env("QUOTEBRIDGE__REDIS__URL", "redis://127.0.0.1:1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start serve");
    let address: std::net::SocketAddr = listen.parse().expect("address");
    eventually("serve to be ready where --listen says", async || {
        tokio::net::TcpStream::connect(address).await.ok()?;
        (http_get(address, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    let published = tokio::process::Command::new(BIN)
        .args(["publish", "data/quotes.csv", "--redis-url", &redis.url()])
        .env("QUOTEBRIDGE__REDIS__URL", "redis://127.0.0.1:1")
        .output();
    let published = within("publish", published).await.expect("run publish");
    let stderr = String::from_utf8_lossy(&published.stderr);
    assert!(published.status.success(), "{stderr}");
    let _ = serve.kill();
    let _ = serve.wait();
}

/// `publish --stream` into a stream nobody reads says so (and appends
/// anyway: a bridge started later applies what waits); once a consumer
/// group exists it says nothing.
#[tokio::test]
async fn publish_to_a_stream_nobody_reads_warns() {
    let redis = RedisServer::start().await;
    let publish = async || {
        let out = tokio::process::Command::new(BIN)
            .args([
                "publish",
                "data/quotes.csv",
                "--stream",
                "--redis-url",
                &redis.url(),
            ])
            .output();
        let out = within("publish --stream", out).await.expect("run publish");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = publish().await;
    assert!(
        stderr.contains("stream \"quotes.stream\" has no consumer group")
            && stderr.contains("QUOTEBRIDGE__REDIS__INPUT_MODE=stream quotebridge serve"),
        "{stderr}"
    );
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", "quotes.stream", "quotebridge", "0"])
        .query_async(&mut conn)
        .await
        .expect("a group");
    let stderr = publish().await;
    assert!(!stderr.contains("no consumer group"), "{stderr}");
}

/// A port in use: `serve` and `demo` both say how to choose another.
#[test]
fn a_port_in_use_is_reported_with_how_to_choose_another() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    for command in ["serve", "demo"] {
        let out = run_with_env(&[command, "--listen", &address], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "cannot listen on {address} (choose another address with --listen HOST:PORT or QUOTEBRIDGE__SERVER__LISTEN)"
            )),
            "{command}: {stderr}"
        );
    }
}

/// A refusal that retrying cannot cure ends `publish` at once, in one line
/// of Redis's words: an ACL user without PUBLISH, a wrong password.
#[tokio::test]
async fn publish_stops_at_a_permanent_refusal_in_one_line() {
    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "limited", "on", ">pw", "~*", "-@all", "+ping"])
        .query_async(&mut conn)
        .await
        .expect("an ACL user without PUBLISH");
    for (credentials, words) in [
        (
            "limited:pw",
            "NOPERM this user has no permissions to run the 'publish' command (each of",
        ),
        (
            "limited:wrong",
            "authentication failed: Redis refused the user name and password in the URL",
        ),
    ] {
        let url = redis
            .url()
            .replace("redis://", &format!("redis://{credentials}@"));
        let out = tokio::process::Command::new(BIN)
            .args(["publish", "data/quotes.csv"])
            .env("QUOTEBRIDGE__REDIS__URL", url)
            .output();
        let out = within("publish to give up", out)
            .await
            .expect("run publish");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(words), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.len() < 300, "one short line: {stderr}");
    }
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_stable_fields() {
    let redis = RedisServer::start().await;
    let options = ["--log-format", "json"];
    let env = [("RUST_LOG", "info")];
    let mut serve = Serve::start_with(&redis, &options, &env, Stdio::piped()).await;
    serve.terminate().await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut serve.child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read logs");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() >= 3,
        "startup, ready and shutdown lines: {stderr}"
    );
    for line in lines {
        let entry: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(entry.get(field).is_some(), "no {field} in {line}");
        }
    }
    assert!(stderr.contains("\"message\":\"stopped\""), "{stderr}");
}
