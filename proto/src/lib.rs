//! Flotilla's wire and storage types.
//!
//! The `.proto` files in `proto/` are the single definition of everything Flotilla writes to
//! disk or sends to another node; this crate compiles them with prost (and, with the `grpc`
//! feature, tonic stubs) and adds the id newtypes every other crate uses.
//!
//! Raft messages themselves are raft-rs's `eraftpb` types, generated with an older prost; they
//! travel inside our messages as encoded bytes (see [`transport::RaftMessage::message`]).

mod ids;
#[cfg(feature = "grpc")]
mod status;

pub use ids::{NodeId, RangeId, ReplicaId};
#[cfg(feature = "grpc")]
pub use status::LEADER_NODE_METADATA;

/// Range descriptors, epochs, apply state and snapshot framing.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod meta {
    include!(concat!(env!("OUT_DIR"), "/flotilla.meta.rs"));
}

/// Node-to-node batches and coalesced heartbeats.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod transport {
    include!(concat!(env!("OUT_DIR"), "/flotilla.transport.rs"));
}

/// What a raft log entry holds: client and admin commands.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod command {
    include!(concat!(env!("OUT_DIR"), "/flotilla.command.rs"));
}

/// The client KV API of a node.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod kv {
    include!(concat!(env!("OUT_DIR"), "/flotilla.kv.rs"));
}

/// The admin API of a node: split, merge, range table.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod admin {
    include!(concat!(env!("OUT_DIR"), "/flotilla.admin.rs"));
}

pub use prost::bytes::Bytes;
pub use prost::Message;

impl meta::RangeDescriptor {
    /// Whether `key` falls inside `[start_key, end_key)`; an empty end key is unbounded. The
    /// system range ([`RangeId::SYSTEM`]) contains no user key, whatever its bounds say.
    pub fn contains(&self, key: &[u8]) -> bool {
        !self.id().is_system()
            && key >= &self.start_key[..]
            && (self.end_key.is_empty() || key < &self.end_key[..])
    }

    /// The id of this range as a newtype.
    pub fn id(&self) -> RangeId {
        RangeId(self.range_id)
    }

    /// The replica of this range hosted on `node`, if any.
    pub fn replica_on(&self, node: NodeId) -> Option<&meta::ReplicaDescriptor> {
        self.replicas.iter().find(|r| r.node_id == node.0)
    }

    /// The replica with id `id`, if it is a member.
    pub fn replica(&self, id: ReplicaId) -> Option<&meta::ReplicaDescriptor> {
        self.replicas.iter().find(|r| r.replica_id == id.0)
    }

    /// The epoch, or the zero epoch if absent.
    pub fn epoch_or_default(&self) -> meta::RangeEpoch {
        self.epoch.unwrap_or_default()
    }
}

impl meta::RangeEpoch {
    /// True if `self` is older than `current` in either dimension: a request carrying it was
    /// routed with a stale view of the range.
    pub fn is_stale(&self, current: &meta::RangeEpoch) -> bool {
        self.conf_ver < current.conf_ver || self.version < current.version
    }
}

#[cfg(test)]
mod tests {
    use super::meta::RangeDescriptor;

    #[test]
    fn contains_is_half_open_and_empty_end_is_unbounded() {
        let d = RangeDescriptor {
            start_key: b"b".to_vec().into(),
            end_key: b"d".to_vec().into(),
            ..Default::default()
        };
        assert!(!d.contains(b"a"));
        assert!(d.contains(b"b"));
        assert!(d.contains(b"c\xff"));
        assert!(!d.contains(b"d"));
        let all = RangeDescriptor::default();
        assert!(all.contains(b""));
        assert!(all.contains(b"\xff\xff"));
    }
}
