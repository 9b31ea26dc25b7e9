//! The locks the hub and the outboxes synchronise with: std's, or loom's
//! under the `model-check` feature, so that `tests/wake_model.rs` explores
//! every interleaving of the real code, not of a copy of it.

#[cfg(feature = "model-check")]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(not(feature = "model-check"))]
pub(crate) use std::sync::{Mutex, MutexGuard};

/// The hub's lock: parking_lot's, whose guard can be released fairly
/// (see [`release_fairly`]). std's is not fair: a thread that unlocks and
/// locks again at once gets the lock back before a waiter wakes, and a
/// resume answering its keys a chunk at a time kept live delivery waiting
/// across several chunks.
#[cfg(not(feature = "model-check"))]
pub(crate) use parking_lot::{Mutex as HubMutex, MutexGuard as HubGuard};

#[cfg(feature = "model-check")]
pub(crate) use loom::sync::{Mutex as HubMutex, MutexGuard as HubGuard};

/// Locks the hub.
#[cfg(not(feature = "model-check"))]
pub(crate) fn lock_hub<T>(mutex: &HubMutex<T>) -> HubGuard<'_, T> {
    mutex.lock()
}

/// Locks the hub. Every mutation under it completes before it can panic,
/// so a poisoned lock still guards consistent data.
#[cfg(feature = "model-check")]
pub(crate) fn lock_hub<T>(mutex: &HubMutex<T>) -> HubGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Unlocks the hub, handing it to a thread waiting for it if there is one,
/// before this thread can take it again.
#[cfg(not(feature = "model-check"))]
pub(crate) fn release_fairly<T>(guard: HubGuard<'_, T>) {
    HubGuard::unlock_fair(guard);
}

/// Unlocks the hub (loom's scheduler explores every order anyway).
#[cfg(feature = "model-check")]
pub(crate) fn release_fairly<T>(guard: HubGuard<'_, T>) {
    drop(guard);
}
