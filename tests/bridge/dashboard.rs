//! The dashboard in a real browser: headless Chromium driven over WebDriver
//! shows the SMAs the test computed, draws the chart, and lists a direct
//! message. Needs `chromium` and `chromium-driver` (Debian packages; .ci/run
//! installs them).

use std::process::{Child, Command, Stdio};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::support::*;

/// chromedriver on a free port, killed on drop.
struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    async fn start() -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start chromedriver ({e}); the dashboard test needs it: \
                     `sudo apt-get install -y chromium chromium-driver` (Debian/Ubuntu)"
                )
            });
        eventually("chromedriver to listen", async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(drop)
        })
        .await;
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Chromium (or Chrome) binary on PATH.
fn chromium() -> String {
    let names = [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ];
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|path| path.is_file())
        .map(|path| path.display().to_string())
        .unwrap_or_else(|| {
            panic!(
                "no chromium on PATH; the dashboard test needs it: \
                 `sudo apt-get install -y chromium chromium-driver` (Debian/Ubuntu)"
            )
        })
}

async fn browser(driver: &ChromeDriver, profile: &std::path::Path) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium(),
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1280,800",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session in headless Chromium")
}

/// Polls `check` (a JavaScript expression) until it returns true.
async fn wait_until(browser: &Client, what: &str, check: &str) {
    let script = format!("return Boolean({check});");
    eventually(what, async || {
        let answer = browser.execute(&script, vec![]).await.ok();
        (answer.and_then(|v| v.as_bool()) == Some(true)).then_some(())
    })
    .await;
}

/// Publishes `payload` (a margin call) on `client`'s direct channel and
/// waits until the dashboard lists it.
async fn show_margin_call(
    browser: &Client,
    conn: &mut redis::aio::MultiplexedConnection,
    client: &str,
    payload: &str,
) {
    let message = (format!("client.{client}"), payload.as_bytes().to_vec());
    publish_all(conn, &[message]).await;
    wait_until(
        browser,
        "the direct message",
        "document.getElementById('direct').textContent.includes('margin call')",
    )
    .await;
}

/// A browser of its own (profile `name`) showing the dashboard at
/// `/?{query}`, its socket open. Keep the driver: dropping it ends the browser.
async fn open_dashboard(
    address: std::net::SocketAddr,
    name: &str,
    query: &str,
) -> (ChromeDriver, Client, std::path::PathBuf) {
    let driver = ChromeDriver::start().await;
    let profile = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let browser = browser(&driver, &profile).await;
    browser
        .goto(&format!("http://{address}/?{query}"))
        .await
        .expect("open the dashboard");
    wait_until(
        &browser,
        "the socket to open",
        "document.getElementById('status').dataset.state === 'open'",
    )
    .await;
    (driver, browser, profile)
}

#[tokio::test]
async fn the_dashboard_shows_live_smas_a_chart_and_direct_messages() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__SMA__WINDOW", "3")]).await;
    let (_driver, browser, profile) =
        open_dashboard(app.address, "quotebridge-chromium", "client=acme").await;

    // Window 3 over 1, 2, 4, 9: the SMAs are 7/3 and 5.
    let mut conn = app.redis.connection().await;
    let quotes: Vec<(String, Vec<u8>)> = [1.0, 2.0, 4.0, 9.0]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                "quotes".to_owned(),
                json!({"symbol": "AAPL", "price": p, "ts": 1_700_000_000_000u64 + i as u64})
                    .to_string()
                    .into_bytes(),
            )
        })
        .collect();
    publish_all(&mut conn, &quotes).await;
    let row = "document.querySelector('tr[data-symbol=\"AAPL\"]')";
    wait_until(
        &browser,
        "the table to show the last SMA",
        &format!("{row} && {row}.querySelector('td.sma').textContent === '5.000'"),
    )
    .await;
    let price = browser
        .find(Locator::Css("tr[data-symbol='AAPL'] td.price"))
        .await
        .expect("price cell")
        .text()
        .await
        .expect("text");
    assert_eq!(price, "9.000");
    let count = browser
        .find(Locator::Css("tr[data-symbol='AAPL'] td.count"))
        .await
        .expect("count cell")
        .text()
        .await
        .expect("text");
    assert_eq!(count, "3/3");
    wait_until(
        &browser,
        "the chart to be drawn",
        "Number(document.getElementById('chart').dataset.points) === 2",
    )
    .await;

    show_margin_call(&browser, &mut conn, "acme", r#"{"alert":"margin call"}"#).await;

    browser.close().await.expect("close the browser");
    let _ = std::fs::remove_dir_all(&profile);
    app.shutdown().await;
}

/// The candlestick chart: the selected symbol's candles (closed ones and the
/// open one), their volumes and an EMA line, from the series the bridge
/// serves, subscribed as the symbol is selected.
#[tokio::test]
async fn the_dashboard_charts_the_selected_symbol_s_candles_volume_and_ema() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let settings = crate::series::settings_from_file(
        crate::series::SERIES,
        &[
            ("QUOTEBRIDGE__REDIS__URL", &url),
            ("QUOTEBRIDGE__SMA__WINDOW", "1"),
        ],
    );
    let bridge = Running::on_redis(settings);
    bridge.wait_until_ready().await;
    let (_driver, browser, profile) =
        open_dashboard(bridge.address, "quotebridge-candles", "client=acme").await;
    let quote = |ts: u64, price: u32, volume: u32| {
        (
            "quotes".to_owned(),
            json!({"symbol": "AAPL", "price": price, "volume": volume, "ts": ts})
                .to_string()
                .into_bytes(),
        )
    };
    let mut conn = redis.connection().await;
    // The first quote makes AAPL's row, which is selected and charted: its
    // open candle comes as the subscription's snapshot.
    publish_all(&mut conn, &[quote(60_000, 10, 1)]).await;
    let candles = "document.getElementById('candles').dataset";
    wait_until(
        &browser,
        "AAPL's first candle",
        &format!("charted === 'AAPL' && {candles}.candles === '1'"),
    )
    .await;
    publish_all(
        &mut conn,
        &[
            quote(61_000, 12, 2),
            quote(120_000, 11, 1),
            quote(121_000, 9, 3),
            quote(180_000, 10, 1),
        ],
    )
    .await;
    wait_until(
        &browser,
        "two closed candles, the open one and the EMA under them",
        &format!("{candles}.candles === '3' && {candles}.closed === '2' && {candles}.ema === '5'"),
    )
    .await;
    let shown = browser
        .execute(
            "return [document.getElementById('candle-panel').hidden, \
             document.getElementById('candles-name').textContent, \
             document.getElementById('candle-series').textContent, \
             document.getElementById('ema-name').textContent, \
             [...candles.values()].map((b) => [b.open, b.high, b.low, b.close, b.volume])];",
            vec![],
        )
        .await
        .expect("read the chart's state");
    assert_eq!(
        shown,
        json!([
            false,
            "AAPL",
            "(candles.1m)",
            "━ ema.2",
            [[10, 12, 10, 12, 3], [11, 11, 9, 9, 4], [10, 10, 10, 10, 1]]
        ])
    );
    browser.close().await.expect("close the browser");
    let _ = std::fs::remove_dir_all(&profile);
}

/// Drops the dashboard's socket while `quotes` are published (and
/// computed), then reconnects it as its retry would.
async fn away_while(
    browser: &Client,
    app: &TestApp,
    output: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin),
    quotes: &[(String, Vec<u8>)],
) {
    browser
        .execute("manualClose = true; socket.close();", vec![])
        .await
        .expect("close the page's socket");
    wait_until(
        browser,
        "the socket to close",
        "socket.readyState === WebSocket.CLOSED",
    )
    .await;
    publish_all(&mut app.redis.connection().await, quotes).await;
    for _ in quotes {
        next_redis(output).await;
    }
    browser
        .execute("connect();", vec![])
        .await
        .expect("reconnect");
}

#[tokio::test]
async fn the_dashboard_resumes_after_a_drop_and_shows_whether_it_recovered() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__SMA__EMIT_PARTIAL", "true"),
        ("QUOTEBRIDGE__WEBSOCKET__HISTORY_SIZE", "5"),
    ])
    .await;
    let mut output = app.redis.subscribe(&["sma"]).await;
    let mut output = output.on_message();
    let (_driver, browser, profile) =
        open_dashboard(app.address, "quotebridge-resume", "client=acme").await;
    let quotes = |prices: std::ops::Range<u32>| -> Vec<(String, Vec<u8>)> {
        prices
            .map(|p| {
                let quote = json!({"symbol": "AAPL", "price": p});
                ("quotes".to_owned(), quote.to_string().into_bytes())
            })
            .collect()
    };
    publish_all(&mut app.redis.connection().await, &quotes(1..2)).await;
    next_redis(&mut output).await;
    let price = "document.querySelector('tr[data-symbol=\"AAPL\"] td.price')";
    wait_until(
        &browser,
        "the first price",
        &format!("{price}?.textContent === '1.000'"),
    )
    .await;

    // Three updates while away: all recovered, the chart has every point.
    away_while(&browser, &app, &mut output, &quotes(2..5)).await;
    let recovery = "document.getElementById('recovery')";
    wait_until(
        &browser,
        "the recovery to be shown",
        &format!("{recovery}.dataset.state === 'recovered' && {recovery}.textContent.includes('3 missed')"),
    )
    .await;
    wait_until(
        &browser,
        "the last price",
        &format!("{price}.textContent === '4.000'"),
    )
    .await;
    wait_until(
        &browser,
        "every point on the chart",
        "Number(document.getElementById('chart').dataset.points) === 4",
    )
    .await;

    // Ten while away, beyond the history of five: a gap, and the latest value.
    away_while(&browser, &app, &mut output, &quotes(5..15)).await;
    wait_until(
        &browser,
        "the gap to be shown",
        &format!(
            "{recovery}.dataset.state === 'gap' && {recovery}.textContent.includes('1 symbol could not')"
        ),
    )
    .await;
    wait_until(
        &browser,
        "the latest price",
        &format!("{price}.textContent === '14.000'"),
    )
    .await;

    // A key the resume could not recover is greyed until its next result.
    // (The bridge sends its latest value at once, which clears the mark:
    // the reply is given to the page here as the socket would.)
    let row = "document.querySelector('tr[data-symbol=\"AAPL\"]')";
    browser
        .execute(
            r#"onFrame('{"type":"resumed","recovered":false,"replayed":0,"unrecovered":{"public":["AAPL"],"private":[]}}');"#,
            vec![],
        )
        .await
        .expect("a resume reply");
    wait_until(
        &browser,
        "the row to be stale",
        &format!("{row}.classList.contains('stale')"),
    )
    .await;
    publish_all(&mut app.redis.connection().await, &quotes(15..16)).await;
    wait_until(
        &browser,
        "a fresh value to clear it",
        &format!("{price}.textContent === '15.000' && !{row}.classList.contains('stale')"),
    )
    .await;
    browser.close().await.expect("close the browser");
    let _ = std::fs::remove_dir_all(&profile);
    app.shutdown().await;
}

/// A browser's own `EventSource` on `/sse/{code}` (allowed by the page's
/// Content-Security-Policy): results with their ids, and direct messages.
#[tokio::test]
async fn a_browser_event_source_receives_results_with_ids_and_direct_messages() {
    let app = spawn_app_with(&[("QUOTEBRIDGE__SMA__WINDOW", "1")]).await;
    let (_driver, browser, profile) =
        open_dashboard(app.address, "quotebridge-sse", "client=acme").await;
    let script = "window.got = []; const source = new EventSource('/sse/acme?symbols=AAPL'); \
        source.onmessage = (e) => window.got.push({ id: e.lastEventId, data: JSON.parse(e.data) }); \
        source.addEventListener('direct', (e) => window.got.push({ direct: e.data })); \
        source.onopen = () => { window.sourceOpen = true; };";
    browser
        .execute(script, vec![])
        .await
        .expect("open an EventSource");
    wait_until(
        &browser,
        "the event stream to open",
        "window.sourceOpen === true",
    )
    .await;
    let mut conn = app.redis.connection().await;
    let messages = [
        (
            "quotes".to_owned(),
            br#"{"symbol":"AAPL","price":7}"#.to_vec(),
        ),
        ("client.acme".to_owned(), b"margin call".to_vec()),
    ];
    publish_all(&mut conn, &messages).await;
    wait_until(&browser, "both events", "window.got.length >= 2").await;
    let got = browser
        .execute("return window.got;", vec![])
        .await
        .expect("read the events");
    let epoch = got[0]["data"]["epoch"]
        .as_str()
        .expect("an SMA with an epoch");
    assert_eq!(got[0]["id"], format!("{epoch}:1:p:AAPL"), "{got}");
    assert_eq!(got[0]["data"]["price"], 7.0);
    assert_eq!(got[1]["direct"], "margin call", "{got}");
    browser.close().await.expect("close the browser");
    let _ = std::fs::remove_dir_all(&profile);
    app.shutdown().await;
}

/// What a user sees after starting `demo`: every sample symbol in the
/// table, a chart that has run for a while, and a direct message. The
/// screenshot is the README's picture (`script/dashboard-screenshot` copies
/// it to docs/dashboard.png).
#[tokio::test]
async fn the_demo_dashboard_as_a_user_sees_it() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let demo = crate::binary::Serve::launch(
        &["demo"],
        &[("QUOTEBRIDGE__REDIS__URL", url.as_str())],
        std::process::Stdio::null(),
    )
    .await;
    let (_driver, browser, profile) =
        open_dashboard(demo.address, "quotebridge-demo", "client=demo").await;
    // The sample has 8 symbols; the chart follows the first row selected.
    wait_until(
        &browser,
        "every sample symbol in the table",
        "document.querySelectorAll('#rows tr').length >= 8",
    )
    .await;
    let mut conn = redis.connection().await;
    let margin_call = r#"{"alert":"margin call","account":"demo-7","level":3}"#;
    show_margin_call(&browser, &mut conn, "demo", margin_call).await;
    wait_until(
        &browser,
        "the chart to have run a while, and a candle to have closed",
        "Number(document.getElementById('chart').dataset.points) >= 40 \
         && Number(document.getElementById('candles').dataset.closed) >= 2",
    )
    .await;
    let png = browser.screenshot().await.expect("screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-demo.png");
    std::fs::write(&path, png).expect("save the screenshot");
    eprintln!("dashboard screenshot: {}", path.display());
    browser.close().await.expect("close the browser");
    let _ = std::fs::remove_dir_all(&profile);
}

/// Last round's stored XSS: a direct message shaped like a result, with
/// markup in its symbol, must render as text, run nothing, and the token
/// must leave the address bar.
#[tokio::test]
async fn hostile_frames_render_as_text_and_the_token_leaves_the_address_bar() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__AUTH__MODE", "token"),
        ("QUOTEBRIDGE__AUTH__TOKENS", "acme=t0ken-of-acme"),
    ])
    .await;
    let (status, head, _) = http_get_with_headers(app.address, "/").await;
    assert_eq!(status, 200);
    for header in [
        "content-security-policy: default-src 'none'; script-src 'self';",
        "x-content-type-options: nosniff",
    ] {
        assert!(head.contains(header), "{header:?} missing from {head}");
    }
    let (status, head, body) = http_get_with_headers(app.address, "/dashboard.js").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/javascript"), "{head}");
    assert!(
        !body.contains("innerHTML"),
        "the page builds no HTML from strings"
    );

    let (_driver, browser, profile) = open_dashboard(
        app.address,
        "quotebridge-chromium-xss",
        "client=acme&token=t0ken-of-acme",
    )
    .await;
    let address = browser.current_url().await.expect("current url");
    assert!(
        !address.as_str().contains("t0ken"),
        "token still in {address}"
    );
    assert_eq!(address.query(), Some("client=acme"));

    let symbol = "<img src=x onerror=window.pwned=1>";
    let forged = json!({"symbol": symbol, "client": "<b>x</b>", "sma": 1, "window": 1, "price": 1, "count": 1, "ts": 0});
    let mut conn = app.redis.connection().await;
    publish_all(
        &mut conn,
        &[
            ("client.acme".to_owned(), forged.to_string().into_bytes()),
            (
                "client.acme".to_owned(),
                b"<img src=y onerror=window.pwned=2>".to_vec(),
            ),
        ],
    )
    .await;
    wait_until(
        &browser,
        "the forged row and the direct message",
        "document.getElementById('rows').children.length === 1 \
         && document.getElementById('direct').textContent.includes('src=y')",
    )
    .await;
    let cell = browser
        .find(Locator::Css("#rows td"))
        .await
        .expect("symbol cell")
        .text()
        .await
        .expect("text");
    assert_eq!(cell, format!("{symbol} (<b>x</b>)"), "shown as text");
    let injected: serde_json::Value = browser
        .execute(
            "return document.querySelectorAll('main img, main b').length + (window.pwned || 0);",
            vec![],
        )
        .await
        .expect("count injected elements");
    assert_eq!(
        injected,
        json!(0),
        "no element and no script came from a frame"
    );

    // Even markup that does reach the DOM cannot run: the CSP allows no
    // inline handler. (The test itself inserts it, as a bug would.)
    browser
        .execute(
            "const probe = document.createElement('img');\
             probe.setAttribute('onerror', 'window.pwned = 3');\
             probe.addEventListener('error', () => { window.probed = true; });\
             probe.src = 'x';\
             document.body.append(probe);\
             return true;",
            vec![],
        )
        .await
        .expect("insert a probe");
    // Listeners run in the order they were added: once the probe's own
    // listener has run, the inline handler has run too, had the CSP let it.
    wait_until(
        &browser,
        "the probe's load to fail",
        "window.probed === true",
    )
    .await;
    let pwned = browser
        .execute("return window.pwned || 0;", vec![])
        .await
        .expect("read");
    assert_eq!(pwned, json!(0), "an inline handler ran despite the CSP");

    // An epoch named "__proto__" (valid by the name rules) stays a plain
    // key: the resume after a drop names it, and nothing reaches
    // Object.prototype.
    let proto = json!({"symbol": "client", "sma": 1, "window": 1, "price": 1, "count": 1, "ts": 0, "seq": 1, "epoch": "__proto__"});
    publish_all(
        &mut conn,
        &[("client.acme".to_owned(), proto.to_string().into_bytes())],
    )
    .await;
    wait_until(
        &browser,
        "the __proto__ row",
        "document.querySelector('tr[data-symbol=\"client\"]') !== null",
    )
    .await;
    let request = browser
        .execute("return JSON.stringify(resumeRequest());", vec![])
        .await
        .expect("the resume request");
    assert!(
        request
            .as_str()
            .is_some_and(|r| r.contains(r#""__proto__":{"client":1}"#)),
        "{request}"
    );
    browser
        .execute("manualClose = true; socket.close(); connect();", vec![])
        .await
        .expect("reconnect");
    wait_until(
        &browser,
        "the resume's answer",
        "document.getElementById('recovery').dataset.state === 'gap'",
    )
    .await;
    let polluted = browser
        .execute(
            "return Object.prototype.hasOwnProperty('client') || ({}).client !== undefined;",
            vec![],
        )
        .await
        .expect("read");
    assert_eq!(polluted, json!(false), "Object.prototype was polluted");

    // A wrong token: the page says so and stops retrying, rather than show
    // `closed (1006)` for ever.
    browser
        .goto(&format!("http://{}/?client=acme&token=wrong", app.address))
        .await
        .expect("open with a wrong token");
    wait_until(
        &browser,
        "authentication failed to be shown",
        "document.getElementById('status').dataset.state === 'auth-failed' \
         && document.getElementById('status').textContent === 'authentication failed'",
    )
    .await;

    browser.close().await.expect("close the browser");
    let _ = std::fs::remove_dir_all(&profile);
    app.shutdown().await;
}
