//! The scheduler's decisions, as pure functions of what a node knows: the statistics and
//! liveness of every node, and the ranges it leads with their replicas' progress. No I/O, no
//! clock (time arrives as durations), so every rule is unit-tested on plain values.
//!
//! One pass looks at each range this node leads and picks at most one step for it, in order
//! of priority:
//! 1. **finish a move in flight** (the range has a learner): abandon it if the learner's node
//!    is declared down (a suspect node, or one not heard from yet, is waited for: a node that
//!    just joined is not known to every failure detector at once); once the learner has caught up, promote it and, in the same joint-consensus
//!    change, remove the replica it replaces (on a dead node, else on the most loaded node),
//!    never the leader, and only if a quorum of healthy voters remains;
//! 2. **repair and drain**: a voter on a node down for longer than `down_time` (or removed
//!    from the registry), or on a node being drained, gets a learner on the up node with the
//!    fewest replicas (step 1 then completes the move, removing the dead or draining replica);
//!    a draining node's own replica, when it leads, waits for step 5 to hand the leadership
//!    away first;
//! 3. **trim** a range above its replication factor (a voter on a down node first);
//! 4. **merge small neighbours**: a range the pass found small beside a small neighbour (see
//!    [`MergeGoal`]) first moves its replicas onto the neighbour's nodes (its leadership
//!    first, if its node is not one of them; then one move at a time, each removing a
//!    replica on a node the neighbour does not use), then merges into it;
//! 5. **balance replicas**: a voter on a node above the mean by more than the threshold moves
//!    (learner first) to a node below it;
//! 6. **balance leaders**: this node, if it leads more than the mean by more than the
//!    threshold, hands some of its leaderships to up-to-date voters on nodes below it; a
//!    draining node hands all of them away, to the least loaded up-to-date voters.
//!
//! A draining or removed node is never a target, and it does not count in the means.
//!
//! A move is never kept in memory between passes: a learner in the descriptor *is* the move
//! in flight, so a new leader (after a leader change, or a restart) finishes it with the same
//! rules. Hysteresis: a node counts as dead only after being down for `down_time` without
//! interruption, a node must have been up for `stable_time` to receive replicas or leaders,
//! and a move needs the source to exceed the target by two (one move then never reverses).

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_proto::meta::{RangeDescriptor, ReplicaRole};
use flotilla_proto::{NodeId, RangeId, ReplicaId};

use super::config::ScheduleConfig;

/// Whether a node is up, as this node's failure detector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Heard from recently.
    Up,
    /// Silent for a while, not declared down yet: neither a source nor a target of moves.
    Suspect,
    /// Declared down (see `node_down_ticks`).
    Down,
}

impl NodeState {
    /// How the admin API and `flotilla-ctl nodes` show it.
    pub fn label(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Suspect => "suspect",
            NodeState::Down => "down",
        }
    }
}

/// Where a node stands in the node registry (an operator's decision, not liveness).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Standing {
    /// A member: may hold replicas and receive new ones (also a node not in the registry yet).
    #[default]
    Member,
    /// Being decommissioned: its replicas and leaderships move away, nothing new comes.
    Draining,
    /// Gone for good: its replicas are rebuilt elsewhere at once, without `down_time`.
    Removed,
}

/// What the scheduler knows of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// The node.
    pub node: NodeId,
    /// Its liveness now.
    pub state: NodeState,
    /// Its standing in the registry.
    pub standing: Standing,
    /// How long it has been in `state` without interruption.
    pub state_for: Duration,
    /// Replicas it hosts, leaderships it holds and snapshot transfers under way, from its
    /// latest statistics; `None` until it has published any (it is then never a target).
    pub load: Option<Load>,
}

/// A node's load, from its statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// Replicas hosted.
    pub replicas: u64,
    /// Replicas leading their group.
    pub leaders: u64,
    /// Snapshot transfers under way (sending and receiving).
    pub snapshots: u64,
}

/// A merge a range led here takes part in, found by the pass (both ranges below
/// `merge_below_bytes` together, the range small and unchanged for `merge_delay`): its
/// replicas move onto `nodes`, the neighbour's, and then, with `into`, it merges into it.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeGoal {
    /// The nodes the range's replicas must be on (the neighbour's).
    pub nodes: Vec<NodeId>,
    /// The right neighbour to merge into once aligned, as this node's replica of it knows
    /// it. `None` when the merge is the left neighbour's (merged into this range by its
    /// leader): its leader's node hosts no replica of this range, so this range moves onto
    /// the neighbour's nodes, and that leader then sees both.
    pub into: Option<RangeDescriptor>,
}

/// A range this node leads.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeView {
    /// Its descriptor as the leader has it.
    pub desc: RangeDescriptor,
    /// The leader's replica (this node's).
    pub leader: ReplicaId,
    /// The leader's commit index.
    pub commit: u64,
    /// Per replica: (id, matched index, recently active), from the leader's progress.
    pub progress: Vec<(ReplicaId, u64, bool)>,
    /// The merge it takes part in, if the pass found one.
    pub merge: Option<MergeGoal>,
}

/// One step the scheduler takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Hand the range's leadership to replica `to` on node `node`.
    TransferLeader {
        range: RangeId,
        to: ReplicaId,
        node: NodeId,
    },
    /// Add a learner on `node` (the first step of a move).
    AddLearner {
        range: RangeId,
        node: NodeId,
        why: Why,
    },
    /// Promote the caught-up `learner` and, in the same joint change, remove `remove`.
    Promote {
        range: RangeId,
        learner: ReplicaId,
        remove: Option<ReplicaId>,
    },
    /// Remove a replica (an abandoned learner, or a voter above the replication factor).
    Remove { range: RangeId, replica: ReplicaId },
    /// Merge `range` (led here) into its right neighbour `target`, on the same nodes.
    Merge { range: RangeId, target: RangeId },
}

impl Action {
    /// The range the action is on.
    pub fn range(&self) -> RangeId {
        match self {
            Action::TransferLeader { range, .. }
            | Action::AddLearner { range, .. }
            | Action::Promote { range, .. }
            | Action::Remove { range, .. }
            | Action::Merge { range, .. } => *range,
        }
    }
}

/// Why a move starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A replica's node has been down for longer than `down_time`.
    Repair,
    /// Replica counts are unbalanced.
    Balance,
    /// A replica's node is being drained (decommissioned).
    Drain,
    /// The range moves onto its small neighbour's nodes, to merge with it.
    Merge,
}

/// What a pass sees: every node of the cluster (this one included) and the ranges led here.
#[derive(Debug, Clone)]
pub struct View {
    /// This node.
    pub me: NodeId,
    /// Every known node, this one included.
    pub nodes: Vec<NodeView>,
    /// The ranges whose leader is this node's replica.
    pub ranges: Vec<RangeView>,
}

/// A replica within this many entries of the leader's commit counts as caught up: a learner
/// can be promoted, a voter can take leadership.
const CAUGHT_UP_LAG: u64 = 16;

/// The steps of one pass (see the module doc). Empty when the scheduler is off.
pub fn decide(view: &View, config: &ScheduleConfig) -> Vec<Action> {
    if !config.enabled {
        return Vec::new();
    }
    let mut p = Pass::new(view, config);
    let mut actions = Vec::new();
    // Moves first (they restore and keep redundancy), then leaders.
    for r in &view.ranges {
        if let Some(a) = p.move_step(r) {
            actions.push(a);
        }
    }
    let busy: Vec<RangeId> = actions.iter().map(Action::range).collect();
    for r in &view.ranges {
        // A range moving onto its neighbour's nodes keeps its leader where the move put it.
        if busy.contains(&r.desc.id()) || has_learner(&r.desc) || aligning(r) {
            continue;
        }
        if let Some(a) = p.leader_step(r) {
            actions.push(a);
        }
    }
    actions
}

/// The state of one pass: node loads as this pass's own actions change them, so that one
/// pass does not send every range to the same node.
struct Pass<'a> {
    view: &'a View,
    config: &'a ScheduleConfig,
    nodes: BTreeMap<NodeId, NodeView>,
    /// Moves this node has in flight (learners in ranges it leads), and may start.
    moves: usize,
    transfers: usize,
}

impl<'a> Pass<'a> {
    fn new(view: &'a View, config: &'a ScheduleConfig) -> Self {
        let moves = view.ranges.iter().filter(|r| has_learner(&r.desc)).count();
        Pass {
            view,
            config,
            nodes: view.nodes.iter().map(|n| (n.node, n.clone())).collect(),
            moves,
            transfers: 0,
        }
    }

    fn node(&self, n: NodeId) -> Option<&NodeView> {
        self.nodes.get(&n)
    }

    fn is_up(&self, n: NodeId) -> bool {
        n == self.view.me
            || self
                .node(n)
                .is_some_and(|v| v.state == NodeState::Up && v.standing != Standing::Removed)
    }

    fn standing(&self, n: NodeId) -> Standing {
        self.node(n).map_or(Standing::Member, |v| v.standing)
    }

    fn is_draining(&self, n: NodeId) -> bool {
        self.standing(n) == Standing::Draining
    }

    /// Declared down by the failure detector (for any time).
    fn is_down(&self, n: NodeId) -> bool {
        self.node(n).is_some_and(|v| v.state == NodeState::Down)
    }

    /// Down without interruption for longer than `down_time`, or removed from the registry.
    fn is_dead(&self, n: NodeId) -> bool {
        self.node(n).is_some_and(|v| {
            v.standing == Standing::Removed
                || (v.state == NodeState::Down && v.state_for >= self.config.down_time)
        })
    }

    /// Up for `stable_time`, with statistics, not swamped by snapshots: may receive a
    /// replica or a leadership.
    fn is_target(&self, n: NodeId) -> bool {
        self.node(n).is_some_and(|v| {
            v.standing == Standing::Member
                && (n == self.view.me
                    || (v.state == NodeState::Up && v.state_for >= self.config.stable_time))
                && v.load
                    .is_some_and(|l| l.snapshots < self.config.max_snapshots_per_node as u64)
        })
    }

    fn load(&self, n: NodeId) -> Option<Load> {
        self.node(n).and_then(|v| v.load)
    }

    fn bump(&mut self, n: NodeId, replicas: i64, leaders: i64) {
        if let Some(l) = self.nodes.get_mut(&n).and_then(|v| v.load.as_mut()) {
            l.replicas = l.replicas.saturating_add_signed(replicas);
            l.leaders = l.leaders.saturating_add_signed(leaders);
            if replicas > 0 {
                l.snapshots += 1;
            }
        }
    }

    /// Mean replicas and leaders over the nodes that count (up members, with statistics).
    fn means(&self) -> (f64, f64) {
        let loads: Vec<Load> = self
            .nodes
            .values()
            .filter(|v| self.is_up(v.node) && v.standing == Standing::Member)
            .filter_map(|v| v.load)
            .collect();
        if loads.is_empty() {
            return (0.0, 0.0);
        }
        let n = loads.len() as f64;
        (
            loads.iter().map(|l| l.replicas).sum::<u64>() as f64 / n,
            loads.iter().map(|l| l.leaders).sum::<u64>() as f64 / n,
        )
    }

    fn move_step(&mut self, r: &RangeView) -> Option<Action> {
        let range = r.desc.id();
        if let Some(learner) = r.desc.replicas.iter().find(|d| is_learner(d.role)) {
            let id = ReplicaId(learner.replica_id);
            let at = NodeId(learner.node_id);
            if self.is_down(at) {
                return Some(Action::Remove { range, replica: id });
            }
            if !self.is_up(at) {
                return None; // suspect, or not heard from yet: it may still come up
            }
            if !caught_up(r, id) {
                return None; // still catching up (by snapshot, usually)
            }
            let voters = voters(&r.desc);
            if voters.len() < self.config.replication_factor {
                return Some(Action::Promote {
                    range,
                    learner: id,
                    remove: None,
                });
            }
            let victim = self.victim(r, &voters, Some(NodeId(learner.node_id)))?;
            // The new voters: the old ones, the learner in, the victim out. A quorum of them
            // must be healthy, the leader (always up to date) among them, so that neither the
            // change nor the next write can stall and no acknowledged entry is lost.
            let healthy = voters
                .iter()
                .filter(|(v, _)| *v != victim)
                .filter(|(v, n)| self.is_up(*n) && caught_up(r, *v))
                .count()
                + 1;
            if healthy < quorum(voters.len()) {
                return None;
            }
            return Some(Action::Promote {
                range,
                learner: id,
                remove: Some(victim),
            });
        }
        let voters = voters(&r.desc);
        let dead = voters.iter().any(|(_, n)| self.is_dead(*n));
        // A draining node's replica moves, unless it leads: its leadership goes first.
        let drain = voters
            .iter()
            .any(|(v, n)| *v != r.leader && self.is_draining(*n));
        // (The system range keeps every voter it was given: more copies of the registry only
        // help.)
        if voters.len() > self.config.replication_factor && !range.is_system() {
            let victim = self.victim(r, &voters, None)?;
            let healthy = voters
                .iter()
                .filter(|(v, n)| *v != victim && self.is_up(*n) && caught_up(r, *v))
                .count();
            if healthy >= quorum(voters.len() - 1) {
                return Some(Action::Remove {
                    range,
                    replica: victim,
                });
            }
            return None;
        }
        if self.moves >= self.config.max_moves_per_node {
            return None;
        }
        if self.standing(self.view.me) != Standing::Member {
            // A draining leader starts no move: its leaderships go first (a range with a
            // learner keeps its leader until the move ends), and the new leaders move.
            return None;
        }
        if !(dead || drain || voters.len() < self.config.replication_factor) {
            if let Some(goal) = &r.merge {
                return self.merge_step(r, goal);
            }
        }
        let (mean, _) = self.means();
        if !(dead || drain || voters.len() < self.config.replication_factor) && range.is_system() {
            // The system range is repaired and drained, never balanced: the replica counts
            // that balancing evens out are those of the range table's ranges.
            return None;
        }
        let source = if dead || drain || voters.len() < self.config.replication_factor {
            None
        } else {
            // The most loaded node of this range above the mean, never this node's replica
            // (the leader is never removed directly; leader balancing moves it). The target
            // below decides whether the move is worth it.
            voters
                .iter()
                .filter(|(_, n)| *n != self.view.me && self.is_up(*n))
                .filter_map(|(_, n)| self.load(*n).map(|l| (*n, l.replicas)))
                .filter(|(_, c)| (*c as f64) > mean)
                .max_by_key(|(n, c)| (*c, std::cmp::Reverse(*n)))
        };
        let why = if dead || voters.len() < self.config.replication_factor {
            Why::Repair
        } else if drain {
            Why::Drain
        } else if source.is_some() {
            Why::Balance
        } else {
            return None;
        };
        let floor = source.map(|(_, c)| c);
        let target = self
            .nodes
            .values()
            .filter(|v| r.desc.replicas.iter().all(|d| d.node_id != v.node.0))
            .filter(|v| self.is_target(v.node))
            .filter_map(|v| v.load.map(|l| (v.node, l.replicas)))
            .filter(|(_, c)| match floor {
                // A balancing move must leave the target below the source (hysteresis), and
                // either the source is above the band or the target below it.
                Some(src) => {
                    let t = self.config.replica_threshold;
                    *c + 2 <= src
                        && if above(src, mean, t) {
                            below(*c, mean, t)
                        } else {
                            low(*c, mean, t)
                        }
                }
                None => true,
            })
            .min_by_key(|(n, c)| (*c, *n))?;
        self.moves += 1;
        self.bump(target.0, 1, 0);
        if let Some((src, _)) = source {
            self.bump(src, -1, 0);
        }
        Some(Action::AddLearner {
            range,
            node: target.0,
            why,
        })
    }

    /// The voter a completed move removes: one on a dead node, else (for a balancing move)
    /// the one on the most loaded node above the threshold. Never the leader, never the
    /// learner's node.
    fn victim(
        &self,
        r: &RangeView,
        voters: &[(ReplicaId, NodeId)],
        skip: Option<NodeId>,
    ) -> Option<ReplicaId> {
        let candidates: Vec<&(ReplicaId, NodeId)> = voters
            .iter()
            .filter(|(v, n)| *v != r.leader && Some(*n) != skip)
            .collect();
        if let Some((v, _)) = candidates.iter().find(|(_, n)| self.is_dead(*n)) {
            return Some(*v);
        }
        if let Some((v, _)) = candidates.iter().find(|(_, n)| !self.is_up(*n)) {
            return Some(*v);
        }
        if let Some((v, _)) = candidates.iter().find(|(_, n)| self.is_draining(*n)) {
            return Some(*v);
        }
        // A move onto a merge neighbour's nodes removes a replica on a node it does not use.
        if let Some(goal) = &r.merge {
            if let Some((v, _)) = candidates.iter().find(|(_, n)| !goal.nodes.contains(n)) {
                return Some(*v);
            }
        }
        candidates
            .iter()
            .filter_map(|(v, n)| self.load(*n).map(|l| (*v, *n, l.replicas)))
            .max_by_key(|(_, n, c)| (*c, std::cmp::Reverse(*n)))
            .map(|(v, _, _)| v)
    }

    /// Step 4 for a range with a merge goal (every voter on a live node, none draining): its
    /// leadership to a node of the goal first (the leader is never removed directly; a goal
    /// of one other voter's node is only that hand-over), then one move onto a node of the
    /// goal, and, once its nodes are the goal's, the merge.
    fn merge_step(&mut self, r: &RangeView, goal: &MergeGoal) -> Option<Action> {
        let range = r.desc.id();
        let mine: Vec<NodeId> = voters(&r.desc).iter().map(|(_, n)| *n).collect();
        let missing: Vec<NodeId> = goal
            .nodes
            .iter()
            .copied()
            .filter(|n| !mine.contains(n))
            .collect();
        if !goal.nodes.contains(&self.view.me) {
            if self.transfers >= self.config.max_transfers_per_pass {
                return None;
            }
            return self.transfer(r, |n, _| goal.nodes.contains(&n));
        }
        if missing.is_empty() {
            let target = goal.into.as_ref()?;
            // The neighbour as this node knows it: every replica a voter on a live node (its
            // own moves and repairs come first), no merge of its own under way.
            let ready = target.merge.is_none()
                && !has_learner(target)
                && target
                    .replicas
                    .iter()
                    .all(|d| self.is_up(NodeId(d.node_id)))
                && mine.len() == goal.nodes.len();
            if !ready || self.moves >= self.config.max_moves_per_node {
                return None;
            }
            self.moves += 1;
            return Some(Action::Merge {
                range,
                target: target.id(),
            });
        }
        if self.moves >= self.config.max_moves_per_node {
            return None;
        }
        let target = missing
            .into_iter()
            .filter(|n| self.is_target(*n))
            .min_by_key(|n| (self.load(*n).map_or(u64::MAX, |l| l.replicas), *n))?;
        self.moves += 1;
        self.bump(target, 1, 0);
        Some(Action::AddLearner {
            range,
            node: target,
            why: Why::Merge,
        })
    }

    fn leader_step(&mut self, r: &RangeView) -> Option<Action> {
        if self.transfers >= self.config.max_transfers_per_pass {
            return None;
        }
        if self.standing(self.view.me) != Standing::Member {
            // A draining node hands every leadership away, whatever the means say.
            return self.transfer(r, |_, _| true);
        }
        if r.desc.id().is_system() {
            return None; // its leadership is not counted in the leader counts balanced
        }
        let (_, mean) = self.means();
        let mine = self.load(self.view.me)?.leaders;
        let t = self.config.leader_threshold;
        // Above the band, or above the mean while another node is below the band.
        if (mine as f64) <= mean {
            return None;
        }
        let heavy = above(mine, mean, t);
        self.transfer(r, |_, c| {
            c + 2 <= mine && (c as f64) < mean && (heavy || low(c, mean, t))
        })
    }

    /// Hands `r`'s leadership to the up-to-date voter on a target node leading fewest among
    /// those that `accept` takes (given the node and its leader count).
    fn transfer(&mut self, r: &RangeView, accept: impl Fn(NodeId, u64) -> bool) -> Option<Action> {
        let (to, node, _) = voters(&r.desc)
            .into_iter()
            .filter(|(v, n)| *v != r.leader && self.is_target(*n) && caught_up(r, *v))
            .filter_map(|(v, n)| self.load(n).map(|l| (v, n, l.leaders)))
            .filter(|(_, n, c)| accept(*n, *c))
            .min_by_key(|(_, n, c)| (*c, *n))?;
        self.transfers += 1;
        self.bump(self.view.me, 0, -1);
        self.bump(node, 0, 1);
        Some(Action::TransferLeader {
            range: r.desc.id(),
            to,
            node,
        })
    }
}

/// Above `mean` by more than `threshold` of it, and by at least one whole replica.
fn above(count: u64, mean: f64, threshold: f64) -> bool {
    let c = count as f64;
    c > mean * (1.0 + threshold) && c - mean >= 1.0
}

/// Below `mean` by more than `threshold` of it, and by at least one whole replica.
fn low(count: u64, mean: f64, threshold: f64) -> bool {
    let c = count as f64;
    c < mean * (1.0 - threshold) && mean - c >= 1.0
}

/// Below `mean` by more than `threshold` of it, or by at least one whole replica.
fn below(count: u64, mean: f64, threshold: f64) -> bool {
    let c = count as f64;
    c < mean * (1.0 - threshold) || mean - c >= 1.0
}

fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

fn is_learner(role: i32) -> bool {
    role == ReplicaRole::Learner as i32
}

/// Whether `r` is moving onto a merge neighbour's nodes (its voters are not there yet).
fn aligning(r: &RangeView) -> bool {
    r.merge.as_ref().is_some_and(|g| {
        let mine = voters(&r.desc);
        mine.len() != g.nodes.len() || mine.iter().any(|(_, n)| !g.nodes.contains(n))
    })
}

fn has_learner(desc: &RangeDescriptor) -> bool {
    desc.replicas.iter().any(|d| is_learner(d.role))
}

fn voters(desc: &RangeDescriptor) -> Vec<(ReplicaId, NodeId)> {
    desc.replicas
        .iter()
        .filter(|d| !is_learner(d.role))
        .map(|d| (ReplicaId(d.replica_id), NodeId(d.node_id)))
        .collect()
}

/// Whether `replica` is active and within [`CAUGHT_UP_LAG`] of the leader's commit.
fn caught_up(r: &RangeView, replica: ReplicaId) -> bool {
    replica == r.leader
        || r.progress.iter().any(|(id, matched, active)| {
            *id == replica && *active && matched + CAUGHT_UP_LAG >= r.commit
        })
}

#[cfg(test)]
mod tests {
    use flotilla_proto::meta::{RangeEpoch, ReplicaDescriptor};

    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    fn config() -> ScheduleConfig {
        ScheduleConfig {
            down_time: Duration::from_secs(30),
            stable_time: Duration::from_secs(10),
            ..ScheduleConfig::default()
        }
    }

    fn node(
        id: u64,
        state: NodeState,
        state_for: Duration,
        replicas: u64,
        leaders: u64,
    ) -> NodeView {
        NodeView {
            node: NodeId(id),
            state,
            standing: Standing::Member,
            state_for,
            load: Some(Load {
                replicas,
                leaders,
                snapshots: 0,
            }),
        }
    }

    fn up(id: u64, replicas: u64, leaders: u64) -> NodeView {
        node(id, NodeState::Up, LONG, replicas, leaders)
    }

    /// Range `id` led by node 1's replica, with voters on `voters` and learners on
    /// `learners` (replica id = node id), every replica caught up.
    fn range(id: u64, voters: &[u64], learners: &[u64]) -> RangeView {
        let mut replicas: Vec<ReplicaDescriptor> = voters
            .iter()
            .map(|n| ReplicaDescriptor {
                replica_id: *n,
                node_id: *n,
                role: ReplicaRole::Voter as i32,
            })
            .collect();
        replicas.extend(learners.iter().map(|n| ReplicaDescriptor {
            replica_id: *n,
            node_id: *n,
            role: ReplicaRole::Learner as i32,
        }));
        let progress = replicas
            .iter()
            .map(|r| (ReplicaId(r.replica_id), 100, true))
            .collect();
        RangeView {
            desc: RangeDescriptor {
                range_id: id,
                epoch: Some(RangeEpoch {
                    conf_ver: 1,
                    version: 1,
                }),
                replicas,
                next_replica_id: 10,
                ..Default::default()
            },
            leader: ReplicaId(1),
            commit: 100,
            progress,
            merge: None,
        }
    }

    fn view(nodes: Vec<NodeView>, ranges: Vec<RangeView>) -> View {
        View {
            me: NodeId(1),
            nodes,
            ranges,
        }
    }

    #[test]
    fn a_balanced_cluster_needs_no_action() {
        let v = view(
            vec![up(1, 3, 1), up(2, 3, 1), up(3, 3, 1)],
            vec![range(1, &[1, 2, 3], &[])],
        );
        assert_eq!(decide(&v, &config()), Vec::<Action>::new());
    }

    #[test]
    fn a_node_leading_too_many_ranges_hands_leaderships_to_the_least_loaded() {
        let ranges: Vec<RangeView> = (1..=6).map(|i| range(i, &[1, 2, 3], &[])).collect();
        let v = view(vec![up(1, 6, 6), up(2, 6, 0), up(3, 6, 0)], ranges);
        let actions = decide(&v, &config());
        let to: Vec<u64> = actions
            .iter()
            .map(|a| match a {
                Action::TransferLeader { node, .. } => node.0,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        // Four at most per pass, alternating between the two nodes as their counts grow.
        assert_eq!(to, [2, 3, 2, 3]);
    }

    #[test]
    fn leadership_goes_only_to_a_caught_up_replica() {
        let mut r = range(1, &[1, 2, 3], &[]);
        r.progress = vec![
            (ReplicaId(1), 100, true),
            (ReplicaId(2), 10, true),
            (ReplicaId(3), 100, false),
        ];
        let v = view(vec![up(1, 3, 3), up(2, 3, 0), up(3, 3, 0)], vec![r]);
        assert_eq!(decide(&v, &config()), Vec::<Action>::new());
    }

    #[test]
    fn a_node_down_past_down_time_has_its_replica_rebuilt_on_the_emptiest_up_node() {
        let v = view(
            vec![
                up(1, 3, 1),
                up(2, 3, 1),
                node(3, NodeState::Down, Duration::from_secs(31), 3, 1),
                up(4, 2, 0),
                up(5, 1, 0),
            ],
            vec![range(7, &[1, 2, 3], &[])],
        );
        assert_eq!(
            decide(&v, &config()),
            [Action::AddLearner {
                range: RangeId(7),
                node: NodeId(5),
                why: Why::Repair
            }]
        );
    }

    #[test]
    fn a_node_down_for_less_than_down_time_is_waited_for() {
        // A flapping node: each time it comes back its down time starts over, so it never
        // reaches down_time and nothing moves.
        for down_for in [Duration::ZERO, Duration::from_secs(29)] {
            let v = view(
                vec![
                    up(1, 1, 1),
                    up(2, 1, 0),
                    node(3, NodeState::Down, down_for, 1, 0),
                    up(4, 0, 0),
                ],
                vec![range(7, &[1, 2, 3], &[])],
            );
            assert_eq!(
                decide(&v, &config()),
                Vec::<Action>::new(),
                "down for {down_for:?}"
            );
        }
    }

    #[test]
    fn a_node_just_back_up_receives_nothing_until_stable() {
        let v = view(
            vec![
                up(1, 10, 5),
                up(2, 10, 5),
                up(3, 10, 0),
                node(4, NodeState::Up, Duration::from_secs(2), 0, 0),
            ],
            (1..=3).map(|i| range(i, &[1, 2, 3], &[])).collect(),
        );
        for a in decide(&v, &config()) {
            assert!(
                !matches!(a, Action::AddLearner { .. }),
                "moved a replica to an unstable node: {a:?}"
            );
        }
    }

    #[test]
    fn a_caught_up_learner_replaces_the_dead_replica_in_one_joint_change() {
        let v = view(
            vec![
                up(1, 3, 1),
                up(2, 3, 1),
                node(3, NodeState::Down, LONG, 3, 1),
                up(4, 1, 0),
            ],
            vec![range(7, &[1, 2, 3], &[4])],
        );
        assert_eq!(
            decide(&v, &config()),
            [Action::Promote {
                range: RangeId(7),
                learner: ReplicaId(4),
                remove: Some(ReplicaId(3)),
            }]
        );
    }

    #[test]
    fn a_learner_still_catching_up_is_waited_for() {
        let mut r = range(7, &[1, 2, 3], &[4]);
        r.progress[3].1 = 0;
        let v = view(
            vec![
                up(1, 3, 1),
                up(2, 3, 1),
                node(3, NodeState::Down, LONG, 3, 1),
                up(4, 1, 0),
            ],
            vec![r],
        );
        assert_eq!(decide(&v, &config()), Vec::<Action>::new());
    }

    #[test]
    fn a_learner_on_a_node_that_went_down_is_removed() {
        let v = view(
            vec![
                up(1, 3, 1),
                up(2, 3, 1),
                up(3, 3, 1),
                node(4, NodeState::Down, Duration::from_secs(1), 1, 0),
            ],
            vec![range(7, &[1, 2, 3], &[4])],
        );
        assert_eq!(
            decide(&v, &config()),
            [Action::Remove {
                range: RangeId(7),
                replica: ReplicaId(4)
            }]
        );
    }

    #[test]
    fn a_learner_on_a_suspect_or_unknown_node_is_waited_for() {
        // Node 4 just joined: suspect here, or not in this node's view at all yet. Removing
        // its learner would undo every move to a new node on the first pass.
        for nodes in [
            vec![
                up(1, 3, 1),
                up(2, 3, 1),
                up(3, 3, 1),
                node(4, NodeState::Suspect, Duration::from_secs(1), 1, 0),
            ],
            vec![up(1, 3, 1), up(2, 3, 1), up(3, 3, 1)],
        ] {
            let mut r = range(7, &[1, 2, 3], &[4]);
            for p in &mut r.progress {
                if p.0 == ReplicaId(4) {
                    p.1 = 0; // behind, so not promoted either
                }
            }
            assert_eq!(
                decide(&view(nodes, vec![r]), &config()),
                Vec::<Action>::new()
            );
        }
    }

    #[test]
    fn a_move_never_leaves_fewer_than_a_quorum_of_healthy_voters() {
        // Five voters: the leader, one dead (the victim) and three that are down or behind.
        // Promoting the learner and removing the dead one leaves the leader and the learner
        // healthy out of five: not a quorum, so nothing is removed.
        let mut r = range(7, &[1, 2, 3, 5, 6], &[4]);
        for p in &mut r.progress {
            if p.0 == ReplicaId(5) {
                p.1 = 0;
            }
        }
        let v = view(
            vec![
                up(1, 1, 1),
                node(2, NodeState::Down, Duration::from_secs(1), 1, 0),
                node(3, NodeState::Down, LONG, 1, 0),
                up(4, 1, 0),
                up(5, 1, 0),
                node(6, NodeState::Suspect, Duration::from_secs(1), 1, 0),
            ],
            vec![r],
        );
        let config = ScheduleConfig {
            replication_factor: 5,
            ..config()
        };
        assert_eq!(decide(&v, &config), Vec::<Action>::new());
    }

    #[test]
    fn replicas_flow_to_an_empty_node_and_the_leader_is_never_the_one_removed() {
        let ranges: Vec<RangeView> = (1..=12).map(|i| range(i, &[1, 2, 3], &[])).collect();
        let v = view(
            vec![up(1, 12, 4), up(2, 12, 4), up(3, 12, 4), up(4, 0, 0)],
            ranges,
        );
        let actions = decide(&v, &config());
        // As many as node 4 may receive snapshots at once (fewer than the moves allowed).
        assert_eq!(actions.len(), config().max_snapshots_per_node);
        for a in &actions {
            assert!(
                matches!(
                    a,
                    Action::AddLearner {
                        node: NodeId(4),
                        why: Why::Balance,
                        ..
                    }
                ),
                "{a:?}"
            );
        }
        // Once caught up, the learner replaces a replica on a loaded node other than the
        // leader's (node 1 leads).
        let v = view(
            vec![up(1, 12, 4), up(2, 12, 4), up(3, 12, 4), up(4, 4, 0)],
            vec![range(1, &[1, 2, 3], &[4])],
        );
        match decide(&v, &config()).as_slice() {
            [Action::Promote {
                remove: Some(r), ..
            }] => assert_ne!(*r, ReplicaId(1)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_node_below_the_band_gets_a_leadership_from_one_above_the_mean() {
        // 22 / 22 / 18: nobody is above the mean by 10%, but node 3 is below it by more.
        let ranges: Vec<RangeView> = (1..=3).map(|i| range(i, &[1, 2, 3], &[])).collect();
        let v = view(
            vec![up(1, 62, 22), up(2, 62, 22), up(3, 62, 18)],
            ranges.clone(),
        );
        assert_eq!(
            decide(&v, &config()),
            [Action::TransferLeader {
                range: RangeId(1),
                to: ReplicaId(3),
                node: NodeId(3)
            }]
        );
        // 21 / 22 / 19 is within the band: nothing more.
        let v = view(vec![up(1, 62, 21), up(2, 62, 22), up(3, 62, 19)], ranges);
        assert_eq!(decide(&v, &config()), Vec::<Action>::new());
    }

    #[test]
    fn counts_one_apart_do_not_move() {
        // Moving one replica from a node with 4 to one with 3 would only swap them.
        let v = view(
            vec![up(1, 4, 1), up(2, 4, 1), up(3, 4, 1), up(4, 3, 1)],
            vec![range(1, &[1, 2, 3], &[])],
        );
        assert_eq!(decide(&v, &config()), Vec::<Action>::new());
    }

    fn standing(mut n: NodeView, standing: Standing) -> NodeView {
        n.standing = standing;
        n
    }

    #[test]
    fn a_draining_nodes_replica_moves_to_a_member_and_is_the_one_removed() {
        // Node 3 drains; node 4 drains too, so only node 5 may receive the replica.
        let nodes = vec![
            up(1, 3, 1),
            up(2, 3, 1),
            standing(up(3, 3, 1), Standing::Draining),
            standing(up(4, 0, 0), Standing::Draining),
            up(5, 2, 0),
        ];
        let v = view(nodes.clone(), vec![range(7, &[1, 2, 3], &[])]);
        assert_eq!(
            decide(&v, &config()),
            [Action::AddLearner {
                range: RangeId(7),
                node: NodeId(5),
                why: Why::Drain
            }]
        );
        // Caught up, the learner replaces the draining replica (not the more loaded node 2's).
        let mut nodes = nodes;
        nodes[1] = up(2, 9, 1);
        let v = view(nodes, vec![range(7, &[1, 2, 3], &[5])]);
        assert_eq!(
            decide(&v, &config()),
            [Action::Promote {
                range: RangeId(7),
                learner: ReplicaId(5),
                remove: Some(ReplicaId(3)),
            }]
        );
    }

    #[test]
    fn a_draining_leader_hands_every_leadership_away_before_its_replica_moves() {
        // Node 1 (this node) drains while leading less than the mean: its leaderships still
        // go, to the up-to-date voter on the node leading fewest; no move starts on ranges it
        // leads (its own replica would be the one to go).
        let nodes = vec![
            standing(up(1, 3, 1), Standing::Draining),
            up(2, 3, 5),
            up(3, 3, 4),
            up(4, 0, 0),
        ];
        let v = view(nodes, vec![range(7, &[1, 2, 3], &[])]);
        assert_eq!(
            decide(&v, &config()),
            [Action::TransferLeader {
                range: RangeId(7),
                to: ReplicaId(3),
                node: NodeId(3)
            }]
        );
    }

    #[test]
    fn a_draining_node_receives_no_leadership_and_no_replica() {
        let ranges: Vec<RangeView> = (1..=6).map(|i| range(i, &[1, 2, 3], &[])).collect();
        let v = view(
            vec![
                up(1, 6, 6),
                standing(up(2, 6, 0), Standing::Draining),
                up(3, 6, 0),
                standing(up(4, 0, 0), Standing::Draining),
            ],
            ranges,
        );
        for a in decide(&v, &config()) {
            match a {
                Action::TransferLeader { node, .. } => assert_eq!(node, NodeId(3)),
                Action::AddLearner { node, .. } => panic!("a replica placed on node {node}"),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn a_removed_nodes_replica_is_rebuilt_without_waiting_for_down_time() {
        let v = view(
            vec![
                up(1, 3, 1),
                up(2, 3, 1),
                standing(
                    node(3, NodeState::Down, Duration::from_secs(1), 3, 1),
                    Standing::Removed,
                ),
                up(4, 0, 0),
            ],
            vec![range(7, &[1, 2, 3], &[])],
        );
        assert_eq!(
            decide(&v, &config()),
            [Action::AddLearner {
                range: RangeId(7),
                node: NodeId(4),
                why: Why::Repair
            }]
        );
    }

    #[test]
    fn a_scheduler_switched_off_does_nothing() {
        let v = view(
            vec![
                up(1, 6, 6),
                up(2, 6, 0),
                node(3, NodeState::Down, LONG, 6, 0),
                up(4, 0, 0),
            ],
            (1..=6).map(|i| range(i, &[1, 2, 3], &[])).collect(),
        );
        assert!(!decide(&v, &config()).is_empty());
        let off = ScheduleConfig {
            enabled: false,
            ..config()
        };
        assert_eq!(decide(&v, &off), Vec::<Action>::new());
    }

    /// Range 1 (led by node 1) with a merge goal: range 2's nodes, merging into it when
    /// `into`.
    fn merging(voters: &[u64], learners: &[u64], goal: &[u64], into: bool) -> RangeView {
        let mut r = range(1, voters, learners);
        r.merge = Some(MergeGoal {
            nodes: goal.iter().map(|n| NodeId(*n)).collect(),
            into: into.then(|| range(2, goal, &[]).desc),
        });
        r
    }

    #[test]
    fn a_small_range_moves_onto_its_neighbours_nodes_then_merges_into_it() {
        // Node 2 holds the most replicas: a balancing move would remove its replica. The
        // merge goal keeps it (range 2 is on nodes 1, 2, 4) and removes node 3's instead.
        let nodes = || {
            vec![
                up(1, 5, 1),
                up(2, 9, 1),
                up(3, 5, 1),
                up(4, 5, 1),
                up(5, 0, 0),
            ]
        };
        let step = |r: RangeView| decide(&view(nodes(), vec![r]), &config());
        assert_eq!(
            step(merging(&[1, 2, 3], &[], &[1, 2, 4], true)),
            [Action::AddLearner {
                range: RangeId(1),
                node: NodeId(4),
                why: Why::Merge
            }],
            "the move goes to the neighbour's node, not the emptiest (node 5)"
        );
        assert_eq!(
            step(merging(&[1, 2, 3], &[4], &[1, 2, 4], true)),
            [Action::Promote {
                range: RangeId(1),
                learner: ReplicaId(4),
                remove: Some(ReplicaId(3))
            }]
        );
        assert_eq!(
            step(merging(&[1, 2, 4], &[], &[1, 2, 4], true)),
            [Action::Merge {
                range: RangeId(1),
                target: RangeId(2)
            }]
        );
        // Aligned for the left neighbour's leader to merge: nothing more to do here.
        assert_eq!(step(merging(&[1, 2, 4], &[], &[1, 2, 4], false)), []);
    }

    #[test]
    fn a_leader_off_the_neighbours_nodes_hands_its_leadership_over_first() {
        let v = view(
            vec![up(1, 3, 1), up(2, 3, 1), up(3, 3, 1), up(4, 2, 0)],
            vec![merging(&[1, 2, 3], &[], &[2, 3, 4], true)],
        );
        assert_eq!(
            decide(&v, &config()),
            [Action::TransferLeader {
                range: RangeId(1),
                to: ReplicaId(2),
                node: NodeId(2)
            }]
        );
    }

    #[test]
    fn a_merge_waits_while_the_neighbour_moves_or_a_node_is_down() {
        let nodes = vec![up(1, 3, 1), up(2, 3, 1), up(3, 3, 1), up(4, 1, 0)];
        let mut r = merging(&[1, 2, 3], &[], &[1, 2, 3], true);
        let target = r.merge.as_mut().unwrap().into.as_mut().unwrap();
        target.replicas.push(ReplicaDescriptor {
            replica_id: 4,
            node_id: 4,
            role: ReplicaRole::Learner as i32,
        });
        assert_eq!(decide(&view(nodes.clone(), vec![r]), &config()), []);
        // A replica's node is down (not yet past down_time): no merge, no move.
        let mut nodes = nodes;
        nodes[2] = node(3, NodeState::Down, Duration::from_secs(1), 3, 1);
        let r = merging(&[1, 2, 3], &[], &[1, 2, 3], true);
        assert_eq!(decide(&view(nodes, vec![r]), &config()), []);
    }
}
