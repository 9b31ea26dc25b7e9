//! The HTTP side: the WebSocket endpoint and the operational routes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, Grant};
use crate::config::Settings;
use crate::hub::Hub;
use crate::hub::{Admission, AdmitError};
use crate::metrics::Metrics;
use crate::names;
use crate::rate::TokenBucket;
use crate::stats::{Gauges, Stats};
use crate::websocket::{Upgrade, UpgradeRejection};
use crate::{session, sse};

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Live settings.
    pub settings: Arc<Settings>,
    /// The socket hub.
    pub hub: Hub,
    /// Checks client tokens.
    pub auth: Arc<Authenticator>,
    /// The Prometheus exposition.
    pub metrics: Arc<Metrics>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Each flag is true while one input is established (the subscription,
    /// and in stream mode the consumer); ready when all are.
    pub ready: Vec<Arc<AtomicBool>>,
    /// Cancelled when the bridge shuts down.
    pub shutdown: CancellationToken,
    /// Tracks session tasks so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// One permit per open WebSocket (`server.max_connections`).
    pub connections: Arc<Semaphore>,
}

/// The bridge's routes.
pub fn router(state: AppState) -> Router {
    let routes = Router::new();
    // A compute node has no sockets: only health, readiness and counters.
    let routes = if state.settings.node.role.serves_sockets() {
        routes
            .route("/ws/{*client_code}", get(upgrade))
            .route("/ws", get(missing_client_code))
            .route("/ws/", get(missing_client_code))
            .route("/sse/{*client_code}", get(event_stream))
            .route("/", get(dashboard))
            .route("/dashboard.js", get(dashboard_script))
            .route("/dashboard.css", get(dashboard_styles))
    } else {
        routes
    };
    routes
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), pace))
        .layer(axum::middleware::from_fn(require_host))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// HTTP requests one kept-alive connection may make a second (after a burst
/// of as many). A monitor asks every few seconds and a browser loads the
/// dashboard in four requests; a client asking `/stats` in a loop as fast as
/// it can would otherwise take a core from everyone else. Faster requests
/// wait: the connection is slowed, not refused.
const REQUESTS_PER_CONNECTION_PER_SECOND: u32 = 20;

/// One connection's request pace, shared by its requests.
#[derive(Clone)]
struct Pace(Arc<std::sync::Mutex<TokenBucket>>);

impl Pace {
    fn new() -> Self {
        Self(Arc::new(std::sync::Mutex::new(TokenBucket::new(
            REQUESTS_PER_CONNECTION_PER_SECOND,
            tokio::time::Instant::now(),
        ))))
    }
}

/// Holds a request back until its connection is within its pace.
async fn pace(
    State(app): State<AppState>,
    paced: Option<axum::Extension<Pace>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(axum::Extension(Pace(bucket))) = paced {
        let now = tokio::time::Instant::now();
        let wait = bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .reserve(now);
        if !wait.is_zero() {
            app.stats
                .http_requests_paced
                .fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        }
    }
    next.run(request).await
}

/// Refuses an HTTP/1.1 request without exactly one `Host` header with 400,
/// as RFC 9112 §3.2 requires: a WebSocket upgrade included, before anything
/// else looks at it.
async fn require_host(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let hosts = request.headers().get_all(header::HOST).iter().count();
    if request.version() == axum::http::Version::HTTP_11 && hosts != 1 {
        return (
            StatusCode::BAD_REQUEST,
            "an HTTP/1.1 request names its host in exactly one Host header\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// What any response may make a browser do: nothing but this origin's own
/// script, styles and socket. No inline script, so a value that slips into
/// the page as markup still cannot run.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Headers on every response: the CSP, no MIME sniffing (a JSON or text
/// body is never run as script), no framing, and no Referer carrying a URL.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Bytes read from a socket at a time, and the read buffer every socket
/// allocates up front. Clients send small requests (a subscribe is well
/// under 1 KiB; the buffer grows for a larger frame, up to
/// `websocket.max_message_bytes`), and an idle socket should cost little
/// (tungstenite's default is 128 KiB; 4 KiB made a third of an idle
/// socket's memory).
const READ_BUFFER_BYTES: usize = 1024;

/// Bytes fed before a write reaches the socket without a flush; sessions
/// flush after every batch anyway.
const WRITE_BUFFER_BYTES: usize = 32 * 1024;

const INVALID_CLIENT_CODE: &str =
    "invalid client code: expected 1-64 characters from [A-Za-z0-9_-] in /ws/{client_code}\n";

async fn missing_client_code() -> Response {
    (StatusCode::BAD_REQUEST, INVALID_CLIENT_CODE).into_response()
}

/// `?token=` for browsers, which cannot set an Authorization header,
/// `?resume=1` for a socket that comes back for what it missed, and
/// `?symbols=` for an event stream's subscriptions.
#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
    resume: Option<String>,
    symbols: Option<String>,
    series: Option<String>,
}

impl TokenQuery {
    /// Whether the socket is to be held for a resume request.
    fn resumes(&self) -> bool {
        matches!(self.resume.as_deref(), Some("1" | "true"))
    }
}

/// The bearer token from the Authorization header, else from `?token=`.
fn bearer_token<'a>(headers: &'a HeaderMap, query: &'a TokenQuery) -> Option<&'a str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .or(query.token.as_deref())
}

/// What a client that may connect holds: its entitlements, its place in
/// its client's connection count, and its place in `server.max_connections`.
struct Admitted {
    grant: Grant,
    admission: Admission,
    permit: OwnedSemaphorePermit,
}

/// Authenticates `client_code` and takes its places, or answers why not
/// (401, 503, 429): the same for a WebSocket and an event stream.
fn admit(
    app: &AppState,
    client_code: &str,
    headers: &HeaderMap,
    query: &TokenQuery,
) -> Result<Admitted, Box<Response>> {
    let grant = match app
        .auth
        .authenticate(client_code, bearer_token(headers, query))
    {
        Ok(grant) => grant,
        Err(err) => {
            tracing::info!(client = %client_code, reason = %err, "connection refused: authentication failed");
            return Err(Box::new(
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    format!("unauthorized: {err}\n"),
                )
                    .into_response(),
            ));
        }
    };
    if app.shutdown.is_cancelled() {
        return Err(Box::new(
            (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response(),
        ));
    }
    // The server's limit first: a client refused for it (503) has opened
    // nothing, and spends none of its own allowance of new sockets.
    let Ok(permit) = app.connections.clone().try_acquire_owned() else {
        tracing::warn!(client = %client_code, "connection limit reached; connection refused");
        return Err(Box::new(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections (server.max_connections)\n",
            )
                .into_response(),
        ));
    };
    let admission = match app.hub.admit(client_code) {
        Ok(admission) => admission,
        Err(err) => {
            // Counted, not logged at warn: a client retrying in a loop would
            // flood the log.
            app.stats
                .client_limit_refusals
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client = ?client_code, cause = %err, "per-client connection limit reached; connection refused");
            let mut refused = (StatusCode::TOO_MANY_REQUESTS, format!("{err}\n")).into_response();
            // Opening too fast: the allowance refills at least one socket a
            // second, so a client that waits as asked is admitted, and one
            // that retries in a loop is told how long not to.
            if matches!(err, AdmitError::TooManyConnects(_)) {
                refused
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            return Err(Box::new(refused));
        }
    };
    Ok(Admitted {
        grant,
        admission,
        permit,
    })
}

/// `GET /ws/{client_code}`: validates, authenticates, then upgrades to a session.
async fn upgrade(
    State(app): State<AppState>,
    Path(client_code): Path<String>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
    upgrade: Result<Upgrade, UpgradeRejection>,
) -> Response {
    if !names::is_client_code(&client_code) {
        return (StatusCode::BAD_REQUEST, INVALID_CLIENT_CODE).into_response();
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let Admitted {
        grant,
        admission,
        permit,
    } = match admit(&app, &client_code, &headers, &query) {
        Ok(admitted) => admitted,
        Err(refusal) => return *refusal,
    };
    let limit = app.settings.websocket.max_message_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let frames_per_second = app.settings.websocket.client_messages_per_second;
    let hold = query.resumes();
    let sessions = app.sessions.clone();
    let (response, upgraded) =
        upgrade.on_upgrade(config, frames_per_second, move |socket| async move {
            let websocket = &app.settings.websocket;
            let catalog = app.settings.catalog.clone();
            let initial = grant.initial_subscriptions(catalog.initial());
            let (membership, outbox) = app.hub.join(admission, &initial, hold);
            let limits = session::Limits::from_settings(websocket);
            let access = session::Access {
                grant,
                authenticator: app.auth.clone(),
                catalog,
            };
            let stats = app.stats.clone();
            let session = session::run(
                socket,
                client_code.clone().into(),
                membership,
                access,
                outbox,
                limits,
                app.shutdown,
            )
            .map(move |outcome| {
                // The connection's place among server.max_connections, held
                // for the session's life.
                drop(permit);
                if let Err(err) = outcome {
                    if matches!(err, session::SessionError::WriteTimeout(_)) {
                        stats.write_timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::info!(client = %client_code, cause = %err, "session ended with an error");
                }
            });
            // A task of its own: this future, which also holds the upgrade's
            // and the request's state, ends here instead of living as long
            // as the socket (see `session::run`).
            app.sessions.spawn(session);
        });
    tokio::spawn(sessions.track_future(upgraded));
    response
}

/// `GET /sse/{client_code}?symbols=AAPL,MSFT`: the results a socket of
/// `client_code` would receive, as Server-Sent Events (see `sse.rs`).
async fn event_stream(
    method: axum::http::Method,
    State(app): State<AppState>,
    Path(client_code): Path<String>,
    Query(query): Query<TokenQuery>,
    started: Option<axum::Extension<StreamStarted>>,
    headers: HeaderMap,
) -> Response {
    // HEAD would set up a whole stream to send nothing.
    if method != axum::http::Method::GET {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    if !names::is_client_code(&client_code) {
        return (
            StatusCode::BAD_REQUEST,
            INVALID_CLIENT_CODE.replace("/ws/", "/sse/"),
        )
            .into_response();
    }
    let Admitted {
        grant,
        admission,
        permit,
    } = match admit(&app, &client_code, &headers, &query) {
        Ok(admitted) => admitted,
        Err(refusal) => return *refusal,
    };
    let websocket = &app.settings.websocket;
    let catalog = &app.settings.catalog;
    let requested = (query.symbols.as_deref(), query.series.as_deref());
    let symbols = match requested {
        (None, None) => grant.initial_subscriptions(catalog.initial()),
        _ => match sse::requested_symbols(requested, catalog, &grant, websocket.max_symbols) {
            Ok(symbols) => symbols,
            Err(message) => {
                return (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response();
            }
        },
    };
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let ended = started.as_ref().map(|s| s.ended.clone());
    let request = sse::Request {
        symbols,
        last_event_id: last_event_id.map(str::to_owned),
        limits: session::Limits::from_settings(websocket),
        shutdown: app.shutdown.clone(),
        permit,
        ended,
        expires_in: grant.remaining(std::time::SystemTime::now()),
    };
    // Opening a stream resumes it (see `Hub::resume_turn`).
    let turn = app.hub.resume_turn().await;
    let opened = sse::open(&app.hub, admission, request, &app.sessions).await;
    drop(turn);
    let stream = match opened {
        Ok(stream) => stream,
        Err(message) => return (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response(),
    };
    // From here the connection is a stream, bounded like a socket (by its
    // outbox and write timeout), not by the deadline of plain requests.
    if let Some(axum::Extension(started)) = started {
        started.started.notify_one();
    }
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            // Proxies that buffer responses (nginx) would hold events back.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
            // The connection ends with the stream: no further requests on
            // it, outside the deadline plain requests have.
            (header::CONNECTION, "close"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// Told by the event-stream handler that its connection now carries a
/// stream (`started`), and by the stream when it ends (`ended`); one per
/// connection, added to each of its requests.
#[derive(Clone, Default)]
struct StreamStarted {
    started: Arc<tokio::sync::Notify>,
    ended: CancellationToken,
}

/// Where a connection is in its life, for what bounds it.
enum Phase {
    /// Plain requests: it holds a pending-connection slot (released by
    /// dropping it), and its deadline runs.
    Requests { _slot: OwnedSemaphorePermit },
    /// An event stream: bounded by the stream's own limits.
    Stream,
    /// The stream ended: a short deadline to send the rest.
    Ending,
}

/// The live dashboard: a page, its script and its styles (no CDN, no build
/// step), compiled into the binary.
const DASHBOARD: &str = include_str!("../../../assets/dashboard.html");
const DASHBOARD_SCRIPT: &str = include_str!("../../../assets/dashboard.js");
const DASHBOARD_STYLES: &str = include_str!("../../../assets/dashboard.css");

async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(DASHBOARD)
}

async fn dashboard_script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        DASHBOARD_SCRIPT,
    )
        .into_response()
}

async fn dashboard_styles() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        DASHBOARD_STYLES,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<AppState>) -> Response {
    if app.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if app.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: redis input not established\n",
        )
            .into_response()
    }
}

async fn stats(State(app): State<AppState>) -> Response {
    let body = app.stats.to_json(&app.gauges());
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn metrics(State(app): State<AppState>) -> Response {
    let body = app.metrics.render(&app.stats, &app.gauges());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

impl AppState {
    /// Whether every part the bridge waits for is up, and it is not stopping.
    fn is_ready(&self) -> bool {
        !self.shutdown.is_cancelled() && self.ready.iter().all(|flag| flag.load(Ordering::Relaxed))
    }

    fn gauges(&self) -> Gauges {
        Gauges {
            sockets: self.hub.socket_count(),
            groups: self.hub.group_count(),
            ready: self.is_ready(),
            history_bytes: self.hub.history_bytes(),
            history_keys: self.hub.history_keys(),
            queued_bytes: self.hub.queued_bytes(),
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, bounding what a connection
/// may hold before it is a WebSocket session: at most
/// `server.max_pending_connections` connections that are not (yet) upgraded,
/// each with `server.header_read_timeout_ms` to send every request head.
/// (`axum::serve` runs without a timer: a client that sent half a request
/// line held its descriptor forever.) On shutdown, accepting stops and idle
/// connections close; requests in flight finish: the returned tracker tells
/// when.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    settings: &Settings,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> TaskTracker {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout())
        .max_headers(64);
    // The whole life of a connection before it is a WebSocket. Without it a
    // kept-alive connection could hold its slot for ever by sending a request
    // before each header timeout, and one that does not read its answers
    // would stall it (hyper has no write timeout). (Turning keep-alive off
    // instead would make hyper answer upgrades with `Connection: close`.)
    let answer_time = Duration::from_millis(settings.server.answer_timeout_ms);
    let lifetime = settings.header_read_timeout() * 2 + answer_time;
    let pending = Arc::new(Semaphore::new(settings.server.max_pending_connections));
    let connections = TaskTracker::new();
    loop {
        // A slot first, then a connection: when every slot is taken, new
        // clients wait in the kernel's backlog and cost no descriptor here.
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            permit = pending.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors (EMFILE) or the like: wait for some
                    // to close instead of spinning.
                    tracing::warn!(cause = %err, "cannot accept a connection; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Frames are small and latency matters: no Nagle delay.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(cause = %err, "cannot set TCP_NODELAY");
        }
        let started = StreamStarted::default();
        let service = tower::Layer::layer(&axum::Extension(started.clone()), app.clone());
        let service = tower::Layer::layer(&axum::Extension(Pace::new()), service);
        let connection = http
            .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service))
            .with_upgrades();
        let shutdown = shutdown.clone();
        let stats = stats.clone();
        connections.spawn(async move {
            // Held until the connection closes, becomes a WebSocket (the
            // connection future ends when it hands its socket over) or an
            // event stream (which holds a connection permit instead).
            let mut phase = Phase::Requests { _slot: permit };
            let mut connection = std::pin::pin!(connection);
            let mut draining = false;
            let deadline = tokio::time::sleep(lifetime);
            tokio::pin!(deadline);
            let outcome = loop {
                tokio::select! {
                    outcome = connection.as_mut() => break outcome,
                    () = shutdown.cancelled(), if !draining => {
                        draining = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    () = started.started.notified(), if matches!(phase, Phase::Requests { .. }) => {
                        phase = Phase::Stream;
                    }
                    () = started.ended.cancelled(), if matches!(phase, Phase::Stream) => {
                        // The stream ended: what is left is like an answer,
                        // with as long to be read before the connection is
                        // closed regardless (hyper has no write timeout).
                        let grace = tokio::time::Instant::now() + answer_time;
                        deadline.as_mut().reset(grace);
                        phase = Phase::Ending;
                    }
                    () = &mut deadline, if !matches!(phase, Phase::Stream) => {
                        tracing::debug!(%peer, ?lifetime, "http connection outlived its deadline; closed");
                        return;
                    }
                }
            };
            match outcome {
                Ok(()) => {}
                Err(err) if err.is_timeout() => {
                    stats.http_header_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "request head not received in time; connection closed");
                }
                Err(err) => tracing::debug!(%peer, cause = %err, "http connection failed"),
            }
        });
    }
    drop(listener);
    connections.close();
    // Idle connections close at once; one mid-request finishes, one
    // mid-head has at most its deadline left. The caller waits for them,
    // with everything else, within the shutdown timeout.
    connections
}

/// Raises this process's open-file soft limit to its hard limit (every
/// socket is a descriptor; distributions default the soft limit to 1024) and
/// logs both, warning when the limit is below what the configured
/// connection caps may need.
pub fn raise_descriptor_limit(settings: &Settings) {
    use rlimit::Resource;
    let Ok((soft, hard)) = Resource::NOFILE.get() else {
        tracing::warn!("cannot read the open-file limit");
        return;
    };
    let raised = match rlimit::increase_nofile_limit(hard) {
        Ok(now) => now,
        Err(err) => {
            tracing::warn!(cause = %err, soft, hard, "cannot raise the open-file limit");
            soft
        }
    };
    tracing::info!(was = soft, now = raised, hard, "open-file limit");
    // Sockets and handshakes, plus a margin for Redis, logs and the like.
    let needed =
        (settings.server.max_connections + settings.server.max_pending_connections + 64) as u64;
    if raised < needed {
        tracing::warn!(
            limit = raised,
            needed,
            "the open-file limit is below server.max_connections + server.max_pending_connections; \
             connections past it will fail to be accepted"
        );
    }
}
