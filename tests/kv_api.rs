//! The whole KV API over gRPC on three in-process nodes: every call (get at each consistency,
//! put, delete, insert-if-absent, compare-and-set, scan, batch get and write, the same writes
//! on the `Batch` stream and through the client library), sent to a node that may not lead
//! the range (it forwards), and every error path a client can hit: a key outside every range,
//! an oversized value, a bad scan, a compare-and-set that does not match, and retries of a
//! request id that apply once.

use std::time::Duration;

use flotilla::layout::range_layout;
use flotilla::proto::kv::batch_request::{self, request::Cmd};
use flotilla::proto::kv::batch_response::response::Result as Reply;
use flotilla::proto::kv::kv_client::KvClient;
use flotilla::proto::kv::kv_error::Kind;
use flotilla::proto::kv::{
    BatchGetRequest, BatchRequest, BatchWriteRequest, CompareAndSetRequest, DeleteRequest,
    GetRequest, InsertRequest, KvError, PutRequest, ReadConsistency, ScanRequest, Write,
};
use flotilla::testing::{key_in_range, node_ids, test_config, ServerCluster};
use flotilla::RangeId;
use flotilla_client::{Client, ClientConfig};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(20);

/// The end of the last range: keys from here on are in no range.
const END: &[u8] = b"z";

/// Three in-process nodes, `ranges` ranges of the layout, the last one ending at [`END`].
async fn start(ranges: usize) -> ServerCluster {
    let mut layout = range_layout(ranges, &node_ids(3));
    layout.last_mut().unwrap().end_key = END.to_vec().into();
    ServerCluster::start(3, layout, |_| {}).await
}

fn b(s: &str) -> flotilla::proto::Bytes {
    s.as_bytes().to_vec().into()
}

fn k(range: u64, suffix: &str) -> flotilla::proto::Bytes {
    key_in_range(range, suffix).into()
}

async fn get(kv: &mut KvClient<Channel>, key: &[u8], c: ReadConsistency) -> Option<Vec<u8>> {
    let r = kv
        .get(GetRequest {
            key: key.to_vec().into(),
            consistency: c as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    r.found.then(|| r.value.to_vec())
}

async fn put(kv: &mut KvClient<Channel>, key: &[u8], value: &str) {
    kv.put(PutRequest {
        key: key.to_vec().into(),
        value: b(value),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// The kind of the KvError a failed call carries.
fn kind<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (tonic::Code, Kind) {
    let status = r.expect_err("the call must fail");
    let e = KvError::from_status(&status).expect("a KvError in the details");
    (status.code(), e.kind())
}

/// Every pair of `[start, end)`, page by page of `limit`, from node `kv`.
async fn scan_all(
    kv: &mut KvClient<Channel>,
    start: &[u8],
    end: &[u8],
    limit: u32,
) -> (Vec<(Vec<u8>, Vec<u8>)>, usize) {
    let mut out = Vec::new();
    let mut pages = 0;
    let mut continuation = flotilla::proto::Bytes::new();
    loop {
        let r = kv
            .scan(ScanRequest {
                start: start.to_vec().into(),
                end: end.to_vec().into(),
                limit,
                consistency: 0,
                continuation: continuation.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(r.pairs.len() <= limit as usize);
        out.extend(
            r.pairs
                .into_iter()
                .map(|p| (p.key.to_vec(), p.value.to_vec())),
        );
        if r.continuation.is_empty() {
            return (out, pages);
        }
        continuation = r.continuation;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_works_from_any_node() {
    let h = start(2).await;
    // A node that does not lead range 1: its writes are forwarded to the leader.
    let l1 = h.leader(1).await;
    let f = (l1 + 1) % 3;
    let mut kv = h.kv(f);
    let key = k(1, "a");

    // Get at each consistency (a lease read is served by the leader).
    put(&mut kv, &key, "1").await;
    assert_eq!(
        get(&mut kv, &key, ReadConsistency::Linearizable).await,
        Some(b"1".to_vec())
    );
    let mut leader = h.kv(l1);
    assert_eq!(
        get(&mut leader, &key, ReadConsistency::Lease).await,
        Some(b"1".to_vec())
    );
    assert!(tokio::time::timeout(T, async {
        while get(&mut kv, &key, ReadConsistency::Stale).await.is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .is_ok());

    // Insert-if-absent: once.
    let ins = |key: &flotilla::proto::Bytes, v: &str| InsertRequest {
        key: key.clone(),
        value: b(v),
        ..Default::default()
    };
    let r = kv.insert(ins(&k(1, "i"), "x")).await.unwrap().into_inner();
    assert!(r.inserted);
    let r = kv.insert(ins(&k(1, "i"), "y")).await.unwrap().into_inner();
    assert!(!r.inserted);
    assert_eq!(&r.current[..], b"x");

    // Compare-and-set: a mismatch says what is there; a match writes; expected-absent; delete.
    let cas = |expected: Option<&str>, value: Option<&str>| CompareAndSetRequest {
        key: key.clone(),
        expected: expected.map(b),
        value: value.map(b).unwrap_or_default(),
        delete: value.is_none(),
        ..Default::default()
    };
    let r = kv
        .compare_and_set(cas(Some("0"), Some("2")))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.succeeded && r.found);
    assert_eq!(&r.current[..], b"1");
    let r = kv
        .compare_and_set(cas(None, Some("2")))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !r.succeeded && r.found,
        "the key exists: expected-absent fails"
    );
    let r = kv
        .compare_and_set(cas(Some("1"), Some("2")))
        .await
        .unwrap()
        .into_inner();
    assert!(r.succeeded && r.found);
    assert_eq!(&r.current[..], b"2");
    assert_eq!(
        get(&mut kv, &key, ReadConsistency::Linearizable).await,
        Some(b"2".to_vec())
    );
    let r = kv
        .compare_and_set(cas(Some("2"), None))
        .await
        .unwrap()
        .into_inner();
    assert!(r.succeeded && !r.found);
    assert_eq!(
        get(&mut kv, &key, ReadConsistency::Linearizable).await,
        None
    );
    let r = kv
        .compare_and_set(cas(None, Some("3")))
        .await
        .unwrap()
        .into_inner();
    assert!(r.succeeded);
    assert_eq!(
        get(&mut kv, &key, ReadConsistency::Linearizable).await,
        Some(b"3".to_vec())
    );

    // Delete: says whether the key existed and what it held.
    let del = |key: &flotilla::proto::Bytes| DeleteRequest {
        key: key.clone(),
        ..Default::default()
    };
    let r = kv.delete(del(&key)).await.unwrap().into_inner();
    assert!(r.deleted);
    assert_eq!(&r.previous[..], b"3");
    let r = kv.delete(del(&key)).await.unwrap().into_inner();
    assert!(!r.deleted);
    assert_eq!(
        get(&mut kv, &key, ReadConsistency::Linearizable).await,
        None
    );

    // Batch write and batch get across both ranges.
    let w = |key: flotilla::proto::Bytes, v: Option<&str>| Write {
        key,
        value: v.map(b),
    };
    kv.batch_write(BatchWriteRequest {
        writes: vec![
            w(k(1, "b1"), Some("1")),
            w(k(2, "b2"), Some("2")),
            w(k(1, "i"), None),
            w(k(2, "b3"), Some("3")),
            w(k(2, "b3"), Some("4")),
        ],
        client_id: 0,
        seq: 0,
    })
    .await
    .unwrap();
    let r = kv
        .batch_get(BatchGetRequest {
            keys: vec![k(2, "b3"), k(1, "b1"), k(1, "i"), k(2, "b2"), k(2, "none")],
            consistency: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<Option<&[u8]>> = r
        .values
        .iter()
        .map(|v| v.found.then_some(&v.value[..]))
        .collect();
    assert_eq!(
        got,
        vec![Some(&b"4"[..]), Some(b"1"), None, Some(b"2"), None]
    );

    // The Batch stream carries the new writes too.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = kv
        .batch(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let request = |id, cmd| batch_request::Request { id, cmd: Some(cmd) };
    tx.send(BatchRequest {
        requests: vec![
            request(1, Cmd::Delete(del(&k(1, "b1")))),
            request(2, Cmd::Insert(ins(&k(2, "s"), "v"))),
            request(
                3,
                Cmd::Cas(CompareAndSetRequest {
                    key: k(2, "b2"),
                    expected: Some(b("2")),
                    value: b("22"),
                    ..Default::default()
                }),
            ),
        ],
    })
    .await
    .unwrap();
    let mut replies = Vec::new();
    while replies.len() < 3 {
        let frame = tokio::time::timeout(T, answers.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        replies.extend(frame.responses);
    }
    replies.sort_by_key(|r| r.id);
    assert!(
        matches!(&replies[0].result, Some(Reply::Delete(d)) if d.deleted),
        "{replies:?}"
    );
    assert!(
        matches!(&replies[1].result, Some(Reply::Insert(i)) if i.inserted),
        "{replies:?}"
    );
    assert!(
        matches!(&replies[2].result, Some(Reply::Cas(c)) if c.succeeded),
        "{replies:?}"
    );
    drop(tx);
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_crosses_ranges_and_a_split_with_a_limit_and_continuations() {
    let h = start(2).await;
    let mut kv = h.kv(0);
    let mut want = Vec::new();
    for r in 1..=2u64 {
        for i in 0..15 {
            let key = key_in_range(r, &format!("{i:02}"));
            put(&mut kv, &key, &format!("{r}-{i}")).await;
            want.push((key, format!("{r}-{i}").into_bytes()));
        }
    }
    // Split range 2 in the middle of its keys: three ranges under the scan now.
    let l2 = h.leader(2).await;
    let (left, right) = h.servers[l2]
        .node()
        .split(RangeId(2), Some(key_in_range(2, "07")))
        .await
        .unwrap();
    assert_eq!(left.end_key, right.start_key);
    for s in &h.servers {
        let node = s.node().clone();
        let id = right.range_id;
        assert!(
            flotilla::testing::wait_until(T, || node
                .range_of(&key_in_range(2, "09"))
                .is_ok_and(|d| d.range_id == id))
            .await
        );
    }
    // The new range serves once it has elected its leader.
    h.leader(right.range_id).await;
    for node in 0..3 {
        let mut kv = h.kv(node);
        // Pages of 7 over 30 keys in 3 ranges: every key once, in order.
        let (got, pages) = scan_all(&mut kv, b"", END, 7).await;
        assert_eq!(got, want);
        assert!(pages >= 5, "{pages} pages");
        // A sub-interval that starts and ends inside ranges.
        let (from, to) = (key_in_range(1, "10"), key_in_range(2, "10"));
        let (got, _) = scan_all(&mut kv, &from, &to, 4).await;
        let sub: Vec<_> = want
            .iter()
            .filter(|(k, _)| k[..] >= from[..] && k[..] < to[..])
            .cloned()
            .collect();
        assert_eq!(got, sub);
        assert_eq!(got.len(), 15);
    }
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_to_do_next_and_retries_apply_once() {
    let h = start(2).await;
    let mut kv = h.kv(1);

    // A key in no range: NOT_FOUND / KEY_NOT_IN_RANGE, for reads and writes alike.
    let outside = b("zz");
    let r = kv
        .put(PutRequest {
            key: outside.clone(),
            value: b("v"),
            ..Default::default()
        })
        .await;
    assert_eq!(kind(r), (tonic::Code::NotFound, Kind::KeyNotInRange));
    let r = kv
        .get(GetRequest {
            key: outside.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(kind(r), (tonic::Code::NotFound, Kind::KeyNotInRange));
    let r = kv
        .delete(DeleteRequest {
            key: outside.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(kind(r), (tonic::Code::NotFound, Kind::KeyNotInRange));
    // A scan that runs off the last range.
    let r = kv
        .scan(ScanRequest {
            start: k(2, ""),
            end: b("zzz"),
            ..Default::default()
        })
        .await;
    assert_eq!(kind(r), (tonic::Code::NotFound, Kind::KeyNotInRange));

    // A value above the proposal limit: INVALID_ARGUMENT, and nothing written.
    let limit = test_config(1).max_proposal_bytes as usize;
    let r = kv
        .put(PutRequest {
            key: k(1, "big"),
            value: vec![7u8; limit + 1].into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        kind(r),
        (tonic::Code::InvalidArgument, Kind::InvalidArgument)
    );
    let r = kv
        .compare_and_set(CompareAndSetRequest {
            key: k(1, "big"),
            value: vec![7u8; limit + 1].into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        kind(r),
        (tonic::Code::InvalidArgument, Kind::InvalidArgument)
    );
    assert_eq!(
        get(&mut kv, &k(1, "big"), ReadConsistency::Linearizable).await,
        None
    );

    // A scan whose interval is empty, or whose continuation is not inside it.
    let r = kv
        .scan(ScanRequest {
            start: b("b"),
            end: b("a"),
            ..Default::default()
        })
        .await;
    assert_eq!(
        kind(r),
        (tonic::Code::InvalidArgument, Kind::InvalidArgument)
    );
    let r = kv
        .scan(ScanRequest {
            start: b("b"),
            end: b("c"),
            continuation: b("d"),
            ..Default::default()
        })
        .await;
    assert_eq!(
        kind(r),
        (tonic::Code::InvalidArgument, Kind::InvalidArgument)
    );

    // A compare-and-set that does not match is an answer, not an error; nothing changes.
    put(&mut kv, &k(1, "c"), "1").await;
    let r = kv
        .compare_and_set(CompareAndSetRequest {
            key: k(1, "c"),
            expected: Some(b("9")),
            value: b("2"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.succeeded);
    assert_eq!(&r.current[..], b"1");
    assert_eq!(
        get(&mut kv, &k(1, "c"), ReadConsistency::Linearizable).await,
        Some(b"1".to_vec())
    );

    // A retried delete (same request id) after the key was written again: the recorded
    // answer, not a second delete.
    let del = DeleteRequest {
        key: k(1, "c"),
        client_id: 77,
        seq: 1,
        route: None,
    };
    assert!(kv.delete(del.clone()).await.unwrap().into_inner().deleted);
    put(&mut kv, &k(1, "c"), "again").await;
    let r = kv.delete(del).await.unwrap().into_inner();
    assert!(r.deleted, "the recorded answer of the first attempt");
    assert_eq!(
        get(&mut kv, &k(1, "c"), ReadConsistency::Linearizable).await,
        Some(b"again".to_vec())
    );
    // The same for a batch write over two ranges.
    let batch = BatchWriteRequest {
        writes: vec![
            Write {
                key: k(1, "w"),
                value: None,
            },
            Write {
                key: k(2, "w"),
                value: Some(b("first")),
            },
        ],
        client_id: 78,
        seq: 1,
    };
    put(&mut kv, &k(1, "w"), "x").await;
    kv.batch_write(batch.clone()).await.unwrap();
    put(&mut kv, &k(1, "w"), "y").await;
    put(&mut kv, &k(2, "w"), "second").await;
    kv.batch_write(batch).await.unwrap();
    assert_eq!(
        get(&mut kv, &k(1, "w"), ReadConsistency::Linearizable).await,
        Some(b"y".to_vec())
    );
    assert_eq!(
        get(&mut kv, &k(2, "w"), ReadConsistency::Linearizable).await,
        Some(b"second".to_vec())
    );
    // A lease read on a follower is redirected to the leader.
    let l1 = h.leader(1).await;
    let mut follower = h.kv((l1 + 1) % 3);
    let r = follower
        .get(GetRequest {
            key: k(1, "c"),
            consistency: ReadConsistency::Lease as i32,
            ..Default::default()
        })
        .await;
    assert_eq!(kind(r), (tonic::Code::Unavailable, Kind::NotLeader));
    h.shutdown();
}

/// Unary writes that many callers send at once are proposed together (one queue per node, one
/// entry per range): each still gets its own answer (a compare-and-set that does not match
/// beside puts that apply, a key in no range beside keys in ranges), and copies of one request
/// id sent together apply once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_writes_sent_together_each_get_their_own_answer() {
    let h = start(2).await;
    put(&mut h.kv(1), &k(1, "cas"), "old").await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..48u64 {
        let mut kv = h.kv((i % 3) as usize);
        calls.spawn(async move {
            let answer = match i % 4 {
                0 | 1 => kv
                    .put(PutRequest {
                        key: k(1 + i % 2, &format!("c{i}")),
                        value: b(&format!("v{i}")),
                        ..Default::default()
                    })
                    .await
                    .map(|_| true),
                2 => kv
                    .compare_and_set(CompareAndSetRequest {
                        key: k(1, "cas"),
                        expected: Some(b("not this")),
                        value: b("new"),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().succeeded),
                _ => kv
                    .put(PutRequest {
                        key: b("zz"),
                        value: b("v"),
                        ..Default::default()
                    })
                    .await
                    .map(|_| true),
            };
            (i, answer)
        });
        // Copies of one request id, with different values: one applies.
        let mut kv = h.kv((i % 3) as usize);
        calls.spawn(async move {
            let r = kv
                .put(PutRequest {
                    key: k(2, "once"),
                    value: b(&format!("copy{i}")),
                    client_id: 99,
                    seq: 1,
                    ..Default::default()
                })
                .await
                .map(|_| true);
            (1000 + i, r)
        });
    }
    while let Some(joined) = calls.join_next().await {
        let (i, answer) = joined.unwrap();
        match i {
            i if i >= 1000 => assert!(answer.unwrap(), "copy {i}"),
            i if i % 4 < 2 => assert!(answer.unwrap(), "put {i}"),
            i if i % 4 == 2 => assert!(!answer.unwrap(), "the CAS {i} must not match"),
            i => assert_eq!(
                kind(answer.map(tonic::Response::new)),
                (tonic::Code::NotFound, Kind::KeyNotInRange),
                "write {i}"
            ),
        }
    }
    let mut kv = h.kv(1);
    let lin = ReadConsistency::Linearizable;
    for i in (0..48u64).filter(|i| i % 4 < 2) {
        let v = get(&mut kv, &k(1 + i % 2, &format!("c{i}")), lin).await;
        assert_eq!(v, Some(format!("v{i}").into_bytes()), "put {i}");
    }
    assert_eq!(get(&mut kv, &k(1, "cas"), lin).await, Some(b"old".to_vec()));
    // Every copy answered ok, and the value is the one copy that applied.
    let once = get(&mut kv, &k(2, "once"), lin).await.unwrap();
    assert!(once.starts_with(b"copy"), "{once:?}");
    // A later copy of the same id is answered from the record, not applied.
    kv.put(PutRequest {
        key: k(2, "once"),
        value: b("late copy"),
        client_id: 99,
        seq: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(get(&mut kv, &k(2, "once"), lin).await, Some(once));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_library_has_every_call() {
    let h = start(2).await;
    let endpoints: Vec<String> = h
        .servers
        .iter()
        .map(|s| s.client_addr().to_string())
        .collect();
    let c = Client::connect(ClientConfig::new(endpoints)).await.unwrap();
    let key = k(1, "x");
    c.put(key.clone(), "1").await.unwrap();
    let r = c.insert_if_absent(key.clone(), "2").await.unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.current.as_deref(), Some(&b"1"[..]));
    let r = c
        .compare_and_set(key.clone(), Some(b("1")), Some(b("3")))
        .await
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.current.as_deref(), Some(&b"3"[..]));
    let r = c
        .compare_and_set(key.clone(), Some(b("1")), None)
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.current.as_deref(), Some(&b"3"[..]));
    c.put(k(2, "y"), "y").await.unwrap();
    let values = c
        .batch_get([key.clone(), k(2, "y"), k(2, "n")])
        .await
        .unwrap();
    assert_eq!(values, vec![Some(b("3")), Some(b("y")), None]);
    let page = c.scan("", "z", 1, None).await.unwrap();
    assert_eq!(page.pairs, vec![(key.clone(), b("3"))]);
    let page = c.scan("", "z", 10, page.continuation).await.unwrap();
    assert_eq!(page.pairs, vec![(k(2, "y"), b("y"))]);
    assert_eq!(page.continuation, None);
    assert!(c.delete(key.clone()).await.unwrap());
    assert!(!c.delete(key.clone()).await.unwrap());
    assert_eq!(c.get(key).await.unwrap(), None);
    let e = c.scan("b", "a", 0, None).await.unwrap_err();
    assert!(
        matches!(e, flotilla_client::Error::InvalidRequest(_)),
        "{e}"
    );
    h.shutdown();
}
