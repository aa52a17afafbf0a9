//! One node as the client sees it: a gRPC channel (one HTTP/2 connection), the unary stubs over
//! it, and the long-lived `Batch` stream that carries the requests of every concurrent caller
//! to that node: requests queued while a frame is being sent go together in the next frame,
//! and answers come back matched by id, in whatever order they complete.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use flotilla_proto::kv::batch_request::{self, request::Cmd};
use flotilla_proto::kv::batch_response;
use flotilla_proto::kv::kv_client::KvClient;
use flotilla_proto::kv::{BatchRequest, KvError};
use futures_util::Stream;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

/// Why an attempt got no answer from a node.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The node answered with an error.
    Refused(KvError),
    /// No answer (connection refused or broken, attempt timed out). `sent` says whether the
    /// request may have reached the node (then a write's outcome is unknown).
    NoAnswer { why: String, sent: bool },
    /// The node answered something this client cannot use (not a `KvError`).
    Garbled(String),
}

impl Failure {
    pub(crate) fn describe(&self) -> String {
        match self {
            Failure::Refused(e) => format!("{:?}: {}", e.kind(), e.message),
            Failure::NoAnswer { why, .. } => format!("no answer: {why}"),
            Failure::Garbled(why) => why.clone(),
        }
    }

    /// A failure of a unary call.
    pub(crate) fn from_status(status: &tonic::Status) -> Failure {
        if let Some(e) = KvError::from_status(status) {
            return Failure::Refused(e);
        }
        use tonic::Code;
        match status.code() {
            // From the gRPC stack: the connection, a deadline, a reset stream.
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Aborted
            | Code::ResourceExhausted => Failure::NoAnswer {
                why: format!("{:?}: {}", status.code(), status.message()),
                // A connection that could not be made sent nothing; anything else may have.
                sent: !not_connected(status),
            },
            _ => Failure::Garbled(format!("{:?}: {}", status.code(), status.message())),
        }
    }
}

/// Whether `status` says the connection could not be made (so the request was not sent).
fn not_connected(status: &tonic::Status) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(status);
    while let Some(e) = source {
        let text = e.to_string();
        if text.contains("tcp connect error") || text.contains("Connection refused") {
            return true;
        }
        source = e.source();
    }
    false
}

type Waiters = HashMap<u64, oneshot::Sender<batch_response::Response>>;

/// A `Batch` stream to one node.
#[derive(Debug)]
pub(crate) struct BatchStream {
    tx: mpsc::UnboundedSender<batch_request::Request>,
    /// Callers waiting for an answer, by request id; `None` once the stream broke (then their
    /// senders are dropped, which fails them).
    waiting: Mutex<Option<Waiters>>,
    next_id: AtomicU64,
}

impl BatchStream {
    fn is_broken(&self) -> bool {
        self.waiting.lock().is_none()
    }

    fn fail_all(&self) {
        drop(self.waiting.lock().take());
    }

    /// Sends `cmd` and waits up to `timeout` for its answer.
    async fn call(&self, cmd: Cmd, timeout: Duration) -> Result<batch_response::Response, Failure> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.waiting.lock().as_mut() {
            Some(w) => {
                w.insert(id, tx);
            }
            None => {
                return Err(Failure::NoAnswer {
                    why: "stream closed".into(),
                    sent: false,
                })
            }
        }
        let request = batch_request::Request { id, cmd: Some(cmd) };
        if self.tx.send(request).is_err() {
            self.forget(id);
            return Err(Failure::NoAnswer {
                why: "stream closed".into(),
                sent: false,
            });
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(Failure::NoAnswer {
                why: "stream broke with the request in flight".into(),
                sent: true,
            }),
            Err(_) => {
                self.forget(id);
                Err(Failure::NoAnswer {
                    why: format!("no answer within {timeout:?}"),
                    sent: true,
                })
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Some(w) = self.waiting.lock().as_mut() {
            w.remove(&id);
        }
    }
}

/// Most scheduler turns a frame waits for more requests (see [`Frames`]).
const MAX_FRAME_TURNS: u8 = 4;

/// The request side of a `Batch` stream: every request queued when the transport asks for the
/// next frame goes into that frame. When the queue runs dry before `max`, the frame waits a
/// turn of the scheduler, and again while each turn brought more (up to [`MAX_FRAME_TURNS`]),
/// so that the callers running at that moment join it.
struct Frames {
    rx: mpsc::UnboundedReceiver<batch_request::Request>,
    max: usize,
    buf: Vec<batch_request::Request>,
    /// Turns waited for this frame, and its size at the last one.
    turns: u8,
    at_last_turn: usize,
}

impl Stream for Frames {
    type Item = BatchRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<BatchRequest>> {
        let this = &mut *self;
        loop {
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(r)) => {
                    this.buf.push(r);
                    if this.buf.len() >= this.max {
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
        let requests = std::mem::take(&mut this.buf);
        Poll::Ready(Some(BatchRequest { requests }))
    }
}

/// Frame counters of a node's streams (see `ClientStats`).
#[derive(Debug, Default)]
pub(crate) struct FrameStats {
    pub(crate) frames: AtomicU64,
    pub(crate) requests: AtomicU64,
}

/// A node of the cluster.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) id: u64,
    pub(crate) endpoint: String,
    pub(crate) channel: Channel,
    pub(crate) kv: KvClient<Channel>,
    /// The open stream, if any (read on every call).
    stream: Mutex<Option<Arc<BatchStream>>>,
    /// Held while a stream is being opened, so that one caller opens it and the others wait.
    opening: tokio::sync::Mutex<()>,
    /// Set when an attempt found the node unreachable: other nodes are preferred until then.
    down_until: Mutex<Option<Instant>>,
}

impl Node {
    pub(crate) fn new(id: u64, endpoint: String, channel: Channel) -> Node {
        Node {
            id,
            endpoint,
            kv: KvClient::new(channel.clone()),
            channel,
            stream: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            down_until: Mutex::new(None),
        }
    }

    pub(crate) fn is_down(&self) -> bool {
        self.down_until.lock().is_some_and(|t| Instant::now() < t)
    }

    pub(crate) fn mark_down(&self, for_: Duration) {
        *self.down_until.lock() = Some(Instant::now() + for_);
    }

    pub(crate) fn mark_up(&self) {
        let mut d = self.down_until.lock();
        if d.is_some() {
            *d = None;
        }
    }

    /// Sends `cmd` on this node's `Batch` stream (opened on first use, and again after it
    /// broke) and waits up to `timeout` for the answer.
    pub(crate) async fn call(
        &self,
        cmd: Cmd,
        timeout: Duration,
        max_batch: usize,
        stats: &Arc<FrameStats>,
    ) -> Result<batch_response::Response, Failure> {
        let deadline = Instant::now() + timeout;
        let stream = self.stream(timeout, max_batch, stats).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        stream.call(cmd, left).await
    }

    async fn stream(
        &self,
        timeout: Duration,
        max_batch: usize,
        stats: &Arc<FrameStats>,
    ) -> Result<Arc<BatchStream>, Failure> {
        let open = |node: &Node| node.stream.lock().clone().filter(|s| !s.is_broken());
        if let Some(s) = open(self) {
            return Ok(s);
        }
        let _opening = self.opening.lock().await;
        if let Some(s) = open(self) {
            return Ok(s);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let stats_out = stats.clone();
        let frames = futures_util::StreamExt::inspect(
            Frames {
                rx,
                max: max_batch,
                buf: Vec::new(),
                turns: 0,
                at_last_turn: 0,
            },
            move |f: &BatchRequest| {
                stats_out.frames.fetch_add(1, Ordering::Relaxed);
                stats_out
                    .requests
                    .fetch_add(f.requests.len() as u64, Ordering::Relaxed);
            },
        );
        let mut kv = self.kv.clone();
        let opened = match tokio::time::timeout(timeout, kv.batch(frames)).await {
            Ok(Ok(r)) => r,
            // Nothing was sent on a stream that did not open.
            Ok(Err(status)) => {
                return Err(match Failure::from_status(&status) {
                    Failure::NoAnswer { why, .. } => Failure::NoAnswer { why, sent: false },
                    other => other,
                })
            }
            Err(_) => {
                return Err(Failure::NoAnswer {
                    why: format!("stream not opened within {timeout:?}"),
                    sent: false,
                })
            }
        };
        let stream = Arc::new(BatchStream {
            tx,
            waiting: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(1),
        });
        let mut inbound = opened.into_inner();
        let reader = stream.clone();
        tokio::spawn(async move {
            while let Ok(Some(frame)) = inbound.message().await {
                let mut waiting = reader.waiting.lock();
                let Some(w) = waiting.as_mut() else { break };
                for r in frame.responses {
                    if let Some(tx) = w.remove(&r.id) {
                        let _ = tx.send(r);
                    }
                }
            }
            reader.fail_all();
        });
        *self.stream.lock() = Some(stream.clone());
        Ok(stream)
    }
}
