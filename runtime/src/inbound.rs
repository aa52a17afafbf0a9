//! The inbound side of the transport: what a NodeGroup does with each batch that arrives from
//! another node. It runs on the transport's delivery thread, whose contract says it must not
//! block, so it only decodes, checks and queues: heartbeats are rebuilt into the raft messages
//! they stand for, every message is checked before it can reach raft (addressing, membership,
//! tombstones, overlaps), and a message that may create a replica creates it in memory only
//! (`fsm::life::create_by_message`); its placeholder is written by its first worker round.

use std::sync::Arc;

use flotilla_proto::meta::{ReplicaDescriptor, ReplicaRole};
use flotilla_proto::transport::{Heartbeat, NodeBatch, RaftMessage};
use flotilla_proto::RangeId;
use flotilla_transport::{BatchHandler, SnapshotReport};
use prost_raft::Message as _;
use raft::prelude::MessageType;

use crate::fsm::life;
use crate::fsm::mailbox::ReplicaCell;
use crate::fsm::shared::Shared;
use crate::replica::{heartbeat_input, PeerMsg};

/// What the transport calls with each batch that arrives for this node, and with the outcome
/// of each snapshot it streamed for a replica of this node.
pub(crate) struct Inbound(pub(crate) Arc<Shared>);

impl BatchHandler for Inbound {
    /// Hands the outcome to the sending replica, whose raft then leaves the follower's
    /// Snapshot state (a failure makes it send a new snapshot later). Queued regardless of
    /// the mailbox capacity, as the worker does: a lost report would leave the follower
    /// waiting for a snapshot forever.
    fn on_snapshot_status(&self, report: SnapshotReport) {
        if let Some(cell) = self.0.cell(report.range) {
            let msg = PeerMsg::SnapshotStatus {
                to: report.to_replica.0,
                ok: report.ok,
            };
            let _ = cell.send(msg, usize::MAX, &self.0.ready_tx);
        }
    }

    fn on_batch(&self, batch: NodeBatch) {
        let shared = &self.0;
        if batch.to_node != shared.node.0 {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "wrong_node")
                .increment(batch.messages.len() as u64);
            return;
        }
        let from_node = batch.from_node;
        for hb in batch.heartbeats {
            self.on_heartbeat(from_node, hb);
        }
        for env in batch.messages {
            let msg = match raft::prelude::Message::decode(&env.message[..]) {
                Ok(m) => m,
                Err(_) => {
                    metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "undecodable")
                        .increment(1);
                    continue;
                }
            };
            let (Some(from), Some(to)) = (env.from, env.to) else {
                metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "no_endpoints")
                    .increment(1);
                continue;
            };
            if to.node_id != shared.node.0 || msg.to != to.replica_id || msg.from != from.replica_id
            {
                metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "inconsistent")
                    .increment(1);
                continue;
            }
            let range = RangeId(env.range_id);
            let cell = match shared.cell(range) {
                Some(c) => c,
                None => match self.maybe_create(&env, from_node, msg.get_msg_type()) {
                    Some(c) => c,
                    None => continue,
                },
            };
            let from_conf_ver = env.epoch.unwrap_or_default().conf_ver;
            let pm = PeerMsg::Raft {
                msg: Box::new(msg),
                from,
                from_conf_ver,
            };
            if cell
                .send(pm, shared.config.mailbox_capacity, &shared.ready_tx)
                .is_err()
            {
                // raft retransmits; dropping under overload is its flow control.
                metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "mailbox_full")
                    .increment(1);
            }
        }
    }
}

impl Inbound {
    /// Rebuilds the raft message a coalesced heartbeat stands for and queues it. Heartbeats
    /// never create replicas (they carry no key range): the leader's appends do.
    fn on_heartbeat(&self, from_node: u64, hb: Heartbeat) {
        let Some(cell) = self.0.cell(RangeId(hb.range_id)) else {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "heartbeat_unknown_group")
                .increment(1);
            return;
        };
        let from = ReplicaDescriptor {
            replica_id: hb.from_replica,
            node_id: from_node,
            role: ReplicaRole::Voter as i32,
        };
        let pm = heartbeat_input(&hb, from);
        if cell
            .send(pm, self.0.config.mailbox_capacity, &self.0.ready_tx)
            .is_err()
        {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "mailbox_full")
                .increment(1);
        }
    }

    /// Creates an uninitialized replica for a message addressed to a group this node does not
    /// host yet, if the message may create one.
    fn maybe_create(
        &self,
        env: &RaftMessage,
        from_node: u64,
        msg_type: MessageType,
    ) -> Option<Arc<ReplicaCell>> {
        let range = RangeId(env.range_id);
        let to = env.to?;
        // Only messages a leader or candidate sends to a (possibly new) member may create it.
        if !matches!(
            msg_type,
            MessageType::MsgAppend
                | MessageType::MsgHeartbeat
                | MessageType::MsgSnapshot
                | MessageType::MsgRequestVote
                | MessageType::MsgRequestPreVote
        ) {
            return None;
        }
        // As TiKV: only a current member may create a replica here, and only of a member on
        // this node. The sender vouches with its descriptor, and must live on the node the
        // batch came from.
        let from = env.from?;
        let member = |id: u64, node: u64| {
            env.replicas
                .iter()
                .any(|r| r.replica_id == id && r.node_id == node)
        };
        if !member(from.replica_id, from_node) || !member(to.replica_id, self.0.node.0) {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "not_member")
                .increment(1);
            return None;
        }
        let conf_ver = env.epoch.unwrap_or_default().conf_ver;
        if let Some(t) = self.0.tombstones.get(&range.0) {
            if conf_ver <= *t {
                metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "tombstone")
                    .increment(1);
                return None;
            }
        }
        // A replica whose keys overlap a range this node already serves will be created by that
        // range's split, not by a message: creating it here would conflict (tikv#17535).
        // The system range has no keys: no split ever creates it, so a message may (a node
        // added to its membership).
        let overlaps = !range.is_system()
            && self
                .0
                .router
                .overlapping(&env.start_key, &env.end_key)
                .into_iter()
                .any(|d| d.range_id != range.0);
        if overlaps {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "overlap")
                .increment(1);
            return None;
        }
        life::create_by_message(&self.0, range, to.replica_id)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use flotilla_proto::meta::{RangeEpoch, ReplicaDescriptor};
    use flotilla_proto::transport::{NodeBatch, RaftMessage};
    use flotilla_proto::RangeId;
    use flotilla_store::{Engine, StoreConfig};
    use flotilla_transport::BatchHandler;
    use prost_raft::Message as _;
    use raft::prelude::MessageType;

    use super::Inbound;
    use crate::config::NodeGroupConfig;
    use crate::fsm::shared::Shared;
    use crate::state_machine::KvStateMachine;

    fn vote_for_new_group() -> NodeBatch {
        let mut msg = raft::prelude::Message::default();
        msg.set_msg_type(MessageType::MsgRequestVote);
        msg.from = 2;
        msg.to = 1;
        msg.term = 6;
        let member = |id: u64| ReplicaDescriptor {
            replica_id: id,
            node_id: id,
            role: 0,
        };
        NodeBatch {
            from_node: 2,
            to_node: 1,
            messages: vec![RaftMessage {
                range_id: 5,
                from: Some(member(2)),
                to: Some(member(1)),
                epoch: Some(RangeEpoch {
                    conf_ver: 1,
                    version: 1,
                }),
                start_key: b"a".to_vec().into(),
                end_key: b"b".to_vec().into(),
                message: msg.encode_to_vec().into(),
                snapshot: false,
                replicas: vec![member(1), member(2)],
            }],
            heartbeats: Vec::new(),
            stats: None,
        }
    }

    /// The delivery thread must not block: a replica created by a message exists at once,
    /// but its placeholder reaches the disk with its first worker round, not here.
    #[test]
    fn creating_a_replica_by_message_does_no_io_on_the_delivery_thread() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), StoreConfig::default()).unwrap();
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared::new(
            NodeGroupConfig::new(1),
            engine.clone(),
            Arc::new(KvStateMachine),
            ready_tx,
        ));
        Inbound(shared.clone()).on_batch(vote_for_new_group());
        let cell = shared.cell(RangeId(5)).expect("replica created");
        assert!(
            engine.descriptor(RangeId(5)).unwrap().is_none(),
            "the delivery thread wrote the placeholder"
        );
        // The replica is queued for a worker with the vote in its mailbox.
        let queued = ready_rx.try_recv().expect("scheduled");
        assert!(Arc::ptr_eq(&queued, &cell));
    }

    #[test]
    fn a_message_from_a_non_member_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), StoreConfig::default()).unwrap();
        let (ready_tx, _ready_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared::new(
            NodeGroupConfig::new(1),
            engine,
            Arc::new(KvStateMachine),
            ready_tx,
        ));
        let mut batch = vote_for_new_group();
        batch.messages[0].replicas.retain(|r| r.replica_id != 2);
        Inbound(shared.clone()).on_batch(batch);
        assert!(shared.cell(RangeId(5)).is_none());
    }
}
