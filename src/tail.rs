//! `quotebridge tail`: a WebSocket client that prints what a client group
//! receives, one JSON document per line.

use std::io::Write;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// Connects to `{base_url}/ws/{client_code}`; with `symbols`, replaces the
/// default subscriptions by them. Prints every text frame until the server
/// closes the socket or `shutdown`.
pub async fn run(
    base_url: &str,
    client_code: &str,
    symbols: Option<Vec<String>>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    if !crate::names::is_client_code(client_code) {
        return Err(Error::Input(format!(
            "invalid client code {client_code:?}: expected 1-64 characters from [A-Za-z0-9_-]"
        )));
    }
    let url = format!("{}/ws/{client_code}", base_url.trim_end_matches('/'));
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|err| Error::Unreachable {
            url: url.clone(),
            reason: err.to_string(),
        })?;
    tracing::info!(%url, "connected");
    let mut pending_subscription = symbols;
    loop {
        let frame = tokio::select! {
            () = shutdown.cancelled() => {
                let _ = socket.close(None).await;
                return Ok(());
            }
            frame = socket.next() => frame,
        };
        let text = match frame {
            None | Some(Ok(Message::Close(_))) => return Ok(()),
            Some(Err(err)) => return Err(err.into()),
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(data))) => format!(
                "{{\"binary_base16\":\"{}\"}}",
                data.iter().map(|b| format!("{b:02x}")).collect::<String>()
            )
            .into(),
            Some(Ok(_)) => continue,
        };
        let written = {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}").and_then(|()| out.flush())
        };
        // stdout is locked per line, never across an await.
        if written.is_err() {
            // stdout closed (e.g. piped into `head`): nothing left to do.
            return Ok(());
        }
        // After the welcome, swap the default subscriptions for the requested ones.
        if let Some(symbols) = pending_subscription.take() {
            let welcome: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let defaults = welcome["subscriptions"].clone();
            let unsubscribe = json!({"op": "unsubscribe", "symbols": defaults});
            let subscribe = json!({"op": "subscribe", "symbols": symbols});
            socket.send(Message::text(unsubscribe.to_string())).await?;
            socket.send(Message::text(subscribe.to_string())).await?;
        }
    }
}
