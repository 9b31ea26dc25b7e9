//! Resume: a held socket goes live and is sent what it missed, in one step
//! under the lock, within the socket's queue bounds and its client code's
//! allowance.

use super::history::Replay;
use super::seen_ahead;
use super::{Hub, ResumeError, Resumed, SocketId};
use crate::names::StreamName;
use crate::protocol::{LastSeen, Position};

impl Hub {
    /// Makes a held socket live, subscribed to `last_seen.symbols` (else
    /// its initial set), and finds what it missed since `last_seen` — in
    /// one step under the lock, so every result is either among the frames
    /// returned or queued to the socket after them, never both and never
    /// neither.
    pub(super) fn resume(
        &self,
        id: SocketId,
        last_seen: &LastSeen,
        with_latest: bool,
    ) -> Result<Resumed, ResumeError> {
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
            Some(group) if names_keys => state
                .admissions
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
        let mut resumed = Resumed::default();
        let mut ahead: Vec<(bool, &str, Position<'_>)> = Vec::new();
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
        let history = &state.history;
        for (epoch, symbols) in &last_seen.public {
            for (symbol, &seq) in symbols {
                if !wants(symbol) {
                    // Named but not subscribed: not recovered, and not sent.
                    budget.answer(&mut resumed, Replay::Gap(None), symbol, false);
                    continue;
                }
                let seen = Position { seq, epoch };
                let replay = history.replay(None, symbol, seen);
                let replay = match floored(replay, &mut ahead, (false, symbol, seen)) {
                    // A key with no history here: its snapshot stands in.
                    Some(Replay::Gap(None)) => Replay::Gap(state.snapshots.get(symbol)),
                    Some(replay) => replay,
                    // Past the floor cap: not recovered, and nothing sent.
                    None => Replay::Gap(None),
                };
                budget.answer(&mut resumed, replay, symbol, false);
            }
        }
        for (epoch, symbols) in &last_seen.private {
            for (symbol, &seq) in symbols {
                let seen = Position { seq, epoch };
                let replay = history.replay(Some(&client), symbol, seen);
                let replay = floored(replay, &mut ahead, (true, symbol, seen));
                let replay = replay.unwrap_or(Replay::Gap(None));
                budget.answer(&mut resumed, replay, symbol, true);
            }
        }
        for (private, symbol, seen) in ahead {
            let owner = private.then_some(&*client);
            state.seen_ahead.add(id, owner, symbol, seen);
        }
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
        if names_keys && let Some(group) = &group {
            let sent = resumed.frames.len();
            state.admissions.spend_replay(group, sent);
        }
        Ok(resumed)
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
    fn answer(&mut self, resumed: &mut Resumed, replay: Replay<'_>, symbol: &str, private: bool) {
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
        unrecovered.push(symbol.to_owned());
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

/// A key the client is ahead on needs a floor. Past
/// [`seen_ahead::MAX_PER_SOCKET`] of them, `None`: the key is reported not
/// recovered and nothing of it is sent (this node's latest is older than
/// what the client has; what comes live may repeat what it saw).
fn floored<'a>(
    replay: Replay<'a>,
    ahead: &mut Vec<(bool, &'a str, Position<'a>)>,
    key: (bool, &'a str, Position<'a>),
) -> Option<Replay<'a>> {
    if !matches!(replay, Replay::Ahead) {
        return Some(replay);
    }
    if ahead.len() >= seen_ahead::MAX_PER_SOCKET {
        return None;
    }
    ahead.push(key);
    Some(replay)
}
