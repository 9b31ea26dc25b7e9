//! Sockets admitted per client code (upgrading or open), for
//! `server.max_connections_per_client`.

use std::collections::HashMap;

use super::AdmitError;

#[derive(Debug, Default)]
pub(super) struct Admissions {
    admitted: HashMap<Box<str>, usize>,
}

impl Admissions {
    /// Counts one more socket for `client`, unless it has `max` already.
    pub(super) fn admit(&mut self, client: &str, max: usize) -> Result<(), AdmitError> {
        let count = self.admitted.entry(client.into()).or_default();
        if *count >= max {
            return Err(AdmitError::TooManySockets(max));
        }
        *count += 1;
        Ok(())
    }

    /// Whether no client has a socket admitted.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.admitted.is_empty()
    }

    /// Counts one socket of `client` less.
    pub(super) fn release(&mut self, client: &str) {
        if let Some(count) = self.admitted.get_mut(client) {
            *count -= 1;
            if *count == 0 {
                self.admitted.remove(client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_up_to_max_and_a_place_back_on_release() {
        let mut admissions = Admissions::default();
        assert_eq!(admissions.admit("acme", 2), Ok(()));
        assert_eq!(admissions.admit("acme", 2), Ok(()));
        assert_eq!(
            admissions.admit("acme", 2),
            Err(AdmitError::TooManySockets(2))
        );
        assert_eq!(admissions.admit("other", 2), Ok(()), "per client code");
        admissions.release("acme");
        assert_eq!(admissions.admit("acme", 2), Ok(()));
        admissions.release("acme");
        admissions.release("acme");
        assert!(
            !admissions.admitted.contains_key("acme"),
            "forgotten at zero"
        );
    }
}
