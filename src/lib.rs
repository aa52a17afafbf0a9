//! Flotilla: a multi-raft sharding runtime.
//!
//! The key space is cut into ranges; each range is replicated by its own raft group (raft-rs);
//! one [`NodeGroup`] per process hosts thousands of group replicas that share one RocksDB
//! [`Engine`], one transport, one worker pool and one ticker; a [`RangeRouter`] sends every
//! proposal to the group that owns its key.
//!
//! This crate is the facade: it re-exports the public API of the member crates and adds what
//! a node process needs on top of them:
//!
//! - [`server`]: the wiring of one node ([`Server`], [`ServerConfig`], [`ServerError`]),
//!   shared by the `flotilla-node` binary, the tests, the benchmarks and the examples;
//! - [`layout`]: the initial range layout a new cluster bootstraps;
//! - [`kv_service`], [`admin_service`] (with [`backup_service`], its backup stream): the
//!   client gRPC APIs a server serves (the admin API's unsafe-recovery calls live in
//!   `admin_recover`);
//! - [`resp`]: the Redis protocol over the same NodeGroup, on its own port;
//! - [`schedule`]: node statistics and the scheduler that balances leaders and replicas and
//!   rebuilds the replicas of dead nodes;
//! - `testing` (with the `testing` feature only, which tests, benchmarks and examples turn
//!   on): the in-memory cluster harness and helpers they share. The product never uses it.
//!
//! See ARCHITECTURE.md for the map.

mod admin_recover;
pub mod admin_service;
pub mod backup_service;
mod coalesce;
pub mod kv_service;
pub mod layout;
pub mod resp;
pub mod schedule;
pub mod server;
#[cfg(feature = "testing")]
pub mod testing;

pub use flotilla_proto as proto;
pub use flotilla_proto::{NodeId, RangeId, ReplicaId};
pub use flotilla_runtime::{
    system_descriptor, ApplyContext, ApplyError, ConfigError, Error, ForcedRange, KvProposal,
    KvStateMachine, MembershipChange, NodeGroup, NodeGroupConfig, NodeStatus, ProposeOptions,
    RangeRouter, ReadConsistency, ReadContext, RecoveryRefusal, RecoveryReplica, ReplicaStatus,
    Result, ScanPage, SplitConfig, StateMachine, StateRole, SystemSeed, ID_LEASE_BLOCK,
};
pub use flotilla_store::{Engine, StoreConfig, StoreError};
pub use flotilla_transport as transport;
pub use server::{Server, ServerBuilder, ServerConfig, ServerError};
