//! A deterministic simulator: several nodes — each a real registry (`fsm::shared`), real worker
//! rounds (`fsm::worker::run_round`), the real inbound checks and a real RocksDB engine — driven
//! from one thread. A seeded RNG chooses every event: which message is delivered next (so
//! messages are delayed and reordered), dropped or duplicated, when each node ticks, when a
//! node crashes and restarts or pauses and resumes (its inbound messages held meanwhile), when
//! the network partitions and heals, and what clients do.
//! Time is virtual (one step is one event). Nothing else is random in a run (raft-rs's election
//! jitter is turned off, `election_jitter_ticks = 1`, and every map that orders sends is
//! ordered), so the same seed replays the same run exactly and a failing seed is a
//! reproducible bug.
//!
//! Clients write unique values to a few contended keys and read them linearizably; every
//! operation is recorded (invoke, complete, ok / fail / unknown) and the history is judged by
//! `history::check`.
//!
//! A crash loses what the node had not synced: engines keep unsynced writes in the process
//! (`StoreConfig::buffer_unsynced_writes`), and a crash restarts the node from a copy of its
//! files taken before the engine is dropped (which would flush them). Synced writes reach the
//! OS without an fsync: a process crash, not a machine's, is modelled.
//!
//! Hibernation is on as in production: groups sleep when quiet, and node liveness runs on the
//! simulation's view of who can hear whom (a crashed or paused node, a cut link), counted in
//! each node's own ticks, so a partition or a pause longer than `node_down_ticks` of a node's
//! ticks declares the silent node down and wakes the groups it led.
//!
//! `FLOTILLA_SIM_SEEDS=N` sets how many seeds the long test runs (`sim::tests`).

mod history;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use flotilla_proto::command::{
    kv_request, raft_command, KvRequest, KvResponse, Put, RaftCommand, RequestHeader, RequestId,
};
use flotilla_proto::meta::{RangeDescriptor, RangeEpoch, RangeState, ReplicaDescriptor};
use flotilla_proto::transport::NodeBatch;
use flotilla_proto::{Message as _, NodeId};
use flotilla_store::{Engine, StoreConfig};
use flotilla_transport::{BatchHandler, Transport, TransportError};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub(crate) use history::{check, injected, Kind, Op, Outcome, Verdict};

use crate::config::NodeGroupConfig;
use crate::error::Error;
use crate::fsm::mailbox::ReplicaCell;
use crate::fsm::shared::Shared;
use crate::inbound::Inbound;
use crate::pending::Answer;
use crate::replica::PeerMsg;
use crate::state_machine::KvStateMachine;

/// How a run is shaped.
#[derive(Debug, Clone)]
pub(crate) struct SimConfig {
    pub(crate) nodes: u64,
    pub(crate) clients: usize,
    pub(crate) keys: usize,
    /// Events of the faulty phase; a quiet phase follows in which every fault heals and every
    /// operation finishes.
    pub(crate) steps: usize,
    /// Chance that a delivered packet is dropped instead, or delivered twice.
    pub(crate) drop: f64,
    pub(crate) duplicate: f64,
    /// Chance per step of a crash (at most one node down at a time), of a partition, and of
    /// a pause (at most one node paused at a time).
    pub(crate) crash: f64,
    pub(crate) partition: f64,
    pub(crate) pause: f64,
    /// A test-only defect to inject (see [`Bug`]).
    pub(crate) bug: Option<Bug>,
    /// Each node's `node_down_ticks`: 10, as early as allowed, so that runs exercise
    /// liveness; a test that needs a node to come back before it is declared down uses more.
    pub(crate) node_down_ticks: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 3,
            clients: 4,
            keys: 4,
            steps: 1500,
            drop: 0.03,
            duplicate: 0.02,
            crash: 0.004,
            partition: 0.004,
            pause: 0.004,
            bug: None,
            node_down_ticks: 10,
        }
    }
}

/// Defects the simulator must catch, injected behind a test-only switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bug {
    /// A linearizable read is served from the replica's own state without a read index.
    LocalReads,
    /// A round's raft batch (log entries, hard state) is written without a sync, so appends
    /// are acknowledged, and proposals completed, before they are on disk.
    AckBeforeSync,
}

/// What a run came to.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) seed: u64,
    pub(crate) history: Vec<Op>,
    pub(crate) verdict: Verdict,
    /// (step, what) of every fault injected.
    pub(crate) faults: Vec<(u64, String)>,
    /// (node, range) of every replica isolated during the run (raft-rs panicked on it, or its
    /// store failed): always a defect, found even when the history is fine.
    pub(crate) isolated: Vec<(u64, u64)>,
}

/// A transport that hands what a node sends to the simulation.
struct SimTransport {
    me: u64,
    sent: Arc<Mutex<Vec<(NodeId, NodeBatch)>>>,
    /// The simulation's view of who can hear whom, for liveness.
    links: Arc<Mutex<Links>>,
    /// What `last_heard_from` answered last, per node: a made-up instant that changes on each
    /// question while the node can be heard (as pings would), so liveness, which only looks
    /// for change, runs on the simulation's virtual time.
    heard: Mutex<std::collections::BTreeMap<u64, std::time::Instant>>,
    base: std::time::Instant,
    questions: std::sync::atomic::AtomicU64,
}

/// Who can hear whom: nodes crashed or paused, and cut directed pairs.
#[derive(Debug, Default)]
struct Links {
    silent: HashSet<u64>,
    cut: HashSet<(u64, u64)>,
}

impl std::fmt::Debug for SimTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimTransport")
    }
}

impl Transport for SimTransport {
    fn send(&self, to: NodeId, batch: NodeBatch) -> Result<(), TransportError> {
        self.sent.lock().push((to, batch));
        Ok(())
    }
    fn is_reachable(&self, _to: NodeId) -> bool {
        true
    }
    fn shutdown(&self) {}
    fn last_heard_from(&self, from: NodeId) -> Option<std::time::Instant> {
        let links = self.links.lock();
        let mut heard = self.heard.lock();
        if links.silent.contains(&from.0) || links.cut.contains(&(from.0, self.me)) {
            return Some(*heard.get(&from.0).unwrap_or(&self.base));
        }
        let n = self
            .questions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let at = self.base + Duration::from_nanos(n + 1);
        heard.insert(from.0, at);
        Some(at)
    }
}

/// A running node: its registry, inbound handler and ready queue, no threads.
struct SimNode {
    shared: Arc<Shared>,
    inbound: Inbound,
    ready: Receiver<Arc<ReplicaCell>>,
    sent: Arc<Mutex<Vec<(NodeId, NodeBatch)>>>,
}

struct Packet {
    from: NodeId,
    to: NodeId,
    batch: NodeBatch,
}

/// An operation in flight.
struct Flight {
    op: usize,
    node: NodeId,
    range: u64,
    rx: tokio::sync::oneshot::Receiver<Answer>,
}

struct Sim {
    cfg: SimConfig,
    rng: StdRng,
    dir: tempfile::TempDir,
    /// Per node, how many times it crashed: its files of life `n` are in `node-<id>-<n>`.
    lives: Vec<u32>,
    nodes: Vec<Option<SimNode>>,
    net: Vec<Packet>,
    /// Directed node pairs that cannot talk.
    cut: HashSet<(u64, u64)>,
    /// What the nodes' liveness sees of `cut`, crashes and pauses (synced before each tick).
    links: Arc<Mutex<Links>>,
    /// A node that is paused (as by SIGSTOP): it neither ticks nor runs, and what is sent to
    /// it waits in the network until it resumes.
    paused: Option<u64>,
    step: u64,
    history: Vec<Op>,
    flights: Vec<Option<Flight>>,
    next_value: u64,
    seqs: Vec<u64>,
    faults: Vec<(u64, String)>,
}

/// Runs one seed.
pub(crate) fn run(seed: u64, cfg: SimConfig) -> Run {
    history::with_bug(cfg.bug, || {
        let mut sim = Sim::new(seed, cfg);
        sim.faulty_phase();
        sim.quiet_phase();
        sim.final_reads();
        let verdict = check(&sim.history);
        let mut isolated = Vec::new();
        for (i, node) in sim.nodes.iter().enumerate() {
            let Some(node) = node else { continue };
            for range in [1, 2] {
                if node.shared.cell(flotilla_proto::RangeId(range)).is_none() {
                    isolated.push((i as u64 + 1, range));
                }
            }
        }
        Run {
            seed,
            history: sim.history,
            verdict,
            faults: sim.faults,
            isolated,
        }
    })
}

fn node_config(id: u64, node_down_ticks: usize) -> NodeGroupConfig {
    NodeGroupConfig {
        worker_threads: 1,
        election_tick: 10,
        election_jitter_ticks: 1,
        heartbeat_tick: 2,
        proposal_timeout: Duration::from_secs(3600),
        log_compact_threshold: 64,
        log_compact_trailing: 8,
        node_down_ticks,
        // Small, so that followers cut off for a while still catch up by snapshot.
        log_retain_max_entries: 256,
        ..NodeGroupConfig::new(id)
    }
}

impl Sim {
    fn new(seed: u64, cfg: SimConfig) -> Sim {
        let mut sim = Sim {
            rng: StdRng::seed_from_u64(seed),
            dir: tempfile::tempdir().expect("temp dir"),
            lives: vec![0; cfg.nodes as usize],
            nodes: (0..cfg.nodes).map(|_| None).collect(),
            net: Vec::new(),
            cut: HashSet::new(),
            links: Default::default(),
            paused: None,
            step: 0,
            history: Vec::new(),
            flights: (0..cfg.clients).map(|_| None).collect(),
            next_value: 0,
            seqs: vec![0; cfg.clients],
            faults: Vec::new(),
            cfg,
        };
        let members: Vec<ReplicaDescriptor> = (1..=sim.cfg.nodes)
            .map(|n| ReplicaDescriptor {
                replica_id: n,
                node_id: n,
                role: 0,
            })
            .collect();
        // Two ranges, so that keys of both and their groups interleave.
        let ranges = [(1u64, &b""[..], &b"k2"[..]), (2, &b"k2"[..], &b""[..])];
        for id in 1..=sim.cfg.nodes {
            sim.start(id);
            let descs = ranges
                .iter()
                .map(|(r, s, e)| RangeDescriptor {
                    range_id: *r,
                    start_key: s.to_vec().into(),
                    end_key: e.to_vec().into(),
                    epoch: Some(RangeEpoch {
                        conf_ver: 1,
                        version: 1,
                    }),
                    replicas: members.clone(),
                    state: RangeState::Normal as i32,
                    next_replica_id: sim.cfg.nodes + 1,
                    merge: None,
                })
                .collect();
            let node = sim.nodes[id as usize - 1].as_ref().expect("started");
            // First leaders spread as a layout does: the chosen replica campaigns through the
            // paced wake queue, the others sleep until it does (or time out).
            let nodes = sim.cfg.nodes;
            let first = move |d: &RangeDescriptor| Some(1 + d.range_id % nodes);
            crate::fsm::life::bootstrap(&node.shared, descs, &first, None).expect("bootstrap");
        }
        sim
    }

    fn path(&self, id: u64) -> PathBuf {
        let life = self.lives[id as usize - 1];
        self.dir.path().join(format!("node-{id}-{life}"))
    }

    /// Starts (or restarts) node `id` from its directory, as `NodeGroup::start` does, without
    /// threads.
    fn start(&mut self, id: u64) {
        let store = StoreConfig {
            // A crash loses the process's buffer of unsynced writes, not what reached the OS:
            // an fsync buys nothing here.
            sync: false,
            buffer_unsynced_writes: true,
            block_cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
            ..StoreConfig::default()
        };
        let engine = Engine::open(self.path(id), store).expect("engine");
        engine.bind_node(NodeId(id), 0).expect("bind");
        let (ready_tx, ready) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared::new(
            node_config(id, self.cfg.node_down_ticks),
            engine,
            Arc::new(KvStateMachine),
            ready_tx,
        ));
        crate::fsm::life::recover(&shared).expect("recover");
        let sent = Arc::new(Mutex::new(Vec::new()));
        let _ = shared.transport.set(Arc::new(SimTransport {
            me: id,
            sent: sent.clone(),
            links: self.links.clone(),
            heard: Default::default(),
            base: std::time::Instant::now(),
            questions: Default::default(),
        }));
        let mut cells = shared.cells();
        cells.sort_by_key(|c| c.range.0);
        for c in cells {
            c.schedule(&shared.ready_tx);
        }
        self.nodes[id as usize - 1] = Some(SimNode {
            inbound: Inbound(shared.clone()),
            shared,
            ready,
            sent,
        });
        self.run_node(id);
    }

    fn alive(&self, id: u64) -> bool {
        self.nodes[id as usize - 1].is_some()
    }

    /// Runs worker rounds on node `id` until its ready queue is empty, then puts what it sent
    /// on the network.
    fn run_node(&mut self, id: u64) {
        if self.paused == Some(id) {
            return;
        }
        let Some(node) = self.nodes[id as usize - 1].as_ref() else {
            return;
        };
        let mut out = crate::replica::Output::default();
        for _ in 0..1000 {
            let cells: Vec<_> = node.ready.try_iter().collect();
            if cells.is_empty() {
                break;
            }
            crate::fsm::worker::run_round(&node.shared, &cells, &mut out);
        }
        let sent = std::mem::take(&mut *node.sent.lock());
        for (to, batch) in sent {
            self.net.push(Packet {
                from: NodeId(id),
                to,
                batch,
            });
        }
    }

    fn tick(&mut self, id: u64) {
        if self.paused == Some(id) {
            return;
        }
        {
            let mut links = self.links.lock();
            links.cut = self.cut.clone();
            links.silent = (1..=self.cfg.nodes)
                .filter(|n| !self.alive(*n) || self.paused == Some(*n))
                .collect();
        }
        let Some(node) = self.nodes[id as usize - 1].as_ref() else {
            return;
        };
        crate::fsm::ticker::tick_once(&node.shared, true);
        self.run_node(id);
    }

    /// Delivers (or drops, or duplicates) the packet at `i`.
    fn deliver(&mut self, i: usize, faults_on: bool) {
        if self.paused.is_some() && self.paused == Some(self.net[i].to.0) {
            return;
        }
        let p = self.net.swap_remove(i);
        if self.cut.contains(&(p.from.0, p.to.0)) || !self.alive(p.to.0) {
            return;
        }
        if faults_on && self.rng.gen_bool(self.cfg.drop) {
            return;
        }
        if faults_on && self.rng.gen_bool(self.cfg.duplicate) {
            self.net.push(Packet {
                from: p.from,
                to: p.to,
                batch: p.batch.clone(),
            });
        }
        let node = self.nodes[p.to.0 as usize - 1].as_ref().expect("alive");
        node.inbound.on_batch(p.batch);
        self.run_node(p.to.0);
    }

    fn random_alive(&mut self) -> Option<u64> {
        let alive: Vec<u64> = (1..=self.cfg.nodes).filter(|n| self.alive(*n)).collect();
        (!alive.is_empty()).then(|| alive[self.rng.gen_range(0..alive.len())])
    }

    fn faulty_phase(&mut self) {
        for _ in 0..self.cfg.steps {
            self.step += 1;
            let roll: f64 = self.rng.gen();
            if roll < self.cfg.crash {
                self.crash_or_restart();
            } else if roll < self.cfg.crash + self.cfg.partition {
                self.partition_or_heal();
            } else if roll < self.cfg.crash + self.cfg.partition + self.cfg.pause {
                self.pause_or_resume();
            } else if roll < 0.15 {
                if let Some(n) = self.random_alive() {
                    self.tick(n);
                }
            } else if roll < 0.30 {
                let client = self.rng.gen_range(0..self.cfg.clients);
                self.start_op(client);
            } else if !self.net.is_empty() {
                let i = self.rng.gen_range(0..self.net.len());
                self.deliver(i, true);
            }
            self.poll_ops();
        }
    }

    fn crash_or_restart(&mut self) {
        let down: Vec<u64> = (1..=self.cfg.nodes).filter(|n| !self.alive(*n)).collect();
        if let Some(&n) = down.first() {
            self.faults.push((self.step, format!("restart n{n}")));
            self.start(n);
        } else if let Some(n) = self.random_alive() {
            self.faults.push((self.step, format!("crash n{n}")));
            self.crash(n);
            if self.paused == Some(n) {
                self.paused = None;
            }
        }
    }

    /// Node `n` dies: what it had not synced is lost. Its next life starts from a copy of its
    /// files as they are now; dropping the engine afterwards (which flushes its buffer) only
    /// touches the old life's files.
    fn crash(&mut self, n: u64) {
        let Some(node) = self.nodes[n as usize - 1].take() else {
            return;
        };
        node.shared.engine.stop_background_work();
        let old = self.path(n);
        self.lives[n as usize - 1] += 1;
        let new = self.path(n);
        std::fs::create_dir_all(&new).expect("new life's directory");
        for f in std::fs::read_dir(&old).expect("engine directory") {
            let f = f.expect("directory entry");
            if f.file_name() != "LOCK" {
                std::fs::copy(f.path(), new.join(f.file_name())).expect("copy engine file");
            }
        }
        drop(node);
        let _ = std::fs::remove_dir_all(old);
    }

    fn pause_or_resume(&mut self) {
        match self.paused.take() {
            Some(n) => {
                self.faults.push((self.step, format!("resume n{n}")));
                self.run_node(n);
            }
            None => {
                if let Some(n) = self.random_alive() {
                    self.faults.push((self.step, format!("pause n{n}")));
                    self.paused = Some(n);
                }
            }
        }
    }

    fn partition_or_heal(&mut self) {
        if !self.cut.is_empty() {
            self.faults.push((self.step, "heal".into()));
            self.cut.clear();
            return;
        }
        let n = self.rng.gen_range(1..=self.cfg.nodes);
        self.faults.push((self.step, format!("isolate n{n}")));
        for m in 1..=self.cfg.nodes {
            if m != n {
                self.cut.insert((n, m));
                self.cut.insert((m, n));
            }
        }
    }

    /// Every fault heals; messages flow and nodes tick until every operation finished.
    fn quiet_phase(&mut self) {
        self.cut.clear();
        if let Some(n) = self.paused.take() {
            self.faults.push((self.step, format!("resume n{n}")));
            self.run_node(n);
        }
        for n in 1..=self.cfg.nodes {
            if !self.alive(n) {
                self.faults.push((self.step, format!("restart n{n}")));
                self.start(n);
            }
        }
        for round in 0..3000 {
            if self.flights.iter().all(Option::is_none) && round > 200 {
                break;
            }
            self.step += 1;
            if self.net.is_empty() || round % 8 == 0 {
                let n = 1 + (round as u64 % self.cfg.nodes);
                self.tick(n);
            } else {
                let i = self.rng.gen_range(0..self.net.len());
                self.deliver(i, false);
            }
            self.poll_ops();
        }
        // What never finished may or may not have taken effect.
        for f in self.flights.iter_mut() {
            if let Some(f) = f.take() {
                self.history[f.op].outcome = Outcome::Unknown;
            }
        }
    }

    /// After healing: one linearizable read of every key, on every node in turn.
    fn final_reads(&mut self) {
        for k in 0..self.cfg.keys {
            let node = 1 + (k as u64 % self.cfg.nodes);
            for _attempt in 0..5 {
                let client = 0;
                self.invoke(client, node, k, None);
                for _ in 0..2000 {
                    if self.flights[client].is_none() {
                        break;
                    }
                    self.step += 1;
                    if self.net.is_empty() {
                        self.tick(1 + (self.step % self.cfg.nodes));
                    } else {
                        let i = self.rng.gen_range(0..self.net.len());
                        self.deliver(i, false);
                    }
                    self.poll_ops();
                }
                let last = self.history.last().expect("invoked");
                if last.outcome == Outcome::Ok {
                    break;
                }
            }
        }
    }

    fn start_op(&mut self, client: usize) {
        if self.flights[client].is_some() {
            return;
        }
        let Some(node) = self.random_alive() else {
            return;
        };
        let key = self.rng.gen_range(0..self.cfg.keys);
        let value = self.rng.gen_bool(0.5).then(|| {
            self.next_value += 1;
            format!("v{}", self.next_value).into_bytes()
        });
        self.invoke(client, node, key, value);
    }

    /// Starts a write (`Some(value)`) or a linearizable read of key `key` through `node`, as
    /// the NodeGroup API does.
    fn invoke(&mut self, client: usize, node: u64, key: usize, value: Option<Vec<u8>>) {
        let key_bytes = format!("k{key}").into_bytes();
        let op = self.history.len();
        self.history.push(Op {
            client: client as u64,
            key: key_bytes.clone(),
            kind: match &value {
                Some(v) => Kind::Write(v.clone()),
                None => Kind::Read(None),
            },
            outcome: Outcome::Fail,
            invoke: self.step,
            complete: Some(self.step),
            node,
        });
        let shared = self.nodes[node as usize - 1]
            .as_ref()
            .expect("alive")
            .shared
            .clone();
        let Ok(desc) = shared.router.lookup(&key_bytes) else {
            return;
        };
        let (token, rx) = shared.pending.register(Duration::from_secs(3600));
        let msg = match value {
            Some(v) => {
                self.seqs[client] += 1;
                let cmd = RaftCommand {
                    header: Some(RequestHeader {
                        range_id: desc.range_id,
                        epoch: desc.epoch,
                        request_id: Some(RequestId {
                            client_id: client as u64 + 1,
                            seq: self.seqs[client],
                        }),
                        proposer_node: node,
                        proposal_token: token,
                    }),
                    body: Some(raft_command::Body::App(
                        KvRequest {
                            op: Some(kv_request::Op::Put(Put {
                                key: key_bytes.into(),
                                value: v.into(),
                            })),
                        }
                        .encode_to_vec()
                        .into(),
                    )),
                };
                PeerMsg::Propose {
                    token,
                    data: cmd.encode_to_vec(),
                }
            }
            None => PeerMsg::Read {
                token,
                lease: false,
            },
        };
        if shared.post(desc.id(), msg).is_err() {
            shared.pending.complete(token, Err(Error::Stopped));
            return;
        }
        self.history[op].complete = None;
        self.flights[client] = Some(Flight {
            op,
            node: NodeId(node),
            range: desc.range_id,
            rx,
        });
        self.run_node(node);
    }

    /// Records the operations that finished.
    fn poll_ops(&mut self) {
        for c in 0..self.flights.len() {
            let Some(f) = self.flights[c].as_mut() else {
                continue;
            };
            let answer = match f.rx.try_recv() {
                Ok(a) => Some(a),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => continue,
                // The node crashed with the request in it.
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => None,
            };
            let f = self.flights[c].take().expect("in flight");
            let op = &mut self.history[f.op];
            op.complete = Some(self.step);
            let is_write = matches!(op.kind, Kind::Write(_));
            op.outcome = match (is_write, answer) {
                (true, None) => Outcome::Unknown,
                (true, Some(Ok(bytes))) => {
                    debug_assert!(KvResponse::decode(&bytes[..]).is_ok());
                    Outcome::Ok
                }
                (true, Some(Err(Error::ProposalDropped | Error::ReplicaFailed(_)))) => {
                    Outcome::Unknown
                }
                (true, Some(Err(_))) => Outcome::Fail,
                (false, Some(Ok(_))) => {
                    // The barrier passed: read the engine now, if the range kept its shape.
                    let node = self.nodes[f.node.0 as usize - 1].as_ref();
                    match node {
                        Some(n)
                            if n.shared
                                .router
                                .lookup(&op.key)
                                .is_ok_and(|d| d.range_id == f.range) =>
                        {
                            op.kind = Kind::Read(n.shared.engine.get(&op.key).expect("read"));
                            Outcome::Ok
                        }
                        _ => Outcome::Fail,
                    }
                }
                (false, _) => Outcome::Fail,
            };
        }
    }
}
