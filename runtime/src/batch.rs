//! Batches of KV commands: the requests of one client frame, grouped by range and proposed as
//! one raft entry per range (a `command.AppBatch`), each command keeping its own request id
//! (retry de-duplication is per command) and its own answer.
//!
//! The entry is written in one pass: each `KvRequest` is encoded straight into the entry's
//! buffer (on the wire an `AppRequest`'s `command` bytes are exactly the encoded `KvRequest`),
//! so a command is encoded once on its way from the client's frame to the log, and a put's
//! answer is empty (see [`crate::KvStateMachine`]): nothing is built, encoded or decoded for it
//! on the way back.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use flotilla_proto::command::{kv_request, KvRequest, RequestHeader, RequestId};
use flotilla_proto::meta::RangeEpoch;
use flotilla_proto::RangeId;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message as _;
use tokio::sync::oneshot;

use crate::api::ProposeOptions;
use crate::error::{Error, Result};
use crate::node_group::NodeGroup;
use crate::pending::Answer;
use crate::replica::PeerMsg;

/// One command of [`NodeGroup::kv_batch`].
#[derive(Debug, Clone, Default)]
pub struct KvProposal {
    /// The command (for the default state machine).
    pub request: KvRequest,
    /// Its request id (retry de-duplication) and the epoch of the range the caller routed
    /// with (a stale one gets `EpochNotMatch`).
    pub opts: ProposeOptions,
    /// The range the caller routed to, if it routes itself: if this node's range for the key
    /// is another one, the answer is `EpochNotMatch` with the current descriptor.
    pub range: Option<RangeId>,
    /// What a replica that does not lead the range does: forward the command to its leader
    /// through raft (`true`, if `forward_proposals` is on), or answer `NotLeader` with the
    /// leader's node (`false`: for callers that route to leaders themselves).
    pub forward: bool,
}

/// The answer to one command of a batch: the state machine's answer (empty for puts), or why
/// there is none. Resolves once the command is applied on this node or known lost.
#[derive(Debug)]
pub struct Proposed(State);

#[derive(Debug)]
enum State {
    Ready(Option<Answer>),
    Waiting(oneshot::Receiver<Answer>),
}

impl Proposed {
    fn ready(answer: Answer) -> Proposed {
        Proposed(State::Ready(Some(answer)))
    }
}

impl Future for Proposed {
    type Output = Result<Vec<u8>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            State::Ready(answer) => Poll::Ready(answer.take().unwrap_or(Err(Error::Stopped))),
            State::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(Error::Stopped))),
        }
    }
}

/// The commands bound for one range in one entry.
struct Group {
    range: RangeId,
    epoch: Option<RangeEpoch>,
    forward: bool,
    /// Indexes into the batch, with each command's encoded length.
    members: Vec<(usize, usize)>,
    bytes: u64,
}

impl NodeGroup {
    /// Proposes `proposals` together: they are routed by key, grouped by range, and each
    /// group is proposed as one raft entry (several, if it is larger than
    /// `max_proposal_bytes`), so that a round appends and replicates one entry per range
    /// whatever the number of commands. Each command is de-duplicated by its own request id
    /// and answered on its own; the answers come back in the order of `proposals`.
    pub fn kv_batch(&self, proposals: Vec<KvProposal>) -> Vec<Proposed> {
        let s = &self.shared;
        s.writes
            .fetch_add(proposals.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut answers: Vec<Option<Proposed>> = (0..proposals.len()).map(|_| None).collect();
        let mut groups: Vec<Group> = Vec::new();
        let limit = s.config.max_proposal_bytes;
        for (i, p) in proposals.iter().enumerate() {
            let len = p.request.encoded_len();
            if len as u64 > limit {
                answers[i] = Some(Proposed::ready(Err(Error::ProposalTooLarge {
                    size: len as u64,
                    limit,
                })));
                continue;
            }
            let (range, epoch) = match self.route(p) {
                Ok(r) => r,
                Err(e) => {
                    answers[i] = Some(Proposed::ready(Err(e)));
                    continue;
                }
            };
            let open = groups.iter_mut().rev().find(|g| {
                g.range == range && g.forward == p.forward && g.bytes + len as u64 <= limit
            });
            match open {
                Some(g) => {
                    g.members.push((i, len));
                    g.bytes += len as u64;
                }
                None => groups.push(Group {
                    range,
                    epoch,
                    forward: p.forward,
                    members: vec![(i, len)],
                    bytes: len as u64,
                }),
            }
        }
        let timeout = s.config.proposal_timeout;
        for g in groups {
            let mut tokens = Vec::with_capacity(g.members.len());
            for &(i, _) in &g.members {
                let (token, rx) = s.pending.register(timeout);
                tokens.push(token);
                answers[i] = Some(Proposed(State::Waiting(rx)));
            }
            let group = s.pending.register_group(tokens.clone(), timeout);
            let header = RequestHeader {
                range_id: g.range.0,
                epoch: g.epoch,
                request_id: None,
                proposer_node: s.node.0,
                proposal_token: group,
            };
            let data = encode_batch_entry(
                &header,
                g.members.iter().zip(&tokens).map(|(&(i, len), &token)| {
                    let p = &proposals[i];
                    let id = p
                        .opts
                        .request_id
                        .map(|(client_id, seq)| RequestId { client_id, seq });
                    (id, token, &p.request, len)
                }),
            );
            if s.is_stopped() {
                s.pending.complete(group, Err(Error::Stopped));
                continue;
            }
            let msg = PeerMsg::ProposeBatch {
                token: group,
                data,
                forward: g.forward,
            };
            if let Err(e) = s.post(g.range, msg) {
                s.pending.complete(group, Err(e));
            }
        }
        answers
            .into_iter()
            .map(|a| a.expect("every command is answered or waiting"))
            .collect()
    }

    /// The range (and its epoch) this node routes `p` to, after checking the caller's route
    /// and, for a multi-put, that every key is in that range.
    fn route(&self, p: &KvProposal) -> Result<(RangeId, Option<RangeEpoch>)> {
        use kv_request::Op;
        let s = &self.shared;
        // The first key routes; the others (of a multi-key command) must be in its range.
        // (A single-key command allocates nothing here: an empty Vec does not.)
        let none = || Error::InvalidCommand("a multi-key command without keys".into());
        let (first, rest): (&[u8], Vec<&[u8]>) = match &p.request.op {
            Some(Op::Put(x)) => (&x.key, Vec::new()),
            Some(Op::Delete(x)) => (&x.key, Vec::new()),
            Some(Op::Insert(x)) => (&x.key, Vec::new()),
            Some(Op::Cas(x)) => (&x.key, Vec::new()),
            Some(Op::Incr(x)) => (&x.key, Vec::new()),
            Some(Op::MultiPut(m)) => {
                let (f, rest) = m.puts.split_first().ok_or_else(none)?;
                (&f.key, rest.iter().map(|p| &p.key[..]).collect())
            }
            Some(Op::Writes(w)) => {
                let (f, rest) = w.writes.split_first().ok_or_else(none)?;
                (&f.key, rest.iter().map(|w| &w.key[..]).collect())
            }
            None => return Err(Error::InvalidCommand("empty KvRequest".into())),
        };
        let routed = s.router.with_range(first, |d| {
            let moved = p.range.is_some_and(|r| r.0 != d.range_id)
                || p.opts
                    .epoch
                    .is_some_and(|e| e.is_stale(&d.epoch_or_default()));
            let spans = rest.iter().any(|x| !d.contains(x));
            if moved || spans {
                Err(Box::new(d.clone()))
            } else {
                Ok((d.id(), d.epoch))
            }
        })?;
        match routed {
            Ok(r) => {
                s.record_load(r.0 .0, first);
                Ok(r)
            }
            // The caller's view is stale, or the keys span ranges: say which ranges cover them.
            Err(desc) => {
                let mut current = vec![*desc];
                for x in rest {
                    if let Ok(d) = s.router.lookup(x) {
                        if !current.iter().any(|c| c.range_id == d.range_id) {
                            current.push(d);
                        }
                    }
                }
                Err(Error::EpochNotMatch { current })
            }
        }
    }
}

/// Encodes `RaftCommand { header, batch: AppBatch { requests } }` in one pass, each command
/// written straight into the buffer (`len` is its encoded length). The bytes are those prost
/// would produce for the same message with each command encoded first (see the test).
fn encode_batch_entry<'a>(
    header: &RequestHeader,
    items: impl Iterator<Item = (Option<RequestId>, u64, &'a KvRequest, usize)> + Clone,
) -> Vec<u8> {
    use prost::encoding::{message, uint64};
    let request_len = |id: &Option<RequestId>, token: u64, len: usize| {
        id.as_ref().map_or(0, |r| message::encoded_len(1, r))
            + if token != 0 {
                uint64::encoded_len(2, &token)
            } else {
                0
            }
            + if len != 0 {
                key_len(3) + encoded_len_varint(len as u64) + len
            } else {
                0
            }
    };
    let batch_len: usize = items
        .clone()
        .map(|(id, token, _, len)| {
            let n = request_len(&id, token, len);
            key_len(1) + encoded_len_varint(n as u64) + n
        })
        .sum();
    let total = message::encoded_len(1, header)
        + key_len(4)
        + encoded_len_varint(batch_len as u64)
        + batch_len;
    let mut buf = Vec::with_capacity(total);
    message::encode(1, header, &mut buf);
    encode_key(4, WireType::LengthDelimited, &mut buf);
    encode_varint(batch_len as u64, &mut buf);
    for (id, token, request, len) in items {
        encode_key(1, WireType::LengthDelimited, &mut buf);
        encode_varint(request_len(&id, token, len) as u64, &mut buf);
        if let Some(id) = &id {
            message::encode(1, id, &mut buf);
        }
        if token != 0 {
            uint64::encode(2, &token, &mut buf);
        }
        if len != 0 {
            message::encode(3, request, &mut buf);
        }
    }
    debug_assert_eq!(buf.len(), total);
    buf
}

#[cfg(test)]
mod tests {
    use flotilla_proto::command::{
        kv_request, raft_command, AppBatch, AppRequest, KvRequest, MultiPut, Put, RaftCommand,
        RequestHeader, RequestId,
    };
    use flotilla_proto::meta::RangeEpoch;
    use prost::Message as _;

    use super::encode_batch_entry;

    #[test]
    fn a_batch_entry_is_what_prost_encodes_for_the_same_command() {
        let put = |k: &str, v: &str| Put {
            key: k.as_bytes().to_vec().into(),
            value: v.as_bytes().to_vec().into(),
        };
        let requests = [
            KvRequest {
                op: Some(kv_request::Op::Put(put("a", "1"))),
            },
            KvRequest {
                op: Some(kv_request::Op::MultiPut(MultiPut {
                    puts: vec![put("b", "2"), put("c", &"x".repeat(300))],
                })),
            },
            KvRequest::default(),
        ];
        let ids = [
            Some(RequestId {
                client_id: 7,
                seq: 1,
            }),
            None,
            Some(RequestId::default()),
        ];
        let header = RequestHeader {
            range_id: 3,
            epoch: Some(RangeEpoch {
                conf_ver: 1,
                version: 2,
            }),
            request_id: None,
            proposer_node: 2,
            proposal_token: 99,
        };
        let items = requests
            .iter()
            .zip(ids)
            .enumerate()
            .map(|(i, (r, id))| (id, i as u64 * 1000, r, r.encoded_len()));
        let ours = encode_batch_entry(&header, items);
        let theirs = RaftCommand {
            header: Some(header),
            body: Some(raft_command::Body::Batch(AppBatch {
                requests: requests
                    .iter()
                    .zip(ids)
                    .enumerate()
                    .map(|(i, (r, id))| AppRequest {
                        request_id: id,
                        proposal_token: i as u64 * 1000,
                        command: r.encode_to_vec().into(),
                    })
                    .collect(),
            })),
        }
        .encode_to_vec();
        assert_eq!(ours, theirs);
        let back = RaftCommand::decode(&ours[..]).unwrap();
        let Some(raft_command::Body::Batch(b)) = back.body else {
            panic!("not a batch");
        };
        assert_eq!(b.requests.len(), 3);
        assert_eq!(
            KvRequest::decode(&b.requests[1].command[..]).unwrap(),
            requests[1]
        );
    }
}
