//! Applying the system range's commands: the id counters and the node registry.
//!
//! Phases:
//! - **Propose** (any replica of the system range; a follower always forwards to its leader,
//!   whatever `forward_proposals` says, so that every node with a replica can lease ids): the
//!   command enters the system range's log like any other (`PeerMsg::Propose`).
//! - **Apply** (every replica, at the same log position): read the records the command
//!   touches (this round's earlier writes first), refuse deterministically or write the new
//!   records into the round's apply batch (the store's `meta` family, never user data), and
//!   answer: an `IdBlock` for an allocation, the `NodeRecord` for a registration or a state
//!   change.
//!
//! Every other range refuses these commands, and the system range refuses every other
//! command but membership changes: its log holds nothing else.

use flotilla_proto::command::{system_command, IdBlock, IdKind, SystemCommand};
use flotilla_proto::meta::{NodeRecord, NodeState};
use flotilla_proto::Message as _;
use flotilla_store::WriteBatch;

use super::apply::Outcome;
use super::{Env, Output, Replica};
use crate::error::Error;
use crate::system::{
    decode_counter, is_node_key, node_key, MAX_IDS_PER_ALLOCATION, NODE_COUNTER, RANGE_COUNTER,
};

impl Replica {
    /// Applies one system command. `Err` is a store failure (the replica is isolated); a
    /// refusal is the outcome.
    pub(super) fn apply_system(
        &mut self,
        cmd: SystemCommand,
        env: &Env<'_>,
        out: &mut Output,
        batch: &mut WriteBatch,
    ) -> crate::error::Result<Outcome> {
        if !self.range.is_system() {
            return Ok(Err(Error::InvalidCommand(format!(
                "{} is not the system range",
                self.range
            ))));
        }
        let mut records = Records { env, out, batch };
        Ok(match cmd.cmd {
            Some(system_command::Cmd::Allocate(a)) => {
                let counter = match IdKind::try_from(a.kind) {
                    Ok(IdKind::RangeIds) => RANGE_COUNTER,
                    Ok(IdKind::NodeIds) => NODE_COUNTER,
                    Err(_) => return Ok(Err(Error::InvalidCommand("unknown id kind".into()))),
                };
                records
                    .allocate(counter, a.count)?
                    .map(|start| IdBlock {
                        start,
                        count: a.count,
                    })
                    .map(|b| b.encode_to_vec())
            }
            Some(system_command::Cmd::RegisterNode(r)) => records
                .register(r.node_id, r.raft_addr, r.client_addr)?
                .map(|n| n.encode_to_vec()),
            Some(system_command::Cmd::SetNodeState(s)) => {
                let Ok(state) = NodeState::try_from(s.state) else {
                    return Ok(Err(Error::InvalidCommand("unknown node state".into())));
                };
                records
                    .set_state(s.node_id, state)?
                    .map(|n| n.encode_to_vec())
            }
            None => Err(Error::InvalidCommand("empty system command".into())),
        })
    }
}

/// The system records as this apply sees them: the engine, under this round's earlier writes.
struct Records<'a, 'e> {
    env: &'a Env<'e>,
    out: &'a mut Output,
    batch: &'a mut WriteBatch,
}

type Answer<T> = crate::error::Result<crate::error::Result<T>>;

impl Records<'_, '_> {
    fn get(&self, name: &[u8]) -> crate::error::Result<Option<Vec<u8>>> {
        if let Some(v) = self.out.system_overlay.get(name) {
            return Ok(Some(v.clone()));
        }
        Ok(self.env.engine.system_record(name)?)
    }

    fn put(&mut self, name: Vec<u8>, value: Vec<u8>) {
        self.batch.put_system_record(&name, &value);
        self.out.system_overlay.insert(name, value);
    }

    fn counter(&self, name: &[u8]) -> crate::error::Result<Option<u64>> {
        match self.get(name)? {
            None => Ok(None),
            Some(v) => decode_counter(&v)
                .map(Some)
                .ok_or_else(|| corrupt(name, "counter")),
        }
    }

    /// Takes `count` ids from the counter `name`: the first of them.
    fn allocate(&mut self, name: &[u8], count: u64) -> Answer<u64> {
        if count == 0 || count > MAX_IDS_PER_ALLOCATION {
            return Ok(Err(Error::InvalidCommand(format!(
                "an allocation takes 1 to {MAX_IDS_PER_ALLOCATION} ids, not {count}"
            ))));
        }
        let Some(next) = self.counter(name)? else {
            // Seeded at bootstrap: a system range without counters was never seeded.
            return Ok(Err(Error::InvalidCommand(
                "the system range holds no id counter (not seeded at bootstrap)".into(),
            )));
        };
        // The system range's own id is the largest: no counter may reach it.
        let Some(end) = next.checked_add(count).filter(|e| *e < u64::MAX) else {
            return Ok(Err(Error::InvalidCommand("id counter exhausted".into())));
        };
        self.put(name.to_vec(), end.to_be_bytes().to_vec());
        Ok(Ok(next))
    }

    fn node(&self, id: u64) -> crate::error::Result<Option<NodeRecord>> {
        let name = node_key(id);
        match self.get(&name)? {
            None => Ok(None),
            Some(v) => NodeRecord::decode(&v[..])
                .map(Some)
                .map_err(|_| corrupt(&name, "node record")),
        }
    }

    fn put_node(&mut self, n: &NodeRecord) {
        self.put(node_key(n.node_id), n.encode_to_vec());
    }

    /// Every node record (on disk, then this round's), for the address check of a join.
    fn nodes(&self) -> crate::error::Result<Vec<NodeRecord>> {
        let mut by_id = std::collections::BTreeMap::new();
        let stored = self.env.engine.system_records()?;
        let pending = self
            .out
            .system_overlay
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()));
        for (name, v) in stored.into_iter().chain(pending) {
            if is_node_key(&name) {
                let n = NodeRecord::decode(&v[..]).map_err(|_| corrupt(&name, "node record"))?;
                by_id.insert(n.node_id, n);
            }
        }
        Ok(by_id.into_values().collect())
    }

    fn register(&mut self, id: u64, raft_addr: String, client_addr: String) -> Answer<NodeRecord> {
        if raft_addr.is_empty() {
            return Ok(Err(Error::InvalidCommand(
                "a node registers with its raft address".into(),
            )));
        }
        let removed = |n: &NodeRecord| n.state == NodeState::Removed as i32;
        let record = if id == 0 {
            // A retried join (its answer was lost) finds the record of its first attempt.
            let same = self
                .nodes()?
                .into_iter()
                .find(|n| n.raft_addr == raft_addr && !removed(n));
            match same {
                Some(mut n) => {
                    n.client_addr = client_addr;
                    n
                }
                None => {
                    let id = match self.allocate(NODE_COUNTER, 1)? {
                        Ok(id) => id,
                        Err(e) => return Ok(Err(e)),
                    };
                    NodeRecord {
                        node_id: id,
                        raft_addr,
                        client_addr,
                        state: NodeState::Up as i32,
                    }
                }
            }
        } else {
            match self.node(id)? {
                Some(n) if removed(&n) => {
                    return Ok(Err(Error::AdminRefused(format!(
                        "node {id} was removed from the cluster; its id is never reused"
                    ))))
                }
                Some(mut n) => {
                    n.raft_addr = raft_addr;
                    n.client_addr = client_addr;
                    n
                }
                None => {
                    return Ok(Err(Error::AdminRefused(format!(
                        "node {id} is not in the registry: join without an id"
                    ))))
                }
            }
        };
        self.put_node(&record);
        Ok(Ok(record))
    }

    fn set_state(&mut self, id: u64, state: NodeState) -> Answer<NodeRecord> {
        let Some(mut n) = self.node(id)? else {
            return Ok(Err(Error::AdminRefused(format!(
                "node {id} is not in the registry"
            ))));
        };
        if n.state == NodeState::Removed as i32 && state != NodeState::Removed {
            return Ok(Err(Error::AdminRefused(format!(
                "node {id} was removed; removal is final"
            ))));
        }
        n.state = state as i32;
        self.put_node(&n);
        Ok(Ok(n))
    }
}

fn corrupt(name: &[u8], what: &'static str) -> Error {
    Error::Store(std::sync::Arc::new(
        flotilla_store::StoreError::Corruption {
            what,
            key: name.to_vec(),
            reason: "undecodable system record".into(),
        },
    ))
}
