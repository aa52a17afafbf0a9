//! The server side of batching, over gRPC on three in-process nodes: the writes of one frame of
//! the `Batch` stream are proposed as one raft entry per range, each answered under its own id;
//! request ids de-duplicate per request inside a batch entry; a routed request is refused with
//! structured errors (NOT_LEADER naming the leader, EPOCH_NOT_MATCH with the current ranges)
//! instead of being forwarded; a unary multi-put spanning ranges is refused with the ranges.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use flotilla::layout::range_layout;
use flotilla::proto::kv::batch_request::{self, request::Cmd};
use flotilla::proto::kv::batch_response::response::Result as Reply;
use flotilla::proto::kv::kv_client::KvClient;
use flotilla::proto::kv::kv_error::Kind;
use flotilla::proto::kv::{
    BatchRequest, BatchResponse, GetRequest, KeyValue, KvError, MultiPutRequest, PutRequest,
    RouteContext,
};
use flotilla::proto::meta::RangeEpoch;
use flotilla::testing::{key_in_range, node_ids, ServerCluster};
use flotilla::RangeId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(20);

/// Three in-process nodes with `ranges` ranges of the layout, every range led.
async fn start(ranges: usize) -> ServerCluster {
    ServerCluster::start(3, range_layout(ranges, &node_ids(3)), |_| {}).await
}

/// The last index of `range`'s log on server `i`.
fn last_index(h: &ServerCluster, i: usize, range: u64) -> u64 {
    h.servers[i]
        .node()
        .status(RangeId(range))
        .unwrap()
        .last_index
}

/// A `Batch` stream: send frames, read answers.
struct Stream {
    tx: mpsc::Sender<BatchRequest>,
    rx: tonic::Streaming<BatchResponse>,
}

impl Stream {
    async fn open(kv: &mut KvClient<Channel>) -> Stream {
        let (tx, rx) = mpsc::channel(16);
        let rx = kv
            .batch(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Stream { tx, rx }
    }

    /// Sends `requests` as one frame and collects `requests.len()` answers.
    async fn frame(
        &mut self,
        requests: Vec<batch_request::Request>,
    ) -> Vec<flotilla::proto::kv::batch_response::Response> {
        let n = requests.len();
        self.tx.send(BatchRequest { requests }).await.unwrap();
        let mut answers = Vec::new();
        while answers.len() < n {
            let frame = tokio::time::timeout(T, self.rx.message())
                .await
                .expect("answers in time")
                .unwrap()
                .expect("stream open");
            answers.extend(frame.responses);
        }
        answers
    }
}

fn put(id: u64, key: Vec<u8>, value: &str, request: (u64, u64)) -> batch_request::Request {
    batch_request::Request {
        id,
        cmd: Some(Cmd::Put(PutRequest {
            key: key.into(),
            value: value.as_bytes().to_vec().into(),
            client_id: request.0,
            seq: request.1,
            route: None,
        })),
    }
}

async fn read(kv: &mut KvClient<Channel>, key: Vec<u8>) -> Option<Vec<u8>> {
    let r = kv
        .get(GetRequest {
            key: key.into(),
            stale: false,
            route: None,
            consistency: 0,
        })
        .await
        .unwrap()
        .into_inner();
    r.found.then(|| r.value.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_frame_is_one_entry_per_range_and_each_request_its_own_answer() {
    let h = start(2).await;
    let (l1, l2) = (h.leader(1).await, h.leader(2).await);
    let before = (last_index(&h, l1, 1), last_index(&h, l2, 2));
    let mut kv = h.kv(l1);
    let mut s = Stream::open(&mut kv).await;
    // 20 puts to range 1, 10 to range 2 (forwarded if this node does not lead it), in one
    // frame; ids in any order.
    let mut requests = Vec::new();
    for i in 0..30u64 {
        let range = if i % 3 == 2 { 2 } else { 1 };
        let key = key_in_range(range, &i.to_string());
        requests.push(put(1000 - i, key, &format!("v{i}"), (0, 0)));
    }
    let answers = s.frame(requests).await;
    let ids: HashSet<u64> = answers.iter().map(|a| a.id).collect();
    assert_eq!(ids, (971..=1000).collect());
    for a in &answers {
        assert!(a.error.is_none(), "{a:?}");
        assert!(matches!(a.result, Some(Reply::Put(_))), "{a:?}");
    }
    // One entry per range: the leaders' logs grew by one each.
    assert_eq!(last_index(&h, l1, 1), before.0 + 1);
    assert_eq!(last_index(&h, l2, 2), before.1 + 1);
    for i in 0..30u64 {
        let range = if i % 3 == 2 { 2 } else { 1 };
        let v = read(&mut kv, key_in_range(range, &i.to_string())).await;
        assert_eq!(v, Some(format!("v{i}").into_bytes()));
    }
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_deduplicated_per_request_inside_a_batch() {
    let h = start(1).await;
    let mut kv = h.kv(h.leader(1).await);
    let mut s = Stream::open(&mut kv).await;
    let k = key_in_range(1, "k");
    // Request (9, 1) and, in the same entry, its retry with another value: applied once.
    let answers = s
        .frame(vec![
            put(1, k.clone(), "first", (9, 1)),
            put(2, k.clone(), "retry", (9, 1)),
            put(3, key_in_range(1, "other"), "x", (10, 1)),
        ])
        .await;
    assert!(answers.iter().all(|a| a.error.is_none()), "{answers:?}");
    assert_eq!(read(&mut kv, k.clone()).await, Some(b"first".to_vec()));
    // Someone else writes; a late retry of (9, 1) in a later frame is answered, not applied.
    s.frame(vec![put(4, k.clone(), "second", (11, 1))]).await;
    let late = s.frame(vec![put(5, k.clone(), "first", (9, 1))]).await;
    assert!(late[0].error.is_none(), "{late:?}");
    assert_eq!(read(&mut kv, k.clone()).await, Some(b"second".to_vec()));
    // A request older than the client's last applied one is refused.
    s.frame(vec![put(6, k.clone(), "third", (9, 3))]).await;
    let old = s.frame(vec![put(7, k.clone(), "old", (9, 2))]).await;
    let e = old[0].error.as_ref().expect("refused");
    assert_eq!(e.kind(), Kind::InvalidArgument, "{e:?}");
    assert_eq!(read(&mut kv, k).await, Some(b"third".to_vec()));
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_requests_get_structured_redirects() {
    let h = start(2).await;
    let leader = h.leader(1).await;
    let follower = (leader + 1) % 3;
    // Wait until the follower knows the leader, so that it can name it.
    let deadline = Instant::now() + T;
    while h.servers[follower]
        .node()
        .status(RangeId(1))
        .unwrap()
        .leader_node
        .is_none()
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let desc = h.servers[leader]
        .node()
        .range_of(&key_in_range(1, "a"))
        .unwrap();
    let route = |epoch| {
        Some(RouteContext {
            range_id: 1,
            epoch: Some(epoch),
        })
    };
    let routed = |id, route: Option<RouteContext>| batch_request::Request {
        id,
        cmd: Some(Cmd::Put(PutRequest {
            key: key_in_range(1, "a").into(),
            value: b"v".to_vec().into(),
            client_id: 0,
            seq: 0,
            route,
        })),
    };
    // To a follower: NOT_LEADER naming the leader's node, not forwarded.
    let mut kv = h.kv(follower);
    let mut s = Stream::open(&mut kv).await;
    let a = s.frame(vec![routed(1, route(desc.epoch.unwrap()))]).await;
    let e = a[0].error.as_ref().expect("refused");
    assert_eq!(e.kind(), Kind::NotLeader, "{e:?}");
    assert_eq!(e.leader_node_id, h.servers[leader].node_id().0);
    // With a stale epoch, or the wrong range: EPOCH_NOT_MATCH with the current descriptor.
    let stale = RangeEpoch {
        conf_ver: 1,
        version: 0,
    };
    let a = s.frame(vec![routed(2, route(stale))]).await;
    let e = a[0].error.as_ref().expect("refused");
    assert_eq!(e.kind(), Kind::EpochNotMatch, "{e:?}");
    assert_eq!(e.current, vec![desc.clone()]);
    let wrong = Some(RouteContext {
        range_id: 2,
        epoch: desc.epoch,
    });
    let a = s.frame(vec![routed(3, wrong)]).await;
    assert_eq!(a[0].error.as_ref().unwrap().kind(), Kind::EpochNotMatch);
    // The same errors on a unary call: in the status details.
    let status = kv
        .put(PutRequest {
            key: key_in_range(1, "a").into(),
            value: b"v".to_vec().into(),
            client_id: 0,
            seq: 0,
            route: route(desc.epoch.unwrap()),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let e = KvError::from_status(&status).expect("details");
    assert_eq!(e.kind(), Kind::NotLeader);
    assert_eq!(
        flotilla::kv_service::leader_hint(&status),
        Some(h.servers[leader].node_id())
    );
    // A multi-put over two ranges: refused, naming both.
    let status = kv
        .multi_put(MultiPutRequest {
            puts: [key_in_range(1, "x"), key_in_range(2, "y")]
                .into_iter()
                .map(|k| KeyValue {
                    key: k.into(),
                    value: b"v".to_vec().into(),
                })
                .collect(),
            client_id: 0,
            seq: 0,
            route: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Aborted);
    let e = KvError::from_status(&status).expect("details");
    assert_eq!(e.kind(), Kind::EpochNotMatch);
    let ids: Vec<u64> = e.current.iter().map(|d| d.range_id).collect();
    assert_eq!(ids, vec![1, 2]);
    // Without a route, a follower forwards (unary and stream alike).
    kv.put(PutRequest {
        key: key_in_range(1, "f").into(),
        value: b"fwd".to_vec().into(),
        client_id: 0,
        seq: 0,
        route: None,
    })
    .await
    .unwrap();
    let a = s.frame(vec![routed(4, None)]).await;
    assert!(a[0].error.is_none(), "{a:?}");
    h.shutdown();
}
