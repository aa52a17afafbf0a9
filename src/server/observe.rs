//! The node's HTTP endpoint for operators: `/metrics` in Prometheus text format (the
//! `metrics` recorded by every layer, through `metrics-exporter-prometheus`) and `/health`,
//! which answers 200 when the node serves and 503 with the reason when it does not.
//!
//! The recorder is process-wide (the `metrics` crate has one global recorder), installed by
//! the first server that asks for an endpoint; later servers in the same process (tests) share
//! it. [`CATALOGUE`] names every metric the layers record, with its help text: each is
//! described at install time and those without labels start at zero, so that a scrape shows
//! every series from the start rather than only those that happened to be recorded. A unit
//! test checks the catalogue against the names in the layers' sources. No metric is labelled
//! by range (ARCHITECTURE.md's invariant): the labels are reasons, triggers and outcomes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use flotilla_runtime::NodeGroup;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::runtime::Handle;

use super::ServerError;

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows.
    Counter,
    /// A current value.
    Gauge,
    /// A distribution (rendered as a summary).
    Histogram,
}

/// One metric the layers record: name, kind, whether it carries a label, help text.
pub type Metric = (&'static str, Kind, bool, &'static str);

use Kind::{Counter as C, Gauge as G, Histogram as H};

/// Every metric recorded by the runtime and the transport.
pub const CATALOGUE: &[Metric] = &[
    (
        "flotilla_runtime_ticks_total",
        C,
        false,
        "Replica ticks driven by the ticker.",
    ),
    (
        "flotilla_runtime_requests_expired_total",
        C,
        false,
        "Requests failed for lack of an outcome within proposal_timeout.",
    ),
    (
        "flotilla_runtime_tick_round_seconds",
        H,
        false,
        "Duration of one ticker round.",
    ),
    (
        "flotilla_runtime_awake_replicas",
        G,
        false,
        "Replicas ticked in the last tick (the others sleep).",
    ),
    (
        "flotilla_runtime_heartbeats_sent_total",
        C,
        false,
        "Coalesced heartbeats sent.",
    ),
    (
        "flotilla_runtime_heartbeats_skipped_total",
        C,
        false,
        "Heartbeats a leader did not send: the follower had an append carrying the commit.",
    ),
    (
        "flotilla_runtime_empty_appends_skipped_total",
        C,
        false,
        "Empty appends a leader did not send: the follower answered a heartbeat while entries sent to it lately were in flight.",
    ),
    (
        "flotilla_runtime_replicas_created_total",
        C,
        true,
        "Replicas created, by cause (by).",
    ),
    (
        "flotilla_runtime_replica_failures_total",
        C,
        false,
        "Replicas isolated after a fault.",
    ),
    (
        "flotilla_runtime_merges_total",
        C,
        false,
        "Merges applied (sources absorbed).",
    ),
    (
        "flotilla_runtime_replicas_retired_total",
        C,
        false,
        "Stale merge sources retired by a snapshot.",
    ),
    (
        "flotilla_runtime_forced_recoveries_total",
        C,
        false,
        "Replicas forced to continue alone by an unsafe recovery (flotilla-ctl recover).",
    ),
    (
        "flotilla_runtime_worker_rounds_total",
        C,
        false,
        "Worker rounds run.",
    ),
    (
        "flotilla_runtime_round_replicas",
        H,
        false,
        "Replicas handled per worker round.",
    ),
    (
        "flotilla_runtime_undeliverable_batches_total",
        C,
        false,
        "Outgoing batches the transport refused.",
    ),
    (
        "flotilla_runtime_elections_won_total",
        C,
        false,
        "Times a replica here became leader.",
    ),
    (
        "flotilla_runtime_nodes_down_total",
        C,
        false,
        "Nodes declared down by liveness.",
    ),
    (
        "flotilla_runtime_nodes_up_total",
        C,
        false,
        "Nodes seen back up by liveness.",
    ),
    (
        "flotilla_runtime_queued_wakes_total",
        C,
        false,
        "Sleeping groups woken from the paced wake queue.",
    ),
    (
        "flotilla_runtime_idle_flushes_total",
        C,
        false,
        "Memtable flushes of a store that fell idle (idle_flush_ticks).",
    ),
    (
        "flotilla_runtime_auto_splits_proposed_total",
        C,
        true,
        "Automatic splits proposed, by trigger.",
    ),
    ("flotilla_runtime_splits_total", C, false, "Splits applied."),
    (
        "flotilla_runtime_snapshots_applied_total",
        C,
        false,
        "Raft snapshots applied.",
    ),
    (
        "flotilla_runtime_log_compactions_total",
        C,
        false,
        "Raft log compactions.",
    ),
    (
        "flotilla_runtime_merge_rollbacks_total",
        C,
        false,
        "Merges rolled back.",
    ),
    (
        "flotilla_runtime_dropped_messages_total",
        C,
        true,
        "Inbound raft messages dropped, by reason.",
    ),
    (
        "flotilla_runtime_wakes_total",
        C,
        false,
        "Replicas woken from hibernation.",
    ),
    (
        "flotilla_runtime_sleeps_total",
        C,
        false,
        "Replicas put to sleep (hibernation).",
    ),
    (
        "flotilla_runtime_leaders_forgotten_total",
        C,
        false,
        "Leaders forgotten because their node went down.",
    ),
    ("flotilla_runtime_replicas", G, false, "Replicas hosted."),
    (
        "flotilla_runtime_leaders",
        G,
        false,
        "Replicas that are leader.",
    ),
    (
        "flotilla_transport_sent_batches_total",
        C,
        false,
        "Batches accepted by send.",
    ),
    (
        "flotilla_transport_sent_bytes",
        C,
        false,
        "Encoded bytes accepted by send.",
    ),
    (
        "flotilla_transport_rejected_batches_total",
        C,
        true,
        "Batches refused by send, by reason.",
    ),
    (
        "flotilla_transport_delivered_batches_total",
        C,
        false,
        "Batches delivered to the runtime.",
    ),
    (
        "flotilla_transport_delivered_messages_total",
        C,
        false,
        "Raft messages delivered to the runtime.",
    ),
    (
        "flotilla_transport_delivered_heartbeats_total",
        C,
        false,
        "Coalesced heartbeats delivered to the runtime.",
    ),
    (
        "flotilla_transport_dropped_messages_total",
        C,
        true,
        "Messages dropped after send accepted them, by reason.",
    ),
    (
        "flotilla_transport_queued_bytes",
        G,
        false,
        "Bytes accepted by send and not yet delivered or dropped.",
    ),
    (
        "flotilla_transport_grpc_frames_sent_total",
        C,
        false,
        "gRPC frames sent.",
    ),
    (
        "flotilla_transport_grpc_sent_bytes",
        C,
        false,
        "gRPC frame bytes sent.",
    ),
    (
        "flotilla_transport_grpc_frame_messages_total",
        C,
        false,
        "Messages and heartbeats carried by sent frames.",
    ),
    (
        "flotilla_transport_grpc_pings_sent_total",
        C,
        false,
        "Pings sent on idle streams.",
    ),
    (
        "flotilla_transport_grpc_frames_received_total",
        C,
        false,
        "gRPC frames received.",
    ),
    (
        "flotilla_transport_grpc_received_bytes",
        C,
        false,
        "gRPC frame bytes received.",
    ),
    (
        "flotilla_transport_grpc_refused_frames_total",
        C,
        true,
        "Received frames refused, by reason.",
    ),
    (
        "flotilla_transport_grpc_connects_total",
        C,
        false,
        "Streams opened to peers.",
    ),
    (
        "flotilla_transport_grpc_connect_failures_total",
        C,
        false,
        "Failed attempts to open a stream.",
    ),
    (
        "flotilla_transport_grpc_disconnects_total",
        C,
        false,
        "Streams that broke.",
    ),
    (
        "flotilla_transport_grpc_snapshots_sent_total",
        C,
        true,
        "Snapshot transfers sent, by outcome.",
    ),
    (
        "flotilla_transport_grpc_snapshot_chunks_sent_total",
        C,
        false,
        "Snapshot chunks sent.",
    ),
    (
        "flotilla_transport_grpc_snapshot_sent_bytes",
        C,
        false,
        "Snapshot bytes sent.",
    ),
    (
        "flotilla_transport_grpc_snapshots_received_total",
        C,
        false,
        "Snapshots received whole.",
    ),
    (
        "flotilla_transport_grpc_snapshot_chunks_received_total",
        C,
        false,
        "Snapshot chunks received.",
    ),
    (
        "flotilla_transport_grpc_snapshot_received_bytes",
        C,
        false,
        "Snapshot bytes received.",
    ),
    (
        "flotilla_transport_grpc_refused_snapshots_total",
        C,
        true,
        "Snapshot transfers refused, by reason.",
    ),
    (
        "flotilla_schedule_leader_transfers_total",
        C,
        false,
        "Leader transfers the scheduler of this node did (leaders unbalanced).",
    ),
    (
        "flotilla_schedule_moves_started_total",
        C,
        true,
        "Moves started (a learner added), by why: repair, balance, drain or merge.",
    ),
    (
        "flotilla_schedule_merges_total",
        C,
        false,
        "Small neighbours merged by the scheduler of this node (the left range into the right one).",
    ),
    (
        "flotilla_schedule_moves_finished_total",
        C,
        false,
        "Moves finished (a caught-up learner promoted, the replaced replica removed).",
    ),
    (
        "flotilla_schedule_removals_total",
        C,
        false,
        "Replicas removed alone (an abandoned learner, a voter above the replication factor).",
    ),
    (
        "flotilla_schedule_failed_actions_total",
        C,
        false,
        "Scheduler actions that failed or gave no outcome in time (retried by a later pass).",
    ),
    (
        "flotilla_schedule_moves_in_flight",
        G,
        false,
        "Moves in flight in the ranges this node leads.",
    ),
];

/// The process's Prometheus recorder, installed once.
static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// The recorder's handle, installing it (and describing the catalogue) the first time. A
/// server calls it before its NodeGroup starts, so that nothing recorded is lost.
pub(crate) fn recorder() -> Result<PrometheusHandle, ServerError> {
    RECORDER
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .install_recorder()
                .map_err(|e| e.to_string())?;
            for &(name, kind, labelled, help) in CATALOGUE {
                match kind {
                    C => {
                        metrics::describe_counter!(name, help);
                        if !labelled {
                            metrics::counter!(name).increment(0);
                        }
                    }
                    G => {
                        metrics::describe_gauge!(name, help);
                        if !labelled {
                            metrics::gauge!(name).increment(0.0);
                        }
                    }
                    H => metrics::describe_histogram!(name, help),
                }
            }
            Ok(handle)
        })
        .clone()
        .map_err(ServerError::Metrics)
}

/// What the endpoint reads: the node, and whether it is shutting down.
#[derive(Clone)]
struct Observed {
    node: Arc<NodeGroup>,
    recorder: PrometheusHandle,
    stopping: Arc<AtomicBool>,
}

/// The running endpoint; dropping it or [`Endpoint::stop`] stops it.
#[derive(Debug)]
pub(crate) struct Endpoint {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Endpoint {
    /// The address it listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on `/health` answers 503 "stopping" (the endpoint keeps answering until
    /// [`Endpoint::stop`]).
    pub(crate) fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Stops serving.
    pub(crate) fn stop(&mut self) {
        self.set_stopping();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds `addr` and serves `/metrics` and `/health` for `node` on `runtime`.
pub(crate) fn serve(
    addr: SocketAddr,
    node: Arc<NodeGroup>,
    runtime: &Handle,
) -> Result<Endpoint, ServerError> {
    let recorder = recorder()?;
    let bind = |e: std::io::Error| ServerError::Metrics(format!("cannot listen on {addr}: {e}"));
    let std_listener = std::net::TcpListener::bind(addr).map_err(bind)?;
    std_listener.set_nonblocking(true).map_err(bind)?;
    let local = std_listener.local_addr().map_err(bind)?;
    let listener = {
        let _in_runtime = runtime.enter();
        tokio::net::TcpListener::from_std(std_listener).map_err(bind)?
    };
    let stopping = Arc::new(AtomicBool::new(false));
    let state = Observed {
        node,
        recorder,
        stopping: stopping.clone(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/health", get(health))
        .with_state(state);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(Endpoint {
        addr: local,
        stopping,
        stop: Some(stop_tx),
    })
}

async fn metrics_page(State(s): State<Observed>) -> String {
    // Refreshes the gauges the status walk sets (replicas, leaders).
    let node = s.node.clone();
    let _ = tokio::task::spawn_blocking(move || node.node_status()).await;
    s.recorder.render()
}

/// 200 "ok ..." when the node serves: it is not stopping, hosts at least one range, and
/// every range here knows its leader. 503 with the reason otherwise.
async fn health(State(s): State<Observed>) -> (StatusCode, String) {
    if s.stopping.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable: stopping\n".into(),
        );
    }
    let node = s.node.clone();
    let verdict = tokio::task::spawn_blocking(move || {
        let status = node.node_status();
        let ranges = node.ranges();
        if ranges.is_empty() {
            return Err("no range hosted (not bootstrapped or joined yet)".to_string());
        }
        let leaderless = ranges
            .iter()
            .filter(|d| !node.status(d.id()).is_ok_and(|s| s.leader_node.is_some()))
            .count();
        if leaderless > 0 {
            return Err(format!(
                "{leaderless} of {} ranges have no known leader",
                ranges.len()
            ));
        }
        Ok(format!(
            "ok: {} ranges, {} led here",
            ranges.len(),
            status.leaders
        ))
    })
    .await;
    match verdict {
        Ok(Ok(ok)) => (StatusCode::OK, ok + "\n"),
        Ok(Err(why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unavailable: {why}\n"),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("health check failed: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `"flotilla_..."` name in the runtime's and the transport's sources is in the
    /// catalogue, and the catalogue names nothing they do not record.
    #[test]
    fn the_catalogue_names_every_metric_the_layers_record() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut found = std::collections::BTreeSet::new();
        let mut stack = vec![
            root.join("runtime/src"),
            root.join("transport/src"),
            root.join("src/schedule"),
        ];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for piece in text.split("\"flotilla_").skip(1) {
                        let name: String = piece
                            .chars()
                            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                            .collect();
                        if piece[name.len()..].starts_with('"') {
                            found.insert(format!("flotilla_{name}"));
                        }
                    }
                }
            }
        }
        let catalogued: std::collections::BTreeSet<String> =
            CATALOGUE.iter().map(|m| m.0.to_string()).collect();
        let missing: Vec<_> = found.difference(&catalogued).collect();
        assert!(missing.is_empty(), "not in the catalogue: {missing:?}");
        let stale: Vec<_> = catalogued.difference(&found).collect();
        assert!(
            stale.is_empty(),
            "catalogued but recorded nowhere: {stale:?}"
        );
    }
}
