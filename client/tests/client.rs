//! The client library against three in-process nodes on real gRPC (`start_local_servers`):
//! every redirect and retry path (a stale leader, a stale epoch after a split and after a
//! merge, a node down, a deadline that passes) and exactly-once retries, through the `Batch`
//! stream and through unary RPCs.

use std::time::{Duration, Instant};

use flotilla::layout::{first_campaigner, range_layout};
use flotilla::proto::meta::RangeDescriptor;
use flotilla::testing::{
    bootstrap_ranges_and_system, key_in_range, node_ids, start_local_servers, test_config,
};
use flotilla::{NodeId, RangeId, ReplicaId, Server, StateRole};
use flotilla_client::{Client, ClientConfig, Error, Transport};

const T: Duration = Duration::from_secs(20);

struct Cluster {
    servers: Vec<Option<Server>>,
    layout: Vec<RangeDescriptor>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Three nodes with `ranges` ranges of the standard layout, each with a leader.
    async fn start(ranges: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let servers = start_local_servers(
            3,
            test_config,
            dir.path(),
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        let members = node_ids(3);
        let layout = range_layout(ranges, &members);
        for s in &servers {
            bootstrap_ranges_and_system(s.node(), layout.clone()).unwrap();
        }
        for d in &layout {
            let n = first_campaigner(d.id(), &members).unwrap();
            servers[n.0 as usize - 1].node().campaign(d.id()).unwrap();
        }
        let c = Cluster {
            servers: servers.into_iter().map(Some).collect(),
            layout,
            _dir: dir,
        };
        for d in &c.layout {
            c.wait_leader(d.range_id).await;
        }
        c
    }

    fn server(&self, node: u64) -> &Server {
        self.servers[node as usize - 1].as_ref().expect("running")
    }

    /// The node whose replica of `range` leads (highest term), if any.
    fn leader(&self, range: u64) -> Option<u64> {
        self.servers
            .iter()
            .flatten()
            .filter_map(|s| {
                let st = s.node().status(RangeId(range)).ok()?;
                (st.role == StateRole::Leader).then_some((st.term, s.node_id().0))
            })
            .max()
            .map(|(_, n)| n)
    }

    async fn wait_leader(&self, range: u64) -> u64 {
        let deadline = Instant::now() + T;
        loop {
            if let Some(l) = self.leader(range) {
                return l;
            }
            assert!(Instant::now() < deadline, "no leader for r{range}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn endpoints(&self) -> Vec<String> {
        self.servers
            .iter()
            .flatten()
            .map(|s| s.client_addr().to_string())
            .collect()
    }

    async fn client(&self, transport: Transport) -> Client {
        let config = ClientConfig {
            transport,
            timeout: T,
            attempt_timeout: Duration::from_secs(2),
            down_for: Duration::from_millis(300),
            ..ClientConfig::new(self.endpoints())
        };
        Client::connect(config).await.unwrap()
    }

    /// Stops node `node` (its ports close).
    fn stop(&mut self, node: u64) {
        if let Some(s) = self.servers[node as usize - 1].take() {
            s.shutdown();
        }
    }
}

fn range_of(c: &Client, key: &[u8]) -> Option<u64> {
    c.cached_ranges()
        .into_iter()
        .find(|r| r.desc.contains(key))
        .map(|r| r.desc.range_id)
}

const BOTH: [Transport; 2] = [Transport::Stream, Transport::Unary];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_reach_the_leaders_and_share_frames() {
    let c = Cluster::start(3).await;
    let client = c.client(Transport::Stream).await;
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let key = key_in_range(i % 3 + 1, &i.to_string());
            client.put(key, format!("v{i}")).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for i in 0..64u64 {
        let key = key_in_range(i % 3 + 1, &i.to_string());
        let v = client.get(key).await.unwrap();
        assert_eq!(v.as_deref(), Some(format!("v{i}").as_bytes()));
    }
    let s = client.stats();
    assert!(s.framed_requests >= 128, "{s:?}");
    assert!(
        s.frames < s.framed_requests,
        "requests shared no frame: {s:?}"
    );
    assert_eq!(client.cached_ranges().len(), 3);
    // The cache knows each range's leader and requests went there.
    for r in client.cached_ranges() {
        assert_eq!(r.leader, c.leader(r.desc.range_id), "{r:?}");
    }
    // A multi-put over the three ranges is split by range.
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..30u64)
        .map(|i| (key_in_range(i % 3 + 1, &format!("m{i}")), b"mv".to_vec()))
        .collect();
    client.multi_put(pairs.clone()).await.unwrap();
    for (k, _) in pairs {
        assert_eq!(client.get(k).await.unwrap().as_deref(), Some(&b"mv"[..]));
    }
    // The unary transport serves the same requests.
    let unary = c.client(Transport::Unary).await;
    unary.put("u", "1").await.unwrap();
    unary.multi_put([("u1", "1"), ("u2", "2")]).await.unwrap();
    assert_eq!(unary.get("u2").await.unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(unary.stats().frames, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_leader_is_corrected_by_the_not_leader_hint() {
    let c = Cluster::start(1).await;
    for transport in BOTH {
        let client = c.client(transport).await;
        client.put("a", "1").await.unwrap();
        let old = c.leader(1).unwrap();
        assert_eq!(client.cached_ranges()[0].leader, Some(old));
        // Leadership moves; the old leader learns where.
        let new = old % 3 + 1;
        c.server(old)
            .node()
            .transfer_leader(RangeId(1), ReplicaId(new))
            .await
            .unwrap();
        let deadline = Instant::now() + T;
        while c.leader(1) != Some(new)
            || c.server(old).node().status(RangeId(1)).unwrap().leader_node != Some(NodeId(new))
        {
            assert!(
                Instant::now() < deadline,
                "leadership did not move to {new}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before = client.stats();
        client.put("b", "2").await.unwrap();
        let after = client.stats();
        assert!(
            after.not_leader > before.not_leader,
            "{transport:?}: {after:?}"
        );
        assert_eq!(client.cached_ranges()[0].leader, Some(new), "{transport:?}");
        assert_eq!(client.get("b").await.unwrap().as_deref(), Some(&b"2"[..]));
    }
}

/// Splits `range` at `at` on its leader, retrying while leadership moves.
async fn split(c: &Cluster, range: u64, at: &[u8]) -> (RangeDescriptor, RangeDescriptor) {
    let deadline = Instant::now() + T;
    loop {
        let l = c.wait_leader(range).await;
        match c
            .server(l)
            .node()
            .split(RangeId(range), Some(at.to_vec()))
            .await
        {
            Ok(halves) => return halves,
            Err(e) => assert!(Instant::now() < deadline, "split: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_is_learned_from_epoch_not_match() {
    let c = Cluster::start(1).await;
    for (i, transport) in BOTH.into_iter().enumerate() {
        let client = c.client(transport).await;
        // Keys of iteration i start with i, so that each iteration splits the range its
        // keys are in.
        let (l, r) = (format!("{i}a"), format!("{i}z"));
        client.put(l.clone(), "1").await.unwrap();
        let cached = client.cached_ranges();
        assert_eq!(cached.len(), 1);
        let parent = cached[0].desc.range_id;
        // The range splits behind the client's back.
        let split_key = format!("{i}m");
        let (left, right) = split(&c, parent, split_key.as_bytes()).await;
        c.wait_leader(right.range_id).await;
        // A key of the right half: the node's router names the new range.
        client.put(r.clone(), "2").await.unwrap();
        assert_eq!(range_of(&client, r.as_bytes()), Some(right.range_id));
        assert!(client.stats().epoch_not_match >= 1, "{:?}", client.stats());
        // A key of the left half (the right half's descriptor displaced the parent: looked
        // up again).
        client.put(l.clone(), "3").await.unwrap();
        assert_eq!(range_of(&client, l.as_bytes()), Some(left.range_id));
        assert_eq!(
            client.get(r.clone()).await.unwrap().as_deref(),
            Some(&b"2"[..])
        );
        assert_eq!(
            client.get(l.clone()).await.unwrap().as_deref(),
            Some(&b"3"[..])
        );
        // A multi-put routed with a stale view of a range that split again is regrouped.
        let again = format!("{split_key}5");
        let pairs = [
            (format!("{split_key}1"), "x"),
            (format!("{split_key}9"), "y"),
        ];
        client.put(pairs[0].0.clone(), "old").await.unwrap();
        split(&c, right.range_id, again.as_bytes()).await;
        client.multi_put(pairs.clone()).await.unwrap();
        for (k, v) in pairs {
            assert_eq!(client.get(k).await.unwrap().as_deref(), Some(v.as_bytes()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_is_learned_from_epoch_not_match() {
    let c = Cluster::start(1).await;
    for (i, transport) in BOTH.into_iter().enumerate() {
        let client = c.client(transport).await;
        let (l, r) = (format!("{i}a"), format!("{i}z"));
        let (left, right) = split(&c, 1, format!("{i}m").as_bytes()).await;
        c.wait_leader(right.range_id).await;
        client.put(l.clone(), "1").await.unwrap();
        client.put(r.clone(), "1").await.unwrap();
        assert_eq!(range_of(&client, r.as_bytes()), Some(right.range_id));
        // The right half merges into the left behind the client's back.
        let deadline = Instant::now() + T;
        loop {
            let leader = c.wait_leader(right.range_id).await;
            // Refusals pass (leadership moving, a replica still catching up with the split).
            match c.server(leader).node().merge(right.id(), left.id()).await {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "merge: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client.put(r.clone(), "2").await.unwrap();
        assert_eq!(range_of(&client, r.as_bytes()), Some(left.range_id));
        assert!(client.stats().epoch_not_match >= 1, "{:?}", client.stats());
        client.put(l.clone(), "2").await.unwrap();
        assert_eq!(client.get(r).await.unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(client.get(l).await.unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(
            client.cached_ranges().len(),
            1,
            "{:?}",
            client.cached_ranges()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_is_routed_around() {
    let mut c = Cluster::start(2).await;
    let stream = c.client(Transport::Stream).await;
    let unary = c.client(Transport::Unary).await;
    let key = key_in_range(2, "k");
    stream.put(key.clone(), "1").await.unwrap();
    unary.put(key.clone(), "1").await.unwrap();
    let leader = c.leader(2).unwrap();
    c.stop(leader);
    for client in [&stream, &unary] {
        let started = Instant::now();
        client.put(key.clone(), "2").await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(client.stats().no_answer >= 1, "{:?}", client.stats());
        assert_ne!(range_leader(client, &key), Some(leader));
        assert_eq!(
            client.get(key.clone()).await.unwrap().as_deref(),
            Some(&b"2"[..])
        );
    }
}

fn range_leader(c: &Client, key: &[u8]) -> Option<u64> {
    c.cached_ranges()
        .into_iter()
        .find(|r| r.desc.contains(key))
        .and_then(|r| r.leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_is_a_typed_error() {
    let mut c = Cluster::start(1).await;
    let stream = c.client(Transport::Stream).await;
    let unary = c.client(Transport::Unary).await;
    stream.put("k", "1").await.unwrap();
    unary.put("k", "1").await.unwrap();
    // No quorum: nothing can be written.
    let leader = c.leader(1).unwrap();
    c.stop(leader);
    c.stop(leader % 3 + 1);
    for client in [&stream, &unary] {
        let budget = Duration::from_millis(700);
        let started = Instant::now();
        let err = client.with_timeout(budget).put("k", "2").await.unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= budget && took < budget + Duration::from_secs(2),
            "{took:?}"
        );
        match &err {
            Error::DeadlineExceeded {
                timeout, attempts, ..
            } => {
                assert_eq!(*timeout, budget);
                assert!(*attempts >= 1, "{err}");
            }
            other => panic!("not a deadline: {other:?}"),
        }
        assert!(err.to_string().contains("deadline"), "{err}");
    }
    // A read without quorum too.
    let err = stream
        .with_timeout(Duration::from_millis(300))
        .get("k")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DeadlineExceeded {
                outcome_unknown: false,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_put_applies_once() {
    let c = Cluster::start(1).await;
    for transport in BOTH {
        let writer = c.client(transport).await;
        let other = c.client(transport).await;
        writer.put("k", "v0").await.unwrap();
        // The answer to the next put is lost after the node applied it, and the retry waits.
        writer.lose_answers(1, true);
        let task = {
            let writer = writer.clone();
            tokio::spawn(async move { writer.put("k", "v1").await })
        };
        let deadline = Instant::now() + T;
        while writer.lost_answers() == 0 {
            assert!(Instant::now() < deadline, "the answer was never lost");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(other.get("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
        // Someone else writes meanwhile; then the retry goes, with the same request id.
        other.put("k", "v2").await.unwrap();
        writer.release_retries(1);
        task.await.unwrap().unwrap();
        assert!(writer.stats().attempts >= 3, "{:?}", writer.stats());
        // Applied once: the retry did not write v1 over v2.
        assert_eq!(
            other.get("k").await.unwrap().as_deref(),
            Some(&b"v2"[..]),
            "{transport:?}"
        );
        writer.lose_answers(0, false);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_and_unreachable_clusters_are_refused() {
    let err = Client::connect(ClientConfig::new(Vec::<String>::new()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let err = Client::connect(ClientConfig::new([addr]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
}
