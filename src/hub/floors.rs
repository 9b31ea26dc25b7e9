//! Results a resumed socket saw before it came here. A client that moves
//! from a gateway to one that lags behind it (by the few milliseconds one
//! subscriber trails another) names positions this gateway has not
//! reached; the results up to them must not reach the socket a second time
//! when they arrive. A floor goes once its key's sequence passes it (or
//! restarts in another epoch), or with its socket. Floors are kept by key,
//! so a result looks only at its own key's floors.

use hashbrown::HashMap;

use super::SocketId;
use crate::protocol::Position;

#[derive(Debug, Default)]
pub(super) struct Floors {
    /// Public symbol → floors.
    public: HashMap<Box<str>, Vec<Floor>>,
    /// Client code → private symbol → floors.
    private: HashMap<Box<str>, HashMap<Box<str>, Vec<Floor>>>,
}

/// The last result of one key one socket has seen.
#[derive(Debug)]
struct Floor {
    socket: SocketId,
    epoch: Box<str>,
    seq: u64,
}

impl Floors {
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
        map.entry(symbol.into()).or_default().push(Floor {
            socket,
            epoch: seen.epoch.into(),
            seq: seen.seq,
        });
    }

    pub(super) fn is_empty(&self) -> bool {
        self.public.is_empty() && self.private.is_empty()
    }

    fn of(&self, client: Option<&str>, symbol: &str) -> Option<&Vec<Floor>> {
        match client {
            None => self.public.get(symbol),
            Some(code) => self.private.get(code)?.get(symbol),
        }
    }

    /// Whether `socket` has already seen the result at `position` of the
    /// key (`client`, `symbol`).
    pub(super) fn has_seen(
        &self,
        socket: SocketId,
        client: Option<&str>,
        symbol: &str,
        position: Position<'_>,
    ) -> bool {
        self.of(client, symbol).is_some_and(|floors| {
            floors.iter().any(|floor| {
                floor.socket == socket
                    && *floor.epoch == *position.epoch
                    && position.seq <= floor.seq
            })
        })
    }

    /// Drops the key's floors the result at `position` reaches or makes moot.
    pub(super) fn passed(&mut self, client: Option<&str>, symbol: &str, position: Position<'_>) {
        let still_above =
            |floor: &Floor| *floor.epoch == *position.epoch && position.seq < floor.seq;
        match client {
            None => {
                if let Some(floors) = self.public.get_mut(symbol) {
                    floors.retain(still_above);
                    if floors.is_empty() {
                        self.public.remove(symbol);
                    }
                }
            }
            Some(code) => {
                let Some(symbols) = self.private.get_mut(code) else {
                    return;
                };
                if let Some(floors) = symbols.get_mut(symbol) {
                    floors.retain(still_above);
                    if floors.is_empty() {
                        symbols.remove(symbol);
                    }
                }
                if symbols.is_empty() {
                    self.private.remove(code);
                }
            }
        }
    }

    /// Forgets `socket`'s floors. Floors are few and short-lived (each
    /// passes within a history's length of results), so a scan is enough.
    pub(super) fn remove(&mut self, socket: SocketId) {
        let keep = |floors: &mut Vec<Floor>| {
            floors.retain(|floor| floor.socket != socket);
            !floors.is_empty()
        };
        self.public.retain(|_, floors| keep(floors));
        self.private.retain(|_, symbols| {
            symbols.retain(|_, floors| keep(floors));
            !symbols.is_empty()
        });
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
        floors.add(1, Some("acme"), "A", at(5));
        floors.add(2, None, "A", at(5));
        floors.remove(1);
        assert!(!floors.has_seen(1, Some("acme"), "A", at(5)));
        floors.remove(2);
        assert!(floors.is_empty());
    }
}
