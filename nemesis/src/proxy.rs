//! The fault-injecting TCP proxy that network partitions go through.
//!
//! Every node reaches every other node through a proxy listener of its own: one link per
//! directed node pair `(from, to)`, which forwards the connections `from` opens to `to`'s raft
//! address (raft batches and snapshot streams alike). A blocked link stops moving bytes in both
//! directions of every connection it carries, and keeps accepting new connections without
//! moving their bytes either: to both nodes it looks like a network that silently drops
//! packets, which is what gRPC pings and raft elections must detect. Unblocking resumes the
//! held connections where they stopped (TCP delivers late rather than lose or corrupt), unless
//! an end gave up on them meanwhile. Cutting node `a` off blocks every link from or to `a`;
//! a bridge blocks both links between two nodes and leaves the third connected to both.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One directed node pair's proxy.
#[derive(Debug)]
struct Link {
    listen: SocketAddr,
    blocked: watch::Sender<bool>,
}

/// The proxies of a cluster of `n` nodes.
#[derive(Debug)]
pub struct Proxies {
    n: usize,
    links: Vec<Link>,
}

impl Proxies {
    /// Starts a proxy for each directed pair of the nodes at `raft` (their real addresses).
    pub async fn start(raft: &[SocketAddr]) -> anyhow::Result<Proxies> {
        let n = raft.len();
        let mut links = Vec::with_capacity(n * n);
        for from in 0..n {
            for (to, &upstream) in raft.iter().enumerate() {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let listen = listener.local_addr()?;
                let (blocked, rx) = watch::channel(false);
                if from != to {
                    tokio::spawn(serve(listener, upstream, rx));
                }
                links.push(Link { listen, blocked });
            }
        }
        Ok(Proxies { n, links })
    }

    /// The address node `from` must use for node `to`.
    pub fn addr(&self, from: usize, to: usize) -> SocketAddr {
        self.links[from * self.n + to].listen
    }

    /// Blocks or unblocks the link between `a` and `b`, both directions.
    pub fn set_blocked(&self, a: usize, b: usize, blocked: bool) {
        self.links[a * self.n + b].blocked.send_replace(blocked);
        self.links[b * self.n + a].blocked.send_replace(blocked);
    }

    /// Cuts node `a` off from every other node.
    pub fn isolate(&self, a: usize) {
        for b in 0..self.n {
            if b != a {
                self.set_blocked(a, b, true);
            }
        }
    }

    /// Unblocks every link.
    pub fn heal(&self) {
        for l in &self.links {
            l.blocked.send_replace(false);
        }
    }
}

async fn serve(listener: TcpListener, upstream: SocketAddr, blocked: watch::Receiver<bool>) {
    loop {
        let Ok((down, _)) = listener.accept().await else {
            continue;
        };
        let blocked = blocked.clone();
        tokio::spawn(async move {
            let Ok(up) = TcpStream::connect(upstream).await else {
                return; // the node is down: the caller sees its connection closed
            };
            let _ = down.set_nodelay(true);
            let _ = up.set_nodelay(true);
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            // When either direction ends, drop both so the other end sees the close.
            tokio::select! {
                _ = pipe(dr, uw, blocked.clone()) => {}
                _ = pipe(ur, dw, blocked) => {}
            }
        });
    }
}

/// Copies `r` to `w`, holding the bytes while the link is blocked.
async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut blocked: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if wait_open(&mut blocked).await.is_err() {
            return;
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // The link may have been blocked while this read waited: hold what it got.
        if wait_open(&mut blocked).await.is_err() || w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn wait_open(blocked: &mut watch::Receiver<bool>) -> Result<(), watch::error::RecvError> {
    blocked.wait_for(|b| !*b).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An echo server standing in for a node's raft port.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn read_some(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_blocked_link_holds_bytes_and_delivers_them_once_unblocked() {
        let node = echo().await;
        let proxies = Proxies::start(&[node, node]).await.unwrap();
        let mut s = TcpStream::connect(proxies.addr(0, 1)).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        assert_eq!(
            read_some(&mut s, Duration::from_secs(5)).await.unwrap(),
            b"ping"
        );

        proxies.isolate(1);
        s.write_all(b"held").await.unwrap();
        assert_eq!(read_some(&mut s, Duration::from_millis(300)).await, None);
        // A connection opened during the partition is accepted but carries nothing.
        let mut late = TcpStream::connect(proxies.addr(0, 1)).await.unwrap();
        late.write_all(b"late").await.unwrap();
        assert_eq!(read_some(&mut late, Duration::from_millis(300)).await, None);

        proxies.heal();
        assert_eq!(
            read_some(&mut s, Duration::from_secs(5)).await.unwrap(),
            b"held"
        );
        assert_eq!(
            read_some(&mut late, Duration::from_secs(5)).await.unwrap(),
            b"late"
        );
    }

    #[tokio::test]
    async fn a_bridge_blocks_only_the_links_between_its_two_nodes() {
        let node = echo().await;
        let proxies = Proxies::start(&[node, node, node]).await.unwrap();
        proxies.set_blocked(0, 1, true);
        for (from, to, open) in [(0, 1, false), (1, 0, false), (0, 2, true), (2, 1, true)] {
            let mut s = TcpStream::connect(proxies.addr(from, to)).await.unwrap();
            s.write_all(b"x").await.unwrap();
            let within = Duration::from_millis(if open { 5000 } else { 300 });
            assert_eq!(
                read_some(&mut s, within).await.is_some(),
                open,
                "{from}->{to}"
            );
        }
    }
}
