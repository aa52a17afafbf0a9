//! Range split: one range becomes two, with no data copied.
//!
//! Phases (as TiKV's `operation/command/admin/split.rs`):
//! - **Propose** (leader): check the split key is strictly inside the range and no membership
//!   change is in flight; propose an admin `Split` carrying the new range id and the epoch it
//!   was proposed under.
//! - **Apply** (every replica, at the same log position): refuse deterministically if the
//!   epoch moved or the key is no longer inside; otherwise shrink the left descriptor to
//!   `[start, split_key)` and bump its version, write the right descriptor `[split_key, end)`
//!   with the new range id (same members and replica ids: ids are scoped to a group) and the
//!   new group's initial raft state at index/term 5 — all in the round's apply batch, which is
//!   then written **synced** before the new replica exists, so no state of the new group can
//!   reach the disk ahead of its creation.
//! - **On apply result** (the owner, `fsm::life`, once the synced apply batch is written):
//!   register the new replica, update the router with both halves, and on the parent's leader
//!   start the new group's election at once.
//!
//! The data of both halves already lives in the shared `data` column family.

use flotilla_proto::command::{admin_command, RequestHeader, Split, SplitResult};
use flotilla_proto::meta::{RangeDescriptor, RangeEpoch, RangeState};
use flotilla_proto::{Message as _, RangeId};
use flotilla_store::{GroupStorage, WriteBatch, SPLIT_INIT_INDEX, SPLIT_INIT_TERM};

use super::apply::Step;
use super::{admin_entry, Effect, Env, Existing, Output, Replica};
use crate::error::Error;

impl Replica {
    pub(super) fn propose_split(
        &mut self,
        token: u64,
        split_key: Vec<u8>,
        new_range_id: u64,
        env: &Env<'_>,
        out: &mut Output,
    ) {
        let check = || -> Result<RangeDescriptor, Error> {
            if self.range.is_system() {
                return Err(Error::AdminRefused(
                    "the system range holds no user keys and is never split".into(),
                ));
            }
            let desc = self.admin_descriptor("split")?;
            if !desc.contains(&split_key) || split_key[..] == desc.start_key[..] {
                return Err(Error::AdminRefused(format!(
                    "split key {split_key:02x?} is not strictly inside range {}",
                    self.range
                )));
            }
            if new_range_id == 0 || env.host.hosts(RangeId(new_range_id)) {
                return Err(Error::AdminRefused(format!(
                    "range id {new_range_id} is not free"
                )));
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
            admin_command::Cmd::Split(Split {
                split_key: split_key.into(),
                new_range_id,
                new_replica_ids: desc.replicas.iter().map(|r| r.replica_id).collect(),
            }),
        );
        self.propose(token, data, env, out);
        self.urge_commit();
    }

    /// Applies a committed split; the answer is an encoded [`SplitResult`]. `Err` is a store
    /// failure; a refusal is the step's outcome.
    pub(super) fn apply_split(
        &mut self,
        header: &RequestHeader,
        split: &Split,
        (index, term): (u64, u64),
        env: &Env<'_>,
        out: &mut Output,
        batch: &mut WriteBatch,
    ) -> crate::error::Result<Step> {
        let refuse = |e: Error| Ok(Step::Done(Err(e)));
        let Some(desc) = self.descriptor().cloned() else {
            return refuse(Error::RangeNotFound(self.range));
        };
        let epoch = desc.epoch_or_default();
        if header.epoch.is_none_or(|e| e != epoch) {
            return refuse(Error::EpochNotMatch {
                current: vec![desc],
            });
        }
        let key = &split.split_key[..];
        if !desc.contains(key) || key == &desc.start_key[..] || split.new_range_id == 0 {
            return refuse(Error::AdminRefused(
                "split key no longer inside the range".into(),
            ));
        }
        let version = RangeEpoch {
            conf_ver: epoch.conf_ver,
            version: epoch.version + 1,
        };
        let mut left = desc.clone();
        left.end_key = split.split_key.clone();
        left.epoch = Some(version);
        let right = RangeDescriptor {
            range_id: split.new_range_id,
            start_key: split.split_key.clone(),
            end_key: desc.end_key.clone(),
            epoch: Some(version),
            replicas: desc.replicas.clone(),
            state: RangeState::Normal as i32,
            next_replica_id: desc.next_replica_id,
            merge: None,
        };

        // Retry de-duplication follows the keys: a client's retry may now route to either half,
        // so both start with the parent's records (those on disk, and this round's).
        let mut records: std::collections::HashMap<u64, Vec<u8>> =
            env.engine.client_records(self.range)?.into_iter().collect();
        for ((range, client), rec) in &out.client_records {
            if *range == self.range.0 {
                records.insert(*client, rec.encode_to_vec());
            }
        }
        let records: Vec<(u64, Vec<u8>)> = records.into_iter().collect();

        // A replica of the new group may already be here: initialized (it got a snapshot from
        // the new group's leader before we applied the split: its data is newer, keep it) or
        // uninitialized (created by a message: it is sealed now, and its term and vote carry
        // over so that this node never votes twice in a term).
        let carried_hard_state = match env.host.seal_uninitialized(right.id()) {
            // Held by a round (possibly this one): apply the split in a later round.
            Existing::Busy => {
                out.reschedule = true;
                return Ok(Step::Wait);
            }
            Existing::Initialized => {
                tracing::info!(range = %right.id(), "new range of a split already initialized here; keeping it");
                let shared = self.raw.mut_store().set_descriptor(left.clone(), batch);
                out.effect(Effect::Route(shared));
                return Ok(Step::Done(Ok(SplitResult {
                    left: Some(left),
                    right: Some(right),
                }
                .encode_to_vec())));
            }
            Existing::Uninitialized(hs) => Some(hs),
            Existing::Absent => None,
        };
        let shared_left = self.raw.mut_store().set_descriptor(left.clone(), batch);
        let conf_state = self.raw.store().conf_state().clone();
        let mut storage = GroupStorage::initialize(
            env.engine.clone(),
            right.clone(),
            conf_state,
            SPLIT_INIT_INDEX,
            SPLIT_INIT_TERM,
            batch,
        );
        batch.replace_client_records(right.id(), &records);
        if let Some(hs) = &carried_hard_state {
            storage.adopt_vote(hs, batch);
        }
        // The split, and everything applied before it in this round, reaches the disk (the
        // apply batch is synced) before the new group exists and can write anything of its own.
        self.raw.mut_store().set_applied(index, term, batch);
        out.sync_apply = true;
        out.effect(Effect::CreateSplit {
            left: shared_left,
            storage: Box::new(storage),
            replica_id: self.id,
            campaign: self.is_leader(),
        });
        metrics::counter!("flotilla_runtime_splits_total").increment(1);
        tracing::info!(left = %left.id(), right = %right.id(), "range split");
        Ok(Step::Done(Ok(SplitResult {
            left: Some(left),
            right: Some(right),
        }
        .encode_to_vec())))
    }
}
