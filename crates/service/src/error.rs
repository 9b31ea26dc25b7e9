//! What can stop a command, and the exit code it means.

use crate::broker::BrokerError;
use crate::config::ConfigError;

/// Everything that can stop a command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration is invalid (exit code 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Redis (or the embedded broker) failed.
    #[error("cannot use the broker: {0}")]
    Broker(#[from] BrokerError),
    /// A file, socket or address could not be used.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The command line is unusable (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// Input the command was given is unusable.
    #[error("{0}")]
    Input(String),
    /// A WebSocket connection failed (the `tail` command).
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    /// The bridge closed a WebSocket the `tail` command did not mean to end.
    #[error("the bridge closed the connection: {code} {reason}")]
    Closed {
        /// The close code (1006 when the connection dropped without one).
        code: u16,
        /// The close frame's reason, or what happened.
        reason: String,
    },
    /// A server could not be reached: the URL tried (password hidden) and why.
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// The URL tried.
        url: String,
        /// Why, in the client library's words.
        reason: String,
    },
}

impl Error {
    /// The process exit code for this error: 2 for bad configuration or usage, else 1.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) => 2,
            _ => 1,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
