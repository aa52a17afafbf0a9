//! The NodeGroup: the per-process host of every replica, and its public API.
//!
//! Threads (each owned by the NodeGroup, stopped by [`NodeGroup::shutdown`] or on drop):
//! `worker_threads` raft workers (see `fsm::worker`) and one ticker (`fsm::ticker`). Client
//! calls are async: they register a completion, queue a message in the replica's mailbox and
//! await the completion; the worker completes it. The transport calls back into
//! [`Inbound`] from its own threads; that only decodes, checks and queues.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use dashmap::DashMap;
use flotilla_proto::command::{
    kv_request, raft_command, KvRequest, KvResponse, RaftCommand, RequestHeader, RequestId,
    SplitResult,
};
use flotilla_proto::meta::{
    RangeDescriptor, RangeEpoch, RangeState, ReplicaDescriptor, ReplicaRole,
};
use flotilla_proto::transport::{Heartbeat, NodeBatch};
use flotilla_proto::{Message as _, NodeId, RangeId, ReplicaId};
use flotilla_store::{Engine, GroupStorage, SPLIT_INIT_INDEX, SPLIT_INIT_TERM};
use flotilla_transport::{BatchHandler, SnapshotReport, Transport};
use parking_lot::Mutex;
use prost_raft::Message as _;
use raft::prelude::{ConfState, MessageType};
use raft::RawNode;

use crate::config::NodeGroupConfig;
use crate::error::{Error, Result};
use crate::fsm::mailbox::{PeerMsg, ReplicaCell, SendError};
use crate::pending::Pending;
use crate::replica::{Replica, ReplicaStatus};
use crate::router::RangeRouter;
use crate::state_machine::StateMachine;

/// A change to a range's membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a voting replica on a node (gets a fresh replica id).
    AddVoter(NodeId),
    /// Add a non-voting replica on a node (gets a fresh replica id); promote it once it has
    /// caught up.
    AddLearner(NodeId),
    /// Make a learner a voter.
    Promote(ReplicaId),
    /// Make a voter a learner.
    Demote(ReplicaId),
    /// Remove a replica; its id is never used again.
    Remove(ReplicaId),
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadConsistency {
    /// Linearizable through ReadIndex (leader or follower). The default.
    #[default]
    Linearizable,
    /// Served by the leader under its lease, without a round trip: linearizable as long as
    /// clock drift stays below the election timeout. A leader whose lease ran out (it is
    /// renewed by ReadIndex confirmations, on the monotonic clock) serves it as a
    /// linearizable read; a follower answers `NotLeader`.
    Lease,
    /// Whatever this replica has applied; may be stale.
    Stale,
}

/// Options of a proposal.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProposeOptions {
    /// Retry de-duplication: the same `(client_id, seq)` is applied at most once. A client
    /// sends requests to one range one at a time, with increasing `seq`.
    pub request_id: Option<(u64, u64)>,
    /// The epoch the caller routed with; a stale one gets `EpochNotMatch`.
    pub epoch: Option<RangeEpoch>,
}

/// Counters of a NodeGroup.
#[derive(Debug, Clone, Default)]
pub struct NodeStatus {
    /// This node.
    pub node: NodeId,
    /// Replicas hosted (initialized or not).
    pub replicas: usize,
    /// Ranges in the router (initialized replicas).
    pub ranges: usize,
    /// Replicas that are currently leader.
    pub leaders: usize,
    /// Requests waiting for an outcome.
    pub pending_requests: usize,
}

/// State shared by the API, the workers, the ticker and the inbound handler.
pub(crate) struct Shared {
    pub(crate) config: NodeGroupConfig,
    pub(crate) node: NodeId,
    pub(crate) engine: Arc<Engine>,
    pub(crate) state_machine: Arc<dyn StateMachine>,
    pub(crate) transport: OnceLock<Arc<dyn Transport>>,
    pub(crate) router: RangeRouter,
    replicas: DashMap<u64, Arc<ReplicaCell>>,
    /// Replicas the ticker ticks. Hibernating replicas are absent.
    pub(crate) awake: DashMap<u64, Arc<ReplicaCell>>,
    /// Ranges whose replica here was removed, with the conf_ver of the removal: messages
    /// from that membership era must not recreate it.
    pub(crate) tombstones: DashMap<u64, u64>,
    pub(crate) pending: Pending,
    /// Merge sources handed over to their target (range id → prepare index): taken out of
    /// service, waiting for the target's CommitMerge apply to tombstone them.
    pub(crate) handovers: DashMap<u64, u64>,
    /// Serializes creating replicas by message with bootstrapping them, so that a placeholder
    /// written for a message can never land on disk after (and over) a bootstrapped range.
    create_lock: Mutex<()>,
    /// Plain heartbeats waiting for the ticker, per destination node.
    pub(crate) tick_heartbeats: Mutex<std::collections::HashMap<NodeId, Vec<Heartbeat>>>,
    /// Ranges whose applied writes passed the split-check threshold since their last check.
    pub(crate) split_candidates: Mutex<std::collections::HashSet<u64>>,
    /// Client requests per range in the current load window (only ranges with traffic).
    pub(crate) load: DashMap<u64, crate::fsm::split_checker::LoadStats>,
    pub(crate) ready_tx: Sender<Arc<ReplicaCell>>,
    logger: slog::Logger,
    stopped: AtomicBool,
    /// Set by tests to stop this node's clock (see `NodeGroup::pause_ticker`).
    pub(crate) ticker_paused: AtomicBool,
}

impl Shared {
    /// A range id for a new range (split). Random 63-bit ids: no coordinator is needed and a
    /// collision among even a million ranges has a probability of about 1e-7; the split's
    /// apply refuses an id this node already hosts.
    pub(crate) fn allocate_range_id(&self) -> u64 {
        loop {
            let id = rand::random::<u64>() >> 1;
            if id > 1 << 32 && self.cell(RangeId(id)).is_none() {
                return id;
            }
        }
    }

    /// Counts a client request for load-based splits (only when they are on).
    fn record_load(&self, range: u64, key: &[u8]) {
        if self.config.split.load_qps > 0 {
            self.load.entry(range).or_default().record(key);
        }
    }

    pub(crate) fn cell(&self, range: RangeId) -> Option<Arc<ReplicaCell>> {
        self.replicas.get(&range.0).map(|c| c.clone())
    }

    pub(crate) fn unregister(&self, range: RangeId) {
        self.replicas.remove(&range.0);
        self.awake.remove(&range.0);
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    pub(crate) fn register(&self, cell: Arc<ReplicaCell>) {
        self.awake.insert(cell.range.0, cell.clone());
        self.replicas.insert(cell.range.0, cell);
    }

    pub(crate) fn raw_node(
        &self,
        storage: GroupStorage,
        replica_id: u64,
    ) -> Result<RawNode<GroupStorage>> {
        let applied = storage.apply_state().applied_index;
        let group = storage.group().0;
        let cfg = self.config.raft_config(replica_id, applied);
        let logger = self
            .logger
            .new(slog::o!("group" => group, "replica" => replica_id));
        RawNode::new(&cfg, storage, &logger)
            .map_err(|e| Error::Store(format!("cannot start replica of r{group}: {e}")))
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

    /// Creates an uninitialized replica for a message addressed to a group this node does not
    /// host yet, if the message may create one.
    fn maybe_create(
        &self,
        env: &flotilla_proto::transport::RaftMessage,
        from_node: u64,
        msg_type: MessageType,
    ) -> Option<Arc<ReplicaCell>> {
        let range = RangeId(env.range_id);
        let to = env.to?;
        // Only messages a leader or candidate sends to a (possibly new) member may create it.
        if !matches!(
            msg_type,
            MessageType::MsgAppend
                | MessageType::MsgHeartbeat
                | MessageType::MsgSnapshot
                | MessageType::MsgRequestVote
                | MessageType::MsgRequestPreVote
        ) {
            return None;
        }
        // As TiKV: only a current member may create a replica here, and only of a member on
        // this node. The sender vouches with its descriptor, and must live on the node the
        // batch came from.
        let from = env.from?;
        let member = |id: u64, node: u64| {
            env.replicas
                .iter()
                .any(|r| r.replica_id == id && r.node_id == node)
        };
        if !member(from.replica_id, from_node) || !member(to.replica_id, self.node.0) {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "not_member")
                .increment(1);
            return None;
        }
        let conf_ver = env.epoch.unwrap_or_default().conf_ver;
        if let Some(t) = self.tombstones.get(&range.0) {
            if conf_ver <= *t {
                metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "tombstone")
                    .increment(1);
                return None;
            }
        }
        // A replica whose keys overlap a range this node already serves will be created by that
        // range's split, not by a message: creating it here would conflict (tikv#17535).
        let overlaps = self
            .router
            .overlapping(&env.start_key, &env.end_key)
            .into_iter()
            .any(|d| d.range_id != range.0);
        if overlaps {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "overlap")
                .increment(1);
            return None;
        }
        let _creating = self.create_lock.lock();
        if let Some(cell) = self.cell(range) {
            return Some(cell);
        }
        let storage = GroupStorage::new_uninitialized(self.engine.clone(), range);
        // Persist who we are before raft can vote: after a restart the replica must come back
        // with the same id and its vote.
        let placeholder = RangeDescriptor {
            range_id: range.0,
            state: RangeState::Uninitialized as i32,
            replicas: vec![ReplicaDescriptor {
                replica_id: to.replica_id,
                node_id: self.node.0,
                role: ReplicaRole::Voter as i32,
            }],
            ..Default::default()
        };
        let mut batch = self.engine.batch();
        batch.put_descriptor(&placeholder);
        if let Err(e) = self.engine.write(batch, true) {
            tracing::error!(%range, "cannot create replica: {e}");
            return None;
        }
        let raw = match self.raw_node(storage, to.replica_id) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%range, "cannot create replica: {e}");
                return None;
            }
        };
        let cell = ReplicaCell::new(range, Replica::new(raw, to.replica_id, range, self.node));
        self.register(cell.clone());
        metrics::counter!("flotilla_runtime_replicas_created_total", "by" => "message")
            .increment(1);
        Some(cell)
    }
}

impl Shared {
    /// Rebuilds the raft message a coalesced heartbeat stands for and queues it. Heartbeats
    /// never create replicas (they carry no key range): the leader's appends do.
    fn on_heartbeat(&self, from_node: u64, hb: Heartbeat) {
        let Some(cell) = self.cell(RangeId(hb.range_id)) else {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "heartbeat_unknown_group")
                .increment(1);
            return;
        };
        let mut msg = raft::prelude::Message::default();
        msg.set_msg_type(if hb.response {
            MessageType::MsgHeartbeatResponse
        } else {
            MessageType::MsgHeartbeat
        });
        msg.from = hb.from_replica;
        msg.to = hb.to_replica;
        msg.term = hb.term;
        msg.commit = hb.commit;
        msg.context = hb.context.to_vec();
        let pm = PeerMsg::Raft {
            msg: Box::new(msg),
            from: ReplicaDescriptor {
                replica_id: hb.from_replica,
                node_id: from_node,
                role: ReplicaRole::Voter as i32,
            },
            // A heartbeat carries no epoch: its sender must be a member we know of.
            from_conf_ver: 0,
        };
        if cell
            .send(pm, self.config.mailbox_capacity, &self.ready_tx)
            .is_err()
        {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "mailbox_full")
                .increment(1);
        }
    }
}

/// What the transport calls with each batch that arrives for this node, and with the outcome
/// of each snapshot it streamed for a replica of this node.
pub(crate) struct Inbound(Arc<Shared>);

impl BatchHandler for Inbound {
    /// Hands the outcome to the sending replica, whose raft then leaves the follower's
    /// Snapshot state (a failure makes it send a new snapshot later). Queued regardless of
    /// the mailbox capacity, as the worker does: a lost report would leave the follower
    /// waiting for a snapshot forever.
    fn on_snapshot_status(&self, report: SnapshotReport) {
        if let Some(cell) = self.0.cell(report.range) {
            let msg = PeerMsg::SnapshotStatus {
                to: report.to_replica.0,
                ok: report.ok,
            };
            let _ = cell.send(msg, usize::MAX, &self.0.ready_tx);
        }
    }

    fn on_batch(&self, batch: NodeBatch) {
        let shared = &self.0;
        if batch.to_node != shared.node.0 {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "wrong_node")
                .increment(batch.messages.len() as u64);
            return;
        }
        let from_node = batch.from_node;
        for hb in batch.heartbeats {
            shared.on_heartbeat(from_node, hb);
        }
        for env in batch.messages {
            let msg = match raft::prelude::Message::decode(&env.message[..]) {
                Ok(m) => m,
                Err(_) => {
                    metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "undecodable")
                        .increment(1);
                    continue;
                }
            };
            let (Some(from), Some(to)) = (env.from, env.to) else {
                metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "no_endpoints")
                    .increment(1);
                continue;
            };
            if to.node_id != shared.node.0 || msg.to != to.replica_id || msg.from != from.replica_id
            {
                metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "inconsistent")
                    .increment(1);
                continue;
            }
            let range = RangeId(env.range_id);
            let cell = match shared.cell(range) {
                Some(c) => c,
                None => match shared.maybe_create(&env, from_node, msg.get_msg_type()) {
                    Some(c) => c,
                    None => continue,
                },
            };
            let from_conf_ver = env.epoch.unwrap_or_default().conf_ver;
            let pm = PeerMsg::Raft {
                msg: Box::new(msg),
                from,
                from_conf_ver,
            };
            if cell
                .send(pm, shared.config.mailbox_capacity, &shared.ready_tx)
                .is_err()
            {
                // raft retransmits; dropping under overload is its flow control.
                metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "mailbox_full")
                    .increment(1);
            }
        }
    }
}

/// The per-process host of every group replica.
pub struct NodeGroup {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop_tx: Mutex<Option<Sender<()>>>,
}

impl std::fmt::Debug for NodeGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeGroup")
            .field("node", &self.shared.node)
            .field("replicas", &self.shared.replicas.len())
            .finish()
    }
}

impl NodeGroup {
    /// Starts a NodeGroup on `engine`: validates the config, recovers every replica stored in
    /// the engine, then calls `connect` with the handler the transport must deliver inbound
    /// batches to, and starts the workers and the ticker.
    pub fn start(
        config: NodeGroupConfig,
        engine: Arc<Engine>,
        state_machine: Arc<dyn StateMachine>,
        connect: impl FnOnce(Arc<dyn BatchHandler>) -> Arc<dyn Transport>,
    ) -> Result<NodeGroup> {
        config.validate()?;
        let node = NodeId(config.node_id);
        engine.bind_node(node, 0)?;
        let (ready_tx, ready_rx): (Sender<Arc<ReplicaCell>>, Receiver<Arc<ReplicaCell>>) =
            crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            logger: crate::logger::root_logger(node.0),
            config,
            node,
            engine,
            state_machine,
            transport: OnceLock::new(),
            router: RangeRouter::new(),
            replicas: DashMap::new(),
            awake: DashMap::new(),
            tombstones: DashMap::new(),
            pending: Pending::default(),
            handovers: DashMap::new(),
            create_lock: Mutex::new(()),
            tick_heartbeats: Mutex::new(Default::default()),
            split_candidates: Mutex::new(Default::default()),
            load: DashMap::new(),
            ready_tx,
            stopped: AtomicBool::new(false),
            ticker_paused: AtomicBool::new(false),
        });
        recover(&shared)?;
        let transport = connect(Arc::new(Inbound(shared.clone())));
        let _ = shared.transport.set(transport);

        // Dropping `stop_tx` (shutdown) disconnects `stop_rx` and so wakes every thread.
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let mut threads = Vec::new();
        for i in 0..shared.config.worker_threads {
            let (s, rx, stop) = (shared.clone(), ready_rx.clone(), stop_rx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("raft-worker-{i}"))
                    .spawn(move || crate::fsm::worker::run(s, rx, stop))
                    .map_err(|e| Error::Store(format!("cannot spawn worker: {e}")))?,
            );
        }
        let (s, stop) = (shared.clone(), stop_rx.clone());
        threads.push(
            std::thread::Builder::new()
                .name("split-checker".into())
                .spawn(move || crate::fsm::split_checker::run(s, stop))
                .map_err(|e| Error::Store(format!("cannot spawn split checker: {e}")))?,
        );
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("raft-ticker".into())
                .spawn(move || crate::fsm::ticker::run(s, stop_rx))
                .map_err(|e| Error::Store(format!("cannot spawn ticker: {e}")))?,
        );
        // Replicas recovered with work to do (unapplied committed entries) start at once.
        for cell in shared.replicas.iter() {
            cell.schedule(&shared.ready_tx);
        }
        Ok(NodeGroup {
            shared,
            threads: Mutex::new(threads),
            stop_tx: Mutex::new(Some(stop_tx)),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.node
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.shared.engine
    }

    /// Creates this node's replica of a new range with the initial membership in `desc`
    /// (every replica listed must be created the same way on its node, as with etcd's initial
    /// cluster). Idempotent: an existing identical range is accepted.
    pub fn bootstrap_range(&self, desc: RangeDescriptor) -> Result<()> {
        self.bootstrap_ranges(vec![desc])
    }

    /// [`NodeGroup::bootstrap_range`] for many ranges with one synced write.
    pub fn bootstrap_ranges(&self, descs: Vec<RangeDescriptor>) -> Result<()> {
        let s = &self.shared;
        let _creating = s.create_lock.lock();
        let mut batch = s.engine.batch();
        let mut created = Vec::with_capacity(descs.len());
        let mut replaced = Vec::new();
        for desc in descs {
            let me = desc
                .replica_on(s.node)
                .ok_or_else(|| {
                    Error::AdminRefused(format!("{} has no replica on {}", desc.id(), s.node))
                })?
                .replica_id;
            if desc.range_id == 0 || me == 0 {
                return Err(Error::AdminRefused(
                    "range and replica ids must be non-zero".into(),
                ));
            }
            // A replica may already exist because a peer's message created it (uninitialized)
            // before this node got to bootstrap: it is replaced, keeping its term and vote so
            // that this node never votes twice in a term.
            let mut carried = None;
            if let Some(existing) = s.cell(desc.id()) {
                let guard = existing.replica.lock();
                match guard.as_ref() {
                    Some(r) if r.is_initialized() => {
                        let same = r.descriptor().is_some_and(|d| {
                            d.start_key == desc.start_key && d.end_key == desc.end_key
                        });
                        if same {
                            continue;
                        }
                        return Err(Error::AdminRefused(format!("{} already exists", desc.id())));
                    }
                    Some(r) => carried = Some((existing.clone(), r.hard_state())),
                    None => {}
                }
            }
            let clash = !s
                .router
                .overlapping(&desc.start_key, &desc.end_key)
                .is_empty()
                || created
                    .iter()
                    .any(|(d, _, _): &(RangeDescriptor, u64, GroupStorage)| {
                        crate::router::overlaps(d, &desc) || d.range_id == desc.range_id
                    });
            if clash {
                return Err(Error::AdminRefused(format!(
                    "{} overlaps a range already hosted on {}",
                    desc.id(),
                    s.node
                )));
            }
            let mut desc = desc;
            desc.state = RangeState::Normal as i32;
            if desc.epoch.is_none() {
                desc.epoch = Some(RangeEpoch {
                    conf_ver: 1,
                    version: 1,
                });
            }
            let mut storage = GroupStorage::initialize(
                s.engine.clone(),
                desc.clone(),
                conf_state_of(&desc),
                SPLIT_INIT_INDEX,
                SPLIT_INIT_TERM,
                &mut batch,
            );
            if let Some((old, hs)) = carried {
                storage.adopt_vote(&hs, &mut batch);
                replaced.push(old);
            }
            created.push((desc, me, storage));
        }
        s.engine.write(batch, true)?;
        for old in replaced {
            old.fail();
            *old.replica.lock() = None;
        }
        for (desc, me, storage) in created {
            let raw = s.raw_node(storage, me)?;
            let cell = ReplicaCell::new(desc.id(), Replica::new(raw, me, desc.id(), s.node));
            s.register(cell);
            s.router.upsert(desc);
        }
        Ok(())
    }

    /// Stops (`true`) or restarts this node's clock as a paused process (SIGSTOP) would see
    /// it: no ticks, no heartbeats from the ticker, no request deadlines. Workers and the
    /// transport keep running, so the test decides what the node hears meanwhile (a
    /// `HoldFilter` keeps its inbound packets). On restart the missed ticks are skipped, as
    /// after a real pause.
    #[cfg(feature = "testing")]
    pub fn pause_ticker(&self, paused: bool) {
        self.shared.ticker_paused.store(paused, Ordering::Release);
    }

    /// Starts an election for this node's replica of `range` now.
    pub fn campaign(&self, range: RangeId) -> Result<()> {
        self.shared.post(range, PeerMsg::Campaign)
    }

    /// Proposes an application command to the range that owns `key`; resolves with the state
    /// machine's answer once the command is applied on this node.
    pub async fn propose(
        &self,
        key: &[u8],
        command: Vec<u8>,
        opts: ProposeOptions,
    ) -> Result<Vec<u8>> {
        let s = &self.shared;
        let size = command.len() as u64;
        if size > s.config.max_proposal_bytes {
            return Err(Error::ProposalTooLarge {
                size,
                limit: s.config.max_proposal_bytes,
            });
        }
        let desc = s.router.lookup(key)?;
        s.record_load(desc.range_id, key);
        if let Some(epoch) = opts.epoch {
            if epoch.is_stale(&desc.epoch_or_default()) {
                return Err(Error::EpochNotMatch {
                    current: vec![desc],
                });
            }
        }
        let (token, rx) = s.pending.register(s.config.proposal_timeout);
        let cmd = RaftCommand {
            header: Some(RequestHeader {
                range_id: desc.range_id,
                epoch: desc.epoch,
                request_id: opts
                    .request_id
                    .map(|(client_id, seq)| RequestId { client_id, seq }),
                proposer_node: s.node.0,
                proposal_token: token,
            }),
            body: Some(raft_command::Body::App(command.into())),
        };
        self.submit(
            desc.id(),
            token,
            rx,
            PeerMsg::Propose {
                token,
                data: cmd.encode_to_vec(),
            },
        )
        .await
    }

    async fn submit(
        &self,
        range: RangeId,
        token: u64,
        rx: tokio::sync::oneshot::Receiver<crate::pending::Answer>,
        msg: PeerMsg,
    ) -> Result<Vec<u8>> {
        if self.shared.is_stopped() {
            self.shared.pending.complete(token, Err(Error::Stopped));
            return Err(Error::Stopped);
        }
        if let Err(e) = self.shared.post(range, msg) {
            self.shared.pending.complete(token, Err(e.clone()));
            return Err(e);
        }
        rx.await.unwrap_or(Err(Error::Stopped))
    }

    /// Runs a KV command through the default state machine.
    pub async fn kv(&self, req: KvRequest, opts: ProposeOptions) -> Result<KvResponse> {
        let key = match &req.op {
            Some(kv_request::Op::Put(p)) => p.key.clone(),
            Some(kv_request::Op::Delete(d)) => d.key.clone(),
            Some(kv_request::Op::Insert(i)) => i.key.clone(),
            Some(kv_request::Op::Cas(c)) => c.key.clone(),
            None => return Err(Error::InvalidCommand("empty KvRequest".into())),
        };
        let answer = self.propose(&key, req.encode_to_vec(), opts).await?;
        KvResponse::decode(&answer[..])
            .map_err(|e| Error::InvalidCommand(format!("bad answer: {e}")))
    }

    /// Writes `key = value` (default KV state machine).
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let req = KvRequest {
            op: Some(kv_request::Op::Put(flotilla_proto::command::Put {
                key: key.to_vec().into(),
                value: value.to_vec().into(),
            })),
        };
        self.kv(req, ProposeOptions::default()).await.map(|_| ())
    }

    /// Waits until this node's replica of `range` may serve a read of the given consistency.
    pub async fn read_barrier(&self, range: RangeId, consistency: ReadConsistency) -> Result<()> {
        let lease = match consistency {
            ReadConsistency::Stale => return Ok(()),
            ReadConsistency::Lease => true,
            ReadConsistency::Linearizable => false,
        };
        let s = &self.shared;
        let (token, rx) = s.pending.register(s.config.proposal_timeout);
        self.submit(range, token, rx, PeerMsg::Read { token, lease })
            .await
            .map(|_| ())
    }

    /// Reads `key` (default KV state machine) with the given consistency.
    pub async fn get(&self, key: &[u8], consistency: ReadConsistency) -> Result<Option<Vec<u8>>> {
        let desc = self.shared.router.lookup(key)?;
        self.shared.record_load(desc.range_id, key);
        self.read_barrier(desc.id(), consistency).await?;
        // The range may have changed shape while we waited.
        let now = self.shared.router.lookup(key)?;
        if now.range_id != desc.range_id {
            return Err(Error::EpochNotMatch { current: vec![now] });
        }
        Ok(self.shared.engine.get(key)?)
    }

    /// Reads up to `limit` keys from `start` within the range that owns `start`.
    pub async fn scan(
        &self,
        start: &[u8],
        limit: usize,
        consistency: ReadConsistency,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let desc = self.shared.router.lookup(start)?;
        self.read_barrier(desc.id(), consistency).await?;
        Ok(self.shared.engine.scan(start, &desc.end_key, limit)?)
    }

    /// Changes the membership of `range`; this node's replica must be the leader. Resolves
    /// with the new descriptor once the change is applied here.
    pub async fn change_membership(
        &self,
        range: RangeId,
        changes: Vec<MembershipChange>,
    ) -> Result<RangeDescriptor> {
        let s = &self.shared;
        let (token, rx) = s.pending.register(s.config.proposal_timeout);
        let answer = self
            .submit(range, token, rx, PeerMsg::ConfChange { token, changes })
            .await?;
        RangeDescriptor::decode(&answer[..]).map_err(|e| Error::Store(e.to_string()))
    }

    /// Asks this node's replica of `range` (the leader) to hand leadership to replica `to`.
    pub async fn transfer_leader(&self, range: RangeId, to: ReplicaId) -> Result<()> {
        let s = &self.shared;
        let (token, rx) = s.pending.register(s.config.proposal_timeout);
        self.submit(
            range,
            token,
            rx,
            PeerMsg::TransferLeader { token, to: to.0 },
        )
        .await
        .map(|_| ())
    }

    /// Compacts the log of this node's replica of `range` up to its applied index now, so that
    /// a follower missing any of it is sent a snapshot.
    pub async fn compact_log(&self, range: RangeId) -> Result<()> {
        let s = &self.shared;
        let (token, rx) = s.pending.register(s.config.proposal_timeout);
        self.submit(range, token, rx, PeerMsg::CompactLog { token })
            .await
            .map(|_| ())
    }

    /// Splits `range` at `split_key` (or, if `None`, at its middle key by key count) into
    /// itself `[start, split_key)` and a new range `[split_key, end)`; this node's replica
    /// must be the leader. Resolves with both halves once the split is applied here. No data
    /// is copied.
    pub async fn split(
        &self,
        range: RangeId,
        split_key: Option<Vec<u8>>,
    ) -> Result<(RangeDescriptor, RangeDescriptor)> {
        let s = &self.shared;
        let split_key = match split_key {
            Some(k) => k,
            None => {
                let desc = s.router.get(range).ok_or(Error::RangeNotFound(range))?;
                crate::fsm::split_checker::measure(&s.engine, &desc)?
                    .middle_key
                    .ok_or_else(|| {
                        Error::AdminRefused(format!("{range} has too few keys to split"))
                    })?
            }
        };
        let new_range_id = s.allocate_range_id();
        let (token, rx) = s.pending.register(s.config.proposal_timeout);
        let answer = self
            .submit(
                range,
                token,
                rx,
                PeerMsg::Split {
                    token,
                    split_key,
                    new_range_id,
                },
            )
            .await?;
        let r = SplitResult::decode(&answer[..]).map_err(|e| Error::Store(e.to_string()))?;
        match (r.left, r.right) {
            (Some(l), Some(r)) => Ok((l, r)),
            _ => Err(Error::Store("split answer without both halves".into())),
        }
    }

    /// Merges range `source` into the adjacent range `target` (their replicas must be on the
    /// same nodes), so that a split can be undone. Call it on the node of the source's leader.
    /// Resolves with the target's new descriptor once this node's target replica covers both;
    /// the source refuses requests (`Busy`) from the prepare until then.
    ///
    /// # Errors
    ///
    /// - `AdminRefused`: not adjacent, not on the same nodes, a range is already merging, a
    ///   membership change is in progress, a source replica lags far behind, or the merge was
    ///   rolled back because the target changed meanwhile.
    /// - `NotLeader`: this node does not lead the source.
    /// - `ProposalDropped`: the merge did not finish within `merge_timeout`; it still
    ///   completes (or rolls back) by itself.
    pub async fn merge(&self, source: RangeId, target: RangeId) -> Result<RangeDescriptor> {
        let s = &self.shared;
        let src = s.router.get(source).ok_or(Error::RangeNotFound(source))?;
        let tgt = s.router.get(target).ok_or(Error::RangeNotFound(target))?;
        crate::replica::check_mergeable(&src, &tgt)?;
        let (token, rx) = s.pending.register(s.config.proposal_timeout);
        self.submit(
            source,
            token,
            rx,
            PeerMsg::PrepareMerge { token, target: tgt },
        )
        .await?;
        let covers = |d: &RangeDescriptor| {
            d.start_key <= src.start_key
                && (d.end_key.is_empty() || (!src.end_key.is_empty() && d.end_key >= src.end_key))
        };
        let deadline = std::time::Instant::now() + s.config.merge_timeout;
        loop {
            if let Some(t) = s.router.get(target).filter(|t| covers(t)) {
                return Ok(t);
            }
            if s.router.get(source).is_some_and(|d| d.merge.is_none()) {
                return Err(Error::AdminRefused(format!(
                    "merge of {source} into {target} rolled back: the target changed meanwhile"
                )));
            }
            if s.is_stopped() {
                return Err(Error::Stopped);
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::ProposalDropped);
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Status of this node's replica of `range`.
    pub fn status(&self, range: RangeId) -> Result<ReplicaStatus> {
        let cell = self.shared.cell(range).ok_or(Error::RangeNotFound(range))?;
        let guard = cell.replica.lock();
        guard
            .as_ref()
            .map(|r| r.status())
            .ok_or(Error::ReplicaFailed(range))
    }

    /// Counters of the whole NodeGroup (walks every replica: not for hot paths).
    pub fn node_status(&self) -> NodeStatus {
        let mut leaders = 0;
        for c in self.shared.replicas.iter() {
            if c.replica.lock().as_ref().is_some_and(|r| r.is_leader()) {
                leaders += 1;
            }
        }
        let st = NodeStatus {
            node: self.shared.node,
            replicas: self.shared.replicas.len(),
            ranges: self.shared.router.len(),
            leaders,
            pending_requests: self.shared.pending.len(),
        };
        metrics::gauge!("flotilla_runtime_replicas").set(st.replicas as f64);
        metrics::gauge!("flotilla_runtime_leaders").set(st.leaders as f64);
        st
    }

    /// The ranges this node serves, in key order.
    pub fn ranges(&self) -> Vec<RangeDescriptor> {
        self.shared.router.all()
    }

    /// The range that owns `key`, as this node knows it.
    pub fn range_of(&self, key: &[u8]) -> Result<RangeDescriptor> {
        self.shared.router.lookup(key)
    }

    /// The ids of every replica hosted here (initialized or not).
    pub fn replica_ranges(&self) -> Vec<RangeId> {
        self.shared.replicas.iter().map(|c| c.range).collect()
    }

    /// Whether this node's replica of `range` was isolated after a fault.
    pub fn is_failed(&self, range: RangeId) -> bool {
        self.shared.cell(range).is_some_and(|c| c.is_failed())
    }

    /// Stops the ticker and the workers, fails every waiting request with `Stopped` and shuts
    /// the transport down. Whatever was acknowledged is on disk already; nothing else is
    /// flushed. Idempotent.
    pub fn shutdown(&self) {
        if self.shared.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        // Disconnects the stop channel: the ticker and every worker return.
        drop(self.stop_tx.lock().take());
        if let Some(t) = self.shared.transport.get() {
            t.shutdown();
        }
        for h in self.threads.lock().drain(..) {
            let _ = h.join();
        }
        self.shared.pending.fail_all(Error::Stopped);
    }
}

impl Drop for NodeGroup {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// raft's conf state for a descriptor's replicas.
fn conf_state_of(desc: &RangeDescriptor) -> ConfState {
    let mut cs = ConfState::default();
    for r in &desc.replicas {
        if r.role == ReplicaRole::Learner as i32 {
            cs.learners.push(r.replica_id);
        } else {
            cs.voters.push(r.replica_id);
        }
    }
    cs
}

/// Recreates every replica stored in the engine.
fn recover(shared: &Shared) -> Result<()> {
    for d in shared.engine.descriptors()? {
        if d.state == RangeState::Tombstone as i32 {
            shared
                .tombstones
                .insert(d.range_id, d.epoch_or_default().conf_ver);
        }
    }
    let groups = shared.engine.recover()?;
    let count = groups.len();
    for rec in groups {
        let range = rec.group;
        let Some(desc) = rec.descriptor.clone() else {
            tracing::warn!(%range, "raft state without a descriptor; skipping");
            continue;
        };
        if desc.state == RangeState::Tombstone as i32 {
            continue;
        }
        let Some(me) = desc.replica_on(shared.node).map(|r| r.replica_id) else {
            tracing::warn!(%range, "descriptor has no replica on this node; skipping");
            continue;
        };
        let initialized = desc.state == RangeState::Normal as i32;
        let storage = GroupStorage::recover(shared.engine.clone(), rec)?;
        let raw = shared.raw_node(storage, me)?;
        shared.register(ReplicaCell::new(
            range,
            Replica::new(raw, me, range, shared.node),
        ));
        if initialized {
            shared.router.upsert(desc);
        }
    }
    tracing::info!(node = %shared.node, replicas = count, "recovered replicas from the store");
    Ok(())
}
