//! The outbox's tests: queue bounds, conflation and rate limits, on tokio's
//! paused clock where time matters.

use super::*;
use crate::frame::BarState;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

fn bounds(frames: usize, bytes: usize) -> Bounds {
    Bounds {
        frames,
        bytes,
        conflate: false,
    }
}

/// Offers `text` (a frame of no key) and wakes the session at once.
fn offer(sender: &Sender, text: &str) -> Offer {
    offer_keyed(sender, text, None)
}

/// Which key a test frame is a result of: the socket's client's private
/// key, or a public one.
#[derive(Debug, Clone, Copy)]
struct FrameKey<'a> {
    private: bool,
    symbol: &'a str,
}

/// `text` as a result of `key`, or as a direct message (no key).
fn frame(text: &str, key: Option<FrameKey<'_>>) -> Frame {
    match key {
        None => Frame::Direct(Message::Text(text.to_owned().into())),
        Some(key) => Frame::Result(SharedResult::detached(
            text.into(),
            key.symbol,
            key.private.then_some("acme"),
            None,
        )),
    }
}

fn offer_keyed(sender: &Sender, text: &str, key: Option<FrameKey<'_>>) -> Offer {
    offer_frame(sender, frame(text, key))
}

fn bounded_for_test(bounds: Bounds) -> (Sender, Outbox) {
    bounded(bounds, QueuedBytes::default())
}

fn text(frame: &Frame) -> &str {
    match frame {
        Frame::Result(result) => result.as_str(),
        Frame::Direct(Message::Text(t)) => t.as_str(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test]
async fn frames_come_out_in_order_and_at_most_max_at_a_time() {
    let (sender, mut outbox) = bounded_for_test(bounds(10, 1000));
    for i in 0..5 {
        assert_eq!(offer(&sender, &i.to_string()), Offer::Queued);
    }
    let mut batch = Vec::new();
    assert_eq!(outbox.recv_many(&mut batch, 3).await.frames, 3);
    assert_eq!(outbox.recv_many(&mut batch, 3).await.frames, 2);
    let got: Vec<&str> = batch.iter().map(text).collect();
    assert_eq!(got, ["0", "1", "2", "3", "4"]);
}

#[tokio::test]
async fn a_waiting_session_is_woken_by_the_next_frame() {
    let (sender, mut outbox) = bounded_for_test(bounds(10, 1000));
    let waiting = tokio::spawn(async move {
        let mut batch = Vec::new();
        outbox.recv_many(&mut batch, 10).await;
        batch
    });
    tokio::task::yield_now().await;
    offer(&sender, "late");
    let batch = waiting.await.expect("receiver ran");
    assert_eq!(batch.iter().map(text).collect::<Vec<_>>(), ["late"]);
}

#[tokio::test]
async fn both_bounds_hold_and_taking_frees_room() {
    let (sender, mut outbox) = bounded_for_test(bounds(2, 10));
    assert_eq!(offer(&sender, "12345"), Offer::Queued);
    assert_eq!(offer(&sender, "123456"), Offer::Full, "11 bytes > 10");
    assert_eq!(offer(&sender, "1"), Offer::Queued);
    assert_eq!(offer(&sender, "2"), Offer::Full, "3 frames > 2");
    let mut batch = Vec::new();
    assert_eq!(outbox.recv_many(&mut batch, 10).await.frames, 2);
    assert_eq!(offer(&sender, "123456789"), Offer::Queued);
    assert_eq!(offer(&sender, "12"), Offer::Full, "11 bytes > 10");
}

fn key(symbol: &str) -> Option<FrameKey<'_>> {
    Some(FrameKey {
        private: false,
        symbol,
    })
}

fn texts(batch: &[Frame]) -> Vec<&str> {
    let mut texts: Vec<&str> = batch.iter().map(text).collect();
    texts.sort_unstable();
    texts
}

#[tokio::test]
async fn past_its_bound_a_conflating_outbox_keeps_the_latest_of_each_key() {
    let (sender, mut outbox) = bounded_for_test(Bounds {
        conflate: true,
        ..bounds(2, 1000)
    });
    assert_eq!(offer_keyed(&sender, "A1", key("A")), Offer::Queued);
    assert_eq!(offer_keyed(&sender, "B1", key("B")), Offer::Queued);
    for (frame, symbol, replaced) in [("A2", "A", 0), ("A3", "A", 1), ("B2", "B", 0)] {
        assert_eq!(
            offer_keyed(&sender, frame, key(symbol)),
            Offer::Conflated { replaced }
        );
    }
    let private = Some(FrameKey {
        private: true,
        symbol: "A",
    });
    assert_eq!(
        offer_keyed(&sender, "pA1", private),
        Offer::Conflated { replaced: 0 },
        "a private key is its own"
    );
    assert_eq!(
        offer(&sender, "direct"),
        Offer::Full,
        "no key: not conflated"
    );
    assert_eq!(sender.queued_bytes(), 4 + 7, "queued, and the latest");
    let mut batch = Vec::new();
    let taken = outbox.recv_many(&mut batch, 10).await;
    assert_eq!(
        (taken.frames, taken.conflated),
        (2, false),
        "the queue first"
    );
    assert_eq!(texts(&batch), ["A1", "B1"]);
    assert_eq!(sender.queued_bytes(), 7);
    batch.clear();
    // Keyed frames wait behind the latest while it is held: none overtakes.
    assert_eq!(
        offer_keyed(&sender, "A4", key("A")),
        Offer::Conflated { replaced: 1 }
    );
    let taken = outbox.recv_many(&mut batch, 10).await;
    assert_eq!((taken.frames, taken.conflated), (3, true));
    assert_eq!(texts(&batch), ["A4", "B2", "pA1"]);
    batch.clear();
    assert_eq!(
        offer_keyed(&sender, "A5", key("A")),
        Offer::Queued,
        "caught up"
    );
}

#[test]
fn a_conflating_outbox_is_full_when_one_frame_per_key_exceeds_the_byte_bound() {
    let (sender, _outbox) = bounded_for_test(Bounds {
        conflate: true,
        ..bounds(1, 10)
    });
    assert_eq!(offer_keyed(&sender, "12345", key("A")), Offer::Queued);
    assert_eq!(
        offer_keyed(&sender, "123456", key("B")),
        Offer::Conflated { replaced: 0 }
    );
    assert_eq!(
        offer_keyed(&sender, "123", key("B")),
        Offer::Conflated { replaced: 1 },
        "replacing frees the older one's bytes"
    );
    assert_eq!(
        offer_keyed(&sender, "12345678", key("C")),
        Offer::Full,
        "3 + 8 > 10"
    );
}

/// Takes what the outbox gives next, waiting (on the paused clock) as
/// long as it takes; returns it and when it came.
async fn next_batch(outbox: &mut Outbox) -> (Vec<String>, Duration, Instant) {
    next_batch_of(outbox, 10).await
}

async fn next_batch_of(outbox: &mut Outbox, max: usize) -> (Vec<String>, Duration, Instant) {
    let start = Instant::now();
    let mut batch = Vec::new();
    outbox.recv_many(&mut batch, max).await;
    let texts = batch.iter().map(|m| text(m).to_owned()).collect();
    (texts, start.elapsed(), Instant::now())
}

/// Send times the throttle of `sender` remembers.
fn remembered(sender: &Sender) -> usize {
    let queue = sender.shared.lock();
    queue.throttle.as_ref().map_or(0, |t| t.remembered())
}

#[tokio::test(start_paused = true)]
async fn keys_whose_interval_passed_are_forgotten_as_new_ones_come() {
    // 64 remembered keys at most (the minimum).
    let (sender, _outbox) = bounded_for_test(bounds(1000, 1024));
    sender.set_rate(&["*".to_owned()], Some(Duration::from_secs(1)));
    let names: Vec<String> = (0..128).map(|k| format!("K{k}")).collect();
    for name in &names[..64] {
        assert_eq!(offer_keyed(&sender, name, key(name)), Offer::Queued);
    }
    assert_eq!(remembered(&sender), 64);
    tokio::time::advance(Duration::from_secs(2)).await;
    for name in &names[64..] {
        assert_eq!(
            offer_keyed(&sender, name, key(name)),
            Offer::Queued,
            "the first 64 were due long ago: nothing holds the others back"
        );
    }
    assert_eq!(remembered(&sender), 64, "the first 64 went once passed");
}

#[tokio::test(start_paused = true)]
async fn a_rate_over_more_keys_than_it_remembers_keeps_bounded_memory_and_the_limit() {
    let (sender, mut outbox) = bounded_for_test(bounds(1 << 20, 1 << 20));
    let hour = Duration::from_secs(3600);
    sender.set_rate(&["*".to_owned()], Some(hour));
    let cap = (1 << 20) / 128;
    let names: Vec<String> = (0..20_000).map(|k| format!("K{k}")).collect();
    for name in &names {
        offer_keyed(&sender, name, key(name));
        assert!(remembered(&sender) <= cap);
    }
    // The first results of as many keys as it remembers go at once;
    // past that it cannot tell a new key from a forgotten one, so theirs wait.
    let (first, _, _) = next_batch_of(&mut outbox, 1 << 20).await;
    assert_eq!(first.len(), cap + 1);
    // Every key sent within the hour, remembered or not: none may send again.
    for name in &names {
        assert!(
            matches!(
                offer_keyed(&sender, name, key(name)),
                Offer::Throttled { .. }
            ),
            "{name} sent twice within its interval"
        );
    }
    // Re-limiting "*" again and again moves nothing and sends nothing early.
    for _ in 0..100 {
        sender.set_rate(&["*".to_owned()], Some(hour));
    }
    tokio::time::advance(hour - Duration::from_secs(1)).await;
    assert!(
        outbox.try_recv().is_none(),
        "nothing is due before the hour"
    );
    let (later, waited, _) = next_batch_of(&mut outbox, 1 << 20).await;
    assert_eq!(later.len(), names.len(), "each key's newest, once");
    assert_eq!(waited, Duration::from_secs(1));
}

#[tokio::test]
async fn the_gauge_sums_what_every_outbox_holds() {
    let gauge = QueuedBytes::default();
    let conflating = Bounds {
        conflate: true,
        ..bounds(1, 100)
    };
    let (a, mut a_out) = bounded(conflating, gauge.clone());
    let (b, b_out) = bounded(bounds(10, 100), gauge.clone());
    let mut offered = Offered::default();
    a.offer(frame("a1", key("A")), &mut offered);
    a.offer(frame("a22", key("A")), &mut offered);
    a.offer(frame("a333", key("A")), &mut offered);
    b.offer(frame("b1", None), &mut offered);
    assert_eq!(gauge.get(), 0, "added once the caller settles");
    offered.settle(&gauge);
    assert_eq!(
        gauge.get(),
        2 + 4 + 2,
        "queued, the latest of A (a22 replaced)"
    );
    let mut batch = Vec::new();
    a_out.recv_many(&mut batch, 10).await;
    assert_eq!(gauge.get(), 4 + 2);
    a_out.recv_many(&mut batch, 10).await;
    assert_eq!(gauge.get(), 2);
    drop(b_out);
    assert_eq!(gauge.get(), 0, "an ended session holds nothing");
}

#[tokio::test(start_paused = true)]
async fn frames_held_back_by_a_rate_take_at_most_the_byte_bound() {
    let (sender, mut outbox) = bounded_for_test(bounds(100, 6));
    sender.set_rate(&["*".to_owned()], Some(Duration::from_secs(1)));
    for first in ["A1", "B1", "C1"] {
        assert_eq!(offer_keyed(&sender, first, key(&first[..1])), Offer::Queued);
    }
    assert_eq!(next_batch(&mut outbox).await.0, ["A1", "B1", "C1"]);
    assert_eq!(offer_keyed(&sender, "D1", key("D")), Offer::Queued);
    tokio::time::advance(Duration::from_millis(100)).await;
    for second in ["A2", "B2", "C2"] {
        assert_eq!(
            offer_keyed(&sender, second, key(&second[..1])),
            Offer::Throttled { replaced: 0 }
        );
    }
    assert_eq!(
        offer_keyed(&sender, "D2", key("D")),
        Offer::Skipped,
        "6 bytes wait already: D2 is skipped, neither kept nor sent early"
    );
    assert_eq!(
        offer_keyed(&sender, "A3", key("A")),
        Offer::Throttled { replaced: 1 },
        "a waiting frame is still replaced"
    );
    assert_eq!(sender.queued_bytes(), 2 + 6);
    assert_eq!(next_batch(&mut outbox).await.0, ["D1"]);
    let (due, waited, _) = next_batch(&mut outbox).await;
    assert_eq!(due, ["A3", "B2", "C2"], "then the waiting ones, once due");
    assert_eq!(waited, Duration::from_millis(900));
    assert_eq!(sender.queued_bytes(), 0);
    assert_eq!(
        offer_keyed(&sender, "D3", key("D")),
        Offer::Queued,
        "the skipped key's next result goes as its rate allows"
    );
}

/// A burst offered to a socket whose held-back frames are at their bound:
/// a skipped result does not end the burst, the results after it still go.
#[tokio::test(start_paused = true)]
async fn a_skipped_result_does_not_stop_the_rest_of_a_burst() {
    let (sender, mut outbox) = bounded_for_test(bounds(100, 3));
    sender.set_rate(&["*".to_owned()], Some(Duration::from_secs(1)));
    for first in ["A1", "B1"] {
        assert_eq!(offer_keyed(&sender, first, key(&first[..1])), Offer::Queued);
        assert_eq!(next_batch(&mut outbox).await.0, [first]);
    }
    assert_eq!(
        offer_keyed(&sender, "A2", key("A")),
        Offer::Throttled { replaced: 0 }
    );
    let burst = [
        SharedResult::detached("B2".into(), "B", None, None),
        SharedResult::detached("C1".into(), "C", None, None),
    ];
    let mut offered = Offered::default();
    let offers = sender.offer_results(&burst, &mut offered);
    offered.wakes.into_iter().for_each(Waker::wake);
    assert_eq!(
        offers,
        Offers {
            queued: 1,
            conflated: 1,
            full: false
        },
        "B2 skipped, C1 (a key never sent) queued"
    );
    assert_eq!(next_batch(&mut outbox).await.0, ["C1"]);
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_key_sends_its_newest_frame_once_due() {
    let (sender, mut outbox) = bounded_for_test(bounds(100, 1 << 20));
    sender.set_rate(&["A".to_owned()], Some(Duration::from_millis(500)));
    let t0 = Instant::now();
    assert_eq!(offer_keyed(&sender, "A1", key("A")), Offer::Queued);
    assert_eq!(
        offer_keyed(&sender, "B1", key("B")),
        Offer::Queued,
        "B is not limited"
    );
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(
        offer_keyed(&sender, "A2", key("A")),
        Offer::Throttled { replaced: 0 }
    );
    assert_eq!(
        offer_keyed(&sender, "A3", key("A")),
        Offer::Throttled { replaced: 1 }
    );
    assert_eq!(sender.queued_bytes(), 4 + 2, "queued, and A3 waiting");
    let (first, _, _) = next_batch(&mut outbox).await;
    assert_eq!(first, ["A1", "B1"]);
    // A3, the newest, comes when A is due again: 500 ms after A1.
    let (second, _, at) = next_batch(&mut outbox).await;
    assert_eq!(second, ["A3"]);
    assert_eq!(at - t0, Duration::from_millis(500));
    // Due again 500 ms after that: a frame later than that goes at once...
    tokio::time::advance(Duration::from_millis(600)).await;
    assert_eq!(offer_keyed(&sender, "A4", key("A")), Offer::Queued);
    assert_eq!(next_batch(&mut outbox).await.0, ["A4"]);
    // ...and the last one of a burst is never held back for good.
    assert_eq!(
        offer_keyed(&sender, "A5", key("A")),
        Offer::Throttled { replaced: 0 }
    );
    let (last, waited, _) = next_batch(&mut outbox).await;
    assert_eq!(last, ["A5"]);
    assert!(waited <= Duration::from_millis(500), "{waited:?}");
    // Lifted, the key is unlimited again.
    sender.set_rate(&["A".to_owned()], None);
    assert_eq!(offer_keyed(&sender, "A6", key("A")), Offer::Queued);
    assert_eq!(offer_keyed(&sender, "A7", key("A")), Offer::Queued);
}

#[tokio::test(start_paused = true)]
async fn lifting_a_limit_sends_the_waiting_frame_first_and_never_a_stale_one() {
    let (sender, mut outbox) = bounded_for_test(bounds(100, 1 << 20));
    let a = ["A".to_owned()];
    sender.set_rate(&a, Some(Duration::from_secs(3600)));
    assert_eq!(offer_keyed(&sender, "A1", key("A")), Offer::Queued);
    assert_eq!(
        offer_keyed(&sender, "A2", key("A")),
        Offer::Throttled { replaced: 0 }
    );
    assert_eq!(next_batch(&mut outbox).await.0, ["A1"]);
    // Lifted: A2 is due at once, and A3 may not overtake it: it replaces it.
    sender.set_rate(&a, None);
    assert_eq!(
        offer_keyed(&sender, "A3", key("A")),
        Offer::Throttled { replaced: 1 }
    );
    let (got, waited, _) = next_batch(&mut outbox).await;
    assert_eq!((got, waited), (vec!["A3".to_owned()], Duration::ZERO));
    assert_eq!(
        offer_keyed(&sender, "A4", key("A")),
        Offer::Queued,
        "unlimited now"
    );
    // Unsubscribed: what waited is dropped, not sent an hour later.
    sender.set_rate(&a, Some(Duration::from_secs(3600)));
    offer_keyed(&sender, "A5", key("A"));
    assert_eq!(
        offer_keyed(&sender, "A6", key("A")),
        Offer::Throttled { replaced: 0 }
    );
    sender.unsubscribe(&a);
    assert_eq!(next_batch(&mut outbox).await.0, ["A4", "A5"]);
    tokio::time::advance(Duration::from_secs(7200)).await;
    assert!(outbox.try_recv().is_none(), "A6 is gone");
}

#[tokio::test(start_paused = true)]
async fn a_rate_on_everything_limits_every_public_key_but_not_private_ones() {
    let (sender, mut outbox) = bounded_for_test(bounds(100, 1 << 20));
    sender.set_rate(&["*".to_owned()], Some(Duration::from_secs(1)));
    let private = Some(FrameKey {
        private: true,
        symbol: "A",
    });
    for (frame, symbol) in [("A1", "A"), ("A2", "A"), ("B1", "B"), ("B2", "B")] {
        offer_keyed(&sender, frame, key(symbol));
    }
    assert_eq!(offer_keyed(&sender, "p1", private), Offer::Queued);
    assert_eq!(offer_keyed(&sender, "p2", private), Offer::Queued);
    let (now, _, _) = next_batch(&mut outbox).await;
    assert_eq!(now, ["A1", "B1", "p1", "p2"]);
    let (mut later, waited, _) = next_batch(&mut outbox).await;
    later.sort();
    assert_eq!(
        (later, waited),
        (
            vec!["A2".to_owned(), "B2".to_owned()],
            Duration::from_secs(1)
        )
    );
}

#[tokio::test(start_paused = true)]
async fn a_due_frame_goes_out_even_while_other_keys_keep_the_queue_busy() {
    let (sender, mut outbox) = bounded_for_test(bounds(100, 1 << 20));
    sender.set_rate(&["A".to_owned()], Some(Duration::from_secs(1)));
    assert_eq!(offer_keyed(&sender, "A1", key("A")), Offer::Queued);
    assert_eq!(
        offer_keyed(&sender, "A2", key("A")),
        Offer::Throttled { replaced: 0 }
    );
    assert_eq!(next_batch(&mut outbox).await.0, ["A1"]);
    tokio::time::advance(Duration::from_secs(1)).await;
    // B is unlimited: there is always a frame queued when the session looks.
    assert_eq!(offer_keyed(&sender, "B1", key("B")), Offer::Queued);
    assert_eq!(next_batch(&mut outbox).await.0, ["B1", "A2"]);
}

#[tokio::test(start_paused = true)]
async fn unsubscribing_a_symbol_that_star_still_covers_keeps_its_newest() {
    let (sender, mut outbox) = bounded_for_test(bounds(100, 1 << 20));
    let hour = Duration::from_secs(3600);
    sender.set_rate(&["*".to_owned(), "A".to_owned()], Some(hour));
    assert_eq!(offer_keyed(&sender, "A1", key("A")), Offer::Queued);
    assert_eq!(
        offer_keyed(&sender, "A2", key("A")),
        Offer::Throttled { replaced: 0 }
    );
    assert_eq!(next_batch(&mut outbox).await.0, ["A1"]);
    sender.rates().unsubscribe(&["A".to_owned()], |_| true);
    let (got, waited, _) = next_batch(&mut outbox).await;
    assert_eq!(got, ["A2"], "still delivered through \"*\", at its rate");
    assert_eq!(waited, hour);
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_replaces_the_frame_its_key_has_waiting() {
    let (sender, mut outbox) = bounded_for_test(bounds(100, 1 << 20));
    sender.set_rate(&["*".to_owned()], Some(Duration::from_secs(3600)));
    assert_eq!(offer_keyed(&sender, "A1", key("A")), Offer::Queued);
    assert_eq!(
        offer_keyed(&sender, "A2", key("A")),
        Offer::Throttled { replaced: 0 }
    );
    assert_eq!(next_batch(&mut outbox).await.0, ["A1"]);
    // A subscribe naming A queues A's latest result, which is A2 itself.
    let latest = SharedResult::detached(Utf8Bytes::from("A2"), "A", None, None);
    let mut offered = Offered::default();
    assert_eq!(sender.offer_while_room([&latest], &mut offered), 1);
    assert_eq!(sender.queued_bytes(), 2, "A2 once, not also waiting");
    assert_eq!(next_batch(&mut outbox).await.0, ["A2"]);
    tokio::time::advance(Duration::from_secs(7200)).await;
    assert!(outbox.try_recv().is_none(), "and not again an hour later");
}

#[tokio::test]
async fn closing_lets_the_session_drain_then_ends_it() {
    let (sender, mut outbox) = bounded_for_test(bounds(10, 1000));
    offer(&sender, "last");
    drop(sender);
    let mut batch = Vec::new();
    assert_eq!(outbox.recv_many(&mut batch, 10).await.frames, 1);
    assert_eq!(outbox.recv_many(&mut batch, 10).await.frames, 0);
}

#[test]
fn offers_to_an_ended_session_are_refused() {
    let (sender, outbox) = bounded_for_test(bounds(10, 1000));
    drop(outbox);
    assert_eq!(offer(&sender, "x"), Offer::Gone);
}

#[tokio::test]
async fn an_outbox_past_half_full_wakes_its_session_at_once() {
    let (sender, mut outbox) = bounded_for_test(bounds(4, 1000));
    let session = tokio::spawn(async move {
        let mut batch = Vec::new();
        outbox.recv_many(&mut batch, 10).await;
        batch.len()
    });
    tokio::task::yield_now().await;
    let mut offered = Offered::default();
    for text in ["1", "2", "3"] {
        assert_eq!(sender.offer(frame(text, None), &mut offered), Offer::Queued);
    }
    assert_eq!(offered.wakes.len(), 1, "the first frame's wake is deferred");
    // 3 of 4 frames: the session is woken directly, while the deferred
    // wake is still held.
    let taken = tokio::time::timeout(std::time::Duration::from_secs(10), session)
        .await
        .expect("woken without the deferred wake")
        .expect("session ran");
    assert!(taken >= 3);
}

/// `text` as a candle of `symbol` in the series `candles.1m`, open or closed.
fn candle(text: &str, symbol: &str, bar: BarState) -> Frame {
    let at = crate::protocol::Position {
        seq: 1,
        epoch: "e1",
    };
    Frame::Result(SharedResult::series(
        text.into(),
        "candles.1m",
        symbol,
        None,
        at,
        bar,
    ))
}

/// Offers `frame` and wakes the session at once.
fn offer_frame(sender: &Sender, frame: Frame) -> Offer {
    let mut offered = Offered::default();
    let offer = sender.offer(frame, &mut offered);
    offered.wakes.into_iter().for_each(Waker::wake);
    offer
}

#[tokio::test]
async fn conflation_replaces_open_candles_and_keeps_every_closed_one_in_order() {
    let (sender, mut outbox) = bounded_for_test(Bounds {
        conflate: true,
        ..bounds(1, 1000)
    });
    assert_eq!(offer(&sender, "fill"), Offer::Queued);
    let offers = [
        ("o1", BarState::Open, 0),
        ("c1", BarState::Closed, 1),
        ("o2", BarState::Open, 0),
        ("o3", BarState::Open, 1),
        ("c2", BarState::Closed, 1),
        ("o4", BarState::Open, 0),
    ];
    for (text, bar, replaced) in offers {
        assert_eq!(
            offer_frame(&sender, candle(text, "A", bar)),
            Offer::Conflated { replaced },
            "{text}"
        );
    }
    let mut batch = Vec::new();
    outbox.recv_many(&mut batch, 10).await;
    batch.clear();
    let taken = outbox.recv_many(&mut batch, 10).await;
    assert_eq!((taken.frames, taken.conflated), (3, true));
    let got: Vec<&str> = batch.iter().map(text).collect();
    assert_eq!(got, ["c1", "c2", "o4"], "closed candles first, in order");
    assert_eq!(sender.queued_bytes(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_closed_candle_never_waits_for_a_rate_and_replaces_the_open_one_waiting() {
    let (sender, mut outbox) = bounded_for_test(bounds(100, 1 << 20));
    sender.set_rate(&["*@candles.1m".to_owned()], Some(Duration::from_secs(1)));
    assert_eq!(
        offer_frame(&sender, candle("o1", "A", BarState::Open)),
        Offer::Queued
    );
    assert_eq!(
        offer_frame(&sender, candle("o2", "A", BarState::Open)),
        Offer::Throttled { replaced: 0 },
        "the series' wildcard limits its keys"
    );
    assert_eq!(
        offer_keyed(&sender, "sma", key("A")),
        Offer::Queued,
        "not the symbol's SMA"
    );
    assert_eq!(
        offer_frame(&sender, candle("c1", "A", BarState::Closed)),
        Offer::Queued
    );
    assert_eq!(
        offer_frame(&sender, candle("o3", "A", BarState::Open)),
        Offer::Throttled { replaced: 0 },
        "the closed candle counts as the key's send"
    );
    let (first, _, _) = next_batch(&mut outbox).await;
    assert_eq!(first, ["o1", "sma", "c1"]);
    let (second, waited, _) = next_batch(&mut outbox).await;
    assert_eq!(
        (second, waited),
        (vec!["o3".to_owned()], Duration::from_secs(1))
    );
}

#[tokio::test]
async fn what_a_resume_replayed_leaves_the_queue_and_the_latest_and_their_bytes() {
    let gauge = QueuedBytes::default();
    let (sender, mut outbox) = bounded(
        Bounds {
            conflate: true,
            ..bounds(2, 1000)
        },
        gauge.clone(),
    );
    for (text, symbol) in [("A1", "A"), ("B1", "B"), ("A2", "A"), ("B2", "B")] {
        offer_keyed(&sender, text, key(symbol));
    }
    assert_eq!(
        sender.queued_bytes(),
        8,
        "two queued, two as their keys' latest"
    );
    // What the hub adds for the offers it makes.
    gauge.add(8);
    let forgotten = sender
        .rates()
        .forget_replayed(|result| result.as_str() == "A1" || result.key() == "B");
    assert_eq!(forgotten, 6, "A1, B1 and the latest B2");
    assert_eq!(sender.queued_bytes(), 2);
    assert_eq!(gauge.get(), 2, "the bridge-wide gauge follows");
    let mut batch = Vec::new();
    let taken = outbox.recv_many(&mut batch, 10).await;
    assert_eq!(
        texts(&batch),
        ["A2"],
        "only the latest of A is left: {taken:?}"
    );
}

#[tokio::test]
async fn a_burst_is_one_entry_that_counts_its_results_against_the_bounds() {
    let (sender, mut outbox) = bounded_for_test(bounds(4, 1000));
    let results = |texts: &[&str]| {
        let results = texts
            .iter()
            .map(|text| SharedResult::detached((*text).into(), &text[..1], None, None));
        Arc::new(Burst::new(results.collect()))
    };
    let mut offered = Offered::default();
    let first = sender.offer_burst(&results(&["A1", "B1", "C1"]), &mut offered);
    assert_eq!(first.map(|offers| offers.queued), Some(3));
    assert_eq!(offered.bytes, 6);
    assert!(
        sender
            .offer_burst(&results(&["A2", "B2"]), &mut offered)
            .is_none(),
        "5 results would pass the bound of 4: the caller offers them one by one"
    );
    assert_eq!(offer_keyed(&sender, "D1", key("D")), Offer::Queued);
    assert_eq!(offer_keyed(&sender, "D2", key("D")), Offer::Full);
    // A resume replayed B1: the burst is queued result by result, less it.
    sender
        .rates()
        .forget_replayed(|result| result.as_str() == "B1");
    let mut batch = Vec::new();
    let taken = outbox.recv_many(&mut batch, 10).await;
    assert_eq!(taken.frames, 3);
    assert_eq!(texts(&batch), ["A1", "C1", "D1"]);
}
