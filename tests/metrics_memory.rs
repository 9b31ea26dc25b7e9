//! The metrics' memory is bounded whether or not anything scrapes
//! `/metrics`: a bridge whose operator never set up Prometheus must not keep
//! every latency sample it ever recorded.
//!
//! A test binary of its own, because it counts every allocation of the
//! process through a global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::AtomicIsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use quotebridge::metrics::{Metrics, UPKEEP_EVERY};

/// The system allocator, counting the bytes allocated and not yet freed.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counter is only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn latency_samples_are_folded_into_buckets_without_a_scrape() {
    let metrics = Metrics::new();
    let record = |count: u64| {
        for i in 0..count {
            metrics.record_publish_latency(Duration::from_micros(100 + i % 5_000));
        }
    };
    // Warm up: the histogram's first blocks and the buckets exist.
    record(10 * UPKEEP_EVERY);
    let before = LIVE_BYTES.load(Relaxed);
    // A quarter of an hour at 1,000 quotes a second, never scraped: kept as
    // samples, this would be 7.2 MB.
    record(900_000);
    let grown = LIVE_BYTES.load(Relaxed) - before;
    // What may wait between two folds, and as much again for blocks the
    // recorder frees a little later (they are reclaimed epoch by epoch).
    let bound = 2 * 8 * UPKEEP_EVERY as isize + 64 * 1024;
    assert!(
        grown < bound,
        "900,000 unscraped samples kept {grown} bytes (bound {bound})"
    );
    // Nothing was lost by folding: every sample is counted.
    let text = metrics.render(&Default::default(), &Default::default());
    assert!(
        text.contains(&format!(
            "quotebridge_quote_to_publish_seconds_count {}",
            10 * UPKEEP_EVERY + 900_000
        )),
        "{text}"
    );
}
