//! The test harness, behind the `testing` feature (tests, benchmarks and examples turn it on;
//! the product never does): an in-memory cluster of several NodeGroups in one process, each on
//! its own RocksDB in a temporary directory, talking over the in-memory network (with its
//! fault-injection filters); helpers to start [`Server`]s, the real gRPC nodes, in one
//! process, and [`ServerCluster`], three of them with their ranges led; waits that poll a condition; and the measurements the benchmarks share.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::{NodeId, RangeId};
use flotilla_runtime::{
    system_descriptor, Error, KvStateMachine, NodeGroup, NodeGroupConfig, ReadConsistency,
    StateRole, SystemSeed,
};
use flotilla_store::StoreConfig;
use flotilla_transport::MemNetwork;
use flotilla_transport::Transport;

use flotilla_proto::kv::kv_client::KvClient;
use tonic::transport::Channel;

use crate::layout::{first_campaigner, range_layout, range_start_key};
use crate::server::{
    bootstrap, start_node_group, Server, ServerBuilder, ServerConfig, ServerError,
};

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
        let net = self.net.clone();
        // As a node process binds its address before it recovers: a slow start is silence,
        // not a refusal (see `MemNetwork::set_starting`).
        self.net.set_starting(NodeId(id), true);
        let (ng, _) = start_node_group(
            (self.config)(id),
            self.store_config.clone(),
            &self.path(id),
            Arc::new(KvStateMachine),
            move |h| Arc::new(net.register(NodeId(id), h)) as Arc<dyn Transport>,
        )
        .expect("start node group");
        self.net.set_starting(NodeId(id), false);
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

    /// Stops node `id` and deletes its data directory: the node is gone for good (what an
    /// unsafe recovery recovers from).
    pub fn destroy(&mut self, id: u64) {
        self.stop(id);
        let path = self.path(id);
        if path.exists() {
            std::fs::remove_dir_all(&path).expect("delete the node's data");
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

    /// Bootstraps `count` ranges replicated on every node and starts an election in each
    /// (spread over the nodes so leaders are balanced).
    pub fn bootstrap(&self, count: usize) -> Vec<RangeDescriptor> {
        let layout = range_layout(count, &node_ids(self.nodes.len()));
        let running: Vec<NodeId> = self.running().into_iter().map(NodeId).collect();
        for id in &running {
            bootstrap(self.node(id.0), layout.clone(), &running, &running, |_| {
                String::new()
            })
            .expect("bootstrap");
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

/// Creates `layout` and the system range (seeded as [`Server`] seeds it, on the layout's
/// nodes) on `node`, with no first leaders: for tests that bootstrap a layout of their own
/// and start its elections themselves. Call it on every node of the layout.
pub fn bootstrap_ranges_and_system(
    node: &NodeGroup,
    layout: Vec<RangeDescriptor>,
) -> Result<(), Error> {
    let members: Vec<NodeId> = layout
        .first()
        .map(|d| d.replicas.iter().map(|r| NodeId(r.node_id)).collect())
        .unwrap_or_default();
    let seed = SystemSeed::new(&layout, &members, |_| String::new());
    node.bootstrap_cluster(layout, system_descriptor(&members), &seed, |_| None)
}

/// Creates a layout whose ranges need not be on every node: `nodes[i]` (node `i + 1`)
/// creates its replicas of the ranges that list it, and the system range (the node registry,
/// on `members`) if it is one of `members`; the first leaders as [`NodeGroup::bootstrap_layout`]
/// takes them. For tests and benches of placement, whose ranges start on different nodes.
pub fn bootstrap_spread_layout(
    nodes: &[&NodeGroup],
    layout: &[RangeDescriptor],
    members: &[NodeId],
    first_leader: impl Fn(&RangeDescriptor) -> Option<flotilla_proto::ReplicaId> + Copy,
) -> Result<(), Error> {
    let seed = SystemSeed::new(layout, members, |_| String::new());
    for (i, n) in nodes.iter().enumerate() {
        let id = NodeId(i as u64 + 1);
        let here: Vec<RangeDescriptor> = layout
            .iter()
            .filter(|d| d.replica_on(id).is_some())
            .cloned()
            .collect();
        if members.contains(&id) {
            n.bootstrap_cluster(here, system_descriptor(members), &seed, first_leader)?;
        } else {
            n.bootstrap_layout(here, first_leader)?;
        }
    }
    Ok(())
}

/// Node ids 1..=n, the ids of a [`Cluster`] of `n` nodes.
pub fn node_ids(n: usize) -> Vec<NodeId> {
    (1..=n as u64).map(NodeId).collect()
}

/// A key inside range `i` of a [`range_layout`]: its
/// [`range_start_key`] followed by `/` and `suffix`.
pub fn key_in_range(i: u64, suffix: &str) -> Vec<u8> {
    let mut k = range_start_key(i);
    k.push(b'/');
    k.extend_from_slice(suffix.as_bytes());
    k
}

/// What a write's answer (a put, a proposal through the NodeGroup) says about its effect, for
/// a history judged by `flotilla_check`: the runtime's promise about each error
/// ([`Error`]'s variants). Refused up front (`NotLeader`, `Busy`, `KeyNotInRange`,
/// `RangeNotFound`): the command never entered a log, so it failed. `ProposalDropped`
/// ("outcome unknown"), a timeout, `ReplicaFailed`, `Stopped` and the rest: it may still
/// apply, even later.
pub fn write_outcome<T>(answer: &Result<T, Error>) -> flotilla_check::Outcome {
    use flotilla_check::Outcome;
    match answer {
        Ok(_) => Outcome::Ok,
        Err(
            Error::NotLeader { .. }
            | Error::Busy(_)
            | Error::KeyNotInRange { .. }
            | Error::RangeNotFound(_),
        ) => Outcome::Fail,
        Err(_) => Outcome::Unknown,
    }
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

/// The config of node `node.node_id` of a cluster in this process: raft and client APIs on
/// free ports of 127.0.0.1, the engine in `dir/node-<id>`, no peers yet (see
/// [`start_servers`]), the scheduler off (a test turns it on when it is what it tests), the
/// other settings at their defaults.
pub fn local_server_config(node: NodeGroupConfig, dir: &Path) -> ServerConfig {
    let id = node.node_id;
    ServerConfig {
        node,
        data_dir: dir.join(format!("node-{id}")),
        // Tests place replicas and leaders themselves unless they turn it on.
        schedule: crate::schedule::ScheduleConfig {
            enabled: false,
            ..Default::default()
        },
        ..ServerConfig::default()
    }
}

/// Binds a [`Server`] per config, makes every node a peer of every other at its bound raft
/// address, then starts them all. Binding first means every address is known before any
/// node starts.
///
/// # Errors
///
/// The first [`ServerError`] of a bind or a start; the nodes started already are stopped.
pub fn start_servers(
    configs: Vec<ServerConfig>,
    runtime: tokio::runtime::Handle,
) -> Result<Vec<Server>, ServerError> {
    let bound = configs
        .into_iter()
        .map(|c| Server::bind(c, runtime.clone()))
        .collect::<Result<Vec<ServerBuilder>, _>>()?;
    let addrs: Vec<(NodeId, SocketAddr)> =
        bound.iter().map(|b| (b.node_id(), b.raft_addr())).collect();
    for b in &bound {
        for (id, addr) in &addrs {
            if *id != b.node_id() {
                b.set_peer(*id, addr.to_string())?;
            }
        }
    }
    bound.into_iter().map(ServerBuilder::start).collect()
}

/// Starts nodes 1..=n in this process as [`start_servers`] does, node `id` with `config(id)`
/// and its engine in `dir/node-<id>` ([`local_server_config`]).
///
/// # Errors
///
/// As [`start_servers`].
pub fn start_local_servers(
    n: usize,
    config: impl Fn(u64) -> NodeGroupConfig,
    dir: &Path,
    runtime: tokio::runtime::Handle,
) -> Result<Vec<Server>, ServerError> {
    let configs = (1..=n as u64)
        .map(|id| local_server_config(config(id), dir))
        .collect();
    start_servers(configs, runtime)
}

/// Three (or `n`) gRPC nodes in this process, each a [`Server`] on free ports of 127.0.0.1
/// with [`test_config`], the same layout bootstrapped on all of them and each range's first
/// election started on its campaigner ([`first_campaigner`]), as `--bootstrap-ranges` does on
/// a fresh cluster: the harness of the gRPC and Redis tests, written once.
pub struct ServerCluster {
    /// Node `i + 1` at index `i`.
    pub servers: Vec<Server>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for ServerCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCluster")
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

impl ServerCluster {
    /// How long [`ServerCluster::leader`] waits for a leader.
    const LEADER_WAIT: Duration = Duration::from_secs(20);

    /// Starts `n` nodes on the current tokio runtime, `edit` changing each node's config
    /// first (a Redis address, say), bootstraps `layout` on each and returns once every range
    /// has a leader.
    ///
    /// # Panics
    ///
    /// If a node cannot start or a range elects no leader within 20 s: it is a test harness.
    pub async fn start(
        n: usize,
        layout: Vec<RangeDescriptor>,
        edit: impl Fn(&mut ServerConfig),
    ) -> ServerCluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let configs = (1..=n as u64)
            .map(|id| {
                let mut c = local_server_config(test_config(id), dir.path());
                edit(&mut c);
                c
            })
            .collect();
        let servers =
            start_servers(configs, tokio::runtime::Handle::current()).expect("the servers start");
        let members = node_ids(n);
        for s in &servers {
            bootstrap_ranges_and_system(s.node(), layout.clone()).expect("bootstrap the layout");
        }
        for d in &layout {
            let first = first_campaigner(d.id(), &members).expect("the layout has members");
            servers[first.0 as usize - 1]
                .node()
                .campaign(d.id())
                .expect("campaign");
        }
        let cluster = ServerCluster { servers, _dir: dir };
        for d in &layout {
            cluster.leader(d.range_id).await;
            cluster.leader_known(d.range_id).await;
        }
        cluster
    }

    /// Waits until every server's replica of `range` knows its leader: a request sent to a
    /// follower right after the election would otherwise find no leader to forward to.
    ///
    /// # Panics
    ///
    /// If some replica does not learn it within 20 s.
    pub async fn leader_known(&self, range: u64) {
        let deadline = Instant::now() + Self::LEADER_WAIT;
        while !self.servers.iter().all(|s| {
            // (A server without a replica of the range has nothing to learn.)
            s.node()
                .status(RangeId(range))
                .map_or(true, |st| st.leader_node.is_some())
        }) {
            assert!(
                Instant::now() < deadline,
                "a replica of r{range} never learned its leader"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Index of the server leading `range`, once there is one.
    ///
    /// # Panics
    ///
    /// If none leads it within 20 s.
    pub async fn leader(&self, range: u64) -> usize {
        let deadline = Instant::now() + Self::LEADER_WAIT;
        loop {
            if let Some(i) = self.servers.iter().position(|s| {
                s.node()
                    .status(RangeId(range))
                    .is_ok_and(|st| st.role == StateRole::Leader)
            }) {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader for r{range}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A KV client of server `i` (connecting on first use).
    pub fn kv(&self, i: usize) -> KvClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.servers[i].client_addr()))
            .expect("a client address is a URI")
            .connect_lazy();
        KvClient::new(ch)
    }

    /// Stops every server.
    pub fn shutdown(self) {
        for s in &self.servers {
            s.shutdown();
        }
    }
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
