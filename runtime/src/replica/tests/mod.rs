//! Replica-level tests: replicas driven phase by phase from the test's own thread, with no
//! worker, ticker or NodeGroup. Each simulated node has its own engine, router and host; the
//! test delivers the messages of one round to the others, so every run is deterministic.
//! This file is the harness; the tests are grouped by feature beside it.

mod admin;
mod compaction;
mod faults;
mod hibernate;
mod propose_read;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::command::{
    kv_request, raft_command, KvRequest, KvResponse, Put, RaftCommand, RequestHeader, RequestId,
    SplitResult,
};
use flotilla_proto::meta::{RangeDescriptor, RangeEpoch, RangeState, ReplicaDescriptor};
use flotilla_proto::transport::Heartbeat;
use flotilla_proto::{Message as _, NodeId, RangeId};
use flotilla_store::{Engine, GroupStorage, StoreConfig, SPLIT_INIT_INDEX, SPLIT_INIT_TERM};
use prost_raft::Message as _;
use raft::prelude::{ConfState, HardState, MessageType};

use super::{Effect, Env, Existing, Host, Output, PeerMsg, Replica};
use crate::api::MembershipChange;
use crate::config::NodeGroupConfig;
use crate::error::Error;
use crate::pending::{Answer, Pending};
use crate::router::RangeRouter;
use crate::state_machine::{ApplyContext, ApplyError, KvStateMachine, StateMachine};

/// The host's answers, set by the test.
#[derive(Default)]
struct TestHost {
    hosted: RefCell<HashSet<u64>>,
    handed_over: RefCell<HashMap<u64, u64>>,
    seal: RefCell<HashMap<u64, Existing>>,
    sealed: RefCell<Vec<RangeId>>,
    /// Nodes this node's liveness declared down.
    down: RefCell<HashSet<u64>>,
    /// Answer as a transport without node liveness would (`node_live` is `None`).
    no_liveness: std::cell::Cell<bool>,
}

impl Host for TestHost {
    fn hosts(&self, range: RangeId) -> bool {
        self.hosted.borrow().contains(&range.0)
    }
    fn handed_over(&self, range: RangeId) -> Option<u64> {
        self.handed_over.borrow().get(&range.0).copied()
    }
    fn seal_uninitialized(&self, range: RangeId) -> Existing {
        self.sealed.borrow_mut().push(range);
        self.seal
            .borrow()
            .get(&range.0)
            .cloned()
            .unwrap_or(Existing::Absent)
    }
    fn node_live(&self, node: NodeId) -> Option<bool> {
        if self.no_liveness.get() {
            return None;
        }
        Some(!self.down.borrow().contains(&node.0))
    }
}

/// One simulated node: its own engine and router, its replicas, what is queued for them.
struct Node {
    id: NodeId,
    _dir: tempfile::TempDir,
    engine: Arc<Engine>,
    router: RangeRouter,
    pending: Pending,
    config: NodeGroupConfig,
    host: TestHost,
    sm: Arc<dyn StateMachine>,
    replicas: HashMap<u64, Replica>,
    inbox: HashMap<u64, Vec<PeerMsg>>,
    /// Replicas with work, as a worker's ready queue would hold them: a message was posted,
    /// or a round asked to run again.
    scheduled: HashSet<u64>,
    /// Answers delivered so far, by token.
    answers: HashMap<u64, Answer>,
    /// Effects other than routing, in the order they came.
    effects: Vec<(RangeId, Effect)>,
    /// Error of the last phase that failed, per range (the replica would be isolated).
    failed: HashMap<u64, Error>,
}

fn config(node: u64) -> NodeGroupConfig {
    NodeGroupConfig {
        election_tick: 10,
        heartbeat_tick: 2,
        ..NodeGroupConfig::new(node)
    }
}

fn descriptor(range: u64, start: &[u8], end: &[u8], nodes: &[u64]) -> RangeDescriptor {
    RangeDescriptor {
        range_id: range,
        start_key: start.to_vec().into(),
        end_key: end.to_vec().into(),
        epoch: Some(RangeEpoch {
            conf_ver: 1,
            version: 1,
        }),
        replicas: nodes
            .iter()
            .map(|n| ReplicaDescriptor {
                replica_id: *n,
                node_id: *n,
                role: 0,
            })
            .collect(),
        state: RangeState::Normal as i32,
        next_replica_id: nodes.len() as u64 + 1,
        merge: None,
    }
}

fn conf_state(desc: &RangeDescriptor) -> ConfState {
    ConfState {
        voters: desc.replicas.iter().map(|r| r.replica_id).collect(),
        ..Default::default()
    }
}

impl Node {
    fn new(id: u64, sm: Arc<dyn StateMachine>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), StoreConfig::default()).unwrap();
        Node {
            id: NodeId(id),
            _dir: dir,
            engine,
            router: RangeRouter::new(),
            pending: Pending::default(),
            config: config(id),
            host: TestHost::default(),
            sm,
            replicas: HashMap::new(),
            inbox: HashMap::new(),
            scheduled: HashSet::new(),
            answers: HashMap::new(),
            effects: Vec::new(),
            failed: HashMap::new(),
        }
    }

    /// Creates this node's replica of `desc` as a bootstrap does (initialized at 5/5).
    fn bootstrap(&mut self, desc: &RangeDescriptor) {
        let mut batch = self.engine.batch();
        let storage = GroupStorage::initialize(
            self.engine.clone(),
            desc.clone(),
            conf_state(desc),
            SPLIT_INIT_INDEX,
            SPLIT_INIT_TERM,
            &mut batch,
        );
        self.engine.write(batch, true).unwrap();
        self.open(storage);
        self.router.upsert(desc.clone());
    }

    fn open(&mut self, storage: GroupStorage) {
        let range = storage.group();
        let logger = crate::logger::root_logger(self.id.0);
        let r = Replica::open(storage, self.id.0, self.id, &self.config, &logger).unwrap();
        self.host.hosted.borrow_mut().insert(range.0);
        self.replicas.insert(range.0, r);
    }

    fn post(&mut self, range: u64, msg: PeerMsg) {
        self.inbox.entry(range).or_default().push(msg);
        self.scheduled.insert(range);
    }

    /// A token the node's pending registry waits for.
    fn token(&self) -> u64 {
        self.pending.register(Duration::from_secs(60)).0
    }

    fn put_cmd(&self, range: u64, token: u64, key: &[u8], value: &[u8]) -> Vec<u8> {
        self.cmd(range, token, key, value, None)
    }

    fn cmd(
        &self,
        range: u64,
        token: u64,
        key: &[u8],
        value: &[u8],
        request_id: Option<(u64, u64)>,
    ) -> Vec<u8> {
        let epoch = self.router.get(RangeId(range)).and_then(|d| d.epoch);
        RaftCommand {
            header: Some(RequestHeader {
                range_id: range,
                epoch,
                request_id: request_id.map(|(client_id, seq)| RequestId { client_id, seq }),
                proposer_node: self.id.0,
                proposal_token: token,
            }),
            body: Some(raft_command::Body::App(
                KvRequest {
                    op: Some(kv_request::Op::Put(Put {
                        key: key.to_vec().into(),
                        value: value.to_vec().into(),
                    })),
                }
                .encode_to_vec()
                .into(),
            )),
        }
        .encode_to_vec()
    }

    /// One round of `range`'s replica as a worker runs it: mailbox, ticks, Ready, one synced
    /// write, then the apply. Routing effects are carried out; the others are recorded.
    fn round(&mut self, range: u64, ticks: u32) -> Output {
        let mut out = Output::default();
        let msgs = self.inbox.remove(&range).unwrap_or_default();
        let Some(replica) = self.replicas.get_mut(&range) else {
            return out;
        };
        let env = Env {
            config: &self.config,
            node: self.id,
            engine: &self.engine,
            router: &self.router,
            state_machine: &*self.sm,
            pending: &self.pending,
            host: &self.host,
        };
        let mut batch = self.engine.batch();
        replica.on_msgs(msgs, &env, &mut out);
        replica.on_ticks(ticks, &env, &mut out);
        let phase1 = replica.collect_ready(&env, &mut out, &mut batch);
        self.engine.write(batch, true).unwrap();
        let mut apply = self.engine.batch();
        let phase2 = phase1.and_then(|()| replica.after_persist(&env, &mut out, &mut apply));
        for (r, index) in std::mem::take(&mut out.forced_compactions) {
            assert_eq!(r.0, range);
            replica.compact_to(index, &mut apply).unwrap();
        }
        // As in a worker round, the apply batch is written whatever one replica's fate: a
        // failed replica's applied index simply did not move.
        self.engine.write(apply, out.sync_apply).unwrap();
        if let Err(e) = phase2 {
            self.failed.insert(range, e);
        }
        for e in std::mem::take(&mut out.effects) {
            match e {
                Effect::Route(d) => {
                    self.router.upsert(d);
                }
                Effect::Post(to, msg) => self.post(to.0, msg),
                other => self.effects.push((RangeId(range), other)),
            }
        }
        for (token, answer) in out.completions.drain(..) {
            self.pending.complete(token, answer.clone());
            self.answers.insert(token, answer);
        }
        if out.reschedule {
            self.scheduled.insert(range);
        }
        out
    }

    fn replica(&self, range: u64) -> &Replica {
        &self.replicas[&range]
    }
}

/// Several nodes and the network between them, driven from this thread.
struct Sim {
    nodes: Vec<Node>,
    /// Nodes cut off from the others: what they send and what is sent to them is lost.
    cut: HashSet<u64>,
    /// Raft snapshots delivered so far.
    snapshots: usize,
}

impl Sim {
    fn of(nodes: Vec<Node>) -> Sim {
        Sim {
            nodes,
            cut: HashSet::new(),
            snapshots: 0,
        }
    }

    /// `n` nodes (ids 1..=n), each with a replica of range 1 covering every key.
    fn new(n: u64) -> Sim {
        Sim::with_state_machine(n, Arc::new(KvStateMachine))
    }

    fn with_state_machine(n: u64, sm: Arc<dyn StateMachine>) -> Sim {
        let ids: Vec<u64> = (1..=n).collect();
        let desc = descriptor(1, b"", b"", &ids);
        let mut nodes: Vec<Node> = ids.iter().map(|i| Node::new(*i, sm.clone())).collect();
        for node in &mut nodes {
            node.bootstrap(&desc);
        }
        Sim::of(nodes)
    }

    fn node(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[id as usize - 1]
    }

    /// Runs one round of every scheduled replica (of every replica when `ticks` > 0, as the
    /// ticker schedules them all), then delivers what they sent. True if work remains.
    fn step(&mut self, ticks: u32) -> bool {
        let mut sent = Vec::new();
        for i in 0..self.nodes.len() {
            let mut ranges: Vec<u64> = if ticks > 0 {
                self.nodes[i].replicas.keys().copied().collect()
            } else {
                self.nodes[i].scheduled.drain().collect()
            };
            ranges.sort_unstable();
            for range in ranges {
                let out = self.nodes[i].round(range, ticks);
                sent.push((self.nodes[i].id, out));
            }
        }
        let mut any = false;
        for (from, mut out) in sent {
            any |= self.deliver(from, &mut out);
        }
        any || self.nodes.iter().any(|n| !n.scheduled.is_empty())
    }

    /// Hands the messages of one round to their nodes, rebuilding coalesced heartbeats as
    /// the inbound handler does.
    fn deliver(&mut self, from: NodeId, out: &mut Output) -> bool {
        let mut any = false;
        let mut heartbeats: Vec<(NodeId, Heartbeat)> = std::mem::take(&mut out.tick_heartbeats);
        for (to, outgoing) in std::mem::take(&mut out.outbox) {
            heartbeats.extend(outgoing.batch.heartbeats.into_iter().map(|h| (to, h)));
            // A node outside the simulation (a learner being added) is not there.
            if to.0 as usize > self.nodes.len() || self.is_cut(from, to) {
                continue;
            }
            for env in outgoing.batch.messages {
                let msg = raft::prelude::Message::decode(&env.message[..]).unwrap();
                if msg.get_msg_type() == MessageType::MsgSnapshot {
                    self.snapshots += 1;
                }
                let node = self.node(to.0);
                if node.replicas.contains_key(&env.range_id) {
                    node.post(
                        env.range_id,
                        PeerMsg::Raft {
                            msg: Box::new(msg),
                            from: env.from.unwrap(),
                            from_conf_ver: env.epoch.unwrap_or_default().conf_ver,
                        },
                    );
                    any = true;
                }
            }
        }
        for (to, hb) in heartbeats {
            if to.0 as usize > self.nodes.len() || self.is_cut(from, to) {
                continue;
            }
            let node = self.node(to.0);
            if node.replicas.contains_key(&hb.range_id) {
                let from = ReplicaDescriptor {
                    replica_id: hb.from_replica,
                    node_id: from.0,
                    role: 0,
                };
                node.post(hb.range_id, super::send::heartbeat_input(&hb, from));
                any = true;
            }
        }
        any
    }

    fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.cut.contains(&from.0) || self.cut.contains(&to.0)
    }

    /// Steps until nothing is in flight (bounded).
    fn settle(&mut self) {
        for _ in 0..200 {
            if !self.step(0) {
                return;
            }
        }
        panic!("the simulation did not settle in 200 rounds");
    }

    /// Ticks until `pred` holds (bounded), settling after each tick.
    fn tick_until(&mut self, what: &str, pred: impl Fn(&Sim) -> bool) {
        for _ in 0..300 {
            if pred(self) {
                return;
            }
            self.step(1);
            self.settle();
        }
        panic!("{what} did not happen within 300 ticks");
    }

    /// Elects node `id` leader of `range` and waits until every node knows it.
    fn elect(&mut self, id: u64, range: u64) {
        let all: Vec<u64> = (1..=self.nodes.len() as u64).collect();
        self.elect_among(id, range, &all);
    }

    /// Elects node `id` leader of `range` and waits until the nodes `among` know it.
    fn elect_among(&mut self, id: u64, range: u64, among: &[u64]) {
        self.node(id).post(range, PeerMsg::Campaign);
        self.settle();
        self.tick_until("election", |s| {
            among.iter().all(|n| {
                s.nodes[*n as usize - 1]
                    .replicas
                    .get(&range)
                    .is_none_or(|r| r.raw.raft.leader_id == id)
            })
        });
    }

    /// Proposes a put through node `id` and settles; returns the answer.
    fn put(&mut self, id: u64, key: &[u8], value: &[u8]) -> Answer {
        let node = self.node(id);
        let range = node.router.lookup(key).unwrap().range_id;
        let token = node.token();
        let data = node.put_cmd(range, token, key, value);
        node.post(range, PeerMsg::Propose { token, data });
        self.settle();
        self.node(id).answers.remove(&token).expect("answered")
    }
}

/// Whether a KV answer says ok (a put's answer is empty: it succeeded).
fn kv_ok(answer: &Answer) -> bool {
    let bytes = answer.as_ref().unwrap();
    bytes.is_empty() || KvResponse::decode(&bytes[..]).unwrap().ok
}
