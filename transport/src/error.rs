//! The one error type of the crate. Each variant says what the caller should do next.

use flotilla_proto::NodeId;

/// Why the transport did not take a batch (or could not read one off the wire).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// Back-pressure: the queue to `to` already holds `queued_bytes` bytes, over its byte
    /// budget. Back off (or drop the batch: raft retransmits) and send again later.
    #[error("queue to {to} is full ({queued_bytes} bytes queued); back off and retry later")]
    Full {
        /// The destination whose queue is full.
        to: NodeId,
        /// Bytes queued to `to` and not yet delivered when the batch was refused.
        queued_bytes: usize,
    },

    /// No address is known for this node: it is not (or no longer) a member of the cluster as
    /// far as this transport knows. Fix the membership or the address book, do not retry.
    #[error("unknown node {0}: no address is known for it")]
    UnknownNode(NodeId),

    /// The node is known but cannot be reached now (stopped, or the connection is down).
    /// Report it to raft (`report_unreachable`) and retry on a later round.
    #[error("node {0} is unreachable")]
    Unreachable(NodeId),

    /// This transport was shut down; nothing more will be sent or delivered.
    #[error("transport is shut down")]
    Closed,

    /// The batch is larger than one frame may be and can never be sent as is: split it
    /// (for example, send fewer entries per append, or stream the snapshot in chunks).
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// Encoded size of the refused batch, in bytes.
        size: usize,
        /// The largest frame the transport accepts, in bytes.
        limit: usize,
    },

    /// A frame from the network could not be decoded; the peer is buggy or incompatible.
    /// The frame is dropped; the connection may be reset.
    #[error("malformed frame: {0}")]
    Decode(String),

    /// A transport config value is wrong (from `validate()`); fix the named field.
    #[error("invalid transport config: `{field}` {problem}")]
    InvalidConfig {
        /// The field at fault.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },

    /// The address given for a node is not `host:port`. Fix the address book.
    #[error("invalid address {addr:?} for node {node}: expected host:port")]
    InvalidAddress {
        /// The node the address was meant for.
        node: NodeId,
        /// The address as given.
        addr: String,
    },

    /// The listening socket could not be opened (address in use, no permission).
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The operating system's answer.
        reason: String,
    },

    /// The TLS material (CA, certificate, key) could not be loaded. Fix the PEM files.
    #[error("bad TLS material: {0}")]
    Tls(String),
}

impl TransportError {
    /// Whether sending the same batch again later may succeed (`Full`, `Unreachable`).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Full { .. } | Self::Unreachable(_))
    }
}
