//! The WebSocket upgrade (RFC 6455 §4.2), done here rather than by the web
//! framework so that the connection's bytes pass through a [`FrameMeter`]
//! before the WebSocket engine (tokio-tungstenite) reads them: the frame
//! rate limit sees every frame, fragments included, as it arrives.

mod meter;

use std::future::Future;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

pub use self::meter::{FrameMeter, FrameRateExceeded};

/// A client's socket once upgraded: the engine over the metered connection.
pub type Socket = WebSocketStream<FrameMeter<TokioIo<Upgraded>>>;

/// A request to upgrade to a WebSocket, checked.
#[derive(Debug)]
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// Why a request cannot be upgraded: answered with its status and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpgradeRejection {
    status: StatusCode,
    reason: &'static str,
}

impl IntoResponse for UpgradeRejection {
    fn into_response(self) -> Response {
        (self.status, self.reason).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = UpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let refuse = |status, reason| Err(UpgradeRejection { status, reason });
        // The server speaks HTTP/1.1 only: a WebSocket starts as a GET.
        if parts.version > Version::HTTP_11 || parts.method != Method::GET {
            return refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket upgrade is an HTTP/1.1 GET",
            );
        }
        if !lists(&parts.headers, header::CONNECTION, "upgrade") {
            return refuse(
                StatusCode::BAD_REQUEST,
                "`Connection` header did not include 'upgrade'",
            );
        }
        if !is(&parts.headers, header::UPGRADE, "websocket") {
            return refuse(
                StatusCode::BAD_REQUEST,
                "`Upgrade` header did not include 'websocket'",
            );
        }
        if !is(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return refuse(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Version` header did not include '13'",
            );
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Key` header missing",
            );
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return refuse(
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket request couldn't be upgraded since no upgrade state was present",
            );
        };
        Ok(Self { key, on_upgrade })
    }
}

impl Upgrade {
    /// Answers 101 Switching Protocols, and once the connection has switched,
    /// runs `session` on it as a WebSocket configured by `config`, its
    /// incoming frames metered at `frames_per_second`. The future returned
    /// runs the upgrade and the session: the caller spawns it.
    pub fn on_upgrade<F, Fut>(
        self,
        config: WebSocketConfig,
        frames_per_second: u32,
        session: F,
    ) -> (Response, impl Future<Output = ()> + Send + use<F, Fut>)
    where
        F: FnOnce(Socket) -> Fut + Send,
        Fut: Future<Output = ()> + Send,
    {
        let accept = derive_accept_key(self.key.as_bytes());
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, HeaderValue::from_static("upgrade"))
            .header(header::UPGRADE, HeaderValue::from_static("websocket"))
            .header(header::SEC_WEBSOCKET_ACCEPT, accept)
            .body(axum::body::Body::empty())
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        let on_upgrade = self.on_upgrade;
        let run = async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(err) => {
                    tracing::debug!(cause = %err, "the connection did not switch to a WebSocket");
                    return;
                }
            };
            let metered = FrameMeter::new(TokioIo::new(upgraded), frames_per_second);
            let socket =
                WebSocketStream::from_raw_socket(metered, Role::Server, Some(config)).await;
            session(socket).await;
        };
        (response, run)
    }
}

/// Whether the comma-separated header `name` lists `token` (any case).
fn lists(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|b| *b == b',')
            .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Whether the header `name` is `value` (any case).
fn is(headers: &HeaderMap, name: HeaderName, value: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|header| header.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}
