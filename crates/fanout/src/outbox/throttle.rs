//! A socket's `max_rate` limits: at most one result per key per interval,
//! each the newest, in bounded memory whatever the number of keys.
//!
//! A key's next result may go once its interval has passed since the key's
//! last one sent. The throttle remembers when keys sent for at most
//! [`Throttle::remembered_cap`] keys; past that, it forgets them all and
//! keeps only the latest of their send times, treating every key it does
//! not remember as if it had sent then. That is never more often than asked
//! (a forgotten key's result may wait a little longer than it had to), and a
//! client subscribing `"*"` at a tiny rate over 100,000 symbols costs the
//! bridge a bounded map, not one entry per symbol for an hour.
//!
//! Waiting results are found by when they fall due without walking keys.
//! Keys limited through `"*"` all share its interval, so they are ordered by
//! their last send time, and a change of the `"*"` rate moves none of them;
//! keys limited by name are ordered by their due time, and a change of their
//! rate moves only the keys it names. So a subscribe's cost is its own size.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::frame::{BarState, Frame, SharedResult};
use crate::names::StreamName;

/// Bytes one remembered send time is counted as (its map entry and name):
/// the throttle remembers at most a byte bound's worth of them.
const REMEMBERED_COST: usize = 128;

/// The fewest send times remembered, whatever the byte bound.
const MIN_REMEMBERED: usize = 64;

/// The rate limits of one socket's public keys.
#[derive(Debug)]
pub(super) struct Throttle {
    /// The interval of every public symbol a `"*"` subscription limited.
    all: Option<Duration>,
    /// Intervals of symbols limited by name (these win over `all`); at most
    /// the socket's subscriptions.
    by_symbol: HashMap<Box<str>, Duration>,
    /// Intervals of every key of a series a `"*@series"` subscription
    /// limited, by series (keys limited by name win). Their waiting keys
    /// are ordered by due time, so a change applies from each key's next
    /// result; at most the configured series.
    in_series: HashMap<Box<str>, Duration>,
    /// When keys last sent, for at most `remembered_cap` keys.
    sent: HashMap<Arc<str>, Instant>,
    remembered_cap: usize,
    /// The latest send time of the keys forgotten: a key not in `sent` is
    /// taken to have sent then.
    forgotten: Option<Instant>,
    /// Each key with a result waiting: the result, and where it is ordered.
    waiting: HashMap<Arc<str>, Waiting>,
    /// Waiting keys limited through `"*"`, by their last send time.
    by_sent: BTreeSet<(Instant, Arc<str>)>,
    /// Waiting keys limited by name (or no longer limited), by due time.
    by_due: BTreeSet<(Instant, Arc<str>)>,
    /// Payload bytes of the waiting results.
    pub(super) waiting_bytes: usize,
    /// The deadline the session's timer is armed for: an offer wakes the
    /// session only for an earlier one.
    pub(super) armed: Option<Instant>,
}

#[derive(Debug)]
struct Waiting {
    result: SharedResult,
    place: Place,
}

/// Where a waiting key is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// In `by_sent`, at the key's last send time: due one `all` later.
    Sent(Instant),
    /// In `by_due`, at its due time.
    Due(Instant),
}

/// What [`Throttle::hold`] did with a frame it kept.
pub(super) enum Hold {
    /// The key's first waiting frame, due at `due`: the session may have a
    /// new deadline.
    First { due: Instant },
    /// It replaced `replaced` waiting frames of its key.
    Waiting { replaced: u64 },
    /// It would have started to wait, but the frames held back are at their
    /// byte bound: it is dropped, as a conflated frame is, and its key's
    /// next result is held or sent as usual.
    Skipped,
}

impl Throttle {
    /// No limits yet; remembers send times within `max_bytes`.
    pub(super) fn new(max_bytes: usize) -> Self {
        Self {
            all: None,
            by_symbol: HashMap::new(),
            in_series: HashMap::new(),
            sent: HashMap::new(),
            remembered_cap: (max_bytes / REMEMBERED_COST).max(MIN_REMEMBERED),
            forgotten: None,
            waiting: HashMap::new(),
            by_sent: BTreeSet::new(),
            by_due: BTreeSet::new(),
            waiting_bytes: 0,
            armed: None,
        }
    }

    /// Sets the limit of `symbol` (`"*"`: every public symbol not limited
    /// by name), or lifts it (`None`). Returns whether some waiting frame
    /// may now be due sooner. Work: one key, whatever the number of keys.
    pub(super) fn set(&mut self, symbol: &str, interval: Option<Duration>) -> bool {
        let name = StreamName::split(symbol);
        if let (true, Some(series)) = (name.is_wildcard(), name.series) {
            match interval {
                Some(interval) => self.in_series.insert(series.into(), interval),
                None => self.in_series.remove(series),
            };
            return false;
        }
        if symbol == "*" {
            let before = self.all;
            self.all = interval;
            if interval.is_none() && self.by_symbol.is_empty() && self.in_series.is_empty() {
                // Nothing is limited: a key limited again later is as one
                // never seen (with limits by name, stale times only delay).
                self.sent.clear();
                self.forgotten = None;
            }
            let sooner = match (before, interval) {
                (Some(before), Some(now)) => now < before,
                (Some(_), None) => true,
                (None, _) => false,
            };
            return sooner && !self.by_sent.is_empty();
        }
        let before = self.due_of(symbol);
        match interval {
            Some(interval) => self.by_symbol.insert(symbol.into(), interval),
            None => self.by_symbol.remove(symbol),
        };
        if self.interval_of(symbol).is_none() {
            self.sent.remove(symbol);
        }
        let Some((name, waiting)) = self.waiting.get_key_value(symbol) else {
            return false;
        };
        let (name, old) = (name.clone(), waiting.place);
        self.unplace(&name, old);
        let sent = self.last_sent(&name);
        let place = self.place_for(&name, sent);
        self.put(&name, place);
        if let Some(waiting) = self.waiting.get_mut(&name) {
            waiting.place = place;
        }
        before.is_none_or(|before| self.due_of(symbol).is_some_and(|now| now < before))
    }

    /// Forgets the waiting frame of `symbol`: it is no longer subscribed.
    pub(super) fn forget(&mut self, symbol: &str) {
        if let Some((name, waiting)) = self.waiting.remove_entry(symbol) {
            self.waiting_bytes -= waiting.result.text().len();
            self.unplace(&name, waiting.place);
        }
        self.sent.remove(symbol);
    }

    /// Drops the frame `symbol` has waiting, if any: a newer or equal one
    /// (its snapshot) was just queued. Its send time stays.
    pub(super) fn drop_waiting(&mut self, symbol: &str) {
        if let Some((name, waiting)) = self.waiting.remove_entry(symbol) {
            self.waiting_bytes -= waiting.result.text().len();
            self.unplace(&name, waiting.place);
        }
    }

    /// Whether it limits nothing and holds nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.all.is_none()
            && self.by_symbol.is_empty()
            && self.in_series.is_empty()
            && self.waiting.is_empty()
    }

    /// Send times remembered now (the tests' view of its memory).
    #[cfg(test)]
    pub(super) fn remembered(&self) -> usize {
        self.sent.len()
    }

    fn interval_of(&self, symbol: &str) -> Option<Duration> {
        if let Some(interval) = self.by_symbol.get(symbol) {
            return Some(*interval);
        }
        match StreamName::split(symbol).series {
            None => self.all,
            Some(series) => self.in_series.get(series).copied(),
        }
    }

    fn last_sent(&self, symbol: &str) -> Option<Instant> {
        self.sent.get(symbol).copied().or(self.forgotten)
    }

    /// Where a waiting key that last sent at `sent` is ordered under the
    /// limits as they are now.
    fn place_for(&self, symbol: &str, sent: Option<Instant>) -> Place {
        let sent = sent.unwrap_or_else(Instant::now);
        match (self.by_symbol.get(symbol), StreamName::split(symbol).series) {
            (Some(interval), _) => Place::Due(sent + *interval),
            (None, None) if self.all.is_some() => Place::Sent(sent),
            (None, Some(series)) => {
                Place::Due(sent + self.in_series.get(series).copied().unwrap_or_default())
            }
            // Not limited any more: due at once.
            (None, None) => Place::Due(sent),
        }
    }

    /// When the waiting frame of `symbol` is due, if one waits.
    fn due_of(&self, symbol: &str) -> Option<Instant> {
        let waiting = self.waiting.get(symbol)?;
        Some(self.due_at(waiting.place))
    }

    fn due_at(&self, place: Place) -> Instant {
        match place {
            Place::Due(due) => due,
            // `all` lifted: every key ordered by its send time is due.
            Place::Sent(sent) => self.all.map_or(sent, |all| sent + all),
        }
    }

    fn put(&mut self, name: &Arc<str>, place: Place) {
        match place {
            Place::Sent(at) => self.by_sent.insert((at, name.clone())),
            Place::Due(at) => self.by_due.insert((at, name.clone())),
        };
    }

    fn unplace(&mut self, name: &Arc<str>, place: Place) {
        // Borrowed probe: the set holds its own clone of the name.
        match place {
            Place::Sent(at) => self.by_sent.remove(&(at, name.clone())),
            Place::Due(at) => self.by_due.remove(&(at, name.clone())),
        };
    }

    /// Notes that `symbol` sent at `now`. Past `remembered_cap` keys, those
    /// whose interval has passed go; if most have not, all go, and the
    /// latest of their send times stands for each (see the module doc).
    fn remember(&mut self, symbol: &str, now: Instant) {
        if let Some(sent) = self.sent.get_mut(symbol) {
            *sent = now;
            return;
        }
        if self.sent.len() >= self.remembered_cap {
            let mut sent = std::mem::take(&mut self.sent);
            sent.retain(|name, sent| {
                self.interval_of(name)
                    .is_some_and(|interval| *sent + interval > now)
            });
            self.sent = sent;
            if self.sent.len() * 2 >= self.remembered_cap {
                let latest = self.sent.values().max().copied();
                self.forgotten = self.forgotten.max(latest);
                self.sent.clear();
            }
        }
        self.sent.insert(symbol.into(), now);
    }

    /// Keeps `message` back when its key is limited and not due, or has a
    /// frame waiting already (which it replaces: a newer frame must not
    /// overtake an older one of its key, whatever the limit is now);
    /// otherwise hands it back to be queued now, noting the key sent.
    /// Frames held back take at most `max_bytes` in all (one per key): past
    /// that, a frame that would start to wait is skipped. Sending it at once
    /// instead would let a socket that asked for one result per key an hour
    /// over more keys than fit receive every live result: the rate wins
    /// over delivering a key's newest value before its next change.
    pub(super) fn hold(
        &mut self,
        result: SharedResult,
        max_bytes: usize,
    ) -> Result<Hold, SharedResult> {
        if result.client().is_some() {
            return Err(result);
        }
        let symbol = result.key();
        if result.bar() == BarState::Closed {
            // A closed candle never waits, so nothing replaces it: it goes
            // now, in place of the open one of its key that waits, if any.
            if let Some((name, waiting)) = self.waiting.remove_entry(symbol) {
                self.waiting_bytes -= waiting.result.text().len();
                self.unplace(&name, waiting.place);
            }
            if self.interval_of(symbol).is_some() {
                self.remember(symbol, Instant::now());
            }
            return Err(result);
        }
        let len = result.text().len();
        if let Some(waiting) = self.waiting.get_mut(symbol) {
            self.waiting_bytes = self.waiting_bytes + len - waiting.result.text().len();
            waiting.result = result;
            return Ok(Hold::Waiting { replaced: 1 });
        }
        let Some(interval) = self.interval_of(symbol) else {
            return Err(result);
        };
        let now = Instant::now();
        let sent = self.last_sent(symbol);
        let due = sent.map(|sent| sent + interval).filter(|due| now < *due);
        let Some(due) = due else {
            self.remember(symbol, now);
            return Err(result);
        };
        if self.waiting_bytes + len > max_bytes {
            return Ok(Hold::Skipped);
        }
        let name: Arc<str> = symbol.into();
        let place = self.place_for(&name, sent);
        self.put(&name, place);
        self.waiting_bytes += len;
        self.waiting.insert(name, Waiting { result, place });
        Ok(Hold::First { due })
    }

    /// Moves every waiting frame that is due into `batch`, in the order
    /// they fell due; returns how many.
    pub(super) fn release_due(&mut self, now: Instant, batch: &mut Vec<Frame>) -> usize {
        let mut released = 0;
        loop {
            let by_sent = self
                .by_sent
                .first()
                .map(|(sent, _)| self.due_at(Place::Sent(*sent)));
            let by_due = self.by_due.first().map(|(due, _)| *due);
            let from_sent = match (by_sent, by_due) {
                (Some(a), Some(b)) => a <= b,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let due = if from_sent { by_sent } else { by_due };
            if due.is_none_or(|due| due > now) {
                break;
            }
            let order = if from_sent {
                &mut self.by_sent
            } else {
                &mut self.by_due
            };
            let Some((_, name)) = order.pop_first() else {
                break;
            };
            let Some(waiting) = self.waiting.remove(&name) else {
                continue;
            };
            self.waiting_bytes -= waiting.result.text().len();
            batch.push(Frame::Result(waiting.result));
            released += 1;
            if self.interval_of(&name).is_some() {
                self.remember(&name, now);
            }
        }
        released
    }

    /// When the next waiting frame is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        let by_sent = self
            .by_sent
            .first()
            .map(|(sent, _)| self.due_at(Place::Sent(*sent)));
        let by_due = self.by_due.first().map(|(due, _)| *due);
        by_sent.into_iter().chain(by_due).min()
    }
}
