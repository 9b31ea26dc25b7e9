//! Per client code: sockets admitted (upgrading or open), for
//! `server.max_connections_per_client`, and the frames its resumes may still
//! replay, for `websocket.resume_frames_per_second`.

use std::collections::HashMap;
use std::time::Instant;

use super::AdmitError;

#[derive(Debug, Default)]
pub(super) struct Admissions {
    admitted: HashMap<Box<str>, Admitted>,
    /// How many entries there may be before those with no socket and a
    /// refilled allowance are dropped (the map doubles between purges, so
    /// the work is amortised).
    purge_at: usize,
}

#[derive(Debug)]
struct Admitted {
    sockets: usize,
    /// Frames its resumes may still send, refilled at the configured rate
    /// up to one second's worth; `None` while full (nothing spent).
    replay: Option<(f64, Instant)>,
}

impl Admissions {
    /// Counts one more socket for `client`, unless it has `max` already.
    pub(super) fn admit(&mut self, client: &str, max: usize) -> Result<(), AdmitError> {
        if self.admitted.len() >= self.purge_at && !self.admitted.contains_key(client) {
            // Spent allowance refills within a second: older is as full.
            let now = Instant::now();
            self.admitted.retain(|_, admitted| {
                admitted.sockets > 0
                    || admitted
                        .replay
                        .is_some_and(|(_, at)| now.duration_since(at).as_secs() < 1)
            });
            self.purge_at = (2 * self.admitted.len()).max(64);
        }
        let admitted = self.admitted.entry(client.into()).or_insert(Admitted {
            sockets: 0,
            replay: None,
        });
        if admitted.sockets >= max {
            return Err(AdmitError::TooManySockets(max));
        }
        admitted.sockets += 1;
        Ok(())
    }

    /// The frames `client`'s next resume may send, at `rate` a second with
    /// a burst of one second's worth: at least one, or `None` when it has
    /// spent them.
    pub(super) fn replay_allowance(
        &mut self,
        client: &str,
        rate: usize,
        now: Instant,
    ) -> Option<usize> {
        let admitted = self.admitted.get_mut(client)?;
        let rate = rate.max(1) as f64;
        let Some((tokens, refilled)) = &mut admitted.replay else {
            return Some(rate as usize);
        };
        *tokens =
            (*tokens + now.saturating_duration_since(*refilled).as_secs_f64() * rate).min(rate);
        *refilled = now;
        (*tokens >= 1.0).then_some(*tokens as usize)
    }

    /// Takes `frames` that `client`'s resume sent out of its allowance.
    pub(super) fn spend_replay(&mut self, client: &str, rate: usize, frames: usize, now: Instant) {
        if let Some(admitted) = self.admitted.get_mut(client) {
            let rate = rate.max(1) as f64;
            let (tokens, _) = admitted.replay.get_or_insert((rate, now));
            *tokens = (*tokens - frames as f64).max(0.0);
        }
    }

    /// Whether no client has a socket admitted.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.admitted.is_empty()
    }

    /// Counts one socket of `client` less. A client whose last socket goes
    /// is forgotten unless it spent replay allowance: reconnecting must not
    /// refill it (it goes once refilled, when a new client needs room).
    pub(super) fn release(&mut self, client: &str) {
        if let Some(admitted) = self.admitted.get_mut(client) {
            admitted.sockets -= 1;
            if admitted.sockets == 0 && admitted.replay.is_none() {
                self.admitted.remove(client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_up_to_max_and_a_place_back_on_release() {
        let mut admissions = Admissions::default();
        assert_eq!(admissions.admit("acme", 2), Ok(()));
        assert_eq!(admissions.admit("acme", 2), Ok(()));
        assert_eq!(
            admissions.admit("acme", 2),
            Err(AdmitError::TooManySockets(2))
        );
        assert_eq!(admissions.admit("other", 2), Ok(()), "per client code");
        admissions.release("acme");
        assert_eq!(admissions.admit("acme", 2), Ok(()));
        admissions.release("acme");
        admissions.release("acme");
        assert!(
            !admissions.admitted.contains_key("acme"),
            "forgotten at zero"
        );
    }
}
