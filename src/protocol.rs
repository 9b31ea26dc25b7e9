//! The wire formats: SMA messages (Redis and WebSocket alike), the frames a
//! client sends, and the control frames the server sends back.
//!
//! docs/protocol.md is the prose version of this file.

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};

/// One SMA result, as published to Redis and sent to sockets.
#[derive(Debug, Clone, Serialize)]
pub struct SmaMessage<'a> {
    /// The quote's symbol.
    pub symbol: &'a str,
    /// The triggering quote's price.
    pub price: f64,
    /// The mean of the last `count` prices of this key.
    pub sma: f64,
    /// The configured window.
    pub window: usize,
    /// How many prices the mean covers (`< window` only with `emit_partial`).
    pub count: usize,
    /// The triggering quote's timestamp, ms since the Unix epoch.
    pub ts: u64,
    /// The client code of a private quote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<&'a str>,
}

impl SmaMessage<'_> {
    /// Serializes once; the result is shared by Redis and every socket.
    #[must_use]
    pub fn encode(&self) -> Utf8Bytes {
        // Serializing plain strings and finite floats into a String cannot fail.
        serde_json::to_string(self).unwrap_or_default().into()
    }
}

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientOp {
    /// Add symbols (or `"*"`) to the socket's subscriptions.
    Subscribe {
        /// Symbols to add.
        symbols: Vec<String>,
    },
    /// Remove symbols (or `"*"`) from the socket's subscriptions.
    Unsubscribe {
        /// Symbols to remove.
        symbols: Vec<String>,
    },
}

impl ClientOp {
    /// Parses a client's text frame; the error is the message sent back to it.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|err| {
            format!(
                "invalid request ({err}); expected {{\"op\":\"subscribe\"|\"unsubscribe\",\"symbols\":[...]}}"
            )
        })
    }
}

/// A control frame the server sends.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    /// First frame on every socket.
    Welcome {
        /// The socket's client code.
        client: &'a str,
        /// The socket's initial subscriptions, sorted.
        subscriptions: &'a [String],
    },
    /// Reply to subscribe and unsubscribe: the socket's whole current set, sorted.
    Subscribed {
        /// Every symbol the socket now subscribes to.
        symbols: &'a [String],
    },
    /// A request could not be served; the socket stays open.
    Error {
        /// What was wrong.
        message: &'a str,
    },
}

impl ServerFrame<'_> {
    /// Serializes the frame for sending.
    #[must_use]
    pub fn encode(&self) -> Utf8Bytes {
        serde_json::to_string(self).unwrap_or_default().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn as_json(bytes: &Utf8Bytes) -> Value {
        serde_json::from_str(bytes.as_str()).expect("frame is JSON")
    }

    #[test]
    fn public_sma_has_no_client_field() {
        let msg = SmaMessage {
            symbol: "AAPL",
            price: 190.25,
            sma: 189.5,
            window: 10,
            count: 10,
            ts: 1_700_000_000_000,
            client: None,
        };
        assert_eq!(
            msg.encode().as_str(),
            r#"{"symbol":"AAPL","price":190.25,"sma":189.5,"window":10,"count":10,"ts":1700000000000}"#
        );
    }

    #[test]
    fn private_sma_names_its_client() {
        let msg = SmaMessage {
            symbol: "X",
            price: 1.0,
            sma: 1.0,
            window: 3,
            count: 1,
            ts: 5,
            client: Some("acme"),
        };
        assert_eq!(as_json(&msg.encode())["client"], "acme");
    }

    #[test]
    fn client_ops_parse() {
        assert_eq!(
            ClientOp::parse(r#"{"op":"subscribe","symbols":["A","B"]}"#),
            Ok(ClientOp::Subscribe {
                symbols: vec!["A".into(), "B".into()]
            })
        );
        assert_eq!(
            ClientOp::parse(r#"{"op":"unsubscribe","symbols":[]}"#),
            Ok(ClientOp::Unsubscribe { symbols: vec![] })
        );
        for bad in [
            "",
            "nope",
            "{}",
            r#"{"op":"publish","symbols":["A"]}"#,
            r#"{"op":"subscribe"}"#,
            r#"{"op":"subscribe","symbols":"A"}"#,
            r#"{"op":"subscribe","symbols":["A"],"extra":1}"#,
        ] {
            assert!(ClientOp::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn server_frames() {
        let subs = vec!["*".to_string()];
        assert_eq!(
            as_json(
                &ServerFrame::Welcome {
                    client: "acme",
                    subscriptions: &subs
                }
                .encode()
            ),
            json!({"type":"welcome","client":"acme","subscriptions":["*"]})
        );
        assert_eq!(
            as_json(&ServerFrame::Subscribed { symbols: &subs }.encode()),
            json!({"type":"subscribed","symbols":["*"]})
        );
        assert_eq!(
            as_json(&ServerFrame::Error { message: "no" }.encode()),
            json!({"type":"error","message":"no"})
        );
    }
}
