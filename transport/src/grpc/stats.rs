//! Counters of one gRPC transport, for tests and benchmarks (the `metrics` crate gets the
//! same events, summed over every transport of the process).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::wait::Notifier;

/// Declares [`GrpcStats`] (the snapshot) and `Counters` (the live atomics) from one list, so
/// the two cannot drift apart.
macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// A snapshot of one transport's counters since it started. "Messages" are raft
        /// messages; heartbeats are counted apart. A frame is one `NodeBatch` on the wire.
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct GrpcStats {
            $($(#[$doc])* pub $name: u64,)*
        }

        /// The live counters behind [`GrpcStats`].
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: AtomicU64,)*
            changed: Notifier,
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> GrpcStats {
                GrpcStats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    // Sending side: what `send` did.
    /// Batches accepted by `send` (before merging).
    sent_batches,
    /// Raft messages in the batches accepted by `send`.
    sent_messages,
    /// Heartbeats in the batches accepted by `send`.
    sent_heartbeats,
    /// Batches refused with `Full`.
    rejected_full,
    /// Batches refused with `Unreachable` (destination in reconnect backoff).
    rejected_unreachable,
    /// Batches refused with `UnknownNode`.
    rejected_unknown_node,
    /// Batches refused with `FrameTooLarge`.
    rejected_too_large,
    /// Raft messages and heartbeats accepted by `send` but discarded unsent because their
    /// stream broke (they were queued when it did).
    dropped_disconnected,

    // Sending side: the wire.
    /// Data frames written to streams: each carries one or more merged batches.
    frames_sent,
    /// Raft messages carried by those frames.
    frame_messages,
    /// Heartbeats carried by those frames.
    frame_heartbeats,
    /// Data frames that carried at least one heartbeat: the "heartbeat RPCs", which should
    /// stay at about one per tick per node pair however many groups there are.
    heartbeat_frames,
    /// Encoded bytes of those frames.
    frame_bytes,
    /// Pings written (empty frames on an idle stream).
    pings_sent,
    /// Acknowledgements read back.
    acks_received,
    /// Streams opened and acknowledged by their destination.
    connects,
    /// Attempts to open a stream that failed.
    connect_failures,
    /// Established streams that broke.
    disconnects,
    /// Streams dropped because the node that answered is not the one the address is for.
    wrong_peer,

    // Receiving side.
    /// Frames read off streams (pings included).
    frames_received,
    /// Pings among them.
    pings_received,
    /// Batches handed to the `BatchHandler`.
    delivered_batches,
    /// Raft messages handed to the `BatchHandler`.
    delivered_messages,
    /// Heartbeats handed to the `BatchHandler`.
    delivered_heartbeats,
    /// Frames over `max_frame_bytes`, refused (their stream is closed).
    refused_too_large,
    /// Frames addressed to another node, dropped.
    refused_wrong_node,
    /// Frames from nodes not in the peer map, dropped (unless `accept_unknown_peers`).
    refused_unknown_peer,
    /// Streams that failed for another reason (malformed frame, reset by the sender).
    stream_errors,

    // Snapshots, sending side. Every snapshot `send` accepted ends in exactly one of
    // `snapshots_sent` and `snapshots_failed`, counted once the handler has the report.
    /// Snapshot transfers the destination acknowledged whole (reported ok).
    snapshots_sent,
    /// Snapshot transfers that failed or never started (reported not ok).
    snapshots_failed,
    /// Chunk frames written to Snapshot streams.
    snapshot_chunks_sent,
    /// Snapshot bytes (of the encoded envelope) in those frames.
    snapshot_bytes_sent,

    // Snapshots, receiving side.
    /// Whole snapshots handed to the `BatchHandler` (also counted as delivered batches).
    snapshots_received,
    /// Chunk frames read off Snapshot streams, of complete and refused transfers alike.
    snapshot_chunks_received,
    /// Snapshot bytes in those frames.
    snapshot_bytes_received,
    /// Snapshots refused for their size: over `max_snapshot_bytes`.
    snapshots_refused_too_large,
    /// Snapshots whose stream ended early, broke or overran its announced length.
    snapshots_refused_incomplete,
    /// Snapshots refused for their content: no start frame, or an envelope that does not
    /// decode or does not match the start frame.
    snapshots_refused_malformed,
    /// Snapshots refused because `max_concurrent_snapshots` transfers were under way.
    snapshots_refused_busy,
    /// Snapshots addressed to another node, or from a node not in the peer map.
    snapshots_refused_misaddressed,
}

impl GrpcStats {
    /// Raft messages and heartbeats per data frame sent: how well batching works (1.0 means
    /// no merging at all). `None` before the first frame.
    pub fn messages_per_frame(&self) -> Option<f64> {
        (self.frames_sent > 0)
            .then(|| (self.frame_messages + self.frame_heartbeats) as f64 / self.frames_sent as f64)
    }

    /// Frames refused or dropped by this node as a receiver, for any reason.
    pub fn refused(&self) -> u64 {
        self.refused_too_large + self.refused_wrong_node + self.refused_unknown_peer
    }

    /// Snapshots refused by this node as a receiver, for any reason: none of them was
    /// delivered, in whole or in part.
    pub fn snapshots_refused(&self) -> u64 {
        self.snapshots_refused_too_large
            + self.snapshots_refused_incomplete
            + self.snapshots_refused_malformed
            + self.snapshots_refused_busy
            + self.snapshots_refused_misaddressed
    }
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
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
        cond: impl FnMut(&GrpcStats) -> bool,
    ) -> bool {
        self.changed.wait_until(timeout, || self.snapshot(), cond)
    }
}
