//! The receiving side: the tonic service behind `RaftTransport.Batches` (and `Snapshot`, served
//! by `snapshot.rs`), one tokio task per inbound stream, and the node's one delivery thread.
//!
//! A stream task reads frames in order, checks them (addressed to us, from a known peer),
//! acknowledges every frame, and passes batches on to the delivery thread
//! (`flotilla-grpc-<node>`), which calls the [`BatchHandler`]. One thread for all senders keeps
//! the handler contract of the crate: calls for one node never overlap, and batches from one
//! sender arrive in the order sent. Received snapshots and the outcomes of the snapshots this
//! node sent reach the handler through the same thread. The handler may block (it can write
//! to disk when it creates a replica); it does so on that thread, never on a tokio worker.
//!
//! Back-pressure: a batch waits for room in the inbound byte budget (a semaphore shared by
//! all streams) before it is queued for delivery. While a stream task waits, it reads nothing
//! more, h2 flow control stops its sender, the sender's acks stop, and its `send` eventually
//! answers `Full`.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use flotilla_proto::transport::raft_transport_server::RaftTransport;
use flotilla_proto::transport::{BatchAck, NodeBatch, SnapshotAck, SnapshotChunkFrame};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::stats::Counters;
use super::Inner;
use crate::metric::{self, Refused};
use crate::{BatchHandler, SnapshotReport};

/// Acks buffered per stream. Acks are cumulative, so when the buffer is full (the sender is
/// slow to read them) one is skipped and the next says the same and more.
const ACK_BUFFER: usize = 16;

/// What goes to the delivery thread.
pub(crate) enum Deliver {
    /// A checked batch, holding its share of the inbound budget until handled, and what to
    /// tell once handled (a received snapshot's call waits for it to acknowledge).
    Batch(NodeBatch, OwnedSemaphorePermit, Option<oneshot::Sender<()>>),
    /// The outcome of a snapshot this node sent.
    Report(SnapshotReport),
    /// Stop: sent once by `shutdown`.
    Stop,
}

/// The delivery thread and the way into it.
pub(crate) struct Delivery {
    tx: Sender<Deliver>,
    budget: Arc<Semaphore>,
    /// The budget's size (`inbound_budget_bytes`).
    budget_bytes: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Delivery {
    /// Starts the delivery thread for `inner`'s node.
    ///
    /// # Panics
    ///
    /// If the thread cannot be spawned.
    pub(crate) fn start(inner: Arc<Inner>, handler: Arc<dyn BatchHandler>) -> Delivery {
        let (tx, rx) = crossbeam_channel::unbounded();
        let budget_bytes = inner.config.inbound_budget_bytes;
        let budget = Arc::new(Semaphore::new(budget_bytes));
        let thread = std::thread::Builder::new()
            .name(format!("flotilla-grpc-{}", inner.node))
            .spawn(move || deliver(&inner, &*handler, rx))
            .expect("spawn gRPC delivery thread");
        Delivery {
            tx,
            budget,
            budget_bytes,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Queues `report` for the handler. Lost only if the thread is gone (after shutdown).
    pub(crate) fn report(&self, report: SnapshotReport) {
        let _ = self.tx.send(Deliver::Report(report));
    }

    /// Delivers a whole received snapshot (`batch`, `size` bytes) in turn with the batches,
    /// within the inbound budget; returns once the handler has returned, true, or false if
    /// the delivery thread stopped first.
    pub(crate) async fn deliver_whole(&self, batch: NodeBatch, size: usize) -> bool {
        // As for frames: at most the whole budget, so that a larger snapshot gets through alone.
        let permits = size.min(self.budget_bytes) as u32;
        let Ok(permit) = self.budget.clone().acquire_many_owned(permits).await else {
            return false;
        };
        let (done_tx, done_rx) = oneshot::channel();
        if self
            .tx
            .send(Deliver::Batch(batch, permit, Some(done_tx)))
            .is_err()
        {
            return false;
        }
        done_rx.await.is_ok()
    }

    /// Stops the thread after the batch it is handling, and waits for it unless called from
    /// the handler itself. Batches still queued are dropped. Idempotent.
    pub(crate) fn stop(&self) {
        // Fails only if the thread already left (its handler panicked).
        let _ = self.tx.send(Deliver::Stop);
        let Some(thread) = self.thread.lock().take() else {
            return;
        };
        if thread.thread().id() == std::thread::current().id() {
            return;
        }
        if thread.join().is_err() {
            tracing::error!("gRPC delivery thread panicked in its handler");
        }
    }
}

fn deliver(inner: &Inner, handler: &dyn BatchHandler, rx: Receiver<Deliver>) {
    let counters = &inner.counters;
    for item in rx {
        if inner.is_closed() {
            return;
        }
        let (batch, permit, done) = match item {
            Deliver::Batch(batch, permit, done) => (batch, permit, done),
            Deliver::Report(report) => {
                handler.on_snapshot_status(report);
                let counter = if report.ok {
                    &counters.snapshots_sent
                } else {
                    &counters.snapshots_failed
                };
                Counters::add(counter, 1);
                metric::grpc_snapshot_sent(report.ok);
                counters.notify();
                continue;
            }
            Deliver::Stop => return,
        };
        let (messages, heartbeats) = (batch.messages.len(), batch.heartbeats.len());
        handler.on_batch(batch);
        drop(permit);
        if let Some(done) = done {
            let _ = done.send(());
        }
        Counters::add(&counters.delivered_batches, 1);
        Counters::add(&counters.delivered_messages, messages as u64);
        Counters::add(&counters.delivered_heartbeats, heartbeats as u64);
        metric::delivered(messages, heartbeats);
        counters.notify();
    }
}

/// The tonic service: one per transport.
pub(crate) struct Service {
    pub(crate) inner: Arc<Inner>,
    pub(crate) delivery: Arc<Delivery>,
}

#[tonic::async_trait]
impl RaftTransport for Service {
    type BatchesStream = ReceiverStream<Result<BatchAck, Status>>;

    async fn batches(
        &self,
        request: Request<Streaming<NodeBatch>>,
    ) -> Result<Response<Self::BatchesStream>, Status> {
        if self.inner.is_closed() {
            return Err(Status::unavailable("node is shutting down"));
        }
        let (acks, rx) = mpsc::channel(ACK_BUFFER);
        let frames = request.into_inner();
        tokio::spawn(serve_stream(
            self.inner.clone(),
            self.delivery.clone(),
            frames,
            acks,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunkFrame>>,
    ) -> Result<Response<SnapshotAck>, Status> {
        if self.inner.is_closed() {
            return Err(Status::unavailable("node is shutting down"));
        }
        let frames = request.into_inner();
        super::snapshot::receive(self.inner.clone(), self.delivery.clone(), frames)
            .await
            .map(Response::new)
    }
}

type AckTx = mpsc::Sender<Result<BatchAck, Status>>;

/// Reads one inbound stream until it ends, fails, or the transport shuts down. Ending the
/// task drops the ack sender, which ends the response stream: that is what lets the server's
/// graceful shutdown finish instead of waiting on long-lived streams.
async fn serve_stream(
    inner: Arc<Inner>,
    delivery: Arc<Delivery>,
    mut frames: Streaming<NodeBatch>,
    acks: AckTx,
) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut received: u64 = 0;
    loop {
        let next = tokio::select! {
            _ = shutdown.wait_for(|closed| *closed) => {
                let _ = acks.try_send(Err(Status::unavailable("node is shutting down")));
                return;
            }
            next = frames.message() => next,
        };
        let batch = match next {
            Ok(Some(batch)) => batch,
            Ok(None) => return, // the sender closed its side
            Err(status) => {
                stream_failed(&inner, &status);
                // Tell the sender why before the stream ends (it logs it).
                let _ = acks.try_send(Err(status));
                return;
            }
        };
        received += 1;
        let size = batch.encoded_len();
        if let Some(batch) = check(&inner, batch, size) {
            // The permit is at most the whole budget, so that a frame larger than the budget
            // (allowed by max_frame_bytes) still gets through, alone.
            let permits = size.min(inner.config.inbound_budget_bytes) as u32;
            let permit = tokio::select! {
                _ = shutdown.wait_for(|closed| *closed) => return,
                permit = delivery.budget.clone().acquire_many_owned(permits) => permit,
            };
            let Ok(permit) = permit else {
                return; // the semaphore is never closed; nothing to deliver to if it were
            };
            if delivery
                .tx
                .send(Deliver::Batch(batch, permit, None))
                .is_err()
            {
                return; // the delivery thread is gone: shut down, or its handler panicked
            }
        }
        let ack = BatchAck {
            received,
            node: inner.node.0,
        };
        if let Err(mpsc::error::TrySendError::Closed(_)) = acks.try_send(Ok(ack)) {
            return; // the response stream is gone: the sender hung up
        }
    }
}

/// Counts one frame of `size` bytes off the wire and decides its fate: `Some` to deliver,
/// `None` for a ping or a refused frame (counted here). Frames are acknowledged either way:
/// an ack means "received", and the one from the wrong node tells the sender so.
fn check(inner: &Inner, batch: NodeBatch, size: usize) -> Option<NodeBatch> {
    let counters = &inner.counters;
    Counters::add(&counters.frames_received, 1);
    metric::grpc_frame_received(size);
    let refused = if batch.to_node != inner.node.0 {
        Counters::add(&counters.refused_wrong_node, 1);
        Some(Refused::WrongNode)
    } else if !inner.config.accept_unknown_peers && !inner.is_peer(batch.from_node) {
        Counters::add(&counters.refused_unknown_peer, 1);
        Some(Refused::UnknownPeer)
    } else {
        None
    };
    if let Some(why) = refused {
        // Debug only: a misconfigured sender repeats this on every frame and ping.
        tracing::debug!(
            node = %inner.node, from = batch.from_node, to = batch.to_node, reason = why.label(),
            "dropped an inbound frame"
        );
        metric::grpc_refused(why);
        counters.notify();
        return None;
    }
    inner.heard(flotilla_proto::NodeId(batch.from_node));
    inner.note_stats(
        flotilla_proto::NodeId(batch.from_node),
        batch.stats.as_ref(),
    );
    if batch.messages.is_empty() && batch.heartbeats.is_empty() {
        Counters::add(&counters.pings_received, 1);
        counters.notify();
        return None;
    }
    counters.notify();
    Some(batch)
}

/// Counts and logs a failed inbound stream.
fn stream_failed(inner: &Inner, status: &Status) {
    let why = if status.code() == Code::OutOfRange {
        // tonic's decoder refuses a length prefix over max_decoding_message_size with
        // OutOfRange, before reading the body: nothing of the frame was buffered.
        Counters::add(&inner.counters.refused_too_large, 1);
        tracing::warn!(node = %inner.node, status = %status.message(), "refused an oversized frame; closing its stream");
        Refused::TooLarge
    } else {
        Counters::add(&inner.counters.stream_errors, 1);
        tracing::debug!(node = %inner.node, ?status, "inbound stream failed");
        Refused::StreamError
    };
    metric::grpc_refused(why);
    inner.counters.notify();
}
