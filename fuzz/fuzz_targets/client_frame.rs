//! Arbitrary text frames from a WebSocket client: the frame parser must never
//! panic, and an accepted request only names well-formed subscriptions once
//! the session's validation has run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quotebridge::protocol::ClientOp;

fuzz_target!(|frame: &[u8]| {
    let Ok(text) = std::str::from_utf8(frame) else {
        return;
    };
    match ClientOp::parse(text) {
        Ok(ClientOp::Subscribe { symbols, .. } | ClientOp::Unsubscribe { symbols }) => {
            // The session checks each entry; the check itself must not panic.
            for symbol in &symbols {
                let _ = quotebridge::names::is_subscription(symbol);
            }
        }
        Ok(ClientOp::Resume(last_seen)) => {
            for symbols in last_seen.public.values().chain(last_seen.private.values()) {
                for symbol in symbols.keys() {
                    let _ = quotebridge::names::is_symbol(symbol);
                }
            }
        }
        Err(message) => assert!(!message.is_empty()),
    }
});
