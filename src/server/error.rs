//! The crate's one error type: why a node could not be configured, started or served. The
//! config mistakes come first (one variant each, from [`ServerConfig::validate`]); then the
//! failures of the layers below, each kept whole as the source.
//!
//! [`ServerConfig::validate`]: super::ServerConfig::validate

use std::net::SocketAddr;

use flotilla_proto::NodeId;
use flotilla_runtime::ConfigError;
use flotilla_store::StoreError;
use flotilla_transport::TransportError;

/// Why a node could not be configured, started or served, and so what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A NodeGroup setting (`ServerConfig::node`) is wrong: fix the named field.
    #[error("invalid node group config: {0}")]
    NodeConfig(#[from] ConfigError),

    /// `data_dir` is empty: say where the node's engine lives.
    #[error("data_dir must be set")]
    NoDataDir,

    /// Two of the listen addresses (raft, client, metrics, redis) name the same socket: give
    /// each its own port.
    #[error("two listeners (raft, client, metrics, redis) cannot both use {0}")]
    SameAddress(SocketAddr),

    /// A peer has node id 0, which raft reserves for "nobody": fix the peer list.
    #[error("a peer has node id 0")]
    ZeroPeerId,

    /// A peer's address is not `host:port`: fix the peer list.
    #[error("address {addr:?} of peer {node} is not host:port")]
    PeerAddress {
        /// The peer.
        node: NodeId,
        /// Its address as given.
        addr: String,
    },

    /// `bootstrap_ranges` is set but this node is not among the peers, so it would hold no
    /// replica of the ranges it creates: list every node of the cluster, this one included.
    #[error("bootstrap_ranges needs this node ({node}) in the peer list")]
    BootstrapWithoutThisNode {
        /// This node.
        node: NodeId,
    },

    /// `bootstrap_ranges` exceeds what a layout can number ([`crate::layout::MAX_RANGES`]).
    #[error("bootstrap_ranges ({count}) exceeds the maximum of {max}")]
    TooManyBootstrapRanges {
        /// The configured count.
        count: usize,
        /// The largest count allowed.
        max: usize,
    },

    /// `bootstrap_replicas` names more nodes than `peers` has: lower it or add peers.
    #[error("bootstrap_replicas ({count}) exceeds the {peers} peers")]
    BootstrapReplicas {
        /// The configured count.
        count: usize,
        /// The peers known.
        peers: usize,
    },

    /// A scheduler setting is wrong: fix `[schedule].<field>` (or its flag).
    #[error("schedule.{field} {problem}")]
    Schedule {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },

    /// The client API's TLS material is unusable (not PEM, or refused by the TLS library):
    /// fix the certificate or key files.
    #[error("client TLS: {0}")]
    ClientTls(String),

    /// The metrics endpoint could not start (its address is in use, or a metrics recorder
    /// was already installed in this process).
    #[error("metrics endpoint: {0}")]
    Metrics(String),

    /// The store refused its config or could not open the data directory (held by another
    /// process, damaged, no permission): see the store error.
    #[error("store: {0}")]
    Store(#[from] StoreError),

    /// The transport refused its config, its TLS material, its address or a peer, or could
    /// not bind the raft address: see the transport error.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),

    /// The client API socket could not be opened (address in use, no permission).
    #[error("cannot listen for clients on {addr}: {source}")]
    ClientBind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's answer.
        #[source]
        source: std::io::Error,
    },

    /// The client API server stopped with an error while serving. The node was shut down.
    #[error("client API server failed: {0}")]
    ClientServe(#[source] tonic::transport::Error),

    /// `join` is not `host:port`: give the client address of a running node.
    #[error("join address {0:?} is not host:port")]
    JoinAddress(String),

    /// `join` and `bootstrap_ranges` together: a joining node never creates ranges (the
    /// cluster it joins has them). Drop one.
    #[error("join and bootstrap_ranges exclude each other: a joining node creates no range")]
    JoinAndBootstrap,

    /// A joining node must listen on a fixed raft port: the other nodes record its address
    /// before it runs, and find it there after restarts.
    #[error("a joining node needs a fixed raft port, not {0}")]
    JoinWithoutRaftPort(SocketAddr),

    /// The join failed: the node at the join address could not be reached, or refused (no
    /// replica of the system range there: use a bootstrap node's client address; the node
    /// was removed; the system range has no leader yet: retry).
    #[error("cannot join through {addr}: {reason}")]
    Join {
        /// The join address.
        addr: String,
        /// Why, as the other node or the network said.
        reason: String,
    },

    /// The NodeGroup could not start, or could not bootstrap its ranges: see the runtime
    /// error.
    #[error("node group: {0}")]
    Runtime(#[from] flotilla_runtime::Error),
}
