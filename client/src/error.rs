//! The client's one error type. Each variant says what to do next; everything the client can
//! retry by itself (leader changes, stale ranges, nodes down, back-pressure, lost answers) it
//! retries until the request's deadline, so what reaches the caller is final for that call.

use std::time::Duration;

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The deadline passed before the request got an answer; `last` is why the last attempt
    /// failed. For a write, `outcome_unknown` says whether an attempt may have been applied (it
    /// reached a node that did not answer, or answered "outcome unknown"): read the key back,
    /// or send the write again (a new write: it may apply twice). If false, nothing was
    /// applied: retry later or raise the deadline.
    #[error(
        "deadline of {timeout:?} passed after {attempts} attempt(s); last: {last}{}",
        if *.outcome_unknown { " (the write may have been applied)" } else { "" }
    )]
    DeadlineExceeded {
        /// The request's time budget.
        timeout: Duration,
        /// Attempts sent to nodes.
        attempts: u32,
        /// Why the last attempt failed.
        last: String,
        /// A write may have been applied.
        outcome_unknown: bool,
    },
    /// No configured endpoint answered when the client started: check the addresses and that
    /// the nodes run.
    #[error("no node reachable at {endpoints:?}; last: {last}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: Vec<String>,
        /// The last failure.
        last: String,
    },
    /// The request is malformed, too large, or refused by the state machine: fix it;
    /// sending it again will fail again.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A node failed in a way a retry does not fix here (an internal error, an answer this
    /// client does not understand: a version mismatch): report it.
    #[error("server error: {0}")]
    Server(String),
    /// The client's configuration is unusable: fix it.
    #[error("invalid client config: {0}")]
    Config(String),
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
