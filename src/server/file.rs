//! The node's config file (TOML, kebab-case keys) and how it becomes a [`ServerConfig`].
//!
//! Every key is optional: a key left out keeps the [`ServerConfig`] default (each is
//! documented with its unit and default in `flotilla.example.toml` at the repository's root,
//! which a test parses). The node binary fills the same struct from its flags on top of the
//! file, so a flag overrides the file. [`ConfigFile::to_server_config`] then reads the TLS
//! files and collects every mistake (a missing required key, an unreadable file, and every
//! mistake [`ServerConfig::mistakes`] finds in the layers' settings) so that the operator
//! sees them all at once, one line each.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_proto::NodeId;
use flotilla_transport::TlsConfig;
use serde::Deserialize;

use flotilla_runtime::ConfigError;

use super::{ClientTls, ServerConfig, ServerError};

/// The whole file. Unknown keys are refused (a typo would otherwise be silently ignored).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    /// This node: id, data directory, listen addresses.
    #[serde(default)]
    pub node: NodeSection,
    /// Node id (as a string key, TOML's rule) → raft address `host:port` of every node.
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    /// Raft timing, hibernation, proposals.
    #[serde(default)]
    pub raft: RaftSection,
    /// Raft log compaction and retention.
    #[serde(default)]
    pub log: LogSection,
    /// Automatic splits.
    #[serde(default)]
    pub split: SplitSection,
    /// The RocksDB engine.
    #[serde(default)]
    pub store: StoreSection,
    /// The scheduler (leader and replica balance, repair of dead nodes' replicas).
    #[serde(default)]
    pub schedule: ScheduleSection,
    /// Certificates: mutual TLS between nodes and TLS for clients. Absent: plaintext.
    pub tls: Option<TlsSection>,
}

/// `[node]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeSection {
    /// This node's id (`--id`). Required.
    pub id: Option<u64>,
    /// The engine's directory (`--data-dir`). Required.
    pub data_dir: Option<PathBuf>,
    /// Raft listen address (`--raft`).
    pub raft: Option<SocketAddr>,
    /// Client API listen address (`--client`).
    pub client: Option<SocketAddr>,
    /// `/metrics` and `/health` listen address (`--metrics`).
    pub metrics: Option<SocketAddr>,
    /// Redis protocol listen address (`--redis`).
    pub redis: Option<SocketAddr>,
    /// Ranges to create on a fresh store (`--bootstrap-ranges`).
    pub bootstrap_ranges: Option<usize>,
    /// Client address of a running node to join through (`--join`).
    pub join: Option<String>,
    /// Nodes (the lowest peer ids) the bootstrapped ranges live on; 0 = all
    /// (`--bootstrap-replicas`).
    pub bootstrap_replicas: Option<usize>,
    /// The `flotilla-node` process's gRPC (tokio) threads; 0 or unset: half the CPUs, at
    /// least one (`flotilla_runtime::default_thread_share`). Not part of [`ServerConfig`]:
    /// a library caller brings its own runtime.
    pub async_threads: Option<usize>,
}

/// `[schedule]`: `ScheduleConfig`'s fields.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ScheduleSection {
    /// `ScheduleConfig::enabled` (`--no-schedule` turns it off).
    pub enabled: Option<bool>,
    /// `ScheduleConfig::interval` in ms.
    pub interval_ms: Option<u64>,
    /// `ScheduleConfig::replication_factor`.
    pub replication_factor: Option<usize>,
    /// `ScheduleConfig::down_time` in ms (`--down-time-ms`).
    pub down_time_ms: Option<u64>,
    /// `ScheduleConfig::stable_time` in ms.
    pub stable_time_ms: Option<u64>,
    /// `ScheduleConfig::leader_threshold`.
    pub leader_threshold: Option<f64>,
    /// `ScheduleConfig::replica_threshold`.
    pub replica_threshold: Option<f64>,
    /// `ScheduleConfig::max_moves_per_node`.
    pub max_moves_per_node: Option<usize>,
    /// `ScheduleConfig::max_snapshots_per_node`.
    pub max_snapshots_per_node: Option<usize>,
    /// `ScheduleConfig::max_transfers_per_pass`.
    pub max_transfers_per_pass: Option<usize>,
    /// `ScheduleConfig::log_capacity`.
    pub log_capacity: Option<usize>,
    /// `ScheduleConfig::merge_below_bytes`.
    pub merge_below_bytes: Option<u64>,
    /// `ScheduleConfig::merge_delay` in ms.
    pub merge_delay_ms: Option<u64>,
}

/// `[raft]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RaftSection {
    /// `NodeGroupConfig::tick_interval` in ms (`--tick-ms`).
    pub tick_ms: Option<u64>,
    /// `NodeGroupConfig::heartbeat_tick`.
    pub heartbeat_ticks: Option<usize>,
    /// `NodeGroupConfig::election_tick`.
    pub election_ticks: Option<usize>,
    /// `NodeGroupConfig::pre_vote`.
    pub pre_vote: Option<bool>,
    /// `NodeGroupConfig::check_quorum`.
    pub check_quorum: Option<bool>,
    /// `NodeGroupConfig::lease_reads`.
    pub lease_reads: Option<bool>,
    /// `NodeGroupConfig::worker_threads`; 0 means its default (half the CPUs, at least one).
    pub worker_threads: Option<usize>,
    /// `NodeGroupConfig::max_proposal_bytes`.
    pub max_proposal_bytes: Option<u64>,
    /// `NodeGroupConfig::proposal_timeout` in ms.
    pub proposal_timeout_ms: Option<u64>,
    /// `NodeGroupConfig::hibernate` (`--no-hibernate` turns it off).
    pub hibernate: Option<bool>,
    /// `NodeGroupConfig::hibernate_ticks`.
    pub hibernate_ticks: Option<usize>,
    /// `NodeGroupConfig::node_down_ticks`.
    pub node_down_ticks: Option<usize>,
    /// `NodeGroupConfig::max_wakes_per_tick`.
    pub max_wakes_per_tick: Option<usize>,
    /// `NodeGroupConfig::idle_flush_ticks` (0 turns the idle flush off).
    pub idle_flush_ticks: Option<usize>,
}

/// `[log]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogSection {
    /// `NodeGroupConfig::log_compact_threshold`.
    pub compact_threshold: Option<u64>,
    /// `NodeGroupConfig::log_compact_trailing`.
    pub compact_trailing: Option<u64>,
    /// `NodeGroupConfig::log_retain_max_entries`.
    pub retain_max_entries: Option<u64>,
    /// `NodeGroupConfig::log_retain_max_bytes`.
    pub retain_max_bytes: Option<u64>,
}

/// `[split]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SplitSection {
    /// `SplitConfig::max_range_bytes`.
    pub max_range_bytes: Option<u64>,
    /// `SplitConfig::max_range_keys`.
    pub max_range_keys: Option<u64>,
    /// `SplitConfig::load_qps`.
    pub load_qps: Option<u64>,
    /// `SplitConfig::check_interval` in ms.
    pub check_interval_ms: Option<u64>,
}

/// `[store]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreSection {
    /// `StoreConfig::sync`.
    pub sync: Option<bool>,
    /// `StoreConfig::block_cache_bytes`.
    pub block_cache_bytes: Option<usize>,
    /// `StoreConfig::write_buffer_bytes`.
    pub write_buffer_bytes: Option<usize>,
    /// `StoreConfig::background_jobs`.
    pub background_jobs: Option<i32>,
    /// `StoreConfig::log_cache_entries`.
    pub log_cache_entries: Option<usize>,
}

/// `[tls]`: file paths of PEM certificates and keys.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsSection {
    /// The cluster CA: node certificates must be signed by it. Required.
    pub ca_file: Option<PathBuf>,
    /// This node's certificate chain (server and client auth). Required.
    pub cert_file: Option<PathBuf>,
    /// This node's private key. Required.
    pub key_file: Option<PathBuf>,
    /// The name peers' certificates are checked against instead of their address's host.
    pub server_name: Option<String>,
    /// Serve the client APIs over TLS too, with the node's certificate. Default true.
    pub clients: Option<bool>,
    /// The CA whose certificates clients must present. Default: `ca-file`.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate from `client-ca-file`. Default true.
    pub require_client_cert: Option<bool>,
}

impl ConfigFile {
    /// Reads and parses the file at `path`.
    ///
    /// # Errors
    ///
    /// One line naming the file and what is wrong (unreadable, not TOML, an unknown key, a
    /// value of the wrong type, with its line and column).
    pub fn load(path: &Path) -> Result<ConfigFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Parses TOML text.
    ///
    /// # Errors
    ///
    /// The parser's message, on one line.
    pub fn parse(text: &str) -> Result<ConfigFile, String> {
        toml::from_str(text).map_err(|e| {
            let span = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            format!("{}{span}", e.message().trim())
        })
    }

    /// The server config this file describes, TLS files read, or every mistake found (each
    /// one line).
    ///
    /// # Errors
    ///
    /// Every mistake: required keys missing (`node.id`, `node.data-dir`), peer ids that are
    /// not numbers, TLS files missing or unreadable, and every [`ServerConfig::mistakes`].
    pub fn to_server_config(&self) -> Result<ServerConfig, Vec<String>> {
        let mut mistakes = Vec::new();
        let n = &self.node;
        // A joining node may get its id from the join.
        let id = n.id.unwrap_or_else(|| {
            if n.join.is_none() {
                mistakes.push("node.id (--id) is required (or node.join, --join)".to_string());
            }
            0
        });
        let dir = n.data_dir.clone().unwrap_or_else(|| {
            mistakes.push("node.data-dir (--data-dir) is required".to_string());
            PathBuf::new()
        });
        let mut c = ServerConfig::new(NodeId(id), dir);
        if let Some(a) = n.raft {
            c.raft_addr = a;
        }
        if let Some(a) = n.client {
            c.client_addr = a;
        }
        c.metrics_addr = n.metrics;
        c.redis_addr = n.redis;
        c.bootstrap_ranges = n.bootstrap_ranges.unwrap_or(0);
        c.join = n.join.clone();
        c.bootstrap_replicas = n.bootstrap_replicas.unwrap_or(0);
        for (key, addr) in &self.peers {
            match key.parse::<u64>() {
                Ok(node) => {
                    c.peers.insert(NodeId(node), addr.clone());
                }
                Err(_) => mistakes.push(format!("peers: key {key:?} is not a node id")),
            }
        }
        self.apply_tunables(&mut c);
        if let Some(tls) = &self.tls {
            tls.apply(&mut c, &mut mistakes);
        }
        for e in c.mistakes() {
            // Already said above, in the file's words.
            let said = match e {
                ServerError::NoDataDir => n.data_dir.is_none(),
                ServerError::NodeConfig(ConfigError::ZeroNodeId) => n.id.is_none(),
                _ => false,
            };
            if !said {
                mistakes.push(e.to_string());
            }
        }
        if mistakes.is_empty() {
            Ok(c)
        } else {
            Err(mistakes)
        }
    }

    /// The `[raft]`, `[log]`, `[split]`, `[store]` and `[schedule]` keys that are set.
    fn apply_tunables(&self, c: &mut ServerConfig) {
        let (r, node) = (&self.raft, &mut c.node);
        let ms = Duration::from_millis;
        set(&mut node.tick_interval, r.tick_ms.map(ms));
        set(&mut node.heartbeat_tick, r.heartbeat_ticks);
        set(&mut node.election_tick, r.election_ticks);
        set(&mut node.pre_vote, r.pre_vote);
        set(&mut node.check_quorum, r.check_quorum);
        set(&mut node.lease_reads, r.lease_reads);
        if let Some(w) = r.worker_threads.filter(|w| *w > 0) {
            node.worker_threads = w;
        }
        set(&mut node.max_proposal_bytes, r.max_proposal_bytes);
        set(&mut node.proposal_timeout, r.proposal_timeout_ms.map(ms));
        set(&mut node.hibernate, r.hibernate);
        set(&mut node.hibernate_ticks, r.hibernate_ticks);
        set(&mut node.node_down_ticks, r.node_down_ticks);
        set(&mut node.max_wakes_per_tick, r.max_wakes_per_tick);
        set(&mut node.idle_flush_ticks, r.idle_flush_ticks);
        let l = &self.log;
        set(&mut node.log_compact_threshold, l.compact_threshold);
        set(&mut node.log_compact_trailing, l.compact_trailing);
        set(&mut node.log_retain_max_entries, l.retain_max_entries);
        set(&mut node.log_retain_max_bytes, l.retain_max_bytes);
        let s = &self.split;
        set(&mut node.split.max_range_bytes, s.max_range_bytes);
        set(&mut node.split.max_range_keys, s.max_range_keys);
        set(&mut node.split.load_qps, s.load_qps);
        set(&mut node.split.check_interval, s.check_interval_ms.map(ms));
        let (st, store) = (&self.store, &mut c.store);
        set(&mut store.sync, st.sync);
        set(&mut store.block_cache_bytes, st.block_cache_bytes);
        set(&mut store.write_buffer_bytes, st.write_buffer_bytes);
        set(&mut store.background_jobs, st.background_jobs);
        set(&mut store.log_cache_entries, st.log_cache_entries);
        let (sc, schedule) = (&self.schedule, &mut c.schedule);
        set(&mut schedule.enabled, sc.enabled);
        set(&mut schedule.interval, sc.interval_ms.map(ms));
        set(&mut schedule.replication_factor, sc.replication_factor);
        set(&mut schedule.down_time, sc.down_time_ms.map(ms));
        set(&mut schedule.stable_time, sc.stable_time_ms.map(ms));
        set(&mut schedule.leader_threshold, sc.leader_threshold);
        set(&mut schedule.replica_threshold, sc.replica_threshold);
        set(&mut schedule.max_moves_per_node, sc.max_moves_per_node);
        set(
            &mut schedule.max_snapshots_per_node,
            sc.max_snapshots_per_node,
        );
        set(
            &mut schedule.max_transfers_per_pass,
            sc.max_transfers_per_pass,
        );
        set(&mut schedule.log_capacity, sc.log_capacity);
        set(&mut schedule.merge_below_bytes, sc.merge_below_bytes);
        set(&mut schedule.merge_delay, sc.merge_delay_ms.map(ms));
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

impl TlsSection {
    /// Reads the files into the transport's mutual TLS and, unless `clients = false`, the
    /// client API's TLS; a missing or unreadable file is a mistake.
    fn apply(&self, c: &mut ServerConfig, mistakes: &mut Vec<String>) {
        let mut read = |key: &str, path: Option<&PathBuf>| -> Option<String> {
            let Some(path) = path else {
                mistakes.push(format!("tls.{key} is required in [tls]"));
                return None;
            };
            match std::fs::read_to_string(path) {
                Ok(pem) => Some(pem),
                Err(e) => {
                    mistakes.push(format!("tls.{key}: cannot read {}: {e}", path.display()));
                    None
                }
            }
        };
        let ca = read("ca-file", self.ca_file.as_ref());
        let cert = read("cert-file", self.cert_file.as_ref());
        let key = read("key-file", self.key_file.as_ref());
        let client_ca = match (&self.client_ca_file, self.require_client_cert) {
            (_, Some(false)) => None,
            (None, _) => ca.clone(),
            (Some(path), _) => read("client-ca-file", Some(path)),
        };
        let (Some(ca), Some(cert), Some(key)) = (ca, cert, key) else {
            return;
        };
        if self.clients.unwrap_or(true) {
            c.client_tls = Some(ClientTls {
                cert_pem: cert.clone(),
                key_pem: key.clone(),
                client_ca_pem: client_ca,
            });
        }
        c.grpc.tls = Some(TlsConfig {
            server_name: self.server_name.clone(),
            ..TlsConfig::new(ca, cert, key)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("flotilla.example.toml");
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn the_example_file_parses_and_validates() {
        let file = ConfigFile::parse(&example()).unwrap();
        let c = file.to_server_config().unwrap();
        assert_eq!(c.node_id(), NodeId(1));
        assert_eq!(c.peers.len(), 3);
        assert!(c.metrics_addr.is_some());
        // Every value in the example is its default, so the example documents the defaults.
        let d = ServerConfig::new(NodeId(1), "x");
        assert_eq!(c.node.tick_interval, d.node.tick_interval);
        assert_eq!(c.node.election_tick, d.node.election_tick);
        assert_eq!(c.node.heartbeat_tick, d.node.heartbeat_tick);
        assert_eq!(c.node.hibernate_ticks, d.node.hibernate_ticks);
        assert_eq!(c.node.log_retain_max_bytes, d.node.log_retain_max_bytes);
        assert_eq!(c.node.log_retain_max_entries, d.node.log_retain_max_entries);
        assert_eq!(c.node.log_compact_threshold, d.node.log_compact_threshold);
        assert_eq!(c.node.proposal_timeout, d.node.proposal_timeout);
        assert_eq!(c.node.max_proposal_bytes, d.node.max_proposal_bytes);
        assert_eq!(c.node.split.max_range_bytes, d.node.split.max_range_bytes);
        assert_eq!(c.store.block_cache_bytes, d.store.block_cache_bytes);
        assert_eq!(c.store.write_buffer_bytes, d.store.write_buffer_bytes);
        assert_eq!(c.store.sync, d.store.sync);
        assert_eq!(c.bootstrap_replicas, d.bootstrap_replicas);
        assert_eq!(c.schedule, d.schedule);
    }

    #[test]
    fn every_mistake_of_a_file_is_reported_on_its_own_line() {
        let text = r#"
            [node]
            client = "127.0.0.1:7001"
            raft = "127.0.0.1:7001"
            bootstrap-ranges = 3
            [peers]
            one = "127.0.0.1:7001"
            2 = "nowhere"
            [raft]
            tick-ms = 0
            heartbeat-ticks = 5
            election-ticks = 5
            [store]
            block-cache-bytes = 10
            [tls]
            ca-file = "/nonexistent/ca.pem"
        "#;
        let mistakes = ConfigFile::parse(text)
            .unwrap()
            .to_server_config()
            .unwrap_err();
        let has = |needle: &str| {
            assert!(
                mistakes.iter().any(|m| m.contains(needle)),
                "no mistake mentions {needle:?}: {mistakes:#?}"
            )
        };
        has("node.id (--id) is required");
        has("node.data-dir (--data-dir) is required");
        has("key \"one\" is not a node id");
        has("address \"nowhere\" of peer n2");
        has("tick_interval");
        has("election_tick (5) must be greater than heartbeat_tick (5)");
        has("block_cache_bytes");
        has("cannot both use 127.0.0.1:7001");
        has("tls.ca-file: cannot read /nonexistent/ca.pem");
        has("tls.cert-file is required");
        has("tls.key-file is required");
        has("bootstrap_ranges needs this node");
        assert!(mistakes.len() >= 12, "{mistakes:#?}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_the_line() {
        let e = ConfigFile::parse("[node]\nid = 1\ntick-ms = 5\n").unwrap_err();
        assert!(e.contains("tick-ms") && e.contains("line 3"), "{e}");
        let e = ConfigFile::parse("[node]\n\nid = \"one\"\n").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
    }
}
