//! Resume: a held socket goes live and is sent what it missed, within the
//! socket's queue bounds and its client code's allowance, in short holds of
//! the hub's lock.

// hashbrown's default hasher (foldhash, seeded at random), as the history
// uses: SipHash showed in profiles of resumes answering thousands of keys.
use hashbrown::HashMap;

use super::history::Replay;
use super::seen_ahead;
use super::{Hub, ResumeError, Resumed, SocketId};
use crate::frame::SharedResult;
use crate::names::StreamName;
use crate::protocol::{LastSeen, Position};
use crate::sync::release_fairly;

/// Named keys a resume answers in one hold of the hub's lock: a resume
/// naming thousands of keys takes the lock many times briefly, with live
/// delivery in between, instead of once for milliseconds. A hold of 256
/// took 150–550 µs in the abuse scenario (about a microsecond a key);
/// 64 keeps a hold near 100 µs. Each hold ends with a fair release, so a
/// delivery waiting for the lock gets it before the next hold, and the
/// resume then yields its thread, so the tasks queued behind it (live
/// delivery among them) run before the next hold.
const KEYS_PER_HOLD: usize = 64;

#[cfg(test)]
thread_local! {
    /// Runs before each hold that answers keys: the tests' way to deliver
    /// live results while a resume goes on.
    pub(super) static BETWEEN_HOLDS: std::cell::RefCell<Option<Box<dyn FnMut()>>> =
        std::cell::RefCell::new(None);
}

/// A key named in a resume: whether it is private, its symbol, and the
/// position the client last saw.
type NamedKey<'a> = (bool, &'a str, Position<'a>);

impl Hub {
    /// Makes a held socket live, subscribed to `last_seen.symbols` (else
    /// its initial set), and finds what it missed since `last_seen`. Every
    /// result is either among the frames returned or queued to the socket
    /// after them, never both and never neither:
    ///
    /// - the socket goes live first, so a result delivered from then on is
    ///   queued to it;
    /// - the named keys are then answered from their history, a few dozen
    ///   per hold of the lock, yielding the thread between holds, so one
    ///   resume never keeps live delivery waiting for long (neither for
    ///   the lock nor for the thread: a resume naming 5,000 keys had held
    ///   its thread for 7 ms, and every task queued behind it waited);
    /// - and a result queued while the resume went on that the replay holds
    ///   too is taken back out of the socket's queue.
    pub(super) async fn resume<'a>(
        &self,
        id: SocketId,
        last_seen: &'a LastSeen,
        with_latest: bool,
    ) -> Result<Resumed<'a>, ResumeError> {
        let Live {
            subscriptions,
            client,
            group,
            allowance,
        } = self.go_live_to_resume(id, last_seen)?;
        // The series whose every key is subscribed (`None`: the SMA's `"*"`).
        let wildcards: Vec<Option<&str>> = subscriptions
            .iter()
            .map(|s| StreamName::split(s))
            .filter(|name| name.is_wildcard())
            .map(|name| name.series)
            .collect();
        let wants = |key: &str| {
            wildcards.contains(&StreamName::split(key).series)
                || subscriptions
                    .binary_search_by(|s| s.as_str().cmp(key))
                    .is_ok()
        };
        let named: Vec<NamedKey<'_>> = (last_seen.public.iter().map(|map| (false, map)))
            .chain(last_seen.private.iter().map(|map| (true, map)))
            .flat_map(|(private, (epoch, symbols))| {
                symbols
                    .iter()
                    .map(move |(symbol, &seq)| (private, symbol.as_str(), Position { seq, epoch }))
            })
            .collect();
        let mut resumed = Resumed::default();
        // Keys the client is ahead on, at what it has seen (see `Answered`).
        let mut ahead_of_us: Vec<NamedKey<'_>> = Vec::new();
        // A replay bypasses the socket's queue; it is held to the queue's
        // bounds all the same (the budget). A key whose missed results would
        // pass them is not recovered, and it spends the budget: the keys
        // after it are sent their latest result, without their missed ones
        // being read, so a resume costs its request's size plus the budget,
        // however many keys it names.
        let limits = &self.inner.limits;
        let mut budget = Budget {
            frames: limits.send_queue.min(allowance),
            bytes: limits.send_queue_bytes,
            replaying: true,
        };
        for (hold, keys) in named.chunks(KEYS_PER_HOLD).enumerate() {
            if hold > 0 {
                tokio::task::yield_now().await;
            }
            #[cfg(test)]
            BETWEEN_HOLDS.with_borrow_mut(|hook| hook.as_mut().map(|hook| hook()));
            let mut guard = self.state();
            let state = &mut *guard;
            for &(private, symbol, seen) in keys {
                if !private && !wants(symbol) {
                    // Named but not subscribed: not recovered, and not sent.
                    budget.answer(&mut resumed, Replay::Gap(None), symbol, false);
                    continue;
                }
                let owner = private.then_some(&*client);
                let replay = match state.history.replay(owner, symbol, seen) {
                    // A key the client is ahead on needs a floor. Past
                    // [`seen_ahead::MAX_PER_SOCKET`] of them, it is reported
                    // not recovered and nothing of it is sent (this node's
                    // latest is older than what the client has; what comes
                    // live may repeat what it saw).
                    Replay::Ahead if ahead_of_us.len() >= seen_ahead::MAX_PER_SOCKET => {
                        Replay::Gap(None)
                    }
                    Replay::Ahead => {
                        state.seen_ahead.add(id, owner, symbol, seen);
                        ahead_of_us.push((private, symbol, seen));
                        continue;
                    }
                    // A public key with no history here: its snapshot stands in.
                    Replay::Gap(None) if !private => Replay::Gap(state.snapshots.get(symbol)),
                    replay => replay,
                };
                budget.answer(&mut resumed, replay, symbol, private);
            }
            // A delivery waiting meanwhile goes first.
            release_fairly(guard);
        }
        let mut guard = self.state();
        let state = &mut *guard;
        if with_latest {
            let named = |symbol: &str| {
                last_seen
                    .public
                    .values()
                    .any(|symbols| symbols.contains_key(symbol))
            };
            // Taken lazily: the bounds, not the number of symbols, bound the
            // work. A key named beside its series' wildcard comes with it.
            let snapshots = &state.snapshots;
            let latest = (wildcards.iter())
                .flat_map(|series| snapshots.iter_in(*series))
                .filter(|frame| !named(frame.key()))
                .chain(
                    subscriptions
                        .iter()
                        .map(|s| (s, StreamName::split(s)))
                        .filter(|(_, name)| {
                            !name.is_wildcard() && !wildcards.contains(&name.series)
                        })
                        .filter(|(s, _)| !named(s))
                        .filter_map(|(s, _)| snapshots.get(s)),
                );
            for frame in latest {
                if !budget.take(1, frame.text().len()) {
                    break;
                }
                resumed.frames.push(frame.clone());
            }
        }
        let outbox = state
            .connections
            .get(id)
            .map(|socket| socket.outbox.rates());
        drop(guard);
        if let Some(group) = &group {
            let cost = resumed.frames.len() + named.len();
            self.admissions().spend_replay(group, cost);
        }
        // Outside the hub's lock: the socket's own queue, bounded by its own
        // bounds, is what is read.
        if let Some(outbox) = outbox {
            let answered = Answered::new(&resumed.frames, &ahead_of_us);
            outbox.forget_replayed(|result| answered.covers(result));
        }
        Ok(resumed)
    }

    /// The first step of a resume, under the lock: the checks, then the
    /// socket goes live with its subscriptions.
    fn go_live_to_resume(&self, id: SocketId, last_seen: &LastSeen) -> Result<Live, ResumeError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let initial = state.held.get(&id).ok_or(ResumeError::NotHeld)?;
        let mut subscriptions = last_seen.symbols.clone().unwrap_or_else(|| initial.clone());
        subscriptions.sort();
        subscriptions.dedup();
        let max_symbols = self.inner.limits.max_symbols;
        if subscriptions.len() > max_symbols {
            return Err(ResumeError::TooManySymbols(max_symbols));
        }
        // What resumes naming keys may send, per client code: a client that
        // resumes over and over (on new sockets, each within its limits)
        // gets its allowance, then refusals that cost nothing.
        let names_keys = !last_seen.public.is_empty() || !last_seen.private.is_empty();
        let rate = self.inner.limits.resume_frames_per_second;
        let now = std::time::Instant::now();
        let group = state.connections.get(id).map(|socket| socket.group.clone());
        let allowance = match &group {
            Some(group) if names_keys => self
                .admissions()
                .replay_allowance(group, now)
                .ok_or(ResumeError::RateLimited(rate))?,
            _ => usize::MAX,
        };
        state.held.remove(&id);
        let client = state
            .connections
            .make_live(id)
            .ok_or(ResumeError::NotHeld)?;
        state.subscriptions.add(id, &subscriptions);
        Ok(Live {
            subscriptions,
            client,
            // Only a resume naming keys spends the allowance.
            group: group.filter(|_| names_keys),
            allowance,
        })
    }

    /// Makes a held socket live without resuming; false when it was not held.
    pub(super) fn go_live(&self, id: SocketId) -> bool {
        let mut state = self.state();
        let Some(subscriptions) = state.held.remove(&id) else {
            return false;
        };
        state.connections.make_live(id);
        state.subscriptions.add(id, &subscriptions);
        true
    }
}

/// What a resume may still send: the socket's queue bounds, in frames and
/// bytes.
struct Budget {
    frames: usize,
    bytes: usize,
    /// Whether missed results are still replayed: not once a key's did not
    /// fit (the keys after it are sent their latest result, and no missed
    /// result is read).
    replaying: bool,
}

impl Budget {
    /// Takes `frames` frames of `bytes` bytes if they fit.
    fn take(&mut self, frames: usize, bytes: usize) -> bool {
        if frames > self.frames || bytes > self.bytes {
            return false;
        }
        self.frames -= frames;
        self.bytes -= bytes;
        true
    }

    /// Answers one named key: its missed results if they fit; otherwise the
    /// key is not recovered, and its latest result is sent if that fits. Missed results that do not
    /// fit spend the budget: the keys after are not read (see `resume`).
    fn answer<'a>(
        &mut self,
        resumed: &mut Resumed<'a>,
        replay: Replay<'_>,
        symbol: &'a str,
        private: bool,
    ) {
        let mut spent = false;
        let latest = match replay {
            Replay::Ahead => return,
            Replay::Recovered(missed) if missed.len() == 0 => return,
            Replay::Recovered(missed) => {
                let count = missed.len();
                // Read only when the count fits, and no further than it.
                let bytes = if self.replaying && count <= self.frames {
                    missed.clone().map(|frame| frame.text().len()).sum()
                } else {
                    usize::MAX
                };
                if self.take(count, bytes) {
                    resumed.replayed += count;
                    resumed.frames.extend(missed.cloned());
                    return;
                }
                spent = true;
                missed.newest()
            }
            Replay::Gap(latest) => latest,
        };
        let unrecovered = if private {
            &mut resumed.unrecovered_private
        } else {
            &mut resumed.unrecovered_public
        };
        unrecovered.push(symbol);
        if let Some(latest) = latest
            && self.take(1, latest.text().len())
        {
            resumed.frames.push(latest.clone());
        }
        if spent {
            // Past the budget: the keys after this one are not read.
            self.replaying = false;
        }
    }
}

/// A socket gone live to resume.
struct Live {
    /// Its subscriptions, sorted.
    subscriptions: Vec<String>,
    /// Its client code.
    client: Box<str>,
    /// Its client code when the resume names keys (and so spends the
    /// client's replay allowance).
    group: Option<Box<str>>,
    /// What the resume may replay.
    allowance: usize,
}

/// What a resume answered, key by key: the newest position the client has
/// seen or is sent. A result queued to the socket while its resume went on
/// at or before that position would reach the client twice.
struct Answered<'a>(HashMap<(bool, &'a str), Position<'a>>);

impl<'a> Answered<'a> {
    fn new(sent: &'a [SharedResult], ahead: &[NamedKey<'a>]) -> Self {
        let mut newest = HashMap::with_capacity(sent.len() + ahead.len());
        // Each key's frames are in order: the last one is its newest.
        for frame in sent {
            if let Some(position) = frame.position() {
                newest.insert((frame.client().is_some(), frame.key()), position);
            }
        }
        for &(private, symbol, seen) in ahead {
            newest.insert((private, symbol), seen);
        }
        Self(newest)
    }

    /// Whether the client has `result`, or is sent it by the resume.
    fn covers(&self, result: &SharedResult) -> bool {
        let Some(position) = result.position() else {
            return false;
        };
        self.0
            .get(&(result.client().is_some(), result.key()))
            .is_some_and(|newest| newest.epoch == position.epoch && position.seq <= newest.seq)
    }
}
