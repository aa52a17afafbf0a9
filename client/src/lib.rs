//! Flotilla's client library.
//!
//! A [`Client`] knows the client addresses of the nodes, learns their ids, and keeps a cache
//! of range descriptors and leaders, filled on demand (a `Locate` lookup on a miss, or the
//! whole table at once with [`Client::load_ranges`]) and corrected by what nodes answer:
//! `NOT_LEADER` names the leader to go to, `EPOCH_NOT_MATCH` brings the descriptors of a range
//! that split or merged. Requests go straight to the leader's node, carrying the range and
//! epoch they were routed with (so a node refuses rather than forwards them when the route is
//! stale, and the cache is corrected).
//!
//! Requests of concurrent callers to the same node travel together: one long-lived
//! bidirectional gRPC stream per node (`Kv.Batch`) carries many requests per frame, matched by
//! id; a node proposes the writes of one frame to each range as one raft entry. The unary API
//! ([`Transport::Unary`]) is the same protocol one request per RPC, what a client in another
//! language would use.
//!
//! Every write carries a request id (a client id and a sequence number): retries after a lost
//! answer, a node going down, a leader change or an unknown outcome reuse it, and the range
//! applies a request id at most once (its retry records follow splits and merges), so a
//! retried write never applies twice. Retries back off exponentially until the request's
//! deadline, after which the caller gets [`Error::DeadlineExceeded`], which says whether a
//! write may have been applied.
//!
//! ```no_run
//! # async fn demo() -> flotilla_client::Result<()> {
//! use flotilla_client::{Client, ClientConfig};
//!
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:8001", "127.0.0.1:8002"])).await?;
//! client.put("key", "value").await?;
//! assert_eq!(client.get("key").await?.as_deref(), Some(&b"value"[..]));
//! // Puts of several ranges: each range's part is applied atomically.
//! client.multi_put([("a", "1"), ("b", "2")]).await?;
//! // Conditional writes, deletes, scans and batched reads.
//! client.compare_and_set("key", Some("value".into()), Some("v2".into())).await?;
//! client.delete("a").await?;
//! let page = client.scan("a", "z", 100, None).await?;
//! let values = client.batch_get(["a", "b"]).await?;
//! # let _ = (page, values);
//! // A shorter deadline for one call.
//! client.with_timeout(std::time::Duration::from_millis(500)).put("k", "v").await?;
//! # Ok(()) }
//! ```

mod cache;
mod error;
mod node;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use bytes::Bytes;
use flotilla_proto::admin::admin_client::AdminClient;
use flotilla_proto::admin::RangesRequest;
use flotilla_proto::kv::batch_request::request::Cmd;
use flotilla_proto::kv::batch_response::response::Result as Reply;
use flotilla_proto::kv::kv_client::KvClient;
use flotilla_proto::kv::kv_error::Kind;
use flotilla_proto::kv::{
    BatchGetRequest, CompareAndSetRequest, DeleteRequest, GetRequest, InsertRequest, KeyValue,
    LocateRequest, MultiPutRequest, PutRequest, RouteContext, ScanRequest, StatusRequest,
};
use flotilla_proto::meta::RangeDescriptor;
use parking_lot::{Mutex, RwLock};
use tonic::transport::Endpoint;

pub use cache::CachedRange;
pub use error::{Error, Result};
use node::{Failure, FrameStats, Node};

/// How requests travel to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// One `Batch` stream per node; concurrent requests share frames. The default.
    #[default]
    Stream,
    /// One unary RPC per request.
    Unary,
}

/// How a [`Client`] connects and retries. Start from [`ClientConfig::new`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Client addresses of the nodes (`host:port` or `http://host:port`). One is enough to
    /// start; give all of them so that the client can reach any leader.
    pub endpoints: Vec<String>,
    /// How requests travel. Default [`Transport::Stream`].
    pub transport: Transport,
    /// A request's deadline, retries included (see [`Client::with_timeout`]). Default 10 s.
    pub timeout: Duration,
    /// Longest wait for one attempt's answer; past it the attempt counts as lost and the
    /// request is retried (same request id) elsewhere or later. Default 3 s.
    pub attempt_timeout: Duration,
    /// Time to connect to a node. Default 1 s.
    pub connect_timeout: Duration,
    /// First wait between retries; it doubles up to `backoff_max` (with jitter). Redirects to
    /// a named leader or fresh range descriptors are retried at once. Default 5 ms.
    pub backoff_initial: Duration,
    /// Longest wait between retries. Default 200 ms.
    pub backoff_max: Duration,
    /// How long a node that did not answer is avoided when another can serve. Default 1 s.
    pub down_for: Duration,
    /// Most requests in one frame of a `Batch` stream. Default 256.
    pub max_batch: usize,
    /// TLS to the nodes' client API (the CA that signed their certificates, this client's
    /// certificate for nodes that require one); `None`, the default: plaintext.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoints: Vec::new(),
            transport: Transport::Stream,
            timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(5),
            backoff_max: Duration::from_millis(200),
            down_for: Duration::from_secs(1),
            max_batch: 256,
            tls: None,
        }
    }
}

impl ClientConfig {
    /// The default config for these endpoints.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> ClientConfig {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..ClientConfig::default()
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |why: &str| Err(Error::Config(why.into()));
        if self.endpoints.is_empty() {
            return bad("no endpoints");
        }
        if self.timeout.is_zero() || self.attempt_timeout.is_zero() {
            return bad("timeout and attempt_timeout must be non-zero");
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout must be non-zero");
        }
        if self.max_batch == 0 {
            return bad("max_batch must be at least 1");
        }
        if self.backoff_initial > self.backoff_max {
            return bad("backoff_initial must not exceed backoff_max");
        }
        Ok(())
    }
}

/// Counters of a client since it started, to see which paths requests took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Calls (a multi-put counts once per range part).
    pub requests: u64,
    /// Attempts sent to nodes (first tries and retries).
    pub attempts: u64,
    /// `NOT_LEADER` answers (the cache's leader was stale or unknown).
    pub not_leader: u64,
    /// `EPOCH_NOT_MATCH` answers (a range split or merged since it was cached).
    pub epoch_not_match: u64,
    /// Attempts that got no answer (node down, stream broken, attempt timeout).
    pub no_answer: u64,
    /// `Locate` lookups (cache misses).
    pub lookups: u64,
    /// Frames sent on `Batch` streams.
    pub frames: u64,
    /// Requests sent in those frames.
    pub framed_requests: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    attempts: AtomicU64,
    not_leader: AtomicU64,
    epoch_not_match: AtomicU64,
    no_answer: AtomicU64,
    lookups: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A request id: (client id, sequence number).
type RequestId = (u64, u64);

/// A client id and its next sequence number. A session serves one request at a time, so
/// that its sequence numbers reach each range in order (what the range's retry record needs).
#[derive(Debug)]
struct Session {
    client_id: u64,
    next_seq: u64,
}

impl Session {
    fn next_id(&mut self) -> RequestId {
        let id = (self.client_id, self.next_seq);
        self.next_seq += 1;
        id
    }
}

/// The outcome of a conditional write ([`Client::compare_and_set`],
/// [`Client::insert_if_absent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasOutcome {
    /// The condition held and the write was applied.
    pub succeeded: bool,
    /// The key's value now: the new one after a success (`None` after a delete), the one that
    /// did not match after a failure.
    pub current: Option<Bytes>,
}

/// One page of [`Client::scan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// The pairs, in key order.
    pub pairs: Vec<(Bytes, Bytes)>,
    /// Where the next page starts (pass it back to [`Client::scan`]); `None`: the interval is
    /// exhausted.
    pub continuation: Option<Bytes>,
}

/// A request as the retry loop handles it.
#[derive(Debug, Clone)]
enum Op {
    Put(Bytes, Bytes),
    MultiPut(Vec<KeyValue>),
    Get(Bytes),
    Delete(Bytes),
    Insert(Bytes, Bytes),
    /// Key, expected value (`None`: absent), new value (`None`: delete).
    Cas(Bytes, Option<Bytes>, Option<Bytes>),
}

impl Op {
    /// The key the request is routed by.
    fn key(&self) -> &[u8] {
        match self {
            Op::Put(k, _) | Op::Get(k) | Op::Delete(k) | Op::Insert(k, _) | Op::Cas(k, _, _) => k,
            Op::MultiPut(kvs) => kvs.first().map_or(&[][..], |kv| &kv.key[..]),
        }
    }

    fn is_write(&self) -> bool {
        !matches!(self, Op::Get(_))
    }
}

/// What a request got.
#[derive(Debug)]
enum Answer {
    Written,
    Value(Option<Bytes>),
    /// A delete: whether the key existed.
    Deleted(bool),
    /// A conditional write.
    Cas(CasOutcome),
}

/// Why the retry loop stopped without an answer.
#[derive(Debug)]
enum Stop {
    Failed(Error),
    /// The keys of a multi-put are no longer in one range: split it again. `maybe_applied`:
    /// an attempt may have been applied (the parts must then keep the request id).
    Regroup {
        maybe_applied: bool,
    },
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

/// Test hooks: lose answers as a broken connection would, and hold the retry that follows.
#[cfg(feature = "testing")]
#[derive(Debug)]
struct Faults {
    lose: std::sync::atomic::AtomicU32,
    lost: std::sync::atomic::AtomicU32,
    hold: std::sync::atomic::AtomicBool,
    gate: tokio::sync::Semaphore,
}

/// A client of a Flotilla cluster; cheap to clone (clones share connections and the cache).
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
    timeout: Duration,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    /// Nodes by id.
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
    /// Endpoints whose node id is not known yet (they did not answer).
    unknown: Mutex<Vec<String>>,
    cache: cache::RangeCache,
    sessions: Mutex<Vec<Session>>,
    counters: Counters,
    frames: Arc<FrameStats>,
    rr: AtomicUsize,
    #[cfg(feature = "testing")]
    faults: Faults,
}

impl Client {
    /// Connects to the nodes of `config.endpoints` and learns their ids.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an unusable config; [`Error::Unreachable`] if no endpoint
    /// answered (those that did not are tried again when needed).
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        config.validate()?;
        let client = Client {
            timeout: config.timeout,
            inner: Arc::new(Inner {
                unknown: Mutex::new(config.endpoints.clone()),
                config,
                nodes: RwLock::new(HashMap::new()),
                cache: Default::default(),
                sessions: Mutex::new(Vec::new()),
                counters: Counters::default(),
                frames: Arc::new(FrameStats::default()),
                rr: AtomicUsize::new(0),
                #[cfg(feature = "testing")]
                faults: Faults {
                    lose: Default::default(),
                    lost: Default::default(),
                    hold: Default::default(),
                    gate: tokio::sync::Semaphore::new(0),
                },
            }),
        };
        let last = client.discover().await;
        if client.inner.nodes.read().is_empty() {
            return Err(Error::Unreachable {
                endpoints: client.inner.config.endpoints.clone(),
                last: last.unwrap_or_default(),
            });
        }
        Ok(client)
    }

    /// This client with another deadline for its requests (retries included).
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            inner: self.inner.clone(),
            timeout,
        }
    }

    /// Writes `key = value`.
    ///
    /// # Errors
    ///
    /// [`Error::DeadlineExceeded`] if no attempt succeeded in time (it says whether the write
    /// may have been applied); [`Error::InvalidRequest`]; [`Error::Server`].
    pub async fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<()> {
        let op = Op::Put(key.into(), value.into());
        self.run(op).await.map(|_| ())
    }

    /// Reads `key` linearizably (from the range's leader).
    ///
    /// # Errors
    ///
    /// As [`Client::put`].
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>> {
        match self.run(Op::Get(key.into())).await? {
            Answer::Value(v) => Ok(v),
            _ => Err(Error::Server("a write's answer to a read".into())),
        }
    }

    /// Deletes `key`; says whether it existed.
    ///
    /// # Errors
    ///
    /// As [`Client::put`].
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<bool> {
        match self.run(Op::Delete(key.into())).await? {
            Answer::Deleted(existed) => Ok(existed),
            _ => Err(Error::Server("another answer to a delete".into())),
        }
    }

    /// Writes `key = value` only if `key` does not exist.
    ///
    /// # Errors
    ///
    /// As [`Client::put`].
    pub async fn insert_if_absent(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<CasOutcome> {
        match self.run(Op::Insert(key.into(), value.into())).await? {
            Answer::Cas(c) => Ok(c),
            _ => Err(Error::Server("another answer to an insert".into())),
        }
    }

    /// Compare-and-set: if `key` holds `expected` (`None`: if it does not exist), writes
    /// `new` (`None`: deletes the key), atomically.
    ///
    /// # Errors
    ///
    /// As [`Client::put`].
    pub async fn compare_and_set(
        &self,
        key: impl Into<Bytes>,
        expected: Option<Bytes>,
        new: Option<Bytes>,
    ) -> Result<CasOutcome> {
        match self.run(Op::Cas(key.into(), expected, new)).await? {
            Answer::Cas(c) => Ok(c),
            _ => Err(Error::Server("another answer to a compare-and-set".into())),
        }
    }

    /// Reads up to `limit` pairs of `[start, end)` (empty `end`: to the end of the key
    /// space; `limit` 0: the node's default, 1000) linearizably, range by range; start at
    /// `continuation` if given (from the previous page of the same interval).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] for an empty interval or a foreign continuation;
    /// [`Error::DeadlineExceeded`] if no node answered in time.
    pub async fn scan(
        &self,
        start: impl Into<Bytes>,
        end: impl Into<Bytes>,
        limit: u32,
        continuation: Option<Bytes>,
    ) -> Result<ScanPage> {
        let req = ScanRequest {
            start: start.into(),
            end: end.into(),
            limit,
            consistency: 0,
            continuation: continuation.unwrap_or_default(),
        };
        let r = self
            .on_any_node(|mut kv| {
                let req = req.clone();
                async move { kv.scan(req).await }
            })
            .await?;
        Ok(ScanPage {
            pairs: r.pairs.into_iter().map(|kv| (kv.key, kv.value)).collect(),
            continuation: Some(r.continuation).filter(|c| !c.is_empty()),
        })
    }

    /// Reads several keys linearizably (the node groups them by range); the values come in
    /// the order of `keys`.
    ///
    /// # Errors
    ///
    /// As [`Client::scan`].
    pub async fn batch_get<K: Into<Bytes>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<Option<Bytes>>> {
        let req = BatchGetRequest {
            keys: keys.into_iter().map(Into::into).collect(),
            consistency: 0,
        };
        let n = req.keys.len();
        let r = self
            .on_any_node(|mut kv| {
                let req = req.clone();
                async move { kv.batch_get(req).await }
            })
            .await?;
        if r.values.len() != n {
            return Err(Error::Server("a batch get without a value per key".into()));
        }
        Ok(r.values
            .into_iter()
            .map(|g| g.found.then_some(g.value))
            .collect())
    }

    /// Runs a read that any node serves (it reads each range on its own replica), trying the
    /// nodes in turn until one answers or the deadline passes.
    async fn on_any_node<T, F, Fut>(&self, mut call: F) -> Result<T>
    where
        F: FnMut(KvClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let cfg = &self.inner.config;
        let deadline = Instant::now() + self.timeout;
        let mut backoff = cfg.backoff_initial;
        let mut attempts = 0u32;
        let mut last = String::from("no attempt was made");
        bump(&self.inner.counters.requests);
        loop {
            for node in self.nodes_in_order() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                attempts += 1;
                bump(&self.inner.counters.attempts);
                let timeout = left.min(cfg.attempt_timeout);
                let failure = match tokio::time::timeout(timeout, call(node.kv.clone())).await {
                    Ok(Ok(r)) => {
                        node.mark_up();
                        return Ok(r.into_inner());
                    }
                    Ok(Err(status)) => Failure::from_status(&status),
                    Err(_) => Failure::NoAnswer {
                        why: format!("no answer within {timeout:?}"),
                        sent: true,
                    },
                };
                last = failure.describe();
                match failure {
                    Failure::Refused(e)
                        if matches!(e.kind(), Kind::InvalidArgument | Kind::Refused) =>
                    {
                        return Err(Error::InvalidRequest(e.message));
                    }
                    Failure::Garbled(why) => return Err(Error::Server(why)),
                    Failure::NoAnswer { .. } => {
                        bump(&self.inner.counters.no_answer);
                        node.mark_down(cfg.down_for);
                    }
                    Failure::Refused(_) => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::DeadlineExceeded {
                    timeout: self.timeout,
                    attempts,
                    last,
                    outcome_unknown: false,
                });
            }
            self.sleep(&mut backoff, deadline).await;
        }
    }

    /// Writes every pair: the pairs are grouped by range and each group is written as one
    /// multi-put, applied atomically in its range; the groups are sent concurrently and are
    /// not atomic together. Resolves once every group is applied.
    ///
    /// # Errors
    ///
    /// As [`Client::put`]; the first group's error if several fail (other groups may have
    /// been applied).
    pub async fn multi_put<K: Into<Bytes>, V: Into<Bytes>>(
        &self,
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<()> {
        let puts: Vec<KeyValue> = pairs
            .into_iter()
            .map(|(k, v)| KeyValue {
                key: k.into(),
                value: v.into(),
            })
            .collect();
        if puts.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        let mut sessions = Vec::new();
        let result = self.multi_put_until(puts, deadline, &mut sessions).await;
        self.inner.sessions.lock().extend(sessions);
        result
    }

    async fn multi_put_until(
        &self,
        puts: Vec<KeyValue>,
        deadline: Instant,
        sessions: &mut Vec<Session>,
    ) -> Result<()> {
        // Parts to send: pairs, and the request id they must keep (a part that may have been
        // applied is split again under its id: the ranges that came out of its range hold its
        // retry record).
        let mut todo: Vec<(Vec<KeyValue>, Option<RequestId>)> = vec![(puts, None)];
        let mut backoff = self.inner.config.backoff_initial;
        while !todo.is_empty() {
            let mut parts = Vec::new();
            for (puts, id) in todo.drain(..) {
                for group in self.group_by_range(puts, deadline).await {
                    let id = match id {
                        Some(id) => id,
                        None => {
                            let mut s = self.take_session();
                            let id = s.next_id();
                            sessions.push(s);
                            id
                        }
                    };
                    parts.push((group, id));
                }
            }
            let results =
                futures_util::future::join_all(parts.iter().map(|(puts, id)| {
                    self.execute(Op::MultiPut(puts.clone()), Some(*id), deadline)
                }))
                .await;
            let mut first_error = None;
            for ((puts, id), r) in parts.into_iter().zip(results) {
                match r {
                    Ok(_) => {}
                    Err(Stop::Regroup { maybe_applied }) => {
                        todo.push((puts, maybe_applied.then_some(id)));
                    }
                    Err(Stop::Failed(e)) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            if !todo.is_empty() {
                self.sleep(&mut backoff, deadline).await;
            }
        }
        Ok(())
    }

    /// Splits `puts` by the cached range of each key (looking keys up as needed).
    async fn group_by_range(&self, puts: Vec<KeyValue>, deadline: Instant) -> Vec<Vec<KeyValue>> {
        let mut groups: BTreeMap<u64, Vec<KeyValue>> = BTreeMap::new();
        for kv in puts {
            let range = match self.inner.cache.lookup(&kv.key) {
                Some(r) => Some(r),
                None => self.locate(&kv.key, deadline).await.ok(),
            };
            // A key that cannot be looked up now goes with range 0: its part retries the
            // lookup.
            groups
                .entry(range.map_or(0, |r| r.desc.range_id))
                .or_default()
                .push(kv);
        }
        groups.into_values().collect()
    }

    /// Reads the whole range table from one node into the cache (instead of looking ranges
    /// up one by one as requests need them). Returns the number of ranges.
    ///
    /// # Errors
    ///
    /// [`Error::Unreachable`] if no node answered.
    pub async fn load_ranges(&self) -> Result<usize> {
        let mut last = String::new();
        for node in self.nodes_in_order() {
            let mut admin = AdminClient::new(node.channel.clone());
            let call = admin.ranges(RangesRequest {});
            match tokio::time::timeout(self.inner.config.attempt_timeout, call).await {
                Ok(Ok(r)) => {
                    let ranges = r.into_inner().ranges;
                    let n = ranges.len();
                    for info in ranges {
                        let desc = RangeDescriptor {
                            range_id: info.range_id,
                            start_key: info.start_key,
                            end_key: info.end_key,
                            epoch: info.epoch,
                            replicas: info.replicas,
                            ..Default::default()
                        };
                        let leader = (info.leader_node_id != 0).then_some(info.leader_node_id);
                        self.inner.cache.insert(desc, leader);
                    }
                    return Ok(n);
                }
                Ok(Err(status)) => last = status.to_string(),
                Err(_) => last = "timed out".into(),
            }
        }
        Err(Error::Unreachable {
            endpoints: self.inner.config.endpoints.clone(),
            last,
        })
    }

    /// The cached ranges, in key order.
    pub fn cached_ranges(&self) -> Vec<CachedRange> {
        self.inner.cache.all()
    }

    /// The nodes whose id the client knows: (id, endpoint).
    pub fn nodes(&self) -> Vec<(u64, String)> {
        let mut v: Vec<_> = self
            .inner
            .nodes
            .read()
            .values()
            .map(|n| (n.id, n.endpoint.clone()))
            .collect();
        v.sort();
        v
    }

    /// The client's counters.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientStats {
            requests: get(&c.requests),
            attempts: get(&c.attempts),
            not_leader: get(&c.not_leader),
            epoch_not_match: get(&c.epoch_not_match),
            no_answer: get(&c.no_answer),
            lookups: get(&c.lookups),
            frames: get(&self.inner.frames.frames),
            framed_requests: get(&self.inner.frames.requests),
        }
    }

    /// Runs a single-key request with a fresh request id (writes) until its deadline.
    async fn run(&self, op: Op) -> Result<Answer> {
        let deadline = Instant::now() + self.timeout;
        let mut session = op.is_write().then(|| self.take_session());
        let id = session.as_mut().map(Session::next_id);
        let result = self.execute(op, id, deadline).await;
        if let Some(s) = session {
            self.inner.sessions.lock().push(s);
        }
        match result {
            Ok(a) => Ok(a),
            Err(Stop::Failed(e)) => Err(e),
            Err(Stop::Regroup { .. }) => Err(Error::Server("a single key spans ranges".into())),
        }
    }

    fn take_session(&self) -> Session {
        self.inner.sessions.lock().pop().unwrap_or_else(|| Session {
            client_id: rand::random::<u64>() | 1,
            next_seq: 1,
        })
    }

    /// The retry loop: route, send, and act on the answer, until an answer or the deadline.
    async fn execute(
        &self,
        op: Op,
        id: Option<RequestId>,
        deadline: Instant,
    ) -> Result<Answer, Stop> {
        let cfg = &self.inner.config;
        let counters = &self.inner.counters;
        bump(&counters.requests);
        let mut attempts = 0u32;
        let mut last = String::from("no attempt was made");
        let mut maybe_applied = false;
        let mut backoff = cfg.backoff_initial;
        let mut avoid: Option<u64> = None;
        let mut redirects = 0u32;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Stop::Failed(Error::DeadlineExceeded {
                    timeout: self.timeout,
                    attempts,
                    last,
                    outcome_unknown: maybe_applied && op.is_write(),
                }));
            }
            let (range, node) = match self.route(op.key(), avoid.take(), deadline).await {
                Ok(r) => r,
                Err(f) => {
                    last = f.describe();
                    self.sleep(&mut backoff, deadline).await;
                    continue;
                }
            };
            if let Op::MultiPut(puts) = &op {
                if puts.iter().any(|kv| !range.desc.contains(&kv.key)) {
                    return Err(Stop::Regroup { maybe_applied });
                }
            }
            attempts += 1;
            bump(&counters.attempts);
            let route = RouteContext {
                range_id: range.desc.range_id,
                epoch: range.desc.epoch,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let failure = match self
                .attempt(&node, &op, route, id, left.min(cfg.attempt_timeout))
                .await
            {
                Ok(answer) => {
                    node.mark_up();
                    // A routed write is only served by the leader (a read by any replica).
                    if op.is_write() && range.leader != Some(node.id) {
                        self.inner
                            .cache
                            .set_leader(range.desc.range_id, Some(node.id));
                    }
                    return Ok(answer);
                }
                Err(f) => f,
            };
            last = failure.describe();
            // Whether to go again at once (a redirect to a named, reachable leader, or fresh
            // descriptors); a few in a row and the backoff applies again.
            let mut at_once = false;
            match failure {
                Failure::Refused(e) => match e.kind() {
                    Kind::NotLeader => {
                        bump(&counters.not_leader);
                        let hint = Some(e.leader_node_id).filter(|&l| l != 0 && l != node.id);
                        self.inner.cache.set_leader(range.desc.range_id, hint);
                        match hint {
                            Some(l) => at_once = self.node(l).is_some_and(|n| !n.is_down()),
                            None => avoid = Some(node.id),
                        }
                    }
                    Kind::EpochNotMatch => {
                        bump(&counters.epoch_not_match);
                        let mut learned = false;
                        for d in e.current {
                            learned |= self.inner.cache.insert(d, None);
                        }
                        if learned {
                            at_once = true;
                        } else {
                            // This node's view is older than ours (or it said nothing): ask
                            // another one, and look the range up again.
                            self.inner.cache.invalidate(range.desc.range_id);
                            avoid = Some(node.id);
                        }
                    }
                    Kind::KeyNotInRange | Kind::RangeNotFound => {
                        self.inner.cache.invalidate(range.desc.range_id);
                        avoid = Some(node.id);
                    }
                    Kind::ProposalDropped => maybe_applied = true,
                    Kind::Busy => {}
                    Kind::Stopped | Kind::Internal | Kind::Unspecified => {
                        node.mark_down(cfg.down_for);
                        self.inner.cache.forget_leader_on(node.id);
                    }
                    Kind::InvalidArgument | Kind::Refused => {
                        return Err(Stop::Failed(Error::InvalidRequest(e.message)));
                    }
                },
                Failure::NoAnswer { sent, .. } => {
                    bump(&counters.no_answer);
                    maybe_applied |= sent;
                    node.mark_down(cfg.down_for);
                    self.inner.cache.forget_leader_on(node.id);
                    #[cfg(feature = "testing")]
                    if self.inner.faults.hold.load(Ordering::Acquire) {
                        if let Ok(p) = self.inner.faults.gate.acquire().await {
                            p.forget();
                        }
                    }
                }
                Failure::Garbled(why) => return Err(Stop::Failed(Error::Server(why))),
            }
            if at_once && redirects < 3 {
                redirects += 1;
            } else {
                redirects = 0;
                self.sleep(&mut backoff, deadline).await;
            }
        }
    }

    /// One attempt on `node`.
    async fn attempt(
        &self,
        node: &Node,
        op: &Op,
        route: RouteContext,
        id: Option<RequestId>,
        timeout: Duration,
    ) -> Result<Answer, Failure> {
        let (client_id, seq) = id.unwrap_or((0, 0));
        let route = Some(route);
        let answer = match self.inner.config.transport {
            Transport::Stream => {
                let cmd = match op {
                    Op::Put(k, v) => Cmd::Put(PutRequest {
                        key: k.clone(),
                        value: v.clone(),
                        client_id,
                        seq,
                        route,
                    }),
                    Op::MultiPut(puts) => Cmd::MultiPut(MultiPutRequest {
                        puts: puts.clone(),
                        client_id,
                        seq,
                        route,
                    }),
                    Op::Get(k) => Cmd::Get(GetRequest {
                        key: k.clone(),
                        stale: false,
                        route,
                        consistency: 0,
                    }),
                    Op::Delete(k) => Cmd::Delete(DeleteRequest {
                        key: k.clone(),
                        client_id,
                        seq,
                        route,
                    }),
                    Op::Insert(k, v) => Cmd::Insert(InsertRequest {
                        key: k.clone(),
                        value: v.clone(),
                        client_id,
                        seq,
                        route,
                    }),
                    Op::Cas(k, expected, new) => {
                        Cmd::Cas(cas_request(k, expected, new, client_id, seq, route))
                    }
                };
                let r = node
                    .call(
                        cmd,
                        timeout,
                        self.inner.config.max_batch,
                        &self.inner.frames,
                    )
                    .await?;
                if let Some(e) = r.error {
                    return Err(Failure::Refused(e));
                }
                match r.result {
                    Some(Reply::Put(_) | Reply::MultiPut(_)) => Answer::Written,
                    Some(Reply::Get(g)) => Answer::Value(g.found.then_some(g.value)),
                    Some(Reply::Delete(d)) => Answer::Deleted(d.deleted),
                    Some(Reply::Insert(i)) => Answer::Cas(CasOutcome {
                        succeeded: i.inserted,
                        current: Some(if i.inserted { op_value(op) } else { i.current }),
                    }),
                    Some(Reply::Cas(c)) => Answer::Cas(CasOutcome {
                        succeeded: c.succeeded,
                        current: c.found.then_some(c.current),
                    }),
                    None => return Err(Failure::Garbled("an answer without a result".into())),
                }
            }
            Transport::Unary => {
                let mut kv = node.kv.clone();
                let unary = async {
                    match op {
                        Op::Put(k, v) => {
                            let req = PutRequest {
                                key: k.clone(),
                                value: v.clone(),
                                client_id,
                                seq,
                                route,
                            };
                            kv.put(req).await.map(|_| Answer::Written)
                        }
                        Op::MultiPut(puts) => {
                            let req = MultiPutRequest {
                                puts: puts.clone(),
                                client_id,
                                seq,
                                route,
                            };
                            kv.multi_put(req).await.map(|_| Answer::Written)
                        }
                        Op::Get(k) => {
                            let req = GetRequest {
                                key: k.clone(),
                                stale: false,
                                route,
                                consistency: 0,
                            };
                            kv.get(req).await.map(|r| {
                                let g = r.into_inner();
                                Answer::Value(g.found.then_some(g.value))
                            })
                        }
                        Op::Delete(k) => {
                            let req = DeleteRequest {
                                key: k.clone(),
                                client_id,
                                seq,
                                route,
                            };
                            kv.delete(req)
                                .await
                                .map(|r| Answer::Deleted(r.into_inner().deleted))
                        }
                        Op::Insert(k, v) => {
                            let req = InsertRequest {
                                key: k.clone(),
                                value: v.clone(),
                                client_id,
                                seq,
                                route,
                            };
                            kv.insert(req).await.map(|r| {
                                let i = r.into_inner();
                                Answer::Cas(CasOutcome {
                                    succeeded: i.inserted,
                                    current: Some(if i.inserted { v.clone() } else { i.current }),
                                })
                            })
                        }
                        Op::Cas(k, expected, new) => {
                            let req = cas_request(k, expected, new, client_id, seq, route);
                            kv.compare_and_set(req).await.map(|r| {
                                let c = r.into_inner();
                                Answer::Cas(CasOutcome {
                                    succeeded: c.succeeded,
                                    current: c.found.then_some(c.current),
                                })
                            })
                        }
                    }
                };
                match tokio::time::timeout(timeout, unary).await {
                    Ok(Ok(a)) => a,
                    Ok(Err(status)) => return Err(Failure::from_status(&status)),
                    Err(_) => {
                        return Err(Failure::NoAnswer {
                            why: format!("no answer within {timeout:?}"),
                            sent: true,
                        })
                    }
                }
            }
        };
        #[cfg(feature = "testing")]
        if op.is_write() {
            let f = &self.inner.faults;
            if f.lose
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
            {
                f.lost.fetch_add(1, Ordering::AcqRel);
                return Err(Failure::NoAnswer {
                    why: "answer lost (test fault)".into(),
                    sent: true,
                });
            }
        }
        Ok(answer)
    }

    /// The range of `key` and the node to send to: the cached leader if it is up, else a
    /// replica's node (not `avoid`), in turn.
    async fn route(
        &self,
        key: &[u8],
        avoid: Option<u64>,
        deadline: Instant,
    ) -> Result<(Arc<CachedRange>, Arc<Node>), Failure> {
        let range = match self.inner.cache.lookup(key) {
            Some(r) => r,
            None => self.locate(key, deadline).await?,
        };
        if let Some(leader) = range.leader.filter(|l| Some(*l) != avoid) {
            if let Some(n) = self.node_or_discover(leader).await {
                if !n.is_down() {
                    return Ok((range, n));
                }
            }
        }
        let replicas: Vec<u64> = range.desc.replicas.iter().map(|r| r.node_id).collect();
        let start = self.inner.rr.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for i in 0..replicas.len() {
            let id = replicas[(start + i) % replicas.len()];
            let Some(n) = self.node_or_discover(id).await else {
                continue;
            };
            if n.is_down() || Some(id) == avoid {
                fallback.get_or_insert(n);
                continue;
            }
            return Ok((range, n));
        }
        // Every replica is down or avoided: try one anyway (it may be back).
        match fallback {
            Some(n) => Ok((range, n)),
            None => Err(Failure::NoAnswer {
                why: format!("no known node hosts range {}", range.desc.range_id),
                sent: false,
            }),
        }
    }

    /// Looks `key` up on the nodes in turn and caches what the first that knows says.
    async fn locate(&self, key: &[u8], deadline: Instant) -> Result<Arc<CachedRange>, Failure> {
        bump(&self.inner.counters.lookups);
        let mut last = Failure::NoAnswer {
            why: "no node known".into(),
            sent: false,
        };
        for node in self.nodes_in_order() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut kv = node.kv.clone();
            let call = kv.locate(LocateRequest {
                key: Bytes::copy_from_slice(key),
            });
            let timeout = left.min(self.inner.config.attempt_timeout);
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    let Some(desc) = r.range else { continue };
                    let leader = Some(r.leader_node_id).filter(|&l| l != 0);
                    self.inner.cache.insert(desc.clone(), leader);
                    return Ok(self
                        .inner
                        .cache
                        .lookup(key)
                        .unwrap_or_else(|| Arc::new(CachedRange { desc, leader })));
                }
                Ok(Err(status)) => {
                    last = Failure::from_status(&status);
                    if matches!(last, Failure::NoAnswer { .. }) {
                        node.mark_down(self.inner.config.down_for);
                    }
                }
                Err(_) => {
                    last = Failure::NoAnswer {
                        why: format!("lookup timed out after {timeout:?}"),
                        sent: false,
                    };
                }
            }
        }
        Err(last)
    }

    fn node(&self, id: u64) -> Option<Arc<Node>> {
        self.inner.nodes.read().get(&id).cloned()
    }

    /// Node `id`, asking the endpoints whose id is unknown if it is not known yet.
    async fn node_or_discover(&self, id: u64) -> Option<Arc<Node>> {
        if let Some(n) = self.node(id) {
            return Some(n);
        }
        if self.inner.unknown.lock().is_empty() {
            return None;
        }
        self.discover().await;
        self.node(id)
    }

    /// Known nodes, those up first, starting at a rotating position.
    fn nodes_in_order(&self) -> Vec<Arc<Node>> {
        let mut nodes: Vec<Arc<Node>> = self.inner.nodes.read().values().cloned().collect();
        nodes.sort_by_key(|n| n.id);
        if !nodes.is_empty() {
            let k = self.inner.rr.fetch_add(1, Ordering::Relaxed) % nodes.len();
            nodes.rotate_left(k);
        }
        nodes.sort_by_key(|n| n.is_down());
        nodes
    }

    /// Asks every endpoint whose node id is unknown for it (`Status`); those that answer
    /// become known nodes. Returns the last failure, if any.
    async fn discover(&self) -> Option<String> {
        let endpoints = std::mem::take(&mut *self.inner.unknown.lock());
        let cfg = &self.inner.config;
        let asks = endpoints.into_iter().map(|endpoint| async move {
            let uri = if endpoint.contains("://") {
                endpoint.clone()
            } else if cfg.tls.is_some() {
                format!("https://{endpoint}")
            } else {
                format!("http://{endpoint}")
            };
            let endpoint_with_tls = Endpoint::from_shared(uri).and_then(|e| match &cfg.tls {
                Some(tls) => e.tls_config(tls.clone()),
                None => Ok(e),
            });
            let channel = match endpoint_with_tls {
                Ok(e) => e
                    .connect_timeout(cfg.connect_timeout)
                    .tcp_nodelay(true)
                    .connect_lazy(),
                Err(e) => return (endpoint, Err(format!("bad endpoint: {e}"))),
            };
            let mut kv = KvClient::new(channel.clone());
            let status = tokio::time::timeout(cfg.connect_timeout, kv.status(StatusRequest {}));
            let id = match status.await {
                Ok(Ok(r)) => Ok((r.into_inner().node_id, channel)),
                Ok(Err(s)) => Err(s.to_string()),
                Err(_) => Err("timed out".to_string()),
            };
            (endpoint, id)
        });
        let mut last = None;
        for (endpoint, result) in futures_util::future::join_all(asks).await {
            match result {
                Ok((id, channel)) => {
                    let node: Arc<Node> = Arc::new(Node::new(id, endpoint, channel));
                    self.inner.nodes.write().entry(id).or_insert(node);
                }
                Err(why) => {
                    last = Some(format!("{endpoint}: {why}"));
                    self.inner.unknown.lock().push(endpoint);
                }
            }
        }
        last
    }

    /// Waits the current backoff (with jitter, never past `deadline`) and doubles it.
    async fn sleep(&self, backoff: &mut Duration, deadline: Instant) {
        let jitter = 0.5 + rand::random::<f64>() / 2.0;
        let wait = backoff.mul_f64(jitter);
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(wait.min(left)).await;
        *backoff = (*backoff * 2).min(self.inner.config.backoff_max);
    }
}

/// The value an insert writes.
fn op_value(op: &Op) -> Bytes {
    match op {
        Op::Insert(_, v) => v.clone(),
        _ => Bytes::new(),
    }
}

fn cas_request(
    key: &Bytes,
    expected: &Option<Bytes>,
    new: &Option<Bytes>,
    client_id: u64,
    seq: u64,
    route: Option<RouteContext>,
) -> CompareAndSetRequest {
    CompareAndSetRequest {
        key: key.clone(),
        expected: expected.clone(),
        value: new.clone().unwrap_or_default(),
        delete: new.is_none(),
        client_id,
        seq,
        route,
    }
}

/// Test hooks (feature `testing`).
#[cfg(feature = "testing")]
impl Client {
    /// The next `n` answers to writes are dropped after the node sent them, as a connection
    /// broken at that moment would: the client retries with the same request id. With
    /// `hold`, each retry after a lost answer (or any attempt without answer) waits for
    /// [`Client::release_retries`].
    pub fn lose_answers(&self, n: u32, hold: bool) {
        let f = &self.inner.faults;
        f.hold.store(hold, Ordering::Release);
        f.lose.store(n, Ordering::Release);
    }

    /// Answers dropped by [`Client::lose_answers`] so far.
    pub fn lost_answers(&self) -> u32 {
        self.inner.faults.lost.load(Ordering::Acquire)
    }

    /// Lets `n` held retries go.
    pub fn release_retries(&self, n: usize) {
        self.inner.faults.gate.add_permits(n);
    }
}
