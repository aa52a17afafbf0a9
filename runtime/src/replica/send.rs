//! Messages to other nodes: raft's messages become our envelopes in the round's outbox, per
//! destination node. Heartbeats (and their responses) become compact coalesced entries that
//! the ticker sends once per tick per node pair; messages that may reach a node without the
//! group carry what its receiver needs to check membership before creating a replica.

use flotilla_proto::meta::ReplicaDescriptor;
use flotilla_proto::transport::{Heartbeat, RaftMessage};
use prost_raft::Message as _;
use raft::prelude::{Message, MessageType};

use super::{Env, Output, PeerMsg, Replica};

/// Heartbeat intervals after entries went to a follower within which its empty appends are
/// not sent (see [`Replica::redundant_empty_append`]): four, 800 ms at the default 100 ms
/// ticks and heartbeats every two, long enough for an append's round trip on a loaded
/// machine and shorter than the election timeout (ten ticks).
const ENTRIES_IN_FLIGHT_INTERVALS: u32 = 4;
const ENTRIES_IN_FLIGHT_MASK: u8 = (1 << ENTRIES_IN_FLIGHT_INTERVALS) - 1;

impl Replica {
    /// Turns raft messages into our envelopes in the round's outbox, per destination node.
    pub(super) fn send_raft(&mut self, mut msgs: Vec<Message>, env: &Env<'_>, out: &mut Output) {
        let before = msgs.len();
        msgs.retain(|m| !self.redundant_empty_append(m, env));
        let dropped = before - msgs.len();
        if dropped > 0 {
            metrics::counter!("flotilla_runtime_empty_appends_skipped_total")
                .increment(dropped as u64);
        }
        let broadcast = self.note_appends(&msgs, env);
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
            if broadcast
                && m.get_msg_type() == MessageType::MsgHeartbeat
                && m.context.is_empty()
                && self
                    .appended_to
                    .iter()
                    .any(|&(to, commit)| to == m.to && commit >= m.commit)
            {
                metrics::counter!("flotilla_runtime_heartbeats_skipped_total").increment(1);
                continue;
            }
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
        if broadcast {
            // The next heartbeat interval starts with no append sent; entries sent in the
            // interval that ends become the previous interval's.
            self.appended_to.clear();
            self.entries_to.retain_mut(|(_, ages)| {
                *ages = (*ages << 1) & ENTRIES_IN_FLIGHT_MASK;
                *ages != 0
            });
        }
    }
}

impl Replica {
    /// Notes the followers `msgs` sends an append (with the commit it carries) and answers
    /// whether `msgs` holds a heartbeat broadcast, in which the plain heartbeats to them are
    /// skipped (the caller clears the notes after sending it): to followers this leader sent
    /// an append since its previous broadcast, or sends one in `msgs` itself, that carried
    /// at least the heartbeat's commit. Such an append did what the heartbeat would: reset
    /// the follower's election timer and tell it the commit. And a heartbeat answered by a
    /// follower that has entries in flight makes raft-rs send it one more, empty, append: on
    /// a busy group each heartbeat interval cost four messages per follower for nothing. A
    /// heartbeat that would tell a newer commit (the last append went out before its entries
    /// committed, and no append since) is sent: followers learn commits as soon as before.
    ///
    /// Nothing else a heartbeat does is lost. A heartbeat with a context (a read-index
    /// confirmation) is always sent. A follower raft probes (paused after one append) gets
    /// no append until a heartbeat answers, so its next heartbeat goes out: at most one
    /// interval later than raft would send it. Check-quorum counts append responses as
    /// activity like heartbeat responses. Lease reads run on read-index confirmations (see
    /// `read`), not on heartbeats.
    fn note_appends(&mut self, msgs: &[Message], env: &Env<'_>) -> bool {
        if !env.config.skip_heartbeats_after_append
            || self.raw.raft.state != raft::StateRole::Leader
        {
            self.appended_to.clear();
            self.entries_to.clear();
            return false;
        }
        let mut broadcast = false;
        for m in msgs {
            match m.get_msg_type() {
                MessageType::MsgAppend => {
                    match self.appended_to.iter_mut().find(|(to, _)| *to == m.to) {
                        Some((_, commit)) => *commit = (*commit).max(m.commit),
                        None => self.appended_to.push((m.to, m.commit)),
                    }
                    if !m.entries.is_empty() {
                        match self.entries_to.iter_mut().find(|(to, _)| *to == m.to) {
                            Some((_, ages)) => *ages |= 1,
                            None => self.entries_to.push((m.to, 1)),
                        }
                    }
                }
                MessageType::MsgHeartbeat => broadcast = true,
                _ => {}
            }
        }
        broadcast
    }
}

impl Replica {
    /// Whether `m` is an empty append raft-rs sends a follower only because the follower
    /// answered a heartbeat while entries this leader sent it lately (in the last
    /// `ENTRIES_IN_FLIGHT_INTERVALS` heartbeat intervals) may still be on their way. Such an
    /// append asks for an acknowledgement the entries in flight bring anyway: on a group with
    /// a proposal in flight most of the time, it was an append and a response per follower
    /// per heartbeat interval for nothing, half of a lightly loaded group's appends.
    ///
    /// What it would do is done otherwise. It is raft's way to find entries lost on the way:
    /// once no entries went to the follower for that many intervals the empty append goes
    /// out again (the follower rejects it, and raft probes and resends), so a loss costs at
    /// most that many intervals more (under the election timeout at the defaults). It
    /// carries the commit: the follower learns it with the next append or heartbeat (a
    /// heartbeat that tells a newer commit is never skipped), except while raft broadcasts
    /// commits: while a follower waits on one ([`Replica::urge_commit`]) or a membership
    /// change is pending (a removed follower hears the commit of its removal only so), nothing
    /// is dropped. A probing follower's empty append is its probe, and is sent.
    fn redundant_empty_append(&self, m: &Message, env: &Env<'_>) -> bool {
        if m.get_msg_type() != MessageType::MsgAppend
            || !m.entries.is_empty()
            || !env.config.skip_heartbeats_after_append
            || self.raw.raft.should_bcast_commit()
            || self.raw.raft.state != raft::StateRole::Leader
        {
            return false;
        }
        let replicating = self
            .raw
            .raft
            .prs()
            .get(m.to)
            .is_some_and(|pr| pr.state == raft::ProgressState::Replicate);
        replicating && self.entries_to.iter().any(|&(to, _)| to == m.to)
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
