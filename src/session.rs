//! One WebSocket's session: the task that owns the socket.
//!
//! It races three things — shutdown, frames the hub queued for it, and
//! frames the client sent — like the seed's `handle_client_connection`
//! raced a socket's reads against a producer.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::Membership;
use crate::names;
use crate::protocol::{ClientOp, ServerFrame};

/// Most queued frames written before one flush; bounds the time one busy
/// socket spends away from reading its client.
const MAX_BATCH: usize = 256;

/// How long one batch of writes may take. A client that stops reading fills
/// its TCP window and would stall the session forever; past this it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a session ended abnormally. Ordinary disconnects are not errors.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The socket failed.
    #[error("websocket: {0}")]
    Socket(#[from] axum::Error),
    /// The client stopped reading and writes did not complete in time.
    #[error("write timed out after {0:?}; client is not reading")]
    WriteTimeout(Duration),
}

/// Runs one socket until the client leaves, the hub evicts it, or shutdown.
#[tracing::instrument(name = "session", skip_all, fields(client = %client, socket = membership.id()))]
pub async fn run(
    mut socket: WebSocket,
    client: &str,
    membership: Membership,
    mut outbox: mpsc::Receiver<Message>,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let subscriptions = membership.subscriptions();
    let welcome = ServerFrame::Welcome {
        client,
        subscriptions: &subscriptions,
    };
    write(&mut socket, [welcome.encode()].map(Message::Text)).await?;
    tracing::debug!("socket opened");

    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                close(&mut socket, close_code::AWAY, "going away").await;
                return Ok(());
            }
            queued = outbox.recv() => {
                let Some(first) = queued else {
                    // The hub dropped our sender: we fell behind.
                    close(&mut socket, close_code::POLICY, "slow consumer").await;
                    return Ok(());
                };
                let more = std::iter::from_fn(|| outbox.try_recv().ok()).take(MAX_BATCH - 1);
                let batch: Vec<Message> = std::iter::once(first).chain(more).collect();
                write(&mut socket, batch).await?;
            }
            incoming = socket.next() => match incoming {
                None | Some(Ok(Message::Close(_))) => {
                    tracing::debug!("client closed the socket");
                    return Ok(());
                }
                Some(Ok(Message::Text(text))) => {
                    let replies = answer(&membership, &text);
                    write(&mut socket, replies.into_iter().map(Message::Text)).await?;
                }
                Some(Ok(Message::Binary(_))) => {
                    let reply = ServerFrame::Error { message: "binary frames are not supported; send JSON text" };
                    write(&mut socket, [Message::Text(reply.encode())]).await?;
                }
                // Pongs are answered by the WebSocket engine itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(err)) => return end_on_read_error(&mut socket, err).await,
            },
        }
    }
}

/// Handles one text frame from the client; returns the frames to send back.
fn answer(membership: &Membership, text: &str) -> Vec<Utf8Bytes> {
    let error = |message: &str| vec![ServerFrame::Error { message }.encode()];
    let op = match ClientOp::parse(text) {
        Ok(op) => op,
        Err(message) => return error(&message),
    };
    let (ClientOp::Subscribe { symbols } | ClientOp::Unsubscribe { symbols }) = &op;
    if let Some(bad) = symbols.iter().find(|s| !names::is_subscription(s)) {
        let message = format!(
            "invalid symbol {bad:?}: expected \"*\" or 1-32 characters from [A-Za-z0-9._:/-]"
        );
        return error(&message);
    }
    let outcome = match op {
        ClientOp::Subscribe { symbols } => match membership.subscribe(&symbols) {
            Ok(outcome) => outcome,
            Err(err) => return error(&err.to_string()),
        },
        ClientOp::Unsubscribe { symbols } => membership.unsubscribe(&symbols),
    };
    let reply = ServerFrame::Subscribed {
        symbols: &outcome.symbols,
    };
    std::iter::once(reply.encode())
        .chain(outcome.snapshots)
        .collect()
}

/// Feeds every message, then flushes once, within [`WRITE_TIMEOUT`].
async fn write(
    socket: &mut WebSocket,
    messages: impl IntoIterator<Item = Message>,
) -> Result<(), SessionError> {
    let writes = async {
        for message in messages {
            socket.feed(message).await?;
        }
        socket.flush().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, writes)
        .await
        .map_err(|_| SessionError::WriteTimeout(WRITE_TIMEOUT))??;
    Ok(())
}

/// Sends a close frame, best effort: the peer may already be gone.
async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = write(socket, [Message::Close(Some(frame))]).await;
}

/// Sorts a read error into an ordinary disconnect, a client that broke the
/// size limit (closed with 1009), or a real failure.
async fn end_on_read_error(socket: &mut WebSocket, err: axum::Error) -> Result<(), SessionError> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::ProtocolError;

    let inner = err.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Capacity(_)) => {
            tracing::info!("client sent a frame over websocket.max_message_bytes; closing");
            close(socket, close_code::SIZE, "message too big").await;
            Ok(())
        }
        Some(
            WsError::ConnectionClosed
            | WsError::AlreadyClosed
            | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
            | WsError::Io(_),
        ) => {
            tracing::debug!("client went away");
            Ok(())
        }
        _ => Err(SessionError::Socket(axum::Error::new(inner))),
    }
}
