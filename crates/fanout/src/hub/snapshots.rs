//! The latest public result of each symbol: what a new subscriber gets
//! first. Bounded in symbols (`sma.max_keys`).

use hashbrown::HashMap;

use axum::extract::ws::Utf8Bytes;

#[derive(Debug, Default)]
pub(super) struct Snapshots {
    latest: HashMap<Box<str>, Utf8Bytes>,
}

impl Snapshots {
    /// Keeps `frame` as `symbol`'s snapshot, unless that would make more
    /// than `max` symbols (the result is still delivered, just not kept).
    pub(super) fn remember(&mut self, symbol: &str, frame: &Utf8Bytes, max: usize) {
        let room = self.latest.len() < max;
        match self.latest.get_mut(symbol) {
            Some(latest) => *latest = frame.clone(),
            None if room => {
                self.latest.insert(symbol.into(), frame.clone());
            }
            None => {}
        }
    }

    pub(super) fn get(&self, symbol: &str) -> Option<&Utf8Bytes> {
        self.latest.get(symbol)
    }

    pub(super) fn all(&self) -> impl Iterator<Item = &Utf8Bytes> {
        self.latest.values()
    }

    /// Every symbol's snapshot, with its symbol.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &Utf8Bytes)> {
        self.latest.iter().map(|(symbol, frame)| (&**symbol, frame))
    }

    pub(super) fn len(&self) -> usize {
        self.latest.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_replaces_and_new_symbols_stop_at_the_bound() {
        let mut snapshots = Snapshots::default();
        snapshots.remember("A", &"a1".into(), 2);
        snapshots.remember("B", &"b1".into(), 2);
        snapshots.remember("C", &"c1".into(), 2);
        snapshots.remember("A", &"a2".into(), 2);
        assert_eq!(snapshots.len(), 2);
        assert_eq!(snapshots.get("A").map(Utf8Bytes::as_str), Some("a2"));
        assert!(snapshots.get("C").is_none(), "over the bound: not kept");
    }
}
