//! [`Throttle`]: a report that repeats goes to the log at most once per
//! period, with how many were held back in between.
//!
//! A store that cannot write (a full disk) fails every batch and every
//! driver's retry, thousands of times a second; a log line for each would
//! bury the first one and fill the disk the log is on too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets a report through at most once per period; shared by threads.
pub(crate) struct Throttle {
    start: Instant,
    every_ms: u64,
    /// Milliseconds after `start` before which nothing goes through.
    next_ms: AtomicU64,
    /// Reports held back since the last that went through.
    held: AtomicU64,
}

impl Throttle {
    pub(crate) fn new(every: Duration) -> Self {
        Throttle {
            start: Instant::now(),
            every_ms: every.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// Whether a report at `now` goes through: `Some` with how many were
    /// held back since the last one that did (one held back by another
    /// thread at the same moment may be counted here or in the next: each
    /// is counted once), `None` when this one is held back. The first goes through at once; the next one `every`
    /// after the last that went through, not after the first.
    pub(crate) fn ready(&self, now: Instant) -> Option<u64> {
        let now_ms = now.saturating_duration_since(self.start).as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(self.every_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// How often a store's commit that keeps failing is logged again.
const COMMIT_FAILURE_EVERY: Duration = Duration::from_secs(10);

/// The log of a store writer's failed commits (under the `sagatx::store`
/// target, where they were before this type): the first failure at once,
/// then at most one line per [`COMMIT_FAILURE_EVERY`] with the count so
/// far; and that commits succeed again, as often at most. On a full disk
/// every batch fails, thousands a second, and some succeed in between
/// (SQLite's that only overwrite WAL pages in place): a line for each would
/// fill the disk the log is on too.
pub(crate) struct CommitFailures {
    /// Which store, for the log (a path; never a URL with a password).
    store: String,
    failing: Throttle,
    again: Throttle,
    /// Batches failed since the last that succeeded.
    failed: u64,
}

impl CommitFailures {
    pub(crate) fn new(store: String) -> Self {
        CommitFailures {
            store,
            failing: Throttle::new(COMMIT_FAILURE_EVERY),
            again: Throttle::new(COMMIT_FAILURE_EVERY),
            failed: 0,
        }
    }

    pub(crate) fn failed(&mut self, error: &str, now: Instant) {
        self.failed += 1;
        if self.failing.ready(now).is_some() {
            tracing::error!(
                target: "sagatx::store",
                store = %self.store,
                error,
                failed_batches = self.failed,
                "journal commit failed; the writes are refused and their callers told"
            );
        }
    }

    pub(crate) fn succeeded(&mut self, now: Instant) {
        if self.failed > 0 && self.again.ready(now).is_some() {
            tracing::info!(
                target: "sagatx::store",
                store = %self.store,
                failed_batches = self.failed,
                "journal commits succeed again"
            );
        }
        self.failed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_go_through_once_a_period_with_the_count_held_back() {
        let t = Throttle::new(Duration::from_secs(60));
        let at = |s: u64| t.start + Duration::from_secs(s);
        assert_eq!(t.ready(at(0)), Some(0), "the first at once");
        assert_eq!(t.ready(at(0)), None);
        assert_eq!(t.ready(at(30)), None);
        assert_eq!(t.ready(at(59)), None, "not within the period");
        assert_eq!(
            t.ready(at(60)),
            Some(3),
            "a period after, with the 3 held back"
        );
        assert_eq!(
            t.ready(at(61)),
            None,
            "counted from the last report, not the first"
        );
        assert_eq!(t.ready(at(119)), None);
        assert_eq!(t.ready(at(125)), Some(2));
    }

    /// Threads reporting together: one report per period gets through, and
    /// every other is counted as held back.
    #[test]
    fn one_report_a_period_among_threads() {
        let t = std::sync::Arc::new(Throttle::new(Duration::from_secs(3600)));
        // Per thread: the reports that went through, and the held-back
        // counts they carried.
        let (through, carried) = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter_map(|_| t.ready(Instant::now()))
                        .fold((0u64, 0u64), |(n, held), h| (n + 1, held + h))
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .fold((0, 0), |(n, c), (tn, tc)| (n + tn, c + tc));
        assert_eq!(through, 1);
        // Every other report is counted once: held back still, or carried
        // by the one that went through (a report held back while that one
        // went through may land on either side; none is lost or doubled).
        assert_eq!(carried + t.held.load(Ordering::Relaxed), 3999);
    }
}
