//! Id newtypes: a node, a range (whose raft group shares its id) and a replica are all `u64`
//! on the wire, and mixing them up is the classic multi-raft bug, so public APIs take these.

use std::fmt;

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                Self(v)
            }
        }
    };
}

id_newtype!(
    /// One process (one NodeGroup). Zero is never a valid node id.
    NodeId,
    "n"
);
id_newtype!(
    /// A range, and the raft group that replicates it. Zero is never a valid range id.
    RangeId,
    "r"
);
id_newtype!(
    /// One member of one group on one node; never reused after removal. Zero is raft's
    /// "nobody" and never a valid replica id.
    ReplicaId,
    "p"
);

impl RangeId {
    /// The system range: the reserved group that holds the cluster's metadata (the id
    /// counters and the node registry). Its id is the largest one, which no counter reaches;
    /// it has no user keys, so the router never holds it, and splits and merges refuse it.
    pub const SYSTEM: RangeId = RangeId(u64::MAX);

    /// Whether this is [`RangeId::SYSTEM`].
    pub fn is_system(self) -> bool {
        self == RangeId::SYSTEM
    }
}
