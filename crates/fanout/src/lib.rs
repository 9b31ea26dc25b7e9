//! quotebridge's fan-out: the hub that groups sockets by client code and
//! indexes them by symbol (with snapshots, each key's history for resuming
//! sockets, and admissions), and each socket's bounded outbox (conflation,
//! rate limits). It knows nothing of Redis, HTTP or settings.

#![forbid(unsafe_code)]

pub mod frame;
pub mod hub;
pub mod outbox;
mod sync;

use quotebridge_core::{idle, names, protocol, stats};
