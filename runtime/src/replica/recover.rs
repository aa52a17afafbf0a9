//! Unsafe recovery of a range that lost a majority of its voters for good (the seed's "force
//! new cluster"; TiKV's unsafe recovery is the model): what this replica tells the operator's
//! tool, and the rewrite that makes it the only voter of a new membership.
//!
//! Phases (the shell, `fsm::life::force_alone`, runs them with the replica out of its cell):
//! 1. **Report** ([`Replica::recovery_view`]): membership as raft applied it, hard state,
//!    applied index, the log's last index and term, and the membership-change entries after
//!    the applied index. The tool picks, of every surviving replica, the one with the highest
//!    last (term, index), as an election would.
//! 2. **Check and plan** ([`Replica::plan_alone`]): refused unless the lost nodes hold a
//!    majority of the voters (of either half of a joint configuration), the replica holds
//!    data, no merge froze the range or waits in its log, and its membership is the one the
//!    tool saw.
//! 3. **Rewrite** ([`Alone::write`]), in one synced batch: the descriptor lists this replica
//!    alone, as a voter, with a conf_ver above every replica's of the old membership; raft's
//!    conf state says the same; and every membership-change entry after the applied index is
//!    replaced by an empty entry at the same index and term. Without that, applying such an
//!    entry would move the new membership back towards the lost nodes (an entry adding one of
//!    them would leave the range two voters with one dead: no quorum again), and raft-rs
//!    refuses to campaign while committed changes wait to be applied. The forced membership
//!    replaces every change the old one made or meant to make. A split after the applied
//!    index is rebased on the new membership (its header's conf_ver is the new one), or its
//!    epoch check would refuse it here while the lost nodes may have applied it: its keys
//!    would then stay in this range while another survivor serves its right half. No other
//!    replica holds these entries any more (the lost ones are gone, the other survivors are
//!    retired, and new replicas start from a snapshot).
//! 4. **Restart** (the shell): a new `RawNode` over the rewritten storage, so that raft-rs's
//!    progress, its pending-conf index and everything it derived from the old membership
//!    start afresh; term, vote and commit are kept (commit ≤ last index always holds).
//! 5. **Campaign**: alone, the replica wins at once at the next term and appends an empty
//!    entry; committing it commits every entry before it, so the entries after its old
//!    commit index, which only the lost majority could have committed, are committed now.
//!    Writes the lost majority acknowledged beyond this replica's log are gone.

use std::collections::BTreeSet;

use flotilla_proto::command::{admin_command, raft_command, AdminCommand, RaftCommand};
use flotilla_proto::meta::{RangeDescriptor, ReplicaDescriptor, ReplicaRole};
use flotilla_proto::{Message as _, NodeId};
use flotilla_store::{GroupStorage, WriteBatch};
use raft::prelude::{ConfState, Entry, EntryType};

use super::Replica;
use crate::api::{ForcedRange, RecoveryReplica};
use crate::error::{Error, RecoveryRefusal};

/// The rewrite [`Replica::plan_alone`] computed, written by [`Alone::write`].
#[derive(Debug)]
pub(crate) struct Alone {
    /// The log from the first entry after the applied index that changes to the last entry:
    /// membership changes emptied, splits rebased (nothing when none changes).
    rewritten: Vec<Entry>,
    conf_state: ConfState,
    /// What the caller reports.
    pub(crate) forced: ForcedRange,
}

impl Replica {
    /// This replica as an unsafe recovery sees it, with `lost` the nodes gone for good.
    ///
    /// # Errors
    ///
    /// A store failure reading the log after the applied index.
    pub(crate) fn recovery_view(&self, lost: &BTreeSet<NodeId>) -> Result<RecoveryReplica, Error> {
        let store = self.raw.store();
        let cs = store.conf_state();
        let hs = store.hard_state();
        let conf_changes = self.conf_change_indexes()?;
        Ok(RecoveryReplica {
            range: self.range,
            replica_id: self.id,
            descriptor: self.descriptor().cloned(),
            voters: cs.voters.clone(),
            voters_outgoing: cs.voters_outgoing.clone(),
            learners: cs.learners.clone(),
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit,
            applied: store.apply_state().applied_index,
            last_index: store.last_index_value(),
            last_term: store.term_of(store.last_index_value())?,
            leader: self.is_leader(),
            conf_change_indexes: conf_changes.iter().map(|e| e.index).collect(),
            quorum_lost: self.is_initialized() && self.quorum(lost).is_none(),
        })
    }

    /// `Some((alive, voters))` of the half of the membership with the fewest voters alive, if
    /// every half keeps a quorum without the `lost` nodes; `None` if one lost its quorum.
    fn quorum(&self, lost: &BTreeSet<NodeId>) -> Option<(usize, usize)> {
        let cs = self.raw.store().conf_state();
        let mut weakest = (usize::MAX, 0);
        for half in [&cs.voters, &cs.voters_outgoing] {
            if half.is_empty() {
                continue;
            }
            let alive = half
                .iter()
                .filter(|&&id| !self.node_of(id).is_some_and(|n| lost.contains(&n)))
                .count();
            if alive < half.len() / 2 + 1 {
                return None;
            }
            weakest = weakest.min((alive, half.len()));
        }
        Some(weakest)
    }

    /// The membership-change entries after the applied index, in the log on disk.
    fn conf_change_indexes(&self) -> Result<Vec<Entry>, Error> {
        let store = self.raw.store();
        let applied = store.apply_state().applied_index;
        let last = store.last_index_value();
        if last <= applied {
            return Ok(Vec::new());
        }
        Ok(store
            .log_entries(applied + 1, last + 1)?
            .into_iter()
            .filter(|e| e.get_entry_type() != EntryType::EntryNormal)
            .collect())
    }

    /// Checks that this replica may continue alone after losing the `lost` nodes and plans
    /// the rewrite (see the module doc). `expect_conf_ver` is the conf_ver the operator's
    /// plan saw; the new conf_ver is above the old one and at least `min_conf_ver`.
    ///
    /// # Errors
    ///
    /// `RecoveryRefused` (nothing changes); a store failure reading the log.
    pub(crate) fn plan_alone(
        &self,
        lost: &BTreeSet<NodeId>,
        expect_conf_ver: Option<u64>,
        min_conf_ver: u64,
    ) -> Result<Alone, Error> {
        let refuse = |why| Error::RecoveryRefused {
            range: self.range,
            why,
        };
        let desc = match self.descriptor() {
            Some(d) if self.is_initialized() => d.clone(),
            _ => return Err(refuse(RecoveryRefusal::Uninitialized)),
        };
        if desc.merge.is_some() {
            return Err(refuse(RecoveryRefusal::Merging));
        }
        let conf_ver = desc.epoch_or_default().conf_ver;
        if let Some(expected) = expect_conf_ver.filter(|&e| e != conf_ver) {
            return Err(refuse(RecoveryRefusal::Changed {
                expected,
                found: conf_ver,
            }));
        }
        if let Some((alive, voters)) = self.quorum(lost) {
            return Err(refuse(RecoveryRefusal::QuorumAlive { alive, voters }));
        }
        let store = self.raw.store();
        let applied = store.apply_state().applied_index;
        let last_index = store.last_index_value();
        let descriptor = alone_descriptor(&desc, self.id, self.node, min_conf_ver);
        let new_conf_ver = descriptor.epoch_or_default().conf_ver;
        let tail = if last_index > applied {
            store.log_entries(applied + 1, last_index + 1)?
        } else {
            Vec::new()
        };
        let mut neutralized = Vec::new();
        let mut first_changed = None;
        let mut rewritten = Vec::with_capacity(tail.len());
        for mut e in tail {
            let changed = if e.get_entry_type() != EntryType::EntryNormal {
                e.set_entry_type(EntryType::EntryNormal);
                e.data = Default::default();
                e.context = Default::default();
                neutralized.push(e.index);
                true
            } else {
                match rebase(&e.data, new_conf_ver) {
                    Rebased::Unchanged => false,
                    Rebased::Split(data) => {
                        e.data = data;
                        true
                    }
                    Rebased::Merge => return Err(refuse(RecoveryRefusal::Merging)),
                }
            };
            if changed && first_changed.is_none() {
                first_changed = Some(rewritten.len());
            }
            rewritten.push(e);
        }
        let rewritten = match first_changed {
            Some(i) => rewritten.split_off(i),
            None => Vec::new(),
        };
        Ok(Alone {
            rewritten,
            conf_state: ConfState {
                voters: vec![self.id],
                ..Default::default()
            },
            forced: ForcedRange {
                range: self.range,
                replica_id: self.id,
                commit: store.hard_state().commit,
                applied,
                last_index,
                last_term: store.term_of(last_index)?,
                neutralized,
                descriptor,
            },
        })
    }

    /// Takes the group's storage out of this replica, which is then dropped: raft-rs's state
    /// derived from it goes with it (the shell opens a new replica over the storage).
    pub(crate) fn into_storage(mut self) -> GroupStorage {
        let engine = self.raw.store().engine().clone();
        std::mem::replace(
            self.raw.mut_store(),
            GroupStorage::new_uninitialized(engine, self.range),
        )
    }
}

impl Alone {
    /// Writes the rewrite into `batch` and `storage` (which must be the planning replica's,
    /// unchanged since): emptied membership-change entries, conf state, descriptor. The
    /// caller syncs the batch before anything runs on the storage.
    ///
    /// # Errors
    ///
    /// A store failure (the log changed since the plan: a bug).
    pub(crate) fn write(
        &self,
        storage: &mut GroupStorage,
        batch: &mut WriteBatch,
    ) -> Result<std::sync::Arc<RangeDescriptor>, Error> {
        storage.append(&self.rewritten, batch)?;
        storage.set_conf_state(self.conf_state.clone(), batch);
        Ok(storage.set_descriptor(self.forced.descriptor.clone(), batch))
    }
}

/// What forcing a replica alone does to one normal entry after its applied index.
enum Rebased {
    /// Kept as it is.
    Unchanged,
    /// A split: re-encoded with its header's conf_ver set to the forced membership's, so
    /// that it applies (or not) as its version says, as it would have in the old membership.
    Split(Vec<u8>),
    /// A merge step: forcing one side of a merge alone is refused.
    Merge,
}

fn rebase(data: &[u8], conf_ver: u64) -> Rebased {
    if data.is_empty() {
        return Rebased::Unchanged;
    }
    // Undecodable entries are skipped at apply on every replica alike: nothing to rebase.
    let Ok(mut cmd) = RaftCommand::decode(data) else {
        return Rebased::Unchanged;
    };
    let Some(raft_command::Body::Admin(AdminCommand { cmd: Some(admin) })) = &cmd.body else {
        return Rebased::Unchanged;
    };
    match admin {
        admin_command::Cmd::Split(_) => {
            if let Some(epoch) = cmd.header.as_mut().and_then(|h| h.epoch.as_mut()) {
                epoch.conf_ver = conf_ver;
            }
            Rebased::Split(cmd.encode_to_vec())
        }
        _ => Rebased::Merge,
    }
}

/// `desc` with `me` (on `node`) its only replica, a voter, and a conf_ver above the old one
/// and at least `min_conf_ver`; replica ids are never reused, so `next_replica_id` stays past
/// every old one.
fn alone_descriptor(
    desc: &RangeDescriptor,
    me: u64,
    node: NodeId,
    min_conf_ver: u64,
) -> RangeDescriptor {
    let mut out = desc.clone();
    let mut epoch = desc.epoch_or_default();
    epoch.conf_ver = (epoch.conf_ver + 1).max(min_conf_ver);
    out.epoch = Some(epoch);
    let highest = desc
        .replicas
        .iter()
        .map(|r| r.replica_id)
        .max()
        .unwrap_or(0);
    out.next_replica_id = desc.next_replica_id.max(highest + 1).max(me + 1);
    out.replicas = vec![ReplicaDescriptor {
        replica_id: me,
        node_id: node.0,
        role: ReplicaRole::Voter as i32,
    }];
    out
}

#[cfg(test)]
mod tests {
    use flotilla_proto::meta::RangeEpoch;

    use super::*;

    #[test]
    fn the_forced_descriptor_keeps_one_voter_and_moves_conf_ver_past_every_other() {
        let r = |id, node, role: ReplicaRole| ReplicaDescriptor {
            replica_id: id,
            node_id: node,
            role: role as i32,
        };
        let desc = RangeDescriptor {
            range_id: 7,
            epoch: Some(RangeEpoch {
                conf_ver: 4,
                version: 3,
            }),
            replicas: vec![
                r(1, 1, ReplicaRole::Voter),
                r(2, 2, ReplicaRole::Voter),
                r(5, 3, ReplicaRole::Voter),
                r(6, 4, ReplicaRole::Learner),
            ],
            next_replica_id: 6,
            ..Default::default()
        };
        let alone = alone_descriptor(&desc, 6, NodeId(4), 0);
        assert_eq!(alone.replicas, vec![r(6, 4, ReplicaRole::Voter)]);
        assert_eq!(alone.epoch.unwrap().conf_ver, 5);
        assert_eq!(
            alone.epoch.unwrap().version,
            3,
            "the key range did not change"
        );
        assert_eq!(alone.next_replica_id, 7, "ids are never reused");
        let above = alone_descriptor(&desc, 1, NodeId(1), 9);
        assert_eq!(above.epoch.unwrap().conf_ver, 9);
    }

    #[test]
    fn a_split_in_the_tail_is_rebased_on_the_new_membership_and_a_merge_refused() {
        use flotilla_proto::command::{PrepareMerge, RequestHeader, Split};
        let cmd = |body| RaftCommand {
            header: Some(RequestHeader {
                range_id: 7,
                epoch: Some(RangeEpoch {
                    conf_ver: 3,
                    version: 2,
                }),
                ..Default::default()
            }),
            body: Some(body),
        };
        let admin = |c| raft_command::Body::Admin(AdminCommand { cmd: Some(c) });
        let split = cmd(admin(admin_command::Cmd::Split(Split {
            split_key: b"m".to_vec().into(),
            new_range_id: 9,
            ..Default::default()
        })));
        let Rebased::Split(data) = rebase(&split.encode_to_vec(), 8) else {
            panic!("a split is rebased");
        };
        let rebased = RaftCommand::decode(&data[..]).unwrap();
        let epoch = rebased.header.as_ref().unwrap().epoch.unwrap();
        assert_eq!(
            (epoch.conf_ver, epoch.version),
            (8, 2),
            "only conf_ver moves"
        );
        assert_eq!(rebased.body, split.body);
        let write = cmd(raft_command::Body::App(b"put".to_vec().into()));
        assert!(matches!(
            rebase(&write.encode_to_vec(), 8),
            Rebased::Unchanged
        ));
        assert!(matches!(rebase(&[], 8), Rebased::Unchanged));
        let merge = cmd(admin(admin_command::Cmd::PrepareMerge(
            PrepareMerge::default(),
        )));
        assert!(matches!(rebase(&merge.encode_to_vec(), 8), Rebased::Merge));
    }
}
