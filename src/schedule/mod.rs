//! The scheduler: it keeps leaders balanced across nodes, every range at its replication
//! factor (a node down for longer than `down_time` has its replicas rebuilt on other nodes),
//! and replica counts balanced, by leader transfers and moves (learner → caught up →
//! promoted in a joint change that removes the replica it replaces).
//!
//! It runs on every node, on the server's tokio runtime, and each node decides only for the
//! ranges it leads (as CockroachDB's allocator does, not one placement driver as in TiKV):
//! ARCHITECTURE.md says why. Each pass (every `interval`):
//! 1. measures this node (replicas, leaders, bytes, write and read rates, snapshots in
//!    flight) and publishes it on the node-pair streams (`GrpcTransport::publish_stats`),
//!    whence every other node keeps it;
//! 2. joins that with every node's statistics and this node's failure detector into the
//!    cluster view that `Nodes` shows;
//! 3. when enabled, finds the small ranges led here that should merge with a small neighbour
//!    (`merge_goal`: sizes measured here, a neighbour this node hosts a replica of), asks
//!    [`decide`] (pure, in `decide.rs`) what to do with the ranges led here, does it, and
//!    records each decision and its outcome in a bounded log (`Placement`).
//!
//! The statistics and the log live in [`Placement`], shared with the admin service.

mod config;
mod decide;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use flotilla_proto::meta::{RangeDescriptor, ReplicaDescriptor, ReplicaRole};
use flotilla_proto::transport::NodeStats;
use flotilla_proto::{NodeId, RangeId};
use flotilla_runtime::{MembershipChange, NodeGroup};
use flotilla_transport::GrpcTransport;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

pub use self::config::ScheduleConfig;
pub use self::decide::{
    decide, Action, Load, MergeGoal, NodeState, NodeView, RangeView, Standing, View, Why,
};

/// Ranges led here with nothing to do that one pass looks at as candidates for balancing
/// (the next ones in range id order each pass). Balancing moves a few ranges a pass
/// (`max_moves_per_node`, `max_transfers_per_pass`), so a few hundred candidates are plenty.
const BALANCE_SAMPLE: usize = 256;

/// Every how many passes the whole leader index is walked (the others look only at the
/// ranges found busy before): the walk is a lookup and a lock per range led, the bulk of an
/// idle node's CPU at 100,000 replicas.
const FULL_WALK_EVERY: u64 = 4;

/// Keys walked to measure this node's data exactly; past it RocksDB's estimate is used.
const MEASURE_MAX_KEYS: u64 = 1_000;

/// Passes a small range waits on a neighbouring edge before it goes ahead (see
/// `merge_goal`).
const MERGE_PATIENCE: u32 = 30;

/// A small range not looked at for this long is forgotten (it is no longer led here, or
/// merged away): the balancing sample visits every range led here far more often.
const FORGET_SMALL_AFTER: Duration = Duration::from_secs(3600);

/// How long one action may take before the pass gives up waiting on it (it may still
/// complete; the next pass sees the outcome in the descriptor).
const ACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// One node as the scheduler of this node sees it: what `flotilla-ctl nodes` shows.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// The node.
    pub node: NodeId,
    /// Its liveness, from this node's failure detector.
    pub state: NodeState,
    /// Its standing in the node registry (draining, removed), as last read; removed also as
    /// soon as the failure detector was told (`NodeLiveness::removed`): its replicas are then
    /// rebuilt without waiting for `down_time`.
    pub standing: Standing,
    /// How long it has been in that state (since this node started watching, at most).
    pub state_for: Duration,
    /// Its latest statistics, if it published any.
    pub stats: Option<NodeStats>,
    /// How old they are.
    pub stats_age: Option<Duration>,
}

/// One decision of the scheduler and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When it was decided (wall clock, for operators).
    pub at: SystemTime,
    /// The range it concerned.
    pub range: RangeId,
    /// `transfer-leader`, `add-learner`, `promote`, `remove` or `merge`.
    pub action: &'static str,
    /// What exactly: the replicas and nodes concerned, and why.
    pub detail: String,
    /// `Ok` once done; the error otherwise.
    pub outcome: Result<(), String>,
}

/// What the scheduler knows and did, shared with the admin API.
#[derive(Debug)]
pub struct Placement {
    config: ScheduleConfig,
    nodes: Mutex<Vec<NodeInfo>>,
    /// Each node's standing as the registry said at its last reading (see `note_registry`).
    registry: Mutex<BTreeMap<NodeId, Standing>>,
    log: Mutex<VecDeque<Event>>,
    moves_in_flight: std::sync::atomic::AtomicUsize,
}

impl Placement {
    fn new(config: ScheduleConfig) -> Self {
        Placement {
            config,
            nodes: Mutex::new(Vec::new()),
            registry: Mutex::new(BTreeMap::new()),
            log: Mutex::new(VecDeque::new()),
            moves_in_flight: Default::default(),
        }
    }

    /// Whether the scheduler takes decisions (`[schedule].enabled`).
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// The replication factor the scheduler keeps (`[schedule].replication_factor`).
    pub fn replication_factor(&self) -> usize {
        self.config.replication_factor
    }

    /// Every node of the cluster as of the last pass, in node order.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The latest decisions, oldest first (at most `log_capacity`).
    pub fn events(&self) -> Vec<Event> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect()
    }

    /// Moves (learners added, not yet promoted) in the ranges this node leads, at the last
    /// pass.
    pub fn moves_in_flight(&self) -> usize {
        self.moves_in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What the node registry says of each node, as read by the node's registry watcher
    /// (every second): the passes after it drain the draining nodes and rebuild the removed
    /// nodes' replicas.
    pub fn note_registry(&self, records: &[flotilla_proto::meta::NodeRecord]) {
        use flotilla_proto::meta::NodeState as Registry;
        let standings = records.iter().map(|r| {
            let standing = match Registry::try_from(r.state) {
                Ok(Registry::Draining) => Standing::Draining,
                Ok(Registry::Removed) => Standing::Removed,
                _ => Standing::Member,
            };
            (NodeId(r.node_id), standing)
        });
        *self.registry.lock().unwrap_or_else(|e| e.into_inner()) = standings.collect();
    }

    fn standing(&self, node: NodeId) -> Standing {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry.get(&node).copied().unwrap_or_default()
    }

    fn record(&self, event: Event) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        while log.len() >= self.config.log_capacity {
            log.pop_front();
        }
        log.push_back(event);
    }
}

/// The scheduler task of one node; stopped (aborted) when dropped.
#[derive(Debug)]
pub struct Scheduler {
    placement: Arc<Placement>,
    task: JoinHandle<()>,
}

impl Scheduler {
    /// Starts the passes of `node` on `runtime`. The cluster is this node and the
    /// transport's peers (looked up at each pass, so peers added later count).
    pub fn start(
        node: Arc<NodeGroup>,
        transport: Arc<GrpcTransport>,
        config: ScheduleConfig,
        runtime: &Handle,
    ) -> Scheduler {
        let placement = Arc::new(Placement::new(config));
        let mut state = PassState {
            node,
            transport,
            placement: placement.clone(),
            since: BTreeMap::new(),
            hosts: BTreeSet::new(),
            cursor: 0,
            passes: 0,
            last_up: BTreeSet::new(),
            busy: BTreeSet::new(),
            last_counts: None,
            small: HashMap::new(),
        };
        let task = runtime.spawn(async move {
            let interval = state.placement.config.interval;
            loop {
                tokio::time::sleep(interval).await;
                state.pass().await;
            }
        });
        Scheduler { placement, task }
    }

    /// The shared view and log.
    pub fn placement(&self) -> Arc<Placement> {
        self.placement.clone()
    }

    /// Stops the passes (an action under way is abandoned where it stands; the next leader
    /// of its range finishes or undoes it).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct PassState {
    node: Arc<NodeGroup>,
    transport: Arc<GrpcTransport>,
    placement: Arc<Placement>,
    /// Per node: its state and since when (this node's clock).
    since: BTreeMap<NodeId, (NodeState, Instant)>,
    /// Nodes seen hosting replicas of ranges led here (watched, and in the view, from then
    /// on, whether or not the transport has met them).
    hosts: BTreeSet<NodeId>,
    /// The last range looked at as a balancing candidate (see `led_ranges`).
    cursor: u64,
    /// Passes so far (every `FULL_WALK_EVERY`th walks the whole leader index).
    passes: u64,
    /// The nodes up at the previous pass (a change makes the next pass walk everything).
    last_up: BTreeSet<NodeId>,
    /// Ranges led here found busy, or acted on, at the previous pass.
    busy: BTreeSet<RangeId>,
    /// Writes and reads at the previous pass, for the rates.
    last_counts: Option<(u64, u64, Instant)>,
    /// Ranges led here seen below `merge_below_bytes`, and since when (see `merge_goal`).
    small: HashMap<RangeId, Small>,
}

/// Since when a range led here has been small, and its key interval then.
#[derive(Debug, Clone)]
struct Small {
    start: bytes::Bytes,
    end: bytes::Bytes,
    since: Instant,
    seen: Instant,
    /// Since when the range has waited on a neighbouring edge (see `merge_goal`).
    waiting: Option<Instant>,
}

impl Small {
    fn new(d: &RangeDescriptor, now: Instant) -> Small {
        Small {
            start: d.start_key.clone(),
            end: d.end_key.clone(),
            since: now,
            seen: now,
            waiting: None,
        }
    }

    /// Whether `d` covers at least the interval seen before: the range merged (it absorbed
    /// a neighbour) or did not change, but did not split.
    fn covered_by(&self, d: &RangeDescriptor) -> bool {
        d.start_key <= self.start
            && (d.end_key.is_empty() || (!self.end.is_empty() && d.end_key >= self.end))
    }
}

impl PassState {
    async fn pass(&mut self) {
        let node = self.node.clone();
        let transport = self.transport.clone();
        let measured = tokio::task::spawn_blocking(move || measure(&node, &transport)).await;
        let Ok((status, bytes, snapshots)) = measured else {
            return;
        };
        let now = Instant::now();
        let (write_rate, read_rate) = match self.last_counts {
            Some((w, r, at)) => {
                let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                (
                    status.writes.saturating_sub(w) as f64 / secs,
                    status.reads.saturating_sub(r) as f64 / secs,
                )
            }
            None => (0.0, 0.0),
        };
        self.last_counts = Some((status.writes, status.reads, now));
        let mine = NodeStats {
            replicas: status.replicas as u64,
            leaders: status.leaders as u64,
            bytes,
            write_rate,
            read_rate,
            snapshots_in_flight: snapshots as u64,
            system_replica: status.system.is_some(),
        };
        self.transport.publish_stats(mine);
        let infos = self.view_nodes(mine, now);
        // The nodes that may hold replicas: up, and neither draining nor removed.
        let up: BTreeSet<NodeId> = infos
            .iter()
            .filter(|i| i.state == NodeState::Up && i.standing == Standing::Member)
            .map(|i| i.node)
            .collect();
        let node = self.node.clone();
        let factor = self.placement.config.replication_factor;
        // The whole leader index is walked every `FULL_WALK_EVERY` passes, or when a node's
        // state changed; the passes between look only at the ranges found busy (or acted on)
        // before, so that moves in flight still progress every pass.
        let full = self.passes.is_multiple_of(FULL_WALK_EVERY) || up != self.last_up;
        self.passes += 1;
        self.last_up = up.clone();
        let ranges = if full {
            let cursor = self.cursor;
            let Ok((ranges, cursor)) =
                tokio::task::spawn_blocking(move || led_ranges(&node, &up, factor, cursor)).await
            else {
                return;
            };
            self.cursor = cursor;
            ranges
        } else {
            let ids: Vec<RangeId> = self.busy.iter().copied().collect();
            let Ok(statuses) = tokio::task::spawn_blocking(move || node.leading_among(&ids)).await
            else {
                return;
            };
            statuses.into_iter().filter_map(range_view).collect()
        };
        let config = &self.placement.config;
        let ranges = if config.enabled && config.merge_below_bytes > 0 {
            let (node, up, config) = (self.node.clone(), self.last_up.clone(), config.clone());
            let mut small = std::mem::take(&mut self.small);
            if full {
                small.retain(|_, s| now.duration_since(s.seen) < FORGET_SMALL_AFTER);
            }
            let found = tokio::task::spawn_blocking(move || {
                let mut ranges = ranges;
                for r in &mut ranges {
                    r.merge = merge_goal(&node, &r.desc, &up, &config, &mut small, now);
                }
                (ranges, small)
            })
            .await;
            let Ok((ranges, small)) = found else {
                return;
            };
            self.small = small;
            ranges
        } else {
            ranges
        };
        // Ranges with something to do, or on their way to a merge, are looked at every pass.
        self.busy = ranges
            .iter()
            .filter(|r| r.merge.is_some() || is_busy(&r.desc, &self.last_up, factor))
            .map(|r| r.desc.id())
            .collect();
        // Nodes that host replicas of ranges led here are watched from now on, even before
        // the transport has met them (a node that just joined): the failure detector then
        // declares them up or, if they never answer, down.
        for r in &ranges {
            for d in &r.desc.replicas {
                let n = NodeId(d.node_id);
                if self.hosts.insert(n) {
                    self.node.watch_node(n);
                }
            }
        }
        let moves = ranges
            .iter()
            .filter(|r| {
                r.desc
                    .replicas
                    .iter()
                    .any(|d| d.role == ReplicaRole::Learner as i32)
            })
            .count();
        self.placement
            .moves_in_flight
            .store(moves, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("flotilla_schedule_moves_in_flight").set(moves as f64);
        let view = View {
            me: self.node.node_id(),
            nodes: infos
                .iter()
                .map(|i| NodeView {
                    node: i.node,
                    state: i.state,
                    standing: i.standing,
                    state_for: i.state_for,
                    load: i.stats.as_ref().map(|s| Load {
                        replicas: s.replicas,
                        leaders: s.leaders,
                        snapshots: s.snapshots_in_flight,
                    }),
                })
                .collect(),
            ranges,
        };
        *self
            .placement
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = infos;
        let actions = decide(&view, &self.placement.config);
        // A range acted on is looked at again next pass (a learner added is a move to finish).
        self.busy.extend(actions.iter().map(Action::range));
        let mut running = tokio::task::JoinSet::new();
        for action in actions {
            let node = self.node.clone();
            let placement = self.placement.clone();
            running.spawn(async move {
                let at = SystemTime::now();
                let (name, detail) = describe(&action);
                let outcome = match tokio::time::timeout(ACTION_TIMEOUT, act(&node, &action)).await
                {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no outcome within {ACTION_TIMEOUT:?}")),
                };
                count(&action, outcome.is_ok());
                match &outcome {
                    Ok(()) => tracing::info!(node = %node.node_id(), range = %action.range(), action = name, %detail, "placement"),
                    Err(e) => tracing::info!(node = %node.node_id(), range = %action.range(), action = name, %detail, error = %e, "placement failed"),
                }
                placement.record(Event {
                    at,
                    range: action.range(),
                    action: name,
                    detail,
                    outcome,
                });
            });
        }
        while running.join_next().await.is_some() {}
    }

    /// Every watched node with its state (and how long it has been in it) and statistics.
    fn view_nodes(&mut self, mine: NodeStats, now: Instant) -> Vec<NodeInfo> {
        let me = self.node.node_id();
        let tracked = self.node.node_liveness();
        let liveness: BTreeMap<NodeId, (bool, usize)> = tracked
            .iter()
            .map(|l| (l.node, (l.up && !l.removed, l.silent_ticks)))
            .collect();
        let removed: BTreeSet<NodeId> = tracked
            .iter()
            .filter(|l| l.removed)
            .map(|l| l.node)
            .collect();
        let suspect_after = self.node.config().down_ticks() / 2;
        let stats: BTreeMap<NodeId, (NodeStats, Instant)> = self
            .transport
            .peer_stats()
            .into_iter()
            .map(|(n, s, at)| (n, (s, at)))
            .collect();
        let mut all = self.transport.peers();
        all.extend(self.hosts.iter().copied().filter(|&n| n != me));
        all.sort();
        all.dedup();
        for &n in &all {
            // A peer that hosts nothing yet is still a candidate for replicas: have the
            // failure detector watch it (idempotent).
            self.node.watch_node(n);
        }
        if !all.contains(&me) {
            all.push(me);
        }
        all.sort();
        all.into_iter()
            .map(|n| {
                let state = if n == me {
                    NodeState::Up
                } else {
                    match liveness.get(&n) {
                        Some((false, _)) => NodeState::Down,
                        Some((true, silent)) if *silent > suspect_after.max(1) => {
                            NodeState::Suspect
                        }
                        _ => NodeState::Up,
                    }
                };
                let entry = self.since.entry(n).or_insert((state, now));
                if entry.0 != state {
                    *entry = (state, now);
                }
                let (stats, age) = if n == me {
                    (Some(mine), Some(Duration::ZERO))
                } else {
                    match stats.get(&n) {
                        Some((s, at)) => (Some(*s), Some(now.saturating_duration_since(*at))),
                        None => (None, None),
                    }
                };
                NodeInfo {
                    node: n,
                    state,
                    standing: if removed.contains(&n) {
                        Standing::Removed
                    } else {
                        self.placement.standing(n)
                    },
                    state_for: now.duration_since(entry.1),
                    stats,
                    stats_age: age,
                }
            })
            .collect()
    }
}

/// This node's counters, data size and snapshots in flight (walks every replica: run off the
/// async threads).
fn measure(
    node: &NodeGroup,
    transport: &GrpcTransport,
) -> (flotilla_runtime::NodeStatus, u64, usize) {
    let status = node.node_status();
    let bytes = node
        .engine()
        .data_size(b"", b"", MEASURE_MAX_KEYS)
        .map_or(0, |s| s.bytes);
    (status, bytes, transport.snapshots_in_flight())
}

/// The ranges led here that a pass looks at, and the cursor of the next pass: every one
/// with something to do (a move in flight, a replica on a node not up, more voters than the
/// replication factor, or fewer while an up node could take one: see `is_busy`) and the next
/// `BALANCE_SAMPLE` of the others after `cursor` (in range id order, wrapping), the
/// candidates for balancing. A pass at 100,000 replicas
/// a node thus builds a few hundred statuses, not one per range led.
fn led_ranges(
    node: &NodeGroup,
    up: &BTreeSet<NodeId>,
    factor: usize,
    cursor: u64,
) -> (Vec<RangeView>, u64) {
    let mut sampled = 0;
    let mut last = cursor;
    let statuses = node.leading(|d| {
        if is_busy(d, up, factor) {
            return true;
        }
        if sampled < BALANCE_SAMPLE && d.id().0 > cursor {
            sampled += 1;
            last = d.id().0;
            return true;
        }
        false
    });
    let next = if sampled < BALANCE_SAMPLE { 0 } else { last };
    // The system range (not in the leader index's walk of ranges) when it has something to
    // do: its replicas are repaired and drained like any range's, never balanced.
    let system = node
        .leading_among(&[RangeId::SYSTEM])
        .into_iter()
        .filter(|st| {
            st.descriptor
                .as_ref()
                .is_some_and(|d| is_busy(d, up, factor))
        });
    (
        statuses
            .into_iter()
            .chain(system)
            .filter_map(range_view)
            .collect(),
        next,
    )
}

/// Whether a range led here has something to do: a move in flight, a replica on a node not
/// `up` (which holds only nodes that may hold replicas: not draining ones), more voters than the replication factor, or fewer while an up node could take one
/// (only then: a one-node cluster's ranges are not all looked at on every pass).
fn is_busy(d: &RangeDescriptor, up: &BTreeSet<NodeId>, factor: usize) -> bool {
    let voters = d
        .replicas
        .iter()
        .filter(|r| r.role == ReplicaRole::Voter as i32)
        .count();
    voters > factor
        || (voters < factor && up.len() > d.replicas.len())
        || d.replicas
            .iter()
            .any(|r| r.role == ReplicaRole::Learner as i32 || !up.contains(&NodeId(r.node_id)))
}

/// The merge the range `desc` (led here) takes part in, if any (see [`MergeGoal`]). It must
/// have stayed below `merge_below_bytes` for `merge_delay` without splitting, every replica
/// on an up node.
///
/// Merges go left into right, one per *edge* between two adjacent ranges that are small
/// together (below `merge_below_bytes`). Of two edges that share a range only one may merge
/// at a time (a range merging into its neighbour while another merges into it would have one
/// merge roll back, its source frozen meanwhile), so an edge merges only if it is the first of
/// its adjacent edges in a fixed pseudo-random order of their left ranges' ids: disjoint pairs
/// along a run of small ranges merge at once, and in every run some edge goes. This node
/// judges the edges it can see (the neighbours it hosts a replica of, measured here); an
/// edge it cannot see does not hold the others back.
/// - The edge to the right neighbour is first: this range moves onto the neighbour's nodes
///   and merges into it.
/// - The edge to the left neighbour is first: that neighbour's leader merges it into this
///   range, and this range holds still meanwhile (its goal is its own nodes); if that
///   leader's node hosts no replica of this range (it cannot see the edge), this range moves
///   onto the left neighbour's nodes so that it can.
///
/// A pair whose two leaders each host no replica of the other range is not merged.
fn merge_goal(
    node: &NodeGroup,
    desc: &RangeDescriptor,
    up: &BTreeSet<NodeId>,
    config: &ScheduleConfig,
    small: &mut HashMap<RangeId, Small>,
    now: Instant,
) -> Option<MergeGoal> {
    let id = desc.id();
    // This range's learner is its move onto the goal: allowed here, not in a neighbour.
    if id.is_system() || !settled(desc, up, config.replication_factor, true) {
        return None;
    }
    let limit = config.merge_below_bytes;
    let Some(bytes) = range_bytes(node, desc).filter(|b| *b < limit) else {
        small.remove(&id);
        return None;
    };
    // A split starts the delay over (a range just split is not merged back at once); a merge
    // does not (the merged range may merge on: a run of small ranges merges in a few rounds).
    let entry = small.entry(id).or_insert_with(|| Small::new(desc, now));
    if !entry.covered_by(desc) {
        *entry = Small::new(desc, now);
    }
    (entry.start, entry.end) = (desc.start_key.clone(), desc.end_key.clone());
    entry.seen = now;
    if now.duration_since(entry.since) < config.merge_delay {
        return None;
    }
    // What this node sees of the neighbouring edges may differ from what their leaders see
    // (sizes measured elsewhere, neighbours not hosted there): a range that waited on one
    // for `MERGE_PATIENCE` passes goes ahead (at worst one merge rolls back) rather than
    // wait forever.
    let impatient = entry
        .waiting
        .is_some_and(|w| now.duration_since(w) >= config.interval * MERGE_PATIENCE);
    let (goal, waits) = merge_role(node, desc, bytes, config, up, impatient);
    let entry = small.get_mut(&id)?;
    entry.waiting = if waits {
        entry.waiting.or(Some(now))
    } else {
        None
    };
    goal
}

/// The part of [`merge_goal`] past the range's own size and delay: its goal, and whether it
/// waits on a neighbouring edge (held back by one that comes first, or holding still while
/// its left neighbour merges into it). `impatient`: it waited long enough, and goes ahead.
fn merge_role(
    node: &NodeGroup,
    desc: &RangeDescriptor,
    bytes: u64,
    config: &ScheduleConfig,
    up: &BTreeSet<NodeId>,
    impatient: bool,
) -> (Option<MergeGoal>, bool) {
    let id = desc.id();
    let limit = config.merge_below_bytes;
    // A neighbour hosted here that can take part (no learner: its own move comes first),
    // with its size.
    let sized = |d: Option<RangeDescriptor>| {
        let d = d.filter(|d| settled(d, up, config.replication_factor, false))?;
        let b = range_bytes(node, &d)?;
        Some((d, b))
    };
    let (left, right) = node.neighbours(id);
    let unseen_right = !desc.end_key.is_empty() && right.is_none();
    let (left, right) = (sized(left), sized(right));
    let joins = |a: u64, b: u64| a.saturating_add(b) < limit;
    // An edge seen here that comes before the edge whose left range is `than`.
    let before = |edge: Option<(&RangeDescriptor, u64, u64)>, than: &RangeDescriptor| {
        edge.is_some_and(|(l, lb, rb)| joins(lb, rb) && edge_order(l) < edge_order(than))
    };
    let nodes = |d: &RangeDescriptor| d.replicas.iter().map(|r| NodeId(r.node_id)).collect();
    let mut held_back = false;
    if let Some((r, rb)) = right.as_ref().filter(|(_, rb)| joins(bytes, *rb)) {
        let beyond = sized(node.neighbours(r.id()).1);
        let left_edge = left.as_ref().map(|(l, lb)| (l, *lb, bytes));
        let right_edge = beyond.as_ref().map(|(_, cb)| (r, *rb, *cb));
        held_back = before(left_edge, desc) || before(right_edge, desc);
        if !held_back || impatient {
            let goal = MergeGoal {
                nodes: nodes(r),
                into: Some(r.clone()),
            };
            return (Some(goal), false);
        }
    }
    let target_of_left = || {
        let (l, lb) = left.as_ref().filter(|(_, lb)| joins(*lb, bytes))?;
        let outer = sized(node.neighbours(l.id()).0);
        let outer_edge = outer.as_ref().map(|(w, wb)| (w, *wb, *lb));
        let inner_edge = right.as_ref().map(|(_, rb)| (desc, bytes, *rb));
        if before(outer_edge, l) || before(inner_edge, l) {
            return None;
        }
        let leader = node.status(l.id()).ok()?.leader_node?;
        // A learner there is this range's move onto that node, not finished: the goal
        // holds until it is promoted (the promotion then removes the replica off the goal).
        let hosts_this = desc
            .replicas
            .iter()
            .any(|r| r.node_id == leader.0 && is_voter(r));
        let goal = if leader == node.node_id() || hosts_this {
            nodes(desc) // that leader merges the left neighbour in: hold still
        } else {
            nodes(l)
        };
        Some(MergeGoal {
            nodes: goal,
            into: None,
        })
    };
    match target_of_left() {
        Some(goal) if !impatient => (Some(goal), true),
        None if unseen_right && impatient => {
            // This node hosts no replica of the right neighbour, so neither its size nor its
            // nodes are known here: the next voter (in node order) takes the leadership and
            // looks. Any two sets of three voters on up to five nodes share a node, so one of
            // them sees it; past that, the hand-over repeats at most once per `merge_delay`
            // and patience on each node.
            let mut voters: Vec<NodeId> = desc.replicas.iter().map(|r| NodeId(r.node_id)).collect();
            voters.sort();
            let me = node.node_id();
            let next = voters.iter().find(|n| **n > me).or(voters.first()).copied();
            let goal = next.filter(|n| *n != me).map(|n| MergeGoal {
                nodes: vec![n],
                into: None,
            });
            (goal, false)
        }
        None if unseen_right => (None, true),
        _ => (None, held_back),
    }
}

/// Whether the range `d` can take part in a merge: not merging, every replica on an `up`
/// node, no more voters than `factor` (a joint change lists both halves' voters), and a
/// learner only if `learners`.
fn settled(d: &RangeDescriptor, up: &BTreeSet<NodeId>, factor: usize, learners: bool) -> bool {
    d.merge.is_none()
        && d.replicas.iter().filter(|r| is_voter(r)).count() <= factor
        && d.replicas
            .iter()
            .all(|r| (learners || is_voter(r)) && up.contains(&NodeId(r.node_id)))
}

fn is_voter(r: &ReplicaDescriptor) -> bool {
    r.role == ReplicaRole::Voter as i32
}

/// The bytes of `d`'s keys and values on this node (exact up to `MEASURE_MAX_KEYS` keys).
fn range_bytes(node: &NodeGroup, d: &RangeDescriptor) -> Option<u64> {
    node.engine()
        .data_size(&d.start_key, &d.end_key, MEASURE_MAX_KEYS)
        .ok()
        .map(|s| s.bytes)
}

/// The place of the edge whose left range is `d` in the order in which adjacent edges merge:
/// a fixed mix of the range id (the same on every node), so that neighbouring edges are
/// ordered at random and not by id (ids grow along the key space after a bootstrap, and
/// ordering by them would merge a run one range at a time).
fn edge_order(d: &RangeDescriptor) -> u64 {
    // SplitMix64's finalizer.
    let mut z = d.range_id.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What `decide` sees of a range led here (none without a descriptor).
fn range_view(st: flotilla_runtime::ReplicaStatus) -> Option<RangeView> {
    Some(RangeView {
        desc: st.descriptor?,
        leader: flotilla_proto::ReplicaId(st.replica_id),
        commit: st.commit,
        progress: st
            .progress
            .iter()
            .map(|p| {
                (
                    flotilla_proto::ReplicaId(p.replica_id),
                    p.matched,
                    p.recent_active,
                )
            })
            .collect(),
        merge: None,
    })
}

/// Does one action through the NodeGroup's API (this node's replica leads the range).
async fn act(node: &NodeGroup, action: &Action) -> flotilla_runtime::Result<()> {
    match *action {
        Action::TransferLeader { range, to, .. } => node.transfer_leader(range, to).await,
        Action::AddLearner { range, node: n, .. } => node
            .change_membership(range, vec![MembershipChange::AddLearner(n)])
            .await
            .map(|_| ()),
        Action::Promote {
            range,
            learner,
            remove,
        } => {
            let mut changes = vec![MembershipChange::Promote(learner)];
            changes.extend(remove.map(MembershipChange::Remove));
            node.change_membership(range, changes).await.map(|_| ())
        }
        Action::Remove { range, replica } => node
            .change_membership(range, vec![MembershipChange::Remove(replica)])
            .await
            .map(|_| ()),
        Action::Merge { range, target } => node.merge(range, target).await.map(|_| ()),
    }
}

fn describe(action: &Action) -> (&'static str, String) {
    match action {
        Action::TransferLeader { to, node, .. } => (
            "transfer-leader",
            format!("to replica {to} on node {node} (leaders unbalanced)"),
        ),
        Action::AddLearner { node, why, .. } => (
            "add-learner",
            format!(
                "on node {node} ({})",
                match why {
                    Why::Repair => "repair: a replica's node is down past down_time",
                    Why::Balance => "balance replica counts",
                    Why::Drain => "drain: a replica's node is being decommissioned",
                    Why::Merge => "merge: onto the nodes of a small neighbour",
                }
            ),
        ),
        Action::Promote {
            learner, remove, ..
        } => (
            "promote",
            match remove {
                Some(r) => format!("learner {learner}, removing replica {r} (joint change)"),
                None => format!("learner {learner}"),
            },
        ),
        Action::Remove { replica, .. } => ("remove", format!("replica {replica}")),
        Action::Merge { target, .. } => (
            "merge",
            format!("into range {target} (small neighbours on the same nodes)"),
        ),
    }
}

fn count(action: &Action, ok: bool) {
    if !ok {
        metrics::counter!("flotilla_schedule_failed_actions_total").increment(1);
        return;
    }
    match action {
        Action::TransferLeader { .. } => {
            metrics::counter!("flotilla_schedule_leader_transfers_total").increment(1)
        }
        Action::AddLearner { why, .. } => metrics::counter!(
            "flotilla_schedule_moves_started_total",
            "why" => match why { Why::Repair => "repair", Why::Balance => "balance", Why::Drain => "drain", Why::Merge => "merge" }
        )
        .increment(1),
        Action::Promote { .. } => {
            metrics::counter!("flotilla_schedule_moves_finished_total").increment(1)
        }
        Action::Remove { .. } => metrics::counter!("flotilla_schedule_removals_total").increment(1),
        Action::Merge { .. } => metrics::counter!("flotilla_schedule_merges_total").increment(1),
    }
}
