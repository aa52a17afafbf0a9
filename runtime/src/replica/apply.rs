//! Applying committed entries: normal entries go to the state machine (after the retry
//! de-duplication check), admin entries to their module (split, merge), membership entries to
//! raft and the descriptor. Everything an entry changes, and the new applied index, go into
//! one batch.

use flotilla_proto::command::{
    admin_command, raft_command, AdminCommand, ClientRecord, RaftCommand,
};
use flotilla_proto::Message as _;
use flotilla_store::WriteBatch;
use raft::prelude::{Entry, EntryType};

use super::merge::Applied;
use super::Replica;
use crate::error::Error;
use crate::fsm::worker::Round;
use crate::node_group::Shared;
use crate::state_machine::ApplyContext;

impl Replica {
    /// Applies `entries` in order. A CommitMerge whose source is not ready stops the apply:
    /// it and everything after it wait in `stalled` (raft hands committed entries out once)
    /// and the applied index stays before it.
    pub(super) fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
        shared: &Shared,
        round: &mut Round,
        batch: &mut WriteBatch,
    ) -> crate::Result<()> {
        let mut last = None;
        let mut entries = entries.into_iter();
        while let Some(e) = entries.next() {
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if !e.data.is_empty() {
                        if let Applied::Wait = self.apply_command(&e, shared, round, batch) {
                            self.stalled = std::iter::once(e).chain(entries).collect();
                            break;
                        }
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change_entry(&e, shared, round, batch);
                }
            }
            last = Some((e.index, e.term));
            self.settle_proposals(e.index, e.term, round);
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
        shared: &Shared,
        round: &mut Round,
        batch: &mut WriteBatch,
    ) -> Applied {
        let cmd = match RaftCommand::decode(&e.data[..]) {
            Ok(c) => c,
            Err(err) => {
                // Only our own proposals enter the log, so this is a bug or a damaged log;
                // skipping it on every replica keeps them identical.
                tracing::error!(range = %self.range, index = e.index, "undecodable command: {err}");
                return Applied::Done;
            }
        };
        let header = cmd.header.unwrap_or_default();
        let token = (header.proposer_node == shared.node.0).then_some(header.proposal_token);
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
        let answer = match cmd.body {
            _ if frozen => Err(Error::Busy("range is being merged; retry shortly")),
            Some(raft_command::Body::App(data)) => {
                self.apply_app(&header, &data, e.index, shared, round, batch)
            }
            Some(raft_command::Body::Admin(admin)) => match admin.cmd {
                Some(admin_command::Cmd::Split(split)) => {
                    self.apply_split(&header, &split, at, shared, round, batch)
                }
                Some(admin_command::Cmd::PrepareMerge(p)) => {
                    self.apply_prepare_merge(&header, &p, at, shared, batch)
                }
                Some(admin_command::Cmd::CommitMerge(c)) => {
                    match self.apply_commit_merge(&header, &c, at, shared, round, batch) {
                        Ok(answer) => answer,
                        Err(()) => return Applied::Wait,
                    }
                }
                Some(admin_command::Cmd::RollbackMerge(r)) => {
                    self.apply_rollback_merge(&r, shared, batch)
                }
                None => Err(Error::AdminRefused("empty admin command".into())),
            },
            None => Err(Error::InvalidCommand("empty command".into())),
        };
        if let Some(t) = token {
            round.complete(t, answer);
        }
        Applied::Done
    }

    /// Applies an application command once per request id: a retry of the last applied
    /// request of a client gets the recorded answer instead of a second apply.
    fn apply_app(
        &mut self,
        header: &flotilla_proto::command::RequestHeader,
        data: &[u8],
        index: u64,
        shared: &Shared,
        round: &mut Round,
        batch: &mut WriteBatch,
    ) -> crate::Result<Vec<u8>> {
        let Some(desc) = self.descriptor().cloned() else {
            return Err(Error::RangeNotFound(self.range));
        };
        // A command routed before the range last changed shape (split, merge) is refused, the
        // same way on every replica: the caller refreshes its view and retries.
        if header
            .epoch
            .is_some_and(|e| e.version < desc.epoch_or_default().version)
        {
            return Err(Error::EpochNotMatch {
                current: shared
                    .router
                    .overlapping(&desc.start_key, b"")
                    .into_iter()
                    .take(2)
                    .collect(),
            });
        }
        let req = header.request_id.filter(|r| r.client_id != 0);
        if let Some(req) = req {
            let prev = match round.client_records.get(&(self.range.0, req.client_id)) {
                Some(r) => Some(r.clone()),
                None => shared
                    .engine
                    .client_record(self.range, req.client_id)
                    .ok()
                    .flatten()
                    .and_then(|b| ClientRecord::decode(&b[..]).ok()),
            };
            if let Some(prev) = prev {
                if req.seq == prev.seq {
                    return if prev.error.is_empty() {
                        Ok(prev.response.to_vec())
                    } else {
                        Err(Error::InvalidCommand(prev.error))
                    };
                }
                if req.seq < prev.seq {
                    return Err(Error::InvalidCommand(format!(
                        "request {} of client {} is older than its last applied request {}",
                        req.seq, req.client_id, prev.seq
                    )));
                }
            }
        }
        if self.is_leader() {
            let (writes, bytes) = &mut self.written_since_split_check;
            *writes += 1;
            *bytes += data.len() as u64;
            if shared.config.split.should_check(*writes, *bytes) {
                self.written_since_split_check = (0, 0);
                shared.split_candidates.lock().insert(self.range.0);
            }
        }
        let result = {
            let mut ctx = ApplyContext::new(&shared.engine, batch, &mut round.overlay);
            shared.state_machine.apply(&desc, index, data, &mut ctx)
        };
        if let Some(req) = req {
            let record = ClientRecord {
                seq: req.seq,
                response: result.clone().unwrap_or_default().into(),
                error: result.clone().err().unwrap_or_default(),
            };
            batch.put_client_record(self.range, req.client_id, &record.encode_to_vec());
            round
                .client_records
                .insert((self.range.0, req.client_id), record);
        }
        result.map_err(Error::InvalidCommand)
    }
}
