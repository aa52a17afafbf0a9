//! `flotilla-ctl recover --lost 2,3`: unsafe recovery of the ranges that lost a majority of
//! their voters to nodes gone for good (TiKV's unsafe recovery is the model). It runs in three
//! steps and decides nothing before every surviving node has reported:
//!
//! 1. **Collect**: every endpoint must answer (an unreachable one is an error: it may hold the
//!    best copy of a range). Each node reports its replicas whose membership lost a quorum to
//!    the lost nodes; then every node reports its view of exactly those ranges, so that a
//!    stale view (a replica that missed a membership change) is judged against the newest.
//! 2. **Plan** ([`plan`], pure): a range needs recovery when, in its newest membership (the
//!    highest conf_ver any node reported), the lost nodes hold a majority of the voters (of
//!    either half of a joint configuration). Its survivor is the surviving replica with the
//!    highest last log (term, index), as an election would pick; every other replica of it is
//!    retired afterwards. Every node a recovered range lives on, and every node of the
//!    registry, must be reachable or declared lost; a lost node must be known.
//! 3. **Act** (not with `--dry-run`): the system range first (it holds the node registry),
//!    then the lost nodes are marked REMOVED in the registry (refused by every node from then
//!    on, never back; the scheduler rebuilds their replicas at once), then every other range
//!    is forced, then the replicas left behind are retired. The scheduler then brings each
//!    recovered range back to its replication factor.
//!
//! What it prints for each range (survivor, commit, applied and last index) is what the
//! range keeps: writes the lost majority acknowledged beyond the survivor's last index are
//! gone, and the entries after its commit index, never known committed, are committed by the
//! new membership.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Result};
use flotilla_proto::admin::{
    force_alone_response, ForceAloneRequest, RecoveryRefusal, RecoveryRefusalKind, RecoveryReplica,
    RecoveryReportRequest, RecoveryReportResponse, RetireReplicaRequest, SetNodeStateRequest,
};
use flotilla_proto::meta::{NodeRecord, NodeState};
use serde_json::{json, Value};

use crate::cluster::{describe, Cluster};
use crate::output::{show_bytes, show_end, show_start, table, Output};

/// The system range's id (`RangeId::SYSTEM`): it holds the node registry.
const SYSTEM: u64 = u64::MAX;

/// `flotilla-ctl recover`.
#[derive(Debug, Clone, clap::Args)]
pub struct RecoverArgs {
    /// Ids of the nodes gone for good (comma-separated). Their data is never coming back:
    /// writes that only they held are lost. Give every surviving node in --endpoints.
    #[arg(long, value_delimiter = ',', required = true, value_name = "NODE,...")]
    lost: Vec<u64>,
    /// Print the plan (which replica continues each range, what it holds) and change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Why no plan could be made (nothing was changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// `--lost` names node 0.
    #[error("--lost: node id 0 is never a node")]
    ZeroNode,
    /// An endpoint did not answer: it may hold the best copy of a range.
    #[error(
        "endpoint {endpoint} did not answer ({why}): every surviving node must report before \
         anything is decided; if that node is gone for good, drop it from --endpoints and add \
         its id to --lost"
    )]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// Its error.
        why: String,
    },
    /// A node that answered is declared lost.
    #[error("node {node} (endpoint {endpoint}) answers, so it is not lost: correct --lost")]
    LostNodeAnswered {
        /// The node.
        node: u64,
        /// Its endpoint.
        endpoint: String,
    },
    /// A node that matters is neither reachable nor declared lost.
    #[error(
        "node {node} {why}, but it is neither among the reachable --endpoints nor in --lost: \
         give its endpoint, or add it to --lost if it is gone for good"
    )]
    Unaccounted {
        /// The node.
        node: u64,
        /// Why it matters.
        why: String,
    },
    /// A lost node that no report and no registry knows.
    #[error(
        "node {0} (in --lost) is in no range's membership and not in the registry: correct --lost"
    )]
    UnknownLostNode(u64),
}

/// One range to force.
#[derive(Debug, Clone, PartialEq)]
pub struct RangePlan {
    /// The range.
    pub range_id: u64,
    /// The node whose replica continues.
    pub survivor: u64,
    /// That replica's report.
    pub replica: RecoveryReplica,
    /// The nodes of the newest membership's voters (before).
    pub voters_before: Vec<u64>,
    /// The conf_ver above every reported replica's: the forced membership's.
    pub min_conf_ver: u64,
    /// The other reporting nodes' replicas, retired once the survivor is forced.
    pub retire: Vec<u64>,
}

/// What `recover` will do.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// The lost nodes.
    pub lost: BTreeSet<u64>,
    /// Ranges to force: the system range first, then by id.
    pub ranges: Vec<RangePlan>,
    /// Ranges some node reported but whose newest membership keeps a quorum: left alone.
    pub left_alone: Vec<u64>,
    /// Key intervals `[start, end)` (empty end: the end of the key space) that no reachable
    /// node serves: their ranges had every replica on the lost nodes and are gone entirely.
    pub lost_entirely: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether some reachable node holds a replica of the system range (the registry can be
    /// read and changed through it).
    pub registry_reachable: bool,
}

/// Makes the plan from every reachable node's report (`reports`: node id → its answer to the
/// second round, which lists its replicas of every candidate range) and `registry` (the
/// union of the nodes' stale registry views).
///
/// # Errors
///
/// [`PlanError`]: a node that matters is unaccounted for, a lost node is unknown.
pub fn plan(
    lost: &BTreeSet<u64>,
    reports: &BTreeMap<u64, RecoveryReportResponse>,
    registry: &[NodeRecord],
) -> Result<Plan, PlanError> {
    let answering: BTreeSet<u64> = reports.keys().copied().collect();
    let mut by_range: BTreeMap<u64, Vec<(u64, &RecoveryReplica)>> = BTreeMap::new();
    for (&node, report) in reports {
        for r in &report.replicas {
            by_range.entry(r.range_id).or_default().push((node, r));
        }
    }
    // Every node of the registry matters (it may hold ranges nobody reported).
    for n in registry {
        let id = n.node_id;
        if n.state != NodeState::Removed as i32 && !lost.contains(&id) && !answering.contains(&id) {
            return Err(PlanError::Unaccounted {
                node: id,
                why: "is in the node registry".into(),
            });
        }
    }
    let mut out = Plan {
        lost: lost.clone(),
        registry_reachable: !registry.is_empty(),
        ..Plan::default()
    };
    let mut known: BTreeSet<u64> = registry.iter().map(|n| n.node_id).collect();
    for (&range_id, replicas) in &by_range {
        for (_, r) in replicas {
            if let Some(d) = &r.descriptor {
                known.extend(d.replicas.iter().map(|p| p.node_id));
            }
        }
        // The newest membership any node applied.
        let Some((_, newest)) = replicas
            .iter()
            .filter(|(_, r)| r.descriptor.is_some() && !r.voters.is_empty())
            .max_by_key(|(node, r)| (epoch(r), std::cmp::Reverse(*node)))
        else {
            // Only uninitialized replicas: nothing to judge by, nothing to recover from.
            continue;
        };
        let desc = newest.descriptor.as_ref().expect("filtered");
        let node_of = |id: &u64| {
            desc.replicas
                .iter()
                .find(|p| p.replica_id == *id)
                .map_or(0, |p| p.node_id)
        };
        let quorum_lost = [&newest.voters, &newest.voters_outgoing]
            .into_iter()
            .filter(|half| !half.is_empty())
            .any(|half| {
                let alive = half
                    .iter()
                    .filter(|id| !lost.contains(&node_of(id)))
                    .count();
                alive < half.len() / 2 + 1
            });
        if !quorum_lost {
            out.left_alone.push(range_id);
            continue;
        }
        for p in &desc.replicas {
            if !lost.contains(&p.node_id) && !answering.contains(&p.node_id) {
                return Err(PlanError::Unaccounted {
                    node: p.node_id,
                    why: format!("holds a replica of {}", range_name(range_id)),
                });
            }
        }
        // Of the replicas holding data (the newest one does), the one with the highest last
        // log (term, index).
        let survivor = replicas
            .iter()
            .filter(|(_, r)| {
                r.descriptor.is_some() && !(r.voters.is_empty() && r.learners.is_empty())
            })
            .max_by_key(|(node, r)| {
                (
                    (r.last_term, r.last_index),
                    r.commit,
                    r.applied,
                    newest.voters.contains(&r.replica_id),
                    std::cmp::Reverse(*node),
                )
            });
        let &(survivor, replica) = survivor.expect("the newest replica holds data");
        let min_conf_ver = replicas.iter().map(|(_, r)| epoch(r).1).max().unwrap_or(0) + 1;
        out.ranges.push(RangePlan {
            range_id,
            survivor,
            replica: replica.clone(),
            voters_before: newest.voters.iter().map(node_of).collect(),
            min_conf_ver,
            retire: replicas
                .iter()
                .map(|(n, _)| *n)
                .filter(|&n| n != survivor)
                .collect(),
        });
    }
    if !registry.is_empty() {
        if let Some(&n) = lost.iter().find(|n| !known.contains(n)) {
            return Err(PlanError::UnknownLostNode(n));
        }
    }
    // The system range first: it holds the registry, where the lost nodes are marked removed
    // before anything else is forced.
    out.ranges
        .sort_by_key(|r| (r.range_id != SYSTEM, r.range_id));
    Ok(out)
}

/// The key intervals the range table (`ranges`, sorted by start key: every reachable node's
/// ranges, newest descriptors) leaves uncovered.
pub fn gaps(ranges: &[flotilla_proto::admin::RangeInfo]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    // Covered so far: [start of the key space, covered); `None`: to the end.
    let mut covered: Option<Vec<u8>> = Some(Vec::new());
    for r in ranges {
        let Some(to) = &covered else {
            break;
        };
        if r.start_key.as_ref() > to.as_slice() {
            out.push((to.clone(), r.start_key.to_vec()));
        }
        if r.end_key.is_empty() {
            covered = None;
        } else if r.end_key.as_ref() > to.as_slice() {
            covered = Some(r.end_key.to_vec());
        }
    }
    if let Some(to) = covered {
        out.push((to, Vec::new()));
    }
    out
}

/// (version, conf_ver) of a reported replica's descriptor.
fn epoch(r: &RecoveryReplica) -> (u64, u64) {
    let e = r
        .descriptor
        .as_ref()
        .and_then(|d| d.epoch)
        .unwrap_or_default();
    (e.version, e.conf_ver)
}

/// How ranges are shown: `r7`, and `system` for the system range.
fn range_name(id: u64) -> String {
    if id == SYSTEM {
        "system".into()
    } else {
        format!("r{id}")
    }
}

/// How one range's forcing ended.
#[derive(Debug, Clone)]
enum Outcome {
    Forced {
        leader: bool,
        term: u64,
        conf_ver: u64,
        neutralized: Vec<u64>,
    },
    Refused(RecoveryRefusal),
    Failed(String),
}

/// Runs `flotilla-ctl recover` (see the module doc).
pub async fn run(cluster: &Cluster, args: RecoverArgs, out: Output) -> Result<()> {
    if args.lost.contains(&0) {
        bail!(PlanError::ZeroNode);
    }
    let lost: BTreeSet<u64> = args.lost.iter().copied().collect();
    let lost_ids: Vec<u64> = lost.iter().copied().collect();
    for n in &cluster.nodes {
        match &n.status {
            Err(why) => bail!(PlanError::Unreachable {
                endpoint: n.endpoint.clone(),
                why: why.clone(),
            }),
            Ok(s) if lost.contains(&s.node_id) => bail!(PlanError::LostNodeAnswered {
                node: s.node_id,
                endpoint: n.endpoint.clone(),
            }),
            Ok(_) => {}
        }
    }
    // Round 1: the ranges any node sees without a quorum; round 2: every node's view of them.
    let first = reports(cluster, &lost_ids, Vec::new()).await?;
    let candidates: BTreeSet<u64> = first
        .values()
        .flat_map(|r| r.replicas.iter().map(|p| p.range_id))
        .collect();
    let second = if candidates.is_empty() {
        first.clone()
    } else {
        reports(cluster, &lost_ids, candidates.into_iter().collect()).await?
    };
    let mut registry: BTreeMap<u64, NodeRecord> = BTreeMap::new();
    for r in first.values() {
        for n in &r.registry {
            // A removal seen by any node counts (removal is final).
            let e = registry.entry(n.node_id).or_insert_with(|| n.clone());
            if n.state == NodeState::Removed as i32 {
                e.state = n.state;
            }
        }
    }
    let registry: Vec<NodeRecord> = registry.into_values().collect();
    let mut plan = plan(&lost, &second, &registry)?;
    let table: Vec<_> = cluster
        .ranges(false)
        .await?
        .into_iter()
        .map(|r| r.info)
        .collect();
    plan.lost_entirely = gaps(&table);
    let mut report = Report::new(&plan, args.dry_run);
    if args.dry_run {
        report.print(out);
        return Ok(());
    }
    let mut failures = Vec::new();
    let mut forced_conf_ver = BTreeMap::new();
    let mut ranges = plan.ranges.iter().peekable();
    // The system range first, then the registry.
    if let Some(sys) = ranges.next_if(|r| r.range_id == SYSTEM) {
        let outcome = force(cluster, sys, &lost_ids).await;
        note(&mut failures, &mut forced_conf_ver, sys, &outcome);
        report.outcomes.insert(sys.range_id, outcome);
    }
    let system_holders: Vec<u64> = plan
        .ranges
        .iter()
        .filter(|r| r.range_id == SYSTEM)
        .map(|r| r.survivor)
        .chain(
            first
                .iter()
                .filter(|(_, r)| !r.registry.is_empty())
                .map(|(n, _)| *n),
        )
        .collect();
    for &node in &lost_ids {
        match mark_removed(cluster, &system_holders, node).await {
            Ok(()) => report.removed.push(node),
            Err(e) => failures.push(format!("node {node} not marked removed: {e}")),
        }
    }
    for r in ranges {
        let outcome = force(cluster, r, &lost_ids).await;
        note(&mut failures, &mut forced_conf_ver, r, &outcome);
        report.outcomes.insert(r.range_id, outcome);
    }
    for r in &plan.ranges {
        let Some(&newer) = forced_conf_ver.get(&r.range_id) else {
            continue;
        };
        for &node in &r.retire {
            if let Err(e) = retire(cluster, r.range_id, node, newer).await {
                failures.push(format!(
                    "{}: the stale replica on node {node} was not retired: {e}",
                    range_name(r.range_id)
                ));
            } else {
                report.retired.push((r.range_id, node));
            }
        }
    }
    report.failures = failures.clone();
    report.print(out);
    if !failures.is_empty() {
        bail!("{} step(s) failed: {}", failures.len(), failures.join("; "));
    }
    if !plan.lost_entirely.is_empty() {
        bail!(
            "no surviving replica holds the keys {}: their data is lost",
            intervals(&plan.lost_entirely)
        );
    }
    Ok(())
}

fn note(
    failures: &mut Vec<String>,
    forced: &mut BTreeMap<u64, u64>,
    r: &RangePlan,
    outcome: &Outcome,
) {
    let name = range_name(r.range_id);
    match outcome {
        Outcome::Forced { conf_ver, .. } => {
            forced.insert(r.range_id, *conf_ver);
        }
        Outcome::Refused(why) => failures.push(format!(
            "{name}: node {} refused ({}): {}",
            r.survivor,
            refusal_name(why.kind),
            why.message
        )),
        Outcome::Failed(e) => failures.push(format!("{name}: node {}: {e}", r.survivor)),
    }
}

/// Every node's report (all endpoints answered `NodeStatus` already).
async fn reports(
    cluster: &Cluster,
    lost: &[u64],
    range_ids: Vec<u64>,
) -> Result<BTreeMap<u64, RecoveryReportResponse>> {
    let mut out = BTreeMap::new();
    for (id, mut admin) in cluster.admins() {
        let req = RecoveryReportRequest {
            lost_node_ids: lost.to_vec(),
            range_ids: range_ids.clone(),
        };
        let answer = tokio::time::timeout(cluster.timeout(), admin.recovery_report(req)).await;
        let report = match answer {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => bail!("node {id} did not report: {}", describe(&s)),
            Err(_) => bail!(
                "node {id} did not report within {:?}: every surviving node must report",
                cluster.timeout()
            ),
        };
        out.insert(id, report);
    }
    Ok(out)
}

async fn force(cluster: &Cluster, r: &RangePlan, lost: &[u64]) -> Outcome {
    let mut admin = match cluster.admin(Some(r.survivor)) {
        Ok((_, a)) => a,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let req = ForceAloneRequest {
        range_id: r.range_id,
        lost_node_ids: lost.to_vec(),
        expect_conf_ver: epoch(&r.replica).1,
        min_conf_ver: r.min_conf_ver,
    };
    // The node answers once its replica leads (a few election timeouts at most).
    let wait = cluster.timeout() * 3;
    match tokio::time::timeout(wait, admin.force_alone(req)).await {
        Err(_) => Outcome::Failed(format!("no answer within {wait:?}")),
        Ok(Err(s)) => Outcome::Failed(describe(&s)),
        Ok(Ok(resp)) => match resp.into_inner().outcome {
            Some(force_alone_response::Outcome::Forced(f)) => Outcome::Forced {
                leader: f.leader,
                term: f.term,
                conf_ver: f
                    .descriptor
                    .and_then(|d| d.epoch)
                    .map_or(r.min_conf_ver, |e| e.conf_ver),
                neutralized: f.neutralized_indexes,
            },
            Some(force_alone_response::Outcome::Refused(why)) => Outcome::Refused(why),
            None => Outcome::Failed("empty answer".into()),
        },
    }
}

/// Marks `node` REMOVED in the registry through the first of `holders` (nodes holding a
/// replica of the system range) that manages.
async fn mark_removed(cluster: &Cluster, holders: &[u64], node: u64) -> Result<()> {
    let mut last = "no reachable node holds a replica of the system range".to_string();
    let mut seen = BTreeSet::new();
    for &h in holders.iter().filter(|h| seen.insert(**h)) {
        let Ok((_, mut admin)) = cluster.admin(Some(h)) else {
            continue;
        };
        let req = SetNodeStateRequest {
            node_id: node,
            state: NodeState::Removed as i32,
        };
        match tokio::time::timeout(cluster.timeout() * 3, admin.set_node_state(req)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(s)) => last = format!("node {h}: {}", describe(&s)),
            Err(_) => last = format!("node {h}: no answer within {:?}", cluster.timeout() * 3),
        }
    }
    bail!("{last}")
}

async fn retire(cluster: &Cluster, range_id: u64, node: u64, newer: u64) -> Result<()> {
    let (_, mut admin) = cluster.admin(Some(node))?;
    let req = RetireReplicaRequest {
        range_id,
        newer_conf_ver: newer,
    };
    match tokio::time::timeout(cluster.timeout(), admin.retire_replica(req)).await {
        Err(_) => bail!("no answer within {:?}", cluster.timeout()),
        Ok(Err(s)) => bail!("{}", describe(&s)),
        Ok(Ok(r)) => match r.into_inner().refused {
            // Gone already (a second run): what retiring wanted.
            Some(why) if why.kind == RecoveryRefusalKind::RangeNotFound as i32 => Ok(()),
            Some(why) => bail!("refused ({}): {}", refusal_name(why.kind), why.message),
            None => Ok(()),
        },
    }
}

/// Key intervals as shown: `[a, m), [x, (end))`.
fn intervals(list: &[(Vec<u8>, Vec<u8>)]) -> String {
    list.iter()
        .map(|(s, e)| format!("[{}, {})", show_start(s), show_end(e)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A refusal kind as shown: `quorum-alive`, `merging`, ...
fn refusal_name(kind: i32) -> String {
    match RecoveryRefusalKind::try_from(kind) {
        Ok(k) => k
            .as_str_name()
            .trim_start_matches("RECOVERY_REFUSAL_KIND_")
            .to_ascii_lowercase()
            .replace('_', "-"),
        Err(_) => format!("unknown({kind})"),
    }
}

/// What is printed: the plan and, once acted, each step's outcome.
struct Report<'a> {
    plan: &'a Plan,
    dry_run: bool,
    outcomes: BTreeMap<u64, Outcome>,
    removed: Vec<u64>,
    retired: Vec<(u64, u64)>,
    failures: Vec<String>,
}

/// The warning every run prints, plainly.
const WARNING: &str = "WARNING: unsafe recovery gives up raft's guarantee for these ranges. \
Each continues from its survivor's log alone: writes the lost nodes acknowledged beyond the \
survivor's LAST index are gone for good. Entries after the survivor's COMMIT index (up to \
LAST) were never known committed; the new single-voter membership commits them, so writes \
whose clients saw a timeout or an error may appear. Membership changes after APPLIED are \
dropped (the forced membership replaces them).";

impl<'a> Report<'a> {
    fn new(plan: &'a Plan, dry_run: bool) -> Self {
        Report {
            plan,
            dry_run,
            outcomes: BTreeMap::new(),
            removed: Vec::new(),
            retired: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn print(&self, out: Output) {
        match out {
            Output::Json => println!("{}", self.json()),
            Output::Table => self.table(),
        }
    }

    fn json(&self) -> Value {
        let ranges: Vec<Value> = self
            .plan
            .ranges
            .iter()
            .map(|r| {
                let p = &r.replica;
                let mut v = json!({
                    "range": range_name(r.range_id), "range_id": r.range_id,
                    "survivor_node": r.survivor, "replica_id": p.replica_id,
                    "voters_before": r.voters_before,
                    "term": p.term, "commit": p.commit, "applied": p.applied,
                    "last_index": p.last_index, "last_term": p.last_term,
                    "uncommitted_entries": p.last_index.saturating_sub(p.commit),
                    "dropped_conf_changes": p.conf_change_indexes,
                    "retire_nodes": r.retire,
                });
                match self.outcomes.get(&r.range_id) {
                    Some(Outcome::Forced {
                        leader,
                        term,
                        conf_ver,
                        neutralized,
                    }) => {
                        v["outcome"] = json!({
                            "forced": true, "leader": leader, "term": term, "conf_ver": conf_ver,
                            "dropped_conf_changes": neutralized,
                        })
                    }
                    Some(Outcome::Refused(why)) => {
                        v["outcome"] = json!({
                            "forced": false, "refused": refusal_name(why.kind),
                            "message": why.message,
                        })
                    }
                    Some(Outcome::Failed(e)) => {
                        v["outcome"] = json!({ "forced": false, "error": e })
                    }
                    None => {}
                }
                v
            })
            .collect();
        let names = |ids: &[u64]| ids.iter().map(|&r| range_name(r)).collect::<Vec<_>>();
        json!({
            "lost_nodes": self.plan.lost,
            "dry_run": self.dry_run,
            "ranges": ranges,
            "left_alone": names(&self.plan.left_alone),
            "lost_entirely": self.plan.lost_entirely.iter()
                .map(|(s, e)| json!({"start": show_bytes(s), "end": show_bytes(e)}))
                .collect::<Vec<_>>(),
            "removed_nodes": self.removed,
            "retired": self.retired.iter().map(|(r, n)| json!({"range": range_name(*r), "node": n})).collect::<Vec<_>>(),
            "failures": self.failures,
            "warning": WARNING,
        })
    }

    fn table(&self) {
        let lost: Vec<String> = self.plan.lost.iter().map(|n| n.to_string()).collect();
        println!(
            "unsafe recovery after losing node(s) {}{}",
            lost.join(", "),
            if self.dry_run {
                " (dry run: nothing is changed)"
            } else {
                ""
            }
        );
        if self.plan.ranges.is_empty() {
            println!("no range lost a majority of its voters to these nodes: nothing to force");
        } else {
            let rows: Vec<Vec<String>> = self
                .plan
                .ranges
                .iter()
                .map(|r| {
                    let p = &r.replica;
                    let dropped = if p.conf_change_indexes.is_empty() {
                        "-".to_string()
                    } else {
                        p.conf_change_indexes
                            .iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    let retire = if r.retire.is_empty() {
                        "-".to_string()
                    } else {
                        r.retire
                            .iter()
                            .map(|n| format!("n{n}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    let outcome = match self.outcomes.get(&r.range_id) {
                        None if self.dry_run => "planned".to_string(),
                        None => "not attempted".to_string(),
                        Some(Outcome::Forced {
                            leader: true, term, ..
                        }) => format!("forced, leads at term {term}"),
                        Some(Outcome::Forced { .. }) => "forced, not leading yet".to_string(),
                        Some(Outcome::Refused(why)) => {
                            format!("refused: {}", refusal_name(why.kind))
                        }
                        Some(Outcome::Failed(_)) => "failed".to_string(),
                    };
                    vec![
                        range_name(r.range_id),
                        r.voters_before
                            .iter()
                            .map(|n| format!("n{n}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        format!("n{}", r.survivor),
                        p.replica_id.to_string(),
                        p.last_term.to_string(),
                        p.commit.to_string(),
                        p.applied.to_string(),
                        p.last_index.to_string(),
                        p.last_index.saturating_sub(p.commit).to_string(),
                        dropped,
                        retire,
                        outcome,
                    ]
                })
                .collect();
            table(
                &[
                    "RANGE",
                    "VOTERS BEFORE",
                    "SURVIVOR",
                    "REPLICA",
                    "LAST TERM",
                    "COMMIT",
                    "APPLIED",
                    "LAST",
                    "UNCOMMITTED",
                    "CONF CHANGES DROPPED",
                    "RETIRE",
                    "OUTCOME",
                ],
                &rows,
            );
            println!("{WARNING}");
            for r in &self.plan.ranges {
                let p = &r.replica;
                let tail = p.last_index.saturating_sub(p.commit);
                println!(
                    "{}: continues from node {}'s log up to index {} (term {}), known committed \
                     up to {}; {tail} entr{} after that, never known committed, {} committed by \
                     the new membership.",
                    range_name(r.range_id),
                    r.survivor,
                    p.last_index,
                    p.last_term,
                    p.commit,
                    if tail == 1 { "y" } else { "ies" },
                    if tail == 1 { "is" } else { "are" },
                );
            }
        }
        if !self.plan.left_alone.is_empty() {
            let names: Vec<String> = self
                .plan
                .left_alone
                .iter()
                .map(|&r| range_name(r))
                .collect();
            println!(
                "left alone (a quorum survives in the newest membership): {}",
                names.join(", ")
            );
        }
        if !self.plan.lost_entirely.is_empty() {
            println!(
                "LOST: no surviving replica holds the keys {}: every replica of their ranges \
                 was on the lost nodes",
                intervals(&self.plan.lost_entirely)
            );
        }
        if !self.plan.registry_reachable {
            println!(
                "note: no reachable node holds the system range: the lost nodes cannot be \
                 marked removed in the registry"
            );
        }
        if !self.dry_run {
            if !self.removed.is_empty() {
                let ids: Vec<String> = self.removed.iter().map(|n| n.to_string()).collect();
                println!(
                    "marked removed in the registry (refused from now on): node(s) {}",
                    ids.join(", ")
                );
            }
            for (r, n) in &self.retired {
                println!(
                    "retired the stale replica of {} on node {n}",
                    range_name(*r)
                );
            }
            if !self.plan.ranges.is_empty() {
                println!(
                    "the scheduler now adds replicas to each recovered range until it is back \
                     at its replication factor (flotilla-ctl ranges, flotilla-ctl placement)"
                );
            }
            for f in &self.failures {
                println!("FAILED: {f}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::meta::{RangeDescriptor, RangeEpoch, ReplicaDescriptor, ReplicaRole};

    use super::*;

    /// A report of replica `replica` (on `node`) of range `range` whose descriptor has
    /// voters `(replica id, node)` at conf_ver `conf_ver`, its log ending at `last`.
    fn replica(
        range: u64,
        replica: u64,
        voters: &[(u64, u64)],
        conf_ver: u64,
        last: (u64, u64),
    ) -> RecoveryReplica {
        RecoveryReplica {
            range_id: range,
            replica_id: replica,
            descriptor: Some(RangeDescriptor {
                range_id: range,
                epoch: Some(RangeEpoch {
                    conf_ver,
                    version: 1,
                }),
                replicas: voters
                    .iter()
                    .map(|&(id, node)| ReplicaDescriptor {
                        replica_id: id,
                        node_id: node,
                        role: ReplicaRole::Voter as i32,
                    })
                    .collect(),
                ..Default::default()
            }),
            voters: voters.iter().map(|v| v.0).collect(),
            last_term: last.0,
            last_index: last.1,
            commit: last.1 - 1,
            applied: last.1 - 1,
            ..Default::default()
        }
    }

    fn reports(list: &[(u64, Vec<RecoveryReplica>)]) -> BTreeMap<u64, RecoveryReportResponse> {
        list.iter()
            .map(|(n, r)| {
                (
                    *n,
                    RecoveryReportResponse {
                        node_id: *n,
                        replicas: r.clone(),
                        registry: Vec::new(),
                    },
                )
            })
            .collect()
    }

    fn lost(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    const THREE: [(u64, u64); 3] = [(1, 1), (2, 2), (3, 3)];
    const FIVE: [(u64, u64); 5] = [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)];

    #[test]
    fn the_survivor_with_the_highest_last_term_and_index_continues_and_the_others_are_retired() {
        let r = reports(&[
            (1, vec![replica(7, 1, &FIVE, 3, (5, 40))]),
            (2, vec![replica(7, 2, &FIVE, 3, (6, 12))]),
        ]);
        let p = plan(&lost(&[3, 4, 5]), &r, &[]).unwrap();
        assert_eq!(p.ranges.len(), 1);
        assert_eq!(
            p.ranges[0].survivor, 2,
            "term 6 beats a longer log of term 5"
        );
        assert_eq!(p.ranges[0].retire, vec![1]);
        assert_eq!(p.ranges[0].min_conf_ver, 4);
        assert_eq!(p.ranges[0].voters_before, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_range_whose_newest_membership_keeps_a_quorum_is_left_alone() {
        // Node 1's replica missed a change that moved the range to nodes 1, 4, 5.
        let r = reports(&[
            (1, vec![replica(7, 1, &THREE, 2, (4, 30))]),
            (
                4,
                vec![replica(7, 4, &[(1, 1), (4, 4), (5, 5)], 5, (5, 50))],
            ),
            (5, vec![]),
        ]);
        let p = plan(&lost(&[2, 3]), &r, &[]).unwrap();
        assert!(p.ranges.is_empty());
        assert_eq!(p.left_alone, vec![7]);
    }

    #[test]
    fn a_node_of_a_recovered_range_must_be_reachable_or_lost() {
        let r = reports(&[(1, vec![replica(7, 1, &FIVE, 3, (5, 40))])]);
        let e = plan(&lost(&[3, 4, 5]), &r, &[]).unwrap_err();
        assert_eq!(
            e,
            PlanError::Unaccounted {
                node: 2,
                why: "holds a replica of r7".into()
            }
        );
    }

    #[test]
    fn every_registry_node_must_be_reachable_or_lost_and_every_lost_node_known() {
        let rec = |id, state: NodeState| NodeRecord {
            node_id: id,
            state: state as i32,
            ..Default::default()
        };
        let r = reports(&[(1, vec![replica(SYSTEM, 1, &THREE, 1, (3, 20))])]);
        let registry = [
            rec(1, NodeState::Up),
            rec(2, NodeState::Up),
            rec(3, NodeState::Up),
            rec(4, NodeState::Up),
            rec(5, NodeState::Removed),
        ];
        let e = plan(&lost(&[2, 3]), &r, &registry).unwrap_err();
        assert!(matches!(e, PlanError::Unaccounted { node: 4, .. }), "{e}");
        let p = plan(&lost(&[2, 3, 4]), &r, &registry).unwrap();
        assert_eq!(p.ranges[0].range_id, SYSTEM);
        assert!(p.registry_reachable);
        let e = plan(&lost(&[2, 3, 4, 9]), &r, &registry).unwrap_err();
        assert_eq!(e, PlanError::UnknownLostNode(9));
    }

    #[test]
    fn the_system_range_goes_first_and_a_joint_membership_loses_its_quorum_with_either_half() {
        let mut uninitialized = replica(9, 1, &THREE, 1, (0, 1));
        uninitialized.voters.clear();
        uninitialized.descriptor = None;
        let r = reports(&[(
            1,
            vec![
                replica(2, 1, &THREE, 1, (2, 10)),
                uninitialized,
                replica(SYSTEM, 1, &THREE, 1, (3, 20)),
            ],
        )]);
        let p = plan(&lost(&[2, 3]), &r, &[]).unwrap();
        let order: Vec<u64> = p.ranges.iter().map(|r| r.range_id).collect();
        assert_eq!(order, vec![SYSTEM, 2]);
        // r9's only report is uninitialized: nothing to judge or recover it from.
        assert!(!p.left_alone.contains(&9));
        // A joint configuration loses its quorum when either half does.
        let mut joint = replica(4, 1, &[(1, 1), (4, 4), (5, 5)], 2, (2, 10));
        joint.voters = vec![1, 4, 5];
        joint.voters_outgoing = vec![1, 2, 3];
        let d = joint.descriptor.as_mut().unwrap();
        d.replicas
            .extend([(2, 2), (3, 3)].map(|(id, node)| ReplicaDescriptor {
                replica_id: id,
                node_id: node,
                role: ReplicaRole::Voter as i32,
            }));
        let r = reports(&[(1, vec![joint]), (4, vec![]), (5, vec![])]);
        let p = plan(&lost(&[2, 3]), &r, &[]).unwrap();
        assert_eq!(p.ranges.len(), 1, "{p:?}");
    }

    #[test]
    fn key_intervals_no_range_covers_are_found() {
        use flotilla_proto::admin::RangeInfo;
        let r = |s: &str, e: &str| RangeInfo {
            start_key: s.as_bytes().to_vec().into(),
            end_key: e.as_bytes().to_vec().into(),
            ..Default::default()
        };
        assert!(gaps(&[r("", "m"), r("m", "")]).is_empty());
        let g = gaps(&[r("c", "m"), r("m", "t")]);
        assert_eq!(
            g,
            vec![(Vec::new(), b"c".to_vec()), (b"t".to_vec(), Vec::new())]
        );
        assert_eq!(gaps(&[]), vec![(Vec::new(), Vec::new())]);
    }
}
