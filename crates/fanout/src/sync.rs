//! The locks the hub and the outboxes synchronise with: std's, or loom's
//! under the `model-check` feature, so that `tests/wake_model.rs` explores
//! every interleaving of the real code, not of a copy of it.

#[cfg(feature = "model-check")]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(not(feature = "model-check"))]
pub(crate) use std::sync::{Mutex, MutexGuard};
