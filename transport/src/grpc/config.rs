//! The gRPC transport's settings: limits, timers, and the optional mTLS material.

use std::fmt;
use std::time::Duration;

use crate::TransportError;

/// Settings of a [`GrpcTransport`](super::GrpcTransport). Every node of a cluster should use
/// the same limits: a frame the sender allows but the receiver does not is refused (and the
/// stream reset) on the receiving side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcConfig {
    /// Bytes (encoded) that may be queued for one destination, counted from `send` until the
    /// destination acknowledges the frame that carried them, before `send` returns
    /// [`TransportError::Full`]. An empty queue accepts any batch within `max_frame_bytes`.
    /// Default: 32 MiB.
    pub queue_budget_bytes: usize,
    /// Largest frame, in encoded bytes, both ways: `send` refuses a larger batch with
    /// [`TransportError::FrameTooLarge`], the sender never merges past it, and the receiver
    /// refuses a larger frame off the wire. At most 4 GiB - 1 (gRPC's length prefix).
    /// Default: 16 MiB.
    pub max_frame_bytes: usize,
    /// Most raft messages plus heartbeats merged into one frame. Default: 4096.
    pub batch_max_messages: usize,
    /// How long opening a stream may take: TCP connect, TLS handshake, and the destination's
    /// first acknowledgement. Default: 3 s.
    pub connect_timeout: Duration,
    /// Wait before the first reconnect after a failure; doubled after each further failure
    /// (with jitter), up to `reconnect_backoff_max`. Default: 50 ms.
    pub reconnect_backoff_min: Duration,
    /// Longest wait between reconnect attempts. While waiting, `send` to that destination
    /// returns [`TransportError::Unreachable`]. Default: 2 s.
    pub reconnect_backoff_max: Duration,
    /// A stream with nothing to send for this long sends a ping (an empty frame) that the
    /// destination acknowledges: node liveness while every group is idle. Default: 1 s.
    pub ping_interval: Duration,
    /// A stream that has heard no acknowledgement for this long is considered broken and is
    /// reconnected. Must be longer than `ping_interval`. Default: 10 s.
    pub ping_timeout: Duration,
    /// Bytes received from all senders and not yet handed to the `BatchHandler`. Past it, the
    /// receiver stops reading its streams, so senders' queues fill up and their `send`
    /// returns `Full`: back-pressure end to end. At most 4 GiB - 1. Default: 64 MiB.
    pub inbound_budget_bytes: usize,
    /// Whether batches from nodes not in this transport's peer map are delivered. Off, they
    /// are dropped and counted (`unknown_peer`), so a stray or misconfigured process cannot
    /// inject raft messages. Default: false.
    pub accept_unknown_peers: bool,
    /// Bytes of snapshot per frame of a `Snapshot` stream. Snapshots (raft messages marked
    /// `snapshot`) never travel on the Batches stream: each is streamed in chunks of this
    /// size on a call of its own, so it may be far larger than `max_frame_bytes`. Must leave
    /// room for the frame's header within `max_frame_bytes`. Default: 2 MiB.
    pub snapshot_chunk_bytes: usize,
    /// Largest snapshot (encoded envelope), both ways: a larger one is not sent (its
    /// transfer is reported failed at once) and a receiver refuses one whose announced size
    /// exceeds its own limit. The receiver holds a whole snapshot in memory before handing it
    /// on. Default: 1 GiB.
    pub max_snapshot_bytes: u64,
    /// Snapshot transfers this node runs at once, per direction: sending (over the limit, a
    /// snapshot's transfer is reported failed at once and raft sends it again later, rather
    /// than queueing unbounded memory) and receiving (over the limit, a sender's call is
    /// refused as busy). Default: 4.
    pub max_concurrent_snapshots: usize,
    /// How long one snapshot transfer may take, connect to acknowledgement, on either side;
    /// past it the transfer fails (the receiver discards what it has). Size it for
    /// `max_snapshot_bytes` over the slowest link. Default: 60 s.
    pub snapshot_timeout: Duration,
    /// Mutual TLS between nodes; `None` is plaintext. Default: `None`.
    pub tls: Option<TlsConfig>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            queue_budget_bytes: 32 << 20,
            max_frame_bytes: 16 << 20,
            batch_max_messages: 4096,
            connect_timeout: Duration::from_secs(3),
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(2),
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(10),
            inbound_budget_bytes: 64 << 20,
            accept_unknown_peers: false,
            snapshot_chunk_bytes: 2 << 20,
            max_snapshot_bytes: 1 << 30,
            max_concurrent_snapshots: 4,
            snapshot_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

/// The largest length a gRPC frame's 4-byte length prefix can carry.
const MAX_GRPC_FRAME: usize = u32::MAX as usize;

/// Room kept in a snapshot frame, beyond its chunk, for the frame's own fields (the first
/// frame's `SnapshotStart` is six varints, well under this).
pub(crate) const SNAPSHOT_FRAME_OVERHEAD: usize = 256;

impl GrpcConfig {
    /// Checks every field; the PEM contents of `tls` are only parsed when the transport binds.
    ///
    /// # Errors
    ///
    /// [`TransportError::InvalidConfig`] naming the first wrong field.
    pub fn validate(&self) -> Result<(), TransportError> {
        match self.mistakes().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every mistake, in field order (what a config file's reader reports, one line each);
    /// the PEM contents of `tls` are only parsed when the transport binds.
    pub fn mistakes(&self) -> Vec<TransportError> {
        let bad = |field, problem| TransportError::InvalidConfig { field, problem };
        let mut out = Vec::new();
        if self.queue_budget_bytes == 0 {
            out.push(bad("queue_budget_bytes", "must be positive"));
        }
        if self.max_frame_bytes == 0 {
            out.push(bad("max_frame_bytes", "must be positive"));
        }
        if self.max_frame_bytes > MAX_GRPC_FRAME {
            out.push(bad(
                "max_frame_bytes",
                "must be below 4 GiB (gRPC length prefix)",
            ));
        }
        if self.batch_max_messages == 0 {
            out.push(bad("batch_max_messages", "must be positive"));
        }
        if self.connect_timeout.is_zero() {
            out.push(bad("connect_timeout", "must be positive"));
        }
        if self.reconnect_backoff_min.is_zero() {
            out.push(bad("reconnect_backoff_min", "must be positive"));
        }
        if self.reconnect_backoff_max < self.reconnect_backoff_min {
            out.push(bad(
                "reconnect_backoff_max",
                "must be at least reconnect_backoff_min",
            ));
        }
        if self.ping_interval.is_zero() {
            out.push(bad("ping_interval", "must be positive"));
        }
        if self.ping_timeout <= self.ping_interval {
            out.push(bad("ping_timeout", "must be longer than ping_interval"));
        }
        if self.inbound_budget_bytes == 0 {
            out.push(bad("inbound_budget_bytes", "must be positive"));
        }
        if self.inbound_budget_bytes > MAX_GRPC_FRAME {
            out.push(bad("inbound_budget_bytes", "must be below 4 GiB"));
        }
        if self.snapshot_chunk_bytes == 0 {
            out.push(bad("snapshot_chunk_bytes", "must be positive"));
        }
        if self
            .snapshot_chunk_bytes
            .saturating_add(SNAPSHOT_FRAME_OVERHEAD)
            > self.max_frame_bytes
        {
            out.push(bad(
                "snapshot_chunk_bytes",
                "must be below max_frame_bytes by at least 256 bytes (the frame's header)",
            ));
        }
        if self.max_snapshot_bytes == 0 {
            out.push(bad("max_snapshot_bytes", "must be positive"));
        }
        if self.max_concurrent_snapshots == 0 {
            out.push(bad("max_concurrent_snapshots", "must be positive"));
        }
        if self.snapshot_timeout.is_zero() {
            out.push(bad("snapshot_timeout", "must be positive"));
        }
        if let Some(tls) = &self.tls {
            out.extend(tls.validate().err());
        }
        out
    }
}

/// Mutual TLS between nodes: every node has a certificate signed by the cluster's CA.
///
/// The server requires a client certificate signed by `ca_pem`, and the client checks the
/// server's certificate against `ca_pem` and the host of the peer's address (or
/// `server_name`). Any node with a certificate from the CA is accepted as any node id: the
/// certificate proves membership of the cluster, not which node the sender is.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM of the CA certificate(s) that sign node certificates.
    pub ca_pem: String,
    /// PEM of this node's certificate chain, used both as server and as client.
    pub cert_pem: String,
    /// PEM of this node's private key.
    pub key_pem: String,
    /// Name to verify the server certificates against, instead of the host of each peer's
    /// address: for clusters whose node certificates all carry one shared name. Default:
    /// `None`.
    pub server_name: Option<String>,
}

impl TlsConfig {
    /// The three PEMs, verifying servers by the host of their address.
    pub fn new(
        ca_pem: impl Into<String>,
        cert_pem: impl Into<String>,
        key_pem: impl Into<String>,
    ) -> Self {
        Self {
            ca_pem: ca_pem.into(),
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            server_name: None,
        }
    }

    fn validate(&self) -> Result<(), TransportError> {
        let bad = |field, problem| Err(TransportError::InvalidConfig { field, problem });
        for (field, pem) in [
            ("tls.ca_pem", &self.ca_pem),
            ("tls.cert_pem", &self.cert_pem),
            ("tls.key_pem", &self.key_pem),
        ] {
            if !pem.contains("-----BEGIN ") {
                return bad(field, "is not PEM");
            }
        }
        if self.server_name.as_deref() == Some("") {
            return bad("tls.server_name", "must not be empty (use None)");
        }
        Ok(())
    }
}

/// Never prints the private key.
impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .field("server_name", &self.server_name)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(c: &GrpcConfig) -> Option<&'static str> {
        match c.validate() {
            Ok(()) => None,
            Err(TransportError::InvalidConfig { field, .. }) => Some(field),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn default_is_valid_and_each_mistake_is_named() {
        let ok = GrpcConfig::default();
        assert_eq!(field_of(&ok), None);
        type Mistake = (&'static str, fn(&mut GrpcConfig));
        let cases: [Mistake; 12] = [
            ("queue_budget_bytes", |c| c.queue_budget_bytes = 0),
            ("snapshot_chunk_bytes", |c| {
                c.snapshot_chunk_bytes = c.max_frame_bytes
            }),
            ("max_snapshot_bytes", |c| c.max_snapshot_bytes = 0),
            ("max_concurrent_snapshots", |c| {
                c.max_concurrent_snapshots = 0
            }),
            ("snapshot_timeout", |c| c.snapshot_timeout = Duration::ZERO),
            ("max_frame_bytes", |c| c.max_frame_bytes = usize::MAX),
            ("batch_max_messages", |c| c.batch_max_messages = 0),
            ("connect_timeout", |c| c.connect_timeout = Duration::ZERO),
            ("reconnect_backoff_max", |c| {
                c.reconnect_backoff_max = c.reconnect_backoff_min / 2
            }),
            ("ping_timeout", |c| c.ping_timeout = c.ping_interval),
            ("inbound_budget_bytes", |c| c.inbound_budget_bytes = 0),
            ("tls.key_pem", |c| {
                c.tls = Some(TlsConfig::new(
                    "-----BEGIN CERTIFICATE-----",
                    "-----BEGIN CERTIFICATE-----",
                    "not a key",
                ))
            }),
        ];
        for (field, break_it) in cases {
            let mut c = ok.clone();
            break_it(&mut c);
            assert_eq!(field_of(&c), Some(field));
        }
    }

    #[test]
    fn debug_hides_the_key() {
        let tls = TlsConfig::new("ca", "cert", "SECRET");
        assert!(!format!("{tls:?}").contains("SECRET"));
    }
}
