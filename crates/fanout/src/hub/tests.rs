//! The hub's tests: its parts together, through its public API.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::FutureExt;
use tokio_tungstenite::tungstenite::Message;

use super::history::Replay;
use super::*;
use crate::frame::Frame;
use crate::protocol::{LastSeen, Position};

fn limits(send_queue: usize) -> HubLimits {
    HubLimits {
        send_queue,
        send_queue_bytes: 1 << 20,
        conflate: false,
        max_symbols: 10,
        max_sockets_per_client: 4,
        max_snapshots: 100,
        history_size: 16,
        history_bytes: 1 << 20,
        resume_frames_per_second: 100_000,
        connects_per_client_per_second: 1_000,
    }
}

fn hub(send_queue: usize) -> Hub {
    Hub::new(limits(send_queue), Arc::new(Stats::default()))
}

fn join(hub: &Hub, client: &str, subscriptions: &[&str]) -> (Membership, Outbox) {
    let admission = hub.admit(client).expect("admitted");
    hub.join(admission, &strings(subscriptions), false)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The one message `frame` stands for, as text.
fn text(frame: Frame) -> String {
    let [text] = &texts(frame)[..] else {
        panic!("expected one message");
    };
    text.clone()
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

/// Delivers `text` as the result at `position` of the key (`client`, `symbol`).
fn deliver(
    hub: &Hub,
    symbol: &str,
    client: Option<&str>,
    position: Option<Position<'_>>,
    text: &str,
) {
    hub.deliver_result(SharedResult::detached(
        text.into(),
        symbol,
        client,
        position,
    ));
}

#[tokio::test]
async fn public_frames_reach_subscribers_once() {
    let hub = hub(8);
    let (_all, mut all_rx) = join(&hub, "a", &["*", "AAPL"]);
    let (_aapl, mut aapl_rx) = join(&hub, "b", &["AAPL"]);
    let (_msft, mut msft_rx) = join(&hub, "c", &["MSFT"]);
    hub.publish_public("AAPL", "f1");
    assert_eq!(text(all_rx.recv().await.expect("frame")), "f1");
    assert!(
        all_rx.try_recv().is_none(),
        "a socket in * and AAPL gets one copy"
    );
    assert_eq!(text(aapl_rx.recv().await.expect("frame")), "f1");
    assert!(msft_rx.try_recv().is_none());
}

#[tokio::test]
async fn group_messages_reach_every_socket_of_the_group_only() {
    let hub = hub(8);
    let (_a1, mut a1) = join(&hub, "acme", &[]);
    let (_a2, mut a2) = join(&hub, "acme", &[]);
    let (_b, mut b) = join(&hub, "other", &["*"]);
    assert_eq!(hub.send_to_group("acme", Message::Text("hi".into())), 2);
    assert_eq!(text(a1.recv().await.expect("frame")), "hi");
    assert_eq!(text(a2.recv().await.expect("frame")), "hi");
    assert!(b.try_recv().is_none());
    assert_eq!(hub.send_to_group("nobody", Message::Text("x".into())), 0);
}

#[test]
fn group_disappears_with_its_last_socket() {
    let hub = hub(8);
    let (first, _rx1) = join(&hub, "acme", &["AAPL"]);
    let (second, _rx2) = join(&hub, "acme", &["*"]);
    assert_eq!((hub.group_count(), hub.group_size("acme")), (1, 2));
    drop(first);
    assert_eq!(hub.group_size("acme"), 1);
    drop(second);
    assert_eq!((hub.group_count(), hub.socket_count()), (0, 0));
    assert!(hub.state().subscriptions.is_empty());
}

/// Everything queued in `outbox` now, as text.
fn queued(outbox: &mut Outbox) -> Vec<String> {
    std::iter::from_fn(|| outbox.try_recv())
        .flat_map(texts)
        .collect()
}

#[test]
fn subscribe_returns_sorted_set_and_queues_snapshots_of_new_symbols() {
    let hub = hub(8);
    hub.publish_public("MSFT", "m");
    hub.publish_public("AAPL", "a");
    let (socket, mut rx) = join(&hub, "acme", &["MSFT"]);
    let got = socket
        .subscribe_now(&strings(&["ZZZ", "AAPL", "MSFT"]))
        .expect("subscribe");
    assert_eq!(got.symbols, strings(&["AAPL", "MSFT", "ZZZ"]));
    assert_eq!(got.snapshots, 1);
    assert_eq!(queued(&mut rx), ["a"], "MSFT was not new, ZZZ has none");
    let got = socket.unsubscribe(&strings(&["MSFT", "nope"]));
    assert_eq!(got.symbols, strings(&["AAPL", "ZZZ"]));
}

#[test]
fn snapshots_are_kept_for_at_most_max_snapshots_symbols() {
    let hub = Hub::new(
        HubLimits {
            max_snapshots: 2,
            ..limits(8)
        },
        Arc::new(Stats::default()),
    );
    for symbol in ["A", "B", "C"] {
        hub.publish_public(symbol, "old");
    }
    hub.publish_public("A", "new");
    hub.remember_latest(SharedResult::detached("stored".into(), "D", None, None));
    let (socket, mut rx) = join(&hub, "acme", &[]);
    socket
        .subscribe_now(&strings(&["A", "B", "C", "D"]))
        .expect("subscribed");
    let mut got = queued(&mut rx);
    got.sort();
    assert_eq!(
        got,
        ["new", "old"],
        "A updated, B kept, C and D over the bound"
    );
}

#[test]
fn snapshots_stay_within_the_outbox_bounds_however_often_asked() {
    let stats = Arc::new(Stats::default());
    let hub = Hub::new(
        HubLimits {
            max_snapshots: 1000,
            ..limits(16)
        },
        stats.clone(),
    );
    for i in 0..100 {
        hub.publish_public(&format!("S{i}"), &format!("snapshot {i}"));
    }
    let (socket, mut rx) = join(&hub, "acme", &[]);
    for _ in 0..20 {
        socket.subscribe_now(&strings(&["*"])).expect("subscribed");
        socket.unsubscribe(&strings(&["*"]));
    }
    assert_eq!(
        queued(&mut rx).len(),
        8,
        "never more than half of what the outbox holds"
    );
    assert_eq!(stats.snapshots_skipped.load(Relaxed), 20 * 100 - 8);
    assert_eq!(
        hub.socket_count(),
        1,
        "a full outbox from snapshots evicts nobody"
    );
    // Once drained, the socket still gets live frames.
    hub.send_to_group("acme", Message::Text("live".into()));
    assert_eq!(queued(&mut rx), ["live"]);
}

#[test]
fn a_frame_larger_than_any_outbox_is_refused_without_evicting_anyone() {
    let stats = Arc::new(Stats::default());
    let hub = Hub::new(
        HubLimits {
            send_queue_bytes: 64,
            ..limits(8)
        },
        stats.clone(),
    );
    let (_a1, mut a1) = join(&hub, "acme", &["*"]);
    let (_a2, mut a2) = join(&hub, "acme", &["*"]);
    let huge = "x".repeat(65);
    assert_eq!(
        hub.send_to_group("acme", Message::Text(huge.as_str().into())),
        0
    );
    hub.publish_public("A", &huge);
    assert_eq!(stats.frames_too_large.load(Relaxed), 2);
    assert_eq!(stats.slow_consumer_closes.load(Relaxed), 0);
    assert_eq!(hub.group_size("acme"), 2, "nobody evicted");
    assert!(
        hub.state().snapshots.len() == 0,
        "not kept as a snapshot either"
    );
    assert_eq!(hub.send_to_group("acme", Message::Text("ok".into())), 2);
    assert_eq!(queued(&mut a1), ["ok"]);
    assert_eq!(queued(&mut a2), ["ok"]);
}

#[test]
fn subscription_limit_is_enforced_atomically() {
    let hub = Hub::new(
        HubLimits {
            max_symbols: 2,
            ..limits(8)
        },
        Arc::new(Stats::default()),
    );
    let (socket, _rx) = join(&hub, "acme", &["A"]);
    assert_eq!(
        socket.subscribe_now(&strings(&["B", "C"])),
        Err(SubscribeError::TooManySymbols(2))
    );
    assert_eq!(socket.subscriptions(), strings(&["A"]));
    assert!(socket.subscribe_now(&strings(&["B", "A"])).is_ok());
}

#[tokio::test]
async fn a_full_outbox_evicts_only_that_socket() {
    let stats = Arc::new(Stats::default());
    let hub = Hub::new(limits(2), stats.clone());
    let (_slow, mut slow_rx) = join(&hub, "acme", &["*"]);
    let (_fast, mut fast_rx) = join(&hub, "acme", &["*"]);
    for i in 0..3 {
        hub.publish_public("A", &format!("{i}"));
        // The fast socket keeps up.
        assert_eq!(text(fast_rx.recv().await.expect("frame")), format!("{i}"));
    }
    assert_eq!(stats.slow_consumer_closes.load(Relaxed), 1);
    assert_eq!(hub.group_size("acme"), 1);
    // The slow socket still gets what was queued, then its outbox ends.
    assert_eq!(text(slow_rx.recv().await.expect("frame")), "0");
    assert_eq!(text(slow_rx.recv().await.expect("frame")), "1");
    assert!(slow_rx.recv().await.is_none());
}

#[test]
fn a_conflating_socket_is_kept_with_the_latest_of_each_key() {
    let stats = Arc::new(Stats::default());
    let hub = Hub::new(
        HubLimits {
            conflate: true,
            ..limits(2)
        },
        stats.clone(),
    );
    let (_socket, mut outbox) = join(&hub, "acme", &["*"]);
    for seq in 1..=5 {
        result(&hub, None, seq, "e1");
    }
    result(&hub, Some("acme"), 1, "e1");
    assert_eq!(hub.socket_count(), 1, "kept");
    assert_eq!(stats.frames_conflated.load(Relaxed), 2, "A3 and A4 skipped");
    let mut batch = Vec::new();
    let mut take = || {
        batch.clear();
        let taken = outbox
            .recv_many(&mut batch, 10)
            .now_or_never()
            .expect("queued");
        let mut texts: Vec<String> = batch.drain(..).map(text).collect();
        texts.sort();
        (texts, taken.conflated)
    };
    assert_eq!(take(), (strings(&["A1", "A2"]), false));
    assert_eq!(take(), (strings(&["A5", "acme1"]), true));
    // A direct message has no key: to a full conflating socket it is
    // not dropped but ends the socket.
    for seq in 6..=8 {
        result(&hub, None, seq, "e1");
    }
    assert_eq!(hub.send_to_group("acme", Message::Text("direct".into())), 0);
    assert_eq!(stats.slow_consumer_closes.load(Relaxed), 1);
}

#[tokio::test]
async fn the_byte_bound_evicts_too() {
    let stats = Arc::new(Stats::default());
    let hub = Hub::new(
        HubLimits {
            send_queue_bytes: 16,
            ..limits(100)
        },
        stats.clone(),
    );
    let (_socket, mut outbox) = join(&hub, "acme", &["*"]);
    for _ in 0..3 {
        hub.publish_public("A", "123456");
    }
    assert_eq!(stats.slow_consumer_closes.load(Relaxed), 1, "18 bytes > 16");
    assert_eq!(text(outbox.recv().await.expect("frame")), "123456");
    assert_eq!(text(outbox.recv().await.expect("frame")), "123456");
    assert!(outbox.recv().await.is_none());
}

#[tokio::test]
async fn draining_the_outbox_frees_its_byte_budget() {
    let hub = Hub::new(
        HubLimits {
            send_queue_bytes: 16,
            ..limits(100)
        },
        Arc::new(Stats::default()),
    );
    let (_socket, mut outbox) = join(&hub, "acme", &["*"]);
    // Two frames fit, three do not: only draining lets a hundred through.
    for _ in 0..100 {
        hub.publish_public("A", "123456");
        assert_eq!(text(outbox.recv().await.expect("frame")), "123456");
    }
    assert_eq!(hub.socket_count(), 1);
}

#[tokio::test]
async fn a_hold_defers_waking_sessions_until_it_is_dropped() {
    let hub = hub(8);
    let (_socket, mut outbox) = join(&hub, "acme", &["*"]);
    let session = tokio::spawn(async move {
        let mut batch = Vec::new();
        outbox.recv_many(&mut batch, 8).await.frames
    });
    tokio::task::yield_now().await;
    let hold = hub.hold_wakes();
    hub.publish_public("A", "1");
    hub.publish_public("B", "2");
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!session.is_finished(), "woken while the hold was open");
    drop(hold);
    assert_eq!(
        session.await.expect("session ran"),
        2,
        "one wake, both frames"
    );
}

impl Membership {
    fn subscribe_now(&self, symbols: &[String]) -> Result<Subscribed, SubscribeError> {
        self.subscribe(symbols, None)
    }
}

fn result(hub: &Hub, client: Option<&str>, seq: u64, epoch: &str) {
    let frame = format!("{}{seq}", client.unwrap_or("A"));
    deliver(hub, "A", client, Some(Position { seq, epoch }), &frame);
}

fn last_seen(public: &[(&str, u64)], private: &[(&str, u64)]) -> LastSeen {
    let map = |keys: &[(&str, u64)]| {
        let mut map = crate::protocol::LastSeenMap::new();
        for (epoch, seq) in keys {
            map.entry((*epoch).to_owned())
                .or_default()
                .insert("A".to_owned(), *seq);
        }
        map
    };
    LastSeen {
        public: map(public),
        private: map(private),
        symbols: None,
        series: None,
    }
}

#[tokio::test]
async fn a_held_socket_gets_nothing_until_it_resumes_then_what_it_missed_first() {
    let hub = hub(64);
    for seq in 1..=3 {
        result(&hub, None, seq, "e1");
        result(&hub, Some("acme"), seq, "e1");
    }
    let admission = hub.admit("acme").expect("admitted");
    let (socket, mut outbox) = hub.join(admission, &strings(&["*"]), true);
    assert!(socket.is_held());
    assert_eq!(socket.subscriptions(), ["*"], "its set, before it is live");
    result(&hub, None, 4, "e1");
    hub.send_to_group("acme", Message::Text("direct".into()));
    assert!(outbox.try_recv().is_none(), "held: nothing queued");
    let seen = last_seen(&[("e1", 2)], &[("e1", 1)]);
    let resumed = socket.resume(&seen).await.expect("it was held");
    let frames: Vec<&str> = resumed.frames.iter().map(SharedResult::as_str).collect();
    assert_eq!(frames, ["A3", "A4", "acme2", "acme3"]);
    assert_eq!(resumed.replayed, 4);
    assert_eq!(
        socket.resume(&LastSeen::default()).await,
        Err(ResumeError::NotHeld),
        "once only"
    );
    result(&hub, None, 5, "e1");
    assert_eq!(queued(&mut outbox), ["A5"], "then live");
}

/// Resumes `socket` from `last_seen` while result `seq` of public key A
/// (epoch e1) is delivered live between the resume's holds of the lock.
async fn resume_as_seq_arrives<'a>(
    hub: &Hub,
    socket: &Membership,
    last_seen: &'a LastSeen,
    seq: u64,
) -> Result<Resumed<'a>, ResumeError> {
    let live = hub.clone();
    resume::BETWEEN_HOLDS.set(Some(Box::new(move || result(&live, None, seq, "e1"))));
    let resumed = socket.resume(last_seen).await;
    resume::BETWEEN_HOLDS.set(None);
    resumed
}

#[tokio::test]
async fn a_result_that_arrives_while_a_resume_goes_on_is_sent_once_and_in_order() {
    let hub = hub(64);
    for seq in 1..=3 {
        result(&hub, None, seq, "e1");
    }
    let admission = hub.admit("acme").expect("admitted");
    let (socket, mut outbox) = hub.join(admission, &strings(&["*"]), true);
    // Live (and so queued to the socket) before its key's history is read:
    // the replay has it, so the queue must not.
    let seen = last_seen(&[("e1", 1)], &[]);
    let resumed = resume_as_seq_arrives(&hub, &socket, &seen, 4).await;
    let frames: Vec<&str> = (resumed.as_ref().expect("it was held").frames.iter())
        .map(SharedResult::as_str)
        .collect();
    assert_eq!(frames, ["A2", "A3", "A4"]);
    assert!(queued(&mut outbox).is_empty(), "A4 is not sent twice");
    assert_eq!(hub.queued_bytes(), 0, "and not counted as waiting");
    result(&hub, None, 5, "e1");
    assert_eq!(queued(&mut outbox), ["A5"], "then live");
}

#[tokio::test]
async fn a_result_a_resuming_client_is_ahead_of_is_dropped_from_its_queue() {
    let hub = hub(64);
    result(&hub, None, 1, "e1");
    let admission = hub.admit("acme").expect("admitted");
    let (socket, mut outbox) = hub.join(admission, &strings(&["A"]), true);
    let seen = last_seen(&[("e1", 3)], &[]);
    let resumed = resume_as_seq_arrives(&hub, &socket, &seen, 2).await;
    assert!(resumed.expect("it was held").frames.is_empty());
    assert!(queued(&mut outbox).is_empty(), "it had seen 2");
    result(&hub, None, 3, "e1");
    result(&hub, None, 4, "e1");
    assert_eq!(queued(&mut outbox), ["A4"], "3 it had seen too");
}

#[tokio::test]
async fn results_a_socket_saw_on_a_gateway_ahead_are_not_sent_again() {
    let hub = hub(64);
    result(&hub, None, 1, "e1");
    let admission = hub.admit("acme").expect("admitted");
    let (socket, mut outbox) = hub.join(admission, &strings(&["A"]), true);
    let seen = last_seen(&[("e1", 3)], &[("e0", 9)]);
    let resumed = socket.resume(&seen).await.expect("it was held");
    assert!(resumed.frames.is_empty());
    assert_eq!(resumed.unrecovered_private, ["A"], "unknown here");
    assert!(resumed.unrecovered_public.is_empty(), "ahead is not a gap");
    for seq in 2..=4 {
        result(&hub, None, seq, "e1");
    }
    assert_eq!(queued(&mut outbox), ["A4"], "2 and 3 it had seen");
    assert!(
        hub.state().seen_ahead.is_empty(),
        "the floor went once passed"
    );
}

#[test]
fn a_result_its_key_already_had_reaches_no_socket_again() {
    let hub = hub(64);
    let (_socket, mut outbox) = join(&hub, "acme", &["A"]);
    for seq in [1, 2, 2, 1, 3] {
        result(&hub, None, seq, "e1");
    }
    result(&hub, None, 1, "e2");
    assert_eq!(
        queued(&mut outbox),
        ["A1", "A2", "A3", "A1"],
        "repeats dropped; a new epoch starts over"
    );
    assert_eq!(hub.inner.stats.results_repeated.load(Relaxed), 2);
}

#[test]
fn a_forged_result_far_ahead_does_not_silence_its_key() {
    let hub = hub(64);
    let (_socket, mut outbox) = join(&hub, "acme", &["A"]);
    result(&hub, None, 1, "e1");
    let forged = Position {
        seq: u64::MAX,
        epoch: "e1",
    };
    deliver(&hub, "A", None, Some(forged), "forged");
    result(&hub, None, 2, "e1");
    result(&hub, None, 3, "e1");
    assert_eq!(queued(&mut outbox), ["A1", "forged", "A2", "A3"]);
    let seen = Position {
        seq: 2,
        epoch: "e1",
    };
    assert!(
        matches!(hub.state().history.replay(None, "A", seen), Replay::Recovered(ref f) if f.len() == 1),
        "the history starts over from the real results"
    );
}

#[tokio::test]
async fn a_resume_that_claims_to_be_ahead_on_many_keys_gets_few_floors() {
    let limits = HubLimits {
        max_snapshots: 1000,
        ..limits(1024)
    };
    let hub = Hub::new(limits, Arc::new(Stats::default()));
    let keys = seen_ahead::MAX_PER_SOCKET + 10;
    let symbols: Vec<String> = (0..keys).map(|k| format!("S{k}")).collect();
    for symbol in &symbols {
        let frame = format!("{symbol}-1");
        let position = Position {
            seq: 1,
            epoch: "e1",
        };
        deliver(&hub, symbol, None, Some(position), &frame);
    }
    let admission = hub.admit("acme").expect("admitted");
    let (socket, _outbox) = hub.join(admission, &strings(&["*"]), true);
    let mut claimed = LastSeen::default();
    let ahead = symbols.iter().map(|symbol| (symbol.clone(), 2));
    claimed.public.insert("e1".to_owned(), ahead.collect());
    let resumed = socket.resume(&claimed).await.expect("it was held");
    assert_eq!(
        resumed.unrecovered_public.len(),
        10,
        "past the cap, a key it is ahead on is not recovered"
    );
    assert!(
        resumed.frames.is_empty(),
        "and this node's latest, older than what it saw, is not sent"
    );
    assert_eq!(
        hub.state().seen_ahead.by_socket_len(),
        seen_ahead::MAX_PER_SOCKET,
        "and no floor"
    );
    drop(socket);
    assert!(hub.state().seen_ahead.is_empty(), "they go with the socket");
}

#[tokio::test]
async fn a_resume_stops_reading_history_once_its_budget_is_spent() {
    // A budget of 8 frames; 50 keys, each 3 results behind.
    let limits = HubLimits {
        max_snapshots: 1000,
        ..limits(8)
    };
    let hub = Hub::new(limits, Arc::new(Stats::default()));
    let symbols: Vec<String> = (0..50).map(|k| format!("S{k:02}")).collect();
    for symbol in &symbols {
        for seq in 1..=4 {
            let frame = format!("{symbol}-{seq}");
            let epoch = "e1";
            deliver(&hub, symbol, None, Some(Position { seq, epoch }), &frame);
        }
    }
    let admission = hub.admit("acme").expect("admitted");
    let (socket, _outbox) = hub.join(admission, &strings(&["*"]), true);
    let mut claimed = LastSeen::default();
    let behind = symbols.iter().map(|symbol| (symbol.clone(), 1));
    // Named after the budget is spent: one up to date, one the client
    // saw further on another gateway. Neither is a gap.
    let (up_to_date, ahead) = (("U1".to_owned(), 4), ("U2".to_owned(), 6));
    for symbol in ["U1", "U2"] {
        for seq in 1..=4 {
            let frame = format!("{symbol}-{seq}");
            let epoch = "e1";
            deliver(&hub, symbol, None, Some(Position { seq, epoch }), &frame);
        }
    }
    let named = behind.chain([up_to_date, ahead]);
    claimed.public.insert("e1".to_owned(), named.collect());
    let reads_before = history::FRAMES_READ.with(std::cell::Cell::get);
    let resumed = socket.resume(&claimed).await.expect("it was held");
    let frames: Vec<&str> = resumed.frames.iter().map(SharedResult::as_str).collect();
    assert_eq!(
        frames,
        [
            "S00-2", "S00-3", "S00-4", "S01-2", "S01-3", "S01-4", "S02-4", "S03-4"
        ],
        "two keys recovered; the rest get their latest while it fits"
    );
    assert_eq!(resumed.replayed, 6);
    assert_eq!(resumed.unrecovered_public.len(), 48, "S02 to S49 only");
    assert_eq!(hub.state().seen_ahead.by_socket_len(), 1, "U2's floor");
    let read = history::FRAMES_READ.with(std::cell::Cell::get) - reads_before;
    assert!(
        read <= 2 * 8,
        "{read} missed results read: no more than the budget, twice"
    );
}

#[tokio::test]
async fn keys_without_results_for_the_idle_period_are_released_everywhere() {
    let hub = hub(64);
    let epoch = "e1";
    for seq in 1..=3 {
        result(&hub, None, seq, epoch);
        result(&hub, Some("acme"), seq, epoch);
    }
    deliver(&hub, "B", None, Some(Position { seq: 1, epoch }), "B1");
    // A socket ahead on A (from another gateway) holds a floor on it.
    let admission = hub.admit("acme").expect("admitted");
    let (socket, _outbox) = hub.join(admission, &strings(&["*"]), true);
    socket
        .resume(&last_seen(&[(epoch, 4)], &[]))
        .await
        .expect("it was held");
    assert!(!hub.state().seen_ahead.is_empty());
    // B has a result in every sweep; A (public and private) none.
    for sweep in 1..=crate::idle::SWEEPS_PER_IDLE {
        assert_eq!(hub.release_idle(), 0, "sweep {sweep}: not idle yet");
        let seq = u64::from(sweep) + 1;
        deliver(&hub, "B", None, Some(Position { seq, epoch }), "B");
    }
    assert_eq!(hub.release_idle(), 2, "A, public and private");
    let state = hub.state();
    assert!(state.snapshots.get("A").is_none(), "its snapshot went");
    assert!(state.snapshots.get("B").is_some());
    assert!(state.seen_ahead.is_empty(), "and the floor on it");
    let seen = Position { seq: 2, epoch };
    assert!(matches!(
        state.history.replay(None, "A", seen),
        Replay::Gap(None)
    ));
    assert!(matches!(
        state.history.replay(Some("acme"), "A", seen),
        Replay::Gap(None)
    ));
    assert_eq!(hub.inner.stats.history_keys_released.load(Relaxed), 2);
}

#[tokio::test]
async fn a_client_code_s_resumes_share_an_allowance_of_frames() {
    // One frame a second: a second passes before the allowance refills.
    let limits = HubLimits {
        resume_frames_per_second: 1,
        ..limits(64)
    };
    let hub = Hub::new(limits, Arc::new(Stats::default()));
    for seq in 1..=8 {
        result(&hub, None, seq, "e1");
    }
    let resume = async || {
        let admission = hub.admit("acme").expect("admitted");
        let (socket, _outbox) = hub.join(admission, &strings(&["A"]), true);
        socket
            .resume(&last_seen(&[("e1", 0)], &[]))
            .await
            .map(|r| r.frames.len())
    };
    assert_eq!(
        resume().await,
        Ok(1),
        "eight missed do not fit: the latest stands in"
    );
    assert_eq!(
        resume().await,
        Err(ResumeError::RateLimited(1)),
        "spent, on a new socket as on the same"
    );
    let other = hub.admit("other").expect("admitted");
    let (socket, _outbox) = hub.join(other, &strings(&["A"]), true);
    assert!(
        socket.resume(&last_seen(&[("e1", 0)], &[])).await.is_ok(),
        "another client code has its own"
    );
}

#[tokio::test]
async fn the_keys_a_resume_names_are_spent_from_its_allowance_like_frames() {
    // Ten a second, and each resume names eight keys it is up to date on:
    // nothing is sent, yet each costs eight.
    let limits = HubLimits {
        resume_frames_per_second: 10,
        ..limits(64)
    };
    let hub = Hub::new(limits, Arc::new(Stats::default()));
    let symbols: Vec<String> = (0..8).map(|i| format!("S{i}")).collect();
    for symbol in &symbols {
        deliver(
            &hub,
            symbol,
            None,
            Some(Position {
                seq: 1,
                epoch: "e1",
            }),
            symbol,
        );
    }
    let mut up_to_date = LastSeen::default();
    let named = symbols.iter().map(|symbol| (symbol.clone(), 1));
    up_to_date.public.insert("e1".to_owned(), named.collect());
    let resume = async || {
        let admission = hub.admit("acme").expect("admitted");
        let (socket, _outbox) = hub.join(admission, &strings(&["*"]), true);
        socket.resume(&up_to_date).await.map(|r| r.frames.len())
    };
    assert_eq!(resume().await, Ok(0), "ten left: admitted, nothing to send");
    assert_eq!(resume().await, Ok(0), "two left: admitted, and in debt");
    assert_eq!(
        resume().await,
        Err(ResumeError::RateLimited(10)),
        "the keys named spent the allowance"
    );
}

#[test]
fn admission_limits_sockets_per_client_and_is_released_on_drop() {
    let hub = hub(8);
    let admitted: Vec<Admission> = (0..4)
        .map(|_| hub.admit("acme").expect("admitted"))
        .collect();
    assert_eq!(hub.admit("acme").err(), Some(AdmitError::TooManySockets(4)));
    assert!(hub.admit("other").is_ok(), "the limit is per client code");
    drop(admitted);
    let (membership, _outbox) = join(&hub, "acme", &[]);
    drop(membership);
    assert!(hub.admissions().is_empty(), "no entry outlives its sockets");
}

#[test]
fn a_burst_is_offered_when_its_hold_ends_in_per_key_order_to_every_kind_of_subscriber() {
    let hub = hub(64);
    let (_everything, mut everything) = join(&hub, "acme", &["*"]);
    let (_named, mut named) = join(&hub, "other", &["A"]);
    let (_both, mut both) = join(&hub, "third", &["*", "A"]);
    let hold = hub.hold_wakes();
    for seq in 1..=3 {
        result(&hub, None, seq, "e1");
        result(&hub, Some("acme"), seq, "e1");
    }
    deliver(&hub, "B", None, None, "B");
    result(&hub, None, 1, "e2");
    assert_eq!(hub.lock().burst.len(), 8, "held: nothing offered yet");
    assert!(everything.try_recv().is_none());
    drop(hold);
    assert_eq!(
        queued(&mut everything),
        ["A1", "acme1", "A2", "acme2", "A3", "acme3", "B", "A1"],
        "in the order delivered: public and its group's, in one offer"
    );
    assert_eq!(queued(&mut named), ["A1", "A2", "A3", "A1"]);
    assert_eq!(
        queued(&mut both),
        ["A1", "A2", "A3", "B", "A1"],
        "once each, though in * and A"
    );
}

#[test]
fn a_socket_on_everything_takes_a_burst_s_public_results_as_one_shared_entry() {
    let hub = hub(64);
    let (_first, mut first) = join(&hub, "acme", &["*"]);
    let (_second, mut second) = join(&hub, "other", &["*"]);
    // Its group has a private result in the burst: result by result, in order.
    let (_own, mut own) = join(&hub, "third", &["*"]);
    // Rate-limited: each result meets its limit, so result by result.
    let (limited, mut limited_outbox) = join(&hub, "fourth", &["*"]);
    let rates = hub
        .state()
        .connections
        .get(limited.id)
        .map(|s| s.outbox.rates());
    rates
        .expect("joined")
        .set_rate(&strings(&["B"]), Some(Duration::from_secs(60)));
    let hold = hub.hold_wakes();
    result(&hub, None, 1, "e1");
    result(&hub, Some("third"), 1, "e1");
    deliver(&hub, "B", None, None, "B");
    drop(hold);
    let (Some(Frame::Burst(a)), Some(Frame::Burst(b))) = (first.try_recv(), second.try_recv())
    else {
        panic!("each socket on * queues the burst as one entry");
    };
    assert!(Arc::ptr_eq(&a, &b), "one burst, encoded once, for both");
    let public: Vec<&str> = a.results().iter().map(SharedResult::as_str).collect();
    assert_eq!(public, ["A1", "B"]);
    assert!(first.try_recv().is_none());
    for (outbox, expected) in [
        (&mut own, &["A1", "third1", "B"][..]),
        (&mut limited_outbox, &["A1", "B"][..]),
    ] {
        let entries: Vec<Frame> = std::iter::from_fn(|| outbox.try_recv()).collect();
        assert!(
            entries
                .iter()
                .all(|entry| matches!(entry, Frame::Result(_)))
        );
        assert_eq!(
            entries.into_iter().flat_map(texts).collect::<Vec<_>>(),
            expected
        );
    }
}

#[test]
fn whatever_reads_the_hub_during_a_hold_sees_the_burst_first() {
    let hub = hub(64);
    let (_early, mut early) = join(&hub, "acme", &["A"]);
    let hold = hub.hold_wakes();
    result(&hub, None, 1, "e1");
    result(&hub, None, 2, "e1");
    // A subscribe in the middle of the burst: its snapshot is the newest
    // result, and the socket that was there before gets both, in order.
    let (late, mut late_rx) = join(&hub, "other", &[]);
    late.subscribe_now(&strings(&["A"])).expect("subscribe");
    result(&hub, None, 3, "e1");
    drop(hold);
    assert_eq!(queued(&mut early), ["A1", "A2", "A3"]);
    assert_eq!(queued(&mut late_rx), ["A2", "A3"], "snapshot, then live");
}

#[test]
fn a_burst_past_its_bound_is_offered_without_waiting_for_the_hold() {
    let hub = hub(4096);
    let (_socket, mut outbox) = join(&hub, "acme", &["*"]);
    let _hold = hub.hold_wakes();
    for seq in 1..=300 {
        result(&hub, None, seq, "e1");
    }
    let offered: usize = std::iter::from_fn(|| outbox.try_recv())
        .map(|frame| frame.count())
        .sum();
    assert_eq!(offered, 256, "the first 256 went at once; the rest wait");
    assert_eq!(hub.lock().burst.len(), 44);
}

#[test]
fn a_socket_that_cannot_take_a_burst_is_a_slow_consumer_and_gets_no_more() {
    let hub = hub(2);
    let (_slow, mut slow) = join(&hub, "acme", &["*"]);
    let hold = hub.hold_wakes();
    for seq in 1..=3 {
        result(&hub, None, seq, "e1");
        result(&hub, Some("acme"), seq, "e1");
    }
    drop(hold);
    assert_eq!(
        queued(&mut slow),
        ["A1", "acme1"],
        "what fitted, then nothing"
    );
    assert_eq!(hub.socket_count(), 0, "evicted");
    assert_eq!(hub.inner.stats.slow_consumer_closes.load(Relaxed), 1);
}

#[test]
fn a_burst_of_private_results_reaches_its_group_whatever_it_subscribed_to() {
    let hub = hub(64);
    let (_everything, mut everything) = join(&hub, "acme", &["*"]);
    let (_plain, mut plain) = join(&hub, "acme", &[]);
    let (_stranger, mut stranger) = join(&hub, "other", &["*"]);
    let hold = hub.hold_wakes();
    for seq in 1..=2 {
        result(&hub, Some("acme"), seq, "e1");
    }
    drop(hold);
    assert_eq!(queued(&mut everything), ["acme1", "acme2"]);
    assert_eq!(queued(&mut plain), ["acme1", "acme2"]);
    assert!(stranger.try_recv().is_none(), "not its group's");
}

#[tokio::test]
async fn resumes_take_turns_in_the_order_they_asked() {
    let hub = hub(8);
    let first = hub.resume_turn().await;
    let mut second = Box::pin(hub.resume_turn());
    let mut third = Box::pin(hub.resume_turn());
    assert!(
        second.as_mut().now_or_never().is_none(),
        "the first has the turn"
    );
    assert!(third.as_mut().now_or_never().is_none());
    drop(first);
    let second = second.await;
    assert!(third.as_mut().now_or_never().is_none(), "then the second");
    drop(second);
    drop(third.await);
}

/// Delivers `text` as a result of `symbol` in the series `ema`.
fn deliver_series(hub: &Hub, symbol: &str, client: Option<&str>, seq: u64, text: &str) {
    let at = Position { seq, epoch: "e1" };
    hub.deliver_result(SharedResult::series(
        text.into(),
        "ema",
        symbol,
        client,
        at,
        crate::frame::BarState::NotABar,
    ));
}

#[test]
fn a_series_result_reaches_only_the_sockets_subscribed_to_its_key() {
    let hub = hub(8);
    let (_sma, mut sma_rx) = join(&hub, "acme", &["*"]);
    let (_named, mut named_rx) = join(&hub, "other", &["AAPL@ema"]);
    let (_every, mut every_rx) = join(&hub, "acme", &["*@ema", "AAPL@ema"]);
    {
        let _hold = hub.hold_wakes();
        deliver(&hub, "AAPL", None, None, "sma");
        deliver_series(&hub, "AAPL", None, 1, "ema-public");
        deliver_series(&hub, "MSFT", None, 1, "ema-msft");
        deliver_series(&hub, "AAPL", Some("acme"), 1, "ema-acme");
    }
    assert_eq!(queued(&mut sma_rx), ["sma"], "the SMA's wildcard only");
    assert_eq!(
        queued(&mut named_rx),
        ["ema-public"],
        "not acme's private key"
    );
    assert_eq!(
        queued(&mut every_rx),
        ["ema-public", "ema-msft", "ema-acme"],
        "each once, in order, its own group's private one too"
    );
    // A new subscriber of the series' wildcard gets each key's latest public
    // result of that series, and the resume finds the key by its name.
    let (late, mut late_rx) = join(&hub, "late", &[]);
    let subscribed = late
        .subscribe(&strings(&["*@ema"]), None)
        .expect("subscribed");
    assert_eq!(subscribed.snapshots, 2);
    let mut snapshots = queued(&mut late_rx);
    snapshots.sort();
    assert_eq!(snapshots, ["ema-msft", "ema-public"]);
    let state = hub.state();
    assert!(
        matches!(
            state.history.replay(None, "AAPL@ema", Position { seq: 0, epoch: "e1" }),
            Replay::Recovered(missed) if missed.len() == 1
        ),
        "the key's history is its own"
    );
}
