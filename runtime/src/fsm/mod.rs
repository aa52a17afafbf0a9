//! The shell around the replicas: what runs where, and the registry of replicas, independent
//! of what a replica does (`replica/` knows nothing of this module).
//!
//! - [`shared`]: the state a NodeGroup's threads share, with the registry of replica cells.
//! - [`life`]: every transition of a replica's life on this node (creation, departure).
//! - [`mailbox`]: a replica's cell (mailbox, notified flag, the replica itself) and the
//!   scheduling protocol that puts a cell on the ready queue once per burst of work.
//! - [`worker`]: the fixed pool of OS threads that poll ready cells in rounds; one round is
//!   one WriteBatch and one fsync for every replica it touched; it turns the effects replicas
//!   return into actions.
//! - [`ticker`]: the one thread that ticks awake replicas and expires overdue requests.
//! - [`liveness`]: node liveness from the transport, the leader index, the paced wake queue
//!   (what wakes sleeping groups when a node goes down or comes back).
//! - [`split_checker`]: the thread that proposes splits of ranges that grew too big or hot;
//!   [`load`]: the request counters it reads.

pub(crate) mod life;
pub(crate) mod liveness;
pub(crate) mod load;
pub(crate) mod mailbox;
pub(crate) mod shared;
pub(crate) mod split_checker;
pub(crate) mod ticker;
pub(crate) mod worker;
