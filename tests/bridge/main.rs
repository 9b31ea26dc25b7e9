//! Integration tests: the real bridge against a real redis-server of the
//! test's own, real WebSocket clients, and the real binary.
//!
//! One test binary (modules below) so the suite links once.

mod abuse;
mod auth;
mod bench;
mod binary;
mod cluster;
mod conflation;
mod dashboard;
mod deploy;
mod durable;
mod embedded;
mod end_to_end;
mod hostile_clients;
mod idle_keys;
mod metrics;
mod properties;
mod redis_faults;
mod redis_subscriber;
mod rejected_input;
mod resume;
mod scale_out;
mod schemas;
mod sentinel;
mod series;
mod sse;
mod support;
mod tls;
mod walkthrough;
mod websocket;
