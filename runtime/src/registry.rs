//! The node registry and the id counters, as this node reaches them: proposals to the system
//! range through this node's replica of it (a follower forwards them to the leader), and
//! linearizable reads of its records. A node without a replica of the system range (one that
//! joined) gets `SystemUnavailable` here and asks a node that has one (the server does, over
//! the admin API).

use flotilla_proto::command::{system_command, RegisterNode, SetNodeState, SystemCommand};
use flotilla_proto::meta::{NodeRecord, NodeState};
use flotilla_proto::{Message as _, NodeId, RangeId};

use crate::api::ReadConsistency;
use crate::error::{Error, Result};
use crate::node_group::NodeGroup;
use crate::system::is_node_key;

impl NodeGroup {
    /// Whether this node holds a replica of the system range.
    pub fn has_system_replica(&self) -> bool {
        self.shared.cell(RangeId::SYSTEM).is_some()
    }

    /// Runs `cmd` on the system range and returns its answer, retrying while the system range
    /// has no leader (just started, electing) until the proposal timeout.
    ///
    /// # Errors
    ///
    /// `SystemUnavailable` if this node holds no replica of it or it did not answer in time;
    /// the command's own refusal (`AdminRefused`, `InvalidCommand`); `Stopped`.
    pub(crate) async fn system_call(&self, cmd: SystemCommand) -> Result<Vec<u8>> {
        let s = &self.shared;
        let deadline = std::time::Instant::now() + s.config.proposal_timeout;
        loop {
            let rx = s.propose_system(cmd.clone())?;
            match rx.await.unwrap_or(Err(Error::Stopped)) {
                Ok(answer) => return Ok(answer),
                Err(e @ (Error::AdminRefused(_) | Error::InvalidCommand(_) | Error::Stopped)) => {
                    return Err(e)
                }
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(Error::SystemUnavailable(e.to_string()))
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }

    /// Records a node in the registry: with `node` `None`, a new node (it gets a new id,
    /// never used before; a retry with the same raft address gets the same one); with an id,
    /// that node's addresses are updated (a removed node is refused).
    ///
    /// # Errors
    ///
    /// As [`NodeGroup::system_call`]; `AdminRefused` for a removed or unknown node id.
    pub async fn register_node(
        &self,
        node: Option<NodeId>,
        raft_addr: String,
        client_addr: String,
    ) -> Result<NodeRecord> {
        let answer = self
            .system_call(SystemCommand {
                cmd: Some(system_command::Cmd::RegisterNode(RegisterNode {
                    node_id: node.map_or(0, |n| n.0),
                    raft_addr,
                    client_addr,
                })),
            })
            .await?;
        decode_record(&answer)
    }

    /// Moves `node` to `state` in the registry (`Removed` is final).
    ///
    /// # Errors
    ///
    /// As [`NodeGroup::system_call`]; `AdminRefused` for an unknown node or one already
    /// removed.
    pub async fn set_node_state(&self, node: NodeId, state: NodeState) -> Result<NodeRecord> {
        let answer = self
            .system_call(SystemCommand {
                cmd: Some(system_command::Cmd::SetNodeState(SetNodeState {
                    node_id: node.0,
                    state: state as i32,
                })),
            })
            .await?;
        decode_record(&answer)
    }

    /// Every node of the registry, by id, read from this node's replica of the system range
    /// at `consistency` (`Stale`: what it applied, without waking the group; enough to learn
    /// addresses).
    ///
    /// # Errors
    ///
    /// `SystemUnavailable` if this node holds no replica of the system range or its read
    /// cannot be confirmed; a store failure.
    pub async fn nodes(&self, consistency: ReadConsistency) -> Result<Vec<NodeRecord>> {
        if !self.has_system_replica() {
            return Err(Error::SystemUnavailable(format!(
                "{} holds no replica of the system range",
                self.shared.node
            )));
        }
        self.read_barrier(RangeId::SYSTEM, consistency)
            .await
            .map_err(|e| match e {
                Error::Stopped => Error::Stopped,
                e => Error::SystemUnavailable(e.to_string()),
            })?;
        let records = self
            .shared
            .engine
            .system_records()
            .map_err(|e| Error::Store(std::sync::Arc::new(e)))?;
        records
            .into_iter()
            .filter(|(name, _)| is_node_key(name))
            .map(|(_, v)| decode_record(&v))
            .collect()
    }
}

fn decode_record(bytes: &[u8]) -> Result<NodeRecord> {
    NodeRecord::decode(bytes).map_err(|e| Error::BadAnswer {
        what: "node record",
        reason: e.to_string(),
    })
}
