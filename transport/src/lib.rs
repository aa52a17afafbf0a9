//! Flotilla's node-to-node transport.
//!
//! The runtime talks to the network only through the [`Transport`] trait: it hands the
//! transport one [`NodeBatch`] per destination node per worker round, and receives what other
//! nodes send through a [`BatchHandler`]. Because nothing else crosses this boundary, every
//! runtime test can run on [`MemNetwork`], an in-memory network with fault injection
//! ([`Filter`]s), instead of real sockets.
//!
//! # Layout
//!
//! - `lib.rs`: the two traits the runtime sees and the re-exports.
//! - `error.rs`: [`TransportError`], the one error type of the crate.
//! - `metric.rs`: the names of the metrics every implementation records.
//! - `mem/`: [`MemNetwork`] and its per-node handle [`MemTransport`]; `delivery.rs` is the
//!   per-node delivery thread, `stats.rs` the counters tests wait on.
//! - `filter/`: the [`Filter`] trait and the built-in filters (drop, delay, duplicate,
//!   reorder, partition, isolate, predicate, hold).
//! - `grpc/`: [`GrpcTransport`], the production transport: tonic, one long-lived
//!   bidirectional stream per node pair on the `RaftTransport.Batches` RPC, merging what is
//!   queued into one frame, reconnecting with backoff, optional mutual TLS ([`TlsConfig`]).
//!   Raft snapshots go apart, streamed in chunks on the `RaftTransport.Snapshot` RPC.
//!   The runtime does not need to know which implementation it runs on.
//! - `budget.rs`: the per-destination byte accounting behind [`TransportError::Full`], and
//!   `wait.rs`: the change signal behind `wait_for_stats`; both shared by `mem/` and `grpc/`.
//!
//! # Contract shared by every implementation
//!
//! - [`Transport::send`] never blocks and never calls a [`BatchHandler`] on the caller's
//!   thread: the runtime calls it from worker threads that hold locks.
//! - Delivery is at most once per send (filters may duplicate on purpose) and in order per
//!   node pair, separately for raft messages and for heartbeats; batches queued for the same
//!   destination may be merged into one. Raft tolerates loss, so a full queue rejects
//!   ([`TransportError::Full`]) instead of blocking.
//! - The transport sets `from_node` and `to_node` of every batch it delivers.
//! - Snapshots (envelopes with `RaftMessage::snapshot` set) are delivered whole or not at
//!   all. A transport may send them apart from the rest of their batch, and so out of order
//!   with it. If it says so ([`Transport::reports_snapshots`]), it reports the outcome of each
//!   one `send` accepted exactly once ([`BatchHandler::on_snapshot_status`]); otherwise the
//!   caller treats an accepted snapshot as sent.
//!
//! # Example
//!
//! Two nodes on the in-memory network, with node 2 cut off from node 1 for a while:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use flotilla_transport::{
//!     FilterKind, MemNetwork, NodeBatch, NodeId, PartitionFilter, RaftMessage, Transport,
//! };
//!
//! let net = MemNetwork::new();
//! let received = Arc::new(std::sync::Mutex::new(Vec::new()));
//! let inbox = received.clone();
//! let _n2 = net.register(NodeId(2), Arc::new(move |b: NodeBatch| inbox.lock().unwrap().push(b)));
//! let n1 = net.register(NodeId(1), Arc::new(|_: NodeBatch| {}));
//!
//! let batch = || NodeBatch {
//!     messages: vec![RaftMessage { range_id: 7, ..Default::default() }],
//!     ..Default::default()
//! };
//! let cut = net.add_filter(Box::new(PartitionFilter::new([NodeId(1)], [NodeId(2)])));
//! assert!(!n1.is_reachable(NodeId(2)));
//! n1.send(NodeId(2), batch()).unwrap(); // accepted, then dropped by the partition
//! assert!(net.wait_for_stats(Duration::from_secs(10), |s| {
//!     s.dropped_by(FilterKind::Partition) == 1
//! }));
//!
//! net.remove_filter(cut);
//! n1.send(NodeId(2), batch()).unwrap();
//! assert!(net.wait_for_stats(Duration::from_secs(10), |s| s.delivered_messages == 1));
//! assert_eq!(received.lock().unwrap()[0].from_node, 1);
//! ```

mod budget;
mod error;
mod filter;
mod grpc;
mod mem;
mod metric;
mod wait;

use std::sync::Arc;
use std::time::Instant;

pub use error::TransportError;
pub use filter::{
    Action, DelayFilter, DropFilter, DuplicateFilter, Filter, FilterId, FilterKind, HoldFilter,
    IsolateFilter, Packet, PartitionFilter, Payload, PredicateFilter, ReorderFilter, Scoped,
};
pub use flotilla_proto::transport::{Heartbeat, NodeBatch, NodeStats, RaftMessage};
pub use flotilla_proto::{NodeId, RangeId, ReplicaId};
pub use grpc::{GrpcConfig, GrpcListener, GrpcStats, GrpcTransport, TlsConfig};
pub use mem::{MemConfig, MemNetwork, MemTransport, NetStats};

/// Receives what arrives for this node. Called from transport threads; must not block long.
///
/// Calls for one node come from one thread at a time, so batches from one sender arrive in
/// the order they were sent (see the crate docs for the exact guarantee). A handler should
/// hand the batch to the runtime's mailboxes and return: while it runs, nothing else is
/// delivered to this node.
///
/// Any `Fn(NodeBatch) + Send + Sync + 'static` closure is a handler, which is what tests use.
pub trait BatchHandler: Send + Sync + 'static {
    /// Handles one batch sent to this node by `batch.from_node`.
    fn on_batch(&self, batch: NodeBatch);

    /// The outcome of a snapshot this node sent, from a transport whose
    /// [`Transport::reports_snapshots`] is true: exactly one call per snapshot envelope of a
    /// batch that [`Transport::send`] accepted. Called like [`BatchHandler::on_batch`] (same
    /// thread rules); the default ignores it, which is right for handlers of transports that
    /// do not report.
    fn on_snapshot_status(&self, report: SnapshotReport) {
        let _ = report;
    }
}

/// How a snapshot transfer ended, for raft's `report_snapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotReport {
    /// The destination node.
    pub to: NodeId,
    /// The group the snapshot is of.
    pub range: RangeId,
    /// The replica it was for (raft's `to`).
    pub to_replica: ReplicaId,
    /// True once the destination acknowledged the whole snapshot and handed it to its
    /// handler; false for every failure (refused, broken, timed out, never started).
    pub ok: bool,
}

impl<F> BatchHandler for F
where
    F: Fn(NodeBatch) + Send + Sync + 'static,
{
    fn on_batch(&self, batch: NodeBatch) {
        self(batch)
    }
}

/// How the runtime sends to other nodes. One value per node; cheap to call from many threads.
pub trait Transport: Send + Sync + 'static {
    /// Queues `batch` (all messages of one worker round for node `to`) for delivery; never blocks.
    /// The transport may merge several queued batches for the same destination into one.
    ///
    /// # Errors
    ///
    /// The batch is discarded on every error; raft retransmits what matters.
    /// - [`TransportError::Full`]: the queue to `to` is over its byte budget; back off.
    /// - [`TransportError::Unreachable`]: `to` is known but down; report it to raft.
    /// - [`TransportError::UnknownNode`]: no address is known for `to`.
    /// - [`TransportError::FrameTooLarge`]: the batch can never be sent; split it.
    /// - [`TransportError::Closed`]: [`Transport::shutdown`] was called.
    fn send(&self, to: NodeId, batch: NodeBatch) -> Result<(), TransportError>;

    /// Whether `to` is currently believed reachable (the runtime reports unreachable peers to raft).
    fn is_reachable(&self, to: NodeId) -> bool;

    /// Stops delivery threads; further sends return Closed.
    fn shutdown(&self);

    /// Node-level liveness, the hook for hibernation: when `from` was last heard from, by any
    /// means (a batch, or a transport-level ping that the gRPC stream will send even when no
    /// group is active). Hibernated groups stop heartbeating, so they will ask this instead
    /// of raft whether their leader's node is alive.
    ///
    /// The runtime's failure detector counts the ticks during which this answer does not
    /// change, so an implementation must move it forward regularly while `from` is alive:
    /// the gRPC transport with its pings on idle streams, [`MemTransport`] with every question
    /// while `from` is registered and not cut off by a filter.
    ///
    /// `None` means "this transport does not track liveness" (the default): groups then never
    /// hibernate.
    fn last_heard_from(&self, from: NodeId) -> Option<Instant> {
        let _ = from;
        None
    }

    /// Whether `node`'s process is known to be gone: the transport's last attempt to connect
    /// to it was refused (nothing listens at its address) and no attempt has started since.
    /// Never true for a node that is merely slow, paused or cut off (those time out): the
    /// runtime's failure detector then needs only the silence that lease safety needs
    /// (`election_tick`), not the longer window that covers load jitter. False by default.
    fn connection_refused(&self, node: NodeId) -> bool {
        let _ = node;
        false
    }

    /// Whether this transport reports the outcome of the snapshots it sends (envelopes with
    /// `RaftMessage::snapshot` set) through [`BatchHandler::on_snapshot_status`], once each
    /// transfer has ended. When false (the default, and [`MemTransport`]), a snapshot counts
    /// as sent when `send` accepts its batch, and the caller reports that to raft itself.
    /// When true and `send` returns `Ok`, the caller must wait for the report; when `send`
    /// returns an error, no report follows and the caller reports the failure itself.
    fn reports_snapshots(&self) -> bool {
        false
    }
}

impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn send(&self, to: NodeId, batch: NodeBatch) -> Result<(), TransportError> {
        (**self).send(to, batch)
    }

    fn is_reachable(&self, to: NodeId) -> bool {
        (**self).is_reachable(to)
    }

    fn shutdown(&self) {
        (**self).shutdown()
    }

    fn last_heard_from(&self, from: NodeId) -> Option<Instant> {
        (**self).last_heard_from(from)
    }

    fn connection_refused(&self, node: NodeId) -> bool {
        (**self).connection_refused(node)
    }

    fn reports_snapshots(&self) -> bool {
        (**self).reports_snapshots()
    }
}
