//! The commands of the Redis protocol: each request frame is parsed into a [`Step`] (an
//! answer at once, a write, a read, or a command that runs on its own), and a pipeline's steps
//! are run in order, consecutive writes together (one `kv_batch`: one raft entry per range)
//! and consecutive reads together (one `get_many`: one read barrier per range), so that a
//! pipeline of N commands costs a few proposals rather than N. A write never overtakes a read
//! before it or the reverse: a run of one kind finishes before the next run starts.

use bytes::Bytes;
use flotilla_proto::command::{
    kv_request, CompareAndSet, Delete, Increment, InsertIfAbsent, KvRequest, KvResponse, Put,
};
use flotilla_proto::Message as _;
use flotilla_runtime::{Error, KvProposal, ProposeOptions, ReadConsistency};

use super::reply::Reply;
use super::{Conn, Shared};

/// Times a run is proposed again when nothing of it applied: its range split or merged under
/// it, or has no leader yet (a range just split off elects one), or pushed back (busy). The
/// waits between tries double from 5 ms up to 100 ms: a few seconds in all.
const MAX_RESHAPES: usize = 32;

/// Whether `e` says that nothing was applied and a moment later may succeed.
fn worth_retrying(e: &Error) -> bool {
    matches!(
        e,
        Error::EpochNotMatch { .. } | Error::NotLeader { .. } | Error::Busy(_)
    )
}

/// The wait before try `round` (from 1).
async fn backoff(round: usize) {
    let ms = (5u64 << round.min(5)).min(100);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

/// Most keys a SCAN call looks at (its COUNT is capped to this).
const MAX_SCAN_COUNT: usize = 10_000;

/// How a write's answers become its reply.
#[derive(Debug, Clone, Copy)]
pub(crate) enum WriteReply {
    /// `+OK` once every part applied (SET, MSET).
    Ok,
    /// SETNX: `:1` if inserted, else `:0`.
    Inserted,
    /// SET NX: `+OK` if inserted, else null.
    InsertedOrNull,
    /// DEL: how many keys existed.
    Deleted,
    /// INCR and friends: the new value.
    Counter,
}

/// How a read's values become its reply.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ReadReply {
    Get,
    MGet,
    Exists,
}

/// A command that runs on its own, in order.
#[derive(Debug, Clone)]
pub(crate) enum Alone {
    /// SET XX: read, then compare-and-set while the key exists.
    SetIfExists(Bytes, Bytes),
    Scan {
        cursor: u64,
        pattern: Option<Bytes>,
        count: usize,
        /// `TYPE` other than string: nothing matches.
        none: bool,
    },
    DbSize,
    Info(Option<String>),
}

/// One parsed request.
#[derive(Debug)]
pub(crate) enum Step {
    /// Answered without touching the data.
    Done(Reply),
    Write(Vec<KvRequest>, WriteReply),
    Read(Vec<Bytes>, ReadReply),
    Alone(Alone),
    /// Answer, then close the connection (QUIT).
    Quit,
}

fn put(key: Bytes, value: Bytes) -> KvRequest {
    KvRequest {
        op: Some(kv_request::Op::Put(Put { key, value })),
    }
}

fn incr(key: Bytes, delta: i64) -> Step {
    Step::Write(
        vec![KvRequest {
            op: Some(kv_request::Op::Incr(Increment { key, delta })),
        }],
        WriteReply::Counter,
    )
}

fn syntax_error() -> Step {
    Step::Done(Reply::err("ERR syntax error"))
}

fn not_an_integer() -> Step {
    Step::Done(Reply::err("ERR value is not an integer or out of range"))
}

/// `b` as an i64, as Redis parses command arguments.
fn integer(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// The commands served, with Redis's arity (negative: at least that many arguments, the name
/// included) and flags, for COMMAND and the arity check.
pub(crate) const COMMANDS: &[(&str, i64, &[&str])] = &[
    ("get", 2, &["readonly", "fast"]),
    ("set", -3, &["write", "denyoom"]),
    ("setnx", 3, &["write", "denyoom", "fast"]),
    ("del", -2, &["write"]),
    ("exists", -2, &["readonly", "fast"]),
    ("mget", -2, &["readonly", "fast"]),
    ("mset", -3, &["write", "denyoom"]),
    ("incr", 2, &["write", "denyoom", "fast"]),
    ("decr", 2, &["write", "denyoom", "fast"]),
    ("incrby", 3, &["write", "denyoom", "fast"]),
    ("decrby", 3, &["write", "denyoom", "fast"]),
    ("scan", -2, &["readonly"]),
    ("dbsize", 1, &["readonly", "fast"]),
    ("ping", -1, &["fast"]),
    ("echo", 2, &["fast"]),
    ("info", -1, &["loading", "stale"]),
    ("select", 2, &["loading", "stale", "fast"]),
    ("hello", -1, &["noscript", "loading", "stale", "fast"]),
    ("command", -1, &["loading", "stale"]),
    ("client", -2, &["loading", "stale"]),
    ("config", -2, &["admin", "loading", "stale"]),
    ("quit", -1, &["loading", "stale", "fast"]),
];

/// The first key, last key and step of a command's keys, for COMMAND.
fn key_spec(name: &str) -> (i64, i64, i64) {
    match name {
        "get" | "set" | "setnx" | "incr" | "decr" | "incrby" | "decrby" => (1, 1, 1),
        "del" | "exists" | "mget" => (1, -1, 1),
        "mset" => (1, -1, 2),
        _ => (0, 0, 0),
    }
}

/// Parses one request (its arguments, the command name first) into a step; commands that only
/// touch the connection (HELLO, CLIENT, SELECT) act on `conn` here, in order.
pub(crate) fn parse(args: Vec<Bytes>, conn: &mut Conn) -> Step {
    let Some(first) = args.first() else {
        return Step::Done(Reply::err("ERR empty command"));
    };
    let name = String::from_utf8_lossy(first).to_ascii_lowercase();
    let Some(&(_, arity, _)) = COMMANDS.iter().find(|(n, _, _)| *n == name) else {
        let mut msg = format!(
            "ERR unknown command '{}', with args beginning with: ",
            String::from_utf8_lossy(&first[..first.len().min(128)])
        );
        for a in args.iter().skip(1).take(16) {
            msg.push_str(&format!(
                "'{}' ",
                String::from_utf8_lossy(&a[..a.len().min(128)])
            ));
        }
        return Step::Done(Reply::err(msg));
    };
    let n = args.len() as i64;
    if (arity > 0 && n != arity) || (arity < 0 && n < -arity) {
        return Step::Done(Reply::err(format!(
            "ERR wrong number of arguments for '{name}' command"
        )));
    }
    let mut args = args.into_iter().skip(1);
    let mut next = || args.next().unwrap_or_default();
    match name.as_str() {
        "get" => Step::Read(vec![next()], ReadReply::Get),
        "mget" => Step::Read(args.collect(), ReadReply::MGet),
        "exists" => Step::Read(args.collect(), ReadReply::Exists),
        "set" => {
            let (key, value) = (next(), next());
            parse_set(key, value, args.collect())
        }
        "setnx" => {
            let (key, value) = (next(), next());
            Step::Write(
                vec![KvRequest {
                    op: Some(kv_request::Op::Insert(InsertIfAbsent { key, value })),
                }],
                WriteReply::Inserted,
            )
        }
        "mset" => {
            let rest: Vec<Bytes> = args.collect();
            if !rest.len().is_multiple_of(2) {
                return Step::Done(Reply::err(
                    "ERR wrong number of arguments for 'mset' command",
                ));
            }
            let puts = rest
                .chunks(2)
                .map(|kv| put(kv[0].clone(), kv[1].clone()))
                .collect();
            Step::Write(puts, WriteReply::Ok)
        }
        "del" => Step::Write(
            args.map(|key| KvRequest {
                op: Some(kv_request::Op::Delete(Delete { key })),
            })
            .collect(),
            WriteReply::Deleted,
        ),
        "incr" => incr(next(), 1),
        "decr" => incr(next(), -1),
        "incrby" | "decrby" => {
            let key = next();
            let Some(by) = integer(&next()) else {
                return not_an_integer();
            };
            let delta = if name == "decrby" {
                match by.checked_neg() {
                    Some(d) => d,
                    None => return Step::Done(Reply::err("ERR decrement would overflow")),
                }
            } else {
                by
            };
            incr(key, delta)
        }
        "scan" => parse_scan(next(), args.collect(), conn),
        "dbsize" => Step::Alone(Alone::DbSize),
        "info" => Step::Alone(Alone::Info(
            args.next()
                .map(|s| String::from_utf8_lossy(&s).to_ascii_lowercase()),
        )),
        "ping" => Step::Done(match args.next() {
            None => Reply::Status("PONG"),
            Some(msg) if args.next().is_none() => Reply::bulk(msg),
            Some(_) => Reply::err("ERR wrong number of arguments for 'ping' command"),
        }),
        "echo" => Step::Done(Reply::bulk(next())),
        "select" => Step::Done(match integer(&next()) {
            Some(0) => Reply::ok(),
            Some(_) => Reply::err("ERR DB index is out of range"),
            None => Reply::err("ERR value is not an integer or out of range"),
        }),
        "hello" => Step::Done(hello(args.collect(), conn)),
        "command" => Step::Done(command(args.collect())),
        "client" => Step::Done(client(args.collect(), conn)),
        "config" => Step::Done(config(args.collect())),
        "quit" => Step::Quit,
        // Every name of COMMANDS is matched above.
        _ => Step::Done(Reply::err(format!("ERR unknown command '{name}'"))),
    }
}

fn parse_set(key: Bytes, value: Bytes, options: Vec<Bytes>) -> Step {
    let (mut nx, mut xx) = (false, false);
    for o in options {
        match o.to_ascii_uppercase().as_slice() {
            b"NX" => nx = true,
            b"XX" => xx = true,
            b"EX" | b"PX" | b"EXAT" | b"PXAT" | b"KEEPTTL" => {
                return Step::Done(Reply::err(
                    "ERR TTLs are not supported: Flotilla keys do not expire \
                     (EX, PX, EXAT, PXAT and KEEPTTL are refused)",
                ))
            }
            b"GET" => return Step::Done(Reply::err("ERR SET with GET is not supported")),
            _ => return syntax_error(),
        }
    }
    match (nx, xx) {
        (true, true) => syntax_error(),
        (true, false) => Step::Write(
            vec![KvRequest {
                op: Some(kv_request::Op::Insert(InsertIfAbsent { key, value })),
            }],
            WriteReply::InsertedOrNull,
        ),
        (false, true) => Step::Alone(Alone::SetIfExists(key, value)),
        (false, false) => Step::Write(vec![put(key, value)], WriteReply::Ok),
    }
}

fn parse_scan(cursor: Bytes, options: Vec<Bytes>, conn: &Conn) -> Step {
    let Some(cursor) = std::str::from_utf8(&cursor)
        .ok()
        .and_then(|c| c.parse::<u64>().ok())
    else {
        return Step::Done(Reply::err("ERR invalid cursor"));
    };
    if cursor != 0 && !conn.cursors.iter().any(|(c, _)| *c == cursor) {
        return Step::Done(Reply::err(
            "ERR invalid cursor: a SCAN cursor is valid on the connection that got it",
        ));
    }
    let (mut pattern, mut count, mut none) = (None, 10usize, false);
    let mut it = options.into_iter();
    while let Some(o) = it.next() {
        let Some(v) = it.next() else {
            return syntax_error();
        };
        match o.to_ascii_uppercase().as_slice() {
            b"MATCH" => pattern = Some(v),
            b"COUNT" => match integer(&v) {
                Some(c) if c >= 1 => count = (c as usize).min(MAX_SCAN_COUNT),
                Some(_) => return syntax_error(),
                None => return not_an_integer(),
            },
            b"TYPE" => none = !v.eq_ignore_ascii_case(b"string"),
            _ => return syntax_error(),
        }
    }
    Step::Alone(Alone::Scan {
        cursor,
        pattern,
        count,
        none,
    })
}

fn hello(args: Vec<Bytes>, conn: &mut Conn) -> Reply {
    let mut it = args.into_iter();
    if let Some(v) = it.next() {
        match integer(&v) {
            Some(v @ (2 | 3)) => conn.resp = v as u8,
            Some(_) => return Reply::err("NOPROTO unsupported protocol version"),
            None => return Reply::err("ERR Protocol version is not an integer or out of range"),
        }
    }
    while let Some(o) = it.next() {
        match o.to_ascii_uppercase().as_slice() {
            b"SETNAME" => match it.next() {
                Some(name) => conn.name = Some(name),
                None => return Reply::err("ERR syntax error"),
            },
            b"AUTH" => return Reply::err("ERR AUTH is not supported: Flotilla has no Redis users"),
            _ => return Reply::err("ERR syntax error"),
        }
    }
    let s = |x: &str| Reply::bulk(Bytes::copy_from_slice(x.as_bytes()));
    Reply::Map(vec![
        (s("server"), s("flotilla")),
        (s("version"), s(super::REDIS_VERSION)),
        (s("proto"), Reply::Int(i64::from(conn.resp))),
        (s("id"), Reply::Int(conn.id as i64)),
        (s("mode"), s("standalone")),
        (s("role"), s("master")),
        (s("modules"), Reply::Array(Vec::new())),
    ])
}

fn command_entry(name: &str) -> Option<Reply> {
    let &(name, arity, flags) = COMMANDS.iter().find(|(n, _, _)| *n == name)?;
    let (first, last, step) = key_spec(name);
    Some(Reply::Array(vec![
        Reply::bulk(Bytes::from_static(name.as_bytes())),
        Reply::Int(arity),
        Reply::Array(flags.iter().copied().map(Reply::Status).collect()),
        Reply::Int(first),
        Reply::Int(last),
        Reply::Int(step),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
    ]))
}

fn command(args: Vec<Bytes>) -> Reply {
    let Some(sub) = args.first() else {
        return Reply::Array(COMMANDS.iter().filter_map(|c| command_entry(c.0)).collect());
    };
    match sub.to_ascii_uppercase().as_slice() {
        b"COUNT" => Reply::Int(COMMANDS.len() as i64),
        // No documentation is served: clients (redis-cli) then fall back to their own.
        b"DOCS" => Reply::Map(Vec::new()),
        b"LIST" => Reply::Array(
            COMMANDS
                .iter()
                .map(|c| Reply::bulk(Bytes::from_static(c.0.as_bytes())))
                .collect(),
        ),
        b"INFO" => Reply::Array(
            args[1..]
                .iter()
                .map(|n| {
                    command_entry(&String::from_utf8_lossy(n).to_ascii_lowercase())
                        .unwrap_or(Reply::null())
                })
                .collect(),
        ),
        _ => Reply::err(format!(
            "ERR unknown subcommand '{}'. Try COMMAND HELP.",
            String::from_utf8_lossy(sub)
        )),
    }
}

fn client(args: Vec<Bytes>, conn: &mut Conn) -> Reply {
    let sub = args[0].to_ascii_uppercase();
    match (sub.as_slice(), args.len()) {
        (b"SETNAME", 2) => {
            if args[1].iter().any(|&c| c <= b' ' || c > b'~') {
                return Reply::err(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                );
            }
            conn.name = Some(args[1].clone()).filter(|n| !n.is_empty());
            Reply::ok()
        }
        (b"GETNAME", 1) => Reply::Bulk(conn.name.clone()),
        (b"SETINFO", 3) => Reply::ok(),
        (b"ID", 1) => Reply::Int(conn.id as i64),
        _ => Reply::err(format!(
            "ERR unknown subcommand or wrong number of arguments for '{}'. Try CLIENT HELP.",
            String::from_utf8_lossy(&args[0])
        )),
    }
}

/// The configuration parameters CONFIG GET answers (what tools ask for at start), as Redis
/// would name them for a server that persists every write before answering.
const CONFIG: &[(&str, &str)] = &[
    ("save", ""),
    ("appendonly", "yes"),
    ("appendfsync", "always"),
    ("databases", "1"),
    ("maxmemory", "0"),
];

fn config(args: Vec<Bytes>) -> Reply {
    match args[0].to_ascii_uppercase().as_slice() {
        b"GET" if args.len() >= 2 => {
            let mut pairs = Vec::new();
            for (name, value) in CONFIG {
                if args[1..].iter().any(|p| glob(p, name.as_bytes())) {
                    pairs.push((
                        Reply::bulk(Bytes::from_static(name.as_bytes())),
                        Reply::bulk(Bytes::from_static(value.as_bytes())),
                    ));
                }
            }
            Reply::Map(pairs)
        }
        b"GET" => Reply::err("ERR wrong number of arguments for 'config|get' command"),
        b"RESETSTAT" => Reply::ok(),
        _ => Reply::err(format!(
            "ERR CONFIG {} is not supported",
            String::from_utf8_lossy(&args[0])
        )),
    }
}

/// Redis's glob-style match (`*`, `?`, `[abc]`, `[a-z]`, `[^a]`, `\x`), case-sensitive.
pub(crate) fn glob(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    // Where the last `*` was and which input position it is trying to cover.
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, i));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    i += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, len)) = class(&pattern[p..], s[i]) {
                        if matched {
                            p += len;
                            i += 1;
                            continue;
                        }
                    } else if s[i] == b'[' {
                        p += 1;
                        i += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if pattern[p + 1] == s[i] {
                        p += 2;
                        i += 1;
                        continue;
                    }
                }
                c => {
                    if c == s[i] {
                        p += 1;
                        i += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((sp, si)) => {
                p = sp + 1;
                i = si + 1;
                star = Some((sp, si + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether `c` is in the class at the start of `pattern` (`[...]`), and the class's length;
/// `None` if the class is not closed.
fn class(pattern: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut j = 1;
    let negate = pattern.get(1) == Some(&b'^');
    if negate {
        j += 1;
    }
    let mut matched = false;
    let mut first = true;
    while j < pattern.len() {
        let x = pattern[j];
        if x == b']' && !first {
            return Some((matched != negate, j + 1));
        }
        first = false;
        if x == b'\\' && j + 1 < pattern.len() {
            matched |= pattern[j + 1] == c;
            j += 2;
        } else if j + 2 < pattern.len() && pattern[j + 1] == b'-' && pattern[j + 2] != b']' {
            let (lo, hi) = (x.min(pattern[j + 2]), x.max(pattern[j + 2]));
            matched |= (lo..=hi).contains(&c);
            j += 3;
        } else {
            matched |= x == c;
            j += 1;
        }
    }
    None
}

/// The reply to a runtime error: retryable conditions as `TRYAGAIN` (Redis Cluster's code
/// for "retry later"), the rest as `ERR`, each with what to do next.
pub(crate) fn error_reply(e: &Error) -> Reply {
    match e {
        Error::ProposalTooLarge { size, limit } => Reply::err(format!(
            "ERR value too large: the command is {size} bytes, above the limit of {limit} \
             bytes of one proposal"
        )),
        Error::InvalidCommand(why) => Reply::err(format!("ERR {why}")),
        Error::NotLeader { .. }
        | Error::EpochNotMatch { .. }
        | Error::Busy(_)
        | Error::SystemUnavailable(_)
        | Error::ProposalDropped => Reply::err(format!("TRYAGAIN {e}")),
        Error::Stopped => Reply::err("ERR the node is shutting down: use another node"),
        _ => Reply::err(format!("ERR {e}")),
    }
}

/// Runs a pipeline's steps in order; the replies come back in the same order, each with the
/// protocol version to encode it in (HELLO changes it for the replies after its own). Stops
/// early at QUIT (the second value is then true).
pub(crate) async fn run(
    steps: Vec<(Step, u8)>,
    conn: &mut Conn,
    shared: &Shared,
) -> (Vec<(Reply, u8)>, bool) {
    let mut out: Vec<(Reply, u8)> = Vec::with_capacity(steps.len());
    let mut steps = steps.into_iter().peekable();
    while let Some((step, resp)) = steps.next() {
        match step {
            Step::Done(r) => out.push((r, resp)),
            Step::Quit => {
                out.push((Reply::ok(), resp));
                return (out, true);
            }
            Step::Alone(a) => out.push((alone(a, conn, shared).await, resp)),
            Step::Write(w, how) => {
                // This write and the writes (and answers) that follow it, together.
                let mut run = vec![(Some((w, how)), None, resp)];
                while let Some((Step::Write(..) | Step::Done(_), _)) = steps.peek() {
                    match steps.next() {
                        Some((Step::Write(w, how), resp)) => run.push((Some((w, how)), None, resp)),
                        Some((Step::Done(r), resp)) => run.push((None, Some(r), resp)),
                        _ => unreachable!("peeked"),
                    }
                }
                writes(run, shared, &mut out).await;
            }
            Step::Read(keys, how) => {
                let mut run = vec![(Some((keys, how)), None, resp)];
                while let Some((Step::Read(..) | Step::Done(_), _)) = steps.peek() {
                    match steps.next() {
                        Some((Step::Read(k, how), resp)) => run.push((Some((k, how)), None, resp)),
                        Some((Step::Done(r), resp)) => run.push((None, Some(r), resp)),
                        _ => unreachable!("peeked"),
                    }
                }
                reads(run, shared, &mut out).await;
            }
        }
    }
    (out, false)
}

type WriteRun = Vec<(Option<(Vec<KvRequest>, WriteReply)>, Option<Reply>, u8)>;

/// Proposes every command of a run of writes in one `kv_batch` (one entry per range), and
/// proposes again those refused because their range changed shape before they applied.
async fn writes(run: WriteRun, shared: &Shared, out: &mut Vec<(Reply, u8)>) {
    let requests: Vec<KvRequest> = run
        .iter()
        .filter_map(|(w, _, _)| w.as_ref())
        .flat_map(|(reqs, _)| reqs.iter().cloned())
        .collect();
    let mut answers: Vec<Option<Result<Vec<u8>, Error>>> = vec![None; requests.len()];
    let mut todo: Vec<usize> = (0..requests.len()).collect();
    for round in 0..=MAX_RESHAPES {
        if round > 0 {
            backoff(round).await;
        }
        let proposals = todo
            .iter()
            .map(|&i| KvProposal {
                request: requests[i].clone(),
                opts: ProposeOptions::default(),
                range: None,
                forward: true,
            })
            .collect();
        let results = futures_util::future::join_all(shared.node.kv_batch(proposals)).await;
        let mut again = Vec::new();
        for (i, r) in todo.into_iter().zip(results) {
            match r {
                Err(e) if worth_retrying(&e) && round < MAX_RESHAPES => again.push(i),
                r => answers[i] = Some(r),
            }
        }
        if again.is_empty() {
            break;
        }
        todo = again;
    }
    let mut answers = answers
        .into_iter()
        .map(|a| a.unwrap_or(Err(Error::Stopped)));
    for (w, done, resp) in run {
        let reply = match (w, done) {
            (Some((reqs, how)), _) => {
                let mine: Vec<_> = answers.by_ref().take(reqs.len()).collect();
                write_reply(how, mine)
            }
            (None, Some(r)) => r,
            (None, None) => Reply::err("ERR internal: a step without a reply"),
        };
        out.push((reply, resp));
    }
}

fn write_reply(how: WriteReply, answers: Vec<Result<Vec<u8>, Error>>) -> Reply {
    let mut decoded = Vec::with_capacity(answers.len());
    for a in answers {
        match a {
            Ok(raw) => match KvResponse::decode(&raw[..]) {
                Ok(r) => decoded.push(r),
                Err(e) => return Reply::err(format!("ERR undecodable answer: {e}")),
            },
            Err(e) => return error_reply(&e),
        }
    }
    match how {
        WriteReply::Ok => Reply::ok(),
        WriteReply::Inserted => Reply::Int(i64::from(decoded.iter().all(|r| r.ok))),
        WriteReply::InsertedOrNull if decoded.iter().all(|r| r.ok) => Reply::ok(),
        WriteReply::InsertedOrNull => Reply::null(),
        WriteReply::Deleted => Reply::Int(decoded.iter().filter(|r| r.ok).count() as i64),
        WriteReply::Counter => match decoded
            .first()
            .and_then(|r| r.previous.as_ref())
            .and_then(|v| integer(v))
        {
            Some(n) => Reply::Int(n),
            None => Reply::err("ERR an increment without its new value"),
        },
    }
}

type ReadRun = Vec<(Option<(Vec<Bytes>, ReadReply)>, Option<Reply>, u8)>;

/// Reads every key of a run of reads with one `get_many` (one barrier per range).
async fn reads(run: ReadRun, shared: &Shared, out: &mut Vec<(Reply, u8)>) {
    let keys: Vec<&[u8]> = run
        .iter()
        .filter_map(|(r, _, _)| r.as_ref())
        .flat_map(|(keys, _)| keys.iter().map(|k| &k[..]))
        .collect();
    let mut result = Err(Error::Stopped);
    for round in 0..=MAX_RESHAPES {
        if round > 0 {
            backoff(round).await;
        }
        result = shared
            .node
            .get_many(&keys, ReadConsistency::Linearizable)
            .await;
        if !result.as_ref().is_err_and(worth_retrying) {
            break;
        }
    }
    let mut values = match &result {
        Ok(v) => v.clone().into_iter(),
        Err(_) => Vec::new().into_iter(),
    };
    for (r, done, resp) in run {
        let reply = match (r, done, &result) {
            (Some(_), _, Err(e)) => error_reply(e),
            (Some((keys, how)), _, Ok(_)) => {
                let mine: Vec<Option<Vec<u8>>> = values.by_ref().take(keys.len()).collect();
                match how {
                    ReadReply::Get => {
                        Reply::Bulk(mine.into_iter().next().flatten().map(Into::into))
                    }
                    ReadReply::MGet => Reply::Array(
                        mine.into_iter()
                            .map(|v| Reply::Bulk(v.map(Into::into)))
                            .collect(),
                    ),
                    ReadReply::Exists => {
                        Reply::Int(mine.iter().filter(|v| v.is_some()).count() as i64)
                    }
                }
            }
            (None, Some(r), _) => r,
            (None, None, _) => Reply::err("ERR internal: a step without a reply"),
        };
        out.push((reply, resp));
    }
}

/// Runs a command that goes on its own.
async fn alone(a: Alone, conn: &mut Conn, shared: &Shared) -> Reply {
    let node = &shared.node;
    match a {
        Alone::SetIfExists(key, value) => {
            // Compare-and-set against what the key holds, while it exists; a concurrent
            // write between the read and the swap makes it go round again.
            for _ in 0..16 {
                let cur = match node.get(&key, ReadConsistency::Linearizable).await {
                    Ok(Some(v)) => v,
                    Ok(None) => return Reply::null(),
                    Err(e) => return error_reply(&e),
                };
                let cas = KvRequest {
                    op: Some(kv_request::Op::Cas(CompareAndSet {
                        key: key.clone(),
                        expected: Some(cur.into()),
                        value: value.clone(),
                        delete: false,
                    })),
                };
                match node.kv(cas, ProposeOptions::default()).await {
                    Ok(r) if r.ok => return Reply::ok(),
                    Ok(_) => continue,
                    Err(e) => return error_reply(&e),
                }
            }
            Reply::err("TRYAGAIN SET XX: the key kept changing; retry")
        }
        Alone::Scan {
            cursor,
            pattern,
            count,
            none,
        } => {
            let from = match cursor {
                0 => Vec::new(),
                c => match conn.cursors.iter().position(|(id, _)| *id == c) {
                    Some(i) => conn.cursors.remove(i).map(|(_, k)| k).unwrap_or_default(),
                    None => return Reply::err("ERR invalid cursor"),
                },
            };
            let page = match node
                .scan(&from, b"", count, ReadConsistency::Linearizable)
                .await
            {
                Ok(p) => p,
                Err(e) => return error_reply(&e),
            };
            let next = match page.next {
                Some(k) => conn.remember_cursor(k),
                None => 0,
            };
            let keys = page
                .pairs
                .into_iter()
                .filter(|(k, _)| !none && pattern.as_ref().is_none_or(|p| glob(p, k)))
                .map(|(k, _)| Reply::bulk(k))
                .collect();
            Reply::Array(vec![
                Reply::bulk(Bytes::from(next.to_string())),
                Reply::Array(keys),
            ])
        }
        Alone::DbSize => match dbsize(shared).await {
            Ok(n) => Reply::Int(n as i64),
            Err(e) => error_reply(&e),
        },
        Alone::Info(section) => Reply::bulk(Bytes::from(super::info(shared, section.as_deref()))),
    }
}

/// The number of keys in the ranges this node holds, counted on its own replicas without a
/// read barrier (it may lag the leaders; it costs a pass over the keys).
pub(crate) async fn dbsize(shared: &Shared) -> Result<u64, Error> {
    let mut n = 0u64;
    let mut from = Vec::new();
    loop {
        let page = shared
            .node
            .scan(&from, b"", 10_000, ReadConsistency::Stale)
            .await?;
        n += page.pairs.len() as u64;
        match page.next {
            Some(k) => from = k,
            None => return Ok(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn glob_matches_as_redis_does() {
        assert!(glob(b"*", b"anything"));
        assert!(glob(b"user:*", b"user:1"));
        assert!(!glob(b"user:*", b"users"));
        assert!(glob(b"h?llo", b"hello"));
        assert!(glob(b"h[ae]llo", b"hallo"));
        assert!(!glob(b"h[ae]llo", b"hillo"));
        assert!(glob(b"h[^e]llo", b"hallo"));
        assert!(glob(b"h[a-c]llo", b"hbllo"));
        assert!(glob(b"a\\*b", b"a*b"));
        assert!(!glob(b"a\\*b", b"axb"));
        assert!(glob(b"*a*b*", b"xxaxxbxx"));
        assert!(!glob(b"", b"x"));
        assert!(glob(b"save", b"save"));
    }
}
