//! Snapshot streaming: raft snapshots travel on the `RaftTransport.Snapshot` RPC, one call
//! per transfer, in chunks of `snapshot_chunk_bytes`, instead of inline in a Batches frame
//! (where one above `max_frame_bytes` could never be sent, and one lost would count as sent).
//!
//! # Sending
//!
//! `send` takes the envelopes marked `snapshot` out of the batch and calls [`start`] for each:
//! a tokio task opens its own connection to the destination (so that a large snapshot does not
//! hold up the Batches stream, heartbeats included), writes the encoded envelope in chunks and
//! waits for the receiver's one answer. The chunks are cut lazily, as tonic asks for the next
//! one, so besides the envelope itself at most about one chunk is buffered beyond HTTP/2's
//! flow-control window. Every transfer ends in exactly one [`SnapshotReport`] to the handler,
//! on the delivery thread: ok once the receiver acknowledged, failed on any error, refusal or
//! `snapshot_timeout`, and failed at once (without a task) when over `max_snapshot_bytes` or
//! `max_concurrent_snapshots`. Only shutdown ends a transfer unreported: nothing would read it.
//!
//! # Receiving
//!
//! [`receive`] assembles the chunks in memory and delivers the envelope, as a one-message
//! batch, through the node's delivery thread like any batch (so handler calls never overlap),
//! then acknowledges once the handler has returned. A transfer refused for any reason
//! ([`SnapshotRefused`]), or cut short, is discarded whole: nothing partial is ever delivered.
//!
//! No checksum: the bytes arrive over TCP (and TLS when configured), the length must match the
//! announced one exactly, and the envelope must decode and match the start frame.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use flotilla_proto::transport::raft_transport_client::RaftTransportClient;
use flotilla_proto::transport::{
    NodeBatch, RaftMessage, SnapshotAck, SnapshotChunkFrame, SnapshotStart,
};
use flotilla_proto::{NodeId, RangeId, ReplicaId};
use prost::Message;
use tokio_stream::{Stream, StreamExt};
use tonic::{Status, Streaming};

use super::peer::error_chain;
use super::server::Delivery;
use super::stats::Counters;
use super::Inner;
use crate::metric::{self, SnapshotRefused};
use crate::SnapshotReport;

/// Starts the transfer of `env`, a snapshot envelope that `send` accepted for `to` (at
/// `addr`). Never blocks; exactly one report follows (see the module docs).
pub(crate) fn start(
    inner: &Arc<Inner>,
    delivery: &Arc<Delivery>,
    to: NodeId,
    addr: String,
    env: RaftMessage,
) {
    let failed = SnapshotReport {
        to,
        range: RangeId(env.range_id),
        to_replica: ReplicaId(env.to.map_or(0, |r| r.replica_id)),
        ok: false,
    };
    let size = env.encoded_len() as u64;
    if size > inner.config.max_snapshot_bytes {
        tracing::warn!(
            node = %inner.node, %to, range = env.range_id, size,
            limit = inner.config.max_snapshot_bytes, "snapshot over max_snapshot_bytes; not sent"
        );
        delivery.report(failed);
        return;
    }
    let Ok(permit) = inner.outbound_snapshots.clone().try_acquire_owned() else {
        // raft sends the snapshot again after the failure: no queue of snapshots can build up.
        tracing::debug!(node = %inner.node, %to, range = env.range_id, "too many snapshot transfers; failing this one");
        delivery.report(failed);
        return;
    };
    let (inner, delivery) = (inner.clone(), delivery.clone());
    inner.runtime.clone().spawn(async move {
        let _permit = permit;
        let mut shutdown = inner.shutdown.subscribe();
        let range = env.range_id;
        let timeout = inner.config.snapshot_timeout;
        let outcome = tokio::select! {
            _ = shutdown.wait_for(|closed| *closed) => return,
            outcome = tokio::time::timeout(timeout, transfer(&inner, to, &addr, env)) => outcome,
        };
        let why = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(why)) => Some(why),
            Err(_) => Some(format!("not acknowledged within {timeout:?}")),
        };
        if let Some(why) = &why {
            tracing::warn!(node = %inner.node, %to, range, why, "snapshot transfer failed; raft will retry");
        }
        delivery.report(SnapshotReport {
            ok: why.is_none(),
            ..failed
        });
    });
}

/// One transfer: connect, stream the chunks, check the answer.
async fn transfer(
    inner: &Arc<Inner>,
    to: NodeId,
    addr: &str,
    env: RaftMessage,
) -> Result<(), String> {
    let endpoint = inner.endpoint(to, addr).map_err(|e| e.to_string())?;
    let channel = endpoint.connect().await.map_err(|e| error_chain(&e))?;
    let limit = inner.config.max_frame_bytes;
    let mut client = RaftTransportClient::new(channel)
        .max_encoding_message_size(limit)
        .max_decoding_message_size(limit);
    let data = Bytes::from(env.encode_to_vec());
    let start = SnapshotStart {
        from_node: inner.node.0,
        to_node: to.0,
        range_id: env.range_id,
        from_replica: env.from.map_or(0, |r| r.replica_id),
        to_replica: env.to.map_or(0, |r| r.replica_id),
        total_bytes: data.len() as u64,
    };
    drop(env); // the encoded copy is what goes out
    let total = start.total_bytes;
    let ack = client
        .snapshot(chunks(inner.clone(), start, data))
        .await
        .map_err(|s| format!("refused by the receiver ({:?}): {}", s.code(), s.message()))?
        .into_inner();
    if ack.node != to.0 {
        return Err(format!("answered by node {} instead", ack.node));
    }
    if ack.received_bytes != total {
        return Err(format!(
            "acknowledged {} of {total} bytes",
            ack.received_bytes
        ));
    }
    Ok(())
}

/// The frames of one transfer, cut from `data` only when tonic asks for the next one. The
/// first frame carries `start` and the first chunk.
fn chunks(
    inner: Arc<Inner>,
    start: SnapshotStart,
    data: Bytes,
) -> impl Stream<Item = SnapshotChunkFrame> + Send + 'static {
    let chunk = inner.config.snapshot_chunk_bytes;
    let count = data.len().div_ceil(chunk).max(1);
    let mut start = Some(start);
    tokio_stream::iter(0..count).map(move |i| {
        let piece = data.slice(i * chunk..((i + 1) * chunk).min(data.len()));
        Counters::add(&inner.counters.snapshot_chunks_sent, 1);
        Counters::add(&inner.counters.snapshot_bytes_sent, piece.len() as u64);
        metric::grpc_snapshot_chunk_sent(piece.len());
        inner.counters.notify();
        SnapshotChunkFrame {
            start: start.take(),
            data: piece,
        }
    })
}

/// A refusal: its reason (counted) and what the sender is told.
type Refusal = (SnapshotRefused, String);

/// Serves one `Snapshot` call: assembles, checks, delivers, acknowledges. Every refusal is
/// counted and answered with an error status; nothing of a refused transfer is delivered.
pub(crate) async fn receive(
    inner: Arc<Inner>,
    delivery: Arc<Delivery>,
    frames: Streaming<SnapshotChunkFrame>,
) -> Result<SnapshotAck, Status> {
    let Ok(_permit) = inner.inbound_snapshots.clone().try_acquire_owned() else {
        return Err(refuse(
            &inner,
            (
                SnapshotRefused::Busy,
                "too many snapshot transfers under way".into(),
            ),
        ));
    };
    let mut shutdown = inner.shutdown.subscribe();
    let timeout = inner.config.snapshot_timeout;
    let assembled = tokio::select! {
        _ = shutdown.wait_for(|closed| *closed) => {
            return Err(Status::unavailable("node is shutting down"));
        }
        assembled = tokio::time::timeout(timeout, assemble(&inner, frames)) => assembled,
    };
    let batch = match assembled {
        Ok(Ok(batch)) => batch,
        Ok(Err(refusal)) => return Err(refuse(&inner, refusal)),
        Err(_) => {
            let why = format!("not complete within {timeout:?}");
            return Err(refuse(&inner, (SnapshotRefused::Incomplete, why)));
        }
    };
    let size = batch.messages[0].encoded_len();
    let delivered = tokio::select! {
        _ = shutdown.wait_for(|closed| *closed) => false,
        delivered = delivery.deliver_whole(batch, size) => delivered,
    };
    if !delivered {
        return Err(Status::unavailable("node is shutting down"));
    }
    Counters::add(&inner.counters.snapshots_received, 1);
    metric::grpc_snapshot_received();
    inner.counters.notify();
    Ok(SnapshotAck {
        node: inner.node.0,
        received_bytes: size as u64,
    })
}

/// Reads a whole transfer and checks it; `Ok` is the batch to deliver.
async fn assemble(
    inner: &Inner,
    mut frames: Streaming<SnapshotChunkFrame>,
) -> Result<NodeBatch, Refusal> {
    let incomplete = |why: String| (SnapshotRefused::Incomplete, why);
    let malformed = |why: &str| (SnapshotRefused::Malformed, why.to_string());
    let first = match frames.message().await {
        Ok(Some(frame)) => frame,
        Ok(None) => return Err(incomplete("no frame at all".into())),
        Err(s) => return Err(incomplete(format!("stream broke: {}", s.message()))),
    };
    let start = first
        .start
        .ok_or_else(|| malformed("first frame has no start"))?;
    check_start(inner, &start)?;
    inner.heard(NodeId(start.from_node));
    let total = start.total_bytes as usize;
    // Reserved whole at once: the size is within max_snapshot_bytes, announced by a peer, and
    // the transfers at once are limited; growing by doubling would copy it several times.
    let mut buf = BytesMut::with_capacity(total);
    let mut next = Some(first.data);
    loop {
        if let Some(data) = next.take() {
            Counters::add(&inner.counters.snapshot_chunks_received, 1);
            Counters::add(&inner.counters.snapshot_bytes_received, data.len() as u64);
            metric::grpc_snapshot_chunk_received(data.len());
            inner.counters.notify();
            if buf.len() + data.len() > total {
                return Err(incomplete(format!("more than the {total} bytes announced")));
            }
            buf.extend_from_slice(&data);
        }
        match frames.message().await {
            Ok(Some(frame)) if frame.start.is_some() => {
                return Err(malformed("a second start frame"));
            }
            Ok(Some(frame)) => next = Some(frame.data),
            Ok(None) => break,
            Err(s) => return Err(incomplete(format!("stream broke: {}", s.message()))),
        }
    }
    if buf.len() != total {
        let got = buf.len();
        return Err(incomplete(format!("ended after {got} of {total} bytes")));
    }
    let env = RaftMessage::decode(buf.freeze()).map_err(|_| malformed("undecodable envelope"))?;
    let matches = env.snapshot
        && env.range_id == start.range_id
        && env.from.is_some_and(|r| r.replica_id == start.from_replica)
        && env.to.is_some_and(|r| r.replica_id == start.to_replica);
    if !matches {
        return Err(malformed("envelope does not match its start frame"));
    }
    Ok(NodeBatch {
        from_node: start.from_node,
        to_node: start.to_node,
        messages: vec![env],
        heartbeats: Vec::new(),
        stats: None,
    })
}

/// The checks a Batches frame gets too (addressed to us, from a peer), and the size limit.
fn check_start(inner: &Inner, start: &SnapshotStart) -> Result<(), Refusal> {
    if start.to_node != inner.node.0 {
        let why = format!("addressed to node {}", start.to_node);
        return Err((SnapshotRefused::Misaddressed, why));
    }
    if !inner.config.accept_unknown_peers && !inner.is_peer(start.from_node) {
        let why = format!("node {} is not a peer", start.from_node);
        return Err((SnapshotRefused::Misaddressed, why));
    }
    if start.total_bytes > inner.config.max_snapshot_bytes {
        let (size, limit) = (start.total_bytes, inner.config.max_snapshot_bytes);
        let why = format!("{size} bytes is over max_snapshot_bytes ({limit})");
        return Err((SnapshotRefused::TooLarge, why));
    }
    Ok(())
}

/// Counts and logs a refusal, and turns it into the status the sender gets.
fn refuse(inner: &Inner, (why, detail): Refusal) -> Status {
    let counters = &inner.counters;
    let (counter, status) = match why {
        SnapshotRefused::TooLarge => (
            &counters.snapshots_refused_too_large,
            Status::resource_exhausted(&detail),
        ),
        SnapshotRefused::Incomplete => (
            &counters.snapshots_refused_incomplete,
            Status::aborted(&detail),
        ),
        SnapshotRefused::Malformed => (
            &counters.snapshots_refused_malformed,
            Status::invalid_argument(&detail),
        ),
        SnapshotRefused::Busy => (
            &counters.snapshots_refused_busy,
            Status::unavailable(&detail),
        ),
        SnapshotRefused::Misaddressed => (
            &counters.snapshots_refused_misaddressed,
            Status::failed_precondition(&detail),
        ),
    };
    Counters::add(counter, 1);
    metric::grpc_snapshot_refused(why);
    counters.notify();
    tracing::warn!(node = %inner.node, reason = why.label(), detail, "refused an inbound snapshot");
    status
}
