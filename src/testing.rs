//! An in-memory cluster for tests and benchmarks: several NodeGroups in one process, each on
//! its own RocksDB in a temporary directory, talking over the in-memory network (with its
//! fault-injection filters). The real gRPC transport is tested separately; this harness is
//! for the runtime's behaviour.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_proto::meta::{RangeDescriptor, RangeEpoch, ReplicaDescriptor, ReplicaRole};
use flotilla_proto::{NodeId, RangeId};
use flotilla_runtime::{
    Error, KvStateMachine, NodeGroup, NodeGroupConfig, ReadConsistency, StateRole,
};
use flotilla_store::{Engine, StoreConfig};
use flotilla_transport::MemNetwork;
use flotilla_transport::Transport;

/// Several NodeGroups on the in-memory network.
pub struct Cluster {
    /// The network, for installing filters.
    pub net: Arc<MemNetwork>,
    dir: tempfile::TempDir,
    nodes: Vec<Option<NodeGroup>>,
    config: Arc<dyn Fn(u64) -> NodeGroupConfig + Send + Sync>,
    store_config: StoreConfig,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

/// A fast configuration for tests: 10ms ticks, so elections take ~100-200ms.
pub fn test_config(node: u64) -> NodeGroupConfig {
    NodeGroupConfig {
        tick_interval: Duration::from_millis(10),
        election_tick: 10,
        heartbeat_tick: 2,
        proposal_timeout: Duration::from_secs(5),
        ..NodeGroupConfig::new(node)
    }
}

impl Cluster {
    /// Starts `n` nodes (ids 1..=n) with [`test_config`].
    pub fn new(n: usize) -> Cluster {
        Cluster::with_config(n, test_config, StoreConfig::default())
    }

    /// Starts `n` nodes with a config per node id.
    pub fn with_config(
        n: usize,
        config: impl Fn(u64) -> NodeGroupConfig + Send + Sync + 'static,
        store_config: StoreConfig,
    ) -> Cluster {
        let mut c = Cluster {
            net: MemNetwork::new(),
            dir: tempfile::tempdir().expect("temp dir"),
            nodes: (0..n).map(|_| None).collect(),
            config: Arc::new(config),
            store_config,
        };
        for id in 1..=n as u64 {
            c.start(id);
        }
        c
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    /// Starts (or restarts) node `id` from its data directory.
    pub fn start(&mut self, id: u64) {
        assert!(
            self.nodes[id as usize - 1].is_none(),
            "node {id} is running"
        );
        let engine = Engine::open(self.path(id), self.store_config.clone()).expect("open engine");
        let net = self.net.clone();
        let ng = NodeGroup::start(
            (self.config)(id),
            engine,
            Arc::new(KvStateMachine),
            move |h| Arc::new(net.register(NodeId(id), h)) as Arc<dyn Transport>,
        )
        .expect("start node group");
        self.nodes[id as usize - 1] = Some(ng);
    }

    /// Stops node `id` (as a crash would, minus the loss of unsynced writes: whatever it
    /// acknowledged is on disk already).
    pub fn stop(&mut self, id: u64) {
        if let Some(ng) = self.nodes[id as usize - 1].take() {
            ng.shutdown();
            self.net.unregister(NodeId(id));
            drop(ng);
        }
    }

    /// Node `id`; panics if it is stopped.
    pub fn node(&self, id: u64) -> &NodeGroup {
        self.nodes[id as usize - 1]
            .as_ref()
            .unwrap_or_else(|| panic!("node {id} is stopped"))
    }

    /// Ids of running nodes.
    pub fn running(&self) -> Vec<u64> {
        (1..=self.nodes.len() as u64)
            .filter(|id| self.nodes[*id as usize - 1].is_some())
            .collect()
    }

    /// Number of nodes (running or not).
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Descriptors of `count` ranges that together cover the key space, each replicated on
    /// `replicas` (node ids; replica id = node id). Range `i` (1-based) starts at
    /// [`range_start_key`]`(i)`.
    pub fn range_layout(count: usize, replicas: &[u64]) -> Vec<RangeDescriptor> {
        (1..=count as u64)
            .map(|i| RangeDescriptor {
                range_id: i,
                start_key: if i == 1 {
                    Default::default()
                } else {
                    range_start_key(i).into()
                },
                end_key: if i == count as u64 {
                    Default::default()
                } else {
                    range_start_key(i + 1).into()
                },
                epoch: Some(RangeEpoch {
                    conf_ver: 1,
                    version: 1,
                }),
                replicas: replicas
                    .iter()
                    .map(|&n| ReplicaDescriptor {
                        replica_id: n,
                        node_id: n,
                        role: ReplicaRole::Voter as i32,
                    })
                    .collect(),
                state: 0,
                next_replica_id: replicas.iter().max().copied().unwrap_or(0) + 1,
                merge: None,
            })
            .collect()
    }

    /// Bootstraps `count` ranges replicated on every node and starts an election in each
    /// (spread over the nodes so leaders are balanced).
    pub fn bootstrap(&self, count: usize) -> Vec<RangeDescriptor> {
        let all: Vec<u64> = (1..=self.nodes.len() as u64).collect();
        let layout = Self::range_layout(count, &all);
        for id in self.running() {
            self.node(id)
                .bootstrap_ranges(layout.clone())
                .expect("bootstrap");
        }
        for d in &layout {
            let n = self.running();
            let campaigner = n[(d.range_id as usize) % n.len()];
            let _ = self.node(campaigner).campaign(d.id());
        }
        layout
    }

    /// The node whose replica of `range` is leader, if any node claims it (the one with the
    /// highest term, if several do).
    pub fn leader_of(&self, range: RangeId) -> Option<u64> {
        self.running()
            .into_iter()
            .filter_map(|id| {
                let st = self.node(id).status(range).ok()?;
                (st.role == StateRole::Leader).then_some((st.term, id))
            })
            .max()
            .map(|(_, id)| id)
    }

    /// Waits until every range in `ranges` has a leader.
    pub async fn wait_leaders(&self, ranges: &[RangeId], timeout: Duration) {
        let ok = wait_until(timeout, || {
            ranges.iter().all(|r| self.leader_of(*r).is_some())
        })
        .await;
        assert!(ok, "not every range elected a leader within {timeout:?}");
    }

    /// Writes through the leader, retrying on leader changes and transient errors until
    /// `timeout`. Returns the last error if it never succeeds.
    pub async fn put(&self, key: &[u8], value: &[u8], timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let range = self
                .running()
                .into_iter()
                .find_map(|id| self.node(id).range_of(key).ok());
            let target = range
                .and_then(|d| self.leader_of(d.id()))
                .or_else(|| self.running().first().copied());
            let res = match target {
                Some(id) => self.node(id).put(key, value).await,
                None => Err(Error::Stopped),
            };
            match res {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Reads `key` linearizably through node `id`, retrying transient errors until `timeout`.
    pub async fn get_from(
        &self,
        id: u64,
        key: &[u8],
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.node(id).get(key, ReadConsistency::Linearizable).await {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 1..=self.nodes.len() as u64 {
            self.stop(id);
        }
    }
}

/// The start key of range `i` in [`Cluster::range_layout`]: `"k"` followed by `i` as 8
/// decimal digits, so keys made with [`key_in_range`] sort into the right range.
pub fn range_start_key(i: u64) -> Vec<u8> {
    format!("k{i:08}").into_bytes()
}

/// A key inside range `i` of [`Cluster::range_layout`].
pub fn key_in_range(i: u64, suffix: &str) -> Vec<u8> {
    let mut k = range_start_key(i);
    k.push(b'/');
    k.extend_from_slice(suffix.as_bytes());
    k
}

/// Polls `cond` every 10ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`wait_until`] for an async condition.
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A NodeGroup on the real gRPC transport, as a node binary would run it.
pub struct GrpcNode {
    /// The node (shared, so that gRPC services can be served over it).
    pub node: Arc<NodeGroup>,
    /// Its transport (for peer updates and statistics).
    pub transport: Arc<flotilla_transport::GrpcTransport>,
    /// The address it listens on.
    pub addr: std::net::SocketAddr,
}

impl std::fmt::Debug for GrpcNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcNode")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Starts one node per entry of `listen` (node ids 1..=n) on 127.0.0.x addresses (port 0 picks
/// a free port), each with its engine in `dir/node-<id>`, all peers of each other over gRPC.
/// Listeners are bound first so that every address is known before any node starts.
pub fn start_grpc_nodes(
    listen: &[std::net::SocketAddr],
    config: impl Fn(u64) -> NodeGroupConfig,
    dir: &std::path::Path,
    runtime: tokio::runtime::Handle,
) -> anyhow_free::Result<Vec<GrpcNode>> {
    let grpc = flotilla_transport::GrpcConfig::default();
    start_grpc_nodes_with(listen, config, grpc, dir, runtime)
}

/// [`start_grpc_nodes`] with the transport settings `grpc` on every node.
pub fn start_grpc_nodes_with(
    listen: &[std::net::SocketAddr],
    config: impl Fn(u64) -> NodeGroupConfig,
    grpc: flotilla_transport::GrpcConfig,
    dir: &std::path::Path,
    runtime: tokio::runtime::Handle,
) -> anyhow_free::Result<Vec<GrpcNode>> {
    use flotilla_transport::GrpcTransport;
    let mut listeners = Vec::new();
    for (i, addr) in listen.iter().enumerate() {
        let id = NodeId(i as u64 + 1);
        let l = GrpcTransport::bind(id, grpc.clone(), *addr, runtime.clone())
            .map_err(|e| e.to_string())?;
        listeners.push(l);
    }
    let addrs: Vec<std::net::SocketAddr> = listeners.iter().map(|l| l.local_addr()).collect();
    for (i, l) in listeners.iter().enumerate() {
        for (j, a) in addrs.iter().enumerate() {
            if i != j {
                l.set_peer(NodeId(j as u64 + 1), a.to_string())
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    let mut nodes = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        nodes.push(serve_grpc_node(l, config(id), dir)?);
    }
    Ok(nodes)
}

/// Starts (or restarts, from its engine in `dir/node-<id>`) node `id` alone on `listen`, with
/// `peers` (node id and address of every other node). To restart a node that
/// [`start_grpc_nodes`] started, pass its old address: the others still send there. Call it
/// off the tokio runtime, after the old node's `shutdown` returned (which then waits for its
/// server to let go of the port).
pub fn start_grpc_node(
    id: u64,
    listen: std::net::SocketAddr,
    peers: &[(u64, std::net::SocketAddr)],
    config: NodeGroupConfig,
    grpc: flotilla_transport::GrpcConfig,
    dir: &std::path::Path,
    runtime: tokio::runtime::Handle,
) -> anyhow_free::Result<GrpcNode> {
    let l = flotilla_transport::GrpcTransport::bind(NodeId(id), grpc, listen, runtime)
        .map_err(|e| e.to_string())?;
    for (node, addr) in peers {
        l.set_peer(NodeId(*node), addr.to_string())
            .map_err(|e| e.to_string())?;
    }
    serve_grpc_node(l, config, dir)
}

/// Serves `node`'s client APIs (KV and admin, as `flotilla-node` does) on a free port of
/// 127.0.0.1, on the current tokio runtime until it stops; returns the address.
pub fn serve_client_api(node: Arc<NodeGroup>) -> anyhow_free::Result<std::net::SocketAddr> {
    let incoming = tonic::transport::server::TcpIncoming::bind(([127, 0, 0, 1], 0).into())
        .map_err(|e| e.to_string())?;
    let addr = incoming.local_addr().map_err(|e| e.to_string())?;
    let server = tonic::transport::Server::builder()
        .add_service(crate::kv_service::KvService::server(node.clone()))
        .add_service(crate::admin_service::AdminService::server(node))
        .serve_with_incoming(incoming);
    tokio::spawn(async move {
        if let Err(e) = server.await {
            eprintln!("client API server on {addr} stopped: {e}");
        }
    });
    Ok(addr)
}

/// Opens the node's engine and starts its NodeGroup on the bound listener.
fn serve_grpc_node(
    l: flotilla_transport::GrpcListener,
    config: NodeGroupConfig,
    dir: &std::path::Path,
) -> anyhow_free::Result<GrpcNode> {
    let id = config.node_id;
    let addr = l.local_addr();
    let engine = Engine::open(dir.join(format!("node-{id}")), StoreConfig::default())
        .map_err(|e| e.to_string())?;
    let mut transport = None;
    let node = NodeGroup::start(config, engine, Arc::new(KvStateMachine), |h| {
        let t = Arc::new(l.serve(h));
        transport = Some(t.clone());
        t as Arc<dyn Transport>
    })
    .map_err(|e| e.to_string())?;
    Ok(GrpcNode {
        node: Arc::new(node),
        transport: transport.expect("connect was called"),
        addr,
    })
}

/// Error plumbing for the harness without an error-handling dependency.
pub mod anyhow_free {
    /// A harness result: errors are rendered to strings.
    pub type Result<T> = std::result::Result<T, String>;
}

/// Measurement helpers shared by the benchmarks.
pub mod measure {
    /// The value at quantile `p` (0..=1) of an ascending `sorted` slice; 0 if empty.
    pub fn percentile(sorted: &[f64], p: f64) -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i]
    }

    /// CPU seconds (user + system) this process has used, from `/proc/self/stat` (10 ms
    /// resolution); 0 where /proc is missing.
    pub fn cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name, which may itself contain spaces and parentheses.
        let after = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ut: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0);
        let st: f64 = f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
        (ut + st) / 100.0
    }

    /// Resident set size of this process in bytes, from `/proc/self/statm`.
    pub fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        pages * 4096
    }
}
