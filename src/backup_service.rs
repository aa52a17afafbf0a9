//! The node's side of a backup: the admin `BackupRange` call, one range's data at one point
//! ([`NodeGroup::export_range`]) as a stream of frames: a start (descriptor, applied index),
//! the data's chunks (`SnapshotChunk`, the same framing and chunking as a raft snapshot's
//! data), an end (counts). The call's other half is `flotilla-ctl backup` (ctl/src/backup/).

use std::pin::Pin;
use std::sync::Arc;

use flotilla_proto::admin::backup_range_frame::Frame;
use flotilla_proto::admin::{
    BackupRangeEnd, BackupRangeFrame, BackupRangeRequest, BackupRangeStart,
};
use flotilla_proto::RangeId;
use flotilla_runtime::{NodeGroup, RangeExport};
use tokio_stream::Stream;
use tonic::Status;

use crate::kv_service::to_status;

/// Chunk size when the request names none: big enough that per-message costs vanish, small
/// enough that a reader holds little.
const DEFAULT_CHUNK_BYTES: u64 = 1 << 20;
/// Largest chunk asked for: tonic's default limit on a message a client decodes is 4 MiB,
/// and one pair may add up to `max_proposal_bytes` to a chunk.
const MAX_CHUNK_BYTES: u64 = 2 << 20;

/// The frames of one `BackupRange` answer.
pub type BackupFrames = Pin<Box<dyn Stream<Item = Result<BackupRangeFrame, Status>> + Send>>;

/// Where the answer's stream is.
enum Step {
    Start(Box<BackupRangeStart>, RangeExport),
    /// Chunks, with the pairs and bytes sent so far.
    Chunks(RangeExport, u64, u64),
    Done,
}

/// Answers `BackupRange` on `node`: the export is taken (barrier, view) before the answer
/// starts, so a refusal is the call's status and never a stream cut short.
pub async fn backup_range(
    node: &Arc<NodeGroup>,
    req: BackupRangeRequest,
) -> Result<BackupFrames, Status> {
    if req.range_id == 0 {
        return Err(Status::invalid_argument("range_id is required"));
    }
    let chunk_bytes = match req.chunk_bytes {
        0 => DEFAULT_CHUNK_BYTES,
        n => n.min(MAX_CHUNK_BYTES),
    };
    let export = node
        .export_range(RangeId(req.range_id), req.version, chunk_bytes as usize)
        .await
        .map_err(to_status)?;
    let (applied_index, applied_term) = export.applied();
    let start = BackupRangeStart {
        descriptor: Some(export.descriptor().clone()),
        applied_index,
        applied_term,
        node_id: node.node_id().0,
    };
    let frame = |f| BackupRangeFrame { frame: Some(f) };
    let frames = futures_util::stream::unfold(
        Step::Start(Box::new(start), export),
        move |step| async move {
            match step {
                Step::Start(start, export) => {
                    Some((Ok(frame(Frame::Start(*start))), Step::Chunks(export, 0, 0)))
                }
                Step::Chunks(mut export, keys, bytes) => match export.next_chunk().await {
                    Some(Ok(c)) => {
                        let size: usize = c.pairs.iter().map(|p| p.key.len() + p.value.len()).sum();
                        let (keys, bytes) = (keys + c.pairs.len() as u64, bytes + size as u64);
                        Some((
                            Ok(frame(Frame::Chunk(c))),
                            Step::Chunks(export, keys, bytes),
                        ))
                    }
                    Some(Err(e)) => Some((Err(to_status(e)), Step::Done)),
                    None => Some((
                        Ok(frame(Frame::End(BackupRangeEnd { keys, bytes }))),
                        Step::Done,
                    )),
                },
                Step::Done => None,
            }
        },
    );
    Ok(Box::pin(frames))
}
