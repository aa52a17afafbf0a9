//! What `flotilla-ctl recover` prints: the plan (per range: the membership before, the
//! survivor, its log's last term and commit, applied and last index, the membership changes
//! dropped, the replicas retired) and, once acted, each step's outcome, with the warning of
//! what may be lost; as a table or one JSON document.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::plan::Plan;
use super::{intervals, range_name, refusal_name, Outcome, SYSTEM};
use crate::output::{show_bytes, table, Output};

/// What is printed: the plan and, once acted, each step's outcome.
pub(super) struct Report<'a> {
    pub(super) plan: &'a Plan,
    pub(super) dry_run: bool,
    pub(super) outcomes: BTreeMap<u64, Outcome>,
    pub(super) removed: Vec<u64>,
    pub(super) retired: Vec<(u64, u64)>,
    pub(super) failures: Vec<String>,
}

/// The warning every run prints, plainly.
const WARNING: &str = "WARNING: unsafe recovery gives up raft's guarantee for these ranges. \
Each continues from its survivor's log alone: writes the lost nodes acknowledged beyond the \
survivor's LAST index are gone for good. Entries after the survivor's COMMIT index (up to \
LAST) were never known committed; the new single-voter membership commits them, so writes \
whose clients saw a timeout or an error may appear. Membership changes after APPLIED are \
dropped (the forced membership replaces them).";

impl<'a> Report<'a> {
    pub(super) fn new(plan: &'a Plan, dry_run: bool) -> Self {
        Report {
            plan,
            dry_run,
            outcomes: BTreeMap::new(),
            removed: Vec::new(),
            retired: Vec::new(),
            failures: Vec::new(),
        }
    }

    pub(super) fn print(&self, out: Output) {
        match out {
            Output::Json => println!("{}", self.json()),
            Output::Table => self.table(),
        }
    }

    fn json(&self) -> Value {
        let ranges: Vec<Value> = self
            .plan
            .ranges
            .iter()
            .map(|r| {
                let p = &r.replica;
                let mut v = json!({
                    "range": range_name(r.range_id), "range_id": r.range_id,
                    "survivor_node": r.survivor, "replica_id": p.replica_id,
                    "voters_before": r.voters_before,
                    "term": p.term, "commit": p.commit, "applied": p.applied,
                    "last_index": p.last_index, "last_term": p.last_term,
                    "uncommitted_entries": p.last_index.saturating_sub(p.commit),
                    "dropped_conf_changes": p.conf_change_indexes,
                    "retire_nodes": r.retire,
                });
                match self.outcomes.get(&r.range_id) {
                    Some(Outcome::Forced {
                        leader,
                        term,
                        conf_ver,
                        neutralized,
                    }) => {
                        v["outcome"] = json!({
                            "forced": true, "leader": leader, "term": term, "conf_ver": conf_ver,
                            "dropped_conf_changes": neutralized,
                        })
                    }
                    Some(Outcome::Refused(why)) => {
                        v["outcome"] = json!({
                            "forced": false, "refused": refusal_name(why.kind),
                            "message": why.message,
                        })
                    }
                    Some(Outcome::Failed(e)) => {
                        v["outcome"] = json!({ "forced": false, "error": e })
                    }
                    None => {}
                }
                v
            })
            .collect();
        let names = |ids: &[u64]| ids.iter().map(|&r| range_name(r)).collect::<Vec<_>>();
        json!({
            "lost_nodes": self.plan.lost,
            "dry_run": self.dry_run,
            "ranges": ranges,
            "left_alone": names(&self.plan.left_alone),
            "lost_entirely": self.plan.lost_entirely.iter()
                .map(|(s, e)| json!({"start": show_bytes(s), "end": show_bytes(e)}))
                .collect::<Vec<_>>(),
            "removed_nodes": self.removed,
            "retired": self.retired.iter().map(|(r, n)| json!({"range": range_name(*r), "node": n})).collect::<Vec<_>>(),
            "failures": self.failures,
            "warning": WARNING,
        })
    }

    fn table(&self) {
        let lost: Vec<String> = self.plan.lost.iter().map(|n| n.to_string()).collect();
        println!(
            "unsafe recovery after losing node(s) {}{}",
            lost.join(", "),
            if self.dry_run {
                " (dry run: nothing is changed)"
            } else {
                ""
            }
        );
        if self.plan.ranges.is_empty() {
            println!("no range lost a majority of its voters to these nodes: nothing to force");
        } else {
            let rows: Vec<Vec<String>> = self
                .plan
                .ranges
                .iter()
                .map(|r| {
                    let p = &r.replica;
                    let dropped = if p.conf_change_indexes.is_empty() {
                        "-".to_string()
                    } else {
                        p.conf_change_indexes
                            .iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    let retire = if r.retire.is_empty() {
                        "-".to_string()
                    } else {
                        r.retire
                            .iter()
                            .map(|n| format!("n{n}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    let outcome = match self.outcomes.get(&r.range_id) {
                        None if self.dry_run => "planned".to_string(),
                        None => "not attempted".to_string(),
                        Some(Outcome::Forced {
                            leader: true, term, ..
                        }) => format!("forced, leads at term {term}"),
                        Some(Outcome::Forced { .. }) => "forced, not leading yet".to_string(),
                        Some(Outcome::Refused(why)) => {
                            format!("refused: {}", refusal_name(why.kind))
                        }
                        Some(Outcome::Failed(_)) => "failed".to_string(),
                    };
                    vec![
                        range_name(r.range_id),
                        r.voters_before
                            .iter()
                            .map(|n| format!("n{n}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        format!("n{}", r.survivor),
                        p.replica_id.to_string(),
                        p.last_term.to_string(),
                        p.commit.to_string(),
                        p.applied.to_string(),
                        p.last_index.to_string(),
                        p.last_index.saturating_sub(p.commit).to_string(),
                        dropped,
                        retire,
                        outcome,
                    ]
                })
                .collect();
            table(
                &[
                    "RANGE",
                    "VOTERS BEFORE",
                    "SURVIVOR",
                    "REPLICA",
                    "LAST TERM",
                    "COMMIT",
                    "APPLIED",
                    "LAST",
                    "UNCOMMITTED",
                    "CONF CHANGES DROPPED",
                    "RETIRE",
                    "OUTCOME",
                ],
                &rows,
            );
            println!("{WARNING}");
            for r in &self.plan.ranges {
                let p = &r.replica;
                let tail = p.last_index.saturating_sub(p.commit);
                println!(
                    "{}: continues from node {}'s log up to index {} (term {}), known committed \
                     up to {}; {tail} entr{} after that, never known committed, {} committed by \
                     the new membership.",
                    range_name(r.range_id),
                    r.survivor,
                    p.last_index,
                    p.last_term,
                    p.commit,
                    if tail == 1 { "y" } else { "ies" },
                    if tail == 1 { "is" } else { "are" },
                );
            }
        }
        if !self.plan.left_alone.is_empty() {
            let names: Vec<String> = self
                .plan
                .left_alone
                .iter()
                .map(|&r| range_name(r))
                .collect();
            println!(
                "left alone (a quorum survives in the newest membership): {}",
                names.join(", ")
            );
        }
        if !self.plan.lost_entirely.is_empty() {
            println!(
                "LOST: no surviving replica holds the keys {}: every replica of their ranges \
                 was on the lost nodes",
                intervals(&self.plan.lost_entirely)
            );
        }
        if !self.plan.registry_reachable {
            println!(
                "note: no reachable node holds the system range: the lost nodes cannot be \
                 marked removed in the registry"
            );
        }
        if !self.dry_run {
            if !self.removed.is_empty() {
                let ids: Vec<String> = self.removed.iter().map(|n| n.to_string()).collect();
                println!(
                    "marked removed in the registry (refused from now on): node(s) {}",
                    ids.join(", ")
                );
            }
            for (r, n) in &self.retired {
                println!(
                    "retired the stale replica of {} on node {n}",
                    range_name(*r)
                );
            }
            if !self.plan.ranges.is_empty() {
                println!(
                    "the scheduler now adds replicas to each recovered range until it is back \
                     at its replication factor (flotilla-ctl ranges, flotilla-ctl placement)"
                );
            }
            if let Some(sys) = self.plan.ranges.iter().find(|r| r.range_id == SYSTEM) {
                println!(
                    "note: the system range (node registry, id counters) lives on node {} alone \
                     until the scheduler has added replicas of it on other nodes",
                    sys.survivor
                );
            }
            for f in &self.failures {
                println!("FAILED: {f}");
            }
        }
    }
}
