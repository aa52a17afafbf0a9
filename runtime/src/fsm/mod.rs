//! The thread model: what runs where, independent of what a replica does.
//!
//! - [`mailbox`]: a replica's cell (mailbox, notified flag, the replica itself) and the
//!   scheduling protocol that puts a cell on the ready queue once per burst of work.
//! - [`worker`]: the fixed pool of OS threads that poll ready cells in rounds; one round is
//!   one WriteBatch and one fsync for every replica it touched.
//! - [`ticker`]: the one thread that ticks awake replicas and expires overdue requests.
//! - [`split_checker`]: the thread that proposes splits of ranges that grew too big or hot.

pub(crate) mod mailbox;
pub(crate) mod split_checker;
pub(crate) mod ticker;
pub(crate) mod worker;
