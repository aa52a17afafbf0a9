//! What committed entries are applied to: the `StateMachine` trait applications implement, and
//! the default range-partitioned KV state machine.
//!
//! A state machine writes through an [`ApplyContext`]: the writes go into the same WriteBatch
//! as the group's applied index, so data and applied index can never disagree after a crash,
//! and reads through it see the writes of earlier entries of the same batch.
//!
//! Reads go through the state machine too ([`StateMachine::read`]): the NodeGroup waits for
//! the read's barrier (ReadIndex, lease, or none for a stale read) on the replica of the range,
//! then hands the state machine an encoded query and a [`ReadContext`] over the engine, so an
//! application with its own state machine serves its own reads, in its own encoding.
//!
//! Its errors come in two kinds that must never be confused ([`ApplyError`]): a *refusal* is
//! part of the replicated outcome (every replica refuses the same command the same way, and the
//! answer is recorded for retries), while a *store failure* happened on this replica only and
//! must not become an answer: the replica is isolated instead, and recovers from its log.

use std::collections::HashMap;

use flotilla_proto::command::{
    kv_read, kv_request, KvRead, KvReadResponse, KvRequest, KvResponse, Put, Value,
};
use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::Message as _;
use flotilla_store::{Engine, StoreError, WriteBatch};

/// Why a state machine did not apply a command (or serve a read).
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

/// A key and its value.
pub type Pair = (Vec<u8>, Vec<u8>);

/// What a read sees: the range's applied data in the engine, after the read's barrier.
pub struct ReadContext<'a> {
    engine: &'a Engine,
}

impl std::fmt::Debug for ReadContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadContext").finish_non_exhaustive()
    }
}

impl<'a> ReadContext<'a> {
    pub(crate) fn new(engine: &'a Engine) -> Self {
        ReadContext { engine }
    }

    /// The applied value of `key`.
    ///
    /// # Errors
    ///
    /// The store's error (`?` turns it into [`ApplyError::Store`]).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.engine.get(key)
    }

    /// The applied pairs in `[start, end)` (empty `end`: unbounded), at most `limit`.
    ///
    /// # Errors
    ///
    /// As [`ReadContext::get`].
    pub fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
        self.engine.scan(start, end, limit)
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

    /// Serves `query` (in the application's own encoding) from this replica of `range`, once
    /// the read's barrier passed: a linearizable read sees every write acknowledged before it
    /// arrived. A read must only look at the range's keys (`range.contains`). The default
    /// serves nothing.
    ///
    /// # Errors
    ///
    /// [`ApplyError::Refused`] for a query it does not serve (the caller gets
    /// `Error::InvalidCommand`); [`ApplyError::Store`] if the store failed.
    fn read(
        &self,
        range: &RangeDescriptor,
        query: &[u8],
        ctx: &ReadContext<'_>,
    ) -> Result<Vec<u8>, ApplyError> {
        let _ = (range, query, ctx);
        Err(ApplyError::Refused(
            "this state machine serves no reads".into(),
        ))
    }
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
            kv_request::Op::Incr(c) => &c.key,
            kv_request::Op::MultiPut(m) => match m.puts.iter().find(|p| !range.contains(&p.key)) {
                Some(p) => &p.key,
                None => &range.start_key,
            },
            kv_request::Op::Writes(w) => match w.writes.iter().find(|w| !range.contains(&w.key)) {
                Some(w) => &w.key,
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
            kv_request::Op::Writes(w) => {
                for w in &w.writes {
                    match &w.value {
                        Some(v) => ctx.put(&w.key, v),
                        None => ctx.delete(&w.key),
                    }
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
            kv_request::Op::Incr(i) => {
                let cur = match ctx.get(&i.key)? {
                    None => 0,
                    Some(v) => parse_integer(&v).ok_or(NOT_AN_INTEGER)?,
                };
                let new = cur.checked_add(i.delta).ok_or(OVERFLOW)?;
                let new = new.to_string().into_bytes();
                ctx.put(&i.key, &new);
                KvResponse {
                    ok: true,
                    previous: Some(new.into()),
                }
            }
            kv_request::Op::Cas(c) => {
                let cur = ctx.get(&c.key)?;
                let matches = match (&cur, &c.expected) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a[..] == b[..],
                    _ => false,
                };
                if matches && c.delete {
                    ctx.delete(&c.key);
                } else if matches {
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

    fn read(
        &self,
        range: &RangeDescriptor,
        query: &[u8],
        ctx: &ReadContext<'_>,
    ) -> Result<Vec<u8>, ApplyError> {
        KvStateMachine::read_kv(range, query, ctx)
    }
}

/// The refusal of an increment of a value that is not a decimal 64-bit integer (Redis's words,
/// which the Redis protocol passes on).
pub const NOT_AN_INTEGER: &str = "value is not an integer or out of range";
/// The refusal of an increment whose sum overflows.
pub const OVERFLOW: &str = "increment or decrement would overflow";

/// `v` as a canonical decimal i64 (no sign but `-`, no leading zeros or spaces), as Redis
/// reads a counter.
fn parse_integer(v: &[u8]) -> Option<i64> {
    let n: i64 = std::str::from_utf8(v).ok()?.parse().ok()?;
    (n.to_string().as_bytes() == v).then_some(n)
}

impl KvStateMachine {
    /// A read of the range's keys: a `KvRead` in, a `KvReadResponse` out.
    fn read_kv(
        range: &RangeDescriptor,
        query: &[u8],
        ctx: &ReadContext<'_>,
    ) -> Result<Vec<u8>, ApplyError> {
        let q = KvRead::decode(query)
            .map_err(|e| ApplyError::Refused(format!("undecodable KvRead: {e}")))?;
        let mut out = KvReadResponse::default();
        match q.op.ok_or("empty KvRead")? {
            kv_read::Op::Get(g) => {
                for k in &g.keys {
                    if !range.contains(k) {
                        return Err(ApplyError::Refused(format!(
                            "key {k:02x?} is outside range {}",
                            range.range_id
                        )));
                    }
                    let v = ctx.get(k)?;
                    out.values.push(Value {
                        found: v.is_some(),
                        value: v.unwrap_or_default().into(),
                    });
                }
            }
            kv_read::Op::Scan(s) => {
                // Never past the range: the keys beyond it belong to (and are read through)
                // another range.
                let start = s.start.max(range.start_key.clone());
                let end = match (&s.end[..], &range.end_key[..]) {
                    (b"", e) | (e, b"") => e.to_vec(),
                    (a, b) => a.min(b).to_vec(),
                };
                let limit = usize::try_from(s.limit).unwrap_or(usize::MAX);
                if end.is_empty() || start[..] < end[..] {
                    for (key, value) in ctx.scan(&start, &end, limit)? {
                        out.pairs.push(Put {
                            key: key.into(),
                            value: value.into(),
                        });
                    }
                }
            }
        }
        Ok(out.encode_to_vec())
    }
}
