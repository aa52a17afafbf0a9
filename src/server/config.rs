//! The settings of one node process: where its data lives, which addresses it serves, who its
//! peers are, and the settings of each layer it wires (NodeGroup, store, transport). One
//! struct, every field documented with its default, and `validate()` naming each mistake
//! before anything is opened or bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use flotilla_proto::NodeId;
use flotilla_runtime::{ConfigError, NodeGroupConfig};
use flotilla_store::StoreConfig;
use flotilla_transport::GrpcConfig;

use super::ServerError;
use crate::layout::MAX_RANGES;
use crate::schedule::ScheduleConfig;

/// How to run one node. Start from [`ServerConfig::new`] (or `Default`, which has no node id
/// and no data directory and so does not validate) and change what you need.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The NodeGroup's settings, this node's id (`node.node_id`) among them. Default
    /// `NodeGroupConfig::default()`, whose node id 0 is refused: set it.
    pub node: NodeGroupConfig,
    /// The RocksDB engine's settings. Default `StoreConfig::default()`.
    pub store: StoreConfig,
    /// The gRPC transport's settings (frame and queue budgets, reconnects, TLS). Default
    /// `GrpcConfig::default()`.
    pub grpc: GrpcConfig,
    /// Directory of the node's engine, created if missing. A directory that holds a store
    /// resumes from it. No default: empty is refused.
    pub data_dir: PathBuf,
    /// Where the raft transport listens (what peers send to). Port 0 picks a free port, read
    /// it back with `ServerBuilder::raft_addr`. Default `127.0.0.1:0`.
    pub raft_addr: SocketAddr,
    /// Where the client APIs (`flotilla.kv.Kv`, `flotilla.admin.Admin`) listen. Port 0 picks
    /// a free port. Default `127.0.0.1:0`.
    pub client_addr: SocketAddr,
    /// Where the Redis protocol (RESP2/RESP3, see docs/DATABASE.md) listens, if anywhere.
    /// Port 0 picks a free port, read it back with `Server::redis_addr`. Default `None`: no
    /// Redis listener.
    pub redis_addr: Option<SocketAddr>,
    /// The raft address (`host:port`) of each node of the cluster. An entry for this node is
    /// allowed (and needed to bootstrap); the transport skips it. Default empty; peers can
    /// also be added after binding (`ServerBuilder::set_peer`).
    pub peers: BTreeMap<NodeId, String>,
    /// On a store that holds no range yet, create this many ranges that together cover the
    /// key space ([`crate::layout::range_layout`]), each replicated on every node of `peers`,
    /// and start the first election of each on one of them in turn so that leaders start
    /// balanced. Every node of a new cluster must be given the same count and the same peer
    /// ids. A node whose store holds ranges ignores it. Default 0: create none.
    pub bootstrap_ranges: usize,
    /// Where the HTTP endpoint serves `/metrics` (Prometheus text format) and `/health`.
    /// Default `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// TLS on the client APIs (KV and admin). Default `None`: plaintext.
    pub client_tls: Option<ClientTls>,
    /// The client address (`host:port`) of a running node of the cluster to join through
    /// ([`crate::server::join`]): a node whose store has no identity yet asks it for a node
    /// id (its node id setting may then be 0) and the registry's addresses; a node that
    /// joined before keeps its id. Needs a fixed raft port and no `bootstrap_ranges`.
    /// Default `None`: the node's id and peers come from this config alone.
    pub join: Option<String>,
    /// How many nodes of `peers` (the lowest ids) the bootstrapped ranges are replicated on;
    /// the others start empty and receive replicas from the scheduler. Default 0: every
    /// node of `peers`.
    pub bootstrap_replicas: usize,
    /// The scheduler's settings. Default `ScheduleConfig::default()` (on).
    pub schedule: ScheduleConfig,
}

/// TLS on the client address: the node's certificate, and the CA whose certificates clients
/// must present (mutual TLS) unless `client_ca_pem` is `None`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM of the certificate chain the node presents to clients.
    pub cert_pem: String,
    /// PEM of its private key.
    pub key_pem: String,
    /// PEM of the CA(s) that sign client certificates. `Some`: a client without a
    /// certificate from it is refused at the handshake. `None`: any client may connect (it
    /// only verifies the node). Default in the config file: the cluster's CA.
    pub client_ca_pem: Option<String>,
}

/// Never prints the private key.
impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .field(
                "client_ca_pem",
                &self.client_ca_pem.as_ref().map(|p| p.len()),
            )
            .finish()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        ServerConfig {
            node: NodeGroupConfig::default(),
            store: StoreConfig::default(),
            grpc: GrpcConfig::default(),
            data_dir: PathBuf::new(),
            raft_addr: any_port,
            client_addr: any_port,
            redis_addr: None,
            peers: BTreeMap::new(),
            bootstrap_ranges: 0,
            metrics_addr: None,
            client_tls: None,
            join: None,
            bootstrap_replicas: 0,
            schedule: ScheduleConfig::default(),
        }
    }
}

impl ServerConfig {
    /// Node `node` with its engine in `data_dir`, every other setting at its default.
    pub fn new(node: NodeId, data_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            node: NodeGroupConfig::new(node.0),
            data_dir: data_dir.into(),
            ..ServerConfig::default()
        }
    }

    /// This node.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.node.node_id)
    }

    /// Checks every field, the nested configs included; returns the first mistake found
    /// (see [`ServerConfig::mistakes`] for all of them).
    ///
    /// # Errors
    ///
    /// [`ServerError::NodeConfig`], [`ServerError::Store`] and [`ServerError::Transport`]
    /// for the layers' own settings, or the variant that names the mistake:
    /// [`ServerError::NoDataDir`], [`ServerError::SameAddress`], [`ServerError::ZeroPeerId`],
    /// [`ServerError::PeerAddress`], [`ServerError::BootstrapWithoutThisNode`],
    /// [`ServerError::TooManyBootstrapRanges`], [`ServerError::ClientTls`].
    pub fn validate(&self) -> Result<(), ServerError> {
        match self.mistakes().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every mistake of every field, the nested configs' included, in order: what a node
    /// refuses to start with, one line each.
    pub fn mistakes(&self) -> Vec<ServerError> {
        let mut out: Vec<ServerError> = Vec::new();
        // A joining node may leave its id to the join.
        let id_from_join = self.join.is_some();
        out.extend(
            self.node
                .mistakes()
                .into_iter()
                .filter(|e| !(id_from_join && matches!(e, ConfigError::ZeroNodeId)))
                .map(ServerError::from),
        );
        out.extend(self.store.mistakes().into_iter().map(ServerError::from));
        out.extend(self.grpc.mistakes().into_iter().map(ServerError::from));
        if self.data_dir.as_os_str().is_empty() {
            out.push(ServerError::NoDataDir);
        }
        // Two port-0 addresses are two different sockets; only a fixed port can clash.
        let mut fixed: Vec<SocketAddr> = Vec::new();
        let listeners = [
            Some(self.raft_addr),
            Some(self.client_addr),
            self.metrics_addr,
            self.redis_addr,
        ];
        for addr in listeners.into_iter().flatten() {
            if addr.port() == 0 {
                continue;
            }
            if fixed.contains(&addr) {
                out.push(ServerError::SameAddress(addr));
            } else {
                fixed.push(addr);
            }
        }
        for (node, addr) in &self.peers {
            if node.0 == 0 {
                out.push(ServerError::ZeroPeerId);
            }
            if !is_host_port(addr) {
                out.push(ServerError::PeerAddress {
                    node: *node,
                    addr: addr.clone(),
                });
            }
        }
        if self.bootstrap_ranges > MAX_RANGES {
            out.push(ServerError::TooManyBootstrapRanges {
                count: self.bootstrap_ranges,
                max: MAX_RANGES,
            });
        }
        if self.bootstrap_ranges > 0 && !self.peers.contains_key(&self.node_id()) {
            out.push(ServerError::BootstrapWithoutThisNode {
                node: self.node_id(),
            });
        }
        if let Some(join) = &self.join {
            if !is_host_port(join) {
                out.push(ServerError::JoinAddress(join.clone()));
            }
            if self.bootstrap_ranges > 0 {
                out.push(ServerError::JoinAndBootstrap);
            }
            if self.raft_addr.port() == 0 {
                out.push(ServerError::JoinWithoutRaftPort(self.raft_addr));
            }
        }
        if self.bootstrap_replicas > self.peers.len() {
            out.push(ServerError::BootstrapReplicas {
                count: self.bootstrap_replicas,
                peers: self.peers.len(),
            });
        }
        out.extend(self.schedule.mistakes());
        let split = self.node.split.max_range_bytes;
        if self.schedule.merge_below_bytes > 0
            && split > 0
            && self.schedule.merge_below_bytes >= split
        {
            out.push(ServerError::Schedule {
                field: "merge_below_bytes",
                problem: "must be below split.max_range_bytes (a merged range would split again)",
            });
        }
        if let Some(tls) = &self.client_tls {
            let pems = [
                ("cert", Some(&tls.cert_pem)),
                ("key", Some(&tls.key_pem)),
                ("client CA", tls.client_ca_pem.as_ref()),
            ];
            for (what, pem) in pems {
                if pem.is_some_and(|p| !p.contains("-----BEGIN ")) {
                    out.push(ServerError::ClientTls(format!("the {what} is not PEM")));
                }
            }
        }
        out
    }
}

/// Whether `addr` looks like `host:port` (a host name or address, a colon, a port number).
/// The transport checks it again when it builds the endpoint; this catches a typo before
/// anything is opened.
fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use flotilla_store::StoreError;
    use flotilla_transport::TransportError;

    use super::*;

    fn base() -> ServerConfig {
        ServerConfig {
            raft_addr: "127.0.0.1:7001".parse().unwrap(),
            client_addr: "127.0.0.1:8001".parse().unwrap(),
            peers: [(NodeId(1), "127.0.0.1:7001".to_string())].into(),
            bootstrap_ranges: 10,
            ..ServerConfig::new(NodeId(1), "/tmp/n1")
        }
    }

    #[test]
    fn defaults_with_a_node_id_and_a_data_dir_are_valid() {
        ServerConfig::new(NodeId(1), "data").validate().unwrap();
        base().validate().unwrap();
    }

    #[test]
    fn each_mistake_has_its_own_error() {
        let check = |config: ServerConfig, expected: fn(&ServerError) -> bool| {
            let e = config.validate().expect_err("must be refused");
            assert!(expected(&e), "unexpected error: {e:?}");
        };
        check(ServerConfig::default(), |e| {
            matches!(
                e,
                ServerError::NodeConfig(flotilla_runtime::ConfigError::ZeroNodeId)
            )
        });
        let mut c = base();
        c.node.tick_interval = Duration::ZERO;
        check(c, |e| {
            matches!(
                e,
                ServerError::NodeConfig(flotilla_runtime::ConfigError::TickIntervalTooSmall)
            )
        });
        let mut c = base();
        c.store.block_cache_bytes = 0;
        check(c, |e| {
            matches!(e, ServerError::Store(StoreError::InvalidConfig(_)))
        });
        let mut c = base();
        c.grpc.max_frame_bytes = 0;
        check(c, |e| {
            matches!(
                e,
                ServerError::Transport(TransportError::InvalidConfig { .. })
            )
        });
        check(
            ServerConfig {
                data_dir: PathBuf::new(),
                ..base()
            },
            |e| matches!(e, ServerError::NoDataDir),
        );
        check(
            ServerConfig {
                client_addr: base().raft_addr,
                ..base()
            },
            |e| matches!(e, ServerError::SameAddress(a) if a.port() == 7001),
        );
        let mut c = base();
        c.peers.insert(NodeId(0), "127.0.0.1:7000".into());
        check(c, |e| matches!(e, ServerError::ZeroPeerId));
        for bad in ["127.0.0.1", ":7002", "host:port", "127.0.0.1:70000"] {
            let mut c = base();
            c.peers.insert(NodeId(2), bad.into());
            check(
                c,
                |e| matches!(e, ServerError::PeerAddress { node, .. } if *node == NodeId(2)),
            );
        }
        let mut c = base();
        c.peers.remove(&NodeId(1));
        c.peers.insert(NodeId(2), "127.0.0.1:7002".into());
        check(
            c,
            |e| matches!(e, ServerError::BootstrapWithoutThisNode { node } if *node == NodeId(1)),
        );
        check(
            ServerConfig {
                bootstrap_ranges: MAX_RANGES + 1,
                ..base()
            },
            |e| matches!(e, ServerError::TooManyBootstrapRanges { count, max } if *count == MAX_RANGES + 1 && *max == MAX_RANGES),
        );
        let joining = || ServerConfig {
            bootstrap_ranges: 0,
            join: Some("127.0.0.1:8002".into()),
            ..base()
        };
        check(
            ServerConfig {
                join: Some("nowhere".into()),
                ..joining()
            },
            |e| matches!(e, ServerError::JoinAddress(a) if a == "nowhere"),
        );
        check(
            ServerConfig {
                bootstrap_ranges: 1,
                ..joining()
            },
            |e| matches!(e, ServerError::JoinAndBootstrap),
        );
        check(
            ServerConfig {
                raft_addr: "127.0.0.1:0".parse().unwrap(),
                ..joining()
            },
            |e| matches!(e, ServerError::JoinWithoutRaftPort(_)),
        );
    }

    #[test]
    fn automatic_merges_must_stay_below_the_split_size() {
        let mut c = base();
        c.schedule.merge_below_bytes = c.node.split.max_range_bytes;
        let e = c.validate().unwrap_err();
        assert!(
            matches!(
                e,
                ServerError::Schedule {
                    field: "merge_below_bytes",
                    ..
                }
            ),
            "{e}"
        );
        // Either off: nothing to check.
        c.node.split.max_range_bytes = 0;
        c.validate().unwrap();
        c.node.split.max_range_bytes = 1 << 20;
        c.schedule.merge_below_bytes = 0;
        c.validate().unwrap();
    }

    #[test]
    fn a_joining_node_may_leave_its_id_to_the_join() {
        let mut c = base();
        c.bootstrap_ranges = 0;
        c.node.node_id = 0;
        assert!(c.validate().is_err());
        c.join = Some("127.0.0.1:8002".into());
        c.validate().unwrap();
    }

    #[test]
    fn mistakes_lists_every_mistake_of_every_layer() {
        let mut c = base();
        c.node.heartbeat_tick = 0;
        c.node.max_wakes_per_tick = 0;
        c.store.background_jobs = 0;
        c.store.block_cache_bytes = 0;
        c.grpc.ping_interval = Duration::ZERO;
        c.metrics_addr = Some(c.client_addr);
        c.data_dir = PathBuf::new();
        let all: Vec<String> = c.mistakes().iter().map(|e| e.to_string()).collect();
        assert_eq!(all.len(), 7, "{all:#?}");
        assert_eq!(c.validate().unwrap_err().to_string(), all[0]);
    }

    #[test]
    fn two_free_ports_do_not_clash_and_a_node_without_bootstrap_needs_no_peers() {
        let c = ServerConfig {
            peers: BTreeMap::new(),
            bootstrap_ranges: 0,
            ..ServerConfig::new(NodeId(3), "/tmp/n3")
        };
        assert_eq!(c.raft_addr, c.client_addr);
        c.validate().unwrap();
    }
}
