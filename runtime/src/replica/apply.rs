//! Applying committed entries: normal entries go to the state machine (after the retry
//! de-duplication check), admin entries to their module (split, merge), membership entries to
//! raft and the descriptor. Everything an entry changes, and the new applied index, go into
//! one batch.
//!
//! Two kinds of failure are kept apart. A *refusal* (stale epoch, a command the state machine
//! rejects, a frozen merge source) is the entry's replicated outcome: every replica reaches it
//! alike, the proposer gets it as its answer and retries see the same. A *store failure* (a
//! read or decode of what this replica stored) happened here only: it is returned as `Err`
//! from the apply, the replica is isolated, and its applied index does not move past the
//! entry, so a restart applies it again from the log. (The writes of entries it applied
//! earlier in the same round still go out with the round's batch, ahead of the applied index:
//! a restart re-applies them over their own effect, which converges for commands that set
//! values, as the KV state machine's do, but not for a state machine that accumulates.)

use flotilla_proto::command::{
    admin_command, raft_command, AdminCommand, ClientRecord, RaftCommand, RequestHeader,
};
use flotilla_proto::Message as _;
use flotilla_store::WriteBatch;
use raft::prelude::{Entry, EntryType};

use super::{Effect, Env, Output, Replica};
use crate::error::Error;
use crate::state_machine::{ApplyContext, ApplyError};

/// The replicated outcome of one command: the answer for the proposer, or its deterministic
/// refusal.
pub(super) type Outcome = crate::error::Result<Vec<u8>>;

/// Where applying one command got to.
pub(super) enum Step {
    /// Applied, or refused: the outcome.
    Done(Outcome),
    /// Not now: the entry and those after it wait for a later round (a CommitMerge whose source
    /// is not ready, a split whose new range's replica is busy in a round).
    Wait,
}

impl Replica {
    /// Applies `entries` in order. An entry that must wait ([`Step::Wait`]) stops the apply:
    /// it and everything after it wait in `stalled` (raft hands committed entries out once)
    /// and the applied index stays before it.
    ///
    /// # Errors
    ///
    /// A store failure: the replica cannot go on (see the module doc).
    pub(super) fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
        env: &Env<'_>,
        out: &mut Output,
        batch: &mut WriteBatch,
    ) -> crate::error::Result<()> {
        let mut last = None;
        let mut entries = entries.into_iter();
        while let Some(e) = entries.next() {
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if !e.data.is_empty() {
                        if let Step::Wait = self.apply_command(&e, env, out, batch)? {
                            self.stalled = std::iter::once(e).chain(entries).collect();
                            break;
                        }
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change_entry(&e, env, out, batch);
                }
            }
            last = Some((e.index, e.term));
            self.settle_proposals(e.index, e.term, out);
            if self.removed {
                break;
            }
        }
        if let Some((index, term)) = last {
            self.raw.mut_store().set_applied(index, term, batch);
        }
        Ok(())
    }

    fn apply_command(
        &mut self,
        e: &Entry,
        env: &Env<'_>,
        out: &mut Output,
        batch: &mut WriteBatch,
    ) -> crate::error::Result<Step> {
        let cmd = match RaftCommand::decode(&e.data[..]) {
            Ok(c) => c,
            Err(err) => {
                // Only our own proposals enter the log, so this is a bug; skipping it on every
                // replica keeps them identical.
                tracing::error!(range = %self.range, index = e.index, "undecodable command: {err}");
                return Ok(Step::Done(Err(Error::InvalidCommand(
                    "undecodable command".into(),
                ))));
            }
        };
        let header = cmd.header.unwrap_or_default();
        let token = (header.proposer_node == env.node.0).then_some(header.proposal_token);
        let at = (e.index, e.term);
        // A merge source past its prepare entry refuses everything but the rollback: the
        // target takes its keys as of the prepare entry.
        let frozen = self.merge_state().is_some()
            && !matches!(
                &cmd.body,
                Some(raft_command::Body::Admin(AdminCommand {
                    cmd: Some(admin_command::Cmd::RollbackMerge(_))
                }))
            );
        let step = match cmd.body {
            _ if frozen => Step::Done(Err(Error::Busy("range is being merged; retry shortly"))),
            Some(raft_command::Body::App(data)) => {
                Step::Done(self.apply_app(&header, &data, e.index, env, out, batch)?)
            }
            // Each command of a batch is applied (and de-duplicated) on its own and answers
            // its own token; the batch's token is then completed with an empty answer.
            Some(raft_command::Body::Batch(b)) => {
                for r in b.requests {
                    let h = RequestHeader {
                        request_id: r.request_id,
                        ..header
                    };
                    let outcome = self.apply_app(&h, &r.command, e.index, env, out, batch)?;
                    if token.is_some() {
                        out.complete(r.proposal_token, outcome);
                    }
                }
                Step::Done(Ok(Vec::new()))
            }
            Some(raft_command::Body::System(cmd)) => {
                Step::Done(self.apply_system(cmd, env, out, batch)?)
            }
            Some(raft_command::Body::Admin(_)) if self.range.is_system() => Step::Done(Err(
                Error::AdminRefused("the system range is never split or merged".into()),
            )),
            Some(raft_command::Body::Admin(admin)) => match admin.cmd {
                Some(admin_command::Cmd::Split(split)) => {
                    self.apply_split(&header, &split, at, env, out, batch)?
                }
                Some(admin_command::Cmd::PrepareMerge(p)) => {
                    Step::Done(self.apply_prepare_merge(&header, &p, at, out, batch))
                }
                Some(admin_command::Cmd::CommitMerge(c)) => {
                    self.apply_commit_merge(&header, &c, at, env, out, batch)?
                }
                Some(admin_command::Cmd::RollbackMerge(r)) => {
                    Step::Done(self.apply_rollback_merge(&r, out, batch))
                }
                Some(admin_command::Cmd::AbandonMerge(a)) => {
                    Step::Done(self.apply_abandon_merge(&header, &a, out, batch))
                }
                None => Step::Done(Err(Error::AdminRefused("empty admin command".into()))),
            },
            None => Step::Done(Err(Error::InvalidCommand("empty command".into()))),
        };
        if let (Step::Done(answer), Some(t)) = (&step, token) {
            out.complete(t, answer.clone());
        }
        Ok(step)
    }

    /// Applies an application command once per request id: a retry of the last applied
    /// request of a client gets the recorded answer instead of a second apply. `Err` is a
    /// store failure; the outcome is inside `Ok`.
    fn apply_app(
        &mut self,
        header: &flotilla_proto::command::RequestHeader,
        data: &[u8],
        index: u64,
        env: &Env<'_>,
        out: &mut Output,
        batch: &mut WriteBatch,
    ) -> crate::error::Result<Outcome> {
        let Some(desc) = self.descriptor().cloned() else {
            return Ok(Err(Error::RangeNotFound(self.range)));
        };
        // A command routed before the range last changed shape (split, merge) is refused, the
        // same way on every replica: the caller refreshes its view and retries.
        if header
            .epoch
            .is_some_and(|e| e.version < desc.epoch_or_default().version)
        {
            return Ok(Err(Error::EpochNotMatch {
                current: env
                    .router
                    .overlapping(&desc.start_key, b"")
                    .into_iter()
                    .take(2)
                    .collect(),
            }));
        }
        let req = header.request_id.filter(|r| r.client_id != 0);
        if let Some(req) = req {
            let key = (self.range.0, req.client_id);
            // This round's record, else the one this replica last wrote (`retry`), else the
            // engine's. A record that cannot be read is a failure of this replica, never "no
            // record": that would apply a retry a second time here only.
            let read;
            let prev = match out
                .client_records
                .get(&key)
                .or_else(|| self.retry_records.get(req.client_id))
            {
                Some(r) => Some(r),
                None => {
                    read = match env.engine.client_record(self.range, req.client_id)? {
                        Some(b) => Some(ClientRecord::decode(&b[..]).map_err(|e| {
                            Error::Store(std::sync::Arc::new(
                                flotilla_store::StoreError::Corruption {
                                    what: "client record",
                                    key: req.client_id.to_be_bytes().to_vec(),
                                    reason: e.to_string(),
                                },
                            ))
                        })?),
                        None => None,
                    };
                    read.as_ref()
                }
            };
            if let Some(prev) = prev {
                if req.seq == prev.seq {
                    return Ok(if prev.error.is_empty() {
                        Ok(prev.response.to_vec())
                    } else {
                        Err(Error::InvalidCommand(prev.error.clone()))
                    });
                }
                if req.seq < prev.seq {
                    return Ok(Err(Error::InvalidCommand(format!(
                        "request {} of client {} is older than its last applied request {}",
                        req.seq, req.client_id, prev.seq
                    ))));
                }
            }
        }
        if self.is_leader() {
            let (writes, bytes) = &mut self.written_since_split_check;
            *writes += 1;
            *bytes += data.len() as u64;
            if env.config.split.should_check(*writes, *bytes) {
                self.written_since_split_check = (0, 0);
                out.effect(Effect::SplitCandidate(self.range));
            }
        }
        let result = {
            let mut ctx = ApplyContext::new(env.engine, batch, &mut out.overlay);
            match env.state_machine.apply(&desc, index, data, &mut ctx) {
                Ok(answer) => Ok(answer),
                Err(ApplyError::Refused(why)) => Err(why),
                Err(ApplyError::Store(e)) => return Err(e.into()),
            }
        };
        if let Some(req) = req {
            let record = ClientRecord {
                seq: req.seq,
                response: result.clone().unwrap_or_default().into(),
                error: result.clone().err().unwrap_or_default(),
            };
            batch.put_client_record(self.range, req.client_id, &record.encode_to_vec());
            self.retry_records.insert(req.client_id, record.clone());
            out.client_records
                .insert((self.range.0, req.client_id), record);
        }
        Ok(result.map_err(Error::InvalidCommand))
    }
}
