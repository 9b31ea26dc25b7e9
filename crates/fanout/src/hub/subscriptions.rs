//! Which sockets want which symbols: each socket's set, and the index from
//! a symbol to its subscribers (with `"*"` kept apart), as centrifuge keeps
//! subscriptions by channel. Routing looks subscribers up here; it never
//! scans every socket.

use std::collections::BTreeSet;

// hashbrown's default hasher (foldhash, seeded at random): socket ids are
// the hub's own counter, and SipHash on every lookup was a tenth of
// delivery's time at 10,000 sockets.
use hashbrown::{HashMap, HashSet};

use super::SocketId;
use crate::names::ALL_SYMBOLS;

#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    /// Socket → what it subscribed to, sorted.
    of_socket: HashMap<SocketId, BTreeSet<String>>,
    /// Symbol → sockets subscribed to it by name.
    by_symbol: HashMap<Box<str>, HashSet<SocketId>>,
    /// Sockets subscribed to every public symbol.
    everything: HashSet<SocketId>,
}

impl Subscriptions {
    /// Subscribes `id` to `symbols` (those it has are left as they are).
    pub(super) fn add(&mut self, id: SocketId, symbols: &[String]) {
        let own = self.of_socket.entry(id).or_default();
        for symbol in symbols {
            if !own.insert(symbol.clone()) {
                continue;
            }
            if symbol == ALL_SYMBOLS {
                self.everything.insert(id);
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
        if symbol == ALL_SYMBOLS {
            self.everything.remove(&id);
        } else if let Some(subscribers) = self.by_symbol.get_mut(symbol) {
            subscribers.remove(&id);
            if subscribers.is_empty() {
                self.by_symbol.remove(symbol);
            }
        }
    }

    /// Forgets the socket `id` and every index entry it had.
    pub(super) fn remove_all(&mut self, id: SocketId) {
        let Some(own) = self.of_socket.remove(&id) else {
            return;
        };
        self.everything.remove(&id);
        for symbol in own {
            if let Some(subscribers) = self.by_symbol.get_mut(symbol.as_str()) {
                subscribers.remove(&id);
                if subscribers.is_empty() {
                    self.by_symbol.remove(symbol.as_str());
                }
            }
        }
    }

    /// Whether no socket is subscribed to anything and no index entry is left.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.of_socket.values().all(BTreeSet::is_empty)
            && self.by_symbol.is_empty()
            && self.everything.is_empty()
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

    /// The sockets subscribed to `symbol` by name and not to every symbol:
    /// with [`Self::to_everything`], each socket a public result for
    /// `symbol` goes to, once.
    pub(super) fn by_name_only<'a>(&'a self, symbol: &str) -> impl Iterator<Item = &'a SocketId> {
        self.by_symbol
            .get(symbol)
            .into_iter()
            .flatten()
            .filter(|&id| !self.everything.contains(id))
    }

    /// The sockets a public result for `symbol` goes to, each once.
    #[cfg(test)]
    pub(super) fn subscribers<'a>(&'a self, symbol: &str) -> impl Iterator<Item = &'a SocketId> {
        self.to_everything().chain(self.by_name_only(symbol))
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
