//! The NodeGroup: the per-process host of every replica, and its public API. This file holds
//! the API only; the state behind it is `fsm::shared`, replicas come and go in `fsm::life`,
//! inbound traffic is `inbound`, status queries are `status`.
//!
//! Threads (each owned by the NodeGroup, stopped by [`NodeGroup::shutdown`] or on drop):
//! `worker_threads` raft workers (`fsm::worker`), one ticker (`fsm::ticker`) and one split
//! checker (`fsm::split_checker`). Client calls are async: they register a completion, queue a
//! message in the replica's mailbox and await the completion; the worker completes it. The
//! transport calls back into `inbound::Inbound` from its own threads; that only decodes,
//! checks and queues.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use flotilla_proto::command::{
    kv_request, raft_command, KvRequest, KvResponse, RaftCommand, RequestHeader, RequestId,
    SplitResult,
};
use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::{Message as _, NodeId, RangeId, ReplicaId};
use flotilla_store::Engine;
use flotilla_transport::{BatchHandler, Transport};
use parking_lot::Mutex;

use crate::api::{MembershipChange, ProposeOptions, ReadConsistency};
use crate::config::NodeGroupConfig;
use crate::error::{Error, Result};
use crate::fsm::life;
use crate::fsm::mailbox::ReplicaCell;
use crate::fsm::shared::Shared;
use crate::inbound::Inbound;
use crate::replica::PeerMsg;
use crate::state_machine::StateMachine;
use crate::system::SystemSeed;

/// The per-process host of every group replica.
pub struct NodeGroup {
    pub(crate) shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop_tx: Mutex<Option<Sender<()>>>,
}

impl std::fmt::Debug for NodeGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeGroup")
            .field("node", &self.shared.node)
            .field("replicas", &self.shared.replica_count())
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
        let shared = Arc::new(Shared::new(config, engine, state_machine, ready_tx));
        life::recover(&shared)?;
        let transport = connect(Arc::new(Inbound(shared.clone())));
        let _ = shared.transport.set(transport);

        // Dropping `stop_tx` (shutdown) disconnects `stop_rx` and so wakes every thread.
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let mut threads = Vec::new();
        for i in 0..shared.config.worker_threads {
            let (s, rx, stop) = (shared.clone(), ready_rx.clone(), stop_rx.clone());
            threads.push(spawn("raft-worker", Some(i), move || {
                crate::fsm::worker::run(s, rx, stop)
            })?);
        }
        let (s, stop) = (shared.clone(), stop_rx.clone());
        threads.push(spawn("split-checker", None, move || {
            crate::fsm::split_checker::run(s, stop)
        })?);
        let s = shared.clone();
        threads.push(spawn("raft-ticker", None, move || {
            crate::fsm::ticker::run(s, stop_rx)
        })?);
        // Replicas recovered with work to do (unapplied committed entries) start at once; the
        // others wait for their first input. Scheduling all of them cost a round each for
        // nothing (100,000 at a restart), and the paced wake queue waits while they are queued.
        for cell in shared.cells() {
            let work = cell
                .replica
                .lock()
                .as_ref()
                .is_some_and(|r| r.has_work_at_start());
            if work {
                cell.schedule(&shared.ready_tx);
            }
        }
        Ok(NodeGroup {
            shared,
            threads: Mutex::new(threads),
            stop_tx: Mutex::new(Some(stop_tx)),
        })
    }

    /// Stops (`true`) or restarts this node's clock as a paused process (SIGSTOP) would see
    /// it: no ticks, no heartbeats from the ticker, no request deadlines. Workers and the
    /// transport keep running, so the test decides what the node hears meanwhile (a
    /// `HoldFilter` keeps its inbound packets). On restart the missed ticks are skipped, as
    /// after a real pause.
    #[cfg(feature = "testing")]
    pub fn pause_ticker(&self, paused: bool) {
        self.shared
            .ticker_paused
            .store(paused, std::sync::atomic::Ordering::Release);
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.node
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &NodeGroupConfig {
        &self.shared.config
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

    /// [`NodeGroup::bootstrap_range`] for many ranges with one synced write. With hibernation
    /// the new replicas start asleep and are woken at a bounded rate (`max_wakes_per_tick`),
    /// then elect on their election timeouts; [`NodeGroup::bootstrap_layout`] spares most of
    /// them even that.
    pub fn bootstrap_ranges(&self, descs: Vec<RangeDescriptor>) -> Result<()> {
        life::bootstrap(&self.shared, descs, &|_| None, None)
    }

    /// [`NodeGroup::bootstrap_ranges`] with a first leader chosen per range (`first_leader`,
    /// the same on every node): every replica prefers it (as [`NodeGroup::prefer_leader`]),
    /// it campaigns at once (paced), and with hibernation the other replicas sleep until its
    /// vote request reaches them, so that each group holds about one election and sleeps
    /// again. A replica whose group has no leader after the liveness window (`node_down_ticks`:
    /// the chosen node is down) wakes and elects on its timeout.
    pub fn bootstrap_layout(
        &self,
        descs: Vec<RangeDescriptor>,
        first_leader: impl Fn(&RangeDescriptor) -> Option<ReplicaId>,
    ) -> Result<()> {
        life::bootstrap(&self.shared, descs, &|d| first_leader(d).map(|r| r.0), None)
    }

    /// [`NodeGroup::bootstrap_layout`] of a new cluster: the ranges of `descs` and the system
    /// range (`system`, see [`crate::system_descriptor`]) holding `seed`, all in one synced
    /// write. Every bootstrap node must be given the same arguments.
    pub fn bootstrap_cluster(
        &self,
        mut descs: Vec<RangeDescriptor>,
        system: RangeDescriptor,
        seed: &SystemSeed,
        first_leader: impl Fn(&RangeDescriptor) -> Option<ReplicaId>,
    ) -> Result<()> {
        if !system.id().is_system() {
            return Err(Error::AdminRefused(format!(
                "{} is not the system range",
                system.id()
            )));
        }
        descs.push(system);
        life::bootstrap(
            &self.shared,
            descs,
            &|d| first_leader(d).map(|r| r.0),
            Some(seed),
        )
    }

    /// Starts an election for this node's replica of `range` now.
    pub fn campaign(&self, range: RangeId) -> Result<()> {
        self.shared.post(range, PeerMsg::Campaign)
    }

    /// Tells this node's replica of `range` that replica `leader` should lead the group: while
    /// it leads, it hands leadership to `leader` once that replica is up and replicating. The
    /// preference holds until `leader` has been seen leading (or it stops being a voter, or a
    /// few transfers fail); it is not persisted. Bootstrap sets it on every node so that the
    /// layout's spread of leaders survives a first election won by another node.
    pub fn prefer_leader(&self, range: RangeId, leader: ReplicaId) -> Result<()> {
        self.shared
            .post(range, PeerMsg::PreferLeader { replica: leader.0 })
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
        s.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

    pub(crate) async fn submit(
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

    /// Runs a KV command through the default state machine (as a batch of one, see
    /// [`NodeGroup::kv_batch`]; a follower forwards it if `forward_proposals` is on).
    pub async fn kv(&self, req: KvRequest, opts: ProposeOptions) -> Result<KvResponse> {
        let is_put = matches!(
            req.op,
            Some(kv_request::Op::Put(_) | kv_request::Op::MultiPut(_))
        );
        let proposal = crate::batch::KvProposal {
            request: req,
            opts,
            range: None,
            forward: true,
        };
        let answer = match self.kv_batch(vec![proposal]).pop() {
            Some(answer) => answer.await?,
            None => return Err(Error::Stopped),
        };
        // A put answers nothing: it succeeded.
        if is_put && answer.is_empty() {
            return Ok(KvResponse {
                ok: true,
                previous: None,
            });
        }
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
        RangeDescriptor::decode(&answer[..]).map_err(|e| Error::BadAnswer {
            what: "membership change",
            reason: e.to_string(),
        })
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
        if range.is_system() {
            return Err(Error::AdminRefused(
                "the system range holds no user keys and is never split".into(),
            ));
        }
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
        let new_range_id = self.next_range_id().await?;
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
        let bad = |reason: String| Error::BadAnswer {
            what: "split",
            reason,
        };
        let r = SplitResult::decode(&answer[..]).map_err(|e| bad(e.to_string()))?;
        match (r.left, r.right) {
            (Some(l), Some(r)) => Ok((l, r)),
            _ => Err(bad("without both halves".into())),
        }
    }

    /// A new range id from this node's lease, leasing a block from the system range when the
    /// lease is used up.
    ///
    /// # Errors
    ///
    /// `SystemUnavailable` if no block can be leased (no replica of the system range here,
    /// no leader, timeout): never a made-up id.
    pub(crate) async fn next_range_id(&self) -> Result<u64> {
        let s = &self.shared;
        // A system range between leaders (just started, or electing) comes back within an
        // election or two: retry until the proposal timeout, then give up.
        let deadline = std::time::Instant::now() + s.config.proposal_timeout;
        loop {
            if let Some(id) = s.take_range_id() {
                return Ok(id);
            }
            // Not retried: no replica of the system range here, a full mailbox, a failed
            // replica, a stop.
            let rx = s.lease_range_ids()?;
            match s.add_range_ids(rx.await.ok()) {
                Ok(()) => {}
                Err(Error::Stopped) => return Err(Error::Stopped),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
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
                    "merge of {source} into {target} rolled back: the target changed meanwhile, \
                     or a replica did not catch up within merge_freeze_limit"
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

    /// Stops the ticker and the workers, fails every waiting request with `Stopped` and shuts
    /// the transport down. Whatever was acknowledged is on disk already; nothing else is
    /// flushed. Idempotent.
    pub fn shutdown(&self) {
        if self.shared.stop() {
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

/// Starts one of the NodeGroup's threads.
fn spawn(
    name: &'static str,
    index: Option<usize>,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>> {
    let full = match index {
        Some(i) => format!("{name}-{i}"),
        None => name.to_string(),
    };
    std::thread::Builder::new()
        .name(full)
        .spawn(body)
        .map_err(|source| Error::Spawn {
            thread: name,
            source: Arc::new(source),
        })
}
