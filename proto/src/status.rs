//! How a [`KvError`] travels on a unary call: as the details of a gRPC status (a
//! `google.rpc.Status` holding it as an `Any`, the standard place), with the gRPC code its kind
//! maps to and, for `NOT_LEADER`, the leader's node in the [`LEADER_NODE_METADATA`] metadata.
//! The node's services build statuses with [`KvError::to_status`]; clients read them back
//! with [`KvError::from_status`].

use prost::Message as _;

use crate::kv::{kv_error::Kind, AnyDetail, KvError, StatusDetails};

/// The response metadata key that names the leader's node id (decimal) on a `NOT_LEADER`
/// status, so that a client can retry on that node without decoding the details.
pub const LEADER_NODE_METADATA: &str = "flotilla-leader-node";

impl KvError {
    /// The type URL of a `KvError` inside a status's details.
    pub const TYPE_URL: &'static str = "type.googleapis.com/flotilla.kv.KvError";

    /// The gRPC code of this error's kind: `UNAVAILABLE` and `ABORTED` are worth a retry
    /// (elsewhere or later), `NOT_FOUND` a new lookup, the others are final.
    pub fn grpc_code(&self) -> tonic::Code {
        match self.kind() {
            Kind::NotLeader | Kind::ProposalDropped | Kind::Busy | Kind::Stopped => {
                tonic::Code::Unavailable
            }
            Kind::EpochNotMatch => tonic::Code::Aborted,
            Kind::KeyNotInRange | Kind::RangeNotFound => tonic::Code::NotFound,
            Kind::InvalidArgument => tonic::Code::InvalidArgument,
            Kind::Refused => tonic::Code::FailedPrecondition,
            Kind::Internal | Kind::Unspecified => tonic::Code::Internal,
        }
    }

    /// The status a unary call fails with.
    pub fn to_status(&self) -> tonic::Status {
        let code = self.grpc_code();
        let details = StatusDetails {
            code: code as i32,
            message: self.message.clone(),
            details: vec![AnyDetail {
                type_url: Self::TYPE_URL.into(),
                value: self.encode_to_vec().into(),
            }],
        };
        let mut status =
            tonic::Status::with_details(code, self.message.clone(), details.encode_to_vec().into());
        if self.kind() == Kind::NotLeader && self.leader_node_id != 0 {
            status
                .metadata_mut()
                .insert(LEADER_NODE_METADATA, self.leader_node_id.into());
        }
        status
    }

    /// The error a status from [`KvError::to_status`] carries; `None` for any other status
    /// (one from the gRPC stack itself: a connection failure, a deadline).
    pub fn from_status(status: &tonic::Status) -> Option<KvError> {
        let details = StatusDetails::decode(status.details()).ok()?;
        let any = details
            .details
            .into_iter()
            .find(|d| d.type_url == Self::TYPE_URL)?;
        KvError::decode(&any.value[..]).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kv_error_survives_a_status() {
        let e = KvError {
            kind: Kind::NotLeader as i32,
            message: "not the leader".into(),
            range_id: 4,
            leader_node_id: 2,
            current: vec![],
        };
        let status = e.to_status();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(KvError::from_status(&status), Some(e));
        assert_eq!(status.metadata().get(LEADER_NODE_METADATA).unwrap(), "2");
        assert_eq!(KvError::from_status(&tonic::Status::unavailable("x")), None);
    }
}
