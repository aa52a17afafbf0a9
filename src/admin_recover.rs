//! The unsafe-recovery calls of the admin API (`RecoveryReport`, `ForceAlone`,
//! `RetireReplica`), kept apart from the other admin calls (`admin_service` delegates here):
//! the gRPC messages ↔ `NodeGroup::recovery_report` / `force_alone` / `retire_replica`, run
//! off the async threads (they lock replicas and write synced batches). A refusal of one range
//! is an answer (`RecoveryRefusal`, typed), not a failed call: the operator's tool goes on with
//! the other ranges and says what each refusal means.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::admin::{
    force_alone_response, ForceAloneRequest, ForceAloneResponse, ForcedRange, RecoveryRefusal,
    RecoveryRefusalKind, RecoveryReplica, RecoveryReportRequest, RecoveryReportResponse,
    RetireReplicaRequest, RetireReplicaResponse,
};
use flotilla_proto::{NodeId, RangeId};
use flotilla_runtime::{Error, NodeGroup, ReadConsistency, StateRole};
use tonic::Status;

use crate::kv_service::to_status;

/// How many election timeouts `ForceAlone` waits for the forced replica to lead before it
/// answers (it answers either way, saying whether it leads).
const LEAD_WAIT_ELECTIONS: u32 = 3;
/// And at least this long.
const LEAD_WAIT_MIN: Duration = Duration::from_secs(2);

/// `RecoveryReport`: this node's replicas of ranges that lost a quorum to the lost nodes (or
/// of the ranges asked), and its stale view of the registry.
pub(crate) async fn report(
    node: &Arc<NodeGroup>,
    req: RecoveryReportRequest,
) -> Result<RecoveryReportResponse, Status> {
    let lost = lost_nodes(&req.lost_node_ids)?;
    let ranges: Vec<RangeId> = req.range_ids.into_iter().map(RangeId).collect();
    let n = node.clone();
    let replicas = tokio::task::spawn_blocking(move || {
        let asked = (!ranges.is_empty()).then_some(&ranges[..]);
        n.recovery_report(&lost, asked)
    })
    .await
    .map_err(|e| Status::internal(format!("recovery report: {e}")))?
    .map_err(to_status)?;
    // What this node's replica of the system range applied: no leader needed (it may have
    // lost its quorum too).
    let registry = if node.has_system_replica() {
        node.nodes(ReadConsistency::Stale).await.unwrap_or_default()
    } else {
        Vec::new()
    };
    Ok(RecoveryReportResponse {
        node_id: node.node_id().0,
        replicas: replicas
            .into_iter()
            .map(|r| RecoveryReplica {
                range_id: r.range.0,
                replica_id: r.replica_id,
                descriptor: r.descriptor,
                voters: r.voters,
                voters_outgoing: r.voters_outgoing,
                learners: r.learners,
                term: r.term,
                vote: r.vote,
                commit: r.commit,
                applied: r.applied,
                last_index: r.last_index,
                last_term: r.last_term,
                leader: r.leader,
                conf_change_indexes: r.conf_change_indexes,
                quorum_lost: r.quorum_lost,
            })
            .collect(),
        registry,
    })
}

/// `ForceAlone`: this node's replica of the range continues alone; the answer comes once it
/// leads (or after a few election timeouts, saying it does not yet).
pub(crate) async fn force_alone(
    node: &Arc<NodeGroup>,
    req: ForceAloneRequest,
) -> Result<ForceAloneResponse, Status> {
    let range = range_id(req.range_id)?;
    let lost = lost_nodes(&req.lost_node_ids)?;
    if lost.is_empty() {
        return Err(Status::invalid_argument("lost_node_ids is empty"));
    }
    let n = node.clone();
    let expect = (req.expect_conf_ver != 0).then_some(req.expect_conf_ver);
    let forced =
        tokio::task::spawn_blocking(move || n.force_alone(range, &lost, expect, req.min_conf_ver))
            .await
            .map_err(|e| Status::internal(format!("force alone: {e}")))?;
    let f = match forced {
        Ok(f) => f,
        Err(e) => {
            let refused = refusal(&e).ok_or_else(|| to_status(e))?;
            return Ok(ForceAloneResponse {
                outcome: Some(force_alone_response::Outcome::Refused(refused)),
            });
        }
    };
    let (leader, term) = wait_leading(node, range).await;
    Ok(ForceAloneResponse {
        outcome: Some(force_alone_response::Outcome::Forced(ForcedRange {
            range_id: f.range.0,
            replica_id: f.replica_id,
            commit: f.commit,
            applied: f.applied,
            last_index: f.last_index,
            last_term: f.last_term,
            neutralized_indexes: f.neutralized,
            descriptor: Some(f.descriptor),
            leader,
            term,
        })),
    })
}

/// `RetireReplica`: this node's replica, left behind by a membership forced elsewhere, is
/// destroyed.
pub(crate) async fn retire(
    node: &Arc<NodeGroup>,
    req: RetireReplicaRequest,
) -> Result<RetireReplicaResponse, Status> {
    let range = range_id(req.range_id)?;
    if req.newer_conf_ver == 0 {
        return Err(Status::invalid_argument("newer_conf_ver is required"));
    }
    let n = node.clone();
    let done = tokio::task::spawn_blocking(move || n.retire_replica(range, req.newer_conf_ver))
        .await
        .map_err(|e| Status::internal(format!("retire replica: {e}")))?;
    match done {
        Ok(()) => Ok(RetireReplicaResponse { refused: None }),
        Err(e) => {
            let refused = refusal(&e).ok_or_else(|| to_status(e))?;
            Ok(RetireReplicaResponse {
                refused: Some(refused),
            })
        }
    }
}

/// The typed refusal of one range's recovery step, for the errors that are one: the caller
/// goes on with the other ranges. Other errors (stopping, ...) fail the call.
fn refusal(e: &Error) -> Option<RecoveryRefusal> {
    use flotilla_runtime::RecoveryRefusal as Why;
    let kind = match e {
        Error::RecoveryRefused { why, .. } => match why {
            Why::LostIncludesSelf(_) => RecoveryRefusalKind::LostIncludesSelf,
            Why::QuorumAlive { .. } => RecoveryRefusalKind::QuorumAlive,
            Why::Uninitialized => RecoveryRefusalKind::Uninitialized,
            Why::Merging => RecoveryRefusalKind::Merging,
            Why::Changed { .. } => RecoveryRefusalKind::Changed,
            Why::NotStale { .. } => RecoveryRefusalKind::NotStale,
        },
        Error::RangeNotFound(_) => RecoveryRefusalKind::RangeNotFound,
        Error::ReplicaFailed(_) | Error::Store(_) | Error::RaftInit { .. } => {
            RecoveryRefusalKind::Failed
        }
        _ => return None,
    };
    Some(RecoveryRefusal {
        kind: kind as i32,
        message: e.with_sources(),
    })
}

/// Waits (a few election timeouts at most) until this node's replica of `range` leads;
/// whether it does, and its term.
async fn wait_leading(node: &NodeGroup, range: RangeId) -> (bool, u64) {
    let config = node.config();
    // Alone, it wins its first campaign: the floor only covers a loaded machine's rounds.
    let wait = (config.tick_interval
        * u32::try_from(config.election_tick).unwrap_or(u32::MAX)
        * LEAD_WAIT_ELECTIONS)
        .max(LEAD_WAIT_MIN);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let status = node.status(range).ok();
        let term = status.as_ref().map_or(0, |s| s.term);
        if status.is_some_and(|s| s.role == StateRole::Leader) {
            return (true, term);
        }
        if tokio::time::Instant::now() >= deadline {
            return (false, term);
        }
        tokio::time::sleep(config.tick_interval.min(Duration::from_millis(20))).await;
    }
}

fn range_id(id: u64) -> Result<RangeId, Status> {
    if id == 0 {
        return Err(Status::invalid_argument("range_id is required"));
    }
    Ok(RangeId(id))
}

fn lost_nodes(ids: &[u64]) -> Result<BTreeSet<NodeId>, Status> {
    if ids.contains(&0) {
        return Err(Status::invalid_argument("node id 0 is never a node"));
    }
    Ok(ids.iter().copied().map(NodeId).collect())
}
