//! `flotilla-ctl node`: a node's life in the cluster, as an operator drives it.
//!
//! - `add` records a node in the registry before it starts (the id it will get when it
//!   starts with `--join` from that raft address), for operators who provision ids first.
//! - `decommission` retires a node without losing a write: it is marked draining (the
//!   schedulers then move its replicas and hand its leaderships to the other nodes, and
//!   place nothing new on it), this command waits until the node's own statistics say it
//!   holds nothing and no range of the range table lists it, then marks it removed (final: its id is never reused and every node's
//!   transport refuses it). Interrupted, it can be run again: it goes on from where the
//!   registry stands.
//! - `remove` marks a node that is gone for good removed at once, without draining: its
//!   replicas are rebuilt on other nodes without waiting for `down_time`.
//!
//! Registry writes go through the system range, so each is tried on every reachable
//! endpoint until one that holds the system range's leader accepts it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use flotilla_proto::admin::{
    JoinRequest, NodesRequest, NodesResponse, PlacementRequest, RegistryRequest,
    SetNodeStateRequest,
};
use flotilla_proto::meta::{NodeRecord, NodeState};
use serde_json::json;

use crate::cluster::{self, Cluster};
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Record a new node in the registry and print its id; start it with `--join` (and this
    /// raft address) to take that id.
    Add {
        /// The address other nodes will reach its raft transport at (host:port).
        #[arg(long)]
        raft: String,
        /// The address clients will reach its APIs at (host:port).
        #[arg(long)]
        client: String,
    },
    /// Drain a node of its replicas and leaderships, then remove it for good.
    Decommission {
        /// The node.
        node: u64,
        /// Only mark it draining; do not wait, do not remove it.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait for the node to be drained: 30s, 10m.
        #[arg(long, default_value = "30m", value_parser = crate::parse_duration)]
        wait: Duration,
    },
    /// Remove a node that is gone for good, without draining it (its replicas are rebuilt
    /// elsewhere at once). Final.
    Remove {
        /// The node.
        node: u64,
    },
}

pub async fn run(cluster: &Cluster, command: NodeCommand, out: Output) -> Result<()> {
    match command {
        NodeCommand::Add { raft, client } => {
            let record = on_system(cluster, "Join", |mut admin| {
                let (raft, client) = (raft.clone(), client.clone());
                async move {
                    admin
                        .join(JoinRequest {
                            node_id: 0,
                            raft_addr: raft,
                            client_addr: client,
                        })
                        .await
                        .map(|r| r.into_inner().node)
                }
            })
            .await?
            .context("the answer has no node record")?;
            show(
                &record,
                out,
                "recorded; start it with --join and this raft address",
            );
            Ok(())
        }
        NodeCommand::Remove { node } => {
            let record = set_state(cluster, node, NodeState::Removed).await?;
            show(&record, out, "removed for good");
            Ok(())
        }
        NodeCommand::Decommission {
            node,
            no_wait,
            wait,
        } => decommission(cluster, node, no_wait, wait, out).await,
    }
}

async fn decommission(
    cluster: &Cluster,
    node: u64,
    no_wait: bool,
    wait: Duration,
    out: Output,
) -> Result<()> {
    let registry = registry(cluster).await?;
    let Some(record) = registry.iter().find(|r| r.node_id == node) else {
        bail!("node {node} is not in the registry (flotilla-ctl registry lists it)");
    };
    if record.state == NodeState::Removed as i32 {
        bail!("node {node} was already removed");
    }
    // The nodes left to hold replicas must be enough for the replication factor, or the
    // drain could never finish.
    let factor = replication_factor(cluster).await?;
    let members = registry
        .iter()
        .filter(|r| r.node_id != node && r.state == NodeState::Up as i32)
        .count();
    if members < factor {
        bail!(
            "decommissioning node {node} would leave {members} member node(s) for a replication \
             factor of {factor}: add a node first (flotilla-node --join)"
        );
    }
    let started = Instant::now();
    set_state(cluster, node, NodeState::Draining).await?;
    if out == Output::Table {
        println!("node {node}: draining");
    }
    if no_wait {
        if out == Output::Json {
            println!("{}", json!({ "node_id": node, "state": "draining" }));
        }
        return Ok(());
    }
    let deadline = started + wait;
    let mut last_shown = None;
    loop {
        // Its own statistics, published after draining began: what it still holds.
        let held = held_by(cluster, node, started.elapsed()).await;
        if let Some((replicas, leaders)) = held {
            // And no range's newest descriptor lists a replica there (a replica the node
            // lost track of, one failed and isolated, is in no count but still a member).
            if replicas == 0 && leaders == 0 && listed_in(cluster, node).await? == 0 {
                break;
            }
            if out == Output::Table && last_shown != Some((replicas, leaders)) {
                println!("node {node}: {replicas} replicas, {leaders} leaders left");
                last_shown = Some((replicas, leaders));
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "node {node} still holds {} after {wait:?}; it stays draining (flotilla-ctl \
                 placement shows what the schedulers do; run this again to keep waiting)",
                held.map_or(
                    "an unknown number of replicas (no fresh statistics)".into(),
                    |(r, l)| format!("{r} replicas and {l} leaders")
                )
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let record = set_state(cluster, node, NodeState::Removed).await?;
    let secs = started.elapsed().as_secs_f64();
    match out {
        Output::Json => println!(
            "{}",
            json!({ "node_id": node, "state": state_name(&record), "drained_secs": secs })
        ),
        Output::Table => println!("node {node}: drained in {secs:.1} s and removed"),
    }
    Ok(())
}

/// What `node` holds (replicas, leaders) by statistics younger than `fresh`, as the first
/// reachable node that has such statistics sees them.
async fn held_by(cluster: &Cluster, node: u64, fresh: Duration) -> Option<(u64, u64)> {
    for (_, mut admin) in cluster.admins() {
        let answer = tokio::time::timeout(cluster.timeout(), admin.nodes(NodesRequest {})).await;
        let Ok(Ok(r)) = answer else { continue };
        let r: NodesResponse = r.into_inner();
        let Some(n) = r.nodes.iter().find(|n| n.node_id == node) else {
            continue;
        };
        match n.stats {
            // The system range's replica counts as one more to move.
            Some(s) if u128::from(n.stats_age_ms) < fresh.as_millis() => {
                return Some((s.replicas + u64::from(s.system_replica), s.leaders))
            }
            _ => continue,
        }
    }
    None
}

/// How many ranges of the merged range table list a replica on `node`.
async fn listed_in(cluster: &Cluster, node: u64) -> Result<usize> {
    let ranges = cluster.ranges(false).await?;
    Ok(ranges
        .iter()
        .filter(|r| r.info.replicas.iter().any(|d| d.node_id == node))
        .count())
}

/// The replication factor the schedulers keep (the largest any reachable node reports).
async fn replication_factor(cluster: &Cluster) -> Result<usize> {
    let mut factor = None;
    for (_, mut admin) in cluster.admins() {
        if let Ok(Ok(r)) =
            tokio::time::timeout(cluster.timeout(), admin.placement(PlacementRequest {})).await
        {
            let f = r.into_inner().replication_factor as usize;
            factor = Some(factor.map_or(f, |g: usize| g.max(f)));
        }
    }
    factor.context("no endpoint answered Placement (the replication factor)")
}

async fn registry(cluster: &Cluster) -> Result<Vec<NodeRecord>> {
    on_system(cluster, "Registry", |mut admin| async move {
        admin
            .registry(RegistryRequest {})
            .await
            .map(|r| r.into_inner().nodes)
    })
    .await
}

async fn set_state(cluster: &Cluster, node: u64, state: NodeState) -> Result<NodeRecord> {
    on_system(cluster, "SetNodeState", |mut admin| async move {
        admin
            .set_node_state(SetNodeStateRequest {
                node_id: node,
                state: state as i32,
            })
            .await
            .map(|r| r.into_inner().node)
    })
    .await?
    .context("the answer has no node record")
}

/// `call` on each reachable endpoint in turn until one answers (only nodes holding the system
/// range can; a refusal is final, and shown).
async fn on_system<T, F, Fut>(cluster: &Cluster, what: &str, mut call: F) -> Result<T>
where
    F: FnMut(flotilla_proto::admin::admin_client::AdminClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut last = None;
    for (id, admin) in cluster.admins() {
        match tokio::time::timeout(cluster.timeout(), call(admin)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition => {
                bail!("node {id}: {}", cluster::describe(&s))
            }
            Ok(Err(s)) => last = Some(format!("node {id}: {}", cluster::describe(&s))),
            Err(_) => {
                last = Some(format!(
                    "node {id}: no answer within {:?}",
                    cluster.timeout()
                ))
            }
        }
    }
    bail!(
        "no endpoint accepted {what} ({}); the system range may have no leader yet: retry",
        last.unwrap_or_else(|| "no endpoint reachable".into())
    )
}

fn state_name(n: &NodeRecord) -> String {
    NodeState::try_from(n.state)
        .map(|s| s.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| format!("unknown({})", n.state))
}

fn show(n: &NodeRecord, out: Output, what: &str) {
    match out {
        Output::Json => println!(
            "{}",
            json!({
                "id": n.node_id, "raft": n.raft_addr, "client": n.client_addr,
                "state": state_name(n),
            })
        ),
        Output::Table => println!("node {}: {} ({what})", n.node_id, state_name(n)),
    }
}
