//! Unary writes of concurrent callers proposed together.
//!
//! A client in another language sends one `Put` RPC per write (the plain unary API). Proposed
//! one by one, each became a raft entry of its own: one log entry, one append and one
//! completion per write, where the `Batch` stream's frames share an entry per range. Here the
//! unary writes that arrive while the previous ones are being proposed wait in one queue, and
//! one task hands everything queued to [`NodeGroup::kv_batch`] at once (group commit: nothing
//! waits for a batch to fill, a lone caller is proposed at once). Each write keeps its own
//! request id and its own answer, exactly as a batch of one would get them.

use std::sync::{Arc, OnceLock};

use flotilla_runtime::{Error, KvProposal, NodeGroup, Proposed};
use tokio::sync::{mpsc, oneshot};

/// Most writes handed to one `kv_batch`.
const MAX_WRITES_PER_BATCH: usize = 1024;

/// A write waiting in the queue, and where its answer's future goes.
type Queued = (KvProposal, oneshot::Sender<Proposed>);

/// The queue of a node's unary writes.
#[derive(Debug)]
pub(crate) struct Coalescer {
    node: Arc<NodeGroup>,
    /// Started with the first write (inside the server's tokio runtime); the task ends when
    /// the last clone of the service (and so this sender) is dropped.
    queue: OnceLock<mpsc::UnboundedSender<Queued>>,
}

impl Coalescer {
    pub(crate) fn new(node: Arc<NodeGroup>) -> Coalescer {
        Coalescer {
            node,
            queue: OnceLock::new(),
        }
    }

    /// Proposes `p` together with the writes of other callers queued meanwhile; resolves to
    /// its own answer. Must be called inside a tokio runtime.
    pub(crate) async fn propose(&self, p: KvProposal) -> Result<Vec<u8>, Error> {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(self.node.clone(), rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        queue.send((p, reply)).map_err(|_| Error::Stopped)?;
        // The queue's task is gone only if the runtime is shutting down.
        answer.await.map_err(|_| Error::Stopped)?.await
    }
}

/// The queue's task: everything queued goes out in one `kv_batch`, the answers' futures back
/// to their callers (who await them: this task never waits for an apply).
async fn run(node: Arc<NodeGroup>, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut queued = Vec::with_capacity(64);
    while rx.recv_many(&mut queued, MAX_WRITES_PER_BATCH).await > 0 {
        let (proposals, replies): (Vec<_>, Vec<_>) = queued.drain(..).unzip();
        for (answer, reply) in node.kv_batch(proposals).into_iter().zip(replies) {
            // A caller that went away (its RPC cancelled) no longer wants the answer.
            let _ = reply.send(answer);
        }
    }
}
