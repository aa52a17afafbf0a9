//! The client KV API of a node over gRPC, and the one mapping from runtime errors to
//! `tonic::Status`.

use std::sync::Arc;

use flotilla_proto::kv::kv_server::{Kv, KvServer};
use flotilla_proto::kv::{
    GetRequest, GetResponse, PutRequest, PutResponse, StatusRequest, StatusResponse,
};
use flotilla_proto::NodeId;
use flotilla_runtime::{Error, NodeGroup, ProposeOptions, ReadConsistency};
use tonic::{Request, Response, Status};

/// The response metadata key that names the leader's node id (decimal) on a `NotLeader`
/// status, so that a client can retry on that node without parsing the message.
pub const LEADER_NODE_METADATA: &str = "flotilla-leader-node";

/// Maps a runtime error to a gRPC status. Retryable conditions (leader changes, back-pressure,
/// outcome unknown, a range that changed shape) are `UNAVAILABLE` or `ABORTED`, so that
/// clients retry; the leader hint, when known, is in the message and, for a client to read,
/// in the [`LEADER_NODE_METADATA`] metadata (see [`leader_hint`]).
pub fn to_status(e: Error) -> Status {
    match e {
        Error::NotLeader { leader_hint, .. } => {
            let mut status = Status::unavailable(e.to_string());
            if let Some(node) = leader_hint {
                status
                    .metadata_mut()
                    .insert(LEADER_NODE_METADATA, node.0.into());
            }
            status
        }
        Error::ProposalDropped | Error::Busy(_) | Error::Stopped => {
            Status::unavailable(e.to_string())
        }
        Error::EpochNotMatch { .. } => Status::aborted(e.to_string()),
        Error::KeyNotInRange { .. } | Error::RangeNotFound(_) => Status::not_found(e.to_string()),
        Error::ProposalTooLarge { .. } | Error::InvalidCommand(_) => {
            Status::invalid_argument(e.to_string())
        }
        Error::AdminRefused(_) => Status::failed_precondition(e.to_string()),
        Error::Config(_)
        | Error::Store(_)
        | Error::BadSnapshot { .. }
        | Error::RaftInit { .. }
        | Error::Spawn { .. }
        | Error::BadAnswer { .. }
        | Error::ReplicaFailed(_) => Status::internal(e.with_sources()),
    }
}

/// The leader's node named by a status from [`to_status`], if it carries one.
pub fn leader_hint(status: &Status) -> Option<NodeId> {
    let v = status.metadata().get(LEADER_NODE_METADATA)?;
    v.to_str().ok()?.parse().ok().map(NodeId)
}

/// The KV service over one NodeGroup.
#[derive(Debug, Clone)]
pub struct KvService {
    node: Arc<NodeGroup>,
}

impl KvService {
    /// A tonic server for `node`.
    pub fn server(node: Arc<NodeGroup>) -> KvServer<KvService> {
        KvServer::new(KvService { node })
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let r = req.into_inner();
        let opts = ProposeOptions {
            request_id: (r.client_id != 0).then_some((r.client_id, r.seq)),
            epoch: None,
        };
        let cmd = flotilla_proto::command::KvRequest {
            op: Some(flotilla_proto::command::kv_request::Op::Put(
                flotilla_proto::command::Put {
                    key: r.key,
                    value: r.value,
                },
            )),
        };
        self.node.kv(cmd, opts).await.map_err(to_status)?;
        Ok(Response::new(PutResponse {}))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let r = req.into_inner();
        let consistency = if r.stale {
            ReadConsistency::Stale
        } else {
            ReadConsistency::Linearizable
        };
        let v = self
            .node
            .get(&r.key, consistency)
            .await
            .map_err(to_status)?;
        Ok(Response::new(GetResponse {
            found: v.is_some(),
            value: v.unwrap_or_default().into(),
        }))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = self.node.node_status();
        Ok(Response::new(StatusResponse {
            node_id: s.node.0,
            replicas: s.replicas as u64,
            ranges: s.ranges as u64,
            leaders: s.leaders as u64,
            awake: s.awake as u64,
            elections_won: s.elections_won,
            heartbeat_batches: s.heartbeat_batches,
            queued_wakes: s.queued_wakes as u64,
        }))
    }
}
