//! The OOM reaper's path: a process killed in the middle of device jobs has its memory unmapped
//! by `process_mrelease()` (or by the OOM killer's reaper) before it has exited. The kernel then
//! calls the driver's invalidation as non-blockable (`mmu_notifier_invalidate_range_start_nonblock`):
//! the driver must not sleep there (the lock-debugging kernel reports a sleep inside
//! `non_block_start()`), so it try-locks and spins for its SYNC, and gives up (the kernel skips
//! that VMA and retries, or the exit's blockable teardown does the work) rather than let a page
//! go while the device may still use it. The device's validator counts any access to a page
//! after it was freed; these tests demand zero, and print how often the non-blockable path ran
//! (`ZgInfo::nonblock_invalidations`) and gave up (`nonblock_failed`).

use crate::dev::{self, Mapping};
use crate::ktap::check_eq;
use crate::mirror::device_violations;
use crate::proc::fork_child;
use shared_regs::dma::DMA_CHECKSUM;
use shared_regs::testing::ZgInject;
use shared_regs::uapi::ZgInfo;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Rounds of kill-and-reap, each with its own delay between the jobs starting and the kill.
const ROUNDS: u32 = 24;
/// Every third round runs with the device's SYNCs held back longer than the driver's
/// non-blockable spin, so that the non-blockable callback must give up (`nonblock_failed`).
const SLOW_SYNC_US: u32 = 30_000;

fn info() -> Result<ZgInfo, String> {
    let f = dev::open().map_err(|e| format!("open: {e}"))?;
    dev::get_info(&f).map_err(|e| format!("GET_INFO: {e}"))
}

/// `syscall(nr, a, b, c)`; the result or the errno.
fn sys(nr: libc::c_long, a: libc::c_long, b: libc::c_long, c: libc::c_long) -> Result<i64, i32> {
    dev::syscall3(nr, a, b, c).map_err(|e| dev::errno(&e))
}

/// A child: mirrors a THP buffer and a small-page buffer (two VMAs, so the reaper walks more
/// than one), keeps device reads running over both from two threads, tells the parent through
/// `ready`, and waits to be killed.
fn busy_child(ready: OwnedFd, slow_sync_us: u32) -> i32 {
    let Ok(f) = dev::open() else { return 10 };
    if slow_sync_us != 0 {
        let i = ZgInject {
            sync_lag: slow_sync_us,
            ..Default::default()
        };
        if dev::inject_all(&f, i).is_err() {
            return 11;
        }
    }
    let (Ok(mut huge), Ok(mut small)) = (Mapping::anon_huge(8 << 20), Mapping::anon(1 << 20))
    else {
        return 12;
    };
    huge.bytes_mut().fill(1);
    small.bytes_mut().fill(2);
    for m in [&huge, &small] {
        if dev::map(&f, m.addr, m.len, 0).is_err() {
            return 13;
        }
    }
    for (addr, len) in [(huge.addr, huge.len), (small.addr, small.len)] {
        let Ok(f2) = f.try_clone() else { return 14 };
        std::thread::spawn(move || loop {
            let _ = dev::dma(&f2, dev::job(DMA_CHECKSUM, addr, 0, len, 0));
        });
    }
    let mut ready = std::fs::File::from(ready);
    if ready.write_all(b"r").is_err() {
        return 15;
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// One round: fork a busy child, kill it `delay` after it is ready and reap its memory at once.
/// Returns (whether `process_mrelease` reaped, how many times it said EAGAIN).
fn kill_and_reap(delay: Duration, slow_sync_us: u32) -> Result<(bool, u32), String> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned these two descriptors; each is owned once.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The parent's copy of the write end goes with the closure, so a child that dies before it
    // is ready gives EOF, not a hang.
    let pid = fork_child(move || busy_child(wr, slow_sync_us))?;
    let mut byte = [0u8; 1];
    let ready = std::fs::File::from(rd).read_exact(&mut byte).is_ok();
    let pidfd = sys(libc::SYS_pidfd_open, pid.into(), 0, 0)
        .map_err(|e| format!("pidfd_open: errno {e}"))?;
    if ready {
        std::thread::sleep(delay);
    }
    let sent = sys(libc::SYS_pidfd_send_signal, pidfd, libc::SIGKILL.into(), 0);
    let mut reaped = false;
    let mut again = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sent.is_ok() && Instant::now() < deadline {
        match sys(libc::SYS_process_mrelease, pidfd, 0, 0) {
            Ok(_) => {
                reaped = true;
                break;
            }
            // The non-blockable path gave up on some VMA; the kernel's own reaper retries too.
            Err(libc::EAGAIN) | Err(libc::EINTR) => again += 1,
            // Not dying yet: the kill takes effect once a thread of the child runs
            // (`task_will_free_mem()`). (Once the exit has torn the mm down, the call succeeds.)
            Err(libc::EINVAL) => std::thread::yield_now(),
            // The exit got there first: no thread of the child holds the mm any more.
            Err(libc::ESRCH) => break,
            Err(e) => return Err(format!("process_mrelease: errno {e}")),
        }
    }
    // SAFETY: closing the pidfd this function opened.
    unsafe { libc::close(pidfd as i32) };
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if !ready {
        return Err(format!(
            "child failed before its jobs ran: status {status:#x}"
        ));
    }
    sent.map_err(|e| format!("pidfd_send_signal: errno {e}"))?;
    check_eq(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        true,
        "child killed by SIGKILL",
    )?;
    Ok((reaped, again))
}

/// Kills processes in the middle of device jobs and reaps their memory at once with
/// `process_mrelease()`, with varied timing and, every third round, a device whose SYNCs take
/// longer than the non-blockable spin: no device access to a reaped page, ever. The production
/// module has no SYNC lag to set: there the test runs the other rounds only.
pub fn process_mrelease_mid_job_is_safe() -> Result<(), String> {
    let slow_rounds = !crate::production();
    let (before, info0) = (device_violations()?, info()?);
    let (mut reaped, mut again) = (0, 0);
    for r in 0..ROUNDS {
        let delay = Duration::from_millis(u64::from(r * 7 % 23));
        let slow = if slow_rounds && r % 3 == 2 {
            SLOW_SYNC_US
        } else {
            0
        };
        let (ok, n) = kill_and_reap(delay, slow).map_err(|e| format!("round {r}: {e}"))?;
        reaped += u32::from(ok);
        again += n;
    }
    let info1 = info()?;
    let nonblock = info1.nonblock_invalidations - info0.nonblock_invalidations;
    let gave_up = info1.nonblock_failed - info0.nonblock_failed;
    println!(
        "# {ROUNDS} rounds: process_mrelease reaped {reaped} (EAGAIN {again} times); \
         {nonblock} non-blockable invalidations, {gave_up} gave up"
    );
    check_eq(
        device_violations()?,
        before,
        "device violations across reaps",
    )?;
    if nonblock == 0 {
        return Err("no invalidation took the non-blockable path: the test reaped nothing".into());
    }
    // Reaps that land while a job holds the pages need a SYNC the reaper must not wait for
    // (every third round makes SYNCs slow): a correct driver gives those up (EAGAIN); one that
    // sleeps for them never does.
    if slow_rounds && gave_up == 0 {
        return Err(format!(
            "none of {nonblock} non-blockable invalidations gave up: the driver waited in them"
        ));
    }
    Ok(())
}

/// Lets the guest's OOM killer choose a process that mirrors memory and runs device jobs (its
/// `oom_score_adj` is 1000; it allocates until killed), and reaps it with `process_mrelease()`
/// as soon as it is dying, as a low-memory killer would (or the kernel's OOM reaper does, 2 s
/// later): the reap must take the non-blockable path, and the kill, the reap and the exit must
/// leave no device access to a freed page.
pub fn oom_killer_picks_mirroring_process() -> Result<(), String> {
    let (before, info0) = (device_violations()?, info()?);
    println!("{OOM_EXPECTED} begin");
    let res = oom_round();
    println!("{OOM_EXPECTED} end");
    let (status, reaped) = res?;
    check_eq(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        true,
        &format!("child killed by the OOM killer (status {status:#x})"),
    )?;
    let info1 = info()?;
    let nonblock = info1.nonblock_invalidations - info0.nonblock_invalidations;
    println!(
        "# OOM kill: process_mrelease {}; {nonblock} non-blockable invalidations, {} gave up",
        if reaped {
            "reaped"
        } else {
            "found the reap done"
        },
        info1.nonblock_failed - info0.nonblock_failed
    );
    check_eq(
        device_violations()?,
        before,
        "device violations across the OOM kill",
    )?;
    if nonblock == 0 {
        return Err("nothing reaped the victim through the non-blockable path".into());
    }
    Ok(())
}

/// Marker lines around the OOM kill (see the harness's `OomWindow`).
const OOM_EXPECTED: &str = "ZAPGUARD-OOM-EXPECTED";

/// How long after the victim's exit the test keeps its device fault unanswered: the kernel's
/// OOM reaper starts 2 s after the kill (`OOM_REAPER_DELAY`).
const REAPER_WAIT: Duration = Duration::from_secs(4);

/// Forks the memory hog and reaps it once dying; returns its wait status and whether
/// `process_mrelease` did the reaping.
///
/// The victim's exit would otherwise tear its memory down within milliseconds, before any
/// reaper gets there. So it leaves a device fault on a userfaultfd page unanswered and hands the
/// userfaultfd to this process: the driver's fault service then holds a user reference on the
/// victim's mm, as a device fault in flight does, and `exit_mmap` waits for it. It also hands
/// over its `/dev/zapguard` file, so that its context stays (a file closed by the exit takes
/// its context off the mm at once, notifier and all). The kernel's OOM reaper (or
/// `process_mrelease`) reaps the mm meanwhile, through the context's non-blockable
/// invalidation. Closing the userfaultfd ends the fault and lets the exit finish; closing the
/// file then ends the context.
fn oom_round() -> Result<(i32, bool), String> {
    let h = dev::Handoff::new().map_err(|e| format!("pipes: {e}"))?;
    let hf = dev::Handoff::new().map_err(|e| format!("pipes: {e}"))?;
    let [go_r, go_w] = dev::pipe().map_err(|e| format!("pipe: {e}"))?;
    let pid = fork_child(|| oom_child(&h, &hf, go_r))?;
    let uffd = h.take(pid);
    let context = hf.take(pid);
    // The hog starts only once the held fault waits in the userfaultfd: only then does the
    // driver's fault service hold the victim's mm (a slow kernel, KASAN's, took longer than any
    // fixed delay).
    let held = uffd.as_ref().is_ok_and(|u| {
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(u),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one descriptor we own.
        unsafe { libc::poll(&mut p, 1, 20_000) == 1 }
    });
    let _ = (&go_w).write_all(&[u8::from(held)]);
    drop(go_w);
    let pidfd = sys(libc::SYS_pidfd_open, pid.into(), 0, 0);
    let mut reaped = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut status = 0;
    loop {
        // SAFETY: polling our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: ending and collecting our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Err("the OOM killer did not end the memory hog within 120 s".into());
        }
        // EINVAL until the OOM killer has chosen it (it is not dying yet); then reap at once.
        match pidfd.map(|fd| sys(libc::SYS_process_mrelease, fd, 0, 0)) {
            Ok(Ok(_)) => reaped = true,
            Ok(Err(libc::EAGAIN)) | Ok(Err(libc::EINVAL)) | Ok(Err(libc::ESRCH)) | Err(_) => {}
            Ok(Err(e)) => return Err(format!("process_mrelease: errno {e}")),
        }
        // The window between the kill and the exit's own teardown is a few milliseconds: poll
        // without sleeping until the reap, then let the exit finish.
        if reaped {
            std::thread::sleep(Duration::from_millis(5));
        } else {
            std::thread::yield_now();
        }
    }
    if let Ok(fd) = pidfd {
        // SAFETY: closing the pidfd this function opened.
        unsafe { libc::close(fd as i32) };
    }
    if uffd.is_ok() {
        std::thread::sleep(REAPER_WAIT);
    }
    drop(uffd);
    drop(context);
    if !held {
        return Err("the victim's device fault never reached its userfaultfd".into());
    }
    Ok((status, reaped))
}

/// Mirrors a buffer with device reads running, leaves a device fault on a userfaultfd page
/// unanswered (its userfaultfd handed to the parent through `h`, its context's file through
/// `hf`), then allocates and touches memory until the OOM killer ends it (exits 20 if it never
/// does).
fn oom_child(h: &dev::Handoff, hf: &dev::Handoff, mut go: std::fs::File) -> i32 {
    if std::fs::write("/proc/self/oom_score_adj", "1000").is_err() {
        return 10;
    }
    let Ok(f) = dev::open() else { return 11 };
    let Ok(mut buf) = Mapping::anon_huge(8 << 20) else {
        return 12;
    };
    buf.bytes_mut().fill(3);
    if dev::map(&f, buf.addr, buf.len, 0).is_err() {
        return 13;
    }
    let (addr, len) = (buf.addr, buf.len);
    let Ok(f2) = f.try_clone() else { return 14 };
    std::thread::spawn(move || loop {
        let _ = dev::dma(&f2, dev::job(DMA_CHECKSUM, addr, 0, len, 0));
    });
    let Ok(held) = Mapping::anon(4096) else {
        return 15;
    };
    let Ok(uffd) = crate::uffd::register(&held) else {
        return 16;
    };
    use std::os::fd::AsRawFd;
    if h.give(uffd.as_raw_fd()).is_err() || hf.give(f.as_raw_fd()).is_err() {
        return 17;
    }
    let (Ok(f3), held_addr) = (f.try_clone(), held.addr) else {
        return 18;
    };
    std::thread::spawn(move || {
        let _ = dev::dma(&f3, dev::job(DMA_CHECKSUM, held_addr, 0, 4096, 0));
    });
    // The parent says when the fault is held (or gives up).
    let mut b = [0u8; 1];
    if go.read_exact(&mut b).is_err() || b[0] == 0 {
        return 19;
    }
    // Far more than the guest has: the OOM killer must end this first.
    let mut hog = Vec::new();
    for _ in 0..256 {
        let Ok(mut m) = Mapping::anon(16 << 20) else {
            break;
        };
        m.bytes_mut().fill(4);
        hog.push(m);
    }
    20
}
