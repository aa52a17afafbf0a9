//! Byte accounting behind [`TransportError::Full`](crate::TransportError::Full).
//!
//! Every batch accepted by `send` holds a [`Charge`] against its node pair's queue until it is
//! delivered or dropped. Releasing on `Drop` keeps the count right on every path a packet can
//! die on (a filter, a stopped destination, a channel torn down mid-flight) without each path
//! having to remember it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::metric;

/// Bytes queued from one node to another and not yet delivered or dropped.
pub(crate) type QueueBytes = Arc<AtomicUsize>;

/// Bytes held against one pair's queue; released when dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    queue: QueueBytes,
    bytes: usize,
}

impl Charge {
    /// Reserves `bytes` on `queue` unless that would take a non-empty queue over `budget`.
    /// An empty queue always accepts, so that one batch larger than the budget (but within
    /// the frame limit) can still be sent. On refusal returns the bytes already queued.
    pub(crate) fn reserve(queue: &QueueBytes, bytes: usize, budget: usize) -> Result<Self, usize> {
        // Add first and undo on refusal: two senders racing on one check-then-add could both
        // pass the check.
        let before = queue.fetch_add(bytes, Ordering::AcqRel);
        if before > 0 && before.saturating_add(bytes) > budget {
            queue.fetch_sub(bytes, Ordering::AcqRel);
            return Err(before);
        }
        metric::queued_bytes_changed(bytes as isize);
        Ok(Self {
            queue: queue.clone(),
            bytes,
        })
    }

    /// A charge on no pair's queue: for packets a hold filter kept and the test delivers,
    /// which no sender queued at that time.
    pub(crate) fn none() -> Self {
        Self {
            queue: QueueBytes::default(),
            bytes: 0,
        }
    }

    /// Bytes this charge holds.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Charges `bytes` more to the same queue, over budget if need be: used for copies made
    /// by a duplicate filter, which the sender never asked for and cannot be refused.
    pub(crate) fn extra(&self, bytes: usize) -> Self {
        self.queue.fetch_add(bytes, Ordering::AcqRel);
        metric::queued_bytes_changed(bytes as isize);
        Self {
            queue: self.queue.clone(),
            bytes,
        }
    }

    /// Moves up to `bytes` of this charge into a new one (a batch's charge is split among its
    /// packets when they are filtered one by one).
    pub(crate) fn split_off(&mut self, bytes: usize) -> Self {
        let moved = bytes.min(self.bytes);
        self.bytes -= moved;
        Self {
            queue: self.queue.clone(),
            bytes: moved,
        }
    }

    /// Folds `other` into `self` if both charge the same queue; otherwise hands it back.
    /// Keeps the number of live charges per delivered batch small.
    pub(crate) fn absorb(&mut self, mut other: Self) -> Option<Self> {
        if Arc::ptr_eq(&self.queue, &other.queue) {
            self.bytes += std::mem::take(&mut other.bytes);
            None
        } else {
            Some(other)
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.queue.fetch_sub(self.bytes, Ordering::AcqRel);
            metric::queued_bytes_changed(-(self.bytes as isize));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(q: &QueueBytes) -> usize {
        q.load(Ordering::Acquire)
    }

    #[test]
    fn reserve_refuses_only_a_non_empty_queue_over_budget() {
        let q = QueueBytes::default();
        let big = Charge::reserve(&q, 150, 100).expect("an empty queue takes anything");
        assert_eq!(Charge::reserve(&q, 1, 100).unwrap_err(), 150);
        assert_eq!(queued(&q), 150);
        drop(big);
        assert_eq!(queued(&q), 0);
        let a = Charge::reserve(&q, 60, 100).unwrap();
        let b = Charge::reserve(&q, 40, 100).unwrap();
        assert!(Charge::reserve(&q, 1, 100).is_err());
        drop((a, b));
        assert_eq!(queued(&q), 0);
    }

    #[test]
    fn split_extra_and_absorb_keep_the_total() {
        let q = QueueBytes::default();
        let mut whole = Charge::reserve(&q, 100, 1000).unwrap();
        let mut part = whole.split_off(30);
        assert_eq!(queued(&q), 100);
        let copy = part.extra(30);
        assert_eq!(queued(&q), 130);
        assert!(part.absorb(copy).is_none());
        let other_q = QueueBytes::default();
        let other = Charge::reserve(&other_q, 5, 10).unwrap();
        let other = part.absorb(other).expect("different queues never merge");
        drop(whole);
        assert_eq!(queued(&q), 60);
        drop(part);
        assert_eq!(queued(&q), 0);
        drop(other);
        assert_eq!(queued(&other_q), 0);
    }
}
