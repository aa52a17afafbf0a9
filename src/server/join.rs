//! Nodes that are not in the static config: joining a running cluster (`--join`), and keeping
//! the transport's peers in step with the node registry of the system range.
//!
//! - **Join** ([`join`], before the node starts): a node whose store has no identity asks a
//!   running node (its client address) for a new node id through the admin `Join` call; a
//!   node that joined before sends the id its store holds, which only updates its addresses.
//!   The answer carries the whole registry, so the node knows every peer's raft address
//!   before its transport starts.
//! - **Watch** ([`Watcher`], while the node runs): every [`REFRESH`], the node reads the
//!   registry (from its replica of the system range, or else over the admin API of a node
//!   that has one), tells its transport every new or moved peer (`set_peer`) and forgets
//!   removed ones (`remove_peer`: their batches are refused from then on; and
//!   `NodeGroup::declare_removed`: down for good at once, for liveness and the scheduler).
//!   A node that holds a replica of the system range first records its own addresses in it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_proto::admin::admin_client::AdminClient;
use flotilla_proto::admin::{JoinRequest, JoinResponse, RegistryRequest};
use flotilla_proto::meta::{NodeRecord, NodeState};
use flotilla_proto::NodeId;
use flotilla_runtime::{NodeGroup, ReadConsistency};
use flotilla_store::Engine;
use flotilla_transport::GrpcTransport;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::{ServerConfig, ServerError};
use crate::schedule::Placement;

/// How a node reaches the client API (admin service) of other nodes, to join and to read the
/// registry: over TLS when its own client API is served over TLS (the nodes of a cluster
/// share one TLS set-up), checking their certificates against the cluster CA (and
/// `[tls] server-name`, if set) and presenting its own node certificate as the client's.
#[derive(Clone, Default)]
pub(crate) struct AdminDial {
    tls: Option<ClientTlsConfig>,
}

impl AdminDial {
    pub(crate) fn new(config: &ServerConfig) -> AdminDial {
        let tls = match (&config.client_tls, &config.grpc.tls) {
            (Some(_), Some(tls)) => {
                let mut c = ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem))
                    .identity(tonic::transport::Identity::from_pem(
                        &tls.cert_pem,
                        &tls.key_pem,
                    ));
                if let Some(name) = &tls.server_name {
                    c = c.domain_name(name.clone());
                }
                Some(c)
            }
            _ => None,
        };
        AdminDial { tls }
    }

    pub(crate) async fn connect(&self, addr: &str) -> Result<AdminClient<Channel>, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5));
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| e.to_string())?;
        }
        let channel = endpoint.connect().await.map_err(|e| error_chain(&e))?;
        Ok(AdminClient::new(channel))
    }
}

/// An error with its sources (a TLS refusal is only in the source chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// How often a running node reads the registry for new, moved or removed peers.
pub const REFRESH: Duration = Duration::from_secs(1);

/// How long [`join`] keeps retrying a node that answers "unavailable" (its system range is
/// electing a leader, or it is starting).
const JOIN_PATIENCE: Duration = Duration::from_secs(30);

/// Resolves the node id and peers of a node configured with `join`: asks the node at the join
/// address to record this node (a new id for a store without one, the stored id otherwise)
/// and puts every other node of the registry that is not removed into `config.peers`. Does
/// nothing without `join`.
///
/// # Errors
///
/// [`ServerError::Store`] if the data directory cannot be read; [`ServerError::Join`] if the
/// join address does not answer within 30 s or refuses (this node was removed, the id is
/// unknown there, the address is not a node holding the system range).
pub async fn join(config: &mut ServerConfig) -> Result<(), ServerError> {
    let Some(addr) = config.join.clone() else {
        return Ok(());
    };
    let stored = {
        let engine = Engine::open(&config.data_dir, config.store.clone())?;
        engine.store_ident()?.map(|i| i.node_id)
    };
    let node_id = match (stored, config.node.node_id) {
        (Some(id), _) => id,
        (None, id) => id,
    };
    let fail = |reason: String| ServerError::Join {
        addr: addr.clone(),
        reason,
    };
    // Before binding: a join configured with port 0 records that port (see the Watcher,
    // which records the bound address only on a node holding the system range).
    let raft_addr = advertised_raft_addr(config, config.raft_addr);
    let request = JoinRequest {
        node_id,
        raft_addr,
        client_addr: config.client_addr.to_string(),
    };
    let deadline = Instant::now() + JOIN_PATIENCE;
    let dial = AdminDial::new(config);
    let answer: JoinResponse = loop {
        let attempt = async {
            let mut client = dial
                .connect(&addr)
                .await
                .map_err(tonic::Status::unavailable)?;
            client.join(request.clone()).await
        };
        match attempt.await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tracing::info!(%addr, "join: {}; retrying", s.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(fail(s.message().to_string())),
        }
    };
    let me = answer
        .node
        .ok_or_else(|| fail("the answer holds no node record".into()))?;
    config.node.node_id = me.node_id;
    for n in answer.nodes {
        if n.node_id != me.node_id && n.state != NodeState::Removed as i32 {
            config.peers.insert(NodeId(n.node_id), n.raft_addr);
        }
    }
    tracing::info!(node = me.node_id, %addr, peers = config.peers.len(), "joined the cluster");
    Ok(())
}

/// The raft address the other nodes should use: this node's entry in `peers` if it has one
/// (what the bootstrap nodes were told), else `bound`, the address its raft listener bound.
/// Not the configured `raft_addr`: with port 0 (the system picks a free port, as in-process
/// test clusters do) that is an address nobody can dial, and every node that learned it from
/// the registry would lose its link to this node while this node's own sends still went
/// through: a one-way partition that left groups without a leader.
fn advertised_raft_addr(config: &ServerConfig, bound: SocketAddr) -> String {
    config
        .peers
        .get(&config.node_id())
        .cloned()
        .unwrap_or_else(|| bound.to_string())
}

/// Whether `addr` is one no node can dial (port 0, or an unspecified IP such as `0.0.0.0`):
/// such a registry record is ignored rather than replacing a working address. Host names are
/// taken as they are.
fn undialable(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .is_ok_and(|a| a.port() == 0 || a.ip().is_unspecified())
}

/// Keeps the transport's peers in step with the registry (see the module doc). Runs as one
/// task on the server's runtime, aborted when the server shuts down.
pub(crate) struct Watcher {
    node: Arc<NodeGroup>,
    transport: Arc<GrpcTransport>,
    /// Told each node's standing (draining, removed) at every reading.
    placement: Arc<Placement>,
    dial: AdminDial,
    me: NodeRecord,
    /// Client addresses of other nodes to ask for the registry when this node holds no
    /// replica of the system range: the join address first, then what the registry said.
    ask: Vec<String>,
    /// The raft address the transport has for each peer.
    known: BTreeMap<u64, String>,
    /// Registry addresses ignored as undialable (warned about once each).
    undialable: BTreeSet<(u64, String)>,
    registered: bool,
}

impl Watcher {
    /// `raft_addr` and `client_addr` are the addresses the node's listeners bound.
    pub(crate) fn new(
        node: Arc<NodeGroup>,
        transport: Arc<GrpcTransport>,
        placement: Arc<Placement>,
        config: &ServerConfig,
        raft_addr: SocketAddr,
        client_addr: SocketAddr,
    ) -> Watcher {
        let me = NodeRecord {
            node_id: config.node_id().0,
            raft_addr: advertised_raft_addr(config, raft_addr),
            client_addr: client_addr.to_string(),
            state: NodeState::Up as i32,
        };
        Watcher {
            node,
            transport,
            placement,
            dial: AdminDial::new(config),
            // A joined node recorded its addresses in the join.
            registered: config.join.is_some(),
            me,
            ask: config.join.iter().cloned().collect(),
            known: config.peers.iter().map(|(n, a)| (n.0, a.clone())).collect(),
            undialable: BTreeSet::new(),
        }
    }

    /// Runs until the task is aborted.
    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.round().await {
                tracing::debug!(node = self.me.node_id, "registry not refreshed: {e}");
            }
        }
    }

    async fn round(&mut self) -> Result<(), String> {
        let local = self.node.has_system_replica();
        if local && !self.registered {
            self.record_here().await?;
        }
        let nodes = if local {
            self.node
                .nodes(ReadConsistency::Stale)
                .await
                .map_err(|e| e.to_string())?
        } else {
            self.ask_registry().await?
        };
        // This node's record as the registry has it: a join sends the configured raft address
        // before the listener is bound (port 0 then), and a record made elsewhere may lag a
        // move. Re-recorded with the addresses bound, here or through a node that can.
        let stale = nodes.iter().any(|n| {
            n.node_id == self.me.node_id
                && n.state != NodeState::Removed as i32
                && (n.raft_addr != self.me.raft_addr || n.client_addr != self.me.client_addr)
        });
        if stale {
            if local {
                self.record_here().await?;
            } else {
                self.record_remotely().await?;
            }
        }
        self.apply(&nodes);
        self.placement.note_registry(&nodes);
        Ok(())
    }

    /// Records this node's addresses through its own replica of the system range.
    async fn record_here(&mut self) -> Result<(), String> {
        self.node
            .register_node(
                Some(NodeId(self.me.node_id)),
                self.me.raft_addr.clone(),
                self.me.client_addr.clone(),
            )
            .await
            .map_err(|e| e.to_string())?;
        self.registered = true;
        Ok(())
    }

    /// Records this node's addresses through the first node in `ask` that takes a `Join`
    /// with this node's id (which only updates its addresses).
    async fn record_remotely(&mut self) -> Result<(), String> {
        let request = JoinRequest {
            node_id: self.me.node_id,
            raft_addr: self.me.raft_addr.clone(),
            client_addr: self.me.client_addr.clone(),
        };
        self.on_first(|mut c| {
            let request = request.clone();
            async move { c.join(request).await }
        })
        .await?;
        tracing::info!(node = self.me.node_id, addr = %self.me.raft_addr, "addresses recorded in the registry");
        Ok(())
    }

    /// The registry from the first node in `ask` that answers.
    async fn ask_registry(&mut self) -> Result<Vec<NodeRecord>, String> {
        self.on_first(|mut c| async move { c.registry(RegistryRequest {}).await })
            .await
            .map(|r| r.nodes)
    }

    /// `call`'s answer from the first node in `ask` that gives one; else the last error.
    async fn on_first<T, F, Fut>(&self, mut call: F) -> Result<T, String>
    where
        F: FnMut(AdminClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = "no node to ask".to_string();
        for addr in &self.ask {
            let answer = match self.dial.connect(addr).await {
                Ok(c) => call(c).await.map_err(|s| s.message().to_string()),
                Err(e) => Err(e),
            };
            match answer {
                Ok(r) => return Ok(r.into_inner()),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    }

    fn apply(&mut self, nodes: &[NodeRecord]) {
        for n in nodes {
            if n.node_id == self.me.node_id || n.node_id == 0 {
                continue;
            }
            let id = NodeId(n.node_id);
            if n.state == NodeState::Removed as i32 {
                // Down for good at once: the groups it led elect elsewhere now, and the
                // scheduler rebuilds its replicas without waiting for `down_time`.
                self.node.declare_removed(id);
                if self.known.remove(&n.node_id).is_some() {
                    self.transport.remove_peer(id);
                    tracing::info!(node = self.me.node_id, peer = %id, "peer removed from the registry: refused from now on");
                }
                continue;
            }
            if !n.client_addr.is_empty() && !self.ask.contains(&n.client_addr) {
                self.ask.push(n.client_addr.clone());
            }
            // A bootstrap node seeded without an address records it when it starts.
            if n.raft_addr.is_empty() {
                continue;
            }
            if undialable(&n.raft_addr) {
                // Once per address, not every refresh.
                if self.undialable.insert((n.node_id, n.raft_addr.clone())) {
                    tracing::warn!(node = self.me.node_id, peer = %id, addr = %n.raft_addr, "registry address cannot be dialled; keeping the one known");
                }
                continue;
            }
            if self.known.get(&n.node_id) != Some(&n.raft_addr) {
                match self.transport.set_peer(id, n.raft_addr.clone()) {
                    Ok(()) => {
                        tracing::info!(node = self.me.node_id, peer = %id, addr = %n.raft_addr, "peer learned from the registry");
                        self.known.insert(n.node_id, n.raft_addr.clone());
                    }
                    Err(e) => {
                        tracing::warn!(node = self.me.node_id, peer = %id, "registry address refused: {e}")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{advertised_raft_addr, undialable};
    use crate::server::ServerConfig;
    use flotilla_proto::NodeId;

    #[test]
    fn a_node_advertises_its_peers_entry_else_the_address_it_bound() {
        let mut config = ServerConfig {
            raft_addr: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        };
        let bound = "127.0.0.1:40123".parse().unwrap();
        assert_eq!(advertised_raft_addr(&config, bound), "127.0.0.1:40123");
        config
            .peers
            .insert(config.node_id(), "node1.example:7000".into());
        config.peers.insert(NodeId(9), "127.0.0.9:7000".into());
        assert_eq!(advertised_raft_addr(&config, bound), "node1.example:7000");
    }

    #[test]
    fn port_zero_and_unspecified_ips_cannot_be_dialled() {
        assert!(undialable("127.0.0.1:0"));
        assert!(undialable("0.0.0.0:7000"));
        assert!(undialable("[::]:7000"));
        assert!(!undialable("127.0.0.2:7000"));
        assert!(!undialable("node1.example:7000"));
    }
}
