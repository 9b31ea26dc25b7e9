//! Per client code: sockets admitted (upgrading or open), for
//! `server.max_connections_per_client`; new sockets a second, for
//! `server.connects_per_client_per_second`; and the frames its resumes may
//! still send, for `websocket.resume_frames_per_second`.
//!
//! A client with no socket is remembered while either allowance is being
//! refilled, so closing every socket and coming back does not refill it;
//! such entries go once refilled, when the map has doubled since the last
//! look (amortised: no walk per admission).

// hashbrown's default hasher (foldhash, seeded at random), and its
// `entry_ref`: a client code already counted is found without copying it.
use hashbrown::HashMap;
use std::time::Instant;

use super::AdmitError;

/// The rates the allowances refill at.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rates {
    /// New sockets a client code may open a second; at once, as many as it
    /// may have open (`max_sockets`), or the rate if more.
    pub(super) connects_per_second: usize,
    /// Sockets a client code may have open.
    pub(super) max_sockets: usize,
    /// Frames its resumes may send a second, a second's worth at once.
    pub(super) replay_frames_per_second: usize,
}

#[derive(Debug)]
pub(super) struct Admissions {
    rates: Rates,
    admitted: HashMap<Box<str>, Admitted>,
    /// How many entries there may be before those with no socket and full
    /// allowances are dropped.
    purge_at: usize,
}

#[derive(Debug)]
struct Admitted {
    sockets: usize,
    connects: Bucket,
    replay: Bucket,
}

/// A token bucket: `tokens` as of `at`, refilling at a rate up to a cap.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(cap: f64, now: Instant) -> Self {
        Self {
            tokens: cap,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, cap: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(cap);
        // A caller that read the clock before waiting for the lock must not
        // move the refill time back (the wait would be credited twice).
        self.at = self.at.max(now);
    }

    fn is_full(mut self, rate: f64, cap: f64, now: Instant) -> bool {
        self.refill(rate, cap, now);
        self.tokens >= cap
    }
}

impl Rates {
    fn connects(self) -> (f64, f64) {
        let rate = self.connects_per_second.max(1) as f64;
        (rate, rate.max(self.max_sockets as f64))
    }

    fn replay(self) -> (f64, f64) {
        let rate = self.replay_frames_per_second.max(1) as f64;
        (rate, rate)
    }
}

impl Admissions {
    pub(super) fn new(rates: Rates) -> Self {
        Self {
            rates,
            admitted: HashMap::new(),
            purge_at: 0,
        }
    }

    /// Counts one more socket for `client`, unless it has `max_sockets`
    /// already or opened its allowance of new ones this second.
    pub(super) fn admit(&mut self, client: &str, now: Instant) -> Result<(), AdmitError> {
        if self.admitted.len() >= self.purge_at && !self.admitted.contains_key(client) {
            let rates = self.rates;
            self.admitted
                .retain(|_, admitted| !admitted.is_forgettable(rates, now));
            self.purge_at = (2 * self.admitted.len()).max(64);
        }
        let (connect_rate, connect_cap) = self.rates.connects();
        let (_, replay_cap) = self.rates.replay();
        let admitted = self.admitted.entry_ref(client).or_insert_with(|| Admitted {
            sockets: 0,
            connects: Bucket::full(connect_cap, now),
            replay: Bucket::full(replay_cap, now),
        });
        let max = self.rates.max_sockets;
        if admitted.sockets >= max {
            return Err(AdmitError::TooManySockets(max));
        }
        admitted.connects.refill(connect_rate, connect_cap, now);
        if admitted.connects.tokens < 1.0 {
            return Err(AdmitError::TooManyConnects(self.rates.connects_per_second));
        }
        admitted.connects.tokens -= 1.0;
        admitted.sockets += 1;
        Ok(())
    }

    /// The frames `client`'s next resume may send: at least one, or `None`
    /// when it has spent them.
    pub(super) fn replay_allowance(&mut self, client: &str, now: Instant) -> Option<usize> {
        let (rate, cap) = self.rates.replay();
        let replay = &mut self.admitted.get_mut(client)?.replay;
        replay.refill(rate, cap, now);
        (replay.tokens >= 1.0).then_some(replay.tokens as usize)
    }

    /// Takes what `client`'s resume cost out of its allowance: the frames
    /// it sent and the keys it named (answering a key costs about what
    /// sending a frame does). A resume may cost more than was left, down to
    /// a second's worth below zero: the client's next resume then waits
    /// for that debt to refill too, so its resumes cost at most the rate,
    /// however many keys each names.
    pub(super) fn spend_replay(&mut self, client: &str, cost: usize) {
        let (_, cap) = self.rates.replay();
        if let Some(admitted) = self.admitted.get_mut(client) {
            admitted.replay.tokens = (admitted.replay.tokens - cost as f64).max(-cap);
        }
    }

    /// Whether no client has a socket admitted.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.admitted.values().all(|admitted| admitted.sockets == 0)
    }

    /// Counts one socket of `client` less. A client whose last socket goes
    /// is forgotten at once if its allowances are full.
    pub(super) fn release(&mut self, client: &str, now: Instant) {
        let rates = self.rates;
        if let Some(admitted) = self.admitted.get_mut(client) {
            admitted.sockets -= 1;
            if admitted.is_forgettable(rates, now) {
                self.admitted.remove(client);
            }
        }
    }
}

impl Admitted {
    fn is_forgettable(&self, rates: Rates, now: Instant) -> bool {
        let (connect_rate, connect_cap) = rates.connects();
        let (replay_rate, replay_cap) = rates.replay();
        self.sockets == 0
            && self.connects.is_full(connect_rate, connect_cap, now)
            && self.replay.is_full(replay_rate, replay_cap, now)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn admissions(max_sockets: usize, connects_per_second: usize) -> Admissions {
        Admissions::new(Rates {
            connects_per_second,
            max_sockets,
            replay_frames_per_second: 100,
        })
    }

    #[test]
    fn a_client_gets_up_to_max_and_a_place_back_on_release() {
        let mut admissions = admissions(2, 100);
        let now = Instant::now();
        assert_eq!(admissions.admit("acme", now), Ok(()));
        assert_eq!(admissions.admit("acme", now), Ok(()));
        assert_eq!(
            admissions.admit("acme", now),
            Err(AdmitError::TooManySockets(2))
        );
        assert_eq!(admissions.admit("other", now), Ok(()), "per client code");
        admissions.release("acme", now);
        assert_eq!(admissions.admit("acme", now), Ok(()));
        let later = now + Duration::from_secs(1);
        admissions.release("acme", later);
        admissions.release("acme", later);
        assert!(
            !admissions.admitted.contains_key("acme"),
            "forgotten at zero, its allowances refilled (100 a second)"
        );
    }

    #[test]
    fn new_sockets_are_limited_per_second_after_a_burst_and_closing_does_not_refill() {
        // Up to 3 open; 1 new a second after a burst of 3.
        let mut admissions = admissions(3, 1);
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(admissions.admit("acme", start), Ok(()));
            admissions.release("acme", start);
        }
        assert_eq!(
            admissions.admit("acme", start),
            Err(AdmitError::TooManyConnects(1)),
            "closing each socket gave no new one back"
        );
        let later = start + Duration::from_millis(1_100);
        assert_eq!(admissions.admit("acme", later), Ok(()), "one more a second");
        assert_eq!(
            admissions.admit("acme", later),
            Err(AdmitError::TooManyConnects(1))
        );
    }
}
