//! What committed entries are applied to: the `StateMachine` trait applications implement, and
//! the default range-partitioned KV state machine.
//!
//! A state machine writes through an [`ApplyContext`]: the writes go into the same WriteBatch
//! as the group's applied index, so data and applied index can never disagree after a crash,
//! and reads through it see the writes of earlier entries of the same batch.
//!
//! Its errors come in two kinds that must never be confused ([`ApplyError`]): a *refusal* is
//! part of the replicated outcome (every replica refuses the same command the same way, and the
//! answer is recorded for retries), while a *store failure* happened on this replica only and
//! must not become an answer: the replica is isolated instead, and recovers from its log.

use std::collections::HashMap;

use flotilla_proto::command::{kv_request, KvRequest, KvResponse};
use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::Message as _;
use flotilla_store::{Engine, StoreError, WriteBatch};

/// Why a state machine did not apply a command.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The command is refused, deterministically: every replica refuses it alike, and the
    /// proposer gets `Error::InvalidCommand` with this text.
    #[error("refused: {0}")]
    Refused(String),
    /// The store failed while applying on this replica. Not an outcome of the command: the
    /// replica is isolated (its applied index does not move past the entry) and a restart
    /// applies the entry again from the log.
    #[error("store failed during apply")]
    Store(#[from] StoreError),
}

impl From<&str> for ApplyError {
    fn from(why: &str) -> Self {
        ApplyError::Refused(why.to_string())
    }
}

/// Reads and writes of one apply pass (one worker round), buffered in one WriteBatch.
pub struct ApplyContext<'a> {
    engine: &'a Engine,
    batch: &'a mut WriteBatch,
    /// Keys written earlier in this batch: RocksDB cannot read an unwritten batch.
    overlay: &'a mut HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl std::fmt::Debug for ApplyContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyContext")
            .field("pending_keys", &self.overlay.len())
            .finish()
    }
}

impl<'a> ApplyContext<'a> {
    pub(crate) fn new(
        engine: &'a Engine,
        batch: &'a mut WriteBatch,
        overlay: &'a mut HashMap<Vec<u8>, Option<Vec<u8>>>,
    ) -> Self {
        ApplyContext {
            engine,
            batch,
            overlay,
        }
    }

    /// The current value of `key`, including writes earlier in this apply pass.
    ///
    /// # Errors
    ///
    /// The store's error: pass it on (`?` turns it into [`ApplyError::Store`]); never turn it
    /// into an answer.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        self.engine.get(key)
    }

    /// Writes `key`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.batch.put_data(key, value);
        self.overlay.insert(key.to_vec(), Some(value.to_vec()));
    }

    /// Deletes `key`.
    pub fn delete(&mut self, key: &[u8]) {
        self.batch.delete_data(key);
        self.overlay.insert(key.to_vec(), None);
    }
}

/// An application state machine. Every replica applies the same commands in the same order;
/// `apply` must therefore be deterministic: the same command on the same state gives the same
/// writes and the same answer on every replica.
pub trait StateMachine: Send + Sync + 'static {
    /// Applies `command` (committed at `index` in the group of `range`). `Ok` is the answer
    /// sent to the proposer.
    ///
    /// # Errors
    ///
    /// [`ApplyError::Refused`] refuses the command (deterministically); it becomes
    /// `Error::InvalidCommand` for the proposer and the entry counts as applied.
    /// [`ApplyError::Store`] is a failure of this replica's store: the entry does not count as
    /// applied and the replica is isolated.
    fn apply(
        &self,
        range: &RangeDescriptor,
        index: u64,
        command: &[u8],
        ctx: &mut ApplyContext<'_>,
    ) -> Result<Vec<u8>, ApplyError>;
}

/// The default state machine: a KV store partitioned by range over the engine's `data`
/// column family. Commands are encoded `KvRequest`s; answers are encoded `KvResponse`s, except
/// that a put's (and a multi-put's) answer is empty: it always succeeds, so nothing is built or
/// encoded for it (read an empty answer as `ok`).
#[derive(Debug, Default, Clone, Copy)]
pub struct KvStateMachine;

impl StateMachine for KvStateMachine {
    fn apply(
        &self,
        range: &RangeDescriptor,
        _index: u64,
        command: &[u8],
        ctx: &mut ApplyContext<'_>,
    ) -> Result<Vec<u8>, ApplyError> {
        let req = KvRequest::decode(command)
            .map_err(|e| ApplyError::Refused(format!("undecodable KvRequest: {e}")))?;
        let op = req.op.ok_or("empty KvRequest")?;
        // The router checked the keys when the command was proposed, but the range may have
        // split since: refuse rather than write into a neighbour's keys. (A multi-put is
        // checked by its first key outside the range, if any.)
        let key = match &op {
            kv_request::Op::Put(p) => &p.key,
            kv_request::Op::Delete(d) => &d.key,
            kv_request::Op::Insert(i) => &i.key,
            kv_request::Op::Cas(c) => &c.key,
            kv_request::Op::MultiPut(m) => match m.puts.iter().find(|p| !range.contains(&p.key)) {
                Some(p) => &p.key,
                None => &range.start_key,
            },
        };
        if !range.contains(key) {
            return Err(ApplyError::Refused(format!(
                "key {key:02x?} is outside range {}",
                range.range_id
            )));
        }
        // Puts answer nothing (an empty answer reads as ok).
        let resp = match op {
            kv_request::Op::Put(p) => {
                ctx.put(&p.key, &p.value);
                return Ok(Vec::new());
            }
            kv_request::Op::MultiPut(m) => {
                for p in &m.puts {
                    ctx.put(&p.key, &p.value);
                }
                return Ok(Vec::new());
            }
            kv_request::Op::Delete(d) => {
                let prev = ctx.get(&d.key)?;
                ctx.delete(&d.key);
                KvResponse {
                    ok: prev.is_some(),
                    previous: prev.map(Into::into),
                }
            }
            kv_request::Op::Insert(i) => match ctx.get(&i.key)? {
                Some(prev) => KvResponse {
                    ok: false,
                    previous: Some(prev.into()),
                },
                None => {
                    ctx.put(&i.key, &i.value);
                    KvResponse {
                        ok: true,
                        previous: None,
                    }
                }
            },
            kv_request::Op::Cas(c) => {
                let cur = ctx.get(&c.key)?;
                let matches = match (&cur, &c.expected) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a[..] == b[..],
                    _ => false,
                };
                if matches {
                    ctx.put(&c.key, &c.value);
                }
                KvResponse {
                    ok: matches,
                    previous: cur.map(Into::into),
                }
            }
        };
        Ok(resp.encode_to_vec())
    }
}
