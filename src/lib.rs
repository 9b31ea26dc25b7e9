//! quotebridge: Redis pub/sub quotes in, per-symbol moving averages out, to
//! a Redis channel and to WebSocket clients grouped by client code.
//!
//! This crate is the product's command line and its tools ([`cli`]: `serve`,
//! `demo`, `publish`, `tail`, `health`, `config`, and the [`bench`]mark) over
//! the workspace's layers, which it re-exports: `quotebridge-core` (quotes,
//! moving averages, wire formats), `quotebridge-broker` (Redis),
//! `quotebridge-fanout` (the hub and outboxes) and `quotebridge-service`
//! (the server and its wiring: [`run`], [`serve`]).

#![forbid(unsafe_code)]

pub mod bench;
pub mod cli;
pub(crate) mod demo;
pub(crate) mod health;
pub(crate) mod publish;
pub(crate) mod tail;

pub use quotebridge_broker as broker;
pub use quotebridge_core::{decimal, names, protocol, quote, series, sma, stats};
pub use quotebridge_service::{
    Error, config, metrics, pipeline, redis_broker, run, serve, shutdown, telemetry, topology,
};
