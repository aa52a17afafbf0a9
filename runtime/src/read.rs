//! Reads of a NodeGroup, all through the state machine ([`StateMachine::read`]): the read
//! waits for its barrier on this node's replica of the range (ReadIndex, the leader's lease, or
//! none for a stale read), checks that the range still has the shape it was routed with, and
//! hands the state machine the query. `get`, `get_many` and `scan` are the default KV state
//! machine's reads built on it; an application with its own state machine calls
//! [`NodeGroup::read`] with its own queries.
//!
//! [`StateMachine::read`]: crate::StateMachine::read

use std::sync::Arc;

use flotilla_proto::command::{kv_read, GetMany, KvRead, KvReadResponse, ScanRange};
use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::Message as _;

use crate::api::ReadConsistency;
use crate::error::{Error, Result};
use crate::node_group::NodeGroup;
use crate::state_machine::{ApplyError, ReadContext};

/// A page of a scan over a key interval: the pairs, and where the next page starts (`None`:
/// the interval is exhausted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// The pairs, in key order.
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The key the next page starts at, if any is left.
    pub next: Option<Vec<u8>>,
}

impl NodeGroup {
    /// Serves `query` (in the state machine's encoding) on this node's replica of the range
    /// that owns `key`, at the given consistency; resolves with the state machine's answer.
    ///
    /// # Errors
    ///
    /// `KeyNotInRange` (no range here holds `key`), `NotLeader` (a lease read on a follower),
    /// `EpochNotMatch` (the range changed shape during the read: route again),
    /// `InvalidCommand` (the state machine refused the query), and the barrier's errors.
    pub async fn read(
        &self,
        key: &[u8],
        query: &[u8],
        consistency: ReadConsistency,
    ) -> Result<Vec<u8>> {
        let desc = self.shared.router.lookup(key)?;
        self.shared.record_load(desc.range_id, key);
        self.shared
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.read_range(&desc, query, consistency).await
    }

    /// [`NodeGroup::read`] on range `desc` as the caller routed it.
    async fn read_range(
        &self,
        desc: &RangeDescriptor,
        query: &[u8],
        consistency: ReadConsistency,
    ) -> Result<Vec<u8>> {
        self.read_barrier(desc.id(), consistency).await?;
        // The range may have changed shape (split, merge) while the read waited: the read
        // must see the range it was routed to, or the caller routes again.
        let now = match self.shared.router.get(desc.id()) {
            Some(now) if now.epoch_or_default().version == desc.epoch_or_default().version => now,
            _ => {
                let current = self
                    .shared
                    .router
                    .overlapping(&desc.start_key, &desc.end_key);
                return Err(Error::EpochNotMatch { current });
            }
        };
        let ctx = ReadContext::new(&self.shared.engine);
        self.shared
            .state_machine
            .read(&now, query, &ctx)
            .map_err(|e| match e {
                ApplyError::Refused(why) => Error::InvalidCommand(why),
                ApplyError::Store(e) => Error::Store(Arc::new(e)),
            })
    }

    /// Reads `key` (default KV state machine) with the given consistency.
    pub async fn get(&self, key: &[u8], consistency: ReadConsistency) -> Result<Option<Vec<u8>>> {
        let query = KvRead {
            op: Some(kv_read::Op::Get(GetMany {
                keys: vec![key.to_vec().into()],
            })),
        };
        let answer = self.read(key, &query.encode_to_vec(), consistency).await?;
        let v = decode(&answer)?
            .values
            .pop()
            .ok_or_else(|| bad("no value"))?;
        Ok(v.found.then(|| v.value.to_vec()))
    }

    /// Reads `keys` (default KV state machine): grouped by range, one barrier and one read per
    /// range, the ranges concurrently. The values come back in the order of `keys`.
    ///
    /// # Errors
    ///
    /// As [`NodeGroup::read`], the first range's error if several fail.
    pub async fn get_many(
        &self,
        keys: &[&[u8]],
        consistency: ReadConsistency,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        // Range → (descriptor, indexes of its keys).
        let mut groups: Vec<(RangeDescriptor, Vec<usize>)> = Vec::new();
        self.shared
            .reads
            .fetch_add(keys.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for (i, k) in keys.iter().enumerate() {
            match groups.iter_mut().find(|(d, _)| d.contains(k)) {
                Some((_, idx)) => idx.push(i),
                None => {
                    let d = self.shared.router.lookup(k)?;
                    self.shared.record_load(d.range_id, k);
                    groups.push((d, vec![i]));
                }
            }
        }
        let reads = groups.iter().map(|(d, idx)| async move {
            let query = KvRead {
                op: Some(kv_read::Op::Get(GetMany {
                    keys: idx.iter().map(|&i| keys[i].to_vec().into()).collect(),
                })),
            };
            let answer = self
                .read_range(d, &query.encode_to_vec(), consistency)
                .await?;
            let values = decode(&answer)?.values;
            if values.len() != idx.len() {
                return Err(bad("a value per key"));
            }
            Ok(values)
        });
        let mut out = vec![None; keys.len()];
        for ((_, idx), values) in groups
            .iter()
            .zip(futures_util::future::join_all(reads).await)
        {
            for (&i, v) in idx.iter().zip(values?) {
                out[i] = v.found.then(|| v.value.to_vec());
            }
        }
        Ok(out)
    }

    /// Reads up to `limit` pairs of `[start, end)` (empty `end`: unbounded; default KV state
    /// machine), range by range from the one that owns `start`, each range at `consistency`
    /// (the page is not one snapshot of the interval). The page says where the next starts.
    ///
    /// # Errors
    ///
    /// As [`NodeGroup::read`]; `KeyNotInRange` if part of the interval is not hosted here.
    pub async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        consistency: ReadConsistency,
    ) -> Result<ScanPage> {
        let mut page = ScanPage::default();
        let mut at = start.to_vec();
        let past_end = |k: &[u8]| !end.is_empty() && k >= end;
        // Ranges that changed shape under the scan, read again; bounded, as a split storm
        // should not keep one call going.
        let mut reshaped = 0;
        while !past_end(&at) {
            if page.pairs.len() >= limit {
                page.next = Some(at);
                return Ok(page);
            }
            let desc = self.shared.router.lookup(&at)?;
            let want = limit - page.pairs.len();
            let query = KvRead {
                op: Some(kv_read::Op::Scan(ScanRange {
                    start: at.clone().into(),
                    end: end.to_vec().into(),
                    limit: want as u64,
                })),
            };
            let answer = match self
                .read_range(&desc, &query.encode_to_vec(), consistency)
                .await
            {
                // Split or merged meanwhile: read that part again from the new ranges.
                Err(Error::EpochNotMatch { .. }) if reshaped < 16 => {
                    reshaped += 1;
                    continue;
                }
                r => r?,
            };
            let pairs = decode(&answer)?.pairs;
            let full = pairs.len() >= want;
            if let Some(last) = pairs.last() {
                at = last.key.to_vec();
                at.push(0);
            }
            page.pairs.extend(
                pairs
                    .into_iter()
                    .map(|p| (p.key.to_vec(), p.value.to_vec())),
            );
            if full {
                // The range may hold more: the next page starts after the last key.
                page.next = (!past_end(&at)).then_some(at);
                return Ok(page);
            }
            if desc.end_key.is_empty() {
                break;
            }
            at = desc.end_key.to_vec();
        }
        Ok(page)
    }
}

fn decode(answer: &[u8]) -> Result<KvReadResponse> {
    KvReadResponse::decode(answer).map_err(|e| bad(&e.to_string()))
}

fn bad(reason: &str) -> Error {
    Error::BadAnswer {
        what: "read",
        reason: reason.to_string(),
    }
}
