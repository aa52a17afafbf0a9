//! What committed entries are applied to: the `StateMachine` trait applications implement, and
//! the default range-partitioned KV state machine.
//!
//! A state machine writes through an [`ApplyContext`]: the writes go into the same WriteBatch
//! as the group's applied index, so data and applied index can never disagree after a crash,
//! and reads through it see the writes of earlier entries of the same batch.

use std::collections::HashMap;

use flotilla_proto::command::{kv_request, KvRequest, KvResponse};
use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::Message as _;
use flotilla_store::{Engine, WriteBatch};

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
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        self.engine.get(key).map_err(|e| e.to_string())
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
    /// sent to the proposer; `Err` refuses the command (also deterministically) and becomes
    /// `Error::InvalidCommand` for the proposer. Either way the entry counts as applied.
    fn apply(
        &self,
        range: &RangeDescriptor,
        index: u64,
        command: &[u8],
        ctx: &mut ApplyContext<'_>,
    ) -> Result<Vec<u8>, String>;
}

/// The default state machine: a KV store partitioned by range over the engine's `data`
/// column family. Commands are encoded `KvRequest`s; answers are encoded `KvResponse`s.
#[derive(Debug, Default, Clone, Copy)]
pub struct KvStateMachine;

impl StateMachine for KvStateMachine {
    fn apply(
        &self,
        range: &RangeDescriptor,
        _index: u64,
        command: &[u8],
        ctx: &mut ApplyContext<'_>,
    ) -> Result<Vec<u8>, String> {
        let req = KvRequest::decode(command).map_err(|e| format!("undecodable KvRequest: {e}"))?;
        let op = req.op.ok_or("empty KvRequest")?;
        let key = match &op {
            kv_request::Op::Put(p) => &p.key,
            kv_request::Op::Delete(d) => &d.key,
            kv_request::Op::Insert(i) => &i.key,
            kv_request::Op::Cas(c) => &c.key,
        };
        // The router checked the key when it was proposed, but the range may have split
        // since: refuse rather than write into a neighbour's keys.
        if !range.contains(key) {
            return Err(format!(
                "key {key:02x?} is outside range {}",
                range.range_id
            ));
        }
        let resp = match op {
            kv_request::Op::Put(p) => {
                ctx.put(&p.key, &p.value);
                KvResponse {
                    ok: true,
                    previous: None,
                }
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
