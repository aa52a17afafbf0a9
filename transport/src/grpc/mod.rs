//! The production transport: tonic gRPC, one long-lived bidirectional stream per ordered node
//! pair on `RaftTransport.Batches`, snapshots streamed in chunks on `RaftTransport.Snapshot`
//! (one call and connection per transfer), optional mutual TLS.
//!
//! # Layout and threads
//!
//! - `mod.rs`: [`GrpcTransport`] (the [`Transport`] the runtime sends through) and
//!   [`GrpcListener`] (a bound socket not yet serving), and the state they share.
//! - `peer.rs`: the sending side. One [`State`]-tracked peer per destination with a
//!   byte-budgeted queue, and one tokio task per peer that owns its stream: it merges what
//!   is queued into one frame, pings when idle, reconnects with backoff.
//! - `server.rs`: the receiving side. The tonic service, one tokio task per inbound stream,
//!   and the node's one delivery thread (`flotilla-grpc-<node>`) that calls the
//!   [`BatchHandler`].
//! - `snapshot.rs`: snapshot streaming, both sides: one tokio task per outgoing transfer,
//!   and the assembly of an incoming one before it goes to the delivery thread.
//! - `config.rs`: [`GrpcConfig`], [`TlsConfig`]; `stats.rs`: [`GrpcStats`].
//!
//! Tasks run on the tokio runtime whose handle is passed in; the transport does not own
//! that runtime. [`Transport::shutdown`] (or dropping the [`GrpcTransport`]) aborts the peer
//! tasks, ends the inbound streams, stops the server and joins the delivery thread.
//!
//! # Guarantees (beyond the crate's contract)
//!
//! - `send` is a few atomics and one short lock: it never waits for the network and never
//!   calls `block_on`, so the runtime's plain worker threads can call it.
//! - Per destination, frames are written in `send` order on one stream, and the receiver
//!   delivers them in that order. A broken stream loses what was queued or in flight (raft
//!   retransmits); nothing is ever delivered twice by the transport.
//! - The receiver drops (and counts) frames not addressed to it, frames from nodes not in
//!   its peer map (unless [`GrpcConfig::accept_unknown_peers`]), and closes streams whose
//!   frame exceeds [`GrpcConfig::max_frame_bytes`]; the sender then reconnects.
//! - [`Transport::last_heard_from`] is the last frame or ack from that node; pings keep it
//!   fresh on idle links.
//! - Snapshot envelopes never go on the Batches stream, so their size is bounded by
//!   [`GrpcConfig::max_snapshot_bytes`], not `max_frame_bytes`. The receiver delivers a
//!   snapshot only whole, and acknowledges only after its handler returned; the sender
//!   reports every transfer of an accepted batch exactly once
//!   ([`Transport::reports_snapshots`] is true), ok only on that acknowledgement.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use flotilla_transport::{GrpcConfig, GrpcTransport, NodeBatch, NodeId, RaftMessage, Transport};
//!
//! let rt = tokio::runtime::Runtime::new().unwrap();
//! let any_port = "127.0.0.1:0".parse().unwrap();
//! let (n1, _) = GrpcTransport::start(
//!     NodeId(1), GrpcConfig::default(), any_port, rt.handle().clone(), Arc::new(|_: NodeBatch| {}),
//! ).unwrap();
//! let (n2, addr2) = GrpcTransport::start(
//!     NodeId(2), GrpcConfig::default(), any_port, rt.handle().clone(), Arc::new(|b: NodeBatch| {
//!         assert_eq!(b.messages[0].range_id, 7);
//!     }),
//! ).unwrap();
//! n1.set_peer(NodeId(2), addr2.to_string()).unwrap();
//! // Node 2 accepts batches only from its peers (the address is only used to send to node 1).
//! n2.set_peer(NodeId(1), "127.0.0.1:1".to_string()).unwrap();
//!
//! let batch = NodeBatch { messages: vec![RaftMessage { range_id: 7, ..Default::default() }], ..Default::default() };
//! n1.send(NodeId(2), batch).unwrap();
//! assert!(n2.wait_for_stats(Duration::from_secs(10), |s| s.delivered_messages == 1));
//! n1.shutdown();
//! n2.shutdown();
//! ```

mod config;
mod peer;
mod server;
mod snapshot;
mod stats;

#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use flotilla_proto::transport::raft_transport_server::RaftTransportServer;
use flotilla_proto::transport::{NodeBatch, NodeStats, RaftMessage};
use flotilla_proto::NodeId;
use parking_lot::{Mutex, RwLock};
use prost::Message;
use tokio::runtime::Handle;
use tokio::sync::{watch, Semaphore};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

pub use self::config::{GrpcConfig, TlsConfig};
use self::peer::{Peer, State};
use self::server::{Delivery, Service};
use self::stats::Counters;
pub use self::stats::GrpcStats;
use crate::metric::{self, Rejected};
use crate::{BatchHandler, Transport, TransportError};

/// How long `shutdown` waits for the server to close its connections before giving up.
const SERVER_STOP_WAIT: Duration = Duration::from_secs(5);

/// What the transport, its peer tasks and its stream tasks share.
pub(crate) struct Inner {
    node: NodeId,
    config: GrpcConfig,
    runtime: Handle,
    /// Built once from `config.tls` (parsing the PEMs), cloned into every endpoint.
    client_tls: Option<ClientTlsConfig>,
    peers: RwLock<HashMap<NodeId, Arc<Peer>>>,
    /// When each node was last heard from (a frame from it, or an ack from it).
    heard: DashMap<NodeId, Instant>,
    started: Instant,
    counters: Counters,
    /// Snapshot transfers under way, one permit each (`max_concurrent_snapshots` per
    /// direction).
    outbound_snapshots: Arc<Semaphore>,
    inbound_snapshots: Arc<Semaphore>,
    closed: AtomicBool,
    /// This node's latest statistics, attached to what it sends (see `NodeBatch::stats`).
    local_stats: Mutex<Option<NodeStats>>,
    /// The latest statistics each peer sent, with when they arrived.
    peer_stats: DashMap<NodeId, (NodeStats, Instant)>,
    /// Flips to true once, on shutdown; server and stream tasks watch it.
    shutdown: watch::Sender<bool>,
}

impl Inner {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn heard(&self, node: NodeId) {
        self.heard.insert(node, Instant::now());
    }

    fn is_peer(&self, node: u64) -> bool {
        self.peers.read().contains_key(&NodeId(node))
    }

    fn peer(&self, node: NodeId) -> Option<Arc<Peer>> {
        self.peers.read().get(&node).cloned()
    }

    /// An empty frame (but for this node's statistics): answered with an ack, never
    /// delivered.
    fn ping(&self, to: NodeId) -> NodeBatch {
        NodeBatch {
            from_node: self.node.0,
            to_node: to.0,
            stats: self.local_stats(),
            ..Default::default()
        }
    }

    fn local_stats(&self) -> Option<NodeStats> {
        *self.local_stats.lock()
    }

    /// Keeps what a peer said of itself, if the frame carries it.
    fn note_stats(&self, from: NodeId, stats: Option<&NodeStats>) {
        if let Some(stats) = stats {
            self.peer_stats.insert(from, (*stats, Instant::now()));
        }
    }

    fn endpoint(&self, node: NodeId, addr: &str) -> Result<Endpoint, TransportError> {
        peer::endpoint(node, addr, &self.config, self.client_tls.as_ref())
    }

    fn set_peer(self: &Arc<Self>, node: NodeId, addr: String) -> Result<(), TransportError> {
        if node.0 == 0 || node == self.node {
            return Err(TransportError::InvalidAddress { node, addr });
        }
        self.endpoint(node, &addr)?;
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        let mut peers = self.peers.write();
        match peers.get(&node) {
            Some(peer) => peer.set_addr(addr),
            None => {
                peers.insert(node, Peer::spawn(self, node, addr));
            }
        }
        Ok(())
    }

    fn remove_peer(&self, node: NodeId) -> bool {
        let peer = self.peers.write().remove(&node);
        peer.inspect(|p| p.stop()).is_some()
    }

    fn stop_peers(&self) {
        let peers: Vec<_> = self.peers.write().drain().map(|(_, p)| p).collect();
        for peer in peers {
            peer.stop();
        }
    }
}

/// A transport whose socket is bound but that does not serve yet: what a node creates before
/// it has a [`BatchHandler`] (the runtime's `NodeGroup::start` hands one to a closure that
/// must return the transport). Binding first means the address is known, and a port clash is
/// reported, before anything starts.
///
/// Dropping it without [`GrpcListener::serve`] closes the socket and stops any peer tasks.
pub struct GrpcListener {
    inner: Arc<Inner>,
    /// `Some` until `serve`.
    bound: Option<(tokio::net::TcpListener, Server)>,
    local_addr: SocketAddr,
}

impl GrpcListener {
    /// The address the socket is bound to (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Sets the address of `node` before serving; see [`GrpcTransport::set_peer`].
    ///
    /// # Errors
    ///
    /// As [`GrpcTransport::set_peer`].
    pub fn set_peer(&self, node: NodeId, addr: String) -> Result<(), TransportError> {
        self.inner.set_peer(node, addr)
    }

    /// Starts serving: inbound batches go to `handler`, from a delivery thread named
    /// `flotilla-grpc-<node>`.
    ///
    /// # Panics
    ///
    /// If the delivery thread cannot be spawned.
    pub fn serve(mut self, handler: Arc<dyn BatchHandler>) -> GrpcTransport {
        let (listener, mut server) = self.bound.take().expect("serve consumes the listener");
        let inner = self.inner.clone();
        let delivery = Arc::new(Delivery::start(inner.clone(), handler));
        let limit = inner.config.max_frame_bytes;
        let service = RaftTransportServer::new(Service {
            inner: inner.clone(),
            delivery: delivery.clone(),
        })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut stop = inner.shutdown.subscribe();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let node = inner.node;
        inner.runtime.spawn(async move {
            let signal = async move {
                let _ = stop.wait_for(|closed| *closed).await;
            };
            let served = server
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, signal)
                .await;
            if let Err(e) = served {
                tracing::error!(%node, error = %e, "gRPC server failed");
            }
            let _ = done_tx.send(());
        });
        GrpcTransport {
            inner,
            delivery,
            server_done: Mutex::new(Some(done_rx)),
            local_addr: self.local_addr,
        }
    }
}

impl Drop for GrpcListener {
    fn drop(&mut self) {
        if self.bound.is_some() {
            self.inner.closed.store(true, Ordering::Release);
            self.inner.stop_peers();
        }
    }
}

impl fmt::Debug for GrpcListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcListener")
            .field("node", &self.inner.node)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

/// One node's gRPC transport: its server and its streams to every peer.
///
/// Create it with [`GrpcTransport::start`], or [`GrpcTransport::bind`] then
/// [`GrpcListener::serve`]; tell it where the other nodes are with
/// [`GrpcTransport::set_peer`].
pub struct GrpcTransport {
    inner: Arc<Inner>,
    delivery: Arc<Delivery>,
    /// Receives once the server task has ended; taken by the first `shutdown`.
    server_done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    local_addr: SocketAddr,
}

impl GrpcTransport {
    /// Validates `config`, loads its TLS material and binds `listen` (port 0 picks a free
    /// port), without serving yet. Tasks will run on `runtime`.
    ///
    /// # Errors
    ///
    /// [`TransportError::InvalidConfig`], [`TransportError::Tls`] (unreadable PEMs),
    /// [`TransportError::Bind`].
    pub fn bind(
        node: NodeId,
        config: GrpcConfig,
        listen: SocketAddr,
        runtime: Handle,
    ) -> Result<GrpcListener, TransportError> {
        if node.0 == 0 {
            return Err(TransportError::InvalidConfig {
                field: "node",
                problem: "must not be 0",
            });
        }
        config.validate()?;
        let (server, client_tls) = tls(&config)?;
        let bind_err = |e: std::io::Error| TransportError::Bind {
            addr: listen,
            reason: e.to_string(),
        };
        // Bound synchronously so that errors and the real port are known at once.
        let std_listener = std::net::TcpListener::bind(listen).map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let local_addr = std_listener.local_addr().map_err(bind_err)?;
        let listener = {
            let _in_runtime = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener).map_err(bind_err)?
        };
        let snapshots = config.max_concurrent_snapshots;
        let inner = Arc::new(Inner {
            node,
            config,
            runtime,
            client_tls,
            peers: RwLock::new(HashMap::new()),
            heard: DashMap::new(),
            started: Instant::now(),
            counters: Counters::default(),
            outbound_snapshots: Arc::new(Semaphore::new(snapshots)),
            inbound_snapshots: Arc::new(Semaphore::new(snapshots)),
            closed: AtomicBool::new(false),
            local_stats: Mutex::new(None),
            peer_stats: DashMap::new(),
            shutdown: watch::Sender::new(false),
        });
        Ok(GrpcListener {
            inner,
            bound: Some((listener, server)),
            local_addr,
        })
    }

    /// [`GrpcTransport::bind`] then [`GrpcListener::serve`]; returns the bound address too.
    ///
    /// # Errors
    ///
    /// As [`GrpcTransport::bind`].
    pub fn start(
        node: NodeId,
        config: GrpcConfig,
        listen: SocketAddr,
        runtime: Handle,
        handler: Arc<dyn BatchHandler>,
    ) -> Result<(GrpcTransport, SocketAddr), TransportError> {
        let listener = Self::bind(node, config, listen, runtime)?;
        let addr = listener.local_addr();
        Ok((listener.serve(handler), addr))
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.inner.node
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Adds `node` at `addr` (`host:port`), or moves it there: a stream to its old address is
    /// dropped and reopened to the new one at once. Batches from `node` are accepted from
    /// now on.
    ///
    /// # Errors
    ///
    /// [`TransportError::InvalidAddress`] if `addr` is not `host:port` or `node` is 0 or this
    /// node; [`TransportError::Tls`] if the TLS config cannot be applied to it;
    /// [`TransportError::Closed`] after shutdown.
    pub fn set_peer(&self, node: NodeId, addr: String) -> Result<(), TransportError> {
        self.inner.set_peer(node, addr)
    }

    /// Forgets `node`: its stream is closed, what was queued for it is dropped, sends to it
    /// return `UnknownNode` and its batches are no longer accepted. Returns whether it was
    /// known.
    pub fn remove_peer(&self, node: NodeId) -> bool {
        self.inner.remove_peer(node)
    }

    /// Whether a stream to `to` is established and acknowledged now (stricter than
    /// [`Transport::is_reachable`], which is also true while a first attempt is under way).
    pub fn is_connected(&self, to: NodeId) -> bool {
        self.inner
            .peer(to)
            .is_some_and(|p| p.state() == State::Connected)
    }

    /// Bytes accepted by `send` for `to` and not yet acknowledged by it.
    pub fn queued_bytes(&self, to: NodeId) -> usize {
        self.inner.peer(to).map_or(0, |p| p.queued_bytes())
    }

    /// Sets this node's statistics: from now on they ride on every ping and, at most once a
    /// `ping_interval`, on a data frame to each peer (`NodeBatch::stats`).
    pub fn publish_stats(&self, stats: NodeStats) {
        *self.inner.local_stats.lock() = Some(stats);
    }

    /// The latest statistics each peer sent, with the instant they arrived, in node order.
    /// A peer not heard from since it last published is absent.
    pub fn peer_stats(&self) -> Vec<(NodeId, NodeStats, Instant)> {
        let mut all: Vec<_> = self
            .inner
            .peer_stats
            .iter()
            .map(|e| (*e.key(), e.value().0, e.value().1))
            .collect();
        all.sort_by_key(|(n, _, _)| *n);
        all
    }

    /// Every peer (node with an address here), in node order.
    pub fn peers(&self) -> Vec<NodeId> {
        let mut all: Vec<NodeId> = self.inner.peers.read().keys().copied().collect();
        all.sort();
        all
    }

    /// Snapshot transfers under way now, sending and receiving.
    pub fn snapshots_in_flight(&self) -> usize {
        let max = self.inner.config.max_concurrent_snapshots;
        (max - self.inner.outbound_snapshots.available_permits().min(max))
            + (max - self.inner.inbound_snapshots.available_permits().min(max))
    }

    /// The counters so far.
    pub fn stats(&self) -> GrpcStats {
        self.inner.counters.snapshot()
    }

    /// Waits until `cond` holds for the counters, for at most `timeout`; returns whether it
    /// held. Tests await outcomes with this instead of sleeping.
    pub fn wait_for_stats(&self, timeout: Duration, cond: impl FnMut(&GrpcStats) -> bool) -> bool {
        self.inner.counters.wait_until(timeout, cond)
    }

    /// Queues the batch and starts its snapshots' transfers; the size queued, if any. On an
    /// error nothing is queued and no transfer started, so the caller reports every snapshot
    /// of the batch failed itself; on success each transfer reports its own outcome.
    fn try_send(&self, to: NodeId, mut batch: NodeBatch) -> Result<Option<usize>, TransportError> {
        let inner = &self.inner;
        if inner.is_closed() {
            return Err(TransportError::Closed);
        }
        let snapshots = take_snapshots(&mut batch);
        let has_batch = !(batch.messages.is_empty() && batch.heartbeats.is_empty());
        if !has_batch && snapshots.is_empty() {
            return Ok(None);
        }
        let peer = inner.peer(to).ok_or(TransportError::UnknownNode(to))?;
        if !snapshots.is_empty() && peer.state() == State::Backoff {
            // Known down: fail now rather than with a connect timeout.
            return Err(TransportError::Unreachable(to));
        }
        let mut queued = None;
        if has_batch {
            batch.from_node = inner.node.0;
            batch.to_node = to.0;
            let size = batch.encoded_len();
            let limit = inner.config.max_frame_bytes;
            if size > limit {
                return Err(TransportError::FrameTooLarge { size, limit });
            }
            let (messages, heartbeats) = (batch.messages.len(), batch.heartbeats.len());
            peer.enqueue(batch, size, inner.config.queue_budget_bytes)?;
            Counters::add(&inner.counters.sent_messages, messages as u64);
            Counters::add(&inner.counters.sent_heartbeats, heartbeats as u64);
            queued = Some(size);
        }
        for env in snapshots {
            snapshot::start(inner, &self.delivery, to, peer.addr(), env);
        }
        Ok(queued)
    }
}

/// Takes the snapshot envelopes out of `batch`, keeping the order of the rest.
fn take_snapshots(batch: &mut NodeBatch) -> Vec<RaftMessage> {
    if !batch.messages.iter().any(|m| m.snapshot) {
        return Vec::new();
    }
    let (snapshots, rest) = std::mem::take(&mut batch.messages)
        .into_iter()
        .partition(|m| m.snapshot);
    batch.messages = rest;
    snapshots
}

impl Transport for GrpcTransport {
    /// Queues `batch` for `to`'s stream; an empty batch is accepted and discarded. Snapshot
    /// envelopes are taken out and streamed on calls of their own (see `reports_snapshots`).
    /// `Unreachable` means the stream to `to` is down and waiting to reconnect.
    fn send(&self, to: NodeId, batch: NodeBatch) -> Result<(), TransportError> {
        let counters = &self.inner.counters;
        let result = self.try_send(to, batch);
        let (counter, why) = match &result {
            Ok(None) => return Ok(()),
            Ok(Some(bytes)) => {
                // No notify: nothing waits on acceptance, and this is the hot path.
                Counters::add(&counters.sent_batches, 1);
                metric::sent(*bytes);
                return Ok(());
            }
            Err(TransportError::Full { .. }) => (&counters.rejected_full, Rejected::Full),
            Err(TransportError::Unreachable(_)) => {
                (&counters.rejected_unreachable, Rejected::Unreachable)
            }
            Err(TransportError::UnknownNode(_)) => {
                (&counters.rejected_unknown_node, Rejected::UnknownNode)
            }
            Err(TransportError::FrameTooLarge { .. }) => {
                (&counters.rejected_too_large, Rejected::TooLarge)
            }
            Err(_) => {
                metric::rejected(Rejected::Closed);
                return result.map(|_| ());
            }
        };
        Counters::add(counter, 1);
        metric::rejected(why);
        counters.notify();
        result.map(|_| ())
    }

    /// True if `to` is a peer whose stream is up or being opened; false while it waits to
    /// reconnect after a failure, and after shutdown.
    fn is_reachable(&self, to: NodeId) -> bool {
        !self.inner.is_closed()
            && self
                .inner
                .peer(to)
                .is_some_and(|p| p.state() != State::Backoff)
    }

    /// Stops every task and the server, and joins the delivery thread (unless called from
    /// the handler). Waits up to 5 s for the server to close its socket and connections,
    /// except on a tokio runtime thread, where waiting could starve the very tasks it waits
    /// for: there it returns at once and the server finishes on its own. Idempotent.
    fn shutdown(&self) {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        inner.shutdown.send_replace(true);
        inner.stop_peers();
        self.delivery.stop();
        let Some(done) = self.server_done.lock().take() else {
            return;
        };
        // `Disconnected` means the server task is gone already (its runtime was shut down).
        if Handle::try_current().is_err()
            && done.recv_timeout(SERVER_STOP_WAIT) == Err(RecvTimeoutError::Timeout)
        {
            tracing::warn!(node = %inner.node, "gRPC server did not stop within {SERVER_STOP_WAIT:?}");
        }
    }

    /// True: every snapshot of an accepted batch is reported through
    /// [`BatchHandler::on_snapshot_status`] once its transfer ends.
    fn reports_snapshots(&self) -> bool {
        true
    }

    /// The last frame or ack from `from`. For a peer never heard from: the instant this
    /// transport started (silence since then). `None` for nodes that are not peers.
    fn last_heard_from(&self, from: NodeId) -> Option<Instant> {
        if let Some(at) = self.inner.heard.get(&from) {
            return Some(*at);
        }
        self.inner.peer(from).map(|_| self.inner.started)
    }

    /// The last attempt to open the stream to `node` was refused, none started since.
    fn connection_refused(&self, node: NodeId) -> bool {
        self.inner
            .peer(node)
            .is_some_and(|p| p.refused.load(std::sync::atomic::Ordering::Acquire))
    }
}

impl Drop for GrpcTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for GrpcTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut peers: Vec<_> = self.inner.peers.read().keys().copied().collect();
        peers.sort();
        f.debug_struct("GrpcTransport")
            .field("node", &self.inner.node)
            .field("local_addr", &self.local_addr)
            .field("peers", &peers)
            .field("closed", &self.inner.is_closed())
            .finish_non_exhaustive()
    }
}

/// The server builder and the client TLS config for `config.tls` (plaintext if `None`).
/// Parses the PEMs now, so that bad material fails `bind` rather than every connection.
fn tls(config: &GrpcConfig) -> Result<(Server, Option<ClientTlsConfig>), TransportError> {
    let Some(tls) = &config.tls else {
        return Ok((Server::builder(), None));
    };
    let ca = Certificate::from_pem(&tls.ca_pem);
    let identity = Identity::from_pem(&tls.cert_pem, &tls.key_pem);
    let tls_err = |e: tonic::transport::Error| TransportError::Tls(peer::error_chain(&e));
    let server = Server::builder()
        .tls_config(
            ServerTlsConfig::new()
                .identity(identity.clone())
                .client_ca_root(ca.clone()),
        )
        .map_err(tls_err)?;
    let mut client = ClientTlsConfig::new().ca_certificate(ca).identity(identity);
    if let Some(name) = &tls.server_name {
        client = client.domain_name(name.clone());
    }
    // tonic parses the client material only when it is applied to an endpoint: do it once.
    Endpoint::from_static("https://localhost:1")
        .tls_config(client.clone())
        .map_err(tls_err)?;
    Ok((server, Some(client)))
}
