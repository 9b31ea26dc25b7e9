//! Which sockets want which keys: each socket's set, and the index from a
//! key's name (a symbol, or `symbol@series`) to its subscribers, with the
//! wildcards (`"*"`, and `"*@series"` per series) kept apart, as centrifuge
//! keeps subscriptions by channel. Routing looks subscribers up here; it
//! never scans every socket.

use std::collections::BTreeSet;

// hashbrown's default hasher (foldhash, seeded at random): socket ids are
// the hub's own counter, and SipHash on every lookup was a tenth of
// delivery's time at 10,000 sockets.
use hashbrown::{HashMap, HashSet};

use super::SocketId;
use crate::names::StreamName;

#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    /// Socket → what it subscribed to, sorted.
    of_socket: HashMap<SocketId, BTreeSet<String>>,
    /// Key name → sockets subscribed to it by name.
    by_symbol: HashMap<Box<str>, HashSet<SocketId>>,
    /// Sockets subscribed to every public symbol's SMA (`"*"`).
    everything: HashSet<SocketId>,
    /// Series → sockets subscribed to every key of it (`"*@series"`).
    everything_in: HashMap<Box<str>, HashSet<SocketId>>,
}

impl Subscriptions {
    /// Subscribes `id` to `symbols` (those it has are left as they are).
    pub(super) fn add(&mut self, id: SocketId, symbols: &[String]) {
        let own = self.of_socket.entry(id).or_default();
        for symbol in symbols {
            if !own.insert(symbol.clone()) {
                continue;
            }
            let name = StreamName::split(symbol);
            if name.is_wildcard() {
                match name.series {
                    None => self.everything.insert(id),
                    Some(series) => self
                        .everything_in
                        .entry(series.into())
                        .or_default()
                        .insert(id),
                };
            } else {
                self.by_symbol
                    .entry(symbol.as_str().into())
                    .or_default()
                    .insert(id);
            }
        }
    }

    pub(super) fn remove(&mut self, id: SocketId, symbol: &str) {
        let Some(own) = self.of_socket.get_mut(&id) else {
            return;
        };
        if !own.remove(symbol) {
            return;
        }
        self.unindex(id, symbol);
    }

    /// Takes `id` out of the index entry of `entry`, one of its subscriptions.
    fn unindex(&mut self, id: SocketId, entry: &str) {
        let name = StreamName::split(entry);
        let (index, key) = match (name.is_wildcard(), name.series) {
            (true, None) => {
                self.everything.remove(&id);
                return;
            }
            (true, Some(series)) => (&mut self.everything_in, series),
            (false, _) => (&mut self.by_symbol, entry),
        };
        if let Some(subscribers) = index.get_mut(key) {
            subscribers.remove(&id);
            if subscribers.is_empty() {
                index.remove(key);
            }
        }
    }

    /// Forgets the socket `id` and every index entry it had.
    pub(super) fn remove_all(&mut self, id: SocketId) {
        let Some(own) = self.of_socket.remove(&id) else {
            return;
        };
        for entry in own {
            self.unindex(id, &entry);
        }
    }

    /// Whether no socket is subscribed to anything and no index entry is left.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.of_socket.values().all(BTreeSet::is_empty)
            && self.by_symbol.is_empty()
            && self.everything.is_empty()
            && self.everything_in.is_empty()
    }

    /// What `id` is subscribed to.
    pub(super) fn of(&self, id: SocketId) -> Option<&BTreeSet<String>> {
        self.of_socket.get(&id)
    }

    /// The sockets subscribed to every public symbol.
    pub(super) fn to_everything(&self) -> impl Iterator<Item = &SocketId> {
        self.everything.iter()
    }

    /// Whether `id` is subscribed to every public symbol.
    pub(super) fn is_to_everything(&self, id: SocketId) -> bool {
        self.everything.contains(&id)
    }

    /// The sockets subscribed to every key of `series` (`"*@series"`).
    pub(super) fn to_everything_in<'a>(
        &'a self,
        series: &str,
    ) -> impl Iterator<Item = &'a SocketId> {
        self.everything_in.get(series).into_iter().flatten()
    }

    /// The sockets subscribed to the key `key` by name and not through its
    /// series' wildcard: with [`Self::to_everything`] (or, for a series'
    /// key, [`Self::to_everything_in`]), each socket a public result of the
    /// key goes to, once.
    pub(super) fn by_name_only<'a>(&'a self, key: &str) -> impl Iterator<Item = &'a SocketId> {
        let wildcard = match StreamName::split(key).series {
            None => Some(&self.everything),
            Some(series) => self.everything_in.get(series),
        };
        self.by_symbol
            .get(key)
            .into_iter()
            .flatten()
            .filter(move |&id| !wildcard.is_some_and(|sockets| sockets.contains(id)))
    }

    /// The sockets a public result for `symbol` goes to, each once.
    #[cfg(test)]
    pub(super) fn subscribers<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a SocketId> {
        let wildcard: Box<dyn Iterator<Item = &SocketId>> = match StreamName::split(key).series {
            None => Box::new(self.to_everything()),
            Some(series) => Box::new(self.to_everything_in(series)),
        };
        wildcard.chain(self.by_name_only(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbols(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn subscribers(subscriptions: &Subscriptions, symbol: &str) -> Vec<SocketId> {
        let mut ids: Vec<SocketId> = subscriptions.subscribers(symbol).copied().collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn a_result_reaches_each_subscriber_once() {
        let mut subscriptions = Subscriptions::default();
        subscriptions.add(1, &symbols(&["*", "AAPL"]));
        subscriptions.add(2, &symbols(&["AAPL"]));
        subscriptions.add(3, &symbols(&["MSFT"]));
        assert_eq!(subscribers(&subscriptions, "AAPL"), [1, 2]);
        assert_eq!(subscribers(&subscriptions, "MSFT"), [1, 3]);
        assert_eq!(subscribers(&subscriptions, "TSLA"), [1]);
    }

    #[test]
    fn a_series_key_has_its_own_subscribers_and_wildcard() {
        let mut subscriptions = Subscriptions::default();
        subscriptions.add(1, &symbols(&["*", "AAPL"]));
        subscriptions.add(2, &symbols(&["*@candles.1m", "AAPL@candles.1m"]));
        subscriptions.add(3, &symbols(&["AAPL@candles.1m", "MSFT@ema"]));
        assert_eq!(subscribers(&subscriptions, "AAPL"), [1]);
        assert_eq!(subscribers(&subscriptions, "AAPL@candles.1m"), [2, 3]);
        assert_eq!(subscribers(&subscriptions, "TSLA@candles.1m"), [2]);
        assert_eq!(subscribers(&subscriptions, "MSFT@ema"), [3]);
        assert_eq!(
            subscribers(&subscriptions, "AAPL@ema"),
            Vec::<SocketId>::new()
        );
        subscriptions.remove(2, "*@candles.1m");
        assert_eq!(
            subscribers(&subscriptions, "TSLA@candles.1m"),
            Vec::<SocketId>::new()
        );
        assert_eq!(subscribers(&subscriptions, "AAPL@candles.1m"), [2, 3]);
        for id in 1..=3 {
            subscriptions.remove_all(id);
        }
        assert!(subscriptions.is_empty());
    }

    #[test]
    fn removing_leaves_no_trace_in_the_index() {
        let mut subscriptions = Subscriptions::default();
        subscriptions.add(1, &symbols(&["*", "AAPL"]));
        subscriptions.add(2, &symbols(&["AAPL"]));
        subscriptions.remove(2, "AAPL");
        subscriptions.remove(2, "AAPL");
        assert_eq!(subscribers(&subscriptions, "AAPL"), [1]);
        subscriptions.remove_all(1);
        assert_eq!(subscribers(&subscriptions, "AAPL"), Vec::<SocketId>::new());
        assert!(subscriptions.by_symbol.is_empty() && subscriptions.everything.is_empty());
        assert_eq!(
            subscriptions.of(2).map(BTreeSet::len),
            Some(0),
            "2 is still a socket, with no subscriptions"
        );
        assert!(subscriptions.of(1).is_none());
    }
}
