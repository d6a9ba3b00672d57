//! Unbind, rebind, rmmod and insmod while processes run device jobs and churn their memory.
//!
//! Four worker processes each mirror a buffer (THP or small pages) and loop: a device checksum
//! that must match what the CPU sees, a device fill the CPU must see, and mm churn (the buffer
//! unmapped and replaced, `MADV_DONTNEED` on part of it, `mprotect` read-only and back). The
//! parent meanwhile unbinds the device through sysfs and binds it again, or unbinds it, removes
//! the module and inserts it again, round after round. Workers see `ENODEV` (or `EIO`) and
//! reopen once the device is back; any other errno, a wrong checksum, a fill the CPU does not
//! see, or a worker that stops answering fails the test. After the last round every worker must
//! complete jobs again. The harness's run checks add: no splat, no `zapguard: leak:` line, and
//! the device trace shows no access to a page after its invalidation.

use crate::dev::{self, Mapping};
use crate::{failsafe, run_cmd, DRIVER_DIR};
use shared_regs::dma::{fnv1a64, DMA_CHECKSUM, DMA_FILL, FNV_OFFSET};
use shared_regs::uapi::ZG_MAP_WRITE;
use std::fs::File;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const WORKERS: usize = 4;
/// Unbind/bind and unbind/rmmod/insmod rounds, alternating.
const ROUNDS: u32 = 8;
/// Jobs each worker must complete after the last round.
const JOBS_AFTER: u64 = 3;
/// How long a worker may take to notice a phase change or to exit.
const ANSWER_BOUND: Duration = Duration::from_secs(30);

/// What a worker reports, in memory shared with the parent.
#[derive(Default)]
#[repr(C)]
struct Report {
    jobs_ok: AtomicU64,
    /// Jobs completed in the final phase (after the last rebind).
    jobs_after: AtomicU64,
    enodev: AtomicU64,
    eio: AtomicU64,
    /// Device checksums that disagreed with the CPU, or fills the CPU did not see.
    bad_data: AtomicU64,
    /// Calls that failed with an errno other than ENODEV and EIO (the last one is kept).
    unexpected: AtomicU64,
    last_unexpected: AtomicU32,
    /// Sessions (opens of the device).
    sessions: AtomicU64,
}

/// The parent's side of the shared page: phase (0 churn, 1 final, 2 stop) and the reports.
#[repr(C)]
struct Shared {
    phase: AtomicU32,
    reports: [Report; WORKERS],
}

/// Why a session with the device ended.
enum End {
    /// The device went away (ENODEV, EIO): reopen when it is back.
    Gone,
    /// The parent said stop.
    Stop,
}

fn classify(r: &Report, e: &std::io::Error) -> End {
    match dev::errno(e) {
        libc::ENODEV => r.enodev.fetch_add(1, Ordering::Relaxed),
        libc::EIO => r.eio.fetch_add(1, Ordering::Relaxed),
        other => {
            r.last_unexpected.store(other as u32, Ordering::Relaxed);
            r.unexpected.fetch_add(1, Ordering::Relaxed)
        }
    };
    End::Gone
}

/// A patterned buffer of the worker's kind, mirrored for write.
fn buffer(f: &File, huge: bool, byte: u8) -> Result<Mapping, std::io::Error> {
    let mut m = if huge {
        Mapping::anon_huge(4 << 20)?
    } else {
        Mapping::anon(1 << 20)?
    };
    m.bytes_mut().fill(byte);
    dev::map(f, m.addr, m.len, ZG_MAP_WRITE)?;
    Ok(m)
}

/// One job; `Err` ends the session.
fn job(f: &File, r: &Report, d: shared_regs::uapi::ZgDma) -> Result<u64, End> {
    dev::dma(f, d)
        .map(|d| d.result)
        .map_err(|(e, _)| classify(r, &e))
}

/// Jobs and churn on one open file until the device goes away or the parent says stop.
fn session(f: &File, sh: &Shared, r: &Report, huge: bool, seed: u8) -> End {
    let mut pattern = seed;
    let mut buf = match buffer(f, huge, pattern) {
        Ok(b) => b,
        Err(e) => return classify(r, &e),
    };
    for i in 0u64.. {
        let phase = sh.phase.load(Ordering::Relaxed);
        if phase >= 2 {
            return End::Stop;
        }
        let want = fnv1a64(FNV_OFFSET, buf.bytes());
        match job(f, r, dev::job(DMA_CHECKSUM, buf.addr, 0, buf.len, 0)) {
            Ok(sum) if sum != want => {
                r.bad_data.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(end) => return end,
        }
        pattern = pattern.wrapping_add(1);
        let fill = dev::job(
            DMA_FILL,
            0,
            buf.addr,
            buf.len,
            u64::from_le_bytes([pattern; 8]),
        );
        if let Err(end) = job(f, r, fill) {
            return end;
        }
        if buf.bytes().iter().any(|&b| b != pattern) {
            r.bad_data.fetch_add(1, Ordering::Relaxed);
        }
        r.jobs_ok.fetch_add(1, Ordering::Relaxed);
        if phase == 1 {
            r.jobs_after.fetch_add(1, Ordering::Relaxed);
        }
        let churned = match i % 4 {
            // The buffer goes and a new one (new pages, new pattern) takes its place.
            0 => {
                buf.unmap();
                buffer(f, huge, pattern).map(|b| buf = b)
            }
            // Part of it is dropped: the device must then read zeros there, as the CPU does.
            1 => buf.madvise(0, buf.len / 2, libc::MADV_DONTNEED),
            2 => buf
                .protect(libc::PROT_READ)
                .and_then(|()| buf.protect(libc::PROT_READ | libc::PROT_WRITE)),
            _ => Ok(()),
        };
        if let Err(e) = churned {
            return classify(r, &e);
        }
    }
    End::Stop
}

/// A worker process: sessions until the parent says stop; reopens after the device comes back.
fn worker(sh: &Shared, w: usize) -> i32 {
    let r = &sh.reports[w];
    loop {
        if sh.phase.load(Ordering::Relaxed) >= 2 {
            return 0;
        }
        let Ok(f) = dev::open() else {
            // Unbound or unloaded: the node is gone until the probe brings it back.
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        r.sessions.fetch_add(1, Ordering::Relaxed);
        if let End::Stop = session(&f, sh, r, w.is_multiple_of(2), 0x10 * w as u8 + 1) {
            return 0;
        }
    }
}

fn bdf() -> Result<String, String> {
    crate::bound_devices()?
        .into_iter()
        .next()
        .ok_or_else(|| "no bound device".into())
}

/// Unbinds the device; then either binds it again, or removes the module (retrying while the
/// workers still hold files: they close them on ENODEV) and inserts it again.
fn round(n: u32, dev_bdf: &str) -> Result<(), String> {
    std::fs::write(format!("{DRIVER_DIR}/unbind"), dev_bdf)
        .map_err(|e| format!("unbind {dev_bdf}: {e}"))?;
    std::thread::sleep(Duration::from_millis(20 + u64::from(n) * 13 % 60));
    if n.is_multiple_of(2) {
        return std::fs::write(format!("{DRIVER_DIR}/bind"), dev_bdf)
            .map_err(|e| format!("bind {dev_bdf}: {e}"));
    }
    let t = Instant::now();
    loop {
        match run_cmd("rmmod", &["zapguard"]) {
            Ok(()) => break,
            Err(e) if t.elapsed() > ANSWER_BOUND => {
                return Err(format!("rmmod still refused after {ANSWER_BOUND:?}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    failsafe::reload(&[])
}

/// Waits for the workers' jobs to pass `want` in total (`after`: jobs of the final phase).
/// Waits until `want(worker, jobs)` holds for every worker (`after`: jobs of the final phase),
/// within [`ANSWER_BOUND`].
fn wait_jobs(sh: &Shared, after: bool, want: impl Fn(usize, u64) -> bool) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let done: Vec<u64> = sh
            .reports
            .iter()
            .map(|r| {
                if after {
                    r.jobs_after.load(Ordering::Relaxed)
                } else {
                    r.jobs_ok.load(Ordering::Relaxed)
                }
            })
            .collect();
        if done.iter().enumerate().all(|(w, &d)| want(w, d)) {
            return Ok(());
        }
        if t.elapsed() > ANSWER_BOUND {
            return Err(format!(
                "workers stuck: jobs {done:?} after {ANSWER_BOUND:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stops the workers, bounded: a worker that does not exit is hung in the driver.
fn reap(pids: &[libc::pid_t], sh: &Shared) -> Result<(), String> {
    sh.phase.store(2, Ordering::Relaxed);
    let t = Instant::now();
    let mut left: Vec<libc::pid_t> = pids.to_vec();
    let mut bad = vec![];
    while !left.is_empty() && t.elapsed() < ANSWER_BOUND {
        left.retain(|&pid| {
            let mut st = 0;
            // SAFETY: polling our own child.
            let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
            if r == pid && !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) {
                bad.push(format!("worker {pid} ended with status {st:#x}"));
            }
            r != pid
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    for &pid in &left {
        // SAFETY: killing and collecting our own hung child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        bad.push(format!(
            "worker {pid} hung (did not exit within {ANSWER_BOUND:?})"
        ));
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}

fn check_reports(sh: &Shared) -> Result<(), String> {
    let mut errs = vec![];
    for (w, r) in sh.reports.iter().enumerate() {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        println!(
            "# worker {w}: {} jobs ({} after the last round), {} sessions, ENODEV {}, EIO {}, \
             bad data {}, unexpected errno {} (last {})",
            l(&r.jobs_ok),
            l(&r.jobs_after),
            l(&r.sessions),
            l(&r.enodev),
            l(&r.eio),
            l(&r.bad_data),
            l(&r.unexpected),
            r.last_unexpected.load(Ordering::Relaxed)
        );
        if l(&r.bad_data) != 0 {
            errs.push(format!("worker {w}: device and CPU disagreed on the data"));
        }
        if l(&r.unexpected) != 0 {
            errs.push(format!(
                "worker {w}: undocumented errno {}",
                r.last_unexpected.load(Ordering::Relaxed)
            ));
        }
        // Each round took the device from under every worker, and each came back.
        if l(&r.enodev) + l(&r.eio) < u64::from(ROUNDS) || l(&r.sessions) <= u64::from(ROUNDS) {
            errs.push(format!(
                "worker {w}: {} ENODEV/EIO and {} sessions over {ROUNDS} rounds: it did not see \
                 each unbind and reopen after it",
                l(&r.enodev) + l(&r.eio),
                l(&r.sessions)
            ));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// Forks the workers; they stop on their own if the parent dies (phase 2 is never reached, but
/// the guest run ends).
fn spawn(sh: &Shared) -> Result<Vec<libc::pid_t>, String> {
    let mut pids = vec![];
    for w in 0..WORKERS {
        pids.push(crate::proc::fork_child(|| worker(sh, w))?);
    }
    Ok(pids)
}

pub fn unbind_and_rmmod_under_load() -> Result<(), String> {
    let dev_bdf = bdf()?;
    let page = Mapping::shared_anon(std::mem::size_of::<Shared>().next_multiple_of(4096))
        .map_err(|e| format!("shared page: {e}"))?;
    // SAFETY: a fresh zero-filled shared mapping, large enough and page-aligned; all-zero bytes
    // are a valid `Shared` (atomics), and it outlives every process that uses it.
    let sh: &Shared = unsafe { &*(page.addr as *const Shared) };
    let pids = spawn(sh)?;
    let res = (|| {
        wait_jobs(sh, false, |_, d| d > 0)?;
        for n in 0..ROUNDS {
            let before: Vec<u64> = sh
                .reports
                .iter()
                .map(|r| r.jobs_ok.load(Ordering::Relaxed))
                .collect();
            round(n, &dev_bdf).map_err(|e| format!("round {n}: {e}"))?;
            // Every round starts with the device back in use by every worker.
            wait_jobs(sh, false, |w, d| d > before[w])
                .map_err(|e| format!("round {n}, after the device came back: {e}"))?;
        }
        sh.phase.store(1, Ordering::Relaxed);
        wait_jobs(sh, true, |_, d| d >= JOBS_AFTER)
    })();
    let reaped = reap(&pids, sh);
    println!("# {ROUNDS} rounds of unbind/bind and unbind/rmmod/insmod under {WORKERS} workers");
    let reports = check_reports(sh);
    res.and(reaped).and(reports)
}
