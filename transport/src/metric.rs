//! Metric names shared by every transport implementation, and small helpers to record them.
//!
//! Names follow `flotilla_transport_<thing>_{total,bytes}`. Labels are only ever low
//! cardinality (a reason, a filter kind); never a group id, and not a node id either, so that
//! the in-memory network's many nodes in one process do not multiply series.

/// Counter: batches accepted by `send`.
pub(crate) const SENT_BATCHES_TOTAL: &str = "flotilla_transport_sent_batches_total";
/// Counter: encoded bytes accepted by `send`.
pub(crate) const SENT_BYTES: &str = "flotilla_transport_sent_bytes";
/// Counter, label `reason`: batches refused by `send` (see [`Rejected`]).
pub(crate) const REJECTED_BATCHES_TOTAL: &str = "flotilla_transport_rejected_batches_total";
/// Counter: batches handed to a `BatchHandler` (after merging).
pub(crate) const DELIVERED_BATCHES_TOTAL: &str = "flotilla_transport_delivered_batches_total";
/// Counter: raft messages handed to a `BatchHandler`.
pub(crate) const DELIVERED_MESSAGES_TOTAL: &str = "flotilla_transport_delivered_messages_total";
/// Counter: coalesced heartbeats handed to a `BatchHandler`.
pub(crate) const DELIVERED_HEARTBEATS_TOTAL: &str = "flotilla_transport_delivered_heartbeats_total";
/// Counter, label `reason` (a filter kind or `unreachable`): messages and heartbeats dropped
/// after `send` accepted them.
pub(crate) const DROPPED_MESSAGES_TOTAL: &str = "flotilla_transport_dropped_messages_total";
/// Gauge: bytes accepted by `send` and not yet delivered or dropped, over all destinations.
pub(crate) const QUEUED_BYTES: &str = "flotilla_transport_queued_bytes";

/// Why `send` refused a batch; the `reason` label of [`REJECTED_BATCHES_TOTAL`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rejected {
    Full,
    Unreachable,
    UnknownNode,
    Closed,
    TooLarge,
}

impl Rejected {
    fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Unreachable => "unreachable",
            Self::UnknownNode => "unknown_node",
            Self::Closed => "closed",
            Self::TooLarge => "too_large",
        }
    }
}

pub(crate) fn sent(bytes: usize) {
    metrics::counter!(SENT_BATCHES_TOTAL).increment(1);
    metrics::counter!(SENT_BYTES).increment(bytes as u64);
}

pub(crate) fn rejected(why: Rejected) {
    metrics::counter!(REJECTED_BATCHES_TOTAL, "reason" => why.label()).increment(1);
}

pub(crate) fn delivered(messages: usize, heartbeats: usize) {
    metrics::counter!(DELIVERED_BATCHES_TOTAL).increment(1);
    metrics::counter!(DELIVERED_MESSAGES_TOTAL).increment(messages as u64);
    metrics::counter!(DELIVERED_HEARTBEATS_TOTAL).increment(heartbeats as u64);
}

pub(crate) fn dropped(reason: &'static str, count: u64) {
    metrics::counter!(DROPPED_MESSAGES_TOTAL, "reason" => reason).increment(count);
}

pub(crate) fn queued_bytes_changed(delta: isize) {
    let g = metrics::gauge!(QUEUED_BYTES);
    if delta >= 0 {
        g.increment(delta as f64);
    } else {
        g.decrement(delta.unsigned_abs() as f64);
    }
}
