//! The scheduler's settings (`[schedule]` in the node's config file): one struct, every field
//! with its unit and default, and `mistakes()` naming each wrong one before the node starts.

use std::time::Duration;

use crate::server::ServerError;

/// How the scheduler places replicas and leaders (see [`crate::schedule`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleConfig {
    /// Whether the scheduler moves anything. Off, it still publishes this node's statistics
    /// and answers `Nodes`/`Placement`, but decides nothing: for applications that place
    /// replicas themselves through the admin API. Default `true`.
    pub enabled: bool,
    /// Time between two passes (statistics published, decisions taken). Default 1 s.
    pub interval: Duration,
    /// Voters every range should have. Default 3.
    pub replication_factor: usize,
    /// How long a node must be down without interruption before its replicas are rebuilt
    /// elsewhere. Default 30 s.
    pub down_time: Duration,
    /// How long a node must have been up (without interruption) before it receives replicas
    /// or leaderships: a node that flaps receives nothing. Default 10 s.
    pub stable_time: Duration,
    /// A node leads too many ranges when above the mean by more than this fraction of it
    /// (and by at least one). Default 0.1 (±10%).
    pub leader_threshold: f64,
    /// A node holds too many replicas when above the mean by more than this fraction of it
    /// (and by at least one). Default 0.1 (±10%).
    pub replica_threshold: f64,
    /// Moves (a learner added and not yet promoted) in flight at once in the ranges one node
    /// leads. Default 4.
    pub max_moves_per_node: usize,
    /// A node with this many snapshot transfers under way receives no new replica. Default 2.
    pub max_snapshots_per_node: usize,
    /// Leader transfers one node starts per pass. Default 4.
    pub max_transfers_per_pass: usize,
    /// Decisions kept in the in-memory log that `Placement` shows (oldest dropped first).
    /// Default 256.
    pub log_capacity: usize,
    /// Adjacent ranges holding fewer bytes than this together (keys and values) are merged:
    /// the left one's replicas move onto the right one's nodes, then it merges into it. 0
    /// turns automatic merges off. Must stay below the split size
    /// (`split.max_range_bytes`), or a merged range would split again. Default 16 MiB.
    pub merge_below_bytes: u64,
    /// How long a range must have stayed below `merge_below_bytes` without splitting before
    /// it merges (seen by the same leader): a range split a moment ago, by load or on request,
    /// is not merged back at once. A merge does not start it over, so a run of small ranges
    /// merges on in rounds. Default 10 minutes.
    pub merge_delay: Duration,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            enabled: true,
            interval: Duration::from_secs(1),
            replication_factor: 3,
            down_time: Duration::from_secs(30),
            stable_time: Duration::from_secs(10),
            leader_threshold: 0.1,
            replica_threshold: 0.1,
            max_moves_per_node: 4,
            max_snapshots_per_node: 2,
            max_transfers_per_pass: 4,
            log_capacity: 256,
            merge_below_bytes: 16 << 20,
            merge_delay: Duration::from_secs(600),
        }
    }
}

impl ScheduleConfig {
    /// The first mistake, if any.
    ///
    /// # Errors
    ///
    /// [`ServerError::Schedule`] naming the field.
    pub fn validate(&self) -> Result<(), ServerError> {
        match self.mistakes().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every mistake, in field order.
    pub fn mistakes(&self) -> Vec<ServerError> {
        let mut out = Vec::new();
        let mut bad = |field: &'static str, problem: &'static str| {
            out.push(ServerError::Schedule { field, problem });
        };
        if self.interval < Duration::from_millis(10) {
            bad("interval", "must be at least 10ms");
        }
        if self.replication_factor == 0 {
            bad("replication_factor", "must be at least 1");
        }
        if self.down_time.is_zero() {
            bad("down_time", "must be non-zero");
        }
        for (field, t) in [
            ("leader_threshold", self.leader_threshold),
            ("replica_threshold", self.replica_threshold),
        ] {
            if !(0.0..=1.0).contains(&t) {
                bad(field, "must be between 0 and 1");
            }
        }
        if self.max_moves_per_node == 0 {
            bad("max_moves_per_node", "must be at least 1");
        }
        if self.max_snapshots_per_node == 0 {
            bad("max_snapshots_per_node", "must be at least 1");
        }
        if self.log_capacity == 0 {
            bad("log_capacity", "must be at least 1");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_validate_and_each_mistake_names_its_field() {
        assert!(ScheduleConfig::default().validate().is_ok());
        let bad = ScheduleConfig {
            interval: Duration::ZERO,
            replication_factor: 0,
            down_time: Duration::ZERO,
            leader_threshold: 2.0,
            replica_threshold: -1.0,
            max_moves_per_node: 0,
            max_snapshots_per_node: 0,
            log_capacity: 0,
            ..ScheduleConfig::default()
        };
        let fields: Vec<&str> = bad
            .mistakes()
            .iter()
            .map(|e| match e {
                ServerError::Schedule { field, .. } => *field,
                other => panic!("unexpected {other}"),
            })
            .collect();
        assert_eq!(
            fields,
            [
                "interval",
                "replication_factor",
                "down_time",
                "leader_threshold",
                "replica_threshold",
                "max_moves_per_node",
                "max_snapshots_per_node",
                "log_capacity"
            ]
        );
    }
}
