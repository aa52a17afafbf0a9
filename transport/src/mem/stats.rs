//! Counters of what the in-memory network did, and a way for tests to wait on them.
//!
//! Tests assert on outcomes ("the partition dropped something", "100 messages arrived") by
//! waiting for a counter with a deadline, never by sleeping a guessed amount.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::filter::FilterKind;
use crate::wait::Notifier;

/// A snapshot of the network's counters, since the network was created. Messages and
/// heartbeats are counted one by one; batches as the handler or sender saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Batches accepted by `send`.
    pub sent_batches: u64,
    /// Batches refused with `Full`.
    pub rejected_full: u64,
    /// Batches refused because the destination was stopped or never registered.
    pub rejected_unreachable: u64,
    /// Batches handed to handlers (after merging, so possibly fewer than were sent).
    pub delivered_batches: u64,
    /// Raft messages handed to handlers (duplicates included).
    pub delivered_messages: u64,
    /// Heartbeats handed to handlers (duplicates included).
    pub delivered_heartbeats: u64,
    /// Extra copies made by duplicate filters.
    pub duplicated: u64,
    /// Packets held by a delay filter.
    pub delayed: u64,
    /// Packets held by a reorder filter.
    pub reordered: u64,
    /// Packets kept by a hold filter (until the test delivers them, if ever).
    pub held: u64,
    /// Packets accepted by `send` but dropped because their destination stopped first.
    pub dropped_unreachable: u64,
    dropped: [u64; FilterKind::ALL.len()],
}

impl NetStats {
    /// Packets dropped by filters of `kind`.
    pub fn dropped_by(&self, kind: FilterKind) -> u64 {
        self.dropped[kind.index()]
    }

    /// Packets dropped by any filter (not counting `dropped_unreachable`).
    pub fn dropped_by_filters(&self) -> u64 {
        self.dropped.iter().sum()
    }

    /// Messages and heartbeats handed to handlers.
    pub fn delivered(&self) -> u64 {
        self.delivered_messages + self.delivered_heartbeats
    }
}

/// The live counters behind [`NetStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) sent_batches: AtomicU64,
    pub(crate) rejected_full: AtomicU64,
    pub(crate) rejected_unreachable: AtomicU64,
    pub(crate) delivered_batches: AtomicU64,
    pub(crate) delivered_messages: AtomicU64,
    pub(crate) delivered_heartbeats: AtomicU64,
    pub(crate) duplicated: AtomicU64,
    pub(crate) delayed: AtomicU64,
    pub(crate) reordered: AtomicU64,
    pub(crate) held: AtomicU64,
    pub(crate) dropped_unreachable: AtomicU64,
    dropped: [AtomicU64; FilterKind::ALL.len()],
    changed: Notifier,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn dropped_by(&self, kind: FilterKind) -> &AtomicU64 {
        &self.dropped[kind.index()]
    }

    pub(crate) fn snapshot(&self) -> NetStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            sent_batches: load(&self.sent_batches),
            rejected_full: load(&self.rejected_full),
            rejected_unreachable: load(&self.rejected_unreachable),
            delivered_batches: load(&self.delivered_batches),
            delivered_messages: load(&self.delivered_messages),
            delivered_heartbeats: load(&self.delivered_heartbeats),
            duplicated: load(&self.duplicated),
            delayed: load(&self.delayed),
            reordered: load(&self.reordered),
            held: load(&self.held),
            dropped_unreachable: load(&self.dropped_unreachable),
            dropped: std::array::from_fn(|i| load(&self.dropped[i])),
        }
    }

    /// Wakes [`Counters::wait_until`] callers; call after a group of updates.
    pub(crate) fn notify(&self) {
        self.changed.notify();
    }

    /// Waits until `cond` holds for a snapshot, or `timeout` passes. Returns whether it held.
    pub(crate) fn wait_until(
        &self,
        timeout: Duration,
        cond: impl FnMut(&NetStats) -> bool,
    ) -> bool {
        self.changed.wait_until(timeout, || self.snapshot(), cond)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn wait_until_sees_updates_from_other_threads() {
        let c = Arc::new(Counters::default());
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            for _ in 0..10 {
                Counters::add(&c2.delivered_messages, 1);
                c2.notify();
            }
        });
        assert!(c.wait_until(Duration::from_secs(10), |s| s.delivered_messages == 10));
        t.join().unwrap();
        assert!(!c.wait_until(Duration::from_millis(1), |s| s.delivered_messages > 10));
    }

    #[test]
    fn dropped_counts_by_kind() {
        let c = Counters::default();
        Counters::add(c.dropped_by(FilterKind::Partition), 3);
        Counters::add(c.dropped_by(FilterKind::Drop), 1);
        let s = c.snapshot();
        assert_eq!(s.dropped_by(FilterKind::Partition), 3);
        assert_eq!(s.dropped_by(FilterKind::Isolate), 0);
        assert_eq!(s.dropped_by_filters(), 4);
    }
}
