//! The in-memory network: several nodes in one process, for tests and the cluster harness.
//!
//! [`MemNetwork::register`] gives a node its [`MemTransport`] and starts the node's delivery
//! thread (see `delivery.rs`), which calls the node's [`BatchHandler`]. `send` only queues:
//! it never runs a handler or a filter on the caller's thread, because the runtime sends from
//! worker threads that hold locks a handler may need.
//!
//! # Node lifecycle
//!
//! - A node is *registered* from [`MemNetwork::register`] until [`MemNetwork::unregister`],
//!   [`Transport::shutdown`] on its transport, or the network being dropped.
//! - Sending to a node that was registered and is stopped returns
//!   [`TransportError::Unreachable`] (the runtime then reports it to raft, as it would for a
//!   dead process); sending to a node never registered returns
//!   [`TransportError::UnknownNode`]. What was queued for a stopped node is dropped and
//!   counted in [`NetStats::dropped_unreachable`].
//! - When `unregister` returns, the old handler is not running and will never be called
//!   again, and the old [`MemTransport`] returns [`TransportError::Closed`]. The node id can
//!   then be registered again with a new handler (a restart).
//! - Batches a stopped node sent before it stopped are still delivered: they were on the wire.

mod delivery;
mod stats;

#[cfg(test)]
mod filter_tests;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use dashmap::DashMap;
use flotilla_proto::transport::NodeBatch;
use flotilla_proto::NodeId;
use parking_lot::{Mutex, RwLock};
use prost::Message;

use self::delivery::Delivery;
use self::stats::Counters;
pub use self::stats::NetStats;
use crate::budget::{Charge, QueueBytes};
use crate::filter::{Filter, FilterId, Packet, Payload};
use crate::metric::{self, Rejected};
use crate::{BatchHandler, Transport, TransportError};

/// Limits of the in-memory network; the same kinds of limits the gRPC transport will have,
/// so that back-pressure and oversized batches can be tested without sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemConfig {
    /// Bytes (encoded) that may be queued from one node to another and not yet delivered
    /// (including batches a handler is still processing) before `send` returns
    /// [`TransportError::Full`]; snapshot envelopes are not counted. An empty queue accepts
    /// any batch within `max_frame_bytes`. Default: 32 MiB.
    pub queue_budget_bytes: usize,
    /// Largest batch `send` accepts, in encoded bytes, not counting snapshot envelopes
    /// (`RaftMessage.snapshot`), which travel beside the frames as on gRPC; larger ones get
    /// [`TransportError::FrameTooLarge`]. Default: 16 MiB.
    pub max_frame_bytes: usize,
}

impl Default for MemConfig {
    fn default() -> Self {
        Self {
            queue_budget_bytes: 32 << 20,
            max_frame_bytes: 16 << 20,
        }
    }
}

/// Installed filters, in installation order. Replaced whole on change (copy on write) so the
/// delivery threads read them with one short lock per round.
pub(crate) type FilterSet = Arc<Vec<(FilterId, Arc<dyn Filter>)>>;

/// What the network, its transports and its delivery threads share. Deliberately not the
/// [`MemNetwork`] itself: handlers often own a node's transport, and if transports kept the
/// network alive, dropping the network could never stop the threads that own the handlers.
struct Shared {
    config: MemConfig,
    /// Every node ever registered: `Some` while registered, `None` once stopped (so that a
    /// send can tell `Unreachable` from `UnknownNode`).
    nodes: RwLock<HashMap<NodeId, Option<Arc<Endpoint>>>>,
    filters: RwLock<FilterSet>,
    next_filter: AtomicU64,
    counters: Counters,
    /// Nodes made silent by [`MemNetwork::set_silent`].
    silent: RwLock<std::collections::HashSet<NodeId>>,
    /// Nodes starting up: not registered yet, but holding their address (see
    /// [`MemNetwork::set_starting`]).
    starting: RwLock<std::collections::HashSet<NodeId>>,
}

impl Shared {
    fn filters(&self) -> FilterSet {
        self.filters.read().clone()
    }

    fn endpoint(&self, node: NodeId) -> Result<Arc<Endpoint>, TransportError> {
        match self.nodes.read().get(&node) {
            Some(Some(ep)) if !ep.is_stopped() => Ok(ep.clone()),
            Some(_) => Err(TransportError::Unreachable(node)),
            None => Err(TransportError::UnknownNode(node)),
        }
    }

    /// Marks `node` stopped if it is still served by `only` (any endpoint if `None`), and
    /// returns the endpoint taken out.
    fn take_endpoint(&self, node: NodeId, only: Option<&Arc<Endpoint>>) -> Option<Arc<Endpoint>> {
        let mut nodes = self.nodes.write();
        let slot = nodes.get_mut(&node)?;
        let newer =
            matches!((slot.as_ref(), only), (Some(cur), Some(only)) if !Arc::ptr_eq(cur, only));
        if newer {
            None
        } else {
            slot.take()
        }
    }
}

/// One registration of a node: its inbox and delivery thread.
struct Endpoint {
    node: NodeId,
    stopped: AtomicBool,
    inbox: Sender<Inbound>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Endpoint {
    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Stops delivery and waits for the delivery thread to exit, so that the handler is not
    /// running when this returns. Idempotent. Called from the node's own handler it cannot
    /// wait for itself: delivery then stops as soon as the handler returns.
    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        // Wakes the thread if it is waiting on an empty inbox; fails only if it already left.
        let _ = self.inbox.send(Inbound::Stop);
        let Some(thread) = self.thread.lock().take() else {
            return;
        };
        if thread.thread().id() == std::thread::current().id() {
            return;
        }
        if thread.join().is_err() {
            // The panic itself was already printed by the panicking thread.
            tracing::error!(node = %self.node, "in-memory delivery thread panicked in its handler");
        }
    }
}

/// What goes through a node's inbox.
enum Inbound {
    Batch(Envelope),
    /// Signalled once what was queued before it went to the handler (see
    /// [`MemNetwork::wait_delivered`]).
    Barrier(Sender<()>),
    Stop,
}

/// One accepted `send`.
struct Envelope {
    from: NodeId,
    batch: NodeBatch,
    charge: Charge,
    /// Delivered by [`MemNetwork::deliver`]: skips the filters.
    released: bool,
}

/// An in-memory network of nodes, with fault-injection filters.
///
/// Dropping the network stops every node's delivery (as if all were unregistered), which
/// also drops their handlers.
pub struct MemNetwork {
    shared: Arc<Shared>,
}

impl MemNetwork {
    /// A network with the default [`MemConfig`].
    pub fn new() -> Arc<Self> {
        Self::with_config(MemConfig::default())
    }

    /// A network with the given limits.
    pub fn with_config(config: MemConfig) -> Arc<Self> {
        Arc::new(Self {
            shared: Arc::new(Shared {
                config,
                nodes: RwLock::new(HashMap::new()),
                filters: RwLock::new(Arc::new(Vec::new())),
                next_filter: AtomicU64::new(1),
                counters: Counters::default(),
                silent: Default::default(),
                starting: Default::default(),
            }),
        })
    }

    /// Registers `node`, whose arriving batches go to `handler`, and returns its transport.
    /// Starts the node's delivery thread (named `flotilla-mem-n<id>`).
    ///
    /// # Panics
    ///
    /// If `node` is 0 (never a valid node id), if it is already registered (unregister it
    /// first to restart it), or if the thread cannot be spawned.
    pub fn register(&self, node: NodeId, handler: Arc<dyn BatchHandler>) -> MemTransport {
        assert_ne!(node.0, 0, "node id 0 is never valid");
        let mut nodes = self.shared.nodes.write();
        assert!(
            !matches!(nodes.get(&node), Some(Some(_))),
            "{node} is already registered on this network; unregister it first"
        );
        let (tx, rx) = crossbeam_channel::unbounded();
        let endpoint = Arc::new(Endpoint {
            node,
            stopped: AtomicBool::new(false),
            inbox: tx,
            thread: Mutex::new(None),
        });
        let delivery = Delivery::new(self.shared.clone(), endpoint.clone(), handler);
        let thread = std::thread::Builder::new()
            .name(format!("flotilla-mem-{node}"))
            .spawn(move || delivery.run(rx))
            .expect("spawn in-memory delivery thread");
        *endpoint.thread.lock() = Some(thread);
        nodes.insert(node, Some(endpoint.clone()));
        MemTransport {
            node,
            shared: self.shared.clone(),
            endpoint,
            queues: DashMap::new(),
            heard: DashMap::new(),
            started: Instant::now(),
        }
    }

    /// Stops `node` (see the module docs): drops what is queued for it, waits until its
    /// handler is no longer running, and closes its transport. Returns whether it was
    /// registered.
    ///
    /// Do not call this while holding a lock the node's handler may take: it waits for the
    /// handler. Calling it from the node's own handler is fine.
    pub fn unregister(&self, node: NodeId) -> bool {
        // Taken out under the lock, stopped outside it: stopping waits for the handler, and
        // the handler may be sending (which reads `nodes`).
        match self.shared.take_endpoint(node, None) {
            Some(ep) => {
                ep.stop();
                true
            }
            None => false,
        }
    }

    /// Makes `node` silent (`true`) for node liveness, as a paused process whose pings stop
    /// (SIGSTOP), or audible again: the other nodes' [`Transport::last_heard_from`] stops
    /// moving for it. Delivery is not affected (a hold filter keeps what it is sent).
    pub fn set_silent(&self, node: NodeId, silent: bool) {
        let mut set = self.shared.silent.write();
        if silent {
            set.insert(node);
        } else {
            set.remove(&node);
        }
    }

    /// Marks `node` as starting (`true`) until it registers: a gRPC node binds its address
    /// before it opens its store and recovers its replicas, so connections to it meanwhile
    /// are accepted and answer nothing (they time out) instead of being refused
    /// ([`Transport::connection_refused`]); a restart that takes a while so is not taken for a
    /// process that is gone. `false` takes the mark back.
    pub fn set_starting(&self, node: NodeId, starting: bool) {
        let mut set = self.shared.starting.write();
        if starting {
            set.insert(node);
        } else {
            set.remove(&node);
        }
    }

    /// Whether `node` is registered now.
    pub fn is_registered(&self, node: NodeId) -> bool {
        matches!(self.shared.nodes.read().get(&node), Some(Some(_)))
    }

    /// Installs `filter` after the ones already installed. It applies to everything not yet
    /// delivered, including batches already queued.
    pub fn add_filter(&self, filter: Box<dyn Filter>) -> FilterId {
        let id = FilterId(self.shared.next_filter.fetch_add(1, Ordering::Relaxed));
        let mut filters = self.shared.filters.write();
        let mut next = Vec::clone(&filters);
        next.push((id, Arc::from(filter)));
        *filters = Arc::new(next);
        id
    }

    /// Removes one filter; returns whether it was installed. Packets it already delayed stay
    /// delayed.
    pub fn remove_filter(&self, id: FilterId) -> bool {
        let mut filters = self.shared.filters.write();
        if !filters.iter().any(|(i, _)| *i == id) {
            return false;
        }
        let next = filters.iter().filter(|(i, _)| *i != id).cloned().collect();
        *filters = Arc::new(next);
        true
    }

    /// Removes every filter.
    pub fn clear_filters(&self) {
        *self.shared.filters.write() = Arc::new(Vec::new());
    }

    /// Delivers packets a [`HoldFilter`](crate::HoldFilter) kept, in the order given: each
    /// reaches its destination as if its sender had sent it now, except that it skips the
    /// filters (it went through them when it was sent) and counts against no queue budget.
    /// Order is kept per node pair as for `send`: separately for raft messages and for
    /// heartbeats (see the crate docs).
    ///
    /// # Errors
    ///
    /// [`TransportError::Unreachable`] or [`TransportError::UnknownNode`] for the first
    /// packet whose destination is not registered; the packets before it were queued, the
    /// rest were not.
    pub fn deliver(&self, packets: Vec<Packet>) -> Result<(), TransportError> {
        let mut packets = packets.into_iter().peekable();
        while let Some(first) = packets.next() {
            let (from, to) = (first.from, first.to);
            let mut batch = NodeBatch {
                from_node: from.0,
                to_node: to.0,
                ..Default::default()
            };
            let mut next = Some(first);
            while let Some(p) = next {
                match p.payload {
                    Payload::Message(m) => batch.messages.push(m),
                    Payload::Heartbeat(h) => batch.heartbeats.push(h),
                }
                next = packets.next_if(|p| (p.from, p.to) == (from, to));
            }
            let envelope = Envelope {
                from,
                batch,
                charge: Charge::none(),
                released: true,
            };
            self.shared
                .endpoint(to)?
                .inbox
                .send(Inbound::Batch(envelope))
                .map_err(|_| TransportError::Unreachable(to))?;
        }
        Ok(())
    }

    /// Waits until everything queued for `node` before this call was handed to its handler,
    /// except what filters delay, reorder or hold (and what they drop), for at most
    /// `timeout`. Returns false on timeout or if `node` is not registered. Lets a test know
    /// that a packet it [delivered](Self::deliver) reached the node before it acts next.
    pub fn wait_delivered(&self, node: NodeId, timeout: Duration) -> bool {
        let Ok(endpoint) = self.shared.endpoint(node) else {
            return false;
        };
        let (done, delivered) = crossbeam_channel::bounded(1);
        if endpoint.inbox.send(Inbound::Barrier(done)).is_err() {
            return false;
        }
        delivered.recv_timeout(timeout).is_ok()
    }

    /// The counters so far.
    pub fn stats(&self) -> NetStats {
        self.shared.counters.snapshot()
    }

    /// Waits until `cond` holds for the counters, for at most `timeout`; returns whether it
    /// held. Tests use this to await an outcome instead of sleeping.
    pub fn wait_for_stats(&self, timeout: Duration, cond: impl FnMut(&NetStats) -> bool) -> bool {
        self.shared.counters.wait_until(timeout, cond)
    }
}

impl Drop for MemNetwork {
    fn drop(&mut self) {
        let endpoints: Vec<_> = self
            .shared
            .nodes
            .write()
            .values_mut()
            .filter_map(Option::take)
            .collect();
        for ep in endpoints {
            ep.stop();
        }
    }
}

impl fmt::Debug for MemNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes = self.shared.nodes.read();
        let mut registered: Vec<_> = nodes
            .iter()
            .filter(|(_, e)| e.is_some())
            .map(|(n, _)| *n)
            .collect();
        registered.sort();
        f.debug_struct("MemNetwork")
            .field("config", &self.shared.config)
            .field("registered", &registered)
            .field("filters", &self.shared.filters.read().len())
            .finish()
    }
}

/// One node's handle on a [`MemNetwork`]: what its runtime sends through.
pub struct MemTransport {
    node: NodeId,
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    /// Bytes queued to each destination by this node (this incarnation of it).
    queues: DashMap<NodeId, QueueBytes>,
    /// When each node was last heard from (see [`Transport::last_heard_from`]).
    heard: DashMap<NodeId, Instant>,
    started: Instant,
}

impl MemTransport {
    /// The node this transport sends from.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Bytes this node has queued to `to` and that are not yet delivered or dropped.
    pub fn queued_bytes(&self, to: NodeId) -> usize {
        self.queues
            .get(&to)
            .map_or(0, |q| q.load(Ordering::Acquire))
    }

    /// Queues `batch`; returns its size, or `None` if it was empty (nothing to send).
    fn try_send(&self, to: NodeId, mut batch: NodeBatch) -> Result<Option<usize>, TransportError> {
        if self.endpoint.is_stopped() {
            return Err(TransportError::Closed);
        }
        if batch.messages.is_empty() && batch.heartbeats.is_empty() {
            return Ok(None);
        }
        batch.from_node = self.node.0;
        batch.to_node = to.0;
        let size = batch.encoded_len();
        // Snapshots travel beside the frames, as on gRPC (which streams them in chunks): they
        // count against neither the frame limit nor the queue budget, or a range bigger than a
        // frame could never catch a follower up.
        let snapshot_bytes: usize = batch
            .messages
            .iter()
            .filter(|m| m.snapshot)
            .map(|m| m.encoded_len())
            .sum();
        let framed = size.saturating_sub(snapshot_bytes);
        let limit = self.shared.config.max_frame_bytes;
        if framed > limit {
            return Err(TransportError::FrameTooLarge {
                size: framed,
                limit,
            });
        }
        let dest = self.shared.endpoint(to)?;
        let queue = self.queues.entry(to).or_default().clone();
        let charge = Charge::reserve(&queue, framed, self.shared.config.queue_budget_bytes)
            .map_err(|queued_bytes| TransportError::Full { to, queued_bytes })?;
        let envelope = Envelope {
            from: self.node,
            batch,
            charge,
            released: false,
        };
        // Fails only if the delivery thread is gone (stopped, or its handler panicked).
        dest.inbox
            .send(Inbound::Batch(envelope))
            .map_err(|_| TransportError::Unreachable(to))?;
        Ok(Some(size))
    }
}

impl Transport for MemTransport {
    /// Queues `batch` for `to`'s delivery thread. An empty batch is accepted and discarded.
    fn send(&self, to: NodeId, batch: NodeBatch) -> Result<(), TransportError> {
        let counters = &self.shared.counters;
        match self.try_send(to, batch) {
            Ok(None) => Ok(()),
            Ok(Some(bytes)) => {
                Counters::add(&counters.sent_batches, 1);
                metric::sent(bytes);
                Ok(())
            }
            Err(e) => {
                let why = match &e {
                    TransportError::Full { .. } => {
                        Counters::add(&counters.rejected_full, 1);
                        Rejected::Full
                    }
                    TransportError::Unreachable(_) => {
                        Counters::add(&counters.rejected_unreachable, 1);
                        Rejected::Unreachable
                    }
                    TransportError::UnknownNode(_) => {
                        Counters::add(&counters.rejected_unreachable, 1);
                        Rejected::UnknownNode
                    }
                    TransportError::FrameTooLarge { .. } => Rejected::TooLarge,
                    // The others are receive-side or construction errors; `send` never
                    // returns them.
                    TransportError::Closed
                    | TransportError::Decode(_)
                    | TransportError::InvalidConfig { .. }
                    | TransportError::InvalidAddress { .. }
                    | TransportError::Bind { .. }
                    | TransportError::Tls(_) => Rejected::Closed,
                };
                metric::rejected(why);
                counters.notify();
                Err(e)
            }
        }
    }

    /// True if `to` is registered and no installed filter cuts the link from this node to it
    /// (partitions and isolation do; random loss does not).
    fn is_reachable(&self, to: NodeId) -> bool {
        !self.endpoint.is_stopped()
            && self.shared.endpoint(to).is_ok()
            && !self
                .shared
                .filters()
                .iter()
                .any(|(_, f)| f.blocks(self.node, to))
    }

    /// The network's stand-in for the gRPC transport's pings: a node is heard *now* while it
    /// is registered, not made silent ([`MemNetwork::set_silent`]) and no filter cuts the
    /// link from it to this node (partitions and isolation do); otherwise the answer is the
    /// last time it was heard (this transport's start if never).
    fn last_heard_from(&self, from: NodeId) -> Option<Instant> {
        let hearable = self.shared.endpoint(from).is_ok()
            && !self.shared.silent.read().contains(&from)
            && !self
                .shared
                .filters()
                .iter()
                .any(|(_, f)| f.blocks(from, self.node));
        if hearable {
            let now = Instant::now();
            self.heard.insert(from, now);
            return Some(now);
        }
        Some(self.heard.get(&from).map_or(self.started, |t| *t))
    }

    /// A node that is not registered (stopped, or not started yet) refuses, as a closed port
    /// does, unless it is starting ([`MemNetwork::set_starting`]: its address is bound) or a
    /// filter or `set_silent` stands between (those model partitions and pauses, which time
    /// out rather than refuse).
    fn connection_refused(&self, node: NodeId) -> bool {
        self.shared.endpoint(node).is_err()
            && !self.shared.starting.read().contains(&node)
            && !self.shared.silent.read().contains(&node)
            && !self
                .shared
                .filters()
                .iter()
                .any(|(_, f)| f.blocks(node, self.node))
    }

    /// Unregisters this node, unless it was already restarted with a newer registration
    /// (then only this old handle is closed). Same guarantees as [`MemNetwork::unregister`].
    fn shutdown(&self) {
        self.shared.take_endpoint(self.node, Some(&self.endpoint));
        self.endpoint.stop();
    }
}

impl fmt::Debug for MemTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemTransport")
            .field("node", &self.node)
            .field("closed", &self.endpoint.is_stopped())
            .finish_non_exhaustive()
    }
}
