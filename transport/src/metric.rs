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

// gRPC only. A "frame" is one NodeBatch on a Batches stream: what the sender merged from its
// queue, or a ping. frames_sent / frame_messages is the batching factor under load.

/// Counter: data frames written to Batches streams (pings not included).
pub(crate) const GRPC_FRAMES_SENT_TOTAL: &str = "flotilla_transport_grpc_frames_sent_total";
/// Counter: encoded bytes of those frames.
pub(crate) const GRPC_SENT_BYTES: &str = "flotilla_transport_grpc_sent_bytes";
/// Counter: raft messages and heartbeats carried by those frames.
pub(crate) const GRPC_FRAME_MESSAGES_TOTAL: &str = "flotilla_transport_grpc_frame_messages_total";
/// Counter: pings written (empty frames sent when a stream is idle).
pub(crate) const GRPC_PINGS_SENT_TOTAL: &str = "flotilla_transport_grpc_pings_sent_total";
/// Counter: frames read off Batches streams (pings included).
pub(crate) const GRPC_FRAMES_RECEIVED_TOTAL: &str = "flotilla_transport_grpc_frames_received_total";
/// Counter: encoded bytes of those frames.
pub(crate) const GRPC_RECEIVED_BYTES: &str = "flotilla_transport_grpc_received_bytes";
/// Counter, label `reason` (see [`Refused`]): frames from the network refused by the receiver.
pub(crate) const GRPC_REFUSED_FRAMES_TOTAL: &str = "flotilla_transport_grpc_refused_frames_total";
/// Counter: streams opened and acknowledged by their destination.
pub(crate) const GRPC_CONNECTS_TOTAL: &str = "flotilla_transport_grpc_connects_total";
/// Counter: attempts to open a stream that failed (refused, timed out, TLS, wrong node).
pub(crate) const GRPC_CONNECT_FAILURES_TOTAL: &str =
    "flotilla_transport_grpc_connect_failures_total";
/// Counter: established streams that broke.
pub(crate) const GRPC_DISCONNECTS_TOTAL: &str = "flotilla_transport_grpc_disconnects_total";

/// Why the receiving side refused a frame; the `reason` label of [`GRPC_REFUSED_FRAMES_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Over the receiver's `max_frame_bytes`: the stream is closed (the sender reconnects).
    TooLarge,
    /// Addressed to another node (the sender's address book is wrong).
    WrongNode,
    /// From a node not in the receiver's peer map.
    UnknownPeer,
    /// The stream failed for another reason (malformed frame, reset).
    StreamError,
}

impl Refused {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::WrongNode => "wrong_node",
            Self::UnknownPeer => "unknown_peer",
            Self::StreamError => "stream_error",
        }
    }
}

pub(crate) fn grpc_frame_sent(bytes: usize, items: usize) {
    metrics::counter!(GRPC_FRAMES_SENT_TOTAL).increment(1);
    metrics::counter!(GRPC_SENT_BYTES).increment(bytes as u64);
    metrics::counter!(GRPC_FRAME_MESSAGES_TOTAL).increment(items as u64);
}

pub(crate) fn grpc_ping_sent() {
    metrics::counter!(GRPC_PINGS_SENT_TOTAL).increment(1);
}

pub(crate) fn grpc_frame_received(bytes: usize) {
    metrics::counter!(GRPC_FRAMES_RECEIVED_TOTAL).increment(1);
    metrics::counter!(GRPC_RECEIVED_BYTES).increment(bytes as u64);
}

pub(crate) fn grpc_refused(why: Refused) {
    metrics::counter!(GRPC_REFUSED_FRAMES_TOTAL, "reason" => why.label()).increment(1);
}

pub(crate) fn grpc_connected() {
    metrics::counter!(GRPC_CONNECTS_TOTAL).increment(1);
}

pub(crate) fn grpc_connect_failed() {
    metrics::counter!(GRPC_CONNECT_FAILURES_TOTAL).increment(1);
}

pub(crate) fn grpc_disconnected() {
    metrics::counter!(GRPC_DISCONNECTS_TOTAL).increment(1);
}

// gRPC snapshot streaming: one Snapshot call per transfer, in chunks.

/// Counter, label `outcome` (`ok` or `failed`): snapshot transfers this node sent, by how
/// they were reported.
pub(crate) const GRPC_SNAPSHOTS_SENT_TOTAL: &str = "flotilla_transport_grpc_snapshots_sent_total";
/// Counter: chunk frames written to Snapshot streams.
pub(crate) const GRPC_SNAPSHOT_CHUNKS_SENT_TOTAL: &str =
    "flotilla_transport_grpc_snapshot_chunks_sent_total";
/// Counter: snapshot bytes in those frames.
pub(crate) const GRPC_SNAPSHOT_SENT_BYTES: &str = "flotilla_transport_grpc_snapshot_sent_bytes";
/// Counter: whole snapshots received and handed to the handler.
pub(crate) const GRPC_SNAPSHOTS_RECEIVED_TOTAL: &str =
    "flotilla_transport_grpc_snapshots_received_total";
/// Counter: chunk frames read off Snapshot streams.
pub(crate) const GRPC_SNAPSHOT_CHUNKS_RECEIVED_TOTAL: &str =
    "flotilla_transport_grpc_snapshot_chunks_received_total";
/// Counter: snapshot bytes in those frames.
pub(crate) const GRPC_SNAPSHOT_RECEIVED_BYTES: &str =
    "flotilla_transport_grpc_snapshot_received_bytes";
/// Counter, label `reason` (see [`SnapshotRefused`]): snapshots refused by the receiver.
pub(crate) const GRPC_REFUSED_SNAPSHOTS_TOTAL: &str =
    "flotilla_transport_grpc_refused_snapshots_total";

/// Why the receiving side refused a snapshot; the `reason` label of
/// [`GRPC_REFUSED_SNAPSHOTS_TOTAL`]. A refused snapshot is discarded whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SnapshotRefused {
    /// Announced larger than the receiver's `max_snapshot_bytes`.
    TooLarge,
    /// The stream ended early, broke, timed out, or overran the announced length.
    Incomplete,
    /// No start frame, a second one, or an envelope that does not decode or match it.
    Malformed,
    /// `max_concurrent_snapshots` transfers were already being received.
    Busy,
    /// Addressed to another node, or from a node not in the peer map.
    Misaddressed,
}

impl SnapshotRefused {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Incomplete => "incomplete",
            Self::Malformed => "malformed",
            Self::Busy => "busy",
            Self::Misaddressed => "misaddressed",
        }
    }
}

pub(crate) fn grpc_snapshot_sent(ok: bool) {
    let outcome = if ok { "ok" } else { "failed" };
    metrics::counter!(GRPC_SNAPSHOTS_SENT_TOTAL, "outcome" => outcome).increment(1);
}

pub(crate) fn grpc_snapshot_chunk_sent(bytes: usize) {
    metrics::counter!(GRPC_SNAPSHOT_CHUNKS_SENT_TOTAL).increment(1);
    metrics::counter!(GRPC_SNAPSHOT_SENT_BYTES).increment(bytes as u64);
}

pub(crate) fn grpc_snapshot_received() {
    metrics::counter!(GRPC_SNAPSHOTS_RECEIVED_TOTAL).increment(1);
}

pub(crate) fn grpc_snapshot_chunk_received(bytes: usize) {
    metrics::counter!(GRPC_SNAPSHOT_CHUNKS_RECEIVED_TOTAL).increment(1);
    metrics::counter!(GRPC_SNAPSHOT_RECEIVED_BYTES).increment(bytes as u64);
}

pub(crate) fn grpc_snapshot_refused(why: SnapshotRefused) {
    metrics::counter!(GRPC_REFUSED_SNAPSHOTS_TOTAL, "reason" => why.label()).increment(1);
}
