//! The README's "Using it" walkthrough, run as written: its shell lines are
//! read from README.md and executed against the test's own redis-server
//! (`redis-cli` gets `-p PORT`, `cargo run --release --` is the built
//! binary, and the bridge listens on a free port that `tail` finds through
//! `server.listen`, as it would by default).

use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::binary::BIN;
use crate::support::*;

/// The shell lines of the README's "Using it" section, comments removed
/// from the end of each.
fn walkthrough_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Using it\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a \"Using it\" section");
    let mut lines = Vec::new();
    let mut in_shell = false;
    for line in section.lines() {
        match line.trim() {
            "```sh" => in_shell = true,
            "```" => in_shell = false,
            command if in_shell && !command.is_empty() => lines.push(command.to_owned()),
            _ => {}
        }
    }
    lines
}

/// The line of `lines` that contains `needle`.
fn line_with<'a>(lines: &'a [String], needle: &str) -> &'a str {
    lines
        .iter()
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("the walkthrough has no line with {needle:?}: {lines:?}"))
}

/// `line` as a shell command for this test: the built binary for `cargo
/// run --release --`, the test's Redis for `redis-cli`.
fn as_run_here(line: &str, redis_port: u16) -> String {
    line.replace("cargo run --release --", BIN)
        .replace("redis-cli ", &format!("redis-cli -p {redis_port} "))
}

/// Runs `line` through `sh` with `env`, its stdout piped; `exec` so that
/// killing the child kills the command (after the line's own `NAME=value`
/// assignments, which `exec` then passes on).
fn spawn_line(line: &str, env: &[(&str, String)]) -> (Child, Lines<BufReader<ChildStdout>>) {
    let words: Vec<&str> = line.split(' ').collect();
    let assignments = words
        .iter()
        .take_while(|word| word.contains('=') && !word.starts_with('\''))
        .count();
    let script = format!(
        "{} exec {}",
        words[..assignments].join(" "),
        words[assignments..].join(" ")
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("sh -c {line}: {e}"));
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, lines)
}

/// Reads lines until one satisfies `wanted`.
async fn until_line(
    what: &str,
    lines: &mut Lines<BufReader<ChildStdout>>,
    wanted: impl Fn(&str) -> bool,
) -> String {
    within(what, async {
        loop {
            let line = lines
                .next_line()
                .await
                .expect("read stdout")
                .unwrap_or_else(|| panic!("{what}: the command ended"));
            if wanted(&line) {
                return line;
            }
        }
    })
    .await
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or(Value::Null)
}

#[tokio::test]
async fn the_readme_walkthrough_runs_as_written() {
    let lines = walkthrough_lines();
    let redis = RedisServer::start().await;
    let redis_port: u16 = redis
        .url()
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("a port");
    let listen = format!("127.0.0.1:{}", free_port());
    let env = [
        ("QUOTEBRIDGE__REDIS__URL", redis.url()),
        ("QUOTEBRIDGE__SERVER__LISTEN", listen.clone()),
    ];

    // Terminal 1: the bridge.
    let serve = as_run_here(line_with(&lines, "# terminal 1"), redis_port);
    let (_bridge, _) = spawn_line(&serve, &env);
    let address = listen.parse().expect("address");
    eventually("the bridge to become ready", async || {
        (http_get_status(address, "/readyz").await == Some(200)).then_some(())
    })
    .await;

    // Terminals 2 and 3: the output on Redis, and client code acme.
    let subscribe = as_run_here(line_with(&lines, "redis-cli SUBSCRIBE"), redis_port);
    let (_redis_cli, mut on_redis) = spawn_line(&subscribe, &env);
    until_line("redis-cli to subscribe", &mut on_redis, |l| {
        l == "quotes.rejected"
    })
    .await;
    let tail = as_run_here(line_with(&lines, " tail acme"), redis_port);
    let (_tail, mut acme) = spawn_line(&tail, &env);
    until_line("tail's welcome", &mut acme, |l| {
        json(l)["type"] == "welcome"
    })
    .await;

    // Terminal 4: each PUBLISH, and what it shows.
    for line in lines.iter().filter(|l| l.starts_with("redis-cli PUBLISH")) {
        let status = Command::new("sh")
            .arg("-c")
            .arg(as_run_here(line, redis_port))
            .stdout(Stdio::null())
            .status()
            .await
            .expect("run redis-cli");
        assert!(status.success(), "{line}");
    }
    let public = until_line("the public SMA on Redis", &mut on_redis, |l| {
        json(l)["symbol"] == "AAPL"
    })
    .await;
    assert_eq!(json(&public)["sma"], 189.5, "{public}");
    until_line("the rejection notice on Redis", &mut on_redis, |l| {
        l.contains("not a quote")
    })
    .await;
    let first = until_line("the public SMA at acme", &mut acme, |l| {
        json(l)["symbol"] == "AAPL"
    })
    .await;
    assert_eq!(json(&first)["price"], 189.5, "{first}");
    let private = until_line("the private SMA at acme", &mut acme, |l| {
        json(l)["symbol"] == "AAPL"
    })
    .await;
    assert_eq!(
        (
            json(&private)["price"].clone(),
            json(&private)["client"].clone()
        ),
        (Value::from(190.1), Value::from("acme")),
        "{private}"
    );
    let direct = until_line("the direct message at acme", &mut acme, |l| {
        json(l).get("alert").is_some()
    })
    .await;
    assert_eq!(direct, r#"{"alert":"margin call"}"#);

    // Publishing files: every line that ends (not --loop).
    for line in lines
        .iter()
        .filter(|l| l.contains(" publish ") && !l.contains("--loop"))
    {
        let out = Command::new("sh")
            .arg("-c")
            .arg(as_run_here(line, redis_port))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .await
            .expect("run publish");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.starts_with("published "),
            "{line}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The status of `GET path`, if the server answers.
async fn http_get_status(address: std::net::SocketAddr, path: &str) -> Option<u16> {
    tokio::net::TcpStream::connect(address).await.ok()?;
    Some(http_get(address, path).await.0)
}

/// Every `console` block of the README, run line by line in an empty
/// directory: each `$ command` prints exactly the lines shown after it.
#[test]
fn the_readmes_console_examples_print_what_they_show() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let dir = std::env::temp_dir().join(format!("quotebridge-console-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut examples = 0;
    for block in readme.split("```console\n").skip(1) {
        let block = block.split("\n```").next().expect("a closed block");
        // (command, the output shown under it)
        let mut runs: Vec<(String, Vec<&str>)> = Vec::new();
        for line in block.lines() {
            match line.strip_prefix("$ ") {
                Some(command) => runs.push((command.to_owned(), Vec::new())),
                None => runs.last_mut().expect("a command first").1.push(line),
            }
        }
        for (command, shown) in runs {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(command.replace("cargo run -q --release --", BIN))
                .current_dir(&dir)
                .output()
                .expect("run sh");
            let printed = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(printed.lines().collect::<Vec<_>>(), shown, "$ {command}");
            examples += 1;
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(examples >= 3, "the README's console examples were found");
}
