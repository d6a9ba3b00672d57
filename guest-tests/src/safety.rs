//! The second half of safety: nothing the device wrote is lost, the driver's work never
//! outlives the module, one user's stalled fault costs no other user anything, and a device
//! write fault writes (breaks COW on, dirties) only the page the device writes.
//!
//! Each test reads back what it claims: the device's bytes after reclaim, the file's bytes in a
//! private mapping, the CPU's write permission per page, the errno and data of each process.

use crate::dev::{self, Mapping};
use crate::ktap::check_eq;
use crate::mirror::{clean, fill_job, map, open, run};
use crate::proc::{fork_child, fork_wait, GatedChild};
use crate::uffd;
use shared_regs::dma::{fnv1a64, DMA_CHECKSUM, FNV_OFFSET};
use shared_regs::uapi::*;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use crate::dev::PG;
/// `MADV_PAGEOUT` (Linux 5.4; not in every libc's headers).
const MADV_PAGEOUT: i32 = 21;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The pages of `m` (by index) whose bytes are not all `byte`.
fn pages_not(m: &Mapping, byte: u8) -> Vec<usize> {
    m.bytes()
        .chunks(PG)
        .enumerate()
        .filter(|(_, p)| p.iter().any(|&b| b != byte))
        .map(|(i, _)| i)
        .collect()
}

/// `Ok` if every page of `m` holds `byte` (what the device wrote), else which were lost to `to`.
fn nothing_lost(m: &Mapping, byte: u8, to: &str) -> Result<(), String> {
    let lost = pages_not(m, byte);
    match lost.first() {
        None => Ok(()),
        Some(first) => Err(format!(
            "{} of {} pages the device wrote lost their data to {to} (first: page {first})",
            lost.len(),
            m.len / PG
        )),
    }
}

/// Runs `f` with the calling thread pinned to one CPU. `MADV_FREE` parks its pages in a per-CPU
/// LRU batch that holds a reference, and `MADV_PAGEOUT` drains only its own CPU's: a thread that
/// moved between the two leaves a page reclaim will not discard (a referenced lazyfree page).
fn on_one_cpu<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    // SAFETY: plain data, filled in by the calls below.
    let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: reading this thread's mask into `old`.
    unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old) };
    // SAFETY: as above.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: setting CPU 0 in a set we own, and this thread's mask to it.
    let pinned = unsafe {
        libc::CPU_SET(0, &mut one);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one)
    };
    if pinned != 0 {
        return Err(format!(
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        ));
    }
    let r = f();
    // SAFETY: restoring this thread's mask.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &old) };
    r
}

/// `pages` pages of `file` mapped read-write with `flags` (`MAP_PRIVATE` or `MAP_SHARED`),
/// checked to read the file's bytes (`byte` everywhere).
fn map_file(file: &File, pages: usize, flags: i32, byte: u8) -> Result<Mapping, String> {
    let m = Mapping::new(
        pages * PG,
        libc::PROT_READ | libc::PROT_WRITE,
        flags,
        file.as_raw_fd(),
        0,
    )
    .map_err(err)?;
    check_eq(pages_not(&m, byte), vec![], "pages that read the file")?;
    Ok(m)
}

/// Anonymous memory made lazily freeable (`MADV_FREE`) has writable, clean CPU PTEs, so neither
/// a write MAP nor a device write fault makes the kernel fault (and dirty) it. The device then
/// writes every page, half through a write MAP and half through device faults, and reclaim
/// (`MADV_PAGEOUT`) runs: a clean lazyfree page is discarded, so the device's data survives only
/// if the driver told the kernel the device dirtied it. A control mapping, freed the same way
/// and not written by the device, must be discarded (reading zeros): reclaim really ran.
pub fn device_writes_survive_madv_free_and_pageout() -> Result<(), String> {
    on_one_cpu(madv_free_and_pageout)
}

fn madv_free_and_pageout() -> Result<(), String> {
    const PAGES: usize = 64;
    let f = open()?;
    let mut m = Mapping::anon(PAGES * PG).map_err(err)?;
    let mut control = Mapping::anon(8 * PG).map_err(err)?;
    for x in [&m, &control] {
        x.madvise(0, x.len, libc::MADV_NOHUGEPAGE).map_err(err)?;
    }
    m.bytes_mut().fill(0x11);
    control.bytes_mut().fill(0x11);
    for x in [&m, &control] {
        x.madvise(0, x.len, libc::MADV_FREE).map_err(err)?;
    }
    let half = Mapping::view(m.addr, m.len / 2);
    map(&f, &half, true)?;
    run(&f, fill_job(m.addr, m.len, 0xd7))?;
    for x in [&m, &control] {
        x.madvise(0, x.len, MADV_PAGEOUT).map_err(err)?;
    }
    let discarded = pages_not(&control, 0).len();
    check_eq(
        discarded,
        0,
        "control pages (lazyfree, never written) left after MADV_PAGEOUT",
    )
    .map_err(|e| format!("{e}: reclaim did not run, the test proves nothing"))?;
    nothing_lost(&m, 0xd7, "reclaim")?;
    clean(&f)
}

/// After `fork` the parent's pages are shared copy-on-write with the child. One device write
/// fault on page 0 must break COW on page 0 only: the rest of the fault-around window is
/// faulted for read, so the CPU keeps those pages write-protected and shared (checked with
/// SNAPSHOT's CPU half), and the child still reads its own bytes.
pub fn write_fault_breaks_cow_only_on_the_written_page() -> Result<(), String> {
    const PAGES: usize = 64;
    let f = open()?;
    let mut m = Mapping::anon(PAGES * PG).map_err(err)?;
    m.madvise(0, m.len, libc::MADV_NOHUGEPAGE).map_err(err)?;
    m.bytes_mut().fill(b'P');
    let (addr, len) = (m.addr, m.len);
    let child = GatedChild::fork(|| {
        let view = Mapping::view(addr, len);
        i32::from(view.bytes().iter().any(|&x| x != b'P'))
    })?;
    let r = write_one_page_after_fork(&f, &m);
    let status = child.release();
    r?;
    check_eq(
        status,
        0,
        "the child still reads its own bytes (its exit status)",
    )?;
    clean(&f)
}

fn write_one_page_after_fork(f: &File, m: &Mapping) -> Result<(), String> {
    let d = run(f, fill_job(m.addr, PG, b'D'))?;
    if d.faults == 0 {
        return Err(format!("the write took no device fault: {d:?}"));
    }
    let snap = dev::snapshot(f, m.addr, m.len / PG).map_err(|e| format!("SNAPSHOT: {e}"))?;
    check_eq(
        snap[0] & ZG_SNAP_CPU_WRITE != 0,
        true,
        "the written page is CPU-writable (COW broken)",
    )?;
    let broken: Vec<usize> = (1..snap.len())
        .filter(|&i| snap[i] & ZG_SNAP_CPU_WRITE != 0)
        .collect();
    if !broken.is_empty() {
        return Err(format!(
            "{} pages the device never wrote were made CPU-writable (COW broken), first page {}: {}",
            broken.len(),
            broken[0],
            dev::snap_names(&snap[broken[0]..broken[0] + 1])
        ));
    }
    check_eq(pages_not(m, b'P'), vec![0], "pages that changed")?;
    Ok(())
}

/// A tmpfs file mapped `MAP_PRIVATE`: a device write fault on page 0 makes page 0 a private
/// copy, and nothing else. A later `pwrite` to page 40 of the file must show through the
/// mapping (a page the device never wrote still follows the file), and the file's page 0 keeps
/// the file's bytes.
pub fn map_private_file_pages_follow_the_file_after_a_device_write() -> Result<(), String> {
    const PAGES: usize = 64;
    let f = open()?;
    // SAFETY: a plain syscall with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"zg-private".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this descriptor.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(&vec![b'F'; PAGES * PG]).map_err(err)?;
    let m = map_file(&file, PAGES, libc::MAP_PRIVATE, b'F')?;
    run(&f, fill_job(m.addr, PG, b'D'))?;
    use std::os::unix::fs::FileExt;
    file.write_all_at(&[b'N'; PG], 40 * PG as u64)
        .map_err(err)?;
    let page40 = &m.bytes()[40 * PG..41 * PG];
    if page40.iter().any(|&b| b != b'N') {
        return Err(format!(
            "page 40, never written by the device, no longer follows the file (reads {:?})",
            page40[0] as char
        ));
    }
    check_eq(m.bytes()[0], b'D', "the device's private page 0")?;
    let mut first = [0u8; 1];
    file.read_exact_at(&mut first, 0).map_err(err)?;
    check_eq(
        first[0],
        b'F',
        "the file's page 0 (the device wrote a private copy)",
    )?;
    clean(&f)
}

/// The driver's job timeout for the isolation test (`job_timeout_ms`).
const JOB_TIMEOUT_MS: u64 = 2000;

/// Process A's job stalls on a userfaultfd page nobody answers, after a first fault the handler
/// holds for `HOLD`. Process B's job, submitted meanwhile, waits behind A's in the device's
/// in-order engine. A's job alone is aborted (`ETIMEDOUT`) once its fault is overdue; B's job
/// then completes with the right checksum, and a third process afterwards works normally: the
/// device was never failed.
pub fn stalled_fault_costs_only_its_own_context() -> Result<(), String> {
    crate::failsafe::with_params(
        &[&format!("job_timeout_ms={JOB_TIMEOUT_MS}")],
        stalled_fault_isolation,
    )
}

/// How long the handler holds A's first fault (answered), so that A's unanswered fault starts
/// well after B's job was queued.
const HOLD: Duration = Duration::from_millis(700);

fn stalled_fault_isolation() -> Result<(), String> {
    let a = open()?;
    let m = Mapping::anon(2 * PG).map_err(err)?;
    let fd = uffd::register(&m)?;
    let (release, released) = std::sync::mpsc::channel::<()>();
    let handler = std::thread::spawn(move || {
        uffd::answer(&fd, 0x5a, HOLD, 1)?;
        // The second fault is held until the test is done (20 s at most).
        let _ = released.recv_timeout(Duration::from_secs(20));
        uffd::answer(&fd, 0x5a, Duration::ZERO, 1)
    });
    let (mut from_b, b_pid) = start_b()?;
    let addr = m.addr;
    let a2 = a.try_clone().map_err(err)?;
    let job_a = std::thread::spawn(move || {
        let t = Instant::now();
        let r = dev::dma(&a2, dev::job(DMA_CHECKSUM, addr, 0, 2 * PG, 0));
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: B waits for SIGUSR1 to submit its job.
    unsafe { libc::kill(b_pid, libc::SIGUSR1) };
    let (ra, took_a) = job_a.join().map_err(|_| "job thread panicked")?;
    let mut report = String::new();
    let _ = from_b.read_to_string(&mut report);
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(b_pid, &mut status, 0) };
    let _ = release.send(());
    handler.join().map_err(|_| "handler panicked")??;
    println!(
        "# A's job ended after {} ms: {:?}",
        took_a.as_millis(),
        ra.as_ref().map(|_| ()).map_err(|(e, _)| e.to_string())
    );
    println!("# B: {}", report.trim());
    let errno_a = match ra {
        Ok(d) => return Err(format!("A's job on an unanswered fault succeeded: {d:?}")),
        Err((e, _)) => dev::errno(&e),
    };
    check_eq(
        report.trim().starts_with("ok"),
        true,
        "B's job, queued behind A's stalled one, completed with the right checksum",
    )?;
    check_eq(
        errno_a,
        libc::ETIMEDOUT,
        "errno of A's job (its own fault stalled)",
    )?;
    let third = fork_wait(|| {
        let Ok(f) = dev::open() else { return 10 };
        let Ok(mut b) = Mapping::anon(16 * PG) else {
            return 11;
        };
        b.bytes_mut().fill(3);
        match dev::dma(&f, dev::job(DMA_CHECKSUM, b.addr, 0, b.len, 0)) {
            Ok(d) if d.result == fnv1a64(FNV_OFFSET, b.bytes()) => 0,
            Ok(_) => 12,
            Err(_) => 13,
        }
    })?;
    check_eq(third, 0, "a third process's job afterwards (exit status)")?;
    let s = crate::mirror::stats(&a)?;
    check_eq(s.faults_aborted >= 1, true, "A's faults aborted")
}

/// Process B: its own context, 64 mirrored pages; on SIGUSR1 it runs a checksum job and
/// reports `ok <ms>` or the error through a pipe. Returns the pipe's read end and B's pid.
fn start_b() -> Result<(File, libc::pid_t), String> {
    let mut fds = [0; 2];
    // SAFETY: a pipe into a local array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err("pipe".into());
    }
    // SAFETY: blocking SIGUSR1 in this thread (inherited by the child) so that the child can
    // wait for it with sigwait; the parent restores its mask right after the fork.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: initialising and applying a signal set we own.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
    }
    let (rd, wr) = (fds[0], fds[1]);
    let pid = fork_child(move || {
        // SAFETY: our copy of the read end.
        unsafe { libc::close(rd) };
        // SAFETY: `wr` is our pipe's write end, owned by this process from now on.
        let mut out = unsafe { File::from_raw_fd(wr) };
        let msg = b_job(&set);
        let _ = out.write_all(msg.as_bytes());
        i32::from(!msg.starts_with("ok"))
    });
    // SAFETY: restoring the parent's mask; closing the parent's copy of the write end.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        libc::close(wr);
    }
    let pid = pid?;
    // SAFETY: `rd` is the read end, owned by the parent from now on.
    Ok((unsafe { File::from_raw_fd(rd) }, pid))
}

fn b_job(set: &libc::sigset_t) -> String {
    let Ok(f) = dev::open() else {
        return "open failed".into();
    };
    let Ok(mut b) = Mapping::anon(64 * PG) else {
        return "mmap failed".into();
    };
    b.bytes_mut().fill(0x42);
    if let Err(e) = dev::map(&f, b.addr, b.len, 0) {
        return format!("MAP: {e}");
    }
    let mut sig = 0;
    // SAFETY: waiting for a signal of a set blocked in this thread.
    unsafe { libc::sigwait(set, &mut sig) };
    let t = Instant::now();
    match dev::dma(&f, dev::job(DMA_CHECKSUM, b.addr, 0, b.len, 0)) {
        Ok(d) if d.result == fnv1a64(FNV_OFFSET, b.bytes()) => {
            format!("ok after {} ms", t.elapsed().as_millis())
        }
        Ok(d) => format!("wrong checksum {:#x}", d.result),
        Err((e, _)) => format!("error {e} after {} ms", t.elapsed().as_millis()),
    }
}

/// A device fault is held in a userfaultfd handler whose file the test keeps; the faulting
/// process is killed. Its exit must not wait out the job timeout (its close aborts its own
/// stalled job), and `rmmod` meanwhile must wait for the fault work (or fail cleanly), never
/// unload the module under it: the handler's file is closed while rmmod waits, the work ends,
/// rmmod completes, and the module loads again.
pub fn rmmod_waits_for_a_held_fault() -> Result<(), String> {
    let handoff = dev::Handoff::new().map_err(err)?;
    let pid = fork_child(|| {
        let Ok(f) = dev::open() else { return 10 };
        let Ok(m) = Mapping::anon(PG) else { return 11 };
        let Ok(fd) = uffd::register(&m) else {
            return 12;
        };
        if handoff.give(fd.as_raw_fd()).is_err() {
            return 13;
        }
        drop(fd);
        let _ = dev::dma(&f, dev::job(DMA_CHECKSUM, m.addr, 0, PG, 0));
        14
    })?;
    let uffd_file = handoff
        .take(pid)
        .map_err(|e| format!("take the userfaultfd: {e}"))?;
    // Let the child's job fault and its fault work block in the handler.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    // SAFETY: killing our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let exit_took = t.elapsed();
    println!(
        "# the killed process's exit took {} ms",
        exit_took.as_millis()
    );
    let rmmod = std::thread::spawn(|| {
        let t = Instant::now();
        let r = crate::run_cmd("rmmod", &["zapguard"]);
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(1000));
    let waited = rmmod.is_finished();
    // The handler goes: the fault work's userfaultfd wait ends.
    drop(uffd_file);
    let (r, rmmod_took) = rmmod.join().map_err(|_| "rmmod thread panicked")?;
    println!(
        "# rmmod {} after {} ms (before the handler's file closed: {waited})",
        if r.is_ok() { "succeeded" } else { "failed" },
        rmmod_took.as_millis()
    );
    let loaded = std::path::Path::new(crate::DRIVER_DIR).exists();
    crate::failsafe::reload(&[])?;
    let f = open()?;
    dev::get_info(&f).map_err(|e| format!("GET_INFO after reload: {e}"))?;
    if exit_took > Duration::from_secs(5) {
        return Err(format!(
            "the killed process's exit took {} ms: its close waited for the held fault",
            exit_took.as_millis()
        ));
    }
    if r.is_ok() && waited {
        return Err(format!(
            "rmmod returned in {} ms while the fault work was still blocked",
            rmmod_took.as_millis()
        ));
    }
    if r.is_err() && !loaded {
        return Err("rmmod failed but the driver is gone".into());
    }
    Ok(())
}

/// The swap device of the dirty-tracking test: a loop device over the first RAM disk. Not the
/// RAM disk itself: swap-in from a synchronous device (brd, zram) always drops the page from the
/// swap cache and dirties it, so only a device like a disk keeps a clean swap-cache page mapped.
const SWAP_DEV: &str = "/dev/loop0";

fn ensure_swap() -> Result<(), String> {
    let swaps = std::fs::read_to_string("/proc/swaps").map_err(|e| format!("/proc/swaps: {e}"))?;
    if swaps.contains(SWAP_DEV) {
        return Ok(());
    }
    // Set up once per boot (losetup fails if it already is).
    let _ = crate::run_cmd("losetup", &[SWAP_DEV, "/dev/ram0"]);
    crate::run_cmd("mkswap", &[SWAP_DEV])?;
    crate::run_cmd("swapon", &[SWAP_DEV])
}

/// Pages of `m` the CPU still maps (SNAPSHOT's CPU half: reclaim unmapped the others).
fn cpu_mapped(f: &File, m: &Mapping) -> Result<usize, String> {
    let snap = dev::snapshot(f, m.addr, m.len / PG).map_err(|e| format!("SNAPSHOT: {e}"))?;
    Ok(snap.iter().filter(|&&b| b & ZG_SNAP_CPU_VALID != 0).count())
}

/// `MADV_PAGEOUT` on `m` until reclaim unmapped every page (at most 5 tries, 50 ms apart), or an
/// error naming `what`: a folio still in a per-CPU LRU batch (swap-in completion can queue it
/// on another CPU) is not isolated by one pass, which once left all 64 pages mapped in a full
/// KASAN run.
fn page_out(f: &File, m: &Mapping, what: &str) -> Result<(), String> {
    let mut mapped = 0;
    for attempt in 0..5 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        m.madvise(0, m.len, MADV_PAGEOUT).map_err(err)?;
        mapped = cpu_mapped(f, m)?;
        if mapped == 0 {
            if attempt > 0 {
                println!(
                    "# {what}: reclaim unmapped every page at try {}",
                    attempt + 1
                );
            }
            return Ok(());
        }
    }
    check_eq(
        mapped,
        0,
        &format!("pages still mapped after {what}, 5 tries"),
    )
}

/// A swapped-out anonymous page read back through the swap cache (`MADV_WILLNEED`, then a CPU
/// read) is mapped writable but clean: the swap slot still holds its data (on a disk-like swap
/// device, see [`SWAP_DEV`]). The device writes
/// every page (half through a write MAP, half through device faults), and reclaim runs again:
/// a clean swap-cache page is dropped without being written, so the device's data survives only
/// if the driver marked the pages dirty. Reclaim is checked to have unmapped the pages.
pub fn device_writes_survive_swap_cache_reclaim() -> Result<(), String> {
    ensure_swap()?;
    let r = swap_cache_reclaim();
    // The rest of the suite (the OOM killer's test above all) runs without swap.
    let off = crate::run_cmd("swapoff", &[SWAP_DEV]);
    r?;
    off
}

fn swap_cache_reclaim() -> Result<(), String> {
    on_one_cpu(swap_cache_reclaim_pinned)
}

fn swap_cache_reclaim_pinned() -> Result<(), String> {
    const PAGES: usize = 64;
    let f = open()?;
    let mut m = Mapping::anon(PAGES * PG).map_err(err)?;
    m.madvise(0, m.len, libc::MADV_NOHUGEPAGE).map_err(err)?;
    m.bytes_mut().fill(0x22);
    page_out(&f, &m, "the first MADV_PAGEOUT")?;
    m.madvise(0, m.len, libc::MADV_WILLNEED).map_err(err)?;
    check_eq(pages_not(&m, 0x22), vec![], "pages read back from swap")?;
    let snap = dev::snapshot(&f, m.addr, PAGES).map_err(|e| format!("SNAPSHOT: {e}"))?;
    let writable = snap.iter().filter(|&&b| b & ZG_SNAP_CPU_WRITE != 0).count();
    println!("# {writable} of {PAGES} swapped-in pages are CPU-writable (and clean)");
    if writable == 0 {
        return Err("no swapped-in page is mapped writable: the scenario did not happen".into());
    }
    map(&f, &Mapping::view(m.addr, m.len / 2), true)?;
    run(&f, fill_job(m.addr, m.len, 0xd8))?;
    page_out(&f, &m, "the second MADV_PAGEOUT")?;
    nothing_lost(&m, 0xd8, "swap (a clean swap-cache copy)")?;
    clean(&f)
}

/// Where the ext2 file system of the second RAM disk is mounted (once per boot).
const EXT2_DIR: &str = "/mnt/zg-ext2";

fn ensure_ext2() -> Result<(), String> {
    let mounts =
        std::fs::read_to_string("/proc/mounts").map_err(|e| format!("/proc/mounts: {e}"))?;
    if mounts.contains(EXT2_DIR) {
        return Ok(());
    }
    crate::run_cmd("mke2fs", &["-q", "/dev/ram1"])?;
    std::fs::create_dir_all(EXT2_DIR).map_err(|e| format!("mkdir {EXT2_DIR}: {e}"))?;
    crate::run_cmd("mount", &["-t", "ext2", "/dev/ram1", EXT2_DIR])
}

/// A `MAP_SHARED` file on ext2 (a real disk file system, with `page_mkwrite` and writeback),
/// cleaned by `fsync`, is written by the device (half through a write MAP, half through device
/// faults); then `munmap`, `sync` and `drop_caches` throw the page cache away, and `read()`
/// through the file must return what the device wrote.
pub fn device_writes_reach_an_ext2_file_through_writeback() -> Result<(), String> {
    const PAGES: usize = 64;
    ensure_ext2()?;
    let f = open()?;
    let path = format!("{EXT2_DIR}/shared-{}", std::process::id());
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("{path}: {e}"))?;
    file.write_all(&vec![b'O'; PAGES * PG]).map_err(err)?;
    file.sync_all().map_err(err)?;
    let mut m = map_file(&file, PAGES, libc::MAP_SHARED, b'O')?;
    map(&f, &Mapping::view(m.addr, m.len / 2), true)?;
    run(&f, fill_job(m.addr, m.len, b'V'))?;
    m.unmap();
    // SAFETY: sync() takes no arguments.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").map_err(|e| format!("drop_caches: {e}"))?;
    let mut back = vec![0u8; PAGES * PG];
    use std::os::unix::fs::FileExt;
    file.read_exact_at(&mut back, 0).map_err(err)?;
    let _ = std::fs::remove_file(&path);
    let lost: Vec<usize> = back
        .chunks(PG)
        .enumerate()
        .filter(|(_, p)| p.iter().any(|&b| b != b'V'))
        .map(|(i, _)| i)
        .collect();
    if !lost.is_empty() {
        return Err(format!(
            "{} of {PAGES} file pages the device wrote read back without its data (first: page {})",
            lost.len(),
            lost[0]
        ));
    }
    clean(&f)
}

/// A lazily freeable THP (`MADV_FREE` on the whole 2 MiB: clean, still PMD-mapped writable) is
/// mapped writable by one 2 MiB device entry and filled by the device; then a MAP of one of its
/// pages splits the device entry into 4 KiB entries, and reclaim runs. The device wrote through
/// the 2 MiB entry, so the split entries must carry its dirty bit, or reclaim discards the THP.
/// A control THP, freed the same way and not written by the device, must be discarded.
pub fn device_writes_to_a_split_thp_survive_reclaim() -> Result<(), String> {
    on_one_cpu(split_thp_reclaim)
}

fn split_thp_reclaim() -> Result<(), String> {
    const HUGE: usize = 2 << 20;
    let f = open()?;
    let mut a = Mapping::anon_huge(HUGE).map_err(err)?;
    let mut control = Mapping::anon_huge(HUGE).map_err(err)?;
    for x in [&mut a, &mut control] {
        x.bytes_mut().fill(0x33);
        crate::mirror::ensure_thp(&f, x)?;
        x.madvise(0, x.len, libc::MADV_FREE).map_err(err)?;
    }
    check_eq(
        map(&f, &a, true)?.huge,
        1,
        "2 MiB device entries of the write MAP",
    )?;
    run(&f, fill_job(a.addr, a.len, 0xe1))?;
    map(&f, &Mapping::view(a.addr, PG), true)?;
    let snap = dev::snapshot(&f, a.addr, HUGE / PG).map_err(|e| format!("SNAPSHOT: {e}"))?;
    if snap.iter().any(|&b| b & ZG_SNAP_DEV_HUGE != 0) {
        return Err("the device entry was not split into 4 KiB entries".into());
    }
    for x in [&a, &control] {
        x.madvise(0, x.len, MADV_PAGEOUT).map_err(err)?;
    }
    check_eq(
        pages_not(&control, 0).len(),
        0,
        "control pages left after MADV_PAGEOUT",
    )
    .map_err(|e| {
        format!("{e}: reclaim did not discard the lazyfree THP, the test proves nothing")
    })?;
    nothing_lost(&a, 0xe1, "reclaim after the split")?;
    clean(&f)
}

/// dma-debug's list of live DMA mappings (the lock-debugging kernel has `CONFIG_DMA_API_DEBUG`).
const DMA_API_DUMP: &str = "/sys/kernel/debug/dma-api/dump";
/// "Y" when dma-debug is off (`dma_debug=off`, or it disabled itself).
const DMA_API_DISABLED: &str = "/sys/kernel/debug/dma-api/disabled";

/// The lines of dma-debug's list of live DMA mappings and coherent allocations that `keep`
/// selects, or a skip on a kernel without dma-debug.
fn dma_debug_entries(keep: impl Fn(&str) -> bool) -> Result<Vec<String>, String> {
    if !std::path::Path::new(DMA_API_DUMP).exists() {
        // debugfs may just not be mounted yet.
        // SAFETY: NUL-terminated literals; mounting debugfs at its usual place.
        unsafe {
            libc::mount(
                c"debugfs".as_ptr(),
                c"/sys/kernel/debug".as_ptr(),
                c"debugfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
    }
    // Booted with `dma_debug=off`, the files exist but the dump walks hash buckets that were
    // never initialised: 7.3.4 oopses in dump_show(). Only read it when dma-debug is on.
    let enabled = std::fs::read_to_string(DMA_API_DISABLED).is_ok_and(|d| d.trim() == "N");
    let dump = match enabled.then(|| std::fs::read_to_string(DMA_API_DUMP)) {
        Some(Ok(d)) => d,
        _ => {
            return Err(crate::ktap::skip(
                "dma-debug is off (the lock-debugging kernel's run has it on)",
            ))
        }
    };
    Ok(dump
        .lines()
        .filter(|l| keep(l))
        .map(str::to_owned)
        .collect())
}

/// The physical addresses of the zapguard driver's live streaming DMA mappings (coherent
/// allocations, the rings and table pool, left out), or a skip on a kernel without dma-debug.
fn dma_mapped_pages() -> Result<Vec<u64>, String> {
    // "zapguard 0000:00:03.0 phy idx 12 P=0x... D=... L=... cln=... DMA_BIDIRECTIONAL ..."
    Ok(dma_debug_entries(|l| l.starts_with("zapguard "))?
        .iter()
        .filter(|l| !l.contains(" coherent "))
        .filter_map(|l| {
            let p = l.split_whitespace().find_map(|w| w.strip_prefix("P="))?;
            u64::from_str_radix(p.trim_start_matches("0x"), 16).ok()
        })
        .collect())
}

/// The live coherent allocations (rings, context table, table pool, bounce buffers) and DMA
/// mappings of device `bdf`, as dma-debug counts them. By device, not by driver: once the
/// driver is unbound, dma-debug names what is left by the bus ("pci 0000:00:03.0 ...").
fn dma_entries_of(bdf: &str) -> Result<(usize, usize), String> {
    let lines = dma_debug_entries(|l| l.split_whitespace().nth(1) == Some(bdf))?;
    let coherent = lines.iter().filter(|l| l.contains(" coherent ")).count();
    Ok((coherent, lines.len() - coherent))
}

/// How many of the pages of `pfns` are among the driver's DMA mappings.
fn dma_mapped_of(pfns: &[u64]) -> Result<usize, String> {
    let mapped = dma_mapped_pages()?;
    Ok(pfns
        .iter()
        .filter(|&&pfn| mapped.contains(&(pfn * PG as u64)))
        .count())
}

/// The device gets DMA addresses for user pages (`hmm_dma_map_pfn`), never raw physical
/// ones, and gives each back once it no longer maps the page: dma-debug, which sees every
/// mapping, lists every page the device maps, at the CPU's page, and none of them once they
/// are unmapped or the file is closed. (Without an IOMMU the address is the physical one, so
/// only dma-debug can tell the difference.)
pub fn user_pages_are_dma_mapped_while_the_device_maps_them() -> Result<(), String> {
    const PAGES: usize = 64;
    let before = dma_mapped_pages()?.len();
    let f = open()?;
    let mut m = Mapping::anon(PAGES * PG).map_err(err)?;
    m.madvise(0, m.len, libc::MADV_NOHUGEPAGE).map_err(err)?;
    m.bytes_mut().fill(0x5a);
    map(&f, &m, true)?;
    let pfns = crate::hmm::pfns(&m)?;
    check_eq(dma_mapped_of(&pfns)?, PAGES, "pages DMA-mapped after MAP")?;
    // munmap the first half: those go (after the shootdown's SYNC), the rest stay.
    let half = m.len / 2;
    let (mut first_half, mut m) = m.split_at(half);
    first_half.unmap();
    check_eq(
        dma_mapped_of(&pfns[..PAGES / 2])?,
        0,
        "unmapped pages still DMA-mapped",
    )?;
    check_eq(
        dma_mapped_of(&pfns[PAGES / 2..])?,
        PAGES / 2,
        "pages still mapped by the device that are DMA-mapped",
    )?;
    drop(f);
    check_eq(
        dma_mapped_of(&pfns)?,
        0,
        "pages DMA-mapped after the file closed",
    )?;
    check_eq(
        dma_mapped_pages()?.len(),
        before,
        "driver DMA mappings after close (before the test: the baseline)",
    )?;
    m.unmap();
    Ok(())
}

/// An unbind gives back everything the driver got from the DMA API for the device, although a
/// process keeps its file open, its address space mirrored and a bounce buffer allocated: the
/// driver's coherent memory (rings, context table, table pool, bounce buffer) and the user pages
/// it mapped. The file then gets `ENODEV`, and the process's munmap (an invalidation of a context
/// whose tables are gone) and close are quiet. Rebinding brings all of it back.
pub fn unbind_frees_dma_memory_while_files_stay_open() -> Result<(), String> {
    const PAGES: usize = 64;
    let bdf = crate::bound_devices()?
        .into_iter()
        .next()
        .ok_or("no bound device")?;
    let (bound, _) = dma_entries_of(&bdf)?;
    if bound == 0 {
        return Err(
            "dma-debug lists no coherent allocation of the bound device: the dump's \
                    format changed, this test would prove nothing"
                .into(),
        );
    }
    let f = open()?;
    let mut m = Mapping::anon(PAGES * PG).map_err(err)?;
    m.madvise(0, m.len, libc::MADV_NOHUGEPAGE).map_err(err)?;
    map(&f, &m, true)?;
    run(&f, fill_job(m.addr, m.len, 0x3c))?;
    // A READ: the context's bounce buffer is a coherent allocation too.
    let mut sink = vec![0u8; PG];
    run(
        &f,
        dev::job(
            shared_regs::dma::DMA_READ,
            m.addr,
            0,
            PG,
            sink.as_mut_ptr() as u64,
        ),
    )?;
    check_eq(sink[0], 0x3c, "byte the device read back")?;
    let (with_file, mapped) = dma_entries_of(&bdf)?;
    let t = Instant::now();
    std::fs::write(format!("{}/unbind", crate::DRIVER_DIR), &bdf)
        .map_err(|e| format!("unbind {bdf}: {e}"))?;
    let unbind = t.elapsed();
    let after = (|| {
        let left = dma_entries_of(&bdf)?;
        let info = dev::get_info(&f).map(|_| ()).map_err(|e| dev::errno(&e));
        // The invalidation of a context whose device memory is gone.
        m.unmap();
        Ok::<_, String>((left, info))
    })();
    drop(f);
    std::fs::write(format!("{}/bind", crate::DRIVER_DIR), &bdf)
        .map_err(|e| format!("rebind {bdf}: {e}"))?;
    let ((coherent_left, mapped_left), info) = after?;
    println!(
        "# coherent allocations: {bound} bound, {with_file} with the file's bounce buffer, \
         {coherent_left} after unbind ({unbind:.1?}); DMA mappings: {mapped}, {mapped_left} after \
         unbind"
    );
    if with_file <= bound || mapped < PAGES {
        return Err(format!(
            "the file's bounce buffer ({with_file} vs {bound} allocations) or its {PAGES} mapped \
             pages ({mapped}) are not in dma-debug's list: the test would prove nothing"
        ));
    }
    check_eq(
        coherent_left,
        0,
        "coherent allocations left after unbind, file open",
    )?;
    check_eq(mapped_left, 0, "DMA mappings left after unbind, file open")?;
    check_eq(info, Err(libc::ENODEV), "GET_INFO after unbind")?;
    check_eq(
        dma_entries_of(&bdf)?.0,
        bound,
        "coherent allocations after rebind",
    )?;
    let f = open()?;
    check_eq(
        dev::get_info(&f).map_err(err)?.ident,
        shared_regs::regs::IDENT_MAGIC,
        "IDENT after rebind",
    )
}
