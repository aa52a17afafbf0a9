//! The hold filter: packets wait, in order, until the test delivers them, all or some, in an
//! order it chooses. This is what a paused process (SIGSTOP) sees: what its peers sent waits
//! in its socket buffers, and on resume is read in an order the scheduler decides.

use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Action, Filter, FilterKind, Packet};

type Select = Box<dyn Fn(&Packet) -> bool + Send + Sync>;

struct Inner {
    select: Select,
    held: Mutex<Vec<Packet>>,
}

/// Holds the packets a closure selects instead of delivering them. A clone is a handle on
/// the same filter: install one with [`MemNetwork::add_filter`](crate::MemNetwork::add_filter)
/// and keep the other to look at what is held ([`HoldFilter::held`]), take some of it out
/// ([`HoldFilter::take`]) and hand it to [`MemNetwork::deliver`](crate::MemNetwork::deliver).
///
/// Packets are held in the order the destinations received them, which keeps each node
/// pair's order. Packets the closure does not select pass, and so overtake held ones of the
/// same pair: select whole pairs to keep their order. Removing the filter releases nothing;
/// what it holds when dropped is lost.
#[derive(Clone)]
pub struct HoldFilter {
    inner: Arc<Inner>,
}

impl HoldFilter {
    /// Holds every packet for which `select` returns true.
    pub fn new(select: impl Fn(&Packet) -> bool + Send + Sync + 'static) -> Self {
        Self {
            inner: Arc::new(Inner {
                select: Box::new(select),
                held: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Copies of the packets held now, oldest first.
    pub fn held(&self) -> Vec<Packet> {
        self.inner.held.lock().clone()
    }

    /// Takes the held packets for which `pick` returns true out of the filter; the others
    /// stay held. `pick` sees every held packet once, oldest first, so it may keep state
    /// ("node 1's packets up to its first read index request").
    pub fn take(&self, mut pick: impl FnMut(&Packet) -> bool) -> Vec<Packet> {
        let mut held = self.inner.held.lock();
        let (taken, kept) = std::mem::take(&mut *held)
            .into_iter()
            .partition(|p| pick(p));
        *held = kept;
        taken
    }

    /// Takes every held packet, oldest first.
    pub fn take_all(&self) -> Vec<Packet> {
        std::mem::take(&mut *self.inner.held.lock())
    }
}

impl Filter for HoldFilter {
    fn kind(&self) -> FilterKind {
        FilterKind::Hold
    }

    fn apply(&self, p: &Packet) -> Action {
        if (self.inner.select)(p) {
            self.inner.held.lock().push(p.clone());
            Action::Hold
        } else {
            Action::Pass
        }
    }
}

impl fmt::Debug for HoldFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HoldFilter")
            .field("held", &self.inner.held.lock().len())
            .finish_non_exhaustive()
    }
}
