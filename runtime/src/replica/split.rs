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
//!   new group's initial raft state at index/term 5 — all in the apply batch, which is then
//!   written **synced** before the new replica exists, so no state of the new group can reach
//!   the disk ahead of its creation.
//! - **On apply result**: register the new replica, update the router with both halves, and on
//!   the parent's leader start the new group's election at once.
//!
//! The data of both halves already lives in the shared `data` column family.

use flotilla_proto::command::{admin_command, RequestHeader, Split, SplitResult};
use flotilla_proto::meta::{RangeDescriptor, RangeEpoch, RangeState};
use flotilla_proto::{Message as _, RangeId};
use flotilla_store::{GroupStorage, WriteBatch, SPLIT_INIT_INDEX, SPLIT_INIT_TERM};

use super::{admin_entry, Replica};
use crate::error::Error;
use crate::fsm::mailbox::{PeerMsg, ReplicaCell};
use crate::fsm::worker::Round;
use crate::node_group::Shared;

impl Replica {
    pub(super) fn propose_split(
        &mut self,
        token: u64,
        split_key: Vec<u8>,
        new_range_id: u64,
        shared: &Shared,
        round: &mut Round,
    ) {
        let check = || -> Result<RangeDescriptor, Error> {
            let desc = self.admin_descriptor("split")?;
            if !desc.contains(&split_key) || split_key[..] == desc.start_key[..] {
                return Err(Error::AdminRefused(format!(
                    "split key {split_key:02x?} is not strictly inside range {}",
                    self.range
                )));
            }
            if new_range_id == 0 || shared.cell(RangeId(new_range_id)).is_some() {
                return Err(Error::AdminRefused(format!(
                    "range id {new_range_id} is not free"
                )));
            }
            Ok(desc)
        };
        let desc = match check() {
            Ok(d) => d,
            Err(e) => return round.complete(token, Err(e)),
        };
        let header = RequestHeader {
            range_id: self.range.0,
            epoch: desc.epoch,
            proposer_node: shared.node.0,
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
        self.propose(token, data, shared, round);
    }

    /// Applies a committed split; the answer is an encoded [`SplitResult`].
    pub(super) fn apply_split(
        &mut self,
        header: &RequestHeader,
        split: &Split,
        (index, term): (u64, u64),
        shared: &Shared,
        round: &mut Round,
        batch: &mut WriteBatch,
    ) -> crate::Result<Vec<u8>> {
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
        let key = &split.split_key[..];
        if !desc.contains(key) || key == &desc.start_key[..] || split.new_range_id == 0 {
            return Err(Error::AdminRefused(
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
        self.raw.mut_store().set_descriptor(left.clone(), batch);

        // A replica of the new group may already be here: initialized (it got a snapshot from
        // the new group's leader before we applied the split: its data is newer, keep it) or
        // uninitialized (created by a message; carry over its term and vote so that this node
        // never votes twice in a term).
        let existing = shared.cell(right.id());
        let mut carried_hard_state = None;
        if let Some(cell) = &existing {
            if let Some(r) = cell.replica.lock().as_ref() {
                if r.raw.store().is_initialized() {
                    tracing::info!(range = %right.id(), "new range of a split already initialized here; keeping it");
                    shared.router.upsert(left.clone());
                    return Ok(SplitResult {
                        left: Some(left),
                        right: Some(right),
                    }
                    .encode_to_vec());
                }
                carried_hard_state = Some(r.raw.store().hard_state().clone());
            }
        }
        let conf_state = self.raw.store().conf_state().clone();
        let mut storage = GroupStorage::initialize(
            shared.engine.clone(),
            right.clone(),
            conf_state,
            SPLIT_INIT_INDEX,
            SPLIT_INIT_TERM,
            batch,
        );
        // Retry de-duplication follows the keys: a client's retry may now route to either half,
        // so both start with the parent's records (those on disk, and this round's).
        let mut records: std::collections::HashMap<u64, Vec<u8>> = shared
            .engine
            .client_records(self.range)?
            .into_iter()
            .collect();
        for ((range, client), rec) in &round.client_records {
            if *range == self.range.0 {
                records.insert(*client, rec.encode_to_vec());
            }
        }
        let records: Vec<(u64, Vec<u8>)> = records.into_iter().collect();
        batch.replace_client_records(right.id(), &records);
        if let Some(hs) = &carried_hard_state {
            storage.adopt_vote(hs, batch);
        }
        // The split, and everything applied before it in this round, reaches the disk before
        // the new group can write anything of its own.
        self.raw.mut_store().set_applied(index, term, batch);
        let full = std::mem::replace(batch, shared.engine.batch());
        shared.engine.write(full, true)?;

        let me = self.id;
        let raw = shared.raw_node(storage, me)?;
        let mut replica = Replica::new(raw, me, right.id(), shared.node);
        if self.is_leader() {
            // Followers that have not applied the split yet drop the new group's (pre)votes
            // (their parent still covers its keys), so one campaign often goes unanswered;
            // a few quick retries spare the new half a full election timeout.
            replica.campaign_retries = 4;
        }
        let cell = ReplicaCell::new(right.id(), replica);
        if let Some(old) = existing {
            old.fail();
        }
        shared.register(cell);
        shared.router.upsert(left.clone());
        shared.router.upsert(right.clone());
        if self.is_leader() {
            let _ = shared.post(right.id(), PeerMsg::Campaign);
        }
        metrics::counter!("flotilla_runtime_splits_total").increment(1);
        tracing::info!(left = %left.id(), right = %right.id(), "range split");
        Ok(SplitResult {
            left: Some(left),
            right: Some(right),
        }
        .encode_to_vec())
    }
}
