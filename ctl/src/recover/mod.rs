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
//!
//! Layout: this file (the flags, collecting the reports, acting), `plan.rs` (the decision, a
//! pure function of the reports), `report.rs` (what is printed, table or JSON).

mod plan;
mod report;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Result};
use flotilla_proto::admin::{
    force_alone_response, ForceAloneRequest, RecoveryRefusal, RecoveryRefusalKind, RecoveryReplica,
    RecoveryReportRequest, RecoveryReportResponse, RetireReplicaRequest, SetNodeStateRequest,
};
use flotilla_proto::meta::{NodeRecord, NodeState};

use crate::cluster::{describe, Cluster};
use crate::output::{show_end, show_start, Output};
use plan::{gaps, plan, PlanError, RangePlan};
use report::Report;

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
