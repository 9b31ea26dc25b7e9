//! Exponential backoff with full jitter and a cap, for reconnecting to Redis.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `base` up to `cap`, each drawn uniformly from
/// `[delay/2, delay]` so many bridges restarting together do not reconnect
/// in lockstep. It never gives up: the caller retries while the service runs.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `base`, never waiting longer than `cap`.
    #[must_use]
    pub fn new(base: Duration, cap: Duration) -> Self {
        let cap = cap.max(base);
        Self {
            base,
            cap,
            next: base,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.cap);
        let floor = ceiling / 2;
        rand::rng().random_range(floor..=ceiling)
    }

    /// Starts over from `base`, after a success.
    pub fn reset(&mut self) {
        self.next = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        let ceilings = [100, 200, 400, 800, 1000, 1000, 1000];
        for ceiling in ceilings {
            let d = b.next_delay();
            assert!(
                d >= ms(ceiling) / 2 && d <= ms(ceiling),
                "{d:?} outside [{ceiling}/2, {ceiling}] ms"
            );
        }
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }
}
