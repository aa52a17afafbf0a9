//! The wiring of one node, written once for the node binary, the tests, the benchmarks and
//! the examples: open the engine in the data directory, bind the gRPC transport on the raft
//! address and tell it the peers, start the [`NodeGroup`] with a state machine, bootstrap the
//! initial range layout on a fresh store, and serve the KV and admin gRPC APIs on the client
//! address (and the Redis protocol on its own address, if configured) until shut down.
//!
//! Starting is two steps so that a cluster in one process can use free ports: [`Server::bind`]
//! opens both sockets (their real addresses are then known, and a port clash is reported
//! before anything starts) and returns a [`ServerBuilder`], which takes more peers and a state
//! machine; [`ServerBuilder::start`] opens the engine and starts everything.
//! [`Server::start`] does both when every address is known up front.
//!
//! # Threads and shutdown
//!
//! The NodeGroup owns its worker and ticker threads; the transport and the client API server
//! run as tasks on the tokio runtime whose handle is passed in (the server does not own a
//! runtime). [`Server::shutdown`] (or dropping the [`Server`]) stops the client API from
//! taking calls, stops the NodeGroup, which fails what is still pending with
//! `Error::Stopped` and shuts the transport down, and then, off the runtime, waits up to 5 s
//! for the client API server to let go of its socket (on a runtime thread it cannot wait
//! without starving the task it waits for). [`Server::run_until`] is the same for a process
//! that serves until a signal.

mod config;
mod error;
mod file;
mod join;
mod observe;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::{NodeId, ReplicaId};
use flotilla_runtime::{
    system_descriptor, KvStateMachine, NodeGroup, NodeGroupConfig, StateMachine, SystemSeed,
};
use flotilla_store::{Engine, StoreConfig};
use flotilla_transport::{BatchHandler, GrpcListener, GrpcTransport, Transport};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

pub use config::{ClientTls, ServerConfig};
pub use error::ServerError;
pub use file::{
    ConfigFile, LogSection, NodeSection, RaftSection, SplitSection, StoreSection, TlsSection,
};
pub use join::{join, REFRESH as REGISTRY_REFRESH};
pub use observe::{Kind as MetricKind, Metric, CATALOGUE as METRICS};

use crate::admin_service::AdminService;
use crate::kv_service::KvService;
use crate::layout::{first_campaigner, range_layout};
use crate::resp::RespServer;
use crate::schedule::{Placement, Scheduler};

/// How long a shutdown waits for the client API server to close its socket and connections.
const SERVER_STOP_WAIT: Duration = Duration::from_secs(5);

/// A running node: its NodeGroup on the gRPC transport, and the client APIs.
///
/// ```no_run
/// # async fn run() -> Result<(), flotilla::ServerError> {
/// use flotilla::{NodeId, Server, ServerConfig};
///
/// let mut config = ServerConfig::new(NodeId(1), "/var/lib/flotilla/n1");
/// config.raft_addr = "10.0.0.1:7001".parse().unwrap();
/// config.client_addr = "10.0.0.1:8001".parse().unwrap();
/// for (id, addr) in [(1, "10.0.0.1:7001"), (2, "10.0.0.2:7001"), (3, "10.0.0.3:7001")] {
///     config.peers.insert(NodeId(id), addr.to_string());
/// }
/// config.bootstrap_ranges = 16; // on a fresh store only; the same on every node
/// let server = Server::start(config, tokio::runtime::Handle::current())?;
/// server.run_until(async { let _ = tokio::signal::ctrl_c().await; }).await
/// # }
/// ```
pub struct Server {
    node: Arc<NodeGroup>,
    transport: Arc<GrpcTransport>,
    raft_addr: SocketAddr,
    client_addr: SocketAddr,
    client_api: Mutex<ClientApi>,
    /// The `/metrics` and `/health` endpoint, if configured.
    observe: Mutex<Option<observe::Endpoint>>,
    metrics_addr: Option<SocketAddr>,
    /// The Redis protocol listener, if the config asks for one.
    redis: Option<RespServer>,
    /// The task that keeps the transport's peers in step with the node registry
    /// (`join::Watcher`); aborted at shutdown.
    registry: Mutex<Option<JoinHandle<()>>>,
    /// This node's statistics and placement decisions.
    scheduler: Scheduler,
}

/// The client API server task and the means to stop it and learn that it stopped.
struct ClientApi {
    /// Sending (or dropping) it starts the server's graceful shutdown; `None` once sent.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Receives once the server task has ended; what a shutdown off the runtime waits on.
    done: Option<std::sync::mpsc::Receiver<()>>,
    /// What `run_until` awaits; `None` once taken.
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

/// A node whose sockets are bound but that does not run yet: tell it more peers (addresses
/// of nodes bound after it was configured) and its state machine, then
/// [`ServerBuilder::start`] it. Dropping it closes the sockets.
pub struct ServerBuilder {
    config: ServerConfig,
    runtime: Handle,
    raft: GrpcListener,
    client: tokio::net::TcpListener,
    client_addr: SocketAddr,
    redis: Option<tokio::net::TcpListener>,
    state_machine: Arc<dyn StateMachine>,
}

/// The transport's settings, with pings frequent enough for node liveness: sleeping groups
/// learn of a node's death only from its silence (`NodeGroupConfig::node_down_ticks`), so an
/// idle stream must ping at least four times within that window or live nodes would be
/// declared down. The ping timeout stays longer than the interval.
fn grpc_config(config: &ServerConfig) -> flotilla_transport::GrpcConfig {
    let mut grpc = config.grpc.clone();
    if config.node.hibernate {
        let ticks = match config.node.node_down_ticks {
            0 => 2 * config.node.election_tick,
            n => n,
        };
        let window = config.node.tick_interval * u32::try_from(ticks).unwrap_or(u32::MAX);
        let ping = (window / 4).max(std::time::Duration::from_millis(5));
        if grpc.ping_interval > ping {
            grpc.ping_interval = ping;
        }
    }
    grpc
}

impl Server {
    /// Validates `config`, binds the raft address (the transport, not serving yet) and the
    /// client address, and gives the transport the peers of `config`. Tasks will run on
    /// `runtime`; this may be called on or off it.
    ///
    /// # Errors
    ///
    /// Any mistake [`ServerConfig::validate`] names; [`ServerError::Transport`] if the raft
    /// address or the TLS material cannot be used; [`ServerError::ClientBind`].
    pub fn bind(config: ServerConfig, runtime: Handle) -> Result<ServerBuilder, ServerError> {
        config.validate()?;
        let me = config.node_id();
        let raft =
            GrpcTransport::bind(me, grpc_config(&config), config.raft_addr, runtime.clone())?;
        for (node, addr) in &config.peers {
            if *node != me {
                raft.set_peer(*node, addr.clone())?;
            }
        }
        let (client, client_addr) = bind_client(config.client_addr, &runtime)?;
        let redis = match config.redis_addr {
            Some(addr) => Some(bind_client(addr, &runtime)?.0),
            None => None,
        };
        Ok(ServerBuilder {
            config,
            runtime,
            raft,
            client,
            client_addr,
            redis,
            state_machine: Arc::new(KvStateMachine),
        })
    }

    /// [`Server::bind`] then [`ServerBuilder::start`], with the default state machine
    /// ([`KvStateMachine`]).
    ///
    /// # Errors
    ///
    /// As both.
    pub fn start(config: ServerConfig, runtime: Handle) -> Result<Server, ServerError> {
        Self::bind(config, runtime)?.start()
    }

    /// The NodeGroup (shared: the client APIs hold it too).
    pub fn node(&self) -> &Arc<NodeGroup> {
        &self.node
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.transport.node()
    }

    /// The transport, for peer changes and its statistics.
    pub fn transport(&self) -> &Arc<GrpcTransport> {
        &self.transport
    }

    /// The cluster as this node's scheduler sees it (every node's statistics and liveness)
    /// and the decisions it took.
    pub fn placement(&self) -> Arc<Placement> {
        self.scheduler.placement()
    }

    /// The address the raft transport listens on (the real port when bound to port 0).
    pub fn raft_addr(&self) -> SocketAddr {
        self.raft_addr
    }

    /// The address the client APIs listen on (the real port when bound to port 0).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The address of the `/metrics` and `/health` endpoint, if one is served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The address the Redis protocol listens on, if the config asked for it.
    pub fn redis_addr(&self) -> Option<SocketAddr> {
        self.redis.as_ref().map(RespServer::local_addr)
    }

    /// Stops the node; see the module doc for the order and the wait. Idempotent.
    pub fn shutdown(&self) {
        self.scheduler.stop();
        if let Some(r) = &self.redis {
            r.stop();
        }
        if let Some(task) = self
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
        let (stop, done) = {
            let mut api = self.client_api.lock().unwrap_or_else(|e| e.into_inner());
            (api.stop.take(), api.done.take())
        };
        let Some(stop) = stop else {
            return;
        };
        if let Some(endpoint) = &*self.observe.lock().unwrap_or_else(|e| e.into_inner()) {
            endpoint.set_stopping();
        }
        let _ = stop.send(());
        // After the client API stopped taking calls: the NodeGroup fails the calls still in
        // flight (`Stopped`), so that the server's graceful shutdown does not wait on them.
        self.node.shutdown();
        // The workers are joined: nothing writes any more. Sync what the apply batches left
        // unsynced, so that a restart replays nothing.
        if let Err(e) = self.node.engine().sync_wal() {
            tracing::warn!(node = %self.node_id(), error = %e, "engine sync at shutdown failed");
        }
        if let Some(mut endpoint) = self
            .observe
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            endpoint.stop();
        }
        // `Disconnected` means the task is gone already (its runtime was shut down).
        if Handle::try_current().is_err()
            && done
                .is_some_and(|d| d.recv_timeout(SERVER_STOP_WAIT) == Err(RecvTimeoutError::Timeout))
        {
            tracing::warn!(node = %self.node_id(), "client API server did not stop within {SERVER_STOP_WAIT:?}");
        }
    }

    /// Serves until `signal` resolves, then shuts the node down and waits (up to 5 s) for the
    /// client API server to finish the calls it took. What a node process runs.
    ///
    /// # Errors
    ///
    /// [`ServerError::ClientServe`] if the client API server failed before `signal`; the
    /// node is shut down then too.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Result<(), ServerError> {
        let task = self
            .client_api
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .task
            .take();
        let Some(mut task) = task else {
            self.shutdown();
            return Ok(());
        };
        let ended = tokio::select! {
            () = signal => None,
            served = &mut task => Some(served),
        };
        self.shutdown();
        let served = match ended {
            Some(served) => served,
            None => match tokio::time::timeout(SERVER_STOP_WAIT, task).await {
                Ok(served) => served,
                Err(_) => {
                    tracing::warn!(node = %self.node_id(), "client API server did not stop within {SERVER_STOP_WAIT:?}");
                    return Ok(());
                }
            },
        };
        match served {
            Ok(result) => result.map_err(ServerError::ClientServe),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down, and the server with it.
            Err(_) => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("node", &self.node_id())
            .field("raft_addr", &self.raft_addr)
            .field("client_addr", &self.client_addr)
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.config.node_id()
    }

    /// The address the raft transport is bound to (the real port when bound to port 0).
    pub fn raft_addr(&self) -> SocketAddr {
        self.raft.local_addr()
    }

    /// The address the client APIs are bound to (the real port when bound to port 0).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// Adds `node` at `addr` (`host:port`), or moves it there; for nodes whose address was
    /// not known when the config was written.
    ///
    /// # Errors
    ///
    /// [`ServerError::Transport`] with `InvalidAddress` if `addr` is not `host:port` or
    /// `node` is 0 or this node.
    pub fn set_peer(&self, node: NodeId, addr: String) -> Result<(), ServerError> {
        Ok(self.raft.set_peer(node, addr)?)
    }

    /// Runs `state_machine` instead of the default [`KvStateMachine`].
    pub fn state_machine(mut self, state_machine: Arc<dyn StateMachine>) -> ServerBuilder {
        self.state_machine = state_machine;
        self
    }

    /// Opens the engine, starts the NodeGroup on the transport, bootstraps the range layout if
    /// the config asks for one and the store is fresh, and serves the client APIs.
    ///
    /// # Errors
    ///
    /// [`ServerError::Store`] if the engine cannot open; [`ServerError::Runtime`] if the
    /// NodeGroup cannot start (recovery) or the layout cannot be bootstrapped. Nothing keeps
    /// running after an error.
    pub fn start(self) -> Result<Server, ServerError> {
        let ServerBuilder {
            config,
            runtime,
            raft,
            client,
            client_addr,
            redis,
            state_machine,
        } = self;
        let raft_addr = raft.local_addr();
        if config.metrics_addr.is_some() {
            // Before anything records, so that the endpoint sees every count.
            observe::recorder()?;
        }
        let mut transport = None;
        let (node, fresh) = start_node_group(
            config.node.clone(),
            config.store.clone(),
            &config.data_dir,
            state_machine,
            |handler| {
                let t = Arc::new(raft.serve(handler));
                transport = Some(t.clone());
                t as Arc<dyn Transport>
            },
        )?;
        let node = Arc::new(node);
        let transport = transport.expect("NodeGroup::start connects its transport");
        if fresh && config.bootstrap_ranges > 0 {
            // Ascending node ids (the keys of the map), so that every node computes the same
            // descriptors and the same first campaigners whatever order it was told the peers.
            // The lowest `bootstrap_replicas` ids host the layout and the system range; the
            // other peers start empty (the scheduler gives them replicas), in the registry too.
            let all: Vec<NodeId> = config.peers.keys().copied().collect();
            let mut members = all.clone();
            if config.bootstrap_replicas > 0 {
                members.truncate(config.bootstrap_replicas);
            }
            if members.contains(&config.node_id()) {
                let layout = range_layout(config.bootstrap_ranges, &members);
                // On an error `node` is dropped, which shuts it down.
                let peers = &config.peers;
                bootstrap(&node, layout, &members, &all, |n| {
                    peers.get(&n).cloned().unwrap_or_default()
                })?;
            }
        }
        let scheduler = Scheduler::start(
            node.clone(),
            transport.clone(),
            config.schedule.clone(),
            &runtime,
        );
        let observe = match config.metrics_addr {
            Some(addr) => Some(observe::serve(addr, node.clone(), &runtime)?),
            None => None,
        };
        let metrics_addr = observe.as_ref().map(observe::Endpoint::addr);
        let client_api = serve_client_api(
            node.clone(),
            scheduler.placement(),
            client,
            config.client_tls.as_ref(),
            &runtime,
        )?;
        let redis = match redis {
            Some(listener) => {
                let _in_runtime = runtime.enter();
                let addr = listener.local_addr().ok();
                Some(RespServer::serve(listener, node.clone()).map_err(|source| {
                    ServerError::ClientBind {
                        addr: addr.unwrap_or(client_addr),
                        source,
                    }
                })?)
            }
            None => None,
        };
        let registry = runtime.spawn(
            join::Watcher::new(
                node.clone(),
                transport.clone(),
                scheduler.placement(),
                &config,
                raft_addr,
                client_addr,
            )
            .run(),
        );
        Ok(Server {
            registry: Mutex::new(Some(registry)),
            node,
            transport,
            raft_addr,
            client_addr,
            client_api: Mutex::new(client_api),
            observe: Mutex::new(observe),
            metrics_addr,
            redis,
            scheduler,
        })
    }
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("node", &self.config.node_id())
            .field("raft_addr", &self.raft.local_addr())
            .field("client_addr", &self.client_addr)
            .finish_non_exhaustive()
    }
}

/// Opens the engine in `dir` and starts a NodeGroup on it with the transport `connect`
/// returns. Also says whether the store held no range before, that is whether the node is new
/// and may bootstrap. The one place where a node's engine and NodeGroup are started: by
/// [`Server`] on gRPC, and by the in-memory test cluster on its network.
pub(crate) fn start_node_group(
    config: NodeGroupConfig,
    store: StoreConfig,
    dir: &Path,
    state_machine: Arc<dyn StateMachine>,
    connect: impl FnOnce(Arc<dyn BatchHandler>) -> Arc<dyn Transport>,
) -> Result<(NodeGroup, bool), ServerError> {
    let opened = std::time::Instant::now();
    let engine = Engine::open(dir, store)?;
    tracing::info!(took = ?opened.elapsed(), "engine opened");
    // Checked before the NodeGroup starts: once it runs, a peer's message may create a
    // replica (uninitialized, which a bootstrap replaces) and the store would look used.
    let fresh = !engine.holds_groups()?;
    let node = NodeGroup::start(config, engine, state_machine, connect)?;
    Ok((node, fresh))
}

/// Creates the ranges of `layout` on `node` (one synced write) with their first leaders
/// chosen by [`first_campaigner`]: that node's replica campaigns, every replica prefers it, so
/// that a leader elected elsewhere (the campaigner started later, or missed the vote) hands
/// leadership to it once it is up and the leaders end up spread over `members` as the layout
/// says. With hibernation the other replicas sleep until the campaign reaches them
/// ([`NodeGroup::bootstrap_layout`]).
///
/// The system range is created with it, on the layout's nodes, seeded
/// ([`SystemSeed`]) so that range ids continue after the layout's and node ids after the
/// bootstrap nodes', each node of `registered` (the initial cluster) with its raft address
/// (`raft_addr`; empty when unknown).
pub(crate) fn bootstrap(
    node: &NodeGroup,
    layout: Vec<RangeDescriptor>,
    members: &[NodeId],
    registered: &[NodeId],
    raft_addr: impl Fn(NodeId) -> String,
) -> Result<(), ServerError> {
    let system_members: Vec<NodeId> = match layout.first() {
        Some(d) => d.replicas.iter().map(|r| NodeId(r.node_id)).collect(),
        None => members.to_vec(),
    };
    let system = system_descriptor(&system_members);
    // Every node of the initial cluster is in the registry (and its id is never handed out
    // again), also one that starts without replicas.
    let seed = SystemSeed::new(&layout, registered, raft_addr);
    node.bootstrap_cluster(layout, system, &seed, |d| {
        let campaigner = first_campaigner(d.id(), members)?;
        d.replica_on(campaigner).map(|r| ReplicaId(r.replica_id))
    })?;
    Ok(())
}

/// Binds the client API socket now (so that the real port and any clash are known at once)
/// as a tokio listener of `runtime`.
fn bind_client(
    addr: SocketAddr,
    runtime: &Handle,
) -> Result<(tokio::net::TcpListener, SocketAddr), ServerError> {
    let bind_err = |source| ServerError::ClientBind { addr, source };
    let std_listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let local = std_listener.local_addr().map_err(bind_err)?;
    let _in_runtime = runtime.enter();
    let listener = tokio::net::TcpListener::from_std(std_listener).map_err(bind_err)?;
    Ok((listener, local))
}

/// Serves the KV and admin APIs over `node` on `listener`, on `runtime`, until stopped; over
/// TLS if `tls` says so.
fn serve_client_api(
    node: Arc<NodeGroup>,
    placement: Arc<Placement>,
    listener: tokio::net::TcpListener,
    tls: Option<&ClientTls>,
    runtime: &Handle,
) -> Result<ClientApi, ServerError> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let kv = KvService::new(node.clone());
    let streams = kv.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        let mut server_tls = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
        );
        if let Some(ca) = &tls.client_ca_pem {
            server_tls = server_tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder
            .tls_config(server_tls)
            .map_err(|e| ServerError::ClientTls(e.to_string()))?;
    }
    let serve = builder
        .add_service(flotilla_proto::kv::kv_server::KvServer::new(kv))
        .add_service(AdminService::server(node, placement))
        .serve_with_incoming_shutdown(incoming, async move {
            // A dropped sender stops the server as a sent stop does.
            let _ = stop_rx.await;
            streams.stop_streams();
        });
    let task = runtime.spawn(async move {
        let served = serve.await;
        if let Err(e) = &served {
            tracing::error!(error = %e, "client API server failed");
        }
        let _ = done_tx.send(());
        served
    });
    Ok(ClientApi {
        stop: Some(stop_tx),
        done: Some(done_rx),
        task: Some(task),
    })
}
