//! Results a resumed socket saw before it came here. A client that moves
//! from a gateway to one that lags behind it (by the few milliseconds one
//! subscriber trails another) names positions this gateway has not
//! reached; the results up to them must not reach the socket a second time
//! when they arrive. A floor goes once its key's sequence passes it (or
//! restarts in another epoch), or with its socket. SeenAhead are kept by key,
//! so a result looks only at its own key's floors.

use hashbrown::HashMap;

use super::SocketId;
use crate::protocol::Position;

/// SeenAhead one socket may have. A client that moved from a gateway ahead of
/// this one is ahead on the few keys that had a result within the lag
/// between the two; a resume that claims more is treated as a gap on the
/// rest (recovered: false, the latest value), so no client can make the
/// floors, which every result of a floored key consults under the hub's
/// lock, grow past this per socket.
pub(super) const MAX_PER_SOCKET: usize = 128;

#[derive(Debug, Default)]
pub(super) struct SeenAhead {
    /// Public symbol → its floors.
    public: HashMap<Box<str>, SeenOnKey>,
    /// Client code → private symbol → its floors.
    private: HashMap<Box<str>, HashMap<Box<str>, SeenOnKey>>,
    /// Each socket's floored keys (client, symbol): its floors go with it
    /// without a scan of everyone's.
    by_socket: HashMap<SocketId, Vec<KeyName>>,
}

/// A key: its client code (none for a public one) and symbol.
type KeyName = (Option<Box<str>>, Box<str>);

/// The floors of one key, by socket: a result looks its key up once, and
/// then each subscriber in constant time.
#[derive(Debug, Default)]
pub(super) struct SeenOnKey(HashMap<SocketId, Floor>);

/// The last result of one key one socket has seen.
#[derive(Debug)]
struct Floor {
    epoch: Box<str>,
    seq: u64,
}

impl SeenOnKey {
    /// Whether `socket` has already seen the result at `position`.
    pub(super) fn has_seen(&self, socket: SocketId, position: Position<'_>) -> bool {
        self.0
            .get(&socket)
            .is_some_and(|floor| *floor.epoch == *position.epoch && position.seq <= floor.seq)
    }
}

impl SeenAhead {
    /// Records that `socket` has seen the key (`client`, `symbol`) up to
    /// `seen`. The caller keeps to [`MAX_PER_SOCKET`].
    pub(super) fn add(
        &mut self,
        socket: SocketId,
        client: Option<&str>,
        symbol: &str,
        seen: Position<'_>,
    ) {
        let map = match client {
            None => &mut self.public,
            Some(code) => self.private.entry(code.into()).or_default(),
        };
        let floor = Floor {
            epoch: seen.epoch.into(),
            seq: seen.seq,
        };
        let fresh = map
            .entry(symbol.into())
            .or_default()
            .0
            .insert(socket, floor)
            .is_none();
        if fresh {
            let own = self.by_socket.entry(socket).or_default();
            debug_assert!(own.len() < MAX_PER_SOCKET, "the caller caps floors");
            own.push((client.map(Into::into), symbol.into()));
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_socket.is_empty()
    }

    /// How many floors there are in all.
    #[cfg(test)]
    pub(super) fn by_socket_len(&self) -> usize {
        self.by_socket.values().map(Vec::len).sum()
    }

    /// The floors of the key (`client`, `symbol`), if it has any.
    pub(super) fn of(&self, client: Option<&str>, symbol: &str) -> Option<&SeenOnKey> {
        match client {
            None => self.public.get(symbol),
            Some(code) => self.private.get(code)?.get(symbol),
        }
    }

    /// Drops the key's floors the result at `position` reaches or makes moot.
    pub(super) fn passed(&mut self, client: Option<&str>, symbol: &str, position: Position<'_>) {
        let map = match client {
            None => &mut self.public,
            Some(code) => match self.private.get_mut(code) {
                Some(symbols) => symbols,
                None => return,
            },
        };
        let Some(floors) = map.get_mut(symbol) else {
            return;
        };
        let by_socket = &mut self.by_socket;
        floors.0.retain(|socket, floor| {
            let above = *floor.epoch == *position.epoch && position.seq < floor.seq;
            if !above {
                forget_key(by_socket, *socket, client, symbol);
            }
            above
        });
        if floors.0.is_empty() {
            map.remove(symbol);
            if let Some(code) = client
                && self.private.get(code).is_some_and(HashMap::is_empty)
            {
                self.private.remove(code);
            }
        }
    }

    /// Forgets the floors of the key (`client`, `symbol`): it was released,
    /// and its next result starts a new epoch, which no floor reaches.
    pub(super) fn forget(&mut self, client: Option<&str>, symbol: &str) {
        let map = match client {
            None => &mut self.public,
            Some(code) => match self.private.get_mut(code) {
                Some(symbols) => symbols,
                None => return,
            },
        };
        let Some(floors) = map.remove(symbol) else {
            return;
        };
        for socket in floors.0.keys() {
            forget_key(&mut self.by_socket, *socket, client, symbol);
        }
        if let Some(code) = client
            && self.private.get(code).is_some_and(HashMap::is_empty)
        {
            self.private.remove(code);
        }
    }

    /// Forgets `socket`'s floors.
    pub(super) fn remove(&mut self, socket: SocketId) {
        let Some(own) = self.by_socket.remove(&socket) else {
            return;
        };
        for (client, symbol) in own {
            let map = match &client {
                None => &mut self.public,
                Some(code) => match self.private.get_mut(code) {
                    Some(symbols) => symbols,
                    None => continue,
                },
            };
            if let Some(floors) = map.get_mut(&symbol) {
                floors.0.remove(&socket);
                if floors.0.is_empty() {
                    map.remove(&symbol);
                }
            }
            if let Some(code) = &client
                && self.private.get(code).is_some_and(HashMap::is_empty)
            {
                self.private.remove(code);
            }
        }
    }
}

/// Takes the key (`client`, `symbol`) off `socket`'s list.
fn forget_key(
    by_socket: &mut HashMap<SocketId, Vec<KeyName>>,
    socket: SocketId,
    client: Option<&str>,
    symbol: &str,
) {
    if let Some(own) = by_socket.get_mut(&socket) {
        own.retain(|(c, s)| !(c.as_deref() == client && **s == *symbol));
        if own.is_empty() {
            by_socket.remove(&socket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_hides_what_was_seen_and_goes_once_passed() {
        let mut floors = SeenAhead::default();
        let at = |seq| Position { seq, epoch: "e1" };
        let has_seen = |floors: &SeenAhead, socket, client, position| {
            floors
                .of(client, "A")
                .is_some_and(|key| key.has_seen(socket, position))
        };
        floors.add(1, None, "A", at(5));
        assert!(has_seen(&floors, 1, None, at(4)));
        assert!(has_seen(&floors, 1, None, at(5)));
        assert!(!has_seen(&floors, 1, None, at(6)));
        assert!(!has_seen(&floors, 2, None, at(4)), "another socket");
        assert!(!has_seen(&floors, 1, Some("acme"), at(4)), "another key");
        let other_epoch = Position {
            seq: 1,
            epoch: "e2",
        };
        assert!(!has_seen(&floors, 1, None, other_epoch));
        floors.passed(None, "A", at(4));
        assert!(!floors.is_empty());
        floors.passed(None, "A", at(5));
        assert!(floors.is_empty());
        floors.add(1, None, "A", at(5));
        floors.passed(None, "A", other_epoch);
        assert!(floors.is_empty(), "a new epoch makes it moot");
        floors.add(1, Some("acme"), "A", at(5));
        floors.add(2, None, "A", at(5));
        floors.remove(1);
        assert!(!has_seen(&floors, 1, Some("acme"), at(5)));
        assert!(floors.private.is_empty(), "the client's map went with it");
        floors.remove(2);
        assert!(floors.is_empty());
        assert!(floors.public.is_empty() && floors.private.is_empty());
    }

    #[test]
    fn a_passed_floor_leaves_its_sockets_list_and_others_stay() {
        let mut floors = SeenAhead::default();
        let at = |seq| Position { seq, epoch: "e1" };
        floors.add(1, None, "A", at(5));
        floors.add(1, None, "B", at(9));
        floors.add(1, Some("acme"), "A", at(3));
        floors.passed(None, "A", at(5));
        floors.passed(Some("acme"), "A", at(3));
        assert_eq!(floors.by_socket[&1].len(), 1, "only B is left");
        assert!(
            floors
                .of(None, "B")
                .is_some_and(|key| key.has_seen(1, at(9)))
        );
        floors.passed(None, "B", at(10));
        assert!(floors.is_empty());
        assert!(floors.public.is_empty() && floors.private.is_empty());
    }
}
