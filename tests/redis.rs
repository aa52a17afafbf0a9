//! The Redis protocol over real TCP sockets on three in-process nodes: every command served
//! (RESP2 and RESP3), pipelines batched into one raft entry per range, a split in the middle of
//! pipelines, malformed frames and oversized values, unknown commands and wrong arity; and
//! Debian's `redis-cli` and `redis-benchmark` run unchanged against a node (they must be
//! installed when `CI` is set: `apt-get install redis-tools`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use flotilla::layout::{first_campaigner, range_layout};
use flotilla::testing::{
    bootstrap_ranges_and_system, key_in_range, local_server_config, node_ids, start_servers,
    test_config,
};
use flotilla::{RangeId, Server, StateRole};
use redis_protocol::resp2::types::BytesFrame as Req;
use redis_protocol::resp3::types::BytesFrame as F;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(20);

struct Harness {
    servers: Vec<Server>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(ranges: usize) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let configs = (1..=3)
            .map(|id| {
                let mut c = local_server_config(test_config(id), dir.path());
                c.redis_addr = Some("127.0.0.1:0".parse().unwrap());
                c
            })
            .collect();
        let servers = start_servers(configs, tokio::runtime::Handle::current()).unwrap();
        let members = node_ids(3);
        let layout = range_layout(ranges, &members);
        for s in &servers {
            bootstrap_ranges_and_system(s.node(), layout.clone()).unwrap();
        }
        for d in &layout {
            let n = first_campaigner(d.id(), &members).unwrap();
            servers[n.0 as usize - 1].node().campaign(d.id()).unwrap();
        }
        let h = Harness { servers, _dir: dir };
        for d in &layout {
            h.leader(d.range_id).await;
        }
        h
    }

    async fn leader(&self, range: u64) -> usize {
        let deadline = Instant::now() + T;
        loop {
            if let Some(i) = self.servers.iter().position(|s| {
                s.node()
                    .status(RangeId(range))
                    .is_ok_and(|st| st.role == StateRole::Leader)
            }) {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader for r{range}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn redis(&self, i: usize) -> SocketAddr {
        self.servers[i].redis_addr().unwrap()
    }

    fn shutdown(self) {
        for s in &self.servers {
            s.shutdown();
        }
    }
}

/// A minimal client: commands encoded and replies decoded by `redis-protocol`, in RESP2
/// until it sends `HELLO 3` (RESP2 frames are turned into their RESP3 equivalents, so that the
/// tests look at one frame type).
struct Redis {
    socket: TcpStream,
    buf: BytesMut,
    resp3: bool,
}

fn to3(f: redis_protocol::resp2::types::BytesFrame) -> F {
    use redis_protocol::resp2::types::BytesFrame as R2;
    match f {
        R2::SimpleString(data) => F::SimpleString {
            data,
            attributes: None,
        },
        R2::Error(data) => F::SimpleError {
            data,
            attributes: None,
        },
        R2::Integer(data) => F::Number {
            data,
            attributes: None,
        },
        R2::BulkString(data) => F::BlobString {
            data,
            attributes: None,
        },
        R2::Array(a) => F::Array {
            data: a.into_iter().map(to3).collect(),
            attributes: None,
        },
        R2::Null => F::Null,
    }
}

impl Redis {
    async fn connect(addr: SocketAddr) -> Redis {
        Redis {
            socket: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
            resp3: false,
        }
    }

    /// Sends several commands in one write.
    async fn send(&mut self, commands: &[Vec<Bytes>]) {
        let mut out = BytesMut::new();
        for c in commands {
            if c[0].eq_ignore_ascii_case(b"hello") {
                match c.get(1).map(|v| &v[..]) {
                    Some(b"3") => self.resp3 = true,
                    Some(b"2") => self.resp3 = false,
                    _ => {}
                }
            }
            let frame = Req::Array(c.iter().cloned().map(Req::BulkString).collect());
            redis_protocol::resp2::encode::extend_encode(&mut out, &frame, false).unwrap();
        }
        self.socket.write_all(&out).await.unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).await.unwrap();
    }

    /// The next reply and its bytes; `None` once the server closed the connection.
    async fn reply_raw(&mut self) -> Option<(F, Bytes)> {
        loop {
            if self.resp3 {
                if let Some((f, _, raw)) =
                    redis_protocol::resp3::decode::complete::decode_bytes_mut(&mut self.buf)
                        .unwrap()
                {
                    return Some((f, raw));
                }
            } else if let Some((f, _, raw)) =
                redis_protocol::resp2::decode::decode_bytes_mut(&mut self.buf).unwrap()
            {
                return Some((to3(f), raw));
            }
            let n = tokio::time::timeout(T, self.socket.read_buf(&mut self.buf))
                .await
                .expect("a reply in time")
                .unwrap();
            if n == 0 {
                return None;
            }
        }
    }

    async fn reply(&mut self) -> Option<F> {
        self.reply_raw().await.map(|(f, _)| f)
    }

    async fn call(&mut self, args: &[&str]) -> F {
        self.send(&[cmd(args)]).await;
        self.reply().await.expect("a reply")
    }

    /// The bytes of the reply to one command.
    async fn raw(&mut self, args: &[&str]) -> Vec<u8> {
        self.send(&[cmd(args)]).await;
        self.reply_raw().await.expect("a reply").1.to_vec()
    }
}

fn cmd(args: &[&str]) -> Vec<Bytes> {
    args.iter()
        .map(|a| Bytes::copy_from_slice(a.as_bytes()))
        .collect()
}

fn s(f: &F) -> String {
    match f {
        F::SimpleString { data, .. } | F::BlobString { data, .. } => {
            String::from_utf8_lossy(data).into_owned()
        }
        F::SimpleError { data, .. } => format!("-{}", &**data),
        F::Number { data, .. } => format!(":{data}"),
        F::Null => "(nil)".into(),
        other => format!("{other:?}"),
    }
}

fn items(f: &F) -> Vec<String> {
    match f {
        F::Array { data, .. } => data.iter().map(s).collect(),
        F::Map { data, .. } => data.iter().flat_map(|(k, v)| [s(k), s(v)]).collect(),
        other => panic!("not an aggregate: {other:?}"),
    }
}

fn key(range: u64, suffix: &str) -> String {
    String::from_utf8(key_in_range(range, suffix)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_answers_as_redis_does() {
    let h = Harness::start(2).await;
    let mut r = Redis::connect(h.redis(0)).await;
    let (a, b) = (key(1, "a"), key(2, "b"));
    assert_eq!(s(&r.call(&["PING"]).await), "PONG");
    assert_eq!(s(&r.call(&["ping", "hi"]).await), "hi");
    assert_eq!(s(&r.call(&["ECHO", "x y"]).await), "x y");

    // SET and its conditions; GET.
    assert_eq!(s(&r.call(&["SET", &a, "1"]).await), "OK");
    assert_eq!(s(&r.call(&["GET", &a]).await), "1");
    assert_eq!(s(&r.call(&["GET", "nothing"]).await), "(nil)");
    assert_eq!(s(&r.call(&["SET", &a, "2", "NX"]).await), "(nil)");
    assert_eq!(s(&r.call(&["SET", &b, "1", "nx"]).await), "OK");
    assert_eq!(s(&r.call(&["SET", &a, "3", "XX"]).await), "OK");
    assert_eq!(s(&r.call(&["GET", &a]).await), "3");
    assert_eq!(s(&r.call(&["SET", "absent", "3", "XX"]).await), "(nil)");
    assert_eq!(s(&r.call(&["GET", "absent"]).await), "(nil)");
    let ttl = s(&r.call(&["SET", &a, "4", "EX", "10"]).await);
    assert!(ttl.starts_with("-ERR TTLs are not supported"), "{ttl}");
    assert_eq!(
        s(&r.call(&["SET", &a, "4", "NX", "XX"]).await),
        "-ERR syntax error"
    );
    assert_eq!(s(&r.call(&["GET", &a]).await), "3");

    // SETNX, DEL, EXISTS, MSET, MGET across both ranges.
    assert_eq!(s(&r.call(&["SETNX", &a, "x"]).await), ":0");
    assert_eq!(s(&r.call(&["SETNX", "k-new", "x"]).await), ":1");
    assert_eq!(s(&r.call(&["EXISTS", &a, &b, "k-new", "none"]).await), ":3");
    assert_eq!(s(&r.call(&["DEL", &a, "k-new", "none"]).await), ":2");
    assert_eq!(s(&r.call(&["EXISTS", &a, "k-new"]).await), ":0");
    assert_eq!(s(&r.call(&["MSET", &a, "1", &b, "2"]).await), "OK");
    assert_eq!(
        items(&r.call(&["MGET", &a, "none", &b]).await),
        vec!["1", "(nil)", "2"]
    );
    let odd = s(&r.call(&["MSET", &a, "1", &b]).await);
    assert_eq!(odd, "-ERR wrong number of arguments for 'mset' command");

    // Counters.
    let c = key(2, "counter");
    assert_eq!(s(&r.call(&["INCR", &c]).await), ":1");
    assert_eq!(s(&r.call(&["INCRBY", &c, "10"]).await), ":11");
    assert_eq!(s(&r.call(&["DECR", &c]).await), ":10");
    assert_eq!(s(&r.call(&["DECRBY", &c, "15"]).await), ":-5");
    assert_eq!(s(&r.call(&["GET", &c]).await), "-5");
    let not_int = "-ERR value is not an integer or out of range";
    assert_eq!(s(&r.call(&["SET", &c, "abc"]).await), "OK");
    assert_eq!(s(&r.call(&["INCR", &c]).await), not_int);
    assert_eq!(s(&r.call(&["INCRBY", &c, "x"]).await), not_int);
    assert_eq!(s(&r.call(&["SET", &c, &i64::MAX.to_string()]).await), "OK");
    assert_eq!(
        s(&r.call(&["INCR", &c]).await),
        "-ERR increment or decrement would overflow"
    );

    // SELECT, CONFIG GET (what redis-benchmark asks), COMMAND, CLIENT, INFO.
    assert_eq!(s(&r.call(&["SELECT", "0"]).await), "OK");
    assert_eq!(
        s(&r.call(&["SELECT", "1"]).await),
        "-ERR DB index is out of range"
    );
    assert_eq!(
        items(&r.call(&["CONFIG", "GET", "save"]).await),
        vec!["save", ""]
    );
    assert_eq!(
        items(&r.call(&["CONFIG", "GET", "appendonly"]).await),
        vec!["appendonly", "yes"]
    );
    let count = s(&r.call(&["COMMAND", "COUNT"]).await);
    let all = r.call(&["COMMAND"]).await;
    assert_eq!(count, format!(":{}", items(&all).len()));
    assert!(items(&r.call(&["COMMAND", "DOCS"]).await).is_empty());
    let get = r.call(&["COMMAND", "INFO", "get", "nope"]).await;
    let F::Array { data, .. } = &get else {
        panic!("{get:?}")
    };
    assert_eq!(items(&data[0])[..2], ["get".to_string(), ":2".to_string()]);
    assert_eq!(data[1], F::Null);
    assert_eq!(s(&r.call(&["CLIENT", "SETNAME", "me"]).await), "OK");
    assert_eq!(s(&r.call(&["CLIENT", "GETNAME"]).await), "me");
    assert_eq!(
        s(&r.call(&["CLIENT", "SETINFO", "lib-name", "x"]).await),
        "OK"
    );
    let info = s(&r.call(&["INFO"]).await);
    for want in [
        "redis_version:",
        "node_id:1",
        "ranges:2",
        "leaders:",
        "total_commands_processed:",
    ] {
        assert!(info.contains(want), "{want} missing from {info}");
    }
    let server = s(&r.call(&["INFO", "server"]).await);
    assert!(server.contains("redis_version") && !server.contains("ranges:"));

    // Unknown commands and wrong arity: Redis's own words.
    assert_eq!(
        s(&r.call(&["FOO", "a", "b"]).await),
        "-ERR unknown command 'FOO', with args beginning with: 'a' 'b' "
    );
    assert_eq!(
        s(&r.call(&["GET"]).await),
        "-ERR wrong number of arguments for 'get' command"
    );
    assert_eq!(
        s(&r.call(&["DBSIZE", "x"]).await),
        "-ERR wrong number of arguments for 'dbsize' command"
    );

    // RESP3 after HELLO 3: a map, and RESP3 nulls; back with HELLO 2.
    let hello = r.raw(&["HELLO", "3"]).await;
    assert_eq!(hello[0], b'%', "{}", String::from_utf8_lossy(&hello));
    assert_eq!(r.raw(&["GET", "nothing"]).await, b"_\r\n");
    assert_eq!(
        r.raw(&["CONFIG", "GET", "save"]).await,
        b"%1\r\n$4\r\nsave\r\n$0\r\n\r\n"
    );
    assert_eq!(r.raw(&["HELLO", "2"]).await[0], b'*');
    assert_eq!(r.raw(&["GET", "nothing"]).await, b"$-1\r\n");
    assert_eq!(
        s(&r.call(&["HELLO", "4"]).await),
        "-NOPROTO unsupported protocol version"
    );

    // SCAN: every key once, across ranges, with COUNT and MATCH; DBSIZE counts them.
    let mut want = BTreeSet::new();
    let mut sets = Vec::new();
    for i in 0..25 {
        for range in 1..=2 {
            let k = key(range, &format!("s{i:02}"));
            sets.push(cmd(&["SET", &k, "v"]));
            want.insert(k);
        }
    }
    r.send(&sets).await;
    for _ in 0..sets.len() {
        assert_eq!(s(&r.reply().await.unwrap()), "OK");
    }
    for k in [&a, &b, &c] {
        want.insert(k.clone());
    }
    let mut got = BTreeSet::new();
    let mut cursor = "0".to_string();
    let mut calls = 0;
    loop {
        let page = r.call(&["SCAN", &cursor, "COUNT", "7"]).await;
        let F::Array { data, .. } = &page else {
            panic!("{page:?}")
        };
        cursor = s(&data[0]);
        for k in items(&data[1]) {
            assert!(got.insert(k), "a key twice");
        }
        calls += 1;
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(got, want);
    assert!(calls >= 8);
    let page = r
        .call(&["SCAN", "0", "MATCH", "*/s0?", "COUNT", "1000"])
        .await;
    let F::Array { data, .. } = &page else {
        panic!("{page:?}")
    };
    assert_eq!(s(&data[0]), "0");
    assert_eq!(items(&data[1]).len(), 20);
    assert!(s(&r.call(&["SCAN", "12345"]).await).starts_with("-ERR invalid cursor"));
    // DBSIZE counts this node's replicas without a barrier: it catches up.
    let n = want.len();
    let deadline = Instant::now() + T;
    loop {
        let size = s(&r.call(&["DBSIZE"]).await);
        if size == format!(":{n}") {
            break;
        }
        assert!(Instant::now() < deadline, "DBSIZE {size}, want {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // QUIT answers and closes.
    assert_eq!(s(&r.call(&["QUIT"]).await), "OK");
    assert!(r.reply().await.is_none());
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_is_one_entry_per_range_even_across_a_split() {
    let h = Harness::start(2).await;
    let l1 = h.leader(1).await;
    let l2 = h.leader(2).await;
    let last = |i: usize, range: u64| {
        h.servers[i]
            .node()
            .status(RangeId(range))
            .unwrap()
            .last_index
    };
    let before = (last(l1, 1), last(l2, 2));
    // 200 SETs over both ranges, one write, sent to the leader of range 1 (range 2's share
    // is forwarded): one entry per range.
    let mut r = Redis::connect(h.redis(l1)).await;
    let sets: Vec<_> = (0..200)
        .map(|i| cmd(&["SET", &key(1 + i % 2, &format!("p{i:03}")), &i.to_string()]))
        .collect();
    r.send(&sets).await;
    for _ in 0..200 {
        assert_eq!(s(&r.reply().await.unwrap()), "OK");
    }
    // (One read of the socket normally holds the whole pipeline; two reads would make two
    // batches, never a hundred.)
    let grew = (last(l1, 1) - before.0, last(l2, 2) - before.1);
    assert!(
        grew.0 >= 1 && grew.0 <= 2 && grew.1 >= 1 && grew.1 <= 2,
        "{grew:?}"
    );
    // Reads and writes keep their order inside a pipeline.
    r.send(&[
        cmd(&["SET", &key(1, "o"), "1"]),
        cmd(&["GET", &key(1, "o")]),
        cmd(&["INCR", &key(1, "o")]),
        cmd(&["GET", &key(1, "o")]),
        cmd(&["PING"]),
        cmd(&["DEL", &key(1, "o")]),
        cmd(&["EXISTS", &key(1, "o")]),
    ])
    .await;
    let mut replies = Vec::new();
    for _ in 0..7 {
        replies.push(s(&r.reply().await.unwrap()));
    }
    assert_eq!(replies, ["OK", "1", ":2", "2", "PONG", ":1", ":0"]);

    // Pipelines of writes to range 1 while it splits under them: every write is answered OK
    // and readable (a batch refused because its range changed shape is proposed again).
    let node = h.servers[l1].node().clone();
    let split = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        node.split(RangeId(1), Some(key_in_range(1, "m"))).await
    });
    let mut round = 0;
    loop {
        let sets: Vec<_> = (0..300)
            .map(|i| {
                cmd(&[
                    "SET",
                    &key(
                        1,
                        &format!("{}{round}-{i:03}", if i % 2 == 0 { "a" } else { "z" }),
                    ),
                    "v",
                ])
            })
            .collect();
        r.send(&sets).await;
        for _ in 0..300 {
            let reply = s(&r.reply().await.unwrap());
            assert_eq!(reply, "OK", "round {round}");
        }
        round += 1;
        if split.is_finished() && round >= 3 {
            break;
        }
    }
    split.await.unwrap().unwrap();
    for rnd in 0..round {
        let keys: Vec<String> = (0..300)
            .map(|i| {
                key(
                    1,
                    &format!("{}{rnd}-{i:03}", if i % 2 == 0 { "a" } else { "z" }),
                )
            })
            .collect();
        let mut args = vec!["MGET"];
        args.extend(keys.iter().map(String::as_str));
        let values = items(&r.call(&args).await);
        assert!(values.iter().all(|v| v == "v"), "round {rnd}: {values:?}");
    }
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_the_connection_and_big_values_are_refused() {
    let h = Harness::start(1).await;
    // A malformed frame: an error reply, then the connection closes.
    let mut r = Redis::connect(h.redis(0)).await;
    r.send_raw(b"*1\r\n$abc\r\n").await;
    let e = s(&r.reply().await.unwrap());
    assert!(e.starts_with("-ERR Protocol error"), "{e}");
    assert!(r.reply().await.is_none());
    // A frame that is not an array of strings: the same.
    let mut r = Redis::connect(h.redis(0)).await;
    r.send_raw(b":12\r\n").await;
    let e = s(&r.reply().await.unwrap());
    assert!(e.starts_with("-ERR Protocol error"), "{e}");
    assert!(r.reply().await.is_none());
    // Replies to the good frames before a bad one still come, in order.
    let mut r = Redis::connect(h.redis(0)).await;
    r.send_raw(b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nx\r\n*1\r\n$-5\r\n")
        .await;
    assert_eq!(s(&r.reply().await.unwrap()), "PONG");
    assert_eq!(s(&r.reply().await.unwrap()), "(nil)");
    assert!(s(&r.reply().await.unwrap()).starts_with("-ERR Protocol error"));
    assert!(r.reply().await.is_none());

    // A value above the proposal limit: an error reply, the connection stays usable.
    let limit = test_config(1).max_proposal_bytes as usize;
    let mut r = Redis::connect(h.redis(0)).await;
    let big = "x".repeat(limit + 1);
    let e = s(&r.call(&["SET", "big", &big]).await);
    assert!(e.starts_with("-ERR value too large"), "{e}");
    assert_eq!(s(&r.call(&["GET", "big"]).await), "(nil)");
    assert_eq!(s(&r.call(&["SET", "small", "1"]).await), "OK");
    // A frame far above the limit is refused before it is read whole.
    let mut r = Redis::connect(h.redis(0)).await;
    let huge = limit + (2 << 20);
    r.send_raw(format!("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${huge}\r\n").as_bytes())
        .await;
    let chunk = vec![b'y'; 1 << 20];
    let mut sent = 0;
    while sent < huge {
        if r.socket.write_all(&chunk).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let e = s(&r.reply().await.unwrap());
    assert!(
        e.starts_with("-ERR Protocol error: a command larger than"),
        "{e}"
    );
    h.shutdown();
}

/// The path of a Redis tool, or `None` (outside CI) when it is not installed; in CI a missing
/// tool fails the test.
fn tool(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is not installed: apt-get install redis-tools (CI must run this test)"
        );
        eprintln!("{name} is not installed: skipping (install redis-tools to run it)");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_and_redis_benchmark_work_unchanged() {
    let (Some(cli), Some(bench)) = (tool("redis-cli"), tool("redis-benchmark")) else {
        return;
    };
    let h = Harness::start(2).await;
    let addr = h.redis(1);
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let run = |exe: &std::path::Path, args: &[&str]| {
        let exe = exe.to_path_buf();
        let mut full = vec![
            "-h".to_string(),
            host.clone(),
            "-p".to_string(),
            port.clone(),
        ];
        full.extend(args.iter().map(|a| a.to_string()));
        async move {
            let out = tokio::time::timeout(
                Duration::from_secs(60),
                tokio::process::Command::new(&exe)
                    .args(&full)
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .expect("the tool finished in time")
            .unwrap();
            assert!(out.status.success(), "{exe:?} {full:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    assert_eq!(run(&cli, &["SET", "cli-key", "hello"]).await.trim(), "OK");
    assert_eq!(run(&cli, &["GET", "cli-key"]).await.trim(), "hello");
    assert_eq!(run(&cli, &["-3", "GET", "cli-key"]).await.trim(), "hello");
    assert_eq!(run(&cli, &["INCR", "cli-n"]).await.trim(), "1");
    assert_eq!(run(&cli, &["--scan"]).await.lines().count(), 2);
    let out = run(&cli, &["UNKNOWNCMD", "x"]).await;
    assert!(out.contains("unknown command"), "{out}");
    // The benchmark's own start-up (CONFIG GET) and its pipelined SET/GET load.
    let out = run(
        &bench,
        &[
            "-t", "set,get", "-n", "2000", "-r", "1000", "-c", "4", "-P", "8", "-q",
        ],
    )
    .await;
    assert!(out.contains("SET:") && out.contains("GET:"), "{out}");
    assert!(!out.contains("ERR"), "{out}");
    h.shutdown();
}
