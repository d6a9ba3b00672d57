//! Child processes for tests: a forked child never returns into the test runner (it `_exit`s
//! with its closure's result, or 101 if that panicked), and a gated child waits for its
//! parent's go before it looks at anything.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};

/// Forks and runs `child` in the child, which `_exit`s with its result, or 101 if it panicked:
/// a panic never unwinds into the copy of the test runner the child is; returns the child's pid
/// (the caller waits for it).
pub(crate) fn fork_child(child: impl FnOnce() -> i32) -> Result<libc::pid_t, String> {
    // SAFETY: the child only runs `child` and `_exit`s (no return into the test runner).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(101);
        // SAFETY: terminating the child without running the parent's destructors twice.
        unsafe { libc::_exit(code) };
    }
    Ok(pid)
}

/// Waits for child `pid`: its exit status, or 128 + the signal that killed it.
pub(crate) fn wait_child(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

/// Forks and runs `child` in the child; returns its exit status.
pub(crate) fn fork_wait(child: impl FnOnce() -> i32) -> Result<i32, String> {
    Ok(wait_child(fork_child(child)?))
}

/// A forked child blocked until [`GatedChild::release`], then running its closure: the parent
/// acts between the fork and the child's look (a device write that must break COW, say).
pub(crate) struct GatedChild {
    pid: libc::pid_t,
    /// The pipe's write end: closing it lets the child go.
    go: File,
}

impl GatedChild {
    pub(crate) fn fork(child: impl FnOnce() -> i32) -> Result<Self, String> {
        let [rd, wr] = crate::dev::pipe().map_err(|e| format!("pipe: {e}"))?;
        // Raw descriptors: the closure is dropped, not run, in the parent.
        let (rd, wr) = (rd.into_raw_fd(), wr.into_raw_fd());
        let pid = fork_child(move || {
            let mut b = [0u8; 1];
            // SAFETY: our copy of the write end goes (so that the parent's close is EOF), then
            // one read from our pipe: it returns once the parent writes or closes.
            unsafe {
                libc::close(wr);
                libc::read(rd, b.as_mut_ptr().cast(), 1);
            }
            child()
        });
        // SAFETY: the parent's copy of the read end, and the write end, now owned by a `File`.
        let go = unsafe {
            libc::close(rd);
            File::from_raw_fd(wr)
        };
        Ok(Self { pid: pid?, go })
    }

    /// Lets the child run and waits for it: its exit status.
    pub(crate) fn release(self) -> i32 {
        drop(self.go);
        wait_child(self.pid)
    }
}
