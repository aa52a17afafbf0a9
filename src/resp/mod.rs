//! The Redis protocol (RESP2, and RESP3 after `HELLO 3`) on its own port, over the KV state
//! machine, so that `redis-cli`, `redis-benchmark` and Redis client libraries work unchanged
//! for the commands a sharded KV store can serve (docs/DATABASE.md lists them).
//!
//! Frames are decoded and replies encoded by the `redis-protocol` crate; nothing here parses
//! bytes by hand. A connection reads what the socket has, decodes every complete frame in it
//! (a pipeline), runs them as one batch (`command::run`: consecutive writes become one
//! `kv_batch`, so one raft entry per range for the whole pipeline; consecutive reads one
//! `get_many`, so one read barrier per range) and writes every reply, in order, in one write.
//! A malformed frame gets an error reply and the connection is closed; so does a frame larger
//! than the limit, which is above the largest proposal so that an oversized value is refused
//! with a reply instead.
//!
//! Any node serves any key: writes to ranges led elsewhere are forwarded through raft, reads
//! are linearizable (ReadIndex) on this node's replica.

mod command;
mod reply;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use flotilla_runtime::NodeGroup;
use redis_protocol::resp3::types::BytesFrame;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use reply::Reply;

/// The Redis version reported to clients (INFO, HELLO): the command set and replies follow
/// Redis 7.
pub const REDIS_VERSION: &str = "7.0.0";

/// Most SCAN cursors a connection remembers (the oldest is forgotten first).
const MAX_CURSORS: usize = 1024;

/// Bytes a connection buffers beyond the largest proposal while a frame is incomplete;
/// past `max_proposal_bytes` plus this, the frame is refused and the connection closed.
const FRAME_SLACK: usize = 1 << 20;

/// What every connection of a listener shares.
#[derive(Debug)]
pub(crate) struct Shared {
    node: Arc<NodeGroup>,
    /// Commands served since the listener started.
    commands: AtomicU64,
    /// Connections accepted, and open now.
    connections: AtomicU64,
    connected: AtomicU64,
    local_addr: SocketAddr,
}

/// One client connection's state.
#[derive(Debug)]
pub(crate) struct Conn {
    id: u64,
    /// The protocol version: 2, or 3 after `HELLO 3`.
    resp: u8,
    name: Option<Bytes>,
    /// SCAN cursors handed out: cursor → the key the scan resumes at. A cursor is a number
    /// (as clients expect) that maps to a key on this connection.
    cursors: VecDeque<(u64, Vec<u8>)>,
    next_cursor: u64,
}

impl Conn {
    fn remember_cursor(&mut self, key: Vec<u8>) -> u64 {
        self.next_cursor += 1;
        if self.cursors.len() >= MAX_CURSORS {
            self.cursors.pop_front();
        }
        self.cursors.push_back((self.next_cursor, key));
        self.next_cursor
    }
}

/// A Redis-protocol listener over a NodeGroup: accepts connections until stopped.
#[derive(Debug)]
pub struct RespServer {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

impl RespServer {
    /// Serves the Redis protocol on `listener` over `node`, on the current tokio runtime,
    /// until [`RespServer::stop`] (or drop).
    ///
    /// # Errors
    ///
    /// The listener's error if its address cannot be read.
    pub fn serve(listener: TcpListener, node: Arc<NodeGroup>) -> std::io::Result<RespServer> {
        let shared = Arc::new(Shared {
            node,
            commands: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            local_addr: listener.local_addr()?,
        });
        let (stop, mut stopped) = watch::channel(false);
        let s = shared.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stopped.wait_for(|s| *s) => return,
                };
                match accepted {
                    Ok((socket, _)) => {
                        let _ = socket.set_nodelay(true);
                        let id = s.connections.fetch_add(1, Ordering::Relaxed) + 1;
                        let (s, stopped) = (s.clone(), stopped.clone());
                        tokio::spawn(async move {
                            s.connected.fetch_add(1, Ordering::Relaxed);
                            if let Err(e) = connection(socket, id, &s, stopped).await {
                                tracing::debug!(error = %e, "redis connection ended");
                            }
                            s.connected.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        tracing::warn!(error = %e, "redis listener failed to accept");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(RespServer { shared, stop })
    }

    /// Binds `addr` and serves on it (see [`RespServer::serve`]).
    ///
    /// # Errors
    ///
    /// The bind's error.
    pub async fn bind(addr: SocketAddr, node: Arc<NodeGroup>) -> std::io::Result<RespServer> {
        RespServer::serve(TcpListener::bind(addr).await?, node)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Stops accepting and closes every connection after the batch it is running.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for RespServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves one connection until the client closes it, sends QUIT or a malformed frame, or the
/// server stops.
async fn connection(
    mut socket: TcpStream,
    id: u64,
    shared: &Shared,
    mut stopped: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut conn = Conn {
        id,
        resp: 2,
        name: None,
        cursors: VecDeque::new(),
        next_cursor: 0,
    };
    let max_frame = usize::try_from(shared.node.config().max_proposal_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(FRAME_SLACK);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let read = tokio::select! {
            r = socket.read_buf(&mut buf) => r?,
            _ = stopped.wait_for(|s| *s) => return Ok(()),
        };
        if read == 0 {
            return Ok(());
        }
        // Every complete frame read so far: one pipeline.
        let mut steps = Vec::new();
        let mut fatal = None;
        loop {
            match redis_protocol::resp3::decode::complete::decode_bytes_mut(&mut buf) {
                Ok(Some((frame, _, _))) => match arguments(frame) {
                    Some(args) => {
                        let step = command::parse(args, &mut conn);
                        steps.push((step, conn.resp));
                    }
                    None => {
                        fatal = Some(
                            "ERR Protocol error: a command is an array of bulk strings".to_string(),
                        );
                        break;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    fatal = Some(format!("ERR Protocol error: {}", e.details()));
                    break;
                }
            }
        }
        if fatal.is_none() && buf.len() > max_frame {
            fatal = Some(format!(
                "ERR Protocol error: a command larger than {max_frame} bytes"
            ));
        }
        shared
            .commands
            .fetch_add(steps.len() as u64, Ordering::Relaxed);
        let (replies, quit) = command::run(steps, &mut conn, shared).await;
        out.clear();
        for (r, resp) in &replies {
            r.encode(*resp, &mut out);
        }
        if let Some(why) = &fatal {
            Reply::err(why.clone()).encode(conn.resp, &mut out);
        }
        socket.write_all(&out).await?;
        if quit || fatal.is_some() {
            let _ = socket.shutdown().await;
            return Ok(());
        }
    }
}

/// A request frame's arguments, if it is an array of strings (what clients send).
fn arguments(frame: BytesFrame) -> Option<Vec<Bytes>> {
    let BytesFrame::Array { data, .. } = frame else {
        return None;
    };
    data.into_iter()
        .map(|f| match f {
            BytesFrame::BlobString { data, .. } | BytesFrame::SimpleString { data, .. } => {
                Some(data)
            }
            _ => None,
        })
        .collect()
}

/// The INFO text: sections `server`, `clients`, `flotilla` (this node, its ranges and
/// leaders), `stats`; one of them if `section` names it.
fn info(shared: &Shared, section: Option<&str>) -> String {
    let all = matches!(section, None | Some("all" | "everything" | "default"));
    let want = |s: &str| all || section == Some(s);
    let mut out = String::new();
    if want("server") {
        out.push_str(&format!(
            "# Server\r\nredis_version:{REDIS_VERSION}\r\nflotilla_version:{}\r\n\
             redis_mode:standalone\r\nprocess_id:{}\r\ntcp_port:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            shared.local_addr.port(),
        ));
    }
    if want("clients") {
        out.push_str(&format!(
            "# Clients\r\nconnected_clients:{}\r\n\r\n",
            shared.connected.load(Ordering::Relaxed)
        ));
    }
    if want("flotilla") {
        let s = shared.node.node_status();
        out.push_str(&format!(
            "# Flotilla\r\nnode_id:{}\r\nranges:{}\r\nleaders:{}\r\nreplicas:{}\r\n\
             awake_replicas:{}\r\npending_requests:{}\r\n\r\n",
            s.node.0, s.ranges, s.leaders, s.replicas, s.awake, s.pending_requests
        ));
    }
    if want("stats") {
        out.push_str(&format!(
            "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\r\n",
            shared.connections.load(Ordering::Relaxed),
            shared.commands.load(Ordering::Relaxed)
        ));
    }
    out
}
