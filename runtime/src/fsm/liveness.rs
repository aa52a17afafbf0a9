//! Node liveness, the failure detector of sleeping groups, and the paced wake queue.
//!
//! A sleeping group sends no heartbeats, so raft alone would never notice its leader's death.
//! Instead the ticker asks the transport, once per tick, when it last heard from each node it
//! tracks (`Transport::last_heard_from`: the gRPC transport's node-pair streams ping every
//! `ping_interval` when idle, and any frame or acknowledgement counts; the in-memory network
//! answers from its registrations and filters). A node whose answer has not changed for
//! `node_down_ticks` ticks of this node's clock is declared down; any change declares it up
//! again. A node whose connection the transport reports refused
//! (`Transport::connection_refused`: nothing listens at its address, its process is gone) is
//! declared down after `election_tick` silent ticks already, what lease safety needs; the
//! longer window covers silence alone, which load jitter, a pause or a partition can cause
//! and which never comes with a refusal. Silence is counted in local ticks, never compared
//! across clocks, so a paused process (whose ticker stopped) declares nothing while paused,
//! and the simulator's virtual time works the same.
//!
//! The **leader index** maps each node to the groups whose leader, as known here, lives there
//! (the worker keeps it up to date after each round, from the replica's leader hint). When a
//! node goes down, only the groups it led are woken, with `PeerMsg::NodeDown`: their followers
//! here forget it and elect another leader (`replica::hibernate`). When a node comes back (a
//! restart, a healed partition, a resumed process), the groups led *here* are woken: their
//! leaders heartbeat at once, which ends the stale leaderships a partitioned node kept while
//! the others elected, and catches up the replicas of a restarted node, without waiting for a
//! group to wake by itself.
//!
//! A node **removed** from the registry (`NodeGroup::declare_removed`) is declared down at
//! once and never up again, whatever the transport hears: it is gone for good.
//!
//! **Wake-storm control**: two queues, drained by the ticker with at most
//! `max_wakes_per_tick` wakes a tick in all. The first holds single wakes that must not wait
//! (a bootstrapped replica whose group has no leader node to wait for), drained first. The
//! second holds the wakes that can concern a large part of the node's groups at once (the
//! groups a down node led, the groups led here when a node comes back, the recovered
//! replicas that may have led before a restart, the bootstrap campaigns), drained with what
//! is left of the budget and only while fewer than [`AWAKE_BOUND`] ×
//! `max_wakes_per_tick` elections are in flight here (replicas awake or scheduled, but for
//! leaders and followers done with any election, which only wait to sleep; and at most
//! [`AWAKE_CAP`] × `max_wakes_per_tick` awake in all), so that a failover, a restart, a
//! partition healing, a liveness flap or the creation of many groups proceeds at the pace
//! elections end on this machine rather than at a fixed rate that a loaded machine cannot
//! follow (campaigns that time out start over: a storm). A group with a request does not
//! wait in a queue: the request wakes it at once (and a follower woken so whose leader's node
//! is down campaigns at once if it is the group's chosen campaigner, `replica::campaigner`).
//!
//! **Restart** (`fsm::life::recover`): recovered replicas start asleep, and only those that
//! voted for themselves in their last term (only they can have been the leader the others
//! still wait for: they campaign as soon as their turn comes, without pre-vote,
//! [`Wake::Campaign`]) or hold log entries they do not know committed (their leader's sleep notice, which carried the commit,
//! may have been lost while this node was down) are queued; the others are woken by their
//! leader (which stays awake while a follower is behind, and wakes its groups when it sees
//! this node back up), a request, or liveness. For
//! liveness, a replica that knows no leader stands in the leader index under the node of the
//! replica it voted for, and stays there while it sleeps (a round that teaches it nothing,
//! such as the one every recovered replica runs at start, does not take it out): a node that
//! restarts faster than `node_down_ticks` is never seen down, so nothing else would ever
//! wake such a replica, and if its group's leader then died and every survivor had restarted
//! so, the group would never elect again.
//!
//! **Bootstrap** (`fsm::life::bootstrap`): of a new group, only the replica the layout chose to
//! lead is queued, to campaign ([`Wake::Campaign`]); the others sleep until its vote request
//! wakes them, and the group falls asleep again once elected: creating N groups costs one
//! election each and no replica ticks for longer than its election. These wakes wait in the
//! second, bounded queue. In case the campaign never comes (the chosen node is
//! down), the others are queued too ([`Wake::Unled`]), for after the liveness window
//! (`node_down_ticks`): then, if their group still knows no leader and the chosen node is not
//! live, they wake and elect on their timeout; while it is live they wait another window (a
//! live campaigner retries its own election until it wins or hears a leader).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Instant;

use dashmap::DashMap;
use flotilla_proto::{NodeId, RangeId};
use parking_lot::Mutex;

use crate::fsm::shared::Shared;
use crate::replica::PeerMsg;

/// What the node knows of another node's liveness.
#[derive(Debug)]
struct Peer {
    /// The transport's last answer.
    last: Option<Instant>,
    /// Ticks since that answer changed.
    silent: usize,
    up: bool,
    /// Removed from the node registry: down for good, whatever the transport says.
    removed: bool,
}

/// Liveness of the other nodes, the leader index and the wake queue of one NodeGroup.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    /// Tracked nodes, checked by the ticker.
    peers: Mutex<BTreeMap<u64, Peer>>,
    /// What replicas read (`Host::node_live`): node → up.
    view: DashMap<u64, bool>,
    /// Leader node → groups (range ids) whose leader lives there, as known here.
    by_leader: Mutex<HashMap<u64, BTreeSet<u64>>>,
    /// Wakes waiting for their turn: (range, what to tell it).
    wakes: Mutex<VecDeque<(u64, Wake)>>,
    /// Bootstrap wakes, each from a tick on: (tick, range, what to tell it), in the order of
    /// their ticks; drained after `wakes`, with what is left of a tick's budget, while the
    /// awake set is small (see the module doc).
    deferred: Mutex<VecDeque<(u64, u64, Wake)>>,
    /// Liveness checks so far: this node's tick count.
    ticks: std::sync::atomic::AtomicU64,
}

/// Why a queued group is woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The node of its leader was declared down.
    LeaderDown(NodeId),
    /// A node came back, or the replica was recovered asleep.
    Up,
    /// A bootstrapped replica that the layout chose to lead, or a recovered one that voted
    /// for itself in its last term (it may have led before the restart): campaigns at once,
    /// without pre-vote (`PeerMsg::CampaignUnled`), unless its group already woke (an
    /// election is under way) or knows a leader.
    Campaign,
    /// A bootstrapped replica whose group's first leader is on the node given: wakes (and so
    /// times out and campaigns) if its group is still asleep without a known leader and that
    /// node is not live; waits another liveness window while it is.
    Unled(NodeId),
}

/// The wakes of the second queue (bootstrap, restart, a node back up) wait while this many
/// times `max_wakes_per_tick` elections are in flight on the node (replicas awake or
/// scheduled, but those done with any election).
pub(crate) const AWAKE_BOUND: usize = 4;

/// ... and while this many times `max_wakes_per_tick` replicas are awake in all.
pub(crate) const AWAKE_CAP: usize = 12;

/// What one liveness check found (for tests and metrics).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Transitions {
    pub(crate) down: Vec<NodeId>,
    pub(crate) up: Vec<NodeId>,
}

impl Liveness {
    /// Starts tracking `node` (up until proven otherwise).
    fn track(&self, node: u64) {
        let mut peers = self.peers.lock();
        peers.entry(node).or_insert_with(|| {
            self.view.insert(node, true);
            Peer {
                last: None,
                silent: 0,
                up: true,
                removed: false,
            }
        });
    }

    /// Moves `range` in the leader index from `old` to `new` (node ids, 0 for none).
    pub(crate) fn move_leader(&self, range: RangeId, old: u64, new: u64, me: NodeId) {
        if old == new {
            return;
        }
        {
            let mut idx = self.by_leader.lock();
            if old != 0 {
                if let Some(set) = idx.get_mut(&old) {
                    set.remove(&range.0);
                    if set.is_empty() {
                        idx.remove(&old);
                    }
                }
            }
            if new != 0 {
                idx.entry(new).or_default().insert(range.0);
            }
        }
        if new != 0 && new != me.0 {
            self.track(new);
        }
    }

    /// Groups whose leader, as known here, lives on `node`.
    pub(crate) fn led_by(&self, node: NodeId) -> Vec<u64> {
        self.by_leader
            .lock()
            .get(&node.0)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// How many groups' leader, as known here, lives on `node`.
    pub(crate) fn led_count(&self, node: NodeId) -> usize {
        self.by_leader.lock().get(&node.0).map_or(0, |s| s.len())
    }

    /// Queues a paced wake of `range`.
    pub(crate) fn queue_wake(&self, range: RangeId, why: Wake) {
        self.wakes.lock().push_back((range.0, why));
    }

    /// Queues a paced wake of `range` that waits until `after` more ticks have passed.
    pub(crate) fn defer_wake(&self, range: RangeId, why: Wake, after: usize) {
        let due = self.ticks.load(std::sync::atomic::Ordering::Acquire) + after as u64;
        let mut q = self.deferred.lock();
        // Kept in tick order: a later call never has an earlier tick unless `after` shrank.
        let at = q.partition_point(|&(t, _, _)| t <= due);
        q.insert(at, (due, range.0, why));
    }

    /// Queues paced wakes of many groups at once, due in `after` ticks (one pass over the
    /// queue, however many groups: a node coming back can concern all of them).
    fn defer_wakes(&self, ranges: Vec<u64>, why: Wake, after: usize) {
        if ranges.is_empty() {
            return;
        }
        let due = self.ticks.load(std::sync::atomic::Ordering::Acquire) + after as u64;
        let mut q = self.deferred.lock();
        let at = q.partition_point(|&(t, _, _)| t <= due);
        let later = q.split_off(at);
        q.extend(ranges.into_iter().map(|range| (due, range, why)));
        q.extend(later);
    }

    /// Declares `node` removed for good (see `NodeGroup::declare_removed`): down at once and
    /// never up again; the groups it led are woken as for a node declared down. Returns
    /// whether it was news.
    pub(crate) fn remove(&self, node: NodeId) -> bool {
        let was_up = {
            let mut peers = self.peers.lock();
            let p = peers.entry(node.0).or_insert(Peer {
                last: None,
                silent: 0,
                up: true,
                removed: false,
            });
            if p.removed {
                return false;
            }
            p.removed = true;
            std::mem::replace(&mut p.up, false)
        };
        self.view.insert(node.0, false);
        if was_up {
            let groups = self.led_by(node);
            tracing::info!(%node, groups = groups.len(), "node removed from the registry: down for good; waking the groups it led");
            self.defer_wakes(groups, Wake::LeaderDown(node), 0);
        }
        true
    }

    /// Starts tracking `node` (see `NodeGroup::watch_node`).
    pub(crate) fn watch(&self, node: NodeId) {
        self.track(node.0);
    }

    /// Every tracked node: up or not, and its silent ticks.
    pub(crate) fn snapshot(&self) -> Vec<crate::api::NodeLiveness> {
        self.peers
            .lock()
            .iter()
            .map(|(n, p)| crate::api::NodeLiveness {
                node: NodeId(*n),
                up: p.up,
                silent_ticks: p.silent,
                removed: p.removed,
            })
            .collect()
    }

    /// Wakes waiting in the queue, deferred ones included.
    pub(crate) fn queued_wakes(&self) -> usize {
        self.wakes.lock().len() + self.deferred.lock().len()
    }
}

impl Shared {
    /// Whether node liveness believes `node` is up (see `Host::node_live`).
    pub(crate) fn node_live(&self, node: NodeId) -> Option<bool> {
        if node == self.node {
            return Some(true);
        }
        if let Some(v) = self.liveness.view.get(&node.0) {
            return Some(*v);
        }
        let transport = self.transport.get()?;
        transport.last_heard_from(node)?;
        self.liveness.track(node.0);
        Some(true)
    }
}

/// One liveness check (each tick): asks the transport about every tracked node, declares
/// nodes down after `node_down_ticks` silent ticks and up on any news, and queues the wakes
/// that follow.
pub(crate) fn check(shared: &Shared) -> Transitions {
    let mut found = Transitions::default();
    shared
        .liveness
        .ticks
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let Some(transport) = shared.transport.get() else {
        return found;
    };
    let down_ticks = shared.config.down_ticks();
    let refused_ticks = shared.config.election_tick.min(down_ticks);
    let live = &shared.liveness;
    {
        let mut peers = live.peers.lock();
        for (&node, p) in peers.iter_mut().filter(|(_, p)| !p.removed) {
            let Some(heard) = transport.last_heard_from(NodeId(node)) else {
                continue;
            };
            if p.last != Some(heard) {
                p.last = Some(heard);
                p.silent = 0;
                if !p.up {
                    p.up = true;
                    found.up.push(NodeId(node));
                }
            } else {
                p.silent = p.silent.saturating_add(1);
                // A node whose process is gone (its address refuses connections) is declared
                // down after the silence lease safety needs, an election timeout; the longer
                // window is for silence alone, which load jitter or a pause can cause too.
                let window =
                    if p.silent >= refused_ticks && transport.connection_refused(NodeId(node)) {
                        refused_ticks
                    } else {
                        down_ticks
                    };
                if p.up && p.silent >= window {
                    p.up = false;
                    found.down.push(NodeId(node));
                }
            }
        }
    }
    for &node in &found.down {
        live.view.insert(node.0, false);
        let groups = live.led_by(node);
        tracing::info!(%node, groups = groups.len(), "node declared down; waking the groups it led");
        metrics::counter!("flotilla_runtime_nodes_down_total").increment(1);
        // Bounded like the other wakes that can concern a third of the node's groups: each
        // woken group elects, and electing 30,000 groups at once on a starved machine makes
        // campaigns time out and start over (measured: 65 s for 16,666 groups, against
        // ~1,000 elections a second when fewer are in flight). Only the groups whose chosen
        // campaigner is here wake now; the others' replicas wake on that campaigner's vote
        // request, and their own wake waits another liveness window, a fallback in case the
        // campaigner's node never campaigns (it is dropped if the group found a leader
        // elsewhere meanwhile, see `wake`). Each survivor so works through its share alone,
        // its awake set holding its own elections rather than every follower it has.
        let (now, later): (Vec<u64>, Vec<u64>) = groups.into_iter().partition(|&range| {
            shared.router.get(RangeId(range)).is_none_or(|d| {
                let mine = d.replica_on(shared.node).map(|r| r.replica_id);
                mine.is_some()
                    && crate::replica::campaigner(&d, node, shared.node, |n| shared.node_live(n))
                        == mine
            })
        });
        live.defer_wakes(now, Wake::LeaderDown(node), 0);
        live.defer_wakes(later, Wake::LeaderDown(node), down_ticks);
    }
    if !found.up.is_empty() {
        for &node in &found.up {
            live.view.insert(node.0, true);
            tracing::info!(%node, "node back up; waking the groups led here");
            metrics::counter!("flotilla_runtime_nodes_up_total").increment(1);
        }
        // Only the groups with a replica on a node that came back need their leader's word.
        // These wakes go through the bounded queue: a healed partition or a restart can
        // concern every group led here, and waking them all in a few ticks is the storm this
        // queue exists to prevent.
        let groups: Vec<u64> = live
            .led_by(shared.node)
            .into_iter()
            .filter(|&range| {
                shared
                    .router
                    .get(RangeId(range))
                    .is_none_or(|d| found.up.iter().any(|&node| d.replica_on(node).is_some()))
            })
            .collect();
        live.defer_wakes(groups, Wake::Up, 0);
    }
    found
}

/// Wakes up to `max_wakes_per_tick` queued groups, then bootstrap wakes that are due while the
/// awake set is small; returns how many were woken (skipped entries, whose group needs no wake
/// any more, do not count).
pub(crate) fn drain_wakes(shared: &Shared) -> usize {
    let max = shared.config.max_wakes_per_tick;
    let mut woken = 0;
    while woken < max {
        let next = shared.liveness.wakes.lock().pop_front();
        let Some((range, why)) = next else {
            break;
        };
        woken += wake(shared, range, why) as usize;
    }
    let now = shared
        .liveness
        .ticks
        .load(std::sync::atomic::Ordering::Acquire);
    let busy = AWAKE_BOUND.saturating_mul(max);
    // Elections in flight: the awake replicas but those done with any election (leaders whose
    // term's first entry is committed, which only wait out `hibernate_ticks` quiet ticks to
    // sleep, a few hundred milliseconds in which counting them held back the next elections:
    // 1,600 elections a second at 100,000 groups per node; and followers that know their
    // leader, such as those another survivor's failover campaigns woke here, which held back
    // this node's own share of the failover). Replicas scheduled but not
    // run yet count too: on a starved machine the workers lag the ticker, and the awake set
    // alone would not see the last ticks' campaigns; and since every awake replica is
    // scheduled each tick, this also slows the wakes down when the workers cannot keep up
    // with the ticks. The awake set as a whole stays under `AWAKE_CAP` bounds, what the
    // ticker visits per tick.
    let in_flight = || {
        let awake = shared.awake.len();
        let settled = shared.settled.load(std::sync::atomic::Ordering::Acquire);
        awake.saturating_sub(settled) + shared.ready_tx.len()
    };
    let cap = AWAKE_CAP.saturating_mul(max);
    while woken < max && in_flight() < busy && shared.awake.len() < cap {
        let next = {
            let mut q = shared.liveness.deferred.lock();
            match q.front() {
                Some(&(due, _, _)) if due <= now => q.pop_front(),
                _ => None,
            }
        };
        let Some((_, range, why)) = next else {
            break;
        };
        woken += wake(shared, range, why) as usize;
    }
    if woken > 0 {
        metrics::counter!("flotilla_runtime_queued_wakes_total").increment(woken as u64);
    }
    woken
}

/// Sends `range` what a queued wake `why` asks, if it still needs it; false if it did not.
fn wake(shared: &Shared, range: u64, why: Wake) -> bool {
    let Some(cell) = shared.cell(RangeId(range)) else {
        return false;
    };
    let unled =
        || cell.is_asleep() && cell.leader_node.load(std::sync::atomic::Ordering::Acquire) == 0;
    let msg = match why {
        // The group learned another leader (or none, electing) since the wake was queued: the
        // news is stale, and waking a sleeping group for it would cost a round trip each.
        Wake::LeaderDown(node)
            if cell.leader_node.load(std::sync::atomic::Ordering::Acquire) != node.0 =>
        {
            return false
        }
        Wake::LeaderDown(node) => PeerMsg::NodeDown(node),
        // An awake group needs no wake.
        Wake::Up if !cell.is_asleep() => return false,
        Wake::Up => PeerMsg::Wake,
        Wake::Campaign if !unled() => return false,
        Wake::Campaign => PeerMsg::CampaignUnled,
        Wake::Unled(_) if !unled() => return false,
        Wake::Unled(node) if shared.node_live(node) == Some(true) => {
            shared
                .liveness
                .defer_wake(RangeId(range), why, shared.config.down_ticks());
            return false;
        }
        Wake::Unled(_) => PeerMsg::Wake,
    };
    let _ = cell.send(msg, usize::MAX, &shared.ready_tx);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_node_is_down_at_once_and_for_good() {
        let live = Liveness::default();
        live.watch(NodeId(2));
        live.move_leader(RangeId(7), 0, 2, NodeId(1));
        assert!(live.remove(NodeId(2)));
        assert!(!live.remove(NodeId(2)), "idempotent");
        let seen = live.snapshot();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].removed && !seen[0].up, "{seen:?}");
        assert_eq!(live.view.get(&2).map(|v| *v), Some(false));
        // The groups it led are queued to wake and elect elsewhere.
        assert_eq!(live.queued_wakes(), 1);
        // A node never tracked can be removed too (it led nothing here: nothing to wake).
        assert!(live.remove(NodeId(3)));
        assert_eq!(live.queued_wakes(), 1);
    }
}
