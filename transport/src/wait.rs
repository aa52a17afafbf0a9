//! A change signal for counters that tests wait on: both transports' stats use it so that a
//! test awaits an outcome with a deadline instead of sleeping a guessed amount.

use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// A change signal without lost wake-ups, nearly free when nobody waits.
///
/// The condition is checked while holding the lock that `notify` takes, so an update made
/// after a check is always followed by a notification the waiter is already waiting for.
///
/// `notify` runs on hot paths (every frame, every delivery) while waiters exist only in
/// tests, so it skips the lock when no one waits. That is safe by the classic store, fence,
/// load pairing: the notifier updates counters then reads `waiters`, the waiter registers in
/// `waiters` then reads counters, each with a SeqCst fence between. So either the notifier
/// sees the waiter (and notifies under the lock) or the waiter sees the update.
#[derive(Debug, Default)]
pub(crate) struct Notifier {
    generation: Mutex<u64>,
    cv: Condvar,
    waiters: AtomicUsize,
}

impl Notifier {
    pub(crate) fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) == 0 {
            return;
        }
        *self.generation.lock() += 1;
        self.cv.notify_all();
    }

    pub(crate) fn wait_until<S>(
        &self,
        timeout: Duration,
        snapshot: impl Fn() -> S,
        mut cond: impl FnMut(&S) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.generation.lock();
        self.waiters.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let held = loop {
            if cond(&snapshot()) {
                break true;
            }
            if self.cv.wait_until(&mut g, deadline).timed_out() {
                break cond(&snapshot());
            }
        };
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        held
    }
}
