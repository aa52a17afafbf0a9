//! `flotilla-ctl`: the operator's command line for a Flotilla cluster, in the style of
//! `etcdctl`: `--endpoints` lists the nodes' client addresses, `--output table|json` picks
//! the format, and each subcommand is one admin or KV call (routed to the range's leader when
//! it must run there).
//!
//! Layout: `cluster.rs` (connections, node ids, the merged range table, leader routing),
//! `kv.rs` (the KV subcommands: get, put, del, scan, cas), `output.rs` (tables, JSON, how bytes are shown),
//! `node.rs` (node add, decommission, remove), `backup/` (backup and restore, and the backup
//! directory's format), `recover/` (`recover`: unsafe recovery of ranges that lost their
//! quorum for good); this file holds the flags and the admin subcommands.
//!
//! Exit status: 0 on success, 1 on any error (printed on stderr as one `error:` line), 2 for
//! flags clap refuses.

mod backup;
mod cluster;
mod kv;
mod node;
mod output;
mod recover;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use flotilla_proto::admin::{
    membership_change::Change, split_request, ChangeMembershipRequest, MembershipChange,
    MergeRequest, NodesRequest, PlacementRequest, RangeInfo, RegistryRequest, SplitRequest,
    TransferLeaderRequest,
};
use flotilla_proto::meta::{NodeRecord, NodeState, ReplicaRole};
use serde_json::{json, Value};

use cluster::{Cluster, Dial, Range};
use output::{show_bytes, show_end, show_size, show_start, table, Output};

/// Operate a Flotilla cluster: its ranges, their replicas and leaders, the nodes, the data.
#[derive(Debug, Parser)]
#[command(name = "flotilla-ctl", version, about, long_about = None)]
struct Cli {
    /// Client addresses (host:port) of the nodes, comma-separated. Give every node: commands
    /// that must run on a range's leader are sent to the leader's node, which must be listed.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "127.0.0.1:8001",
        env = "FLOTILLA_ENDPOINTS"
    )]
    endpoints: Vec<String>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Longest wait for connecting to a node and for each call: 500ms, 5s, 1m.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// CA certificate (PEM) that signed the nodes' certificates: connect over TLS.
    #[arg(long, global = true, value_name = "PATH")]
    cacert: Option<PathBuf>,
    /// This client's certificate (PEM), for nodes that require client certificates.
    #[arg(long, global = true, value_name = "PATH")]
    cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long = "key", id = "tls_key", global = true, value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// Name to check the nodes' certificates against instead of each endpoint's host.
    #[arg(long, global = true, value_name = "NAME")]
    server_name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The range table: id, key interval, replicas, leader, keys and size.
    Ranges {
        /// Skip measuring each range's keys and bytes (faster with many ranges).
        #[arg(long)]
        no_sizes: bool,
    },
    /// Split a range in two, at a key or (without --at) at its middle key.
    Split {
        /// The range to split, by id.
        #[arg(long, value_name = "ID", value_parser = parse_range_id, required_unless_present = "range_key")]
        range: Option<u64>,
        /// The range to split: the one holding this key.
        #[arg(long, value_name = "KEY", conflicts_with = "range")]
        range_key: Option<String>,
        /// Where the right half starts; strictly inside the range. Default: its middle key.
        #[arg(long, value_name = "KEY")]
        at: Option<String>,
    },
    /// Merge a range into the adjacent range (replicated on the same nodes).
    Merge {
        /// The range that disappears.
        #[arg(long, value_name = "ID", value_parser = parse_range_id)]
        source: u64,
        /// The range that absorbs it.
        #[arg(long, value_name = "ID", value_parser = parse_range_id)]
        target: u64,
    },
    /// Change a range's replicas.
    Members {
        #[command(subcommand)]
        change: MembersCommand,
    },
    /// Hand a range's leadership to its replica on another node.
    TransferLeader {
        /// The range.
        #[arg(long, value_name = "ID", value_parser = parse_range_id)]
        range: u64,
        /// The node whose replica should lead.
        #[arg(long, value_name = "NODE")]
        to: u64,
    },
    /// Each endpoint's node: id, version, ranges, leaders, replicas; or why it is unreachable.
    Status,
    /// The node registry: every node that joined the cluster, with its addresses and state
    /// (up, draining, removed). Asked of the first endpoint holding the system range.
    Registry,
    /// Every node of the cluster as the first reachable endpoint sees it: status (up, suspect,
    /// down; draining or removed once decommissioned), replicas, leaders, bytes, write and read rates, snapshots in flight.
    Nodes,
    /// What the scheduler of each reachable node decided and did, oldest first.
    Placement,
    /// Add, decommission (drain, then remove) or remove a node.
    Node {
        #[command(subcommand)]
        command: node::NodeCommand,
    },
    /// Unsafe recovery after losing nodes for good: every range that lost a majority of its
    /// voters to them continues from its best surviving replica alone (writes only the lost
    /// nodes held are gone), the lost nodes are marked removed, and the scheduler rebuilds the
    /// replicas. Give every surviving node in --endpoints; try --dry-run first.
    Recover(recover::RecoverArgs),
    /// Read and write keys.
    Kv {
        #[command(subcommand)]
        command: kv::KvCommand,
    },
    /// Back up the cluster's data into DIR (new or empty), every range at one point.
    ///
    /// Each range is taken on its leader after a linearizable read barrier, so the backup
    /// holds every write acknowledged before it started. DIR gets one file per range and a
    /// manifest.json (each range's id, key interval, epoch, applied index, node, keys,
    /// bytes, CRC-32), written last. Ranges that split or merge meanwhile are taken again
    /// until the files cover the key space exactly once.
    Backup(backup::BackupArgs),
    /// Start a new cluster from a backup in DIR (give the new cluster's endpoints).
    ///
    /// Verifies DIR first (manifest, checksums, ranges disjoint and covering), refuses a
    /// cluster that holds data (unless --force), cuts the cluster's ranges at the backup's
    /// boundaries (start its nodes with --bootstrap-ranges 1; other boundaries are merged
    /// away), then loads the pairs with batched multi-puts, each retried with its request
    /// id, printing its progress on stderr.
    Restore(backup::RestoreArgs),
}

#[derive(Debug, Subcommand)]
enum MembersCommand {
    /// Add a replica of the range on a node (a voter, or a learner with --learner).
    Add {
        #[command(flatten)]
        at: ReplicaAt,
        /// Add a non-voting learner (promote it once it caught up).
        #[arg(long)]
        learner: bool,
    },
    /// Remove the range's replica on a node.
    Remove(ReplicaAt),
    /// Make the range's learner on a node a voter.
    Promote(ReplicaAt),
    /// Make the range's voter on a node a learner.
    Demote(ReplicaAt),
}

/// The replica a `members` subcommand is about: a range and a node.
#[derive(Debug, Clone, Copy, clap::Args)]
struct ReplicaAt {
    /// The range.
    #[arg(long, value_name = "ID", value_parser = parse_range_id)]
    range: u64,
    /// The node.
    #[arg(long)]
    node: u64,
}

/// `500ms`, `5s`, `2m`, or a number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (500ms, 5s, 1m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m)")),
    };
    if secs <= 0.0 {
        return Err("must be positive".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A range id as shown (`r123` or `123`).
fn parse_range_id(s: &str) -> Result<u64, String> {
    let digits = s.strip_prefix('r').unwrap_or(s);
    match digits.parse::<u64>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a range id")),
        Ok(id) => Ok(id),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let tls = Dial::tls_from_files(
        cli.cacert.as_deref(),
        cli.cert.as_deref(),
        cli.tls_key.as_deref(),
        cli.server_name.as_deref(),
    )?;
    let dial = Dial {
        endpoints: cli.endpoints.clone(),
        timeout: cli.timeout,
        tls,
    };
    let out = cli.output;
    let command = match cli.command {
        Command::Status => return status(&dial, out).await,
        // It verifies the backup before connecting (or only that, with --check).
        Command::Restore(args) => return backup::restore(&dial, args, out).await,
        other => other,
    };
    let cluster = Cluster::connect(&dial).await?;
    match command {
        Command::Ranges { no_sizes } => ranges(&cluster, !no_sizes, out).await,
        Command::Split {
            range,
            range_key,
            at,
        } => split(&cluster, range, range_key, at, out).await,
        Command::Merge { source, target } => {
            let merged = cluster
                .on_leader(source, |mut c| async move {
                    c.merge(MergeRequest {
                        source_range_id: source,
                        target_range_id: target,
                    })
                    .await
                })
                .await?;
            show_ranges(&[merged.merged.context("the answer has no range")?], out);
            Ok(())
        }
        Command::Members { change } => members(&cluster, change, out).await,
        Command::TransferLeader { range, to } => {
            let r = cluster
                .on_leader(range, |mut c| async move {
                    c.transfer_leader(TransferLeaderRequest {
                        range_id: range,
                        to_node_id: to,
                    })
                    .await
                })
                .await?;
            show_ranges(&[r.range.context("the answer has no range")?], out);
            Ok(())
        }
        Command::Kv { command } => kv::run(&cluster, command, out).await,
        Command::Nodes => nodes(&cluster, out).await,
        Command::Registry => registry(&cluster, out).await,
        Command::Placement => placement(&cluster, out).await,
        Command::Node { command } => node::run(&cluster, command, out).await,
        Command::Backup(args) => backup::backup(&dial, &cluster, args, out).await,
        Command::Recover(args) => recover::run(&cluster, args, out).await,
        Command::Status | Command::Restore(_) => unreachable!("handled above"),
    }
}

/// The registry from the first reachable node that holds the system range (the others
/// answer UNAVAILABLE).
async fn registry(cluster: &Cluster, out: Output) -> Result<()> {
    let mut last = None;
    for n in cluster.reachable() {
        let mut admin = n.admin();
        match admin.registry(RegistryRequest {}).await {
            Ok(r) => {
                show_registry(&r.into_inner().nodes, out);
                return Ok(());
            }
            Err(s) => last = Some(format!("{}: {}", n.endpoint, cluster::describe(&s))),
        }
    }
    bail!(
        "no endpoint answered with the node registry ({})",
        last.unwrap_or_default()
    )
}

fn show_registry(nodes: &[NodeRecord], out: Output) {
    let state = |n: &NodeRecord| {
        NodeState::try_from(n.state)
            .map(|s| s.as_str_name().to_ascii_lowercase())
            .unwrap_or_else(|_| format!("unknown({})", n.state))
    };
    match out {
        Output::Json => {
            let v: Vec<Value> = nodes
                .iter()
                .map(|n| {
                    json!({
                        "id": n.node_id, "raft": n.raft_addr, "client": n.client_addr,
                        "state": state(n),
                    })
                })
                .collect();
            println!("{}", Value::Array(v));
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    let addr = |a: &str| {
                        if a.is_empty() {
                            "-".to_string()
                        } else {
                            a.to_string()
                        }
                    };
                    vec![
                        format!("n{}", n.node_id),
                        addr(&n.raft_addr),
                        addr(&n.client_addr),
                        state(n),
                    ]
                })
                .collect();
            table(&["ID", "RAFT", "CLIENT", "STATE"], &rows);
        }
    }
}

async fn ranges(cluster: &Cluster, sizes: bool, out: Output) -> Result<()> {
    let ranges = cluster.ranges(sizes).await?;
    let infos: Vec<RangeInfo> = ranges
        .into_iter()
        .map(|Range { mut info, leader }| {
            info.leader_node_id = leader.unwrap_or(0);
            info
        })
        .collect();
    if sizes {
        show_ranges_sized(&infos, out);
    } else {
        show_ranges(&infos, out);
    }
    Ok(())
}

async fn split(
    cluster: &Cluster,
    range: Option<u64>,
    key: Option<String>,
    at: Option<String>,
    out: Output,
) -> Result<()> {
    let id = match (range, &key) {
        (Some(id), _) => id,
        (None, Some(k)) => {
            let table = cluster.ranges(false).await?;
            table
                .iter()
                .find(|r| {
                    &r.info.start_key[..] <= k.as_bytes()
                        && (r.info.end_key.is_empty() || k.as_bytes() < &r.info.end_key[..])
                })
                .map(|r| r.info.range_id)
                .with_context(|| format!("no range holds key {k:?}"))?
        }
        (None, None) => bail!("--range or --key is required"),
    };
    let split_key = at.map(|k| k.into_bytes()).unwrap_or_default();
    let r = cluster
        .on_leader(id, |mut c| {
            let split_key = split_key.clone();
            async move {
                c.split(SplitRequest {
                    range: Some(split_request::Range::RangeId(id)),
                    split_key: split_key.into(),
                })
                .await
            }
        })
        .await?;
    let halves: Vec<RangeInfo> = [r.left, r.right].into_iter().flatten().collect();
    show_ranges(&halves, out);
    Ok(())
}

async fn members(cluster: &Cluster, cmd: MembersCommand, out: Output) -> Result<()> {
    // Adding names a node; the other changes name the replica already there.
    let (at, change) = match cmd {
        MembersCommand::Add { at, learner } if learner => (at, Change::AddLearnerNode(at.node)),
        MembersCommand::Add { at, .. } => (at, Change::AddVoterNode(at.node)),
        MembersCommand::Remove(at) => (at, Change::RemoveReplica(replica_on(cluster, at).await?)),
        MembersCommand::Promote(at) => (at, Change::PromoteReplica(replica_on(cluster, at).await?)),
        MembersCommand::Demote(at) => (at, Change::DemoteReplica(replica_on(cluster, at).await?)),
    };
    let range = at.range;
    let r = cluster
        .on_leader(range, |mut c| async move {
            c.change_membership(ChangeMembershipRequest {
                range_id: range,
                changes: vec![MembershipChange {
                    change: Some(change),
                }],
            })
            .await
        })
        .await?;
    show_ranges(&[r.range.context("the answer has no range")?], out);
    Ok(())
}

/// The replica id of the range's replica on the node.
async fn replica_on(cluster: &Cluster, ReplicaAt { range, node }: ReplicaAt) -> Result<u64> {
    let r = cluster.range(range).await?;
    r.info
        .replicas
        .iter()
        .find(|p| p.node_id == node)
        .map(|p| p.replica_id)
        .with_context(|| format!("range {range} has no replica on node {node}"))
}

async fn status(dial: &Dial, out: Output) -> Result<()> {
    let nodes = Cluster::connect(dial).await?.nodes;
    match out {
        Output::Json => {
            let list: Vec<Value> = nodes
                .iter()
                .map(|n| match &n.status {
                    Ok(s) => json!({
                        "endpoint": n.endpoint, "reachable": true, "node_id": s.node_id,
                        "version": s.version, "replicas": s.replicas, "ranges": s.ranges,
                        "leaders": s.leaders, "awake": s.awake,
                        "pending_requests": s.pending_requests, "elections_won": s.elections_won,
                    }),
                    Err(e) => json!({ "endpoint": n.endpoint, "reachable": false, "error": e }),
                })
                .collect();
            println!("{}", Value::Array(list));
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| match &n.status {
                    Ok(s) => vec![
                        n.endpoint.clone(),
                        s.node_id.to_string(),
                        s.version.clone(),
                        s.ranges.to_string(),
                        s.leaders.to_string(),
                        s.replicas.to_string(),
                        s.awake.to_string(),
                        s.pending_requests.to_string(),
                        "ok".into(),
                    ],
                    Err(e) => {
                        let mut row = vec![n.endpoint.clone()];
                        row.extend(std::iter::repeat_n("-".to_string(), 7));
                        row.push(format!("unreachable: {e}"));
                        row
                    }
                })
                .collect();
            table(
                &[
                    "ENDPOINT", "NODE", "VERSION", "RANGES", "LEADERS", "REPLICAS", "AWAKE",
                    "PENDING", "STATE",
                ],
                &rows,
            );
        }
    }
    if nodes.iter().any(|n| n.status.is_err()) {
        bail!("some endpoints are unreachable");
    }
    Ok(())
}

async fn nodes(cluster: &Cluster, out: Output) -> Result<()> {
    let mut last_error = None;
    for (id, mut admin) in cluster.admins() {
        let answer = tokio::time::timeout(cluster.timeout(), admin.nodes(NodesRequest {})).await;
        let nodes = match answer {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => {
                last_error = Some(format!("node {id}: {}", s.message()));
                continue;
            }
            Err(_) => {
                last_error = Some(format!(
                    "node {id}: no answer within {:?}",
                    cluster.timeout()
                ));
                continue;
            }
        };
        match out {
            Output::Json => {
                let list: Vec<Value> = nodes
                    .nodes
                    .iter()
                    .map(|n| {
                        let s = n.stats.unwrap_or_default();
                        json!({
                            "node_id": n.node_id, "status": n.status, "liveness": n.liveness,
                            "status_ms": n.status_ms,
                            "has_stats": n.stats.is_some(), "replicas": s.replicas,
                            "leaders": s.leaders, "bytes": s.bytes, "write_rate": s.write_rate,
                            "read_rate": s.read_rate,
                            "snapshots_in_flight": s.snapshots_in_flight,
                            "stats_age_ms": n.stats_age_ms,
                        })
                    })
                    .collect();
                println!("{}", json!({ "seen_by": nodes.node_id, "nodes": list }));
            }
            Output::Table => {
                let rows: Vec<Vec<String>> = nodes
                    .nodes
                    .iter()
                    .map(|n| {
                        let mut row = vec![n.node_id.to_string(), n.status.clone()];
                        match &n.stats {
                            Some(s) => row.extend([
                                s.replicas.to_string(),
                                s.leaders.to_string(),
                                show_size(s.bytes),
                                format!("{:.0}", s.write_rate),
                                format!("{:.0}", s.read_rate),
                                s.snapshots_in_flight.to_string(),
                                format!("{} ms", n.stats_age_ms),
                            ]),
                            None => row.extend(std::iter::repeat_n("-".to_string(), 7)),
                        }
                        row
                    })
                    .collect();
                println!("as node {} sees them:", nodes.node_id);
                table(
                    &[
                        "NODE",
                        "STATUS",
                        "REPLICAS",
                        "LEADERS",
                        "BYTES",
                        "WRITES/S",
                        "READS/S",
                        "SNAPSHOTS",
                        "STATS AGE",
                    ],
                    &rows,
                );
            }
        }
        return Ok(());
    }
    bail!(
        "no node answered Nodes: {}",
        last_error.unwrap_or_else(|| "no endpoint reachable".into())
    )
}

async fn placement(cluster: &Cluster, out: Output) -> Result<()> {
    let mut events = Vec::new();
    let mut summary = Vec::new();
    for (id, mut admin) in cluster.admins() {
        let answer =
            tokio::time::timeout(cluster.timeout(), admin.placement(PlacementRequest {})).await;
        match answer {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                summary.push((id, r.enabled, r.moves_in_flight));
                events.extend(r.events.into_iter().map(|e| (id, e)));
            }
            Ok(Err(s)) => bail!("node {id}: {}", s.message()),
            Err(_) => bail!("node {id}: no answer within {:?}", cluster.timeout()),
        }
    }
    events.sort_by_key(|(id, e)| (e.at_unix_ms, *id));
    match out {
        Output::Json => {
            let nodes: Vec<Value> = summary
                .iter()
                .map(|(id, on, moves)| json!({ "node_id": id, "enabled": on, "moves_in_flight": moves }))
                .collect();
            let list: Vec<Value> = events
                .iter()
                .map(|(id, e)| {
                    json!({
                        "node_id": id, "at_unix_ms": e.at_unix_ms, "range_id": e.range_id,
                        "action": e.action, "detail": e.detail, "ok": e.ok, "error": e.error,
                    })
                })
                .collect();
            println!("{}", json!({ "nodes": nodes, "events": list }));
        }
        Output::Table => {
            for (id, on, moves) in &summary {
                println!(
                    "node {id}: scheduler {}, {moves} moves in flight",
                    if *on { "on" } else { "off" }
                );
            }
            let rows: Vec<Vec<String>> = events
                .iter()
                .map(|(id, e)| {
                    vec![
                        e.at_unix_ms.to_string(),
                        id.to_string(),
                        range_name(e.range_id),
                        e.action.clone(),
                        e.detail.clone(),
                        if e.ok {
                            "ok".into()
                        } else {
                            format!("failed: {}", e.error)
                        },
                    ]
                })
                .collect();
            table(
                &[
                    "AT (UNIX MS)",
                    "NODE",
                    "RANGE",
                    "ACTION",
                    "DETAIL",
                    "OUTCOME",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

/// `r{id}`: how range ids are shown.
fn range_name(id: u64) -> String {
    format!("r{id}")
}

/// `node:replica` per replica, `(learner)` marked, the leader's starred.
fn replicas_cell(info: &RangeInfo) -> String {
    info.replicas
        .iter()
        .map(|r| {
            let learner = r.role == ReplicaRole::Learner as i32;
            let leader = r.node_id == info.leader_node_id;
            format!(
                "n{}{}{}",
                r.node_id,
                if learner { "(learner)" } else { "" },
                if leader { "*" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn range_json(info: &RangeInfo, sized: bool) -> Value {
    let (conf_ver, version) = info
        .epoch
        .as_ref()
        .map_or((0, 0), |e| (e.conf_ver, e.version));
    let replicas: Vec<Value> = info
        .replicas
        .iter()
        .map(|r| {
            json!({
                "node_id": r.node_id, "replica_id": r.replica_id,
                "learner": r.role == ReplicaRole::Learner as i32,
            })
        })
        .collect();
    let mut v = json!({
        "id": range_name(info.range_id),
        "range_id": info.range_id,
        "start": show_bytes(&info.start_key),
        "end": show_bytes(&info.end_key),
        "replicas": replicas,
        "leader_node_id": (info.leader_node_id != 0).then_some(info.leader_node_id),
        "epoch": { "conf_ver": conf_ver, "version": version },
        "merging": info.merging,
    });
    if sized {
        v["keys"] = json!(info.keys);
        v["bytes"] = json!(info.bytes);
        v["size_exact"] = json!(info.size_exact);
    }
    v
}

fn leader_cell(info: &RangeInfo) -> String {
    match info.leader_node_id {
        0 => "-".into(),
        n => format!("n{n}"),
    }
}

/// Ranges without sizes.
fn show_ranges(infos: &[RangeInfo], out: Output) {
    match out {
        Output::Json => {
            let v: Vec<Value> = infos.iter().map(|i| range_json(i, false)).collect();
            println!("{}", Value::Array(v));
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = infos
                .iter()
                .map(|i| {
                    vec![
                        range_name(i.range_id),
                        show_start(&i.start_key),
                        show_end(&i.end_key),
                        replicas_cell(i),
                        leader_cell(i),
                    ]
                })
                .collect();
            table(&["ID", "START", "END", "REPLICAS", "LEADER"], &rows);
        }
    }
}

/// Ranges with their keys and sizes (`~` marks an estimate).
fn show_ranges_sized(infos: &[RangeInfo], out: Output) {
    match out {
        Output::Json => {
            let v: Vec<Value> = infos.iter().map(|i| range_json(i, true)).collect();
            println!("{}", Value::Array(v));
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = infos
                .iter()
                .map(|i| {
                    let approx = if i.size_exact { "" } else { "~" };
                    vec![
                        range_name(i.range_id),
                        show_start(&i.start_key),
                        show_end(&i.end_key),
                        replicas_cell(i),
                        leader_cell(i),
                        format!("{approx}{}", i.keys),
                        format!("{approx}{}", show_size(i.bytes)),
                    ]
                })
                .collect();
            table(
                &["ID", "START", "END", "REPLICAS", "LEADER", "KEYS", "SIZE"],
                &rows,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_range_ids_parse_as_shown() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_range_id("r42"), Ok(42));
        assert_eq!(parse_range_id("42"), Ok(42));
        assert!(parse_range_id("r0").is_err());
        assert!(parse_range_id("x").is_err());
    }

    #[test]
    fn the_flags_are_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
