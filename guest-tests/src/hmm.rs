//! The hmm-tests scenarios (`tools/testing/selftests/mm/hmm-tests.c`) that apply to a mirroring
//! device, and the mm events and races beyond them. Every test ends with the context's violation
//! count at zero: the device itself confirms that it never used a zapped page.

use crate::dev::{self, Mapping};
use crate::dmirror::{run as hmm_run, HMM_DMIRROR_READ, HMM_DMIRROR_WRITE};
use crate::ktap::check_eq;
use crate::mirror::{clean, fill_job, map, open, run, run_err, stats};
use crate::proc::fork_wait;
use shared_regs::dma::*;
use shared_regs::testing::*;
use shared_regs::uapi::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::dev::PG;

pub fn hmm_prot_none_read_efault() -> Result<(), String> {
    let f = open()?;
    let a = Mapping::new(
        4 * PG,
        libc::PROT_NONE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    )
    .map_err(|e| e.to_string())?;
    let r = dev::map(&f, a.addr, a.len, 0).err().map(|e| dev::errno(&e));
    check_eq(r, Some(libc::EFAULT), "MAP of PROT_NONE")?;
    let mut buf = vec![0u8; a.len];
    let d = run_err(
        &f,
        dev::job(DMA_READ, a.addr, 0, a.len, buf.as_mut_ptr() as u64),
        libc::EFAULT,
    )?;
    check_eq(d.status, DMA_ST_FAULT.into(), "status")?;
    clean(&f)
}

pub fn hmm_write_readonly_eperm_then_rw() -> Result<(), String> {
    let f = open()?;
    let mut a = Mapping::anon(4 * PG).map_err(|e| e.to_string())?;
    a.bytes_mut().fill(1);
    a.protect(libc::PROT_READ).map_err(|e| e.to_string())?;
    let r = dev::map(&f, a.addr, a.len, ZG_MAP_WRITE)
        .err()
        .map(|e| dev::errno(&e));
    check_eq(r, Some(libc::EPERM), "write MAP of a read-only range")?;
    run_err(&f, fill_job(a.addr, a.len, 2), libc::EPERM)?;
    a.protect(libc::PROT_READ | libc::PROT_WRITE)
        .map_err(|e| e.to_string())?;
    map(&f, &a, true)?;
    run(&f, fill_job(a.addr, a.len, 3))?;
    if a.bytes().iter().any(|&b| b != 3) {
        return Err("device write after mprotect(RW) not visible".into());
    }
    clean(&f)
}

pub fn hmm_shared_fork_parent_sees_child() -> Result<(), String> {
    let a = Mapping::shared_anon(4 * PG).map_err(|e| e.to_string())?;
    let (addr, len) = (a.addr, a.len);
    // The child writes through its own context; MAP_SHARED means the parent sees it.
    let code = fork_wait(|| {
        let Ok(f) = dev::open() else { return 1 };
        match dev::dma(&f, fill_job(addr, len, 0x77)) {
            Ok(_) => 0,
            Err(_) => 2,
        }
    })?;
    check_eq(code, 0, "child device write")?;
    if a.bytes().iter().any(|&b| b != 0x77) {
        return Err("parent does not see the child's device write to MAP_SHARED".into());
    }
    Ok(())
}

/// A file of `len` bytes of `byte` in the guest's tmpfs, mapped shared.
fn tmpfs_file(len: usize, byte: u8, tmpfile: bool) -> Result<(std::fs::File, Mapping), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = if tmpfile {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open("/tmp")
    } else {
        let p = format!("/tmp/zapguard-{}", std::process::id());
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p);
        let _ = std::fs::remove_file(&p);
        f
    }
    .map_err(|e| format!("tmpfs file: {e}"))?;
    file.write_all(&vec![byte; len])
        .map_err(|e| e.to_string())?;
    let m = Mapping::new(
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
        file.as_raw_fd(),
        0,
    )
    .map_err(|e| e.to_string())?;
    Ok((file, m))
}

fn file_read_write(tmpfile: bool) -> Result<(), String> {
    let f = open()?;
    let (mut file, m) = tmpfs_file(8 * PG, 0x31, tmpfile)?;
    let mut buf = vec![0u8; m.len];
    run(
        &f,
        dev::job(DMA_READ, m.addr, 0, m.len, buf.as_mut_ptr() as u64),
    )?;
    if buf.iter().any(|&b| b != 0x31) {
        return Err("device read of the file mapping differs from the file".into());
    }
    run(&f, fill_job(m.addr, m.len, 0x42))?;
    let mut back = vec![0u8; m.len];
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    file.read_exact(&mut back).map_err(|e| e.to_string())?;
    if back.iter().any(|&b| b != 0x42) {
        return Err("pread does not see the device's write to the file mapping".into());
    }
    clean(&f)
}

pub fn hmm_file_tmpfs_read_write() -> Result<(), String> {
    file_read_write(false)
}

pub fn hmm_file_o_tmpfile_read_write() -> Result<(), String> {
    file_read_write(true)
}

pub fn hmm_repeated_reads_fault_once() -> Result<(), String> {
    let f = open()?;
    let mut a = Mapping::anon(16 * PG).map_err(|e| e.to_string())?;
    a.bytes_mut().fill(9);
    let mut buf = vec![0u8; a.len];
    run(
        &f,
        dev::job(DMA_READ, a.addr, 0, a.len, buf.as_mut_ptr() as u64),
    )?;
    let s0 = stats(&f)?;
    for _ in 0..16 {
        let d = run(
            &f,
            dev::job(DMA_READ, a.addr, 0, a.len, buf.as_mut_ptr() as u64),
        )?;
        check_eq(d.faults, 0, "faults on a mirrored range")?;
        if buf.iter().any(|&b| b != 9) {
            return Err("repeated read returned other data".into());
        }
    }
    check_eq(
        stats(&f)?.faults,
        s0.faults,
        "device faults after the first read",
    )?;
    clean(&f)
}

pub fn hmm_two_contexts_same_memory() -> Result<(), String> {
    let (f1, f2) = (open()?, open()?);
    let mut a = Mapping::anon(8 * PG).map_err(|e| e.to_string())?;
    for (i, b) in a.bytes_mut().iter_mut().enumerate() {
        *b = i as u8;
    }
    let (s1, s2) = (stats(&f1)?, stats(&f2)?);
    if s1.asid == s2.asid {
        return Err(format!("two contexts share ASID {}", s1.asid));
    }
    let c1 = run(&f1, dev::job(DMA_CHECKSUM, a.addr, 0, a.len, 0))?;
    let c2 = run(&f2, dev::job(DMA_CHECKSUM, a.addr, 0, a.len, 0))?;
    check_eq(c1.result, c2.result, "checksums through two ASIDs")?;
    // A shootdown reaches both.
    a.madvise(0, a.len, libc::MADV_DONTNEED)
        .map_err(|e| e.to_string())?;
    for f in [&f1, &f2] {
        let snap = dev::snapshot(f, a.addr, 8).map_err(|e| e.to_string())?;
        if snap.iter().any(|s| s & ZG_SNAP_DEV_PRESENT != 0) {
            return Err("a context kept PTEs after MADV_DONTNEED".into());
        }
    }
    clean(&f1)?;
    clean(&f2)
}

pub fn hmm_mremap_moves_the_mirror() -> Result<(), String> {
    let f = open()?;
    let mut a = Mapping::anon(4 * PG).map_err(|e| e.to_string())?;
    a.bytes_mut().fill(0x66);
    map(&f, &a, true)?;
    // SAFETY: moving our own mapping; `a` is forgotten and the new one owned below.
    let new = unsafe { libc::mremap(a.addr as *mut _, a.len, 2 * a.len, libc::MREMAP_MAYMOVE) };
    if new == libc::MAP_FAILED {
        return Err(format!("mremap: {}", std::io::Error::last_os_error()));
    }
    let old = a.addr;
    std::mem::forget(a);
    let moved = Mapping::adopt(new as usize, 8 * PG);
    let snap = dev::snapshot(&f, old, 4).map_err(|e| e.to_string())?;
    if new as usize != old && snap.iter().any(|s| s & ZG_SNAP_DEV_PRESENT != 0) {
        return Err("device PTEs survived at the old address".into());
    }
    let mut buf = vec![0u8; 4 * PG];
    run(
        &f,
        dev::job(DMA_READ, moved.addr, 0, buf.len(), buf.as_mut_ptr() as u64),
    )?;
    if buf.iter().any(|&b| b != 0x66) {
        return Err("device read at the new address differs".into());
    }
    clean(&f)
}

pub fn hmm_snapshot_mixed_range() -> Result<(), String> {
    let f = open()?;
    // Pages: 0 RW written, 1 RO read (zero page), 2 PROT_NONE, 3 hole, 4 RW untouched.
    let whole = Mapping::anon(5 * PG).map_err(|e| e.to_string())?;
    let addr = whole.addr;
    let (_left, rest) = whole.split_at(3 * PG);
    let (mut hole, _right) = rest.split_at(PG);
    // SAFETY: writes, reads and protection changes on our own mapping.
    unsafe {
        *(addr as *mut u8) = 1;
        let _ = std::ptr::read_volatile((addr + PG) as *const u8);
        libc::mprotect((addr + PG) as *mut _, PG, libc::PROT_READ);
        libc::mprotect((addr + 2 * PG) as *mut _, PG, libc::PROT_NONE);
    }
    dev::map(&f, addr, PG, ZG_MAP_WRITE).map_err(|e| format!("MAP page 0: {e}"))?;
    dev::map(&f, addr + PG, PG, 0).map_err(|e| format!("MAP page 1: {e}"))?;
    let mut out = vec![0u8; 5];
    hole.unmap();
    let mut s = ZgSnapshot {
        va: addr as u64,
        npages: 5,
        out: out.as_mut_ptr() as u64,
        ..Default::default()
    };
    dev::ioctl_raw(&f, ZG_IOC_SNAPSHOT, &mut s as *mut ZgSnapshot as usize)
        .map_err(|e| format!("SNAPSHOT: {e}"))?;
    let want = [
        ZG_SNAP_DEV_PRESENT | ZG_SNAP_DEV_WRITE | ZG_SNAP_CPU_VALID | ZG_SNAP_CPU_WRITE,
        ZG_SNAP_DEV_PRESENT | ZG_SNAP_CPU_VALID,
        ZG_SNAP_CPU_ERROR,
        ZG_SNAP_CPU_ERROR,
        0,
    ];
    check_eq(
        out,
        want.to_vec(),
        "snapshot of RW, RO zero page, PROT_NONE, hole, untouched",
    )?;
    clean(&f)
}

/// How one round of a [`race`] went: the job's outcome, and whether the mm operation overlapped
/// the job (it started before the job's ioctl returned and ended after the ioctl began).
struct Round {
    /// `Ok(record)`, or the errno and the record.
    job: Result<ZgDma, (i32, ZgDma)>,
    overlapped: bool,
}

/// A race's delays between starting the job and the mm operation, round after round: across
/// the job (a [`RACE_PAGES`] job takes a few ms under TCG).
const RACE_DELAYS_US: [u64; 6] = [0, 50, 100, 200, 400, 700];
/// Pages each race's buffer has.
const RACE_PAGES: usize = 2048;

/// The least share of rounds whose mm operation must overlap the job: below it the test did not
/// exercise its race and fails, rather than passing on rounds that never raced.
const RACE_OVERLAP_FLOOR_PERCENT: u32 = 15;

/// Races `mm_op` on a fresh mapping against a DMA job over it, `rounds` times: each round maps
/// the buffer for the device, starts `job` in a thread, waits (see [`RACE_DELAYS_US`]), runs `mm_op`, and
/// hands the round to `verify` (the job may succeed, or fail with `EFAULT`/`EPERM` once the
/// range went; any other errno fails). Fails unless at least [`RACE_OVERLAP_FLOOR_PERCENT`] of
/// the rounds overlapped, and ends with the context's violation check.
fn race(
    rounds: u32,
    setup: impl Fn() -> Result<Mapping, String>,
    job: impl Fn(&Mapping) -> ZgDma,
    mm_op: impl Fn(&mut Mapping) -> Result<(), String>,
    verify: impl Fn(&mut Mapping, &Round) -> Result<(), String>,
) -> Result<(), String> {
    let f = open()?;
    let mut overlapped = 0;
    for i in 0..rounds {
        let mut a = setup()?;
        map(&f, &a, true)?;
        let f2 = f.try_clone().map_err(|e| e.to_string())?;
        let d = job(&a);
        let t0 = Instant::now();
        let t = std::thread::spawn(move || {
            let began = t0.elapsed();
            let r = dev::dma(&f2, d).map_err(|(e, d)| (dev::errno(&e), d));
            (r, began, t0.elapsed())
        });
        std::thread::sleep(Duration::from_micros(
            RACE_DELAYS_US[i as usize % RACE_DELAYS_US.len()],
        ));
        let op_began = t0.elapsed();
        mm_op(&mut a)?;
        let op_ended = t0.elapsed();
        let (job, began, ended) = t.join().map_err(|_| "job thread panicked")?;
        if let Err((errno, d)) = &job {
            if ![libc::EFAULT, libc::EPERM].contains(errno) {
                return Err(format!("round {i}: job failed with errno {errno}: {d:?}"));
            }
        }
        let round = Round {
            job,
            overlapped: op_began < ended && op_ended > began,
        };
        overlapped += u32::from(round.overlapped);
        verify(&mut a, &round).map_err(|e| format!("round {i}: {e}"))?;
    }
    println!("# the mm operation overlapped the job in {overlapped} of {rounds} rounds");
    if overlapped * 100 < rounds * RACE_OVERLAP_FLOOR_PERCENT {
        return Err(format!(
            "only {overlapped} of {rounds} rounds raced (floor {RACE_OVERLAP_FLOOR_PERCENT}%)"
        ));
    }
    clean(&f)
}

fn anon_filled(len: usize) -> Result<Mapping, String> {
    let mut a = Mapping::anon(len).map_err(|e| e.to_string())?;
    a.bytes_mut().fill(1);
    Ok(a)
}

/// Each page of `a` holds one byte value, among `allowed`.
fn pages_uniform_among(a: &Mapping, allowed: &[u8]) -> Result<(), String> {
    for (p, page) in a.bytes().chunks(PG).enumerate() {
        let b = page[0];
        if !allowed.contains(&b) || page.iter().any(|&x| x != b) {
            return Err(format!(
                "page {p} holds {:?}, not one of {allowed:?} throughout",
                &page[..8]
            ));
        }
    }
    Ok(())
}

/// A job that succeeded did all of it; one that failed stopped short.
fn job_length_consistent(r: &Round, len: usize) -> Result<(), String> {
    match &r.job {
        Ok(d) => check_eq(
            d.bytes_done,
            len as u64,
            "bytes done by a job that succeeded",
        ),
        Err((_, d)) if d.bytes_done < len as u64 => Ok(()),
        Err((e, d)) => Err(format!(
            "job failed ({e}) after doing all {} bytes",
            d.bytes_done
        )),
    }
}

pub fn race_munmap_during_dma() -> Result<(), String> {
    race(
        20,
        || anon_filled(RACE_PAGES * PG),
        |a| fill_job(a.addr, a.len, 5),
        // Through `Mapping::unmap`, so that the drop does not unmap a range reused meanwhile.
        |a| {
            a.unmap();
            Ok(())
        },
        |_, r| job_length_consistent(r, RACE_PAGES * PG),
    )
}

pub fn race_madvise_dontneed_during_dma() -> Result<(), String> {
    race(
        20,
        || anon_filled(RACE_PAGES * PG),
        |a| fill_job(a.addr, a.len, 5),
        |a| {
            a.madvise(0, a.len, libc::MADV_DONTNEED)
                .map_err(|e| e.to_string())
        },
        // Every page was dropped: it reads as zeroes, unless the device wrote it again after the
        // drop (5); the original 1s are gone.
        |a, r| {
            job_length_consistent(r, a.len)?;
            pages_uniform_among(a, &[0, 5])
        },
    )
}

pub fn race_madvise_free_during_dma() -> Result<(), String> {
    let len = RACE_PAGES * PG;
    let ones = fnv1a64(FNV_OFFSET, &vec![1u8; len]);
    race(
        20,
        || anon_filled(len),
        |a| dev::job(DMA_CHECKSUM, a.addr, 0, a.len, 0),
        |a| {
            a.madvise(0, a.len, libc::MADV_FREE)
                .map_err(|e| e.to_string())
        },
        // Lazily freed pages keep their bytes until reclaim, which does not run here: the
        // device reads the 1s the CPU wrote.
        |a, r| {
            job_length_consistent(r, a.len)?;
            if let Ok(d) = &r.job {
                check_eq(d.result, ones, "device checksum of the lazily freed buffer")?;
            }
            pages_uniform_among(a, &[1])
        },
    )
}

pub fn race_mprotect_during_dma_writes() -> Result<(), String> {
    race(
        20,
        || anon_filled(RACE_PAGES * PG),
        |a| fill_job(a.addr, a.len, 5),
        |a| a.protect(libc::PROT_READ).map_err(|e| e.to_string()),
        // Each page was written whole or not at all; a job that succeeded wrote every page.
        |a, r| {
            job_length_consistent(r, a.len)?;
            let allowed: &[u8] = if r.job.is_ok() { &[5] } else { &[1, 5] };
            pages_uniform_among(a, allowed)
        },
    )
}

pub fn race_fork_during_dma_writes() -> Result<(), String> {
    race(
        20,
        || anon_filled(RACE_PAGES * PG),
        |a| fill_job(a.addr, a.len, 5),
        |a| {
            // The classic COW bug: the device must not keep writing the pages the child shares.
            // The child copies what it sees at the fork, waits while the parent's job goes on,
            // and fails if any byte of its copy changed.
            let (addr, len) = (a.addr, a.len);
            let code = fork_wait(|| {
                // SAFETY: the child's own copy of the mapping, alive until it exits.
                let view = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                let at_fork = view.to_vec();
                std::thread::sleep(Duration::from_millis(5));
                i32::from(view != at_fork.as_slice())
            })?;
            check_eq(code, 0, "the child's pages did not change after the fork")
        },
        |a, r| {
            job_length_consistent(r, a.len)?;
            if r.job.is_ok() {
                pages_uniform_among(a, &[5])?;
            }
            Ok(())
        },
    )
}

pub fn race_many_threads_map_unmap_submit() -> Result<(), String> {
    let f = open()?;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let f = f.try_clone();
            std::thread::spawn(move || -> Result<(), String> {
                let f = f.map_err(|e| e.to_string())?;
                for i in 0..15 {
                    let mut a = Mapping::anon(16 * PG).map_err(|e| e.to_string())?;
                    a.bytes_mut().fill(t);
                    if i % 2 == 0 {
                        dev::map(&f, a.addr, a.len, ZG_MAP_WRITE).map_err(|e| e.to_string())?;
                    }
                    let mut buf = vec![0u8; a.len];
                    dev::dma(
                        &f,
                        dev::job(DMA_READ, a.addr, 0, a.len, buf.as_mut_ptr() as u64),
                    )
                    .map_err(|(e, _)| e.to_string())?;
                    if buf.iter().any(|&b| b != t) {
                        return Err(format!("thread {t}: read other data"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "thread panicked".to_string())??;
    }
    clean(&f)
}

pub fn processes_are_isolated() -> Result<(), String> {
    // B's buffer address means nothing in A's address space: A's device access there faults.
    let mut b = Mapping::anon(4 * PG).map_err(|e| e.to_string())?;
    b.bytes_mut().fill(0xbb);
    let addr = b.addr;
    let code = fork_wait(|| {
        // The child is "A": replace its copy of B's memory by an inaccessible reservation (so
        // that no later allocation lands there), then aim the device at it.
        // SAFETY: remapping the child's own copy of the range.
        unsafe {
            libc::mmap(
                addr as *mut _,
                4 * PG,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        let Ok(f) = dev::open() else { return 1 };
        let mut buf = vec![0u8; 4 * PG];
        match dev::dma(
            &f,
            dev::job(DMA_READ, addr, 0, 4 * PG, buf.as_mut_ptr() as u64),
        ) {
            Err((e, _)) if dev::errno(&e) == libc::EFAULT => 0,
            _ => 2,
        }
    })?;
    check_eq(code, 0, "A's device read of B's address (0 = EFAULT)")
}

/// Compactions [`compaction_while_mirrored`] asks for before it gives up on moving a page.
const COMPACTION_TRIES: u32 = 5;
/// The memory [`compaction_while_mirrored`] holds above its pages while they are allocated:
/// eight pageblocks (compaction's scanners work in 2 MiB blocks).
const COMPACTION_FILLER: usize = 16 << 20;

pub fn compaction_while_mirrored() -> Result<(), String> {
    let f = open()?;
    // Compaction moves pages from the start of a zone to free space at its end. On the nearly
    // empty memory-only node 1, the allocator hands out the zone's last pages first, where
    // compaction has nowhere further to put them (the test used to skip for that reason:
    // "moved none"). So a filler takes the top of the zone first, the test's pages come below
    // it, mirrored, and the filler goes again: the free space is now above them, and node 1
    // alone is compacted.
    let mut filler = Mapping::anon(COMPACTION_FILLER).map_err(|e| e.to_string())?;
    filler
        .madvise(0, filler.len, libc::MADV_NOHUGEPAGE)
        .map_err(|e| e.to_string())?;
    crate::numa::mbind(&filler, Some(1))?;
    filler
        .bytes_mut()
        .iter_mut()
        .step_by(PG)
        .for_each(|b| *b = 1);
    let mut a = Mapping::anon(64 * PG).map_err(|e| e.to_string())?;
    a.madvise(0, a.len, libc::MADV_NOHUGEPAGE)
        .map_err(|e| e.to_string())?;
    crate::numa::mbind(&a, Some(1))?;
    for (i, x) in a.bytes_mut().iter_mut().enumerate() {
        *x = (i / PG) as u8;
    }
    filler.unmap();
    map(&f, &a, true)?;
    let before = pfns(&a)?;
    // Fail unless something of ours moved: else the test checked nothing.
    let mut moved = 0;
    for _ in 0..COMPACTION_TRIES {
        std::fs::write("/sys/devices/system/node/node1/compact", "1")
            .map_err(|e| format!("node1/compact: {e}"))?;
        moved = before
            .iter()
            .zip(pfns(&a)?)
            .filter(|(b, a)| **b != *a)
            .count();
        if moved > 0 {
            break;
        }
    }
    println!(
        "# compaction moved {moved} of {} mirrored pages",
        before.len()
    );
    if moved == 0 {
        // Nothing to check the device against: say so (an expected skip, listed with why).
        let (lo, hi) = (before.iter().min(), before.iter().max());
        println!("# our PFNs {lo:?}..{hi:?}; node 1: {}", node_zones(1));
        return Err(crate::ktap::skip(&format!(
            "compaction moved none of the {} mirrored pages in {COMPACTION_TRIES} tries",
            before.len()
        )));
    }
    let sum = run(&f, dev::job(DMA_CHECKSUM, a.addr, 0, a.len, 0))?;
    check_eq(
        sum.result,
        fnv1a64(FNV_OFFSET, a.bytes()),
        "checksum after compaction",
    )?;
    clean(&f)
}

/// Node `node`'s populated zones in `/proc/zoneinfo`: name, first PFN, pages spanned and free.
fn node_zones(node: usize) -> String {
    let info = std::fs::read_to_string("/proc/zoneinfo").unwrap_or_default();
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in info.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with("Node ") {
            let ours = words.get(1) == Some(&format!("{node},").as_str());
            current = ours.then(|| words.last().unwrap_or(&"?").to_string());
            continue;
        }
        let Some(zone) = &mut current else { continue };
        match words.as_slice() {
            ["pages", "free", n] => zone.push_str(&format!(" free {n}")),
            ["spanned", n] => zone.push_str(&format!(" spanned {n}")),
            ["start_pfn:", n] => {
                zone.push_str(&format!(" start {n}"));
                out.push(zone.clone());
            }
            _ => {}
        }
    }
    out.join("; ")
}

/// The PFN of each page of `m` (`/proc/self/pagemap`; root sees PFNs), or an error for one that
/// is not present.
pub(crate) fn pfns(m: &Mapping) -> Result<Vec<u64>, String> {
    let mut f = std::fs::File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    let mut out = Vec::new();
    for page in 0..m.len / PG {
        let mut e = [0u8; 8];
        f.seek(SeekFrom::Start(((m.addr / PG + page) * 8) as u64))
            .and_then(|_| f.read_exact(&mut e))
            .map_err(|e| format!("pagemap: {e}"))?;
        let e = u64::from_le_bytes(e);
        if e & (1 << 63) == 0 {
            return Err(format!("page {page} not present"));
        }
        out.push(e & ((1 << 55) - 1));
    }
    Ok(out)
}

const PAGE_IDLE: &str = "/sys/kernel/mm/page_idle/bitmap";

/// Marks `pfns` idle (`page_idle/bitmap`: 64-bit words, bit n of word w is PFN 64w + n).
/// Returns which pages can be tracked: the kernel neither reads nor writes the bitmap's last
/// word when `max_pfn` ends inside it (the access returns 0 bytes).
fn mark_idle(pfns: &[u64]) -> Result<Vec<bool>, String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(PAGE_IDLE)
        .map_err(|e| format!("{PAGE_IDLE}: {e}"))?;
    pfns.iter()
        .map(|&pfn| {
            f.seek(SeekFrom::Start(pfn / 64 * 8))
                .and_then(|_| f.write(&(1u64 << (pfn % 64)).to_le_bytes()))
                .map(|n| n == 8)
                .map_err(|e| format!("{PAGE_IDLE}: {e}"))
        })
        .collect()
}

/// Whether each trackable page of `pfns` is still idle (`None` for the others). Reading runs
/// the rmap walk that asks every secondary MMU, the device included, whether it used the page.
fn still_idle(pfns: &[u64], trackable: &[bool]) -> Result<Vec<Option<bool>>, String> {
    let mut f = std::fs::File::open(PAGE_IDLE).map_err(|e| format!("{PAGE_IDLE}: {e}"))?;
    pfns.iter()
        .zip(trackable)
        .map(|(&pfn, &ok)| {
            if !ok {
                return Ok(None);
            }
            let mut w = [0u8; 8];
            f.seek(SeekFrom::Start(pfn / 64 * 8))
                .and_then(|_| f.read_exact(&mut w))
                .map_err(|e| format!("{PAGE_IDLE}: {e}"))?;
            Ok(Some(u64::from_le_bytes(w) & (1 << (pfn % 64)) != 0))
        })
        .collect()
}

/// Aging never waits for the device. Reclaim asks `clear_flush_young` under the page-table
/// lock, once per PTE, and idle tracking asks `clear_young` per page: the driver clears the
/// device's accessed bits and posts the invalidation of its cached translations, but must not
/// wait for the device to confirm it. Here every SYNC completion is held back by the device's
/// maximum lag (`sync_lag`, 100 ms) while 64 pages the device has just read are marked idle
/// (about 1 ms when nothing waits, measured under TCG). A driver that waited for its SYNC per
/// page, even only as long as its 20 ms non-blockable spin, would take about a second.
pub fn aging_never_waits_for_the_device() -> Result<(), String> {
    crate::test_build()?;
    const PAGES: usize = 64;
    const BOUND: Duration = Duration::from_millis(250);
    // The device's reads set the accessed bits the marking then clears.
    let (f, _a, pfns) = device_read_small_pages(PAGES, 0x22)?;
    let lag = ZgInject {
        sync_lag: shared_regs::regs::SYNC_LAG_MAX,
        ..Default::default()
    };
    dev::inject_all(&f, lag).map_err(|e| format!("inject sync_lag: {e}"))?;
    let s0 = stats(&f)?;
    let t = std::time::Instant::now();
    let marked = mark_idle(&pfns);
    let took = t.elapsed();
    let s1 = stats(&f)?;
    dev::inject_all(&f, ZgInject::default()).map_err(|e| format!("inject off: {e}"))?;
    marked?;
    let cleared = s1.aging_cleared - s0.aging_cleared;
    println!(
        "# marking {PAGES} device-used pages idle took {} ms with SYNCs held back {} ms; \
         {cleared} device accessed bits cleared",
        took.as_millis(),
        shared_regs::regs::SYNC_LAG_MAX / 1000
    );
    // Fewer cleared bits would mean the aging path (and its invalidation) barely ran.
    if cleared < 8 {
        return Err(format!(
            "only {cleared} device accessed bits cleared: aging did not reach the driver"
        ));
    }
    if took >= BOUND {
        return Err(format!(
            "aging took {} ms for {PAGES} pages: it waited for the device's SYNC",
            took.as_millis()
        ));
    }
    clean(&f)
}

/// Which pages of `m` no longer have the PFN in `pfns` (migrated by compaction, say).
fn moved_pages(m: &Mapping, pfns_before: &[u64]) -> Result<Vec<bool>, String> {
    Ok(pfns(m)?
        .iter()
        .zip(pfns_before)
        .map(|(a, b)| a != b)
        .collect())
}

/// For the idle-tracking tests (skipped without `CONFIG_IDLE_PAGE_TRACKING`): `pages` 4 KiB
/// pages filled with `byte`, mirrored and read once by the device; the file, the mapping and
/// the pages' PFNs.
fn device_read_small_pages(
    pages: usize,
    byte: u8,
) -> Result<(std::fs::File, Mapping, Vec<u64>), String> {
    if !std::path::Path::new(PAGE_IDLE).exists() {
        return Err(crate::ktap::skip(
            "CONFIG_IDLE_PAGE_TRACKING is not set in the guest kernel",
        ));
    }
    let f = open()?;
    let mut a = Mapping::anon(pages * PG).map_err(|e| e.to_string())?;
    a.madvise(0, a.len, libc::MADV_NOHUGEPAGE)
        .map_err(|e| e.to_string())?;
    a.bytes_mut().fill(byte);
    map(&f, &a, false)?;
    run(&f, dev::job(DMA_CHECKSUM, a.addr, 0, a.len, 0))?;
    // Fresh pages wait in per-CPU batches before they reach the LRU (a baseline of the
    // mutation campaign once found 29 of 64 untracked).
    crate::numa::drain_lru_batches()?;
    let pfns = pfns(&a)?;
    Ok((f, a, pfns))
}

/// Idle-page tracking sees the device's use: pages marked idle and then read only by the
/// device are reported not idle (the driver answers `clear_young` from the device PTEs'
/// accessed bits), pages the device did not touch stay idle, and the device reports no
/// violation.
pub fn aging_reports_device_use_to_idle_tracking() -> Result<(), String> {
    const PAGES: usize = 64;
    // Warm the IOTLB: marking pages idle must drop the device's cached translations too, or
    // its next reads hit them and set no accessed bit.
    let (f, a, pfns) = device_read_small_pages(PAGES, 0x11)?;
    // Idle tracking sees only pages on the LRU lists (not those still in a per-CPU batch) and
    // not the bitmap's last word: a page is tracked if it reads idle right after marking.
    let written = mark_idle(&pfns)?;
    let ok: Vec<bool> = still_idle(&pfns, &written)?
        .iter()
        .map(|&idle| idle == Some(true))
        .collect();
    let tracked = |half: std::ops::Range<usize>| half.filter(|&i| ok[i]).count();
    if tracked(0..PAGES / 2) < 8 || tracked(PAGES / 2..PAGES) < 8 {
        return Err(format!("too few trackable pages: {ok:?}"));
    }
    let s0 = stats(&f)?;
    // The device reads the first half only; the CPU touches nothing.
    run(&f, dev::job(DMA_CHECKSUM, a.addr, 0, PAGES / 2 * PG, 0))?;
    let idle = still_idle(&pfns, &ok)?;
    let s1 = stats(&f)?;
    // Compaction may have moved a page meanwhile: its old PFN now names someone else's page.
    let moved = moved_pages(&a, &pfns)?;
    let idle: Vec<Option<bool>> = idle
        .iter()
        .zip(&moved)
        .map(|(&i, &m)| if m { None } else { i })
        .collect();
    let used: Vec<usize> = (0..PAGES / 2).filter(|&i| idle[i] == Some(true)).collect();
    let untouched: Vec<usize> = (PAGES / 2..PAGES)
        .filter(|&i| idle[i] == Some(false))
        .collect();
    println!(
        "# aging: {} young answers, {} device accessed bits cleared",
        s1.aging_young - s0.aging_young,
        s1.aging_cleared - s0.aging_cleared
    );
    if !used.is_empty() {
        return Err(format!("pages the device read still idle: {used:?}"));
    }
    if !untouched.is_empty() {
        return Err(format!("pages nobody touched reported used: {untouched:?}"));
    }
    if s1.aging_young == s0.aging_young {
        return Err("no aging query was answered young by the driver".into());
    }
    // The answers cleared the device's marks: with no new use, every page is idle again.
    mark_idle(&pfns)?;
    let idle = still_idle(&pfns, &ok)?;
    let moved = moved_pages(&a, &pfns)?;
    let again: Vec<usize> = idle
        .iter()
        .zip(&moved)
        .enumerate()
        .filter(|(_, (&idle, &m))| idle == Some(false) && !m)
        .map(|(i, _)| i)
        .collect();
    if !again.is_empty() {
        return Err(format!(
            "pages reported used again with no new device access: {again:?}"
        ));
    }
    clean(&f)
}

/// Runs `f` once and measures it.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = std::time::Instant::now();
    let r = f();
    (r, t.elapsed())
}

fn dmirror() -> Result<std::fs::File, String> {
    crate::dmirror::open().map_err(|e| format!("/dev/hmm_dmirror0: {e}"))
}

pub fn side_by_side_anon_read() -> Result<(), String> {
    let (f, d) = (open()?, dmirror()?);
    let mut a = Mapping::anon(64 * PG).map_err(|e| e.to_string())?;
    for (i, b) in a.bytes_mut().iter_mut().enumerate() {
        *b = (i % 253) as u8;
    }
    let (mut b1, mut b2) = (vec![0u8; a.len], vec![0u8; a.len]);
    let (r1, t1) = timed(|| {
        dev::dma(
            &f,
            dev::job(DMA_READ, a.addr, 0, a.len, b1.as_mut_ptr() as u64),
        )
    });
    let (r2, t2) = timed(|| hmm_run(&d, HMM_DMIRROR_READ, a.addr, b2.as_mut_ptr(), 64));
    let d1 = r1.map_err(|(e, _)| format!("zapguard READ: {e}"))?;
    let d2 = r2.map_err(|e| format!("test_hmm READ: {e}"))?;
    if b1 != a.bytes() || b2 != a.bytes() {
        return Err("a mirror read other data than the CPU wrote".into());
    }
    let s = stats(&f)?;
    println!(
        "# 64 pages, first read (faults in): zapguard {t1:?} ({} device faults, {} pages mapped by them), test_hmm {t2:?} ({} fault passes)",
        d1.faults, s.fault_pages, d2.faults
    );
    clean(&f)
}

pub fn side_by_side_anon_write() -> Result<(), String> {
    let (f, d) = (open()?, dmirror()?);
    let a = Mapping::anon(64 * PG).map_err(|e| e.to_string())?;
    let src1 = vec![0x5au8; a.len];
    let mut src2 = vec![0xa5u8; a.len];
    let (r1, t1) = timed(|| {
        dev::dma(
            &f,
            dev::job(DMA_WRITE, 0, a.addr, a.len, src1.as_ptr() as u64),
        )
    });
    r1.map_err(|(e, _)| format!("zapguard WRITE: {e}"))?;
    if a.bytes().iter().any(|&b| b != 0x5a) {
        return Err("CPU does not see zapguard's write".into());
    }
    let (r2, t2) = timed(|| hmm_run(&d, HMM_DMIRROR_WRITE, a.addr, src2.as_mut_ptr(), 64));
    r2.map_err(|e| format!("test_hmm WRITE: {e}"))?;
    if a.bytes().iter().any(|&b| b != 0xa5) {
        return Err("CPU does not see test_hmm's write".into());
    }
    println!("# 64 pages, first write (faults in): zapguard {t1:?}, test_hmm {t2:?}");
    clean(&f)
}

pub fn side_by_side_prot_none_and_readonly() -> Result<(), String> {
    let (f, d) = (open()?, dmirror()?);
    let none = Mapping::new(
        4 * PG,
        libc::PROT_NONE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    )
    .map_err(|e| e.to_string())?;
    let ro = Mapping::new(
        4 * PG,
        libc::PROT_READ,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    )
    .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4 * PG];
    let mut hbuf = vec![0u8; 4 * PG];
    let hptr = hbuf.as_mut_ptr();
    let zg = |d: ZgDma| dev::dma(&f, d).err().map(|(e, _)| dev::errno(&e));
    let hm = |op, addr| hmm_run(&d, op, addr, hptr, 4).err().map(|e| dev::errno(&e));
    let read_none = (
        zg(dev::job(
            DMA_READ,
            none.addr,
            0,
            none.len,
            buf.as_mut_ptr() as u64,
        )),
        hm(HMM_DMIRROR_READ, none.addr),
    );
    let write_ro = (
        zg(fill_job(ro.addr, ro.len, 1)),
        hm(HMM_DMIRROR_WRITE, ro.addr),
    );
    println!(
        "# PROT_NONE read: zapguard {:?}, test_hmm {:?}",
        read_none.0, read_none.1
    );
    println!(
        "# read-only write: zapguard {:?}, test_hmm {:?}",
        write_ro.0, write_ro.1
    );
    check_eq(
        read_none,
        (Some(libc::EFAULT), Some(libc::EFAULT)),
        "PROT_NONE read errors",
    )?;
    check_eq(
        write_ro,
        (Some(libc::EPERM), Some(libc::EPERM)),
        "read-only write errors",
    )?;
    clean(&f)
}

/// A hugetlbfs page (`MAP_HUGETLB`, 2 MiB, reserved at boot with `hugepages=`) is mirrored by
/// one 2 MiB device entry; the device writes it, a COW fault of a forked child leaves the
/// parent's mirror intact, and munmap shoots down the whole entry.
pub fn hugetlbfs_mirrored() -> Result<(), String> {
    const HUGE: usize = 2 << 20;
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.contains("hugetlbfs") {
        return Err("CONFIG_HUGETLBFS is not set in the guest kernel".into());
    }
    let f = open()?;
    let mut a = Mapping::new(
        HUGE,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
        -1,
        HUGE,
    )
    .map_err(|e| {
        format!(
            "mmap(MAP_HUGETLB) (free huge pages: {}): {e}",
            free_huge_pages()
        )
    })?;
    a.bytes_mut().fill(4);
    let m = map(&f, &a, true)?;
    check_eq((m.pages, m.huge), (0, 1), "(4 KiB, 2 MiB) device entries")?;
    let snap = dev::snapshot(&f, a.addr, HUGE / PG).map_err(|e| format!("SNAPSHOT: {e}"))?;
    if snap
        .iter()
        .any(|s| s & ZG_SNAP_DEV_HUGE == 0 || s & ZG_SNAP_CPU_HUGE == 0)
    {
        return Err("hugetlb page not mirrored by a 2 MiB entry".into());
    }
    run(&f, fill_job(a.addr, HUGE, 0x5c))?;
    if a.bytes().iter().any(|&b| b != 0x5c) {
        return Err("device FILL of the hugetlb page not visible".into());
    }
    let s0 = stats(&f)?;
    a.unmap();
    let s1 = stats(&f)?;
    check_eq(
        s1.pages_zapped - s0.pages_zapped,
        (HUGE / PG) as u64,
        "pages zapped by munmap",
    )?;
    clean(&f)
}

fn free_huge_pages() -> String {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .map_or_else(|e| e.to_string(), |s| s.trim().to_string())
}

/// KSM merges identical mirrored pages into one write-protected page: the merge replaces each
/// page's PTE, so the device must lose its entries (and fault the merged page back in read-only);
/// a device write afterwards breaks COW (the write fault-around unmerges the pages it maps). The
/// device's data is right at every step and its validator sees no violation.
pub fn ksm_merge_while_mirrored() -> Result<(), String> {
    const PAGES: usize = 64;
    let ksm = std::path::Path::new("/sys/kernel/mm/ksm");
    if !ksm.exists() {
        return Err("CONFIG_KSM is not set in the guest kernel".into());
    }
    let f = open()?;
    let mut a = Mapping::anon(PAGES * PG).map_err(|e| e.to_string())?;
    a.bytes_mut().fill(0x3e);
    map(&f, &a, true)?;
    run(&f, fill_job(a.addr, a.len, 0x3e))?;
    let s0 = stats(&f)?;
    a.madvise(0, a.len, libc::MADV_MERGEABLE)
        .map_err(|e| format!("MADV_MERGEABLE: {e}"))?;
    let merged = ksm_run_until(|| ksm_counter("pages_sharing") >= (PAGES - 1) as u64)?;
    let s1 = stats(&f)?;
    let result = (|| {
        if !merged {
            return Err(format!(
                "KSM did not merge the pages (pages_shared {}, pages_sharing {})",
                ksm_counter("pages_shared"),
                ksm_counter("pages_sharing")
            ));
        }
        if s1.pages_zapped < s0.pages_zapped + (PAGES - 1) as u64 {
            return Err(format!(
                "merging {PAGES} pages zapped only {} device entries",
                s1.pages_zapped - s0.pages_zapped
            ));
        }
        // The device reads the merged page (a fault maps it read-only), then writes one page:
        // the write fault breaks COW, and only that page changes.
        let sum = run(&f, dev::job(DMA_CHECKSUM, a.addr, 0, a.len, 0))?.result;
        let want = fnv1a64(FNV_OFFSET, &vec![0x3e; a.len]);
        check_eq(sum, want, "device checksum of the merged pages")?;
        run(&f, fill_job(a.addr + 5 * PG, PG, 0x71))?;
        for (i, page) in a.bytes().chunks(PG).enumerate() {
            let b = if i == 5 { 0x71 } else { 0x3e };
            if page.iter().any(|&x| x != b) {
                return Err(format!("page {i} wrong after the device's COW write"));
            }
        }
        clean(&f)
    })();
    let _ = std::fs::write(ksm.join("run"), "2");
    result
}

fn ksm_counter(name: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Starts ksmd scanning fast and waits (up to 20 s) for `done`.
fn ksm_run_until(done: impl Fn() -> bool) -> Result<bool, String> {
    let ksm = std::path::Path::new("/sys/kernel/mm/ksm");
    for (knob, v) in [
        ("sleep_millisecs", "0"),
        ("pages_to_scan", "1000"),
        ("run", "1"),
    ] {
        std::fs::write(ksm.join(knob), v).map_err(|e| format!("ksm/{knob}: {e}"))?;
    }
    for _ in 0..200 {
        if done() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(done())
}

pub fn thp_split_by_mprotect_then_collapse() -> Result<(), String> {
    let f = open()?;
    let mut a = Mapping::anon_huge(2 << 20).map_err(|e| e.to_string())?;
    a.bytes_mut().fill(1);
    let _ = a.madvise(0, a.len, dev::MADV_COLLAPSE);
    let m = map(&f, &a, true)?;
    check_eq(m.huge, 1, "2 MiB device entry before the split")?;
    // mprotect of one page splits the PMD: the device drops its whole 2 MiB entry.
    // SAFETY: protection change on our own mapping.
    unsafe { libc::mprotect(a.addr as *mut _, PG, libc::PROT_READ) };
    let snap = dev::snapshot(&f, a.addr, 512).map_err(|e| e.to_string())?;
    if snap.iter().any(|s| s & ZG_SNAP_DEV_PRESENT != 0) {
        return Err("device kept translations of a split huge page".into());
    }
    run(&f, fill_job(a.addr + PG, a.len - PG, 2))?;
    run_err(&f, fill_job(a.addr, PG, 3), libc::EPERM)?;
    // Back to one VMA, collapse, mirror again with a 2 MiB entry.
    a.protect(libc::PROT_READ | libc::PROT_WRITE)
        .map_err(|e| e.to_string())?;
    a.madvise(0, a.len, dev::MADV_COLLAPSE)
        .map_err(|e| format!("MADV_COLLAPSE: {e}"))?;
    let m = map(&f, &a, true)?;
    check_eq(m.huge, 1, "2 MiB device entry after MADV_COLLAPSE")?;
    let sum = run(&f, dev::job(DMA_CHECKSUM, a.addr, 0, a.len, 0))?;
    check_eq(
        sum.result,
        fnv1a64(FNV_OFFSET, a.bytes()),
        "checksum after collapse",
    )?;
    clean(&f)
}

pub fn hmm_mremap_fixed_and_dontunmap() -> Result<(), String> {
    let f = open()?;
    let mut a = Mapping::anon(4 * PG).map_err(|e| e.to_string())?;
    a.bytes_mut().fill(0x11);
    map(&f, &a, false)?;
    // MREMAP_FIXED onto a reservation we own.
    let target = Mapping::anon(4 * PG).map_err(|e| e.to_string())?;
    // SAFETY: moving our mapping onto another of ours (which it replaces).
    let r = unsafe {
        libc::mremap(
            a.addr as *mut _,
            a.len,
            a.len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target.addr as *mut libc::c_void,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(format!("mremap FIXED: {}", std::io::Error::last_os_error()));
    }
    let old = a.addr;
    std::mem::forget(a);
    let moved = target;
    let snap = dev::snapshot(&f, old, 4).map_err(|e| e.to_string())?;
    if snap.iter().any(|s| s & ZG_SNAP_DEV_PRESENT != 0) {
        return Err("device PTEs survived MREMAP_FIXED at the old address".into());
    }
    let sum = run(&f, dev::job(DMA_CHECKSUM, moved.addr, 0, moved.len, 0))?;
    check_eq(
        sum.result,
        fnv1a64(FNV_OFFSET, &[0x11; 4 * PG]),
        "data at the FIXED target",
    )?;
    // MREMAP_DONTUNMAP: the old range stays mapped, empty (it faults in fresh zero pages).
    map(&f, &moved, false)?;
    // SAFETY: as above; the kernel picks the new address.
    let r = unsafe {
        libc::mremap(
            moved.addr as *mut _,
            moved.len,
            moved.len,
            libc::MREMAP_MAYMOVE | dev::MREMAP_DONTUNMAP,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(format!(
            "mremap DONTUNMAP: {}",
            std::io::Error::last_os_error()
        ));
    }
    let fresh = Mapping::adopt(r as usize, moved.len);
    let sum_new = run(&f, dev::job(DMA_CHECKSUM, fresh.addr, 0, fresh.len, 0))?;
    check_eq(sum_new.result, sum.result, "data at the DONTUNMAP target")?;
    let sum_old = run(&f, dev::job(DMA_CHECKSUM, moved.addr, 0, moved.len, 0))?;
    check_eq(
        sum_old.result,
        fnv1a64(FNV_OFFSET, &[0; 4 * PG]),
        "old range after DONTUNMAP",
    )?;
    clean(&f)
}

/// A child that loops device jobs over a 32 MiB buffer is SIGKILLed mid-job, three times: no
/// violation. Each kill comes once the child's first job completed (it counts them in a shared
/// page), 40 ms into the next, so that a job is always running when the signal lands.
pub fn sigkill_mid_job_is_safe() -> Result<(), String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    let before = crate::mirror::device_violations()?;
    let page = Mapping::shared_anon(PG).map_err(|e| e.to_string())?;
    // SAFETY: a zeroed shared page, aligned, alive until the end of the test; the children
    // only touch it through this atomic.
    let jobs = unsafe { &*(page.addr as *const AtomicU32) };
    for round in 0..3 {
        jobs.store(0, Ordering::Relaxed);
        let pid = crate::proc::fork_child(|| {
            let Ok(f) = dev::open() else { return 1 };
            let Ok(mut a) = Mapping::anon_huge(32 << 20) else {
                return 2;
            };
            a.bytes_mut().fill(1);
            if dev::map(&f, a.addr, a.len, 0).is_err() {
                return 3;
            }
            loop {
                if dev::dma(&f, dev::job(DMA_CHECKSUM, a.addr, 0, a.len, 0)).is_ok() {
                    jobs.fetch_add(1, Ordering::Relaxed);
                }
            }
        })?;
        let t = std::time::Instant::now();
        while jobs.load(Ordering::Relaxed) == 0 {
            if t.elapsed() > crate::scaled(Duration::from_secs(10)) {
                // SAFETY: killing and reaping our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                return Err(format!("round {round}: the child completed no job in 10 s"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(40));
        let mut status = 0;
        // SAFETY: killing and reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
        }
        if !libc::WIFSIGNALED(status) {
            return Err(format!("child ended before the kill (status {status:#x})"));
        }
    }
    check_eq(
        crate::mirror::device_violations()?,
        before,
        "violations across SIGKILLs mid-job",
    )
}

pub fn hmm_private_fork_child_writes_parent_unchanged() -> Result<(), String> {
    let f = open()?;
    let mut a = Mapping::anon(4 * PG).map_err(|e| e.to_string())?;
    a.bytes_mut().fill(b'P');
    map(&f, &a, true)?;
    let (addr, len) = (a.addr, a.len);
    // The child writes through its own context: COW gives it its own pages.
    let code = fork_wait(|| {
        let Ok(cf) = dev::open() else { return 1 };
        if dev::dma(&cf, fill_job(addr, len, b'C')).is_err() {
            return 2;
        }
        // SAFETY: reading the child's own copy of the mapping.
        let mine = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
        i32::from(mine.iter().any(|&b| b != b'C')) * 3
    })?;
    check_eq(code, 0, "child device write to its private copy")?;
    if a.bytes().iter().any(|&b| b != b'P') {
        return Err("the child's device write reached the parent's pages".into());
    }
    let sum = run(&f, dev::job(DMA_CHECKSUM, a.addr, 0, a.len, 0))?;
    check_eq(
        sum.result,
        fnv1a64(FNV_OFFSET, a.bytes()),
        "parent's device view",
    )?;
    clean(&f)
}
