//! Results a resumed socket saw before it came here. A client that moves
//! from a gateway to one that lags behind it (by the few milliseconds one
//! subscriber trails another) names positions this gateway has not
//! reached; the results up to them must not reach the socket a second time
//! when they arrive. A floor goes once its key's sequence passes it (or
//! restarts in another epoch), or with its socket.

use std::collections::HashMap;

use super::SocketId;
use crate::protocol::Position;

#[derive(Debug, Default)]
pub(super) struct Floors {
    of_socket: HashMap<SocketId, Vec<Floor>>,
}

/// The last result of one key the socket has seen.
#[derive(Debug)]
struct Floor {
    client: Option<Box<str>>,
    symbol: Box<str>,
    epoch: Box<str>,
    seq: u64,
}

impl Floor {
    fn is_of(&self, client: Option<&str>, symbol: &str) -> bool {
        *self.symbol == *symbol && self.client.as_deref() == client
    }
}

impl Floors {
    pub(super) fn add(
        &mut self,
        id: SocketId,
        client: Option<&str>,
        symbol: &str,
        seen: Position<'_>,
    ) {
        self.of_socket.entry(id).or_default().push(Floor {
            client: client.map(Into::into),
            symbol: symbol.into(),
            epoch: seen.epoch.into(),
            seq: seen.seq,
        });
    }

    pub(super) fn is_empty(&self) -> bool {
        self.of_socket.is_empty()
    }

    /// Whether socket `id` has already seen the result at `position` of
    /// the key (`client`, `symbol`).
    pub(super) fn has_seen(
        &self,
        id: SocketId,
        client: Option<&str>,
        symbol: &str,
        position: Position<'_>,
    ) -> bool {
        self.of_socket.get(&id).is_some_and(|floors| {
            floors.iter().any(|floor| {
                floor.is_of(client, symbol)
                    && *floor.epoch == *position.epoch
                    && position.seq <= floor.seq
            })
        })
    }

    /// Drops the floors the result at `position` reaches or makes moot.
    pub(super) fn passed(&mut self, client: Option<&str>, symbol: &str, position: Position<'_>) {
        self.of_socket.retain(|_, floors| {
            floors.retain(|floor| {
                !floor.is_of(client, symbol)
                    || (*floor.epoch == *position.epoch && position.seq < floor.seq)
            });
            !floors.is_empty()
        });
    }

    pub(super) fn remove(&mut self, id: SocketId) {
        self.of_socket.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_hides_what_was_seen_and_goes_once_passed() {
        let mut floors = Floors::default();
        let at = |seq| Position { seq, epoch: "e1" };
        floors.add(1, None, "A", at(5));
        assert!(floors.has_seen(1, None, "A", at(4)));
        assert!(floors.has_seen(1, None, "A", at(5)));
        assert!(!floors.has_seen(1, None, "A", at(6)));
        assert!(!floors.has_seen(2, None, "A", at(4)), "another socket");
        assert!(!floors.has_seen(1, Some("acme"), "A", at(4)), "another key");
        let other_epoch = Position {
            seq: 1,
            epoch: "e2",
        };
        assert!(!floors.has_seen(1, None, "A", other_epoch));
        floors.passed(None, "A", at(4));
        assert!(!floors.is_empty());
        floors.passed(None, "A", at(5));
        assert!(floors.is_empty());
        floors.add(1, None, "A", at(5));
        floors.passed(None, "A", other_epoch);
        assert!(floors.is_empty(), "a new epoch makes it moot");
        floors.add(1, None, "A", at(5));
        floors.remove(1);
        assert!(floors.is_empty());
    }
}
