//! The nemeses: each injects one fault, holds it, heals it, and logs what it did with the
//! time on the recorder's clock, so that a violation can be read next to the faults around it.
//! The faults that take a leader away (kill, pause, isolation) also measure the write stall:
//! the time from the fault until a write to a key the victim led succeeds through the other
//! nodes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flotilla_check::Outcome;
use flotilla_proto::admin::admin_client::AdminClient;
use flotilla_proto::admin::membership_change::Change;
use flotilla_proto::admin::{
    split_request, ChangeMembershipRequest, MembershipChange, MergeRequest, RangeInfo,
    RangesRequest, SplitRequest,
};
use flotilla_proto::meta::ReplicaRole;
use rand::seq::SliceRandom;
use rand::Rng;
use tonic::transport::Channel;

use crate::proxy::Proxies;
use crate::workload::{self, leader_hint, Nodes, Recorder, Route};
use flotilla_benchkit::nodes::NodeProcs;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL the node leading a key, restart it after a while.
    Kill,
    /// SIGSTOP the node leading a key for longer than an election, then SIGCONT.
    Pause,
    /// Cut the node leading a key off from the others, then heal.
    Isolate,
    /// Cut two nodes from each other; the third still reaches both.
    Bridge,
    /// Split the range holding some keys at one of them, live.
    Split,
    /// Merge the last split's right half back into its left half, live.
    Merge,
    /// Kill a follower node of the last split's right half and at once merge that half back
    /// (splitting first if no split is pending); measure how long the half refuses writes
    /// (bounded by `merge_freeze_limit`, however long the node stays down).
    MergeDown,
    /// Replace a follower replica of a range: remove it, add a learner on the same node (a
    /// fresh replica id), promote it.
    Replace,
}

impl Fault {
    /// Every fault, in the order the short profile runs them.
    pub const ALL: [Fault; 8] = [
        Fault::Kill,
        Fault::Pause,
        Fault::Isolate,
        Fault::Bridge,
        Fault::Split,
        Fault::Merge,
        Fault::MergeDown,
        Fault::Replace,
    ];

    /// The name used in logs and RESULT lines.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill-leader",
            Fault::Pause => "pause-leader",
            Fault::Isolate => "isolate-leader",
            Fault::Bridge => "bridge",
            Fault::Split => "split",
            Fault::Merge => "merge",
            Fault::MergeDown => "merge-replica-down",
            Fault::Replace => "replace-replica",
        }
    }
}

/// What a run's faults did.
#[derive(Debug, Default)]
pub struct FaultLog {
    /// (time in ns on the recorder's clock, what happened).
    pub events: Vec<(u64, String)>,
    /// Faults injected.
    pub injected: usize,
    /// (fault name, write stall) for the faults that take a leader away.
    pub stalls: Vec<(&'static str, Duration)>,
}

/// The state the nemeses act on.
#[derive(Debug)]
pub struct Nemesis {
    pub(crate) cluster: NodeProcs,
    pub(crate) proxies: Proxies,
    pub(crate) nodes: Nodes,
    admin: Vec<AdminClient<Channel>>,
    pub(crate) rec: Arc<Recorder>,
    pub(crate) keys: Arc<Vec<Vec<u8>>>,
    pub(crate) log: FaultLog,
    /// The last split's (left, right) range ids, until merged back.
    split: Option<(u64, u64)>,
    /// The availability probe's client id and next sequence number.
    probe_seq: u64,
    /// How long a fault is held.
    hold: Duration,
}

impl Nemesis {
    pub(crate) fn new(
        cluster: NodeProcs,
        proxies: Proxies,
        nodes: Nodes,
        rec: Arc<Recorder>,
        keys: Arc<Vec<Vec<u8>>>,
        hold: Duration,
    ) -> anyhow::Result<Nemesis> {
        let admin = cluster
            .client
            .iter()
            .map(|a: &SocketAddr| {
                let ch = Channel::from_shared(format!("http://{a}"))?
                    .connect_timeout(Duration::from_millis(500))
                    .connect_lazy();
                Ok(AdminClient::new(ch))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Nemesis {
            cluster,
            proxies,
            nodes,
            admin,
            rec,
            keys,
            log: FaultLog::default(),
            split: None,
            probe_seq: 0,
            hold,
        })
    }

    pub(crate) fn note(&mut self, what: String) {
        let t = self.rec.now();
        eprintln!("[{:>9.3}s] {what}", t as f64 / 1e9);
        self.log.events.push((t, what));
    }

    /// Runs `fault` once.
    pub async fn run(&mut self, fault: Fault) -> anyhow::Result<()> {
        match fault {
            Fault::Kill | Fault::Pause | Fault::Isolate => self.take_leader_away(fault).await,
            Fault::Bridge => self.bridge().await,
            Fault::Replace => self.replace().await,
            // A split needs no pending split half to merge back, a merge needs one: each
            // turns into the other when its precondition does not hold.
            Fault::Split | Fault::Merge => match self.split {
                None => self.split().await,
                Some((left, right)) => self.merge(left, right).await,
            },
            Fault::MergeDown => {
                if self.split.is_none() {
                    self.split().await?;
                }
                match self.split {
                    Some((left, right)) => self.merge_with_replica_down(left, right).await,
                    None => Ok(()),
                }
            }
        }
    }

    /// Kill, pause or isolate the node leading a random key, measure the write stall on
    /// that key through the other nodes, hold, heal.
    async fn take_leader_away(&mut self, fault: Fault) -> anyhow::Result<()> {
        let k = rand::thread_rng().gen_range(0..self.keys.len());
        let key = self.keys[k].clone();
        let victim = self.leader_of(&key).await?;
        let start = Instant::now();
        match fault {
            Fault::Kill => self.cluster.kill(victim),
            Fault::Pause => self.cluster.pause(victim)?,
            _ => self.proxies.isolate(victim),
        }
        self.log.injected += 1;
        self.note(format!(
            "{}: node {} (leader of {})",
            fault.name(),
            victim + 1,
            String::from_utf8_lossy(&key)
        ));
        let stall = self.probe(&key, victim, Duration::from_secs(30)).await;
        match stall {
            Some(s) => {
                self.note(format!(
                    "{}: writes to {} succeed again after {} ms",
                    fault.name(),
                    String::from_utf8_lossy(&key),
                    s.as_millis()
                ));
                self.log.stalls.push((fault.name(), s));
            }
            None => self.note(format!("{}: writes still stalled after 30 s", fault.name())),
        }
        sleep_until(start + self.hold).await;
        match fault {
            Fault::Kill => self.cluster.spawn(victim)?,
            Fault::Pause => self.cluster.resume(victim)?,
            _ => self.proxies.heal(),
        }
        self.note(format!("{}: healed node {}", fault.name(), victim + 1));
        Ok(())
    }

    /// Writes to `key` through the nodes other than `victim` until one succeeds; the time it
    /// took. The writes are part of the history.
    async fn probe(&mut self, key: &[u8], victim: usize, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        let first = (victim + 1) % self.nodes.len();
        while start.elapsed() < limit {
            self.probe_seq += 1;
            let value = format!("probe-{}", self.probe_seq).into_bytes();
            let route = Route {
                first,
                avoid: Some(victim),
            };
            let (outcome, _) = workload::put(
                &self.rec,
                &self.nodes,
                (PROBE_CLIENT, self.probe_seq),
                key,
                &value,
                route,
                limit.saturating_sub(start.elapsed()),
            )
            .await;
            if outcome == Outcome::Ok {
                return Some(start.elapsed());
            }
        }
        None
    }

    /// Cuts two random nodes from each other, holds, heals.
    async fn bridge(&mut self) -> anyhow::Result<()> {
        let mut all: Vec<usize> = (0..self.cluster.len()).collect();
        all.shuffle(&mut rand::thread_rng());
        let (a, b, bridge) = (all[0], all[1], all[2]);
        self.proxies.set_blocked(a, b, true);
        self.log.injected += 1;
        self.note(format!(
            "bridge: nodes {} and {} cut, node {} reaches both",
            a + 1,
            b + 1,
            bridge + 1
        ));
        tokio::time::sleep(self.hold).await;
        self.proxies.heal();
        self.note("bridge: healed".into());
        Ok(())
    }

    /// Splits the range holding a random key at that key (or, if the key starts its range,
    /// at the next key of ours inside it).
    async fn split(&mut self) -> anyhow::Result<()> {
        let mut keys: Vec<Vec<u8>> = self.keys.to_vec();
        keys.sort();
        let ranges = self.ranges().await?;
        // A key strictly inside its range with another of our keys before it in that range.
        let mut candidates = Vec::new();
        for (i, k) in keys.iter().enumerate().skip(1) {
            let r = range_of(&ranges, k).context("key in no range")?;
            if range_of(&ranges, &keys[i - 1]).map(|p| p.range_id) == Some(r.range_id) {
                candidates.push((r.range_id, k.clone()));
            }
        }
        let (range, at) = candidates
            .choose(&mut rand::thread_rng())
            .context("no range holds two keys")?
            .clone();
        self.log.injected += 1;
        self.note(format!(
            "split: range {range} at {}",
            String::from_utf8_lossy(&at)
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut node = self.leader_of(&at).await?;
        loop {
            let req = SplitRequest {
                range: Some(split_request::Range::RangeId(range)),
                split_key: at.clone().into(),
            };
            match self.admin[node].clone().split(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let (l, rt) = (r.left.unwrap_or_default(), r.right.unwrap_or_default());
                    self.split = Some((l.range_id, rt.range_id));
                    self.note(format!(
                        "split: done, left {} right {}",
                        l.range_id, rt.range_id
                    ));
                    return Ok(());
                }
                Err(s) if Instant::now() < deadline => {
                    node = leader_hint(&s, self.cluster.len())
                        .unwrap_or((node + 1) % self.cluster.len());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => {
                    self.note(format!("split: gave up: {s}"));
                    return Ok(());
                }
            }
        }
    }

    /// Merges the last split's right half into its left half.
    async fn merge(&mut self, left: u64, right: u64) -> anyhow::Result<()> {
        self.log.injected += 1;
        self.note(format!("merge: range {right} into {left}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut node = 0;
        loop {
            if let Some(r) = self.ranges().await?.iter().find(|r| r.range_id == right) {
                if r.leader_node_id != 0 {
                    node = r.leader_node_id as usize - 1;
                }
            }
            let req = MergeRequest {
                source_range_id: right,
                target_range_id: left,
            };
            match self.admin[node].clone().merge(req).await {
                Ok(_) => {
                    self.split = None;
                    self.note("merge: done".into());
                    return Ok(());
                }
                Err(s) if Instant::now() < deadline => {
                    if let Some(h) = leader_hint(&s, self.cluster.len()) {
                        node = h;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => {
                    self.note(format!("merge: gave up: {s}"));
                    // Whether it happened is unknown; the next split starts afresh.
                    self.split = None;
                    return Ok(());
                }
            }
        }
    }

    /// Kills a node holding a follower of `right` (not the leader of either half, if the
    /// three nodes allow), starts the merge of `right` into `left` at once, and measures
    /// until a write to `right`'s keys succeeds through the other nodes: the merge either
    /// commits without the dead node's acknowledgement (it cannot: the commit waits for every
    /// replica) or is abandoned after `merge_freeze_limit` and rolled back. The node stays
    /// down for three times the usual hold, so an unbounded freeze would show.
    async fn merge_with_replica_down(&mut self, left: u64, right: u64) -> anyhow::Result<()> {
        // Both halves known with leaders (a split a moment ago may not be everywhere yet).
        let mut halves = None;
        let known_by = Instant::now() + Duration::from_secs(10);
        while halves.is_none() && Instant::now() < known_by {
            let (src, tgt) = (self.range_info(right).await, self.range_info(left).await);
            halves = src
                .zip(tgt)
                .filter(|(s, t)| s.leader_node_id != 0 && t.leader_node_id != 0);
            if halves.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let Some((src, tgt)) = halves else {
            self.note(format!(
                "merge-replica-down: ranges {right} and {left} not found"
            ));
            self.split = None;
            return Ok(());
        };
        let Some(key) = self
            .keys
            .iter()
            .find(|k| {
                src.start_key.as_ref() <= k.as_slice()
                    && (src.end_key.is_empty() || k.as_slice() < src.end_key.as_ref())
            })
            .cloned()
        else {
            self.note(format!(
                "merge-replica-down: no key of ours in range {right}"
            ));
            return Ok(());
        };
        let leaders = [src.leader_node_id, tgt.leader_node_id];
        let Some(victim) = (1..=self.cluster.len() as u64)
            .filter(|n| *n != src.leader_node_id)
            .max_by_key(|n| !leaders.contains(n))
        else {
            return Ok(());
        };
        let victim = victim as usize - 1;
        let source_leader = (src.leader_node_id as usize).max(1) - 1;
        let start = Instant::now();
        self.cluster.kill(victim);
        self.log.injected += 1;
        self.note(format!(
            "merge-replica-down: node {} killed; merge range {right} into {left}",
            victim + 1
        ));
        let admins = self.admin.clone();
        let merge = tokio::spawn(async move {
            // To the source's leader, following NotLeader hints (the table may be stale).
            let deadline = Instant::now() + Duration::from_secs(40);
            let mut node = source_leader;
            loop {
                let req = MergeRequest {
                    source_range_id: right,
                    target_range_id: left,
                };
                let mut admin = admins[node].clone();
                match tokio::time::timeout_at(deadline.into(), admin.merge(req)).await {
                    Ok(Err(s)) if Instant::now() < deadline => {
                        match leader_hint(&s, admins.len()) {
                            Some(h) if h != node && h != victim => {
                                node = h;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            _ => return Ok(Err(s)),
                        }
                    }
                    other => return other,
                }
            }
        });
        // Probe once the source is frozen (else a probe write could slip in before the
        // prepare entry and measure nothing); the stall still counts from the merge's start.
        let frozen_by = Instant::now() + Duration::from_secs(3);
        while Instant::now() < frozen_by && !merge.is_finished() {
            if self.range_info(right).await.is_some_and(|r| r.merging) {
                self.note(format!("merge-replica-down: range {right} frozen"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stall = self
            .probe(&key, victim, Duration::from_secs(30))
            .await
            .map(|_| start.elapsed());
        match stall {
            Some(s) => {
                self.note(format!(
                    "merge-replica-down: writes to {} succeed again after {} ms",
                    String::from_utf8_lossy(&key),
                    s.as_millis()
                ));
                self.log.stalls.push((Fault::MergeDown.name(), s));
            }
            None => self.note("merge-replica-down: writes still stalled after 30 s".into()),
        }
        let answer = match merge.await {
            Ok(Ok(Ok(_))) => "merged".to_string(),
            Ok(Ok(Err(s))) => format!("not merged: {}", s.message()),
            Ok(Err(_)) => "no answer in 40 s".to_string(),
            Err(e) => format!("merge task failed: {e}"),
        };
        if answer == "merged" {
            self.split = None;
        }
        self.note(format!("merge-replica-down: {answer}"));
        sleep_until(start + self.hold * 3).await;
        self.cluster.spawn(victim)?;
        self.note(format!("merge-replica-down: restarted node {}", victim + 1));
        Ok(())
    }

    /// Replaces a follower replica of a random key's range on the same node, in three
    /// membership changes (remove, add a learner, promote), each sent to the leader.
    async fn replace(&mut self) -> anyhow::Result<()> {
        let k = rand::thread_rng().gen_range(0..self.keys.len());
        let key = self.keys[k].clone();
        let leader = self.leader_of(&key).await? as u64 + 1;
        let ranges = self.ranges().await?;
        let range = range_of(&ranges, &key).context("key in no range")?.clone();
        let Some(victim) = range.replicas.iter().find(|d| d.node_id != leader).cloned() else {
            self.note(format!("replace: range {} has no follower", range.range_id));
            return Ok(());
        };
        self.log.injected += 1;
        self.note(format!(
            "replace: range {} replica {} on node {}: remove",
            range.range_id, victim.replica_id, victim.node_id
        ));
        let removed = |r: &RangeInfo| !r.replicas.iter().any(|d| d.replica_id == victim.replica_id);
        let rid = range.range_id;
        if self
            .change(rid, Change::RemoveReplica(victim.replica_id), removed)
            .await
            .is_none()
        {
            return Ok(());
        }
        self.note(format!(
            "replace: range {rid}: add a learner on node {}",
            victim.node_id
        ));
        let added = |r: &RangeInfo| r.replicas.iter().any(|d| d.node_id == victim.node_id);
        let Some(r) = self
            .change(rid, Change::AddLearnerNode(victim.node_id), added)
            .await
        else {
            return Ok(());
        };
        let new = r
            .replicas
            .iter()
            .find(|d| d.node_id == victim.node_id)
            .context("learner missing")?
            .replica_id;
        // Give the learner time to catch up (a snapshot) before it votes.
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.note(format!("replace: range {rid}: promote replica {new}"));
        let voter = |r: &RangeInfo| {
            r.replicas
                .iter()
                .any(|d| d.replica_id == new && d.role == ReplicaRole::Voter as i32)
        };
        if self
            .change(rid, Change::PromoteReplica(new), voter)
            .await
            .is_some()
        {
            self.note(format!("replace: range {rid}: done"));
        }
        Ok(())
    }

    /// Sends one membership change to the range's leader until it is answered or `done` holds
    /// for the range as its leader sees it (a timed-out change may still have applied, and
    /// must not be asked twice). `None` if it gave up.
    async fn change(
        &mut self,
        range: u64,
        change: Change,
        done: impl Fn(&RangeInfo) -> bool,
    ) -> Option<RangeInfo> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        while Instant::now() < deadline {
            let Some(info) = self.range_info(range).await else {
                last = "range in no node's table".into();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            if done(&info) {
                return Some(info.clone());
            }
            let node = (info.leader_node_id as usize).max(1) - 1;
            let req = ChangeMembershipRequest {
                range_id: range,
                changes: vec![MembershipChange {
                    change: Some(change),
                }],
            };
            let mut admin = self.admin[node].clone();
            match tokio::time::timeout(Duration::from_secs(5), admin.change_membership(req)).await {
                Ok(Ok(r)) => return r.into_inner().range,
                Ok(Err(s)) => last = s.to_string(),
                Err(_) => last = "timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.note(format!("replace: range {range}: gave up: {last}"));
        None
    }

    /// `range` as the node that believes it leads it sees it (else as any node sees it): a
    /// removed replica's node no longer has the range at all.
    async fn range_info(&self, range: u64) -> Option<RangeInfo> {
        let mut any = None;
        for i in 0..self.cluster.len() {
            if !self.cluster.running(i) {
                continue;
            }
            let mut admin = self.admin[i].clone();
            let call = admin.ranges(RangesRequest {});
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), call).await {
                let table = r.into_inner();
                if let Some(info) = table.ranges.into_iter().find(|r| r.range_id == range) {
                    if info.leader_node_id == table.node_id {
                        return Some(info);
                    }
                    any = Some(info);
                }
            }
        }
        any
    }

    /// The range table of the first node that answers.
    async fn ranges(&self) -> anyhow::Result<Vec<RangeInfo>> {
        for i in 0..self.cluster.len() {
            if !self.cluster.running(i) {
                continue;
            }
            let mut admin = self.admin[i].clone();
            let call = admin.ranges(RangesRequest {});
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), call).await {
                return Ok(r.into_inner().ranges);
            }
        }
        bail!("no node answers its range table")
    }

    /// The node leading the range that holds `key`, as some node believes (any node if no
    /// node knows: the fault then hits a follower, which is still a fault).
    async fn leader_of(&self, key: &[u8]) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for i in 0..self.cluster.len() {
                if !self.cluster.running(i) {
                    continue;
                }
                let mut admin = self.admin[i].clone();
                let call = admin.ranges(RangesRequest {});
                if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), call).await {
                    let ranges = r.into_inner().ranges;
                    if let Some(r) = range_of(&ranges, key).filter(|r| r.leader_node_id != 0) {
                        return Ok(r.leader_node_id as usize - 1);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Ok(0);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Heals everything: resumes paused nodes, restarts killed ones, unblocks every link.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        self.proxies.heal();
        self.cluster.heal()?;
        self.note("heal: every node running, every link open".into());
        Ok(())
    }

    /// Waits until every range of node 1's table has a leader that every node agrees on
    /// enough to answer a linearizable read of each key.
    pub async fn wait_settled(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(ranges) = self.ranges().await {
                if !ranges.is_empty() && ranges.iter().all(|r| r.leader_node_id != 0) {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }
}

/// The probe's client id (the workload's clients have ids `(index << 32) | random`).
const PROBE_CLIENT: u64 = 0xFFFF_0000_0000_0001;

fn range_of<'a>(ranges: &'a [RangeInfo], key: &[u8]) -> Option<&'a RangeInfo> {
    ranges
        .iter()
        .find(|r| r.start_key.as_ref() <= key && (r.end_key.is_empty() || key < r.end_key.as_ref()))
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(t.into()).await;
}
