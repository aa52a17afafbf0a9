//! Flotilla: a multi-raft sharding runtime.
//!
//! The key space is cut into ranges; each range is replicated by its own raft group (raft-rs);
//! one [`NodeGroup`] per process hosts thousands of group replicas that share one RocksDB
//! [`Engine`], one transport, one worker pool and one ticker; a [`RangeRouter`] sends every
//! proposal to the group that owns its key.
//!
//! This crate is the facade: it re-exports the public API of the member crates, wires a node
//! ([`server`]: [`Server`], shared by the node binary, tests and benchmarks; [`layout`]: the
//! initial range layout), and owns the examples, benchmarks and the in-memory cluster harness
//! ([`testing`]) that tests and benchmarks share. See ARCHITECTURE.md for the map.

pub mod admin_service;
pub mod kv_service;
pub mod layout;
pub mod server;
pub mod testing;

pub use flotilla_proto as proto;
pub use flotilla_proto::{NodeId, RangeId, ReplicaId};
pub use flotilla_runtime::{
    ApplyContext, ConfigError, Error, KvStateMachine, MembershipChange, NodeGroup, NodeGroupConfig,
    NodeStatus, ProposeOptions, RangeRouter, ReadConsistency, ReplicaStatus, Result, SplitConfig,
    StateMachine, StateRole,
};
pub use flotilla_store::{Engine, StoreConfig, StoreError};
pub use flotilla_transport as transport;
pub use server::{Server, ServerBuilder, ServerConfig, ServerError};
