//! The client KV API of a node over gRPC (`flotilla.kv.Kv`, see proto/proto/kv.proto), and the
//! one mapping from runtime errors to what a client sees ([`kv_error`], and [`to_status`] for
//! unary calls).
//!
//! Writes go through [`NodeGroup::kv_batch`]: unary writes (put, multi-put, delete, insert,
//! compare-and-set) that arrive together are proposed together (`coalesce`); the writes of one
//! frame of the `Batch` stream are proposed together, one raft entry per range, and each is
//! answered on the stream as soon as it is applied (answers that are ready together share a
//! frame). A request that carries a route (the client routes itself, as the client library
//! does) is answered `NOT_LEADER` by a follower instead of being forwarded, so that the client
//! learns where the leader is; one without is forwarded to the leader through raft.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use flotilla_proto::command::{
    kv_request, CompareAndSet, Delete, InsertIfAbsent, KvRequest, KvResponse, MultiPut, Put,
    Write as WriteCmd, Writes,
};
use flotilla_proto::kv::batch_request::request::Cmd;
use flotilla_proto::kv::batch_response::{self, response::Result as Answer};
use flotilla_proto::kv::kv_error::Kind;
use flotilla_proto::kv::kv_server::{Kv, KvServer};
use flotilla_proto::kv::{
    BatchGetRequest, BatchGetResponse, BatchRequest, BatchResponse, BatchWriteRequest,
    BatchWriteResponse, CompareAndSetRequest, CompareAndSetResponse, DeleteRequest, DeleteResponse,
    GetRequest, GetResponse, InsertRequest, InsertResponse, KeyValue, KvError, LocateRequest,
    LocateResponse, MultiPutRequest, MultiPutResponse, PutRequest, PutResponse, RouteContext,
    ScanRequest, ScanResponse, StatusRequest, StatusResponse,
};
use flotilla_proto::Message as _;
use flotilla_proto::{NodeId, RangeId};
use flotilla_runtime::{Error, KvProposal, NodeGroup, ProposeOptions, Proposed, ReadConsistency};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::coalesce::Coalescer;

/// The response metadata key that names the leader's node id (decimal) on a `NotLeader`
/// status, so that a client can retry on that node without decoding the details.
pub use flotilla_proto::LEADER_NODE_METADATA;

/// Most answers in one frame of the `Batch` stream.
const MAX_ANSWERS_PER_FRAME: usize = 1024;

/// What a client is told about a runtime error: its kind (what to do next), the message, and
/// for redirects the leader's node or the ranges that now cover the key.
pub fn kv_error(e: &Error) -> KvError {
    let mut out = KvError {
        message: e.to_string(),
        ..Default::default()
    };
    let kind = match e {
        Error::NotLeader { range, leader_hint } => {
            out.range_id = range.0;
            out.leader_node_id = leader_hint.map_or(0, |n| n.0);
            Kind::NotLeader
        }
        Error::EpochNotMatch { current } => {
            out.current = current.clone();
            Kind::EpochNotMatch
        }
        Error::KeyNotInRange { .. } => Kind::KeyNotInRange,
        Error::RangeNotFound(range) => {
            out.range_id = range.0;
            Kind::RangeNotFound
        }
        Error::ProposalDropped => Kind::ProposalDropped,
        // The system range (id leases) comes back with a leader: retry after a short wait.
        Error::Busy(_) | Error::SystemUnavailable(_) => Kind::Busy,
        Error::Stopped => Kind::Stopped,
        Error::ProposalTooLarge { .. } | Error::InvalidCommand(_) => Kind::InvalidArgument,
        Error::AdminRefused(_) => Kind::Refused,
        Error::RecoveryRefused { range, .. } => {
            out.range_id = range.0;
            Kind::Refused
        }
        Error::ReplicaFailed(range) => {
            out.range_id = range.0;
            out.message = e.with_sources();
            Kind::Internal
        }
        Error::Config(_)
        | Error::Store(_)
        | Error::BadSnapshot { .. }
        | Error::RaftInit { .. }
        | Error::Spawn { .. }
        | Error::BadAnswer { .. } => {
            out.message = e.with_sources();
            Kind::Internal
        }
    };
    out.set_kind(kind);
    out
}

/// Maps a runtime error to a gRPC status: retryable conditions (leader changes,
/// back-pressure, outcome unknown) are `UNAVAILABLE`, a range that changed shape `ABORTED`, so
/// that clients retry; the [`KvError`] is in the status's details (read it with
/// `KvError::from_status`) and the leader hint, when known, also in the
/// [`LEADER_NODE_METADATA`] metadata (see [`leader_hint`]).
pub fn to_status(e: Error) -> Status {
    kv_error(&e).to_status()
}

/// The leader's node named by a status from [`to_status`], if it carries one.
pub fn leader_hint(status: &Status) -> Option<NodeId> {
    let v = status.metadata().get(LEADER_NODE_METADATA)?;
    v.to_str().ok()?.parse().ok().map(NodeId)
}

/// The KV service over one NodeGroup.
#[derive(Debug, Clone)]
pub struct KvService {
    node: Arc<NodeGroup>,
    /// Unary writes of concurrent callers go to the runtime together (see `coalesce`).
    unary: Arc<Coalescer>,
    /// Set to end every `Batch` stream (shutdown): a long-lived stream would otherwise hold
    /// the server's graceful shutdown until its client goes away.
    stop: Arc<watch::Sender<bool>>,
}

impl KvService {
    /// The service over `node`.
    pub fn new(node: Arc<NodeGroup>) -> KvService {
        KvService {
            unary: Arc::new(Coalescer::new(node.clone())),
            node,
            stop: Arc::new(watch::channel(false).0),
        }
    }

    /// A tonic server for `node`.
    pub fn server(node: Arc<NodeGroup>) -> KvServer<KvService> {
        KvServer::new(KvService::new(node))
    }

    /// Stops taking requests on the open `Batch` streams: each ends once the answers in
    /// flight are sent (a stopped NodeGroup fails them at once). For a shutdown.
    pub fn stop_streams(&self) {
        self.stop.send_replace(true);
    }
}

/// A write as the runtime takes it: routed by the caller if it sent a route, else forwarded.
fn proposal(
    request: KvRequest,
    client_id: u64,
    seq: u64,
    route: Option<RouteContext>,
) -> KvProposal {
    KvProposal {
        request,
        opts: ProposeOptions {
            request_id: (client_id != 0).then_some((client_id, seq)),
            epoch: route.and_then(|r| r.epoch),
        },
        range: route.map(|r| RangeId(r.range_id)).filter(|r| r.0 != 0),
        forward: route.is_none(),
    }
}

fn put_proposal(r: PutRequest) -> KvProposal {
    let request = KvRequest {
        op: Some(kv_request::Op::Put(Put {
            key: r.key,
            value: r.value,
        })),
    };
    proposal(request, r.client_id, r.seq, r.route)
}

fn multi_put_proposal(r: MultiPutRequest) -> KvProposal {
    let puts = r
        .puts
        .into_iter()
        .map(|kv| Put {
            key: kv.key,
            value: kv.value,
        })
        .collect();
    let request = KvRequest {
        op: Some(kv_request::Op::MultiPut(MultiPut { puts })),
    };
    proposal(request, r.client_id, r.seq, r.route)
}

fn delete_proposal(r: DeleteRequest) -> KvProposal {
    let request = KvRequest {
        op: Some(kv_request::Op::Delete(Delete { key: r.key })),
    };
    proposal(request, r.client_id, r.seq, r.route)
}

fn insert_proposal(r: InsertRequest) -> KvProposal {
    let request = KvRequest {
        op: Some(kv_request::Op::Insert(InsertIfAbsent {
            key: r.key,
            value: r.value,
        })),
    };
    proposal(request, r.client_id, r.seq, r.route)
}

fn cas_proposal(r: CompareAndSetRequest) -> KvProposal {
    let request = KvRequest {
        op: Some(kv_request::Op::Cas(CompareAndSet {
            key: r.key,
            expected: r.expected,
            value: r.value,
            delete: r.delete,
        })),
    };
    proposal(request, r.client_id, r.seq, r.route)
}

/// What kind of answer a write gets, and what it needs to build it from the state machine's.
#[derive(Debug, Clone)]
enum WriteKind {
    Put,
    MultiPut,
    Delete,
    Insert,
    /// A compare-and-set: the new value (`None`: a delete), reported back on success.
    Cas(Option<flotilla_proto::Bytes>),
}

impl WriteKind {
    /// The answer to a write of this kind from the state machine's encoded `KvResponse`.
    fn answer(&self, raw: &[u8]) -> Result<Answer, Error> {
        let decode = || {
            KvResponse::decode(raw).map_err(|e| Error::BadAnswer {
                what: "kv write",
                reason: e.to_string(),
            })
        };
        Ok(match self {
            WriteKind::Put => Answer::Put(PutResponse {}),
            WriteKind::MultiPut => Answer::MultiPut(MultiPutResponse {}),
            WriteKind::Delete => {
                let r = decode()?;
                Answer::Delete(DeleteResponse {
                    deleted: r.ok,
                    previous: r.previous.unwrap_or_default(),
                })
            }
            WriteKind::Insert => {
                let r = decode()?;
                Answer::Insert(InsertResponse {
                    inserted: r.ok,
                    current: r.previous.unwrap_or_default(),
                })
            }
            WriteKind::Cas(new) => {
                let r = decode()?;
                // After a success the key holds the new value (or nothing); after a failure,
                // the value that did not match.
                let now = if r.ok { new.clone() } else { r.previous };
                Answer::Cas(CompareAndSetResponse {
                    succeeded: r.ok,
                    found: now.is_some(),
                    current: now.unwrap_or_default(),
                })
            }
        })
    }
}

/// Proposes one unary write (with those of other callers queued meanwhile) and waits for its
/// answer.
async fn write(unary: &Coalescer, p: KvProposal, kind: WriteKind) -> Result<Answer, Error> {
    kind.answer(&unary.propose(p).await?)
}

/// The runtime's read consistency for a request's (`stale` wins if set).
fn consistency(c: i32, stale: bool) -> ReadConsistency {
    use flotilla_proto::kv::ReadConsistency as Wire;
    match Wire::try_from(c).unwrap_or(Wire::Linearizable) {
        _ if stale => ReadConsistency::Stale,
        Wire::Linearizable => ReadConsistency::Linearizable,
        Wire::Lease => ReadConsistency::Lease,
        Wire::Stale => ReadConsistency::Stale,
    }
}

/// Most pairs a scan returns per call, and the default.
const MAX_SCAN_LIMIT: u32 = 10_000;
const DEFAULT_SCAN_LIMIT: u32 = 1_000;
/// Most keys of a `BatchGet`, writes of a `BatchWrite`.
const MAX_BATCH_KEYS: usize = 10_000;

/// A scan page of `[start, end)` from the continuation token (the key the page starts at).
async fn scan(node: &NodeGroup, r: ScanRequest) -> Result<ScanResponse, Error> {
    let invalid = |why: &str| Err(Error::InvalidCommand(why.to_string()));
    if !r.end.is_empty() && r.start >= r.end {
        return invalid("scan: start must be before end");
    }
    let from = if r.continuation.is_empty() {
        r.start.clone()
    } else {
        r.continuation.clone()
    };
    if from < r.start || (!r.end.is_empty() && from >= r.end) {
        return invalid("scan: the continuation token is not inside [start, end)");
    }
    let limit = match r.limit {
        0 => DEFAULT_SCAN_LIMIT,
        n => n.min(MAX_SCAN_LIMIT),
    };
    let page = node
        .scan(
            &from,
            &r.end,
            limit as usize,
            consistency(r.consistency, false),
        )
        .await?;
    Ok(ScanResponse {
        pairs: page
            .pairs
            .into_iter()
            .map(|(k, v)| KeyValue {
                key: k.into(),
                value: v.into(),
            })
            .collect(),
        continuation: page.next.unwrap_or_default().into(),
    })
}

async fn batch_get(node: &NodeGroup, r: BatchGetRequest) -> Result<BatchGetResponse, Error> {
    if r.keys.len() > MAX_BATCH_KEYS {
        return Err(Error::InvalidCommand(format!(
            "batch get of {} keys: at most {MAX_BATCH_KEYS}",
            r.keys.len()
        )));
    }
    let keys: Vec<&[u8]> = r.keys.iter().map(|k| &k[..]).collect();
    let values = node
        .get_many(&keys, consistency(r.consistency, false))
        .await?;
    Ok(BatchGetResponse {
        values: values
            .into_iter()
            .map(|v| GetResponse {
                found: v.is_some(),
                value: v.unwrap_or_default().into(),
            })
            .collect(),
    })
}

/// Times a part of a batch write whose range split or merged before it was proposed is
/// grouped again.
const MAX_REGROUPS: usize = 8;

/// Applies puts and deletes of any keys: grouped by this node's ranges, one `Writes` command
/// per range, every part with the request's id (each range records it, so a retry of the
/// whole batch applies nothing twice). A part refused because its range changed shape before
/// it was proposed or applied (nothing applied) is grouped again.
pub(crate) async fn batch_write(
    node: &NodeGroup,
    writes: Vec<WriteCmd>,
    request_id: Option<(u64, u64)>,
) -> Result<(), Error> {
    if writes.len() > MAX_BATCH_KEYS {
        return Err(Error::InvalidCommand(format!(
            "batch write of {} writes: at most {MAX_BATCH_KEYS}",
            writes.len()
        )));
    }
    let mut todo = writes;
    for _ in 0..MAX_REGROUPS {
        let mut groups: Vec<(RangeId, Vec<WriteCmd>)> = Vec::new();
        for w in todo.drain(..) {
            let range = node.range_of(&w.key)?.id();
            match groups.iter_mut().find(|(r, _)| *r == range) {
                Some((_, g)) => g.push(w),
                None => groups.push((range, vec![w])),
            }
        }
        let proposals = groups
            .iter()
            .map(|(_, writes)| KvProposal {
                request: KvRequest {
                    op: Some(kv_request::Op::Writes(Writes {
                        writes: writes.clone(),
                    })),
                },
                opts: ProposeOptions {
                    request_id,
                    epoch: None,
                },
                range: None,
                forward: true,
            })
            .collect();
        let answers = futures_util::future::join_all(node.kv_batch(proposals)).await;
        let mut first_error = None;
        for ((_, writes), answer) in groups.into_iter().zip(answers) {
            match answer {
                Ok(_) => {}
                Err(Error::EpochNotMatch { .. }) => todo.extend(writes),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if todo.is_empty() {
            return Ok(());
        }
    }
    Err(Error::Busy(
        "ranges kept changing shape under a batch write; retry",
    ))
}

/// A read, after checking the caller's route against this node's range for the key.
async fn get(node: &NodeGroup, r: GetRequest) -> Result<GetResponse, Error> {
    if let Some(route) = r.route {
        let desc = node.range_of(&r.key)?;
        let moved = (route.range_id != 0 && route.range_id != desc.range_id)
            || route
                .epoch
                .is_some_and(|e| e.is_stale(&desc.epoch_or_default()));
        if moved {
            return Err(Error::EpochNotMatch {
                current: vec![desc],
            });
        }
    }
    let v = node
        .get(&r.key, consistency(r.consistency, r.stale))
        .await?;
    Ok(GetResponse {
        found: v.is_some(),
        value: v.unwrap_or_default().into(),
    })
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let proposal = put_proposal(req.into_inner());
        self.unary.propose(proposal).await.map_err(to_status)?;
        Ok(Response::new(PutResponse {}))
    }

    async fn multi_put(
        &self,
        req: Request<MultiPutRequest>,
    ) -> Result<Response<MultiPutResponse>, Status> {
        let proposal = multi_put_proposal(req.into_inner());
        self.unary.propose(proposal).await.map_err(to_status)?;
        Ok(Response::new(MultiPutResponse {}))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        get(&self.node, req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let p = delete_proposal(req.into_inner());
        match write(&self.unary, p, WriteKind::Delete).await {
            Ok(Answer::Delete(r)) => Ok(Response::new(r)),
            Ok(_) => Err(Status::internal("a delete answered as another write")),
            Err(e) => Err(to_status(e)),
        }
    }

    async fn insert(
        &self,
        req: Request<InsertRequest>,
    ) -> Result<Response<InsertResponse>, Status> {
        let p = insert_proposal(req.into_inner());
        match write(&self.unary, p, WriteKind::Insert).await {
            Ok(Answer::Insert(r)) => Ok(Response::new(r)),
            Ok(_) => Err(Status::internal("an insert answered as another write")),
            Err(e) => Err(to_status(e)),
        }
    }

    async fn compare_and_set(
        &self,
        req: Request<CompareAndSetRequest>,
    ) -> Result<Response<CompareAndSetResponse>, Status> {
        let r = req.into_inner();
        let kind = WriteKind::Cas((!r.delete).then(|| r.value.clone()));
        match write(&self.unary, cas_proposal(r), kind).await {
            Ok(Answer::Cas(r)) => Ok(Response::new(r)),
            Ok(_) => Err(Status::internal(
                "a compare-and-set answered as another write",
            )),
            Err(e) => Err(to_status(e)),
        }
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        scan(&self.node, req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn batch_get(
        &self,
        req: Request<BatchGetRequest>,
    ) -> Result<Response<BatchGetResponse>, Status> {
        batch_get(&self.node, req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn batch_write(
        &self,
        req: Request<BatchWriteRequest>,
    ) -> Result<Response<BatchWriteResponse>, Status> {
        let r = req.into_inner();
        let writes = r
            .writes
            .into_iter()
            .map(|w| WriteCmd {
                key: w.key,
                value: w.value,
            })
            .collect();
        let id = (r.client_id != 0).then_some((r.client_id, r.seq));
        batch_write(&self.node, writes, id)
            .await
            .map(|()| Response::new(BatchWriteResponse {}))
            .map_err(to_status)
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = self.node.node_status();
        Ok(Response::new(StatusResponse {
            node_id: s.node.0,
            replicas: s.replicas as u64,
            ranges: s.ranges as u64,
            leaders: s.leaders as u64,
            awake: s.awake as u64,
            elections_won: s.elections_won,
            heartbeat_batches: s.heartbeat_batches,
            queued_wakes: s.queued_wakes as u64,
        }))
    }

    async fn locate(
        &self,
        req: Request<LocateRequest>,
    ) -> Result<Response<LocateResponse>, Status> {
        let key = req.into_inner().key;
        let desc = self.node.range_of(&key).map_err(to_status)?;
        let leader = self
            .node
            .status(desc.id())
            .ok()
            .and_then(|s| s.leader_node)
            .map_or(0, |n| n.0);
        Ok(Response::new(LocateResponse {
            range: Some(desc),
            leader_node_id: leader,
            node_id: self.node.node_id().0,
        }))
    }

    type BatchStream = Answers;

    async fn batch(
        &self,
        req: Request<Streaming<BatchRequest>>,
    ) -> Result<Response<Answers>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let node = self.node.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            // Ends when the client closes its side, the connection fails or the service stops;
            // the response stream ends once the answers still in flight are sent.
            loop {
                let frame = tokio::select! {
                    f = inbound.message() => f,
                    _ = stop.wait_for(|stopped| *stopped) => break,
                };
                match frame {
                    Ok(Some(frame)) => serve_frame(&node, frame, &tx),
                    _ => break,
                }
            }
        });
        Ok(Response::new(Answers {
            rx,
            buf: Vec::new(),
            turns: 0,
            at_last_turn: 0,
        }))
    }
}

/// Proposes the writes of one frame together and answers each request on `tx` as it
/// completes.
fn serve_frame(
    node: &Arc<NodeGroup>,
    frame: BatchRequest,
    tx: &mpsc::UnboundedSender<batch_response::Response>,
) {
    let mut ids = Vec::with_capacity(frame.requests.len());
    let mut proposals = Vec::with_capacity(frame.requests.len());
    let mut kinds = Vec::with_capacity(frame.requests.len());
    for r in frame.requests {
        let (kind, p) = match r.cmd {
            Some(Cmd::Put(p)) => (WriteKind::Put, put_proposal(p)),
            Some(Cmd::MultiPut(m)) => (WriteKind::MultiPut, multi_put_proposal(m)),
            Some(Cmd::Delete(d)) => (WriteKind::Delete, delete_proposal(d)),
            Some(Cmd::Insert(i)) => (WriteKind::Insert, insert_proposal(i)),
            Some(Cmd::Cas(c)) => (
                WriteKind::Cas((!c.delete).then(|| c.value.clone())),
                cas_proposal(c),
            ),
            Some(Cmd::Get(g)) => {
                let (node, tx) = (node.clone(), tx.clone());
                tokio::spawn(async move {
                    let answer = get(&node, g).await.map(Answer::Get);
                    let _ = tx.send(response(r.id, answer));
                });
                continue;
            }
            None => {
                let e = Error::InvalidCommand("empty request".into());
                let _ = tx.send(response(r.id, Err(e)));
                continue;
            }
        };
        ids.push(r.id);
        kinds.push(kind);
        proposals.push(p);
    }
    if proposals.is_empty() {
        return;
    }
    let answers: Vec<Proposed> = node.kv_batch(proposals);
    let mut waiting: FuturesUnordered<_> = answers
        .into_iter()
        .zip(ids)
        .zip(kinds)
        .map(|((answer, id), kind)| async move {
            let result = match answer.await {
                Ok(raw) => kind.answer(&raw),
                Err(e) => Err(e),
            };
            response(id, result)
        })
        .collect();
    let tx = tx.clone();
    tokio::spawn(async move {
        while let Some(r) = waiting.next().await {
            let _ = tx.send(r);
        }
    });
}

fn response(id: u64, result: Result<Answer, Error>) -> batch_response::Response {
    match result {
        Ok(answer) => batch_response::Response {
            id,
            error: None,
            result: Some(answer),
        },
        Err(e) => batch_response::Response {
            id,
            error: Some(kv_error(&e)),
            result: None,
        },
    }
}

/// Most scheduler turns a frame of answers waits for more (see [`Answers`]).
const MAX_FRAME_TURNS: u8 = 4;

/// The response side of a `Batch` stream: every answer ready when the transport asks for the
/// next frame goes into that frame. When the queue runs dry, the frame waits a turn of the
/// scheduler, and again while each turn brought more (up to four turns), so that
/// answers completing at that moment join it.
#[derive(Debug)]
pub struct Answers {
    rx: mpsc::UnboundedReceiver<batch_response::Response>,
    buf: Vec<batch_response::Response>,
    /// Turns waited for this frame, and its size at the last one.
    turns: u8,
    at_last_turn: usize,
}

impl Stream for Answers {
    type Item = Result<BatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(r)) => {
                    this.buf.push(r);
                    if this.buf.len() >= MAX_ANSWERS_PER_FRAME {
                        break;
                    }
                }
                Poll::Ready(None) if this.buf.is_empty() => return Poll::Ready(None),
                Poll::Ready(None) => break,
                Poll::Pending if this.buf.is_empty() => return Poll::Pending,
                Poll::Pending
                    if this.turns < MAX_FRAME_TURNS
                        && (this.turns == 0 || this.buf.len() > this.at_last_turn) =>
                {
                    this.turns += 1;
                    this.at_last_turn = this.buf.len();
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => break,
            }
        }
        this.turns = 0;
        let responses = std::mem::take(&mut this.buf);
        Poll::Ready(Some(Ok(BatchResponse { responses })))
    }
}
