//! Every open socket by id, and the sockets of each client group: the
//! hub's connections by client, as centrifuge keeps connections by user.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

// hashbrown's default hasher (foldhash, seeded at random), as in
// subscriptions: a delivery looks up every socket it offers to.
use hashbrown::HashMap;

use super::SocketId;
use crate::outbox;

/// One open socket: its client group and the sending end of its outbox.
#[derive(Debug)]
pub(super) struct Socket {
    pub(super) group: Box<str>,
    pub(super) outbox: outbox::Sender,
}

#[derive(Debug, Default)]
pub(super) struct Connections {
    next_id: SocketId,
    sockets: HashMap<SocketId, Socket>,
    /// Client code → its sockets. A group exists only while it has a socket.
    groups: HashMap<Box<str>, Vec<SocketId>>,
    /// How many of each there are, for readers that take no lock.
    counts: Arc<Counts>,
}

/// Open sockets and groups, kept as they change so that `/stats` and
/// `/metrics` read them without the hub's lock.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) sockets: AtomicUsize,
    pub(crate) groups: AtomicUsize,
}

impl Connections {
    /// Adds a socket of `group`; returns its new id. A socket that is not
    /// `live` is not yet among its group's members (see [`Self::make_live`]).
    pub(super) fn add(&mut self, group: Box<str>, outbox: outbox::Sender, live: bool) -> SocketId {
        let id = self.next_id;
        self.next_id += 1;
        if live {
            self.groups.entry(group.clone()).or_default().push(id);
        }
        self.sockets.insert(id, Socket { group, outbox });
        self.count();
        id
    }

    /// The counts, shared with readers that take no lock.
    pub(super) fn counts(&self) -> Arc<Counts> {
        self.counts.clone()
    }

    fn count(&self) {
        self.counts.sockets.store(self.sockets.len(), Relaxed);
        self.counts.groups.store(self.groups.len(), Relaxed);
    }

    /// Makes a socket added without `live` a member of its group; returns
    /// the group's code, or `None` when the socket is gone.
    pub(super) fn make_live(&mut self, id: SocketId) -> Option<Box<str>> {
        let group = self.sockets.get(&id)?.group.clone();
        let members = self.groups.entry(group.clone()).or_default();
        if !members.contains(&id) {
            members.push(id);
        }
        self.count();
        Some(group)
    }

    pub(super) fn get(&self, id: SocketId) -> Option<&Socket> {
        self.sockets.get(&id)
    }

    /// Removes a socket; returns its group's code, or `None` when it was
    /// already gone. The group goes with its last socket.
    pub(super) fn remove(&mut self, id: SocketId) -> Option<Box<str>> {
        let socket = self.sockets.remove(&id)?;
        if let Some(members) = self.groups.get_mut(&socket.group) {
            members.retain(|m| *m != id);
            if members.is_empty() {
                self.groups.remove(&socket.group);
            }
        }
        self.count();
        Some(socket.group)
    }

    /// The sockets of the group `client` (none when it has no socket).
    pub(super) fn group(&self, client: &str) -> &[SocketId] {
        self.groups.get(client).map_or(&[], Vec::as_slice)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.sockets.len()
    }

    #[cfg(test)]
    pub(super) fn group_count(&self) -> usize {
        self.groups.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender() -> outbox::Sender {
        let bounds = outbox::Bounds {
            frames: 1,
            bytes: 1024,
            conflate: false,
        };
        outbox::bounded(bounds, outbox::QueuedBytes::default()).0
    }

    #[test]
    fn groups_hold_their_sockets_and_go_with_the_last() {
        let mut connections = Connections::default();
        let a = connections.add("acme".into(), sender(), true);
        let b = connections.add("acme".into(), sender(), true);
        let c = connections.add("other".into(), sender(), true);
        assert_ne!(a, b);
        assert_eq!(connections.group("acme"), [a, b]);
        assert_eq!((connections.len(), connections.group_count()), (3, 2));
        assert_eq!(connections.remove(a).as_deref(), Some("acme"));
        assert_eq!(connections.remove(a), None, "already gone");
        assert_eq!(connections.remove(b).as_deref(), Some("acme"));
        assert!(connections.group("acme").is_empty());
        assert_eq!(connections.group_count(), 1);
        assert_eq!(connections.get(c).map(|s| &*s.group), Some("other"));
    }
}
