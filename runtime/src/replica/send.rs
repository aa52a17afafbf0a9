//! Messages to other nodes: raft's messages become our envelopes in the round's outbox, per
//! destination node. Heartbeats (and their responses) become compact coalesced entries that
//! the ticker sends once per tick per node pair; messages that may reach a node without the
//! group carry what its receiver needs to check membership before creating a replica.

use flotilla_proto::meta::ReplicaDescriptor;
use flotilla_proto::transport::{Heartbeat, RaftMessage};
use prost_raft::Message as _;
use raft::prelude::{Message, MessageType};

use super::{Env, Output, PeerMsg, Replica};

impl Replica {
    /// Turns raft messages into our envelopes in the round's outbox, per destination node.
    pub(super) fn send_raft(&mut self, msgs: Vec<Message>, env: &Env<'_>, out: &mut Output) {
        let desc = self.descriptor();
        let (epoch, start, end) = match desc {
            Some(d) => (d.epoch, d.start_key.clone(), d.end_key.clone()),
            None => (None, Default::default(), Default::default()),
        };
        let from = ReplicaDescriptor {
            replica_id: self.id,
            node_id: self.node.0,
            role: 0,
        };
        for m in msgs {
            let Some(node) = self.node_of(m.to) else {
                metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "unknown_peer")
                    .increment(1);
                continue;
            };
            let msg_type = m.get_msg_type();
            // A follower that never acknowledged anything to this leader may not have a
            // replica of the group yet (e.g. it missed the split that created it and gets the
            // parent by snapshot): a coalesced heartbeat carries no key range and cannot create
            // one, and a probing leader sends its next append only on a heartbeat response, so
            // such heartbeats go as full messages, which can.
            let never_acked = self
                .raw
                .raft
                .prs()
                .get(m.to)
                .is_some_and(|pr| pr.matched == 0);
            let maybe_uncreated = msg_type == MessageType::MsgHeartbeat && never_acked;
            if env.config.coalesce_heartbeats
                && !maybe_uncreated
                && matches!(
                    msg_type,
                    MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse
                )
            {
                // Carried as a compact entry of the node pair's batch; term and commit are the
                // real message's, so the receiver rebuilds exactly what raft sent.
                out.push_heartbeat(
                    node,
                    Heartbeat {
                        range_id: self.range.0,
                        from_replica: self.id,
                        to_replica: m.to,
                        term: m.term,
                        commit: m.commit,
                        response: msg_type == MessageType::MsgHeartbeatResponse,
                        context: m.context.into(),
                        hibernate: false,
                    },
                );
                continue;
            }
            let is_snapshot = msg_type == MessageType::MsgSnapshot;
            let to = ReplicaDescriptor {
                replica_id: m.to,
                node_id: node.0,
                role: 0,
            };
            // What a receiver without the group needs to check membership (see maybe_create).
            let may_create = match msg_type {
                MessageType::MsgSnapshot
                | MessageType::MsgRequestVote
                | MessageType::MsgRequestPreVote => true,
                MessageType::MsgAppend | MessageType::MsgHeartbeat => never_acked,
                _ => false,
            };
            let replicas = match (may_create, desc) {
                (true, Some(d)) => d.replicas.clone(),
                _ => Vec::new(),
            };
            let envelope = RaftMessage {
                range_id: self.range.0,
                from: Some(from),
                to: Some(to),
                epoch,
                start_key: start.clone(),
                end_key: end.clone(),
                message: m.encode_to_vec().into(),
                snapshot: is_snapshot,
                replicas,
            };
            out.push_message(node, envelope, is_snapshot, self.range, m.to);
        }
    }
}

/// The raft message a coalesced heartbeat stands for: the inverse of the coalescing above. Term
/// and commit are the real message's, so the receiver steps exactly what raft sent.
pub(crate) fn heartbeat_message(hb: &Heartbeat) -> Message {
    let mut msg = Message::default();
    msg.set_msg_type(if hb.response {
        MessageType::MsgHeartbeatResponse
    } else {
        MessageType::MsgHeartbeat
    });
    msg.from = hb.from_replica;
    msg.to = hb.to_replica;
    msg.term = hb.term;
    msg.commit = hb.commit;
    msg.context = hb.context.to_vec();
    msg
}

/// What a coalesced heartbeat entry from `from` asks of its addressee: the raft message it
/// stands for; or, with the hibernate flag, a leader's sleep notice, or a follower's poke (a
/// flagged response), which only wakes the addressee (see `hibernate`).
pub(crate) fn heartbeat_input(hb: &Heartbeat, from: ReplicaDescriptor) -> PeerMsg {
    match (hb.hibernate, hb.response) {
        (true, false) => PeerMsg::Sleep {
            from,
            term: hb.term,
            commit: hb.commit,
        },
        (true, true) => PeerMsg::Wake,
        (false, _) => PeerMsg::Raft {
            msg: Box::new(heartbeat_message(hb)),
            from,
            // A heartbeat carries no epoch: its sender must be a member we know of.
            from_conf_ver: 0,
        },
    }
}
