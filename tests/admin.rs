//! The admin gRPC API end to end: three NodeGroups on the gRPC transport, each serving the KV
//! and admin services on its own port as `flotilla-node` does; a client splits a range (at a
//! key, and at its middle key by naming a key of the range), lists the range table, merges the
//! halves back, and gets the documented status codes for bad requests: unknown range
//! NOT_FOUND, non-adjacent merge FAILED_PRECONDITION, a node that does not lead the range
//! UNAVAILABLE naming the leader. `BackupRange` streams a range at one point (start, chunks in
//! key order, end with the counts), from the leader or a follower, and refuses a version the
//! range no longer has.

use std::time::{Duration, Instant};

use flotilla::kv_service::leader_hint;
use flotilla::layout::range_layout;
use flotilla::proto::admin::admin_client::AdminClient;
use flotilla::proto::admin::backup_range_frame::Frame;
use flotilla::proto::admin::{
    split_request, BackupRangeRequest, MergeRequest, RangeInfo, RangesRequest, SplitRequest,
};
use flotilla::proto::kv::kv_client::KvClient;
use flotilla::proto::kv::GetRequest;
use flotilla::testing::{bootstrap_ranges_and_system, node_ids, start_local_servers, test_config};
use flotilla::{NodeId, Server, StateRole};
use tonic::transport::Channel;
use tonic::Code;

const T: Duration = Duration::from_secs(20);
const KEYS: usize = 200;

fn key(i: usize) -> Vec<u8> {
    format!("k{i:04}").into_bytes()
}

struct Harness {
    nodes: Vec<Server>,
    admins: Vec<AdminClient<Channel>>,
    kvs: Vec<KvClient<Channel>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let nodes = start_local_servers(
            3,
            test_config,
            dir.path(),
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        let whole = range_layout(1, &node_ids(3)).remove(0);
        for n in &nodes {
            bootstrap_ranges_and_system(n.node(), vec![whole.clone()]).unwrap();
        }
        nodes[0].node().campaign(whole.id()).unwrap();
        let (mut admins, mut kvs) = (Vec::new(), Vec::new());
        for n in &nodes {
            let channel = Channel::from_shared(format!("http://{}", n.client_addr()))
                .unwrap()
                .connect_lazy();
            admins.push(AdminClient::new(channel.clone()));
            kvs.push(KvClient::new(channel));
        }
        Harness {
            nodes,
            admins,
            kvs,
            _dir: dir,
        }
    }

    /// Index of the node whose replica of `range` is the leader, once there is one.
    async fn leader(&self, range: u64) -> usize {
        let deadline = Instant::now() + T;
        loop {
            if let Some(i) = self.nodes.iter().position(|n| {
                n.node()
                    .status(flotilla::RangeId(range))
                    .is_ok_and(|s| s.role == StateRole::Leader)
            }) {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader for r{range}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn ranges(&mut self, node: usize) -> Vec<RangeInfo> {
        self.admins[node]
            .ranges(RangesRequest {})
            .await
            .unwrap()
            .into_inner()
            .ranges
    }

    fn shutdown(self) {
        for n in &self.nodes {
            n.shutdown();
        }
    }
}

fn split_by_id(range: u64, at: &[u8]) -> SplitRequest {
    SplitRequest {
        range: Some(split_request::Range::RangeId(range)),
        split_key: at.to_vec().into(),
    }
}

fn merge(source: u64, target: u64) -> MergeRequest {
    MergeRequest {
        source_range_id: source,
        target_range_id: target,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_list_merge_and_error_codes_over_grpc() {
    let mut h = Harness::start().await;
    let l = h.leader(1).await;
    for i in 0..KEYS {
        h.nodes[l].node().put(&key(i), b"v").await.unwrap();
    }

    // Split r1 at k0100 on its leader (following the hint if leadership moved meanwhile).
    let mut node = l;
    let deadline = Instant::now() + T;
    let s = loop {
        match h.admins[node].split(split_by_id(1, &key(100))).await {
            Ok(r) => break r.into_inner(),
            Err(e) if Instant::now() < deadline && e.code() == Code::Unavailable => {
                node = leader_hint(&e).map_or((node + 1) % 3, |n| n.0 as usize - 1);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("split: {e:?}"),
        }
    };
    let l = node;
    let (left, right) = (s.left.unwrap(), s.right.unwrap());
    assert_eq!(left.range_id, 1);
    assert_eq!(
        (&left.start_key[..], &left.end_key[..]),
        (&b""[..], &key(100)[..])
    );
    assert_eq!(
        (&right.start_key[..], &right.end_key[..]),
        (&key(100)[..], &b""[..])
    );
    assert_ne!(right.range_id, 1);
    assert_eq!(left.epoch.unwrap().version, 2);
    assert_eq!(left.replicas.len(), 3);
    assert!((1..=3).contains(&left.leader_node_id), "{left:?}");

    // Split the range holding k0150 at its middle key (no split key given).
    let rl = h.leader(right.range_id).await;
    let s = h.admins[rl]
        .split(SplitRequest {
            range: Some(split_request::Range::RangeKey(key(150).into())),
            split_key: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    let (mid_left, third) = (s.left.unwrap(), s.right.unwrap());
    assert_eq!(mid_left.range_id, right.range_id);
    assert!(third.start_key > key(100) && third.start_key < key(KEYS));

    // Every node lists the same three ranges, in key order, once it applied both splits.
    for n in 0..3 {
        let deadline = Instant::now() + T;
        let ranges = loop {
            let r = h.ranges(n).await;
            if r.len() == 3 || Instant::now() >= deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let ids: Vec<u64> = ranges.iter().map(|r| r.range_id).collect();
        assert_eq!(ids, [1, right.range_id, third.range_id], "node {}", n + 1);
        assert!(ranges[0].start_key.is_empty() && ranges[2].end_key.is_empty());
        assert_eq!(ranges[0].end_key, ranges[1].start_key);
        assert_eq!(ranges[1].end_key, ranges[2].start_key);
        assert!(ranges.iter().all(|r| r.replicas.len() == 3 && !r.merging));
    }

    // Unknown ranges and keys: NOT_FOUND; no range named at all: INVALID_ARGUMENT.
    let e = h.admins[l].split(split_by_id(999, b"x")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = h.admins[l].merge(merge(999, 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = h.admins[l]
        .split(SplitRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = h.admins[l].merge(merge(0, 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A split key outside the range, a merge of ranges that do not touch: FAILED_PRECONDITION.
    let e = h.admins[l]
        .split(split_by_id(1, &key(150)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = h.admins[l]
        .merge(merge(third.range_id, 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // A node that does not lead the range answers UNAVAILABLE and names the leader. (Should
    // leadership move between the checks, the round is repeated.)
    let deadline = Instant::now() + T;
    loop {
        let tl = h.leader(third.range_id).await;
        let follower = (tl + 1) % 3;
        let knows = |r: &[RangeInfo]| {
            r.iter()
                .find(|r| r.range_id == third.range_id)
                .is_some_and(|r| r.leader_node_id == tl as u64 + 1)
        };
        while !knows(&h.ranges(follower).await) {
            assert!(
                Instant::now() < deadline,
                "follower never learned the leader"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let m = h.admins[follower]
            .merge(merge(third.range_id, right.range_id))
            .await
            .unwrap_err();
        let s = h.admins[follower]
            .split(split_by_id(third.range_id, &key(190)))
            .await
            .unwrap_err();
        let still = h.leader(third.range_id).await == tl;
        if !still && Instant::now() < deadline {
            continue;
        }
        for e in [&m, &s] {
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
            assert_eq!(leader_hint(e), Some(NodeId(tl as u64 + 1)), "{e:?}");
        }
        assert!(m.message().contains(&format!("n{}", tl + 1)), "{m:?}");
        break;
    }

    // Merge back, each time on the node the hint points to: third into the middle range, then
    // the middle range into r1.
    for (source, target) in [(third.range_id, right.range_id), (right.range_id, 1)] {
        let mut node = 0;
        let deadline = Instant::now() + T;
        let merged = loop {
            match h.admins[node].merge(merge(source, target)).await {
                Ok(r) => break r.into_inner().merged.unwrap(),
                Err(e) if Instant::now() < deadline && e.code() == Code::Unavailable => {
                    node = leader_hint(&e).map_or((node + 1) % 3, |n| n.0 as usize - 1);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("merge of r{source} into r{target}: {e:?}"),
            }
        };
        assert_eq!(merged.range_id, target);
    }
    for n in 0..3 {
        let deadline = Instant::now() + T;
        loop {
            let r = h.ranges(n).await;
            if r.len() == 1 {
                assert_eq!(r[0].range_id, 1);
                assert!(r[0].start_key.is_empty() && r[0].end_key.is_empty());
                break;
            }
            assert!(Instant::now() < deadline, "node {} still has {r:?}", n + 1);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // Every key written before survives the splits and merges, read through the KV API.
    let l = h.leader(1).await;
    for i in 0..KEYS {
        let got = h.kvs[l]
            .get(GetRequest {
                key: key(i).into(),
                stale: false,
                route: None,
                consistency: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(got.found && &got.value[..] == b"v", "key {i}");
    }
    h.shutdown();
}

/// Reads a whole `BackupRange` answer: the start frame's range and applied index, the pairs'
/// keys, and the end frame's key count.
async fn backup(
    admin: &mut AdminClient<Channel>,
    range: u64,
    version: u64,
) -> Result<(RangeInfo, u64, Vec<Vec<u8>>, u64), tonic::Status> {
    let req = BackupRangeRequest {
        range_id: range,
        version,
        chunk_bytes: 256,
    };
    let mut frames = admin.backup_range(req).await?.into_inner();
    let Some(Frame::Start(start)) = frames.message().await?.and_then(|f| f.frame) else {
        panic!("no start frame first");
    };
    let d = start.descriptor.unwrap();
    let info = RangeInfo {
        range_id: d.range_id,
        start_key: d.start_key,
        end_key: d.end_key,
        epoch: d.epoch,
        ..Default::default()
    };
    let (mut keys, mut chunks) = (Vec::new(), 0);
    loop {
        match frames.message().await?.and_then(|f| f.frame) {
            Some(Frame::Chunk(c)) => {
                chunks += 1;
                keys.extend(c.pairs.iter().map(|p| p.key.to_vec()));
            }
            Some(Frame::End(end)) => {
                assert!(chunks > 1, "256-byte chunks: several of them");
                assert!(frames.message().await?.is_none(), "nothing after the end");
                return Ok((info, start.applied_index, keys, end.keys));
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_range_streams_one_point_and_refuses_a_stale_version() {
    let mut h = Harness::start().await;
    let l = h.leader(1).await;
    for i in 0..KEYS {
        h.nodes[l].node().put(&key(i), b"v").await.unwrap();
    }
    // From the leader: every key acknowledged before the call, in key order.
    let (info, applied, keys, counted) = backup(&mut h.admins[l], 1, 1).await.unwrap();
    assert_eq!((info.range_id, info.epoch.unwrap().version), (1, 1));
    assert!(applied >= KEYS as u64, "applied index {applied}");
    assert_eq!(keys, (0..KEYS).map(key).collect::<Vec<_>>());
    assert_eq!(counted, KEYS as u64);

    // After a split, version 1 is refused (ABORTED: read the table again); version 2 is the
    // left half, served by a follower too (its ReadIndex makes it hold every write).
    h.admins[l].split(split_by_id(1, &key(100))).await.unwrap();
    let e = backup(&mut h.admins[l], 1, 1).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    let follower = (l + 1) % 3;
    let deadline = Instant::now() + T;
    let (info, _, keys, _) = loop {
        match backup(&mut h.admins[follower], 1, 2).await {
            Ok(answer) => break answer,
            // The follower may not have applied the split yet.
            Err(e) if Instant::now() < deadline && e.code() == Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("backup on a follower: {e:?}"),
        }
    };
    assert_eq!(&info.end_key[..], &key(100)[..]);
    assert_eq!(keys, (0..100).map(key).collect::<Vec<_>>());

    // Unknown range: NOT_FOUND; none named: INVALID_ARGUMENT.
    let e = backup(&mut h.admins[l], 999, 1).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = backup(&mut h.admins[l], 0, 1).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    h.shutdown();
}
