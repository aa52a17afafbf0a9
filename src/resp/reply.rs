//! What a command answers, independent of the protocol version, and its encoding with the
//! `redis-protocol` crate: RESP2 by default, RESP3 once the connection said `HELLO 3` (maps,
//! nulls and booleans have their own types there; RESP2 flattens a map into an array).

use bytes::{Bytes, BytesMut};
use redis_protocol::bytes_utils::Str;
use redis_protocol::resp2::types::BytesFrame as Frame2;
use redis_protocol::resp3::types::BytesFrame as Frame3;

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `+OK`, `+PONG`: a status.
    Status(&'static str),
    /// An error line: its first word is the code (`ERR`, `TRYAGAIN`, `NOPROTO`, ...).
    Error(String),
    Int(i64),
    /// A bulk string; `None` is the null reply.
    Bulk(Option<Bytes>),
    Array(Vec<Reply>),
    /// Pairs: a map in RESP3, a flat array in RESP2.
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    pub(crate) fn ok() -> Reply {
        Reply::Status("OK")
    }

    pub(crate) fn null() -> Reply {
        Reply::Bulk(None)
    }

    pub(crate) fn bulk(b: impl Into<Bytes>) -> Reply {
        Reply::Bulk(Some(b.into()))
    }

    pub(crate) fn err(msg: impl Into<String>) -> Reply {
        Reply::Error(msg.into())
    }

    /// Appends this reply to `out` in protocol version `resp` (2 or 3).
    pub(crate) fn encode(&self, resp: u8, out: &mut BytesMut) {
        // Encoding into a growable buffer fails only for frames these conversions never
        // build (streamed or half-built frames).
        if resp >= 3 {
            let _ = redis_protocol::resp3::encode::complete::extend_encode(
                out,
                &self.to_resp3(),
                false,
            );
        } else {
            let _ = redis_protocol::resp2::encode::extend_encode(out, &self.to_resp2(), false);
        }
    }

    fn to_resp2(&self) -> Frame2 {
        match self {
            Reply::Status(s) => Frame2::SimpleString(Bytes::from_static(s.as_bytes())),
            Reply::Error(e) => Frame2::Error(Str::from(e.as_str())),
            Reply::Int(i) => Frame2::Integer(*i),
            Reply::Bulk(Some(b)) => Frame2::BulkString(b.clone()),
            Reply::Bulk(None) => Frame2::Null,
            Reply::Array(a) => Frame2::Array(a.iter().map(Reply::to_resp2).collect()),
            Reply::Map(m) => Frame2::Array(
                m.iter()
                    .flat_map(|(k, v)| [k.to_resp2(), v.to_resp2()])
                    .collect(),
            ),
        }
    }

    fn to_resp3(&self) -> Frame3 {
        match self {
            Reply::Status(s) => Frame3::SimpleString {
                data: Bytes::from_static(s.as_bytes()),
                attributes: None,
            },
            Reply::Error(e) => Frame3::SimpleError {
                data: Str::from(e.as_str()),
                attributes: None,
            },
            Reply::Int(i) => Frame3::Number {
                data: *i,
                attributes: None,
            },
            Reply::Bulk(Some(b)) => Frame3::BlobString {
                data: b.clone(),
                attributes: None,
            },
            Reply::Bulk(None) => Frame3::Null,
            Reply::Array(a) => Frame3::Array {
                data: a.iter().map(Reply::to_resp3).collect(),
                attributes: None,
            },
            Reply::Map(m) => Frame3::Map {
                data: m
                    .iter()
                    .map(|(k, v)| (k.to_resp3(), v.to_resp3()))
                    .collect(),
                attributes: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(r: &Reply, resp: u8) -> Vec<u8> {
        let mut out = BytesMut::new();
        r.encode(resp, &mut out);
        out.to_vec()
    }

    #[test]
    fn replies_encode_as_redis_sends_them() {
        assert_eq!(enc(&Reply::ok(), 2), b"+OK\r\n");
        assert_eq!(enc(&Reply::null(), 2), b"$-1\r\n");
        assert_eq!(enc(&Reply::null(), 3), b"_\r\n");
        assert_eq!(enc(&Reply::Int(-3), 2), b":-3\r\n");
        assert_eq!(enc(&Reply::err("ERR x"), 2), b"-ERR x\r\n");
        assert_eq!(enc(&Reply::bulk("ab"), 3), b"$2\r\nab\r\n");
        let m = Reply::Map(vec![(Reply::bulk("k"), Reply::Int(1))]);
        assert_eq!(enc(&m, 2), b"*2\r\n$1\r\nk\r\n:1\r\n");
        assert_eq!(enc(&m, 3), b"%1\r\n$1\r\nk\r\n:1\r\n");
    }
}
