//! The admin API of a node over gRPC (`flotilla.admin.Admin`): split a range (at a key or its
//! middle), merge two adjacent ranges, change a range's replicas, list this node's range table. It exists so that an
//! operator or a placement process can reshape the key space of a running cluster without
//! linking the runtime; errors go through the one mapping in [`crate::kv_service::to_status`].

use std::sync::Arc;

use flotilla_proto::admin::admin_server::{Admin, AdminServer};
use flotilla_proto::admin::{
    membership_change, split_request, ChangeMembershipRequest, ChangeMembershipResponse,
    MergeRequest, MergeResponse, RangeInfo, RangesRequest, RangesResponse, SplitRequest,
    SplitResponse,
};
use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::{NodeId, RangeId, ReplicaId};
use flotilla_runtime::{MembershipChange, NodeGroup};
use tonic::{Request, Response, Status};

use crate::kv_service::to_status;

/// The admin service over one NodeGroup. Split and merge run on this node: a node that does
/// not lead the range answers `UNAVAILABLE` with the leader's node (it does not forward, for
/// the same reason the KV service does not: the client knows the addresses, the node only
/// knows raft addresses).
#[derive(Debug, Clone)]
pub struct AdminService {
    node: Arc<NodeGroup>,
}

impl AdminService {
    /// A tonic server for `node`.
    pub fn server(node: Arc<NodeGroup>) -> AdminServer<AdminService> {
        AdminServer::new(AdminService { node })
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
        }
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
        let ranges = self
            .node
            .ranges()
            .into_iter()
            .map(|d| self.info(d))
            .collect();
        Ok(Response::new(RangesResponse {
            node_id: self.node.node_id().0,
            ranges,
        }))
    }
}
