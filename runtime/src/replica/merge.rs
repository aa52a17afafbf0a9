//! Range merge: two adjacent ranges whose replicas live on the same nodes become one, with no
//! data copied (the keys of both already live in the shared `data` column family). The
//! protocol is TiKV's (`PrepareMerge` on the source, `CommitMerge` on the target,
//! `RollbackMerge` when the target moved on), simplified by one thing we can rely on: every
//! source replica has a target replica beside it in the same process.
//!
//! Phases:
//! - **Prepare** (source log, index P): the source freezes. From that entry on it refuses every
//!   write, read and admin command (the refusal is decided at apply, so every replica refuses
//!   the same entries), and its epoch moves on (`version` and `conf_ver`) so that requests
//!   routed before the merge fail fast.
//! - **Commit** (target log, index C): the source's leader proposes it once every source
//!   replica has the entry at P in its log (raft's `matched >= P`), so that each of them can
//!   reach P without any other source replica's help. Each target replica applies C only
//!   when the source replica beside it has applied exactly up to P; if it has not, the target
//!   stops applying at C, tells the source that P is committed (the target committed C, and C
//!   is only ever proposed after P committed), and resumes once the source caught up. The
//!   apply of C then extends the target over the source's keys, merges the retry records and
//!   tombstones the source replica, in one synced batch.
//! - **Rollback** (source log): if the target's epoch moved past the one recorded at prepare
//!   (it split, changed membership, or started a merge of its own), C can never apply
//!   (it requires that exact epoch, and epochs only grow), so the source's leader unfreezes
//!   the source.
//! - **Abandon** (target log): a source frozen longer than `merge_freeze_limit` (a replica
//!   is down and cannot acknowledge the prepare entry, or the target has no leader) has its
//!   leader propose AbandonMerge to the target, which moves the target's epoch on if it is
//!   still the prepared one. In the target's log either C or the abandon comes first, the same
//!   on every replica: if C, the merge happens; if the abandon, C is refused forever and the
//!   source rolls back as above. So a down replica stalls the source's writes for a bounded
//!   time instead of until it returns.
//!
//! Invariants: a source replica never applies anything past P (the target destroys it under
//! its lock, in the batch that moves the keys); the target takes the keys on every node at the
//! same log position C, after the source there applied everything up to P, so every node ends
//! with the same data.

use std::collections::{BTreeSet, HashMap};

use flotilla_proto::command::{
    admin_command, AbandonMerge, ClientRecord, CommitMerge, PrepareMerge, RequestHeader,
    RollbackMerge,
};
use flotilla_proto::meta::{MergeState, RangeDescriptor, RangeEpoch, RangeState};
use flotilla_proto::{Message as _, RangeId};
use flotilla_store::WriteBatch;

use super::apply::{Outcome, Step};
use super::{admin_entry, Effect, Env, Output, PeerMsg, Replica};
use crate::error::Error;

/// Ticks a source leader waits before proposing its CommitMerge (or RollbackMerge) again.
const MERGE_RETRY_TICKS: u8 = 10;

/// How far (in entries) a source replica may lag its leader when a merge is prepared: the
/// commit waits until every replica has the prepare entry, so a far-behind or down replica
/// would keep the source frozen.
const PREPARE_MAX_LAG: u64 = 1024;

/// Checks that `source` can merge into `target`: adjacent, on the same nodes, neither already
/// merging.
pub(crate) fn check_mergeable(
    source: &RangeDescriptor,
    target: &RangeDescriptor,
) -> Result<(), Error> {
    let refuse = |why: String| Err(Error::AdminRefused(why));
    if source.range_id == target.range_id {
        return refuse(format!("cannot merge {} into itself", source.id()));
    }
    if source.id().is_system() || target.id().is_system() {
        return refuse("the system range holds no user keys and is never merged".into());
    }
    if source.merge.is_some() || target.merge.is_some() {
        return refuse("a range of the pair is already merging".into());
    }
    let left_of = !source.end_key.is_empty() && source.end_key == target.start_key;
    let right_of = !target.end_key.is_empty() && target.end_key == source.start_key;
    if !left_of && !right_of {
        return refuse(format!(
            "{} and {} are not adjacent",
            source.id(),
            target.id()
        ));
    }
    let nodes = |d: &RangeDescriptor| {
        d.replicas
            .iter()
            .map(|r| r.node_id)
            .collect::<BTreeSet<_>>()
    };
    if nodes(source) != nodes(target) {
        return refuse(format!(
            "{} and {} are not replicated on the same nodes; move replicas first",
            source.id(),
            target.id()
        ));
    }
    Ok(())
}

/// The target's descriptor once it absorbed `source`.
fn merged(target: &RangeDescriptor, source: &RangeDescriptor) -> RangeDescriptor {
    let mut d = target.clone();
    // An empty key is both "start of the key space" and "end of it": adjacency is decided
    // on non-empty boundaries only.
    if !source.end_key.is_empty() && source.end_key == target.start_key {
        d.start_key = source.start_key.clone();
    } else {
        d.end_key = source.end_key.clone();
    }
    let (t, s) = (target.epoch_or_default(), source.epoch_or_default());
    d.epoch = Some(RangeEpoch {
        conf_ver: t.conf_ver,
        version: t.version.max(s.version) + 1,
    });
    d
}

/// Whether `local` moved past `expected` for good (epochs only grow).
fn moved_past(local: &RangeEpoch, expected: &RangeEpoch) -> bool {
    local.version > expected.version || local.conf_ver > expected.conf_ver
}

impl Replica {
    /// The merge this replica's range is the source of, if any.
    pub(crate) fn merge_state(&self) -> Option<&MergeState> {
        self.descriptor().and_then(|d| d.merge.as_deref())
    }

    /// Leader: proposes `PrepareMerge` of this range into `target`.
    pub(super) fn propose_prepare_merge(
        &mut self,
        token: u64,
        target: RangeDescriptor,
        env: &Env<'_>,
        out: &mut Output,
    ) {
        let check = || -> Result<RangeDescriptor, Error> {
            let desc = self.admin_descriptor("merge")?;
            check_mergeable(&desc, &target)?;
            let last = self.raw.raft.raft_log.last_index();
            for (id, pr) in self.raw.raft.prs().iter() {
                // (Not refused on raft's `recent_active`: check-quorum clears it every election
                // timeout, so a healthy follower looks inactive until its next heartbeat
                // response. A replica that dies is handled by abandoning the merge.)
                if pr.matched + PREPARE_MAX_LAG < last {
                    return Err(Error::AdminRefused(format!(
                        "replica {id} of {} lags {} entries behind; merge once it caught up",
                        self.range,
                        last - pr.matched
                    )));
                }
            }
            Ok(desc)
        };
        let desc = match check() {
            Ok(d) => d,
            Err(e) => return out.complete(token, Err(e)),
        };
        let header = RequestHeader {
            range_id: self.range.0,
            epoch: desc.epoch,
            proposer_node: env.node.0,
            proposal_token: token,
            ..Default::default()
        };
        let data = admin_entry(
            header,
            admin_command::Cmd::PrepareMerge(PrepareMerge {
                target: Some(target),
            }),
        );
        self.propose(token, data, env, out);
        self.urge_commit();
    }

    /// Source, every replica: freezes the range. The answer is the encoded descriptor.
    pub(super) fn apply_prepare_merge(
        &mut self,
        header: &RequestHeader,
        prepare: &PrepareMerge,
        (index, term): (u64, u64),
        out: &mut Output,
        batch: &mut WriteBatch,
    ) -> Outcome {
        let desc = self
            .descriptor()
            .cloned()
            .ok_or(Error::RangeNotFound(self.range))?;
        let epoch = desc.epoch_or_default();
        if header.epoch.is_none_or(|e| e != epoch) {
            return Err(Error::EpochNotMatch {
                current: vec![desc],
            });
        }
        let target = prepare
            .target
            .clone()
            .ok_or_else(|| Error::AdminRefused("prepare merge without a target".into()))?;
        check_mergeable(&desc, &target)?;
        let mut frozen = desc;
        frozen.epoch = Some(RangeEpoch {
            conf_ver: epoch.conf_ver + 1,
            version: epoch.version + 1,
        });
        frozen.merge = Some(Box::new(MergeState {
            target: Some(Box::new(target.clone())),
            prepare_index: index,
            prepare_term: term,
        }));
        let shared = self.raw.mut_store().set_descriptor(frozen.clone(), batch);
        out.effect(Effect::Route(shared));
        self.merge_retry = 0;
        self.merge_frozen_ticks = 0;
        // The target beside us may be waiting for this apply.
        out.effect(Effect::Post(target.id(), PeerMsg::MergeResume));
        tracing::info!(source = %self.range, target = %target.id(), index, "merge prepared");
        Ok(frozen.encode_to_vec())
    }

    /// Source, every tick while merging: the leader proposes the CommitMerge to the target
    /// once every replica has the prepare entry, or the rollback once the target moved on;
    /// after a proposal it waits `MERGE_RETRY_TICKS` before proposing again.
    pub(super) fn merge_tick(&mut self, env: &Env<'_>, out: &mut Output) {
        if self.merge_retry > 0 {
            self.merge_retry -= 1;
            return;
        }
        self.merge_check(env, out);
    }

    /// Source leader, after every round while merging and nothing is in flight: the commit
    /// goes out as soon as the last replica acknowledged the prepare entry, not a tick later.
    pub(super) fn merge_check(&mut self, env: &Env<'_>, out: &mut Output) {
        if self.merge_retry > 0 || !self.is_leader() {
            return;
        }
        let Some(state) = self.merge_state().cloned() else {
            return;
        };
        let Some(target) = state.target.as_ref() else {
            return;
        };
        // The target replica beside us tells what the target group did: if its epoch moved
        // past the prepared one, no CommitMerge can ever apply (a lagging replica with an
        // older epoch just means "not yet").
        match env.engine.descriptor(target.id()) {
            Ok(Some(local)) => {
                let gone = local.state == RangeState::Tombstone as i32;
                if gone || moved_past(&local.epoch_or_default(), &target.epoch_or_default()) {
                    let desc = self.descriptor().cloned().unwrap_or_default();
                    let header = RequestHeader {
                        range_id: self.range.0,
                        epoch: desc.epoch,
                        ..Default::default()
                    };
                    let data = admin_entry(
                        header,
                        admin_command::Cmd::RollbackMerge(RollbackMerge {
                            prepare_index: state.prepare_index,
                        }),
                    );
                    self.append(0, data, env, out, false);
                    self.urge_commit();
                    self.merge_retry = MERGE_RETRY_TICKS;
                    return;
                }
            }
            // Not known here (yet): the replicas were on the same nodes at prepare, so wait.
            Ok(None) | Err(_) => return,
        }
        let limit = env.config.merge_freeze_ticks();
        if self.merge_frozen_ticks >= limit {
            // Frozen too long: have the target refuse the merge; once its epoch moved, the
            // check above rolls the source back.
            tracing::warn!(
                source = %self.range,
                target = %target.id(),
                ticks = self.merge_frozen_ticks,
                "merge not committed within merge_freeze_limit; abandoning it"
            );
            let header = RequestHeader {
                range_id: target.range_id,
                epoch: target.epoch,
                ..Default::default()
            };
            let data = admin_entry(
                header,
                admin_command::Cmd::AbandonMerge(AbandonMerge {
                    source_range_id: self.range.0,
                }),
            );
            out.effect(Effect::Post(target.id(), PeerMsg::ProposeMerge { data }));
            self.merge_retry = MERGE_RETRY_TICKS;
            return;
        }
        let everyone_has_prepare = self
            .raw
            .raft
            .prs()
            .iter()
            .all(|(_, pr)| pr.matched >= state.prepare_index);
        if !everyone_has_prepare {
            return;
        }
        let header = RequestHeader {
            range_id: target.range_id,
            epoch: target.epoch,
            ..Default::default()
        };
        let data = admin_entry(
            header,
            admin_command::Cmd::CommitMerge(CommitMerge {
                source: self.descriptor().cloned(),
            }),
        );
        // The target replica beside us proposes it (forwarding to its leader if need be).
        out.effect(Effect::Post(target.id(), PeerMsg::ProposeMerge { data }));
        self.merge_retry = MERGE_RETRY_TICKS;
    }

    /// Source: the target beside us is applying the CommitMerge, so the prepare entry is
    /// committed: let raft know (this replica then applies up to it without waiting for a
    /// leader), and hand the replica over once it got there.
    pub(super) fn merge_catch_up(&mut self, prepare_index: u64, prepare_term: u64) {
        self.merge_requested = true;
        let log = &mut self.raw.raft.raft_log;
        if log.committed < prepare_index
            && log.last_index() >= prepare_index
            && log.term(prepare_index).ok() == Some(prepare_term)
        {
            log.commit_to(prepare_index);
        }
    }

    /// Target, every replica: refuses a merge for good by moving the epoch on, if it is still
    /// the one the source prepared against (else a CommitMerge already applied, or the target
    /// moved on by itself: either way nothing is left to refuse).
    pub(super) fn apply_abandon_merge(
        &mut self,
        header: &RequestHeader,
        abandon: &AbandonMerge,
        out: &mut Output,
        batch: &mut WriteBatch,
    ) -> Outcome {
        let mut desc = self
            .descriptor()
            .cloned()
            .ok_or(Error::RangeNotFound(self.range))?;
        if header.epoch != desc.epoch {
            return Err(Error::EpochNotMatch {
                current: vec![desc],
            });
        }
        let epoch = desc.epoch_or_default();
        desc.epoch = Some(RangeEpoch {
            version: epoch.version + 1,
            ..epoch
        });
        let shared = self.raw.mut_store().set_descriptor(desc.clone(), batch);
        out.effect(Effect::Route(shared));
        tracing::info!(
            target = %self.range,
            source = abandon.source_range_id,
            "merge abandoned: the target's epoch moved on"
        );
        Ok(desc.encode_to_vec())
    }

    /// Source, every replica: unfreezes the range if the merge is the one prepared.
    pub(super) fn apply_rollback_merge(
        &mut self,
        rollback: &RollbackMerge,
        out: &mut Output,
        batch: &mut WriteBatch,
    ) -> Outcome {
        let mut desc = self
            .descriptor()
            .cloned()
            .ok_or(Error::RangeNotFound(self.range))?;
        match &desc.merge {
            Some(m) if m.prepare_index == rollback.prepare_index => {}
            _ => return Err(Error::AdminRefused("no such merge to roll back".into())),
        }
        desc.merge = None;
        let mut epoch = desc.epoch_or_default();
        epoch.version += 1;
        desc.epoch = Some(epoch);
        let shared = self.raw.mut_store().set_descriptor(desc.clone(), batch);
        out.effect(Effect::Route(shared));
        tracing::info!(range = %self.range, "merge rolled back: the target changed");
        metrics::counter!("flotilla_runtime_merge_rollbacks_total").increment(1);
        Ok(desc.encode_to_vec())
    }

    /// Target, every replica: absorbs the source once the source replica beside it applied
    /// up to the prepare entry; otherwise asks it to catch up and returns `Wait`.
    pub(super) fn apply_commit_merge(
        &mut self,
        header: &RequestHeader,
        commit: &CommitMerge,
        (index, term): (u64, u64),
        env: &Env<'_>,
        out: &mut Output,
        batch: &mut WriteBatch,
    ) -> crate::error::Result<Step> {
        let desc = match self.descriptor().cloned() {
            Some(d) => d,
            None => return Ok(Step::Done(Err(Error::RangeNotFound(self.range)))),
        };
        if header.epoch != desc.epoch {
            return Ok(Step::Done(Err(Error::EpochNotMatch {
                current: vec![desc],
            })));
        }
        let Some(source) = commit.source.clone() else {
            return Ok(Step::Done(Err(Error::AdminRefused(
                "commit merge without a source".into(),
            ))));
        };
        let Some(state) = source.merge.clone().filter(|m| {
            m.target
                .as_ref()
                .is_some_and(|t| t.range_id == self.range.0)
        }) else {
            return Ok(Step::Done(Err(Error::AdminRefused(
                "commit merge of a source not prepared for this target".into(),
            ))));
        };
        let mut unfrozen = source.clone();
        unfrozen.merge = None;
        if let Err(e) = check_mergeable(&unfrozen, &desc) {
            return Ok(Step::Done(Err(e)));
        }

        // The source replica beside us must have applied exactly up to the prepare entry and
        // handed itself over (it then never writes again): ask it, and wait.
        let source_id = source.id();
        if env.host.handed_over(source_id) != Some(state.prepare_index) {
            if !env.host.hosts(source_id) {
                // Required by the merge but not on this node (removed by something else):
                // wait rather than take keys this node may have no data for.
                tracing::error!(
                    source = %source_id, target = %self.range, prepare = state.prepare_index,
                    "merge source replica missing on this node; the target waits"
                );
                return Ok(Step::Wait);
            }
            out.effect(Effect::Post(
                source_id,
                PeerMsg::MergeCatchUp {
                    prepare_index: state.prepare_index,
                    prepare_term: state.prepare_term,
                },
            ));
            return Ok(Step::Wait);
        }

        let new = merged(&desc, &source);
        let shared = self.raw.mut_store().set_descriptor(new.clone(), batch);
        if let Err(e) = self.absorb_client_records(source_id, env, out, batch) {
            return Ok(Step::Done(Err(e)));
        }
        let mut tomb = source;
        tomb.state = RangeState::Tombstone as i32;
        batch.destroy_group_state(source_id);
        batch.put_descriptor(&tomb);
        // Like a split: the merge and everything applied before it reach the disk together,
        // before the source leaves the node.
        self.raw.mut_store().set_applied(index, term, batch);
        out.sync_apply = true;
        out.effect(Effect::MergedAway {
            source: source_id,
            tombstone: tomb,
            merged: shared,
        });
        tracing::info!(source = %source_id, target = %self.range, index, "ranges merged");
        Ok(Step::Done(Ok(new.encode_to_vec())))
    }

    /// Gives the target every retry record of the source that is newer than its own, so a
    /// client's retry is answered the same whichever range it reaches. The records taken are
    /// also this round's and this replica's latest (`out.client_records`, `retry`): an entry
    /// after the merge in this round must see them before the batch is written.
    fn absorb_client_records(
        &mut self,
        source: RangeId,
        env: &Env<'_>,
        out: &mut Output,
        batch: &mut WriteBatch,
    ) -> crate::error::Result<()> {
        let seq_of = |b: &[u8]| ClientRecord::decode(b).map(|r| r.seq).unwrap_or(0);
        let mut mine: HashMap<u64, u64> = env
            .engine
            .client_records(self.range)?
            .into_iter()
            .map(|(c, b)| (c, seq_of(&b)))
            .collect();
        let mut theirs: HashMap<u64, Vec<u8>> =
            env.engine.client_records(source)?.into_iter().collect();
        for ((range, client), rec) in &out.client_records {
            if *range == self.range.0 {
                mine.insert(*client, rec.seq);
            } else if *range == source.0 {
                theirs.insert(*client, rec.encode_to_vec());
            }
        }
        for (client, rec) in theirs {
            if mine.get(&client).is_none_or(|s| *s < seq_of(&rec)) {
                batch.put_client_record(self.range, client, &rec);
                match ClientRecord::decode(&rec[..]) {
                    Ok(record) => {
                        self.retry_records.insert(client, record.clone());
                        out.client_records.insert((self.range.0, client), record);
                    }
                    // Unreadable: left to the engine read, which reports it as this
                    // replica's failure when a retry of that client needs it.
                    Err(_) => {
                        self.retry_records.clear();
                        out.client_records.remove(&(self.range.0, client));
                    }
                }
            }
        }
        Ok(())
    }

    /// Source: once this replica applied its prepare entry and the target asked for it, asks
    /// its owner to take it out of service (after the round's apply batch is written) so that
    /// the target absorbs it.
    pub(super) fn maybe_hand_over(&self, out: &mut Output) {
        if !self.merge_requested {
            return;
        }
        let Some(state) = self.merge_state() else {
            return;
        };
        let Some(target) = state.target.as_ref().map(|t| t.id()) else {
            return;
        };
        if self.raw.store().apply_state().applied_index >= state.prepare_index {
            out.effect(Effect::HandOver {
                prepare: state.prepare_index,
                target,
            });
        }
    }
}
