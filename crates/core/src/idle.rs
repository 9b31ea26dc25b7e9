//! When a key is idle: it had no quote (or, where results are kept for
//! sockets, no result) for `sma.key_idle_ms`. Every place that keeps
//! something per key (the pipeline's windows, the hub's history and
//! snapshots) sweeps `SWEEPS_PER_IDLE` times per idle period, and each entry
//! records the sweep it was last used in: no clock is read per quote, and a
//! key is released between one and one and a quarter idle periods after
//! its last use.

/// Sweeps per `sma.key_idle_ms`.
pub const SWEEPS_PER_IDLE: u32 = 4;

/// Whether an entry last used in sweep `touched` is idle in sweep `now`:
/// `SWEEPS_PER_IDLE` whole sweeps have passed since (wrapping, so the
/// count may run for ever).
#[must_use]
pub fn is_idle(touched: u32, now: u32) -> bool {
    now.wrapping_sub(touched) > SWEEPS_PER_IDLE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_after_four_whole_sweeps_even_across_the_wrap() {
        assert!(!is_idle(7, 7));
        assert!(
            !is_idle(7, 11),
            "four sweeps later it may have been used just before the first"
        );
        assert!(is_idle(7, 12));
        assert!(!is_idle(u32::MAX, 3));
        assert!(is_idle(u32::MAX, 4));
    }
}
