//! Leader placement: a replica told which replica of its group should lead (the initial
//! layout spreads its ranges' leaders over the nodes) hands leadership to it whenever it leads
//! and that replica is up and replicating. The first election is a race that the node a
//! layout chose usually wins; when another node wins it (the chosen one started later, or
//! missed the vote), this corrects it without a second election timeout. The preference is
//! forgotten once the chosen replica has been seen leading, once it is no longer a voter, or
//! after a few transfers that did not take: it places leaders once, it does not balance them.

use raft::ProgressState;

use super::Replica;

/// Transfers tried before a replica gives up placing its group's leader: one that does not
/// take (the chosen replica did not win in an election timeout) suggests it cannot lead now,
/// and each try holds proposals back while it lasts.
const TRANSFERS: u8 = 3;

/// The replica that should lead, and the transfers left to try.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placement {
    leader: u64,
    transfers: u8,
}

impl Replica {
    /// Sets the replica that should lead this group (see the module doc).
    pub(crate) fn prefer_leader(&mut self, leader: u64) {
        self.placement = Some(Placement {
            leader,
            transfers: TRANSFERS,
        });
    }

    /// Forgets the preference once its replica leads (raft's soft state named it leader).
    pub(super) fn note_leader(&mut self, leader_id: u64) {
        if self.placement.is_some_and(|p| p.leader == leader_id) {
            self.placement = None;
        }
    }

    /// Called on ticks while a preference is set: forgets it once it holds, or hands
    /// leadership over when this replica leads and the chosen one is up and replicating.
    pub(super) fn place_leader(&mut self) {
        let Some(p) = self.placement else {
            return;
        };
        let raft = &self.raw.raft;
        if raft.leader_id == p.leader || p.transfers == 0 {
            self.placement = None;
            return;
        }
        if !self.is_leader() || raft.lead_transferee.is_some() {
            return;
        }
        let voter = self.raw.store().conf_state().voters.contains(&p.leader);
        let Some(pr) = raft.prs().get(p.leader).filter(|_| voter) else {
            self.placement = None;
            return;
        };
        if pr.recent_active && pr.state == ProgressState::Replicate {
            self.placement = Some(Placement {
                transfers: p.transfers - 1,
                ..p
            });
            // The transferee's election ignores leases.
            self.reads.suspect_lease();
            self.raw.transfer_leader(p.leader);
        }
    }
}
