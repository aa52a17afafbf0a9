//! The state one NodeGroup's threads share: the registry of replica cells, the router, the
//! engine, the requests in flight. The API, the workers, the ticker, the split checker and the
//! inbound handler all hold it through an `Arc`. Only `fsm::life` adds replicas to the
//! registry or takes them out.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crossbeam_channel::Sender;
use dashmap::DashMap;
use flotilla_proto::command::{
    raft_command, system_command, AllocateIds, IdBlock, IdKind, RaftCommand, RequestHeader,
    SystemCommand,
};
use flotilla_proto::transport::Heartbeat;
use flotilla_proto::{Message as _, NodeId, RangeId};
use flotilla_store::Engine;
use flotilla_transport::Transport;
use parking_lot::Mutex;

use crate::config::NodeGroupConfig;
use crate::error::{Error, Result};
use crate::fsm::load::LoadStats;
use crate::fsm::mailbox::{ReplicaCell, SendError};
use crate::pending::Pending;
use crate::replica::{Env, PeerMsg};
use crate::router::RangeRouter;
use crate::state_machine::StateMachine;
use crate::system::{IdLease, ID_LEASE_BLOCK};

/// State shared by the API, the workers, the ticker and the inbound handler.
pub(crate) struct Shared {
    pub(crate) config: NodeGroupConfig,
    pub(crate) node: NodeId,
    pub(crate) engine: Arc<Engine>,
    pub(crate) state_machine: Arc<dyn StateMachine>,
    pub(crate) transport: OnceLock<Arc<dyn Transport>>,
    pub(crate) router: RangeRouter,
    /// Every replica hosted here, initialized or not (see `fsm::life`).
    pub(super) replicas: DashMap<u64, Arc<ReplicaCell>>,
    /// Replicas the ticker ticks: every hosted replica but those asleep (see
    /// `replica::hibernate`); the worker moves a cell in or out after its round.
    pub(crate) awake: DashMap<u64, Arc<ReplicaCell>>,
    /// How many of the awake replicas are done with any election (leaders whose term's first
    /// entry is committed, followers that know their leader: they only wait to fall asleep):
    /// the paced wake queue does not count them as elections in flight.
    pub(crate) settled: std::sync::atomic::AtomicUsize,
    /// Node liveness, the leader index and the paced wake queue (`fsm::liveness`).
    pub(crate) liveness: crate::fsm::liveness::Liveness,
    /// Ranges whose replica here was removed, with the conf_ver of the removal: messages
    /// from that membership era must not recreate it.
    pub(crate) tombstones: DashMap<u64, u64>,
    pub(crate) pending: Pending,
    /// Merge sources handed over to their target (range id → prepare index): taken out of
    /// service, waiting for the target's CommitMerge apply to tombstone them.
    pub(super) handovers: DashMap<u64, u64>,
    /// Serializes creating replicas by message with bootstrapping them, so that a replica
    /// created for a message and a bootstrapped one never both come to exist.
    pub(super) create_lock: Mutex<()>,
    /// Plain heartbeats waiting for the ticker, per destination node (ordered: see `Output`).
    pub(crate) tick_heartbeats: Mutex<BTreeMap<NodeId, Vec<Heartbeat>>>,
    /// Ranges whose applied writes passed the split-check threshold since their last check.
    pub(crate) split_candidates: Mutex<HashSet<u64>>,
    /// Client requests per range in the current load window (only ranges with traffic).
    pub(crate) load: DashMap<u64, LoadStats>,
    /// Range ids leased from the system range and not used yet.
    range_ids: IdLease,
    pub(crate) ready_tx: Sender<Arc<ReplicaCell>>,
    pub(super) logger: slog::Logger,
    stopped: AtomicBool,
    /// Set by tests to stop this node's clock (see `NodeGroup::pause_ticker`).
    pub(crate) ticker_paused: AtomicBool,
    /// Times a replica here became leader.
    pub(crate) elections_won: std::sync::atomic::AtomicU64,
    /// Heartbeat batches the ticker sent.
    pub(crate) heartbeat_batches: std::sync::atomic::AtomicU64,
    /// Client writes (commands) proposed through this node, and client reads (keys) served
    /// through it, since it started: the node statistics derive rates from them.
    pub(crate) writes: std::sync::atomic::AtomicU64,
    pub(crate) reads: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub(crate) fn new(
        config: NodeGroupConfig,
        engine: Arc<Engine>,
        state_machine: Arc<dyn StateMachine>,
        ready_tx: Sender<Arc<ReplicaCell>>,
    ) -> Shared {
        let node = NodeId(config.node_id);
        Shared {
            logger: crate::logger::root_logger(node.0),
            config,
            node,
            engine,
            state_machine,
            transport: OnceLock::new(),
            router: RangeRouter::new(),
            replicas: DashMap::new(),
            awake: DashMap::new(),
            settled: Default::default(),
            liveness: Default::default(),
            tombstones: DashMap::new(),
            pending: Pending::default(),
            handovers: DashMap::new(),
            create_lock: Mutex::new(()),
            tick_heartbeats: Mutex::new(Default::default()),
            split_candidates: Mutex::new(Default::default()),
            load: DashMap::new(),
            range_ids: IdLease::default(),
            ready_tx,
            stopped: AtomicBool::new(false),
            ticker_paused: AtomicBool::new(false),
            elections_won: Default::default(),
            heartbeat_batches: Default::default(),
            writes: Default::default(),
            reads: Default::default(),
        }
    }

    /// What a replica may read while this node's worker drives it.
    pub(crate) fn env(&self) -> Env<'_> {
        Env {
            config: &self.config,
            node: self.node,
            engine: &self.engine,
            router: &self.router,
            state_machine: &*self.state_machine,
            pending: &self.pending,
            host: self,
        }
    }

    /// Proposes `cmd` to the system range through this node's replica of it (a follower
    /// forwards it to the leader); the receiver gets the answer once it applied here.
    ///
    /// # Errors
    ///
    /// `SystemUnavailable` if this node holds no replica of the system range; the mailbox's
    /// errors (`Busy`, `ReplicaFailed`); `Stopped`.
    pub(crate) fn propose_system(
        &self,
        cmd: SystemCommand,
    ) -> Result<tokio::sync::oneshot::Receiver<crate::pending::Answer>> {
        if self.is_stopped() {
            return Err(Error::Stopped);
        }
        if self.cell(RangeId::SYSTEM).is_none() {
            return Err(Error::SystemUnavailable(format!(
                "{} holds no replica of the system range",
                self.node
            )));
        }
        let (token, rx) = self.pending.register(self.config.proposal_timeout);
        let data = RaftCommand {
            header: Some(RequestHeader {
                range_id: RangeId::SYSTEM.0,
                proposer_node: self.node.0,
                proposal_token: token,
                ..Default::default()
            }),
            body: Some(raft_command::Body::System(cmd)),
        }
        .encode_to_vec();
        if let Err(e) = self.post(RangeId::SYSTEM, PeerMsg::Propose { token, data }) {
            self.pending.complete(token, Err(e.clone()));
            return Err(e);
        }
        Ok(rx)
    }

    /// A range id for a new range (split), from this node's lease; `None` when the lease is
    /// used up (see [`Shared::lease_range_ids`]).
    pub(crate) fn take_range_id(&self) -> Option<u64> {
        self.range_ids.take()
    }

    /// Starts leasing a block of [`ID_LEASE_BLOCK`] range ids from the system range; the
    /// receiver's answer is an encoded `IdBlock`, to hand to [`Shared::add_range_ids`].
    pub(crate) fn lease_range_ids(
        &self,
    ) -> Result<tokio::sync::oneshot::Receiver<crate::pending::Answer>> {
        self.propose_system(SystemCommand {
            cmd: Some(system_command::Cmd::Allocate(AllocateIds {
                kind: IdKind::RangeIds as i32,
                count: ID_LEASE_BLOCK,
            })),
        })
    }

    /// Adds the block a [`Shared::lease_range_ids`] answered to the lease; any failure to get
    /// it is `SystemUnavailable`, so that a split never goes on without an id.
    pub(crate) fn add_range_ids(&self, answer: Option<crate::pending::Answer>) -> Result<()> {
        let unavailable = |why: String| Error::SystemUnavailable(format!("no range ids: {why}"));
        let bytes = match answer {
            Some(Ok(b)) => b,
            Some(Err(Error::Stopped)) | None => return Err(Error::Stopped),
            Some(Err(e)) => return Err(unavailable(e.to_string())),
        };
        let block = IdBlock::decode(&bytes[..]).map_err(|e| unavailable(e.to_string()))?;
        tracing::debug!(node = %self.node, start = block.start, count = block.count, "leased range ids");
        self.range_ids.add(block.start, block.count);
        Ok(())
    }

    /// Counts a client request for load-based splits (only when they are on).
    pub(crate) fn record_load(&self, range: u64, key: &[u8]) {
        if self.config.split.load_qps > 0 {
            self.load.entry(range).or_default().record(key);
        }
    }

    pub(crate) fn cell(&self, range: RangeId) -> Option<Arc<ReplicaCell>> {
        self.replicas.get(&range.0).map(|c| c.clone())
    }

    /// Every replica cell hosted here (walks the registry: not for hot paths).
    pub(crate) fn cells(&self) -> Vec<Arc<ReplicaCell>> {
        self.replicas.iter().map(|c| c.clone()).collect()
    }

    pub(crate) fn replica_count(&self) -> usize {
        self.replicas.len()
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Marks the NodeGroup stopped; true if it was already.
    pub(crate) fn stop(&self) -> bool {
        self.stopped.swap(true, Ordering::AcqRel)
    }

    /// Queues `msg` for `range`'s replica.
    pub(crate) fn post(&self, range: RangeId, msg: PeerMsg) -> Result<()> {
        let cell = self.cell(range).ok_or(Error::RangeNotFound(range))?;
        match cell.send(msg, self.config.mailbox_capacity, &self.ready_tx) {
            Ok(()) => Ok(()),
            Err(SendError::Full) => Err(Error::Busy("replica mailbox full")),
            Err(SendError::Closed) => Err(Error::ReplicaFailed(range)),
        }
    }
}
