//! An application with its own state machine on the same runtime: a counter store whose
//! commands add to named counters and whose reads go through `StateMachine::read` (the
//! NodeGroup waits for the read's barrier, then asks the state machine), proposed and read on
//! three gRPC nodes, linearizably from a follower as well as from the leader.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::layout::range_layout;
use flotilla::proto::meta::RangeDescriptor;
use flotilla::testing::{local_server_config, node_ids, test_config};
use flotilla::{
    ApplyContext, ApplyError, Error, ProposeOptions, RangeId, ReadConsistency, ReadContext, Server,
    StateMachine, StateRole,
};

const T: Duration = Duration::from_secs(20);

/// Counters: a command is an 8-byte big-endian delta followed by the counter's name; a read
/// is a counter's name; both answer the counter's value as 8 big-endian bytes.
#[derive(Debug)]
struct Counters;

fn value(v: Option<Vec<u8>>) -> Result<i64, ApplyError> {
    match v {
        None => Ok(0),
        Some(v) => Ok(i64::from_be_bytes(
            v.try_into()
                .map_err(|_| ApplyError::from("not a counter"))?,
        )),
    }
}

impl StateMachine for Counters {
    fn apply(
        &self,
        range: &RangeDescriptor,
        _index: u64,
        command: &[u8],
        ctx: &mut ApplyContext<'_>,
    ) -> Result<Vec<u8>, ApplyError> {
        if command.len() < 8 {
            return Err("a command is a delta and a name".into());
        }
        let (delta, name) = command.split_at(8);
        if !range.contains(name) {
            return Err("counter outside the range".into());
        }
        let delta = i64::from_be_bytes(delta.try_into().expect("8 bytes"));
        let now = value(ctx.get(name)?)?
            .checked_add(delta)
            .ok_or(ApplyError::from("overflow"))?;
        ctx.put(name, &now.to_be_bytes());
        Ok(now.to_be_bytes().to_vec())
    }

    fn read(
        &self,
        range: &RangeDescriptor,
        query: &[u8],
        ctx: &ReadContext<'_>,
    ) -> Result<Vec<u8>, ApplyError> {
        if !range.contains(query) {
            return Err("counter outside the range".into());
        }
        Ok(value(ctx.get(query)?)?.to_be_bytes().to_vec())
    }
}

fn add(name: &str, delta: i64) -> Vec<u8> {
    let mut c = delta.to_be_bytes().to_vec();
    c.extend_from_slice(name.as_bytes());
    c
}

fn int(answer: &[u8]) -> i64 {
    i64::from_be_bytes(answer.try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_state_machine_serves_its_own_reads() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Handle::current();
    let builders: Vec<_> = (1..=3)
        .map(|id| {
            Server::bind(local_server_config(test_config(id), dir.path()), rt.clone())
                .unwrap()
                .state_machine(Arc::new(Counters))
        })
        .collect();
    let addrs: Vec<_> = builders
        .iter()
        .map(|b| (b.node_id(), b.raft_addr()))
        .collect();
    for b in &builders {
        for (id, addr) in &addrs {
            if *id != b.node_id() {
                b.set_peer(*id, addr.to_string()).unwrap();
            }
        }
    }
    let servers: Vec<Server> = builders.into_iter().map(|b| b.start().unwrap()).collect();
    let layout = range_layout(1, &node_ids(3));
    for s in &servers {
        s.node().bootstrap_ranges(layout.clone()).unwrap();
    }
    servers[0].node().campaign(RangeId(1)).unwrap();
    let deadline = Instant::now() + T;
    let leader = loop {
        if let Some(i) = servers.iter().position(|s| {
            s.node()
                .status(RangeId(1))
                .is_ok_and(|st| st.role == StateRole::Leader)
        }) {
            break i;
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let node = servers[leader].node();
    let follower = servers[(leader + 1) % 3].node();

    // Proposals answer the new value; reads go through the state machine.
    let mut want = 0;
    for d in [5, -2, 40] {
        want += d;
        let answer = node
            .propose(b"c", add("c", d), ProposeOptions::default())
            .await
            .unwrap();
        assert_eq!(int(&answer), want);
    }
    let read = node
        .read(b"c", b"c", ReadConsistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(int(&read), 43);
    // A linearizable read on a follower sees every acknowledged write.
    let read = follower
        .read(b"c", b"c", ReadConsistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(int(&read), 43);
    let read = node
        .read(b"other", b"other", ReadConsistency::Lease)
        .await
        .unwrap();
    assert_eq!(int(&read), 0);
    // Retries of a request id apply once.
    let opts = ProposeOptions {
        request_id: Some((9, 1)),
        epoch: None,
    };
    for _ in 0..3 {
        let answer = node.propose(b"c", add("c", 100), opts).await.unwrap();
        assert_eq!(int(&answer), 143);
    }
    // The state machine's refusals reach the caller as such.
    let e = node
        .propose(b"c", vec![1, 2], ProposeOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidCommand(_)), "{e}");
    for s in &servers {
        s.shutdown();
    }
}
