//! The admin API of a node over gRPC (`flotilla.admin.Admin`): split a range (at a key or its
//! middle), merge two adjacent ranges, change a range's replicas, hand its leadership to
//! another node, list this node's range table (with each range's keys and bytes on request),
//! the node's counters, the node registry (list, join, state), every node's statistics and
//! status (`Nodes`), what the scheduler decided (`Placement`), one range's data at one
//! point for a backup (`BackupRange`, in [`crate::backup_service`]), and unsafe recovery of
//! ranges that lost their quorum for good (`RecoveryReport`, `ForceAlone`, `RetireReplica`:
//! in `admin_recover`). It exists so that an operator (`flotilla-ctl`) or a placement
//! process can reshape the key space of a running cluster without linking the runtime;
//! errors go through the one mapping in [`crate::kv_service::to_status`].

use std::sync::Arc;

use flotilla_proto::admin::admin_server::{Admin, AdminServer};
use flotilla_proto::admin::{
    membership_change, split_request, BackupRangeRequest, ChangeMembershipRequest,
    ChangeMembershipResponse, JoinRequest, JoinResponse, MergeRequest, MergeResponse, NodeInfo,
    NodeStatusRequest, NodeStatusResponse, NodesRequest, NodesResponse, PlacementEvent,
    PlacementRequest, PlacementResponse, RangeInfo, RangeSizesRequest, RangesRequest,
    RangesResponse, RegistryRequest, RegistryResponse, SetNodeStateRequest, SetNodeStateResponse,
    SplitRequest, SplitResponse, TransferLeaderRequest, TransferLeaderResponse,
};
use flotilla_proto::admin::{
    ForceAloneRequest, ForceAloneResponse, RecoveryReportRequest, RecoveryReportResponse,
    RetireReplicaRequest, RetireReplicaResponse,
};
use flotilla_proto::meta::{NodeState, RangeDescriptor};
use flotilla_proto::{NodeId, RangeId, ReplicaId};
use flotilla_runtime::{MembershipChange, NodeGroup, ReadConsistency};
use tonic::{Request, Response, Status};

use crate::kv_service::to_status;
use crate::schedule::{Placement, Standing};

/// Most keys of one range walked to measure it (`RangesRequest.sizes`); past it the size is
/// RocksDB's estimate.
const MEASURE_MAX_KEYS: u64 = 10_000;

/// How many election timeouts a leader transfer may take before the call gives up waiting.
const TRANSFER_WAIT_ELECTIONS: u32 = 3;

/// The admin service over one NodeGroup. Split and merge run on this node: a node that does
/// not lead the range answers `UNAVAILABLE` with the leader's node (it does not forward, for
/// the same reason the KV service does not: the client knows the addresses, the node only
/// knows raft addresses).
#[derive(Debug, Clone)]
pub struct AdminService {
    node: Arc<NodeGroup>,
    placement: Arc<Placement>,
}

impl AdminService {
    /// A tonic server for `node`, whose scheduler's view and log are `placement`.
    pub fn server(node: Arc<NodeGroup>, placement: Arc<Placement>) -> AdminServer<AdminService> {
        AdminServer::new(AdminService { node, placement })
    }

    /// `desc` as the API shows it, with the leader as this node currently believes it.
    fn info(&self, desc: RangeDescriptor) -> RangeInfo {
        let leader = self
            .node
            .status(desc.id())
            .ok()
            .and_then(|s| s.leader_node)
            .map_or(0, |n| n.0);
        RangeInfo {
            range_id: desc.range_id,
            start_key: desc.start_key,
            end_key: desc.end_key,
            epoch: desc.epoch,
            replicas: desc.replicas,
            leader_node_id: leader,
            merging: desc.merge.is_some(),
            keys: 0,
            bytes: 0,
            size_exact: false,
        }
    }

    /// [`AdminService::info`] with the range's keys and bytes on this node.
    fn info_with_size(&self, desc: RangeDescriptor) -> RangeInfo {
        let size = self
            .node
            .engine()
            .data_size(&desc.start_key, &desc.end_key, MEASURE_MAX_KEYS);
        let mut info = self.info(desc);
        if let Ok(size) = size {
            info.keys = size.keys;
            info.bytes = size.bytes;
            info.size_exact = size.exact;
        }
        info
    }

    /// This node's range table, with each range's size if `sizes`.
    async fn table(&self, sizes: bool) -> Result<Response<RangesResponse>, Status> {
        let this = self.clone();
        // The status walk and the measuring read RocksDB: off the async threads.
        let ranges = tokio::task::spawn_blocking(move || {
            this.node
                .ranges()
                .into_iter()
                .map(|d| {
                    if sizes {
                        this.info_with_size(d)
                    } else {
                        this.info(d)
                    }
                })
                .collect()
        })
        .await
        .map_err(|e| Status::internal(format!("range table: {e}")))?;
        Ok(Response::new(RangesResponse {
            node_id: self.node.node_id().0,
            ranges,
        }))
    }
}

/// Range id 0 is never valid; say so instead of answering "range r0 not found".
fn range_id(id: u64, field: &str) -> Result<RangeId, Status> {
    if id == 0 {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(RangeId(id))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn split(&self, req: Request<SplitRequest>) -> Result<Response<SplitResponse>, Status> {
        let r = req.into_inner();
        let range = match r.range {
            Some(split_request::Range::RangeId(id)) => range_id(id, "range_id")?,
            Some(split_request::Range::RangeKey(k)) => {
                self.node.range_of(&k).map_err(to_status)?.id()
            }
            None => {
                return Err(Status::invalid_argument(
                    "range_id or range_key is required",
                ))
            }
        };
        let split_key = (!r.split_key.is_empty()).then(|| r.split_key.to_vec());
        let (left, right) = self.node.split(range, split_key).await.map_err(to_status)?;
        Ok(Response::new(SplitResponse {
            left: Some(self.info(left)),
            right: Some(self.info(right)),
        }))
    }

    async fn merge(&self, req: Request<MergeRequest>) -> Result<Response<MergeResponse>, Status> {
        let r = req.into_inner();
        let source = range_id(r.source_range_id, "source_range_id")?;
        let target = range_id(r.target_range_id, "target_range_id")?;
        let merged = self.node.merge(source, target).await.map_err(to_status)?;
        Ok(Response::new(MergeResponse {
            merged: Some(self.info(merged)),
        }))
    }

    async fn change_membership(
        &self,
        req: Request<ChangeMembershipRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        use membership_change::Change;
        let r = req.into_inner();
        let range = range_id(r.range_id, "range_id")?;
        let changes = r
            .changes
            .into_iter()
            .map(|c| match c.change {
                Some(Change::AddVoterNode(n)) => Ok(MembershipChange::AddVoter(NodeId(n))),
                Some(Change::AddLearnerNode(n)) => Ok(MembershipChange::AddLearner(NodeId(n))),
                Some(Change::PromoteReplica(id)) => Ok(MembershipChange::Promote(ReplicaId(id))),
                Some(Change::DemoteReplica(id)) => Ok(MembershipChange::Demote(ReplicaId(id))),
                Some(Change::RemoveReplica(id)) => Ok(MembershipChange::Remove(ReplicaId(id))),
                None => Err(Status::invalid_argument(
                    "a membership change needs its kind",
                )),
            })
            .collect::<Result<Vec<_>, Status>>()?;
        if changes.is_empty() {
            return Err(Status::invalid_argument("changes is empty"));
        }
        let desc = self
            .node
            .change_membership(range, changes)
            .await
            .map_err(to_status)?;
        Ok(Response::new(ChangeMembershipResponse {
            range: Some(self.info(desc)),
        }))
    }

    /// Reads each replica's status for its leader: cheap per range, but it walks them all, so
    /// it is for operators and tools, not a per-request routing lookup.
    async fn ranges(
        &self,
        _req: Request<RangesRequest>,
    ) -> Result<Response<RangesResponse>, Status> {
        self.table(false).await
    }

    async fn range_sizes(
        &self,
        _req: Request<RangeSizesRequest>,
    ) -> Result<Response<RangesResponse>, Status> {
        self.table(true).await
    }
    /// Asks this node's replica (the leader) to hand leadership to the replica on
    /// `to_node_id`, then waits until this node sees that replica lead.
    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let r = req.into_inner();
        let range = range_id(r.range_id, "range_id")?;
        if r.to_node_id == 0 {
            return Err(Status::invalid_argument("to_node_id is required"));
        }
        let to = NodeId(r.to_node_id);
        let desc = self
            .node
            .ranges()
            .into_iter()
            .find(|d| d.id() == range)
            .ok_or_else(|| to_status(flotilla_runtime::Error::RangeNotFound(range)))?;
        let replica = desc.replica_on(to).ok_or_else(|| {
            Status::failed_precondition(format!("range {range} has no replica on node {to}"))
        })?;
        let leads = |node: &NodeGroup| {
            node.status(range)
                .ok()
                .is_some_and(|s| s.leader_node == Some(to))
        };
        if !leads(&self.node) {
            self.node
                .transfer_leader(range, ReplicaId(replica.replica_id))
                .await
                .map_err(to_status)?;
        }
        let config = self.node.config();
        let wait = config.tick_interval
            * u32::try_from(config.election_tick).unwrap_or(u32::MAX)
            * TRANSFER_WAIT_ELECTIONS;
        let deadline = tokio::time::Instant::now() + wait;
        while !leads(&self.node) {
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "range {range}: node {to} did not take the leadership within {wait:?}"
                )));
            }
            tokio::time::sleep(
                config
                    .tick_interval
                    .min(std::time::Duration::from_millis(20)),
            )
            .await;
        }
        Ok(Response::new(TransferLeaderResponse {
            range: Some(self.info(desc)),
        }))
    }

    async fn node_status(
        &self,
        _req: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        let node = self.node.clone();
        let s = tokio::task::spawn_blocking(move || node.node_status())
            .await
            .map_err(|e| Status::internal(format!("status: {e}")))?;
        Ok(Response::new(NodeStatusResponse {
            node_id: s.node.0,
            version: env!("CARGO_PKG_VERSION").to_string(),
            replicas: s.replicas as u64,
            ranges: s.ranges as u64,
            leaders: s.leaders as u64,
            awake: s.awake as u64,
            pending_requests: s.pending_requests as u64,
            elections_won: s.elections_won,
        }))
    }

    async fn registry(
        &self,
        _req: Request<RegistryRequest>,
    ) -> Result<Response<RegistryResponse>, Status> {
        let nodes = self
            .node
            .nodes(ReadConsistency::Linearizable)
            .await
            .map_err(to_status)?;
        Ok(Response::new(RegistryResponse { nodes }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let req = req.into_inner();
        for (field, addr) in [
            ("raft_addr", &req.raft_addr),
            ("client_addr", &req.client_addr),
        ] {
            if addr
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            {
                return Err(Status::invalid_argument(format!(
                    "{field} {addr:?} is not host:port"
                )));
            }
        }
        let id = (req.node_id != 0).then_some(NodeId(req.node_id));
        let node = self
            .node
            .register_node(id, req.raft_addr, req.client_addr)
            .await
            .map_err(to_status)?;
        tracing::info!(node = node.node_id, raft = %node.raft_addr, "node joined the registry");
        let nodes = self
            .node
            .nodes(ReadConsistency::Linearizable)
            .await
            .map_err(to_status)?;
        Ok(Response::new(JoinResponse {
            node: Some(node),
            nodes,
        }))
    }

    async fn nodes(&self, _req: Request<NodesRequest>) -> Result<Response<NodesResponse>, Status> {
        let nodes = self
            .placement
            .nodes()
            .into_iter()
            .map(|n| NodeInfo {
                node_id: n.node.0,
                status: match n.standing {
                    Standing::Member => n.state.label(),
                    Standing::Draining => "draining",
                    Standing::Removed => "removed",
                }
                .to_string(),
                liveness: n.state.label().to_string(),
                status_ms: millis(n.state_for),
                stats: n.stats,
                stats_age_ms: n.stats_age.map_or(0, millis),
            })
            .collect();
        Ok(Response::new(NodesResponse {
            node_id: self.node.node_id().0,
            nodes,
        }))
    }

    async fn set_node_state(
        &self,
        req: Request<SetNodeStateRequest>,
    ) -> Result<Response<SetNodeStateResponse>, Status> {
        let req = req.into_inner();
        let state = NodeState::try_from(req.state)
            .map_err(|_| Status::invalid_argument(format!("unknown node state {}", req.state)))?;
        if req.node_id == 0 {
            return Err(Status::invalid_argument("node_id must be non-zero"));
        }
        let node = self
            .node
            .set_node_state(NodeId(req.node_id), state)
            .await
            .map_err(to_status)?;
        Ok(Response::new(SetNodeStateResponse { node: Some(node) }))
    }

    type BackupRangeStream = crate::backup_service::BackupFrames;

    async fn backup_range(
        &self,
        req: Request<BackupRangeRequest>,
    ) -> Result<Response<Self::BackupRangeStream>, Status> {
        crate::backup_service::backup_range(&self.node, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn placement(
        &self,
        _req: Request<PlacementRequest>,
    ) -> Result<Response<PlacementResponse>, Status> {
        let events = self
            .placement
            .events()
            .into_iter()
            .map(|e| PlacementEvent {
                at_unix_ms: e.at.duration_since(std::time::UNIX_EPOCH).map_or(0, millis),
                range_id: e.range.0,
                action: e.action.to_string(),
                detail: e.detail,
                ok: e.outcome.is_ok(),
                error: e.outcome.err().unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(PlacementResponse {
            node_id: self.node.node_id().0,
            enabled: self.placement.enabled(),
            replication_factor: self.placement.replication_factor() as u64,
            moves_in_flight: self.placement.moves_in_flight() as u64,
            events,
        }))
    }

    async fn recovery_report(
        &self,
        req: Request<RecoveryReportRequest>,
    ) -> Result<Response<RecoveryReportResponse>, Status> {
        crate::admin_recover::report(&self.node, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn force_alone(
        &self,
        req: Request<ForceAloneRequest>,
    ) -> Result<Response<ForceAloneResponse>, Status> {
        crate::admin_recover::force_alone(&self.node, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn retire_replica(
        &self,
        req: Request<RetireReplicaRequest>,
    ) -> Result<Response<RetireReplicaResponse>, Status> {
        crate::admin_recover::retire(&self.node, req.into_inner())
            .await
            .map(Response::new)
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
