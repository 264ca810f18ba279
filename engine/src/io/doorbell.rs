//! Waking a sleeping worker. An idle worker sleeps in `poll()` on its socket and on its
//! doorbell (an eventfd); whoever hands it work (a command, the stop flag) rings the bell. So an
//! idle worker can sleep long, which is what an idle lbd costs, and still takes a change at
//! once instead of at its next timeout.
//!
//! The bell is rung only while the worker sleeps or is about to, so a busy worker costs its
//! senders no system call. Each side fences between its write and its read: the worker marks
//! itself asleep, then looks for work; a sender hands over work, then looks whether the worker
//! is asleep. One of the two sees the other's write, so no work waits for a timeout.

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering, fence};

/// One worker's doorbell.
#[derive(Debug)]
pub struct Doorbell {
    /// Readable once rung; non-blocking, so that clearing an unrung bell does not wait.
    event: EventFd,
    asleep: AtomicBool,
}

impl Doorbell {
    /// A new, silent bell.
    pub fn new() -> io::Result<Doorbell> {
        let event =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(Doorbell {
            event,
            asleep: AtomicBool::new(false),
        })
    }

    /// Wakes the worker if it sleeps: call after handing it work (a command sent, the stop
    /// flag set).
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.asleep.load(Ordering::Relaxed) {
            // Fails only when the count would overflow: it is rung already.
            let _ = self.event.write(1);
        }
    }

    /// The worker is about to sleep: after this, it looks for work once more, then sleeps.
    pub fn going_to_sleep(&self) {
        self.asleep.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// The worker is awake again: senders stop ringing.
    pub fn awake(&self) {
        self.asleep.store(false, Ordering::Relaxed);
    }

    /// Silences the bell after it rang (a read resets an eventfd's count).
    pub fn clear(&self) {
        // EAGAIN: it had not rung.
        let _ = self.event.read();
    }

    /// Sleeps until `fd` is readable, the bell rings or `timeout_ms` passes (negative: no
    /// timeout); silences the bell if it rang.
    pub fn wait_with(&self, fd: BorrowedFd<'_>, timeout_ms: i32) {
        let mut fds = [
            PollFd::new(fd, PollFlags::POLLIN),
            PollFd::new(self.as_fd(), PollFlags::POLLIN),
        ];
        wait_for_any(&mut fds, timeout_ms);
        if rang(&fds[1]) {
            self.clear();
        }
    }

    /// Sleeps until the bell rings or `timeout_ms` passes (tests' rings have no socket).
    #[cfg(test)]
    pub fn wait(&self, timeout_ms: i32) {
        let mut fds = [PollFd::new(self.as_fd(), PollFlags::POLLIN)];
        wait_for_any(&mut fds, timeout_ms);
        if rang(&fds[0]) {
            self.clear();
        }
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }
}

/// `poll()` on `fds` for at most `timeout_ms`. An interrupted or failed poll ends the wait
/// early: the caller's loop looks again.
fn wait_for_any(fds: &mut [PollFd<'_>], timeout_ms: i32) {
    let timeout = PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::NONE);
    let _ = poll(fds, timeout);
}

/// True when `poll()` found `fd` readable.
fn rang(fd: &PollFd<'_>) -> bool {
    fd.revents()
        .is_some_and(|events| events.contains(PollFlags::POLLIN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A sender rings only a worker that sleeps (or is about to): a busy worker's senders make
    /// no system call, and a ring reaches a sleeping worker at once.
    #[test]
    fn the_bell_rings_only_for_a_sleeping_worker() {
        let bell = Doorbell::new().expect("eventfd");
        bell.ring();
        let started = Instant::now();
        bell.wait(200);
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "rang while awake"
        );

        let bell = Arc::new(bell);
        bell.going_to_sleep();
        let ringer = {
            let bell = Arc::clone(&bell);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                bell.ring();
            })
        };
        let started = Instant::now();
        bell.wait(60_000);
        bell.awake();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "slept through the bell"
        );
        ringer.join().expect("ringer");
        // The ring was taken: the next wait sleeps its whole timeout again.
        let started = Instant::now();
        bell.wait(100);
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
