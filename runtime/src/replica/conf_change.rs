//! Membership changes: add voter, add learner, promote, demote, remove — one at a time as a
//! simple change, several at once through joint consensus (ConfChangeV2, auto-leave).
//!
//! Replica ids come from the descriptor's `next_replica_id`, which only grows, so an id is
//! never reused after its replica is removed. raft-rs allows one membership change in flight;
//! a second one is refused up front instead of being silently turned into a no-op by raft.

use flotilla_proto::command::{ConfChangeContext, RequestHeader};
use flotilla_proto::meta::{RangeDescriptor, ReplicaDescriptor, ReplicaRole};
use flotilla_proto::Message as _;
use prost_raft::Message as _;
use raft::prelude::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Entry,
    EntryType,
};

use super::{Effect, Env, Output, Replica};
use crate::api::MembershipChange;
use crate::error::Error;

impl Replica {
    pub(super) fn propose_conf_change(
        &mut self,
        token: u64,
        changes: Vec<MembershipChange>,
        env: &Env<'_>,
        out: &mut Output,
    ) {
        match self.build_conf_change(token, &changes, env) {
            Ok((cc, ctx)) => {
                if let Err(e) = self.raw.propose_conf_change(ctx, cc) {
                    out.complete(token, Err(Error::AdminRefused(e.to_string())));
                }
            }
            Err(e) => out.complete(token, Err(e)),
        }
    }

    fn build_conf_change(
        &self,
        token: u64,
        changes: &[MembershipChange],
        env: &Env<'_>,
    ) -> Result<(ConfChangeV2, Vec<u8>), Error> {
        if !self.is_leader() {
            return Err(Error::NotLeader {
                range: self.range,
                leader_hint: self.leader_hint(),
            });
        }
        if self.merge_state().is_some() {
            return Err(Error::Busy("range is being merged; retry shortly"));
        }
        if changes.is_empty() {
            return Err(Error::AdminRefused("no membership change given".into()));
        }
        if self.raw.raft.has_pending_conf()
            || !self.raw.store().conf_state().voters_outgoing.is_empty()
        {
            return Err(Error::AdminRefused(
                "a membership change is already in progress".into(),
            ));
        }
        let desc = self
            .descriptor()
            .ok_or_else(|| Error::AdminRefused("range is not initialized".into()))?;
        let mut next_id = next_replica_id(desc);
        let mut singles = Vec::new();
        let mut added = Vec::new();
        let find = |id: u64| desc.replicas.iter().find(|r| r.replica_id == id);
        for c in changes {
            let (kind, id) = match *c {
                MembershipChange::AddVoter(node) | MembershipChange::AddLearner(node) => {
                    if desc.replica_on(node).is_some()
                        || added
                            .iter()
                            .any(|r: &ReplicaDescriptor| r.node_id == node.0)
                    {
                        return Err(Error::AdminRefused(format!(
                            "node {node} already hosts a replica of range {}",
                            self.range
                        )));
                    }
                    let voter = matches!(c, MembershipChange::AddVoter(_));
                    let id = next_id;
                    next_id += 1;
                    added.push(ReplicaDescriptor {
                        replica_id: id,
                        node_id: node.0,
                        role: if voter {
                            ReplicaRole::Voter
                        } else {
                            ReplicaRole::Learner
                        } as i32,
                    });
                    let kind = if voter {
                        ConfChangeType::AddNode
                    } else {
                        ConfChangeType::AddLearnerNode
                    };
                    (kind, id)
                }
                MembershipChange::Promote(id) => match find(id.0) {
                    Some(r) if r.role == ReplicaRole::Learner as i32 => {
                        (ConfChangeType::AddNode, id.0)
                    }
                    _ => return Err(Error::AdminRefused(format!("{id} is not a learner"))),
                },
                MembershipChange::Demote(id) => match find(id.0) {
                    Some(r) if r.role == ReplicaRole::Voter as i32 => {
                        (ConfChangeType::AddLearnerNode, id.0)
                    }
                    _ => return Err(Error::AdminRefused(format!("{id} is not a voter"))),
                },
                MembershipChange::Remove(id) => match find(id.0) {
                    Some(_) => (ConfChangeType::RemoveNode, id.0),
                    None => return Err(Error::AdminRefused(format!("{id} is not a member"))),
                },
            };
            let mut s = ConfChangeSingle::default();
            s.set_change_type(kind);
            s.node_id = id;
            singles.push(s);
        }
        let mut cc = ConfChangeV2::default();
        cc.set_transition(ConfChangeTransition::Auto);
        cc.changes = singles;
        let ctx = ConfChangeContext {
            header: Some(RequestHeader {
                range_id: self.range.0,
                proposer_node: env.node.0,
                proposal_token: token,
                ..Default::default()
            }),
            replicas: added,
        };
        Ok((cc, ctx.encode_to_vec()))
    }

    /// Applies a committed membership change entry: raft's conf state, then our descriptor,
    /// both into the apply batch.
    pub(super) fn apply_conf_change_entry(
        &mut self,
        e: &Entry,
        env: &Env<'_>,
        out: &mut Output,
        batch: &mut flotilla_store::WriteBatch,
    ) {
        // Our context rides in the entry's context (raft-rs's `propose_conf_change` puts it
        // there), not in the conf change's own.
        let decoded = if e.get_entry_type() == EntryType::EntryConfChange {
            raft::prelude::ConfChange::decode(&e.data[..]).map(raft_proto::ConfChangeI::into_v2)
        } else {
            ConfChangeV2::decode(&e.data[..])
        };
        let cc = match decoded {
            Ok(v) => v,
            Err(err) => {
                tracing::error!(range = %self.range, index = e.index, "undecodable conf change: {err}");
                return;
            }
        };
        let ctx = ConfChangeContext::decode(&e.context[..]).unwrap_or_default();
        let token = ctx
            .header
            .as_ref()
            .filter(|h| h.proposer_node == env.node.0)
            .map(|h| h.proposal_token);
        if self.merge_state().is_some() {
            // A merge source is frozen at its prepare entry: the change is skipped on every
            // replica alike (raft's configuration stays as it was).
            if let Some(t) = token {
                out.complete(t, Err(Error::Busy("range is being merged; retry shortly")));
            }
            return;
        }
        match self.raw.apply_conf_change(&cc) {
            Ok(cs) => {
                let Some(old) = self.descriptor().cloned() else {
                    return;
                };
                let desc = descriptor_after(&old, &cs, &ctx.replicas);
                self.removed = !desc.replicas.iter().any(|r| r.replica_id == self.id);
                let store = self.raw.mut_store();
                store.set_conf_state(cs, batch);
                let shared = store.set_descriptor(desc.clone(), batch);
                if self.removed {
                    out.effect(Effect::Removed);
                } else {
                    out.effect(Effect::Route(shared));
                }
                if let Some(t) = token {
                    out.complete(t, Ok(desc.encode_to_vec()));
                }
            }
            Err(err) => {
                tracing::warn!(range = %self.range, "membership change refused by raft: {err}");
                if let Some(t) = token {
                    out.complete(t, Err(Error::AdminRefused(err.to_string())));
                }
            }
        }
    }
}

/// The smallest replica id never used in this range.
fn next_replica_id(desc: &RangeDescriptor) -> u64 {
    let max = desc
        .replicas
        .iter()
        .map(|r| r.replica_id)
        .max()
        .unwrap_or(0);
    desc.next_replica_id.max(max + 1)
}

/// The descriptor after a membership change: replicas rebuilt from raft's conf state, node
/// ids from the old descriptor or the change's context; conf_ver bumped.
fn descriptor_after(
    old: &RangeDescriptor,
    cs: &ConfState,
    added: &[ReplicaDescriptor],
) -> RangeDescriptor {
    let node_of = |id: u64| {
        old.replicas
            .iter()
            .chain(added.iter())
            .find(|r| r.replica_id == id)
            .map(|r| r.node_id)
            .unwrap_or(0)
    };
    let mut replicas = Vec::new();
    let mut push = |id: u64, role: ReplicaRole| {
        if !replicas
            .iter()
            .any(|r: &ReplicaDescriptor| r.replica_id == id)
        {
            replicas.push(ReplicaDescriptor {
                replica_id: id,
                node_id: node_of(id),
                role: role as i32,
            });
        }
    };
    for &id in cs.voters.iter().chain(cs.voters_outgoing.iter()) {
        push(id, ReplicaRole::Voter);
    }
    for &id in cs.learners.iter().chain(cs.learners_next.iter()) {
        push(id, ReplicaRole::Learner);
    }
    let mut desc = old.clone();
    let mut epoch = desc.epoch_or_default();
    epoch.conf_ver += 1;
    desc.epoch = Some(epoch);
    desc.next_replica_id =
        next_replica_id(old).max(replicas.iter().map(|r| r.replica_id + 1).max().unwrap_or(0));
    desc.replicas = replicas;
    desc
}
