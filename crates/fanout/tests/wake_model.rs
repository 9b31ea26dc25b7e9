//! A model check (loom) of how sessions are woken, over the crate's own code
//! built with loom's locks (the `model-check` feature):
//!
//! - the outbox's wake protocol: an offer hands the parked session's waker
//!   to its caller at most once, to be woken after the lock is released (or
//!   wakes it at once when the outbox fills past half); the session parks
//!   and re-arms under the same lock;
//! - the hub's wake hold: while any hold is open, wakes wait, and the last
//!   hold to end wakes what waited, whoever delivered it;
//! - the burst a hold collects: offered when the hold ends, or earlier by
//!   any other request that reads the hub, and woken either way.
//!
//! loom runs each test once per interleaving of its threads; a session
//! that is never woken for a frame it was queued shows up as a deadlock,
//! which loom reports. Run it with
//! `cargo test -p quotebridge-fanout --features model-check --test wake_model`
//! (`script/test` does); without the feature this file is empty.

#![cfg(feature = "model-check")]

use std::sync::Arc;
use std::task::Waker;

use loom::future::block_on;
use loom::thread;
use quotebridge_core::stats::Stats;
use quotebridge_fanout::frame::{Frame, SharedResult};
use quotebridge_fanout::hub::{Hub, HubLimits};
use quotebridge_fanout::outbox::{self, Bounds, Offer, Offered, Outbox, QueuedBytes};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Runs `test` once per interleaving of its threads that preempts a thread
/// at most three times: the bound loom's authors suggest, which finds
/// nearly every bug such a protocol has in seconds, where an unbounded
/// search over the hub's locks runs for hours.
fn model(test: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(test);
}

fn direct(text: &'static str) -> Frame {
    Frame::Direct(Message::Text(Utf8Bytes::from_static(text)))
}

/// The messages `frame` stands for (a burst, its results), as text.
fn texts(frame: Frame) -> Vec<String> {
    match frame {
        Frame::Direct(Message::Text(text)) => vec![text.to_string()],
        Frame::Direct(other) => panic!("expected text, got {other:?}"),
        results => (results.results().iter())
            .map(|result| result.as_str().to_owned())
            .collect(),
    }
}

/// What the session takes until it has `expected` frames, or until the
/// outbox closes when `expected` is `None`.
fn take(outbox: &mut Outbox, expected: Option<usize>) -> Vec<String> {
    let mut batch = Vec::new();
    let mut taken = 0;
    block_on(async {
        while expected.is_none_or(|expected| taken < expected) {
            match outbox.recv_many(&mut batch, 8).await.frames {
                0 => break,
                frames => taken += frames,
            }
        }
    });
    batch.into_iter().flat_map(texts).collect()
}

/// Offers two frames from another thread, waking what each offer hands
/// out after it returns (as the hub does, outside its lock). The outbox
/// stays open until the session has both: closing would wake it anyway.
fn offered_from_another_thread(frames: usize) {
    model(move || {
        let bounds = Bounds {
            frames,
            bytes: 1 << 10,
            conflate: false,
        };
        let (sender, mut outbox) = outbox::bounded(bounds, QueuedBytes::default());
        let hub = thread::spawn(move || {
            for frame in ["a", "b"] {
                let mut offered = Offered::default();
                assert_eq!(sender.offer(direct(frame), &mut offered), Offer::Queued);
                offered.wakes.drain(..).for_each(Waker::wake);
            }
            sender
        });
        assert_eq!(take(&mut outbox, Some(2)), ["a", "b"]);
        let sender = hub.join().expect("the hub's thread");
        drop(sender);
        assert!(
            take(&mut outbox, None).is_empty(),
            "closed once the hub lets go"
        );
    });
}

#[test]
fn a_parked_session_is_woken_by_the_wake_an_offer_hands_out() {
    offered_from_another_thread(8);
}

#[test]
fn an_outbox_filling_past_half_wakes_its_session_at_once() {
    // Two frames: the first's wake is handed out, the second fills the
    // outbox past half and wakes the session directly.
    offered_from_another_thread(2);
}

fn limits() -> HubLimits {
    HubLimits {
        send_queue: 8,
        send_queue_bytes: 1 << 10,
        conflate: false,
        max_symbols: 4,
        max_sockets_per_client: 4,
        max_snapshots: 4,
        history_size: 4,
        history_bytes: 1 << 10,
        resume_frames_per_second: 100,
        connects_per_client_per_second: 100,
    }
}

fn result(symbol: &str, text: &'static str) -> SharedResult {
    SharedResult::detached(Utf8Bytes::from_static(text), symbol, None, None)
}

/// One thread delivers "held" under a wake hold while another runs
/// `beside` (which queues one frame of its own); the session, subscribed to
/// `"*"` in group "acme", must be woken for both, `expected` once sorted.
fn a_hold_beside(beside: fn(&Hub), expected: [&'static str; 2]) {
    model(move || {
        let hub = Hub::new(limits(), Arc::new(Stats::default()));
        let admission = hub.admit("acme").expect("admitted");
        let (_membership, mut outbox) = hub.join(admission, &["*".to_owned()], false);
        let holding = {
            let hub = hub.clone();
            thread::spawn(move || {
                let hold = hub.hold_wakes();
                hub.deliver_result(result("A", "held"));
                drop(hold);
            })
        };
        let other = {
            let hub = hub.clone();
            thread::spawn(move || beside(&hub))
        };
        let mut got = take(&mut outbox, Some(2));
        got.sort();
        assert_eq!(got, expected);
        holding.join().expect("the holding thread");
        other.join().expect("the other thread");
    });
}

#[test]
fn a_result_delivered_during_another_threads_hold_is_woken_when_it_ends() {
    a_hold_beside(
        |hub| hub.deliver_result(result("B", "unheld")),
        ["held", "unheld"],
    );
}

#[test]
fn a_burst_offered_by_another_threads_request_is_woken_when_the_hold_ends() {
    // A direct message to the group reads the hub, which offers the held
    // burst first: its wake must still come, from the hold's end.
    a_hold_beside(
        |hub| {
            hub.send_to_group("acme", Message::Text(Utf8Bytes::from_static("direct")));
        },
        ["direct", "held"],
    );
}
