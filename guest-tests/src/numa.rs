//! NUMA migration of mirrored memory. The guest has two nodes; node 1 has memory and no CPU, so
//! pages land there only when a test moves them: with `move_pages(2)`, `mbind(2)` with
//! `MPOL_MF_MOVE` and `migrate_pages(2)`, idle and under device DMA, small pages and THPs.
//!
//! Migration unmaps a page (an mmu_notifier invalidation), copies it and maps the copy: the
//! device must fault the new page in and never touch the old one (the validator counts any
//! access to it). Each test also names a few pages' physical homes in the order they had them
//! (`ZAPGUARD-TRACE-EXPECT`), and the host harness checks that the device trace shows accesses
//! through exactly those addresses, in that order.

use crate::dev::{self, Mapping};
use crate::hmm::pfns;
use crate::ktap::check_eq;
use crate::mirror::{clean, fill_job, map, open, run, stats};
use shared_regs::dma::*;
use shared_regs::uapi::*;
use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::dev::PG;
const HUGE: usize = 2 << 20;
/// `mbind(2)` modes and flags (linux/mempolicy.h; not in the libc crate).
const MPOL_DEFAULT: i32 = 0;
const MPOL_BIND: i32 = 2;
const MPOL_MF_STRICT: u32 = 1 << 0;
const MPOL_MF_MOVE: u32 = 1 << 1;
/// Bits in the node masks passed to the kernel (one `unsigned long`).
const MAX_NODE: usize = 64;

/// The guest must have nodes 0 and 1 online (CONFIG_NUMA and QEMU's `-numa`).
fn require_two_nodes() -> Result<(), String> {
    let online = std::fs::read_to_string("/sys/devices/system/node/online")
        .map_err(|e| format!("/sys/devices/system/node/online: {e} (CONFIG_NUMA not set?)"))?;
    check_eq(online.trim(), "0-1", "online NUMA nodes")
}

/// `move_pages(2)` for this process: moves each page to `to`, or with `None` only asks where it
/// is. Returns each page's node (or negative errno) as the kernel reports it.
fn move_pages(pages: &[usize], to: Option<i32>) -> Result<Vec<i32>, String> {
    let ptrs: Vec<*const c_void> = pages.iter().map(|&p| p as *const c_void).collect();
    let nodes = to.map(|n| vec![n; pages.len()]);
    let mut status = vec![i32::MIN; pages.len()];
    // SAFETY: every array has `pages.len()` entries and outlives the call; the kernel only
    // reads `ptrs` and `nodes` and writes `status`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            pages.len(),
            ptrs.as_ptr(),
            nodes.as_ref().map_or(std::ptr::null(), |n| n.as_ptr()),
            status.as_mut_ptr(),
            MPOL_MF_MOVE,
        )
    };
    if r < 0 {
        return Err(format!("move_pages: {}", io::Error::last_os_error()));
    }
    Ok(status)
}

/// Moves `pages` to `node` with `move_pages(2)` and checks that each one got there.
fn move_to(pages: &[usize], node: i32) -> Result<(), String> {
    let status = move_pages(pages, Some(node))?;
    match status.iter().position(|&s| s != node) {
        Some(i) => Err(format!(
            "move_pages to node {node}: page {:#x} reports {}",
            pages[i], status[i]
        )),
        None => Ok(()),
    }
}

/// Moves the pages of `pages` that are not on `node` yet, a few times: migration may give up
/// on a page that is busy for a moment (a racing fault holds it). Returns the retries needed.
fn settle(pages: &[usize], node: i32) -> Result<usize, String> {
    for retry in 0..5 {
        let status = move_pages(pages, None)?;
        let away: Vec<usize> = pages
            .iter()
            .zip(&status)
            .filter(|(_, &s)| s != node)
            .map(|(&p, _)| p)
            .collect();
        if away.is_empty() {
            return Ok(retry);
        }
        move_pages(&away, Some(node))?;
    }
    Err(format!("pages still not on node {node} after 5 retries"))
}

/// Checks that every page of `m` is on `node` (as the kernel sees it).
fn expect_node(m: &Mapping, node: i32, when: &str) -> Result<(), String> {
    let pages: Vec<usize> = (0..m.len / PG).map(|i| m.addr + i * PG).collect();
    let status = move_pages(&pages, None)?;
    match status.iter().position(|&s| s != node) {
        Some(i) => Err(format!(
            "{when}: page {i} is on node {}, expected {node}",
            status[i]
        )),
        None => Ok(()),
    }
}

/// `mbind(2)` of `m` to `node` (`MPOL_BIND`), moving what is mapped, strictly: the call fails
/// if a page could not be moved. `None` drops the policy again (`MPOL_DEFAULT`) without moving.
pub(crate) fn mbind(m: &Mapping, node: Option<usize>) -> Result<(), String> {
    let (mode, mask, flags) = match node {
        Some(n) => (MPOL_BIND, 1u64 << n, MPOL_MF_MOVE | MPOL_MF_STRICT),
        None => (MPOL_DEFAULT, 0, 0),
    };
    // SAFETY: a policy change on our own mapping; the kernel reads one word of node mask.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            m.addr,
            m.len,
            mode,
            if node.is_some() {
                &mask as *const u64
            } else {
                std::ptr::null()
            },
            MAX_NODE,
            flags,
        )
    };
    if r != 0 {
        return Err(format!("mbind {node:?}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Drains every CPU's batch of pages waiting to enter the LRU lists (`lru_add_drain_all()`, which
/// `migrate_pages(2)` runs first; node 0 to node 0 moves nothing): idle-page tracking sees only
/// pages on the lists.
pub(crate) fn drain_lru_batches() -> Result<(), String> {
    migrate_process(0, 0).map(drop)
}

/// `migrate_pages(2)` of this whole process from node `from` to node `to`; returns how many
/// pages could not be moved (pages other processes share stay; ours are checked by the caller).
fn migrate_process(from: usize, to: usize) -> Result<i64, String> {
    let (old, new) = (1u64 << from, 1u64 << to);
    // SAFETY: the kernel reads one word of each node mask, which outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_migrate_pages,
            0,
            MAX_NODE,
            &old as *const u64,
            &new as *const u64,
        )
    };
    if r < 0 {
        return Err(format!("migrate_pages: {}", io::Error::last_os_error()));
    }
    Ok(r)
}

/// The device reads `m` (DMA_READ into a buffer, a bounce buffer's worth at a time, and a
/// checksum) and finds what the CPU sees.
fn device_reads_back(f: &File, m: &Mapping, when: &str) -> Result<(), String> {
    let chunk = ZG_DMA_BOUNCE_MAX as usize;
    let mut buf = vec![0u8; chunk];
    for (i, cpu) in m.bytes().chunks(chunk).enumerate() {
        let at = m.addr + i * chunk;
        run(
            f,
            dev::job(DMA_READ, at, 0, cpu.len(), buf.as_mut_ptr() as u64),
        )?;
        if buf[..cpu.len()] != *cpu {
            return Err(format!(
                "{when}: the device read other bytes than the CPU sees at {at:#x}"
            ));
        }
    }
    let sum = run(f, dev::job(DMA_CHECKSUM, m.addr, 0, m.len, 0))?;
    check_eq(
        sum.result,
        fnv1a64(FNV_OFFSET, m.bytes()),
        &format!("{when}: device checksum"),
    )
}

/// After a move of `m` to `node`: the kernel has every page there, the device reads them back
/// right, and `homes` records where its pages live now.
fn check_moved(
    f: &File,
    m: &Mapping,
    homes: &mut Homes,
    node: i32,
    when: &str,
) -> Result<(), String> {
    expect_node(m, node, when)?;
    device_reads_back(f, m, when)?;
    homes.checkpoint()
}

/// Each page a different byte pattern, so that a page read from the wrong frame shows.
fn fill_pattern(m: &mut Mapping, seed: u8) {
    for (i, page) in m.bytes_mut().chunks_mut(PG).enumerate() {
        page.fill(seed.wrapping_add(i as u8));
    }
}

/// The physical homes of chosen pages over a test, recorded at checkpoints after which the
/// device has read them; printed as `ZAPGUARD-TRACE-EXPECT` lines for the host's trace check.
struct Homes {
    asid: u64,
    pages: Vec<usize>,
    seen: Vec<Vec<u64>>,
}

impl Homes {
    fn new(f: &File, pages: Vec<usize>) -> Result<Self, String> {
        Ok(Self {
            asid: u64::from(stats(f)?.asid),
            seen: vec![Vec::new(); pages.len()],
            pages,
        })
    }

    /// Records where each page is now (call after the device read them there).
    fn checkpoint(&mut self) -> Result<(), String> {
        for (va, seen) in self.pages.iter().zip(&mut self.seen) {
            let pfn = pfns(&Mapping::view(*va, PG))?[0];
            if seen.last() != Some(&(pfn * PG as u64)) {
                seen.push(pfn * PG as u64);
            }
        }
        Ok(())
    }

    /// Fails unless every page moved at least `moves` times; prints the expectations.
    fn report(&self, moves: usize) -> Result<(), String> {
        for (va, seen) in self.pages.iter().zip(&self.seen) {
            let pas: Vec<String> = seen.iter().map(|pa| format!("pa={pa:#x}")).collect();
            println!(
                "ZAPGUARD-TRACE-EXPECT asid={} va={va:#x} {}",
                self.asid,
                pas.join(" ")
            );
            if seen.len() < moves + 1 {
                return Err(format!(
                    "page {va:#x} had {} home(s), expected {}: it did not move",
                    seen.len(),
                    moves + 1
                ));
            }
        }
        Ok(())
    }
}

/// Small pages moved idle, by each of the three calls, and back; the device reads (and writes)
/// them at every step.
pub fn numa_migration_follows_pages() -> Result<(), String> {
    require_two_nodes()?;
    const LEN: usize = 1 << 20;
    const Q: usize = LEN / 4;
    let f = open()?;
    let mut a = Mapping::anon(LEN).map_err(|e| e.to_string())?;
    a.madvise(0, LEN, libc::MADV_NOHUGEPAGE)
        .map_err(|e| e.to_string())?;
    fill_pattern(&mut a, 0x11);
    map(&f, &a, true)?;
    let quarter = |q: usize| Mapping::view(a.addr + q * Q, Q);
    let mut homes = Homes::new(&f, (0..4).map(|q| a.addr + q * Q + 5 * PG).collect())?;
    device_reads_back(&f, &a, "before migration")?;
    expect_node(&a, 0, "before migration")?;
    homes.checkpoint()?;

    // Quarter 0 by move_pages, quarter 1 by mbind; quarters 2 and 3 stay.
    let q0: Vec<usize> = (0..Q / PG).map(|i| a.addr + i * PG).collect();
    move_to(&q0, 1)?;
    mbind(&quarter(1), Some(1))?;
    expect_node(&quarter(0), 1, "after move_pages")?;
    expect_node(&quarter(1), 1, "after mbind")?;
    expect_node(&quarter(2), 0, "pages nobody moved")?;
    device_reads_back(&f, &a, "after move_pages and mbind")?;
    homes.checkpoint()?;

    // The rest of the process follows with migrate_pages; the device then writes quarter 2.
    migrate_process(0, 1)?;
    expect_node(&a, 1, "after migrate_pages 0 -> 1")?;
    run(&f, fill_job(a.addr + 2 * Q, Q, 0xee))?;
    if quarter(2).bytes().iter().any(|&b| b != 0xee) {
        return Err("the CPU does not see the device's FILL in migrated pages".into());
    }
    device_reads_back(&f, &a, "after migrate_pages 0 -> 1")?;
    homes.checkpoint()?;

    // And everything back to node 0 (quarter 1 first loses its node-1 binding).
    mbind(&quarter(1), None)?;
    migrate_process(1, 0)?;
    check_moved(&f, &a, &mut homes, 0, "after migrate_pages 1 -> 0")?;
    // Quarters 0 and 1 moved in the first and last steps, 2 and 3 in the last two.
    homes.report(2)?;
    clean(&f)
}

/// A THP moves as a whole: the device had one 2 MiB entry for it, loses it, and maps the THP's
/// new home (again with a 2 MiB entry when the copy is still huge).
pub fn numa_migration_moves_thp() -> Result<(), String> {
    require_two_nodes()?;
    const LEN: usize = 2 * HUGE;
    let f = open()?;
    let mut a = Mapping::anon_huge(LEN).map_err(|e| e.to_string())?;
    fill_pattern(&mut a, 0x33);
    let _ = a.madvise(0, LEN, dev::MADV_COLLAPSE);
    let cpu = dev::snapshot(&f, a.addr, LEN / PG).map_err(|e| format!("SNAPSHOT: {e}"))?;
    if cpu.iter().any(|s| s & ZG_SNAP_CPU_HUGE == 0) {
        return Err(format!(
            "no THP to migrate (first page {})",
            dev::snap_names(&cpu[..1])
        ));
    }
    let m = map(&f, &a, true)?;
    check_eq(m.huge, 2, "2 MiB device entries before migration")?;
    let mut homes = Homes::new(&f, vec![a.addr, a.addr + HUGE + 77 * PG])?;
    device_reads_back(&f, &a, "THP before migration")?;
    homes.checkpoint()?;

    // One address per THP moves the whole folio.
    move_to(&[a.addr, a.addr + HUGE], 1)?;
    check_moved(&f, &a, &mut homes, 1, "THP after move_pages")?;
    // Where the copy is still a THP the device maps it with 2 MiB entries again, and only there.
    let snap = dev::snapshot(&f, a.addr, LEN / PG).map_err(|e| format!("SNAPSHOT: {e}"))?;
    let huge = |bit: u8| snap.iter().filter(|s| *s & bit != 0).count();
    println!(
        "# after the move: CPU huge {} of {} pages, device huge {}",
        huge(ZG_SNAP_CPU_HUGE),
        snap.len(),
        huge(ZG_SNAP_DEV_HUGE)
    );
    check_eq(
        huge(ZG_SNAP_DEV_HUGE),
        huge(ZG_SNAP_CPU_HUGE),
        "pages the device maps huge after the move, against the CPU's",
    )?;

    migrate_process(1, 0)?;
    expect_node(&a, 0, "THP after migrate_pages 1 -> 0")?;
    run(&f, fill_job(a.addr + HUGE, HUGE, 0x44))?;
    device_reads_back(&f, &a, "THP after migrate_pages 1 -> 0")?;
    homes.checkpoint()?;
    homes.report(2)?;
    clean(&f)
}

/// Pages move back and forth, by all three calls, while another thread keeps the device
/// copying, comparing and checksumming them: every job sees the right bytes, no violation.
pub fn numa_migration_during_dma() -> Result<(), String> {
    require_two_nodes()?;
    const LEN: usize = 1 << 20;
    // Odd: the pages end on node 1, so each page's last home differs from its first.
    const ROUNDS: usize = 11;
    let f = open()?;
    let mut src = Mapping::anon(LEN).map_err(|e| e.to_string())?;
    src.madvise(0, LEN, libc::MADV_NOHUGEPAGE)
        .map_err(|e| e.to_string())?;
    fill_pattern(&mut src, 0x77);
    // The destination is THP-backed: its migrations move a 2 MiB folio under the copies.
    let mut dst = Mapping::anon_huge(HUGE).map_err(|e| e.to_string())?;
    dst.bytes_mut().fill(0);
    map(&f, &src, false)?;
    map(&f, &dst, true)?;
    let mut homes = Homes::new(&f, vec![src.addr, dst.addr])?;
    run(&f, dev::job(DMA_COPY, src.addr, dst.addr, LEN, 0))?;
    homes.checkpoint()?;
    let faults_before = stats(&f)?.faults;

    let expected = fnv1a64(FNV_OFFSET, src.bytes());
    let stop = AtomicBool::new(false);
    let jobs = AtomicU64::new(0);
    let (s, d) = (src.addr, dst.addr);
    let worker = || -> Result<(), String> {
        let f = f.try_clone().map_err(|e| e.to_string())?;
        while !stop.load(Ordering::Relaxed) {
            run(&f, dev::job(DMA_COPY, s, d, LEN, 0))?;
            let cmp = run(&f, dev::job(DMA_COMPARE, s, d, LEN, 0))?;
            check_eq(cmp.result, u64::MAX, "device compare of copy and source")?;
            let sum = run(&f, dev::job(DMA_CHECKSUM, s, 0, LEN, 0))?;
            check_eq(sum.result, expected, "device checksum of the source")?;
            jobs.fetch_add(3, Ordering::Relaxed);
        }
        Ok(())
    };
    let mover = || -> Result<usize, String> {
        let mut retries = 0;
        let pages: Vec<usize> = (0..LEN / PG).map(|i| s + i * PG).chain([d]).collect();
        for round in 0..ROUNDS {
            let (from, to) = (round % 2, 1 - round % 2);
            match round % 3 {
                0 => move_to(&pages, to as i32)?,
                1 => {
                    mbind(&src, Some(to))?;
                    mbind(&dst, Some(to))?;
                    mbind(&src, None)?;
                    mbind(&dst, None)?;
                }
                _ => {
                    migrate_process(from, to)?;
                }
            }
            retries += settle(&pages, to as i32)?;
            expect_node(&src, to as i32, &format!("round {round}: source"))?;
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(retries)
    };
    let (worked, moved) = std::thread::scope(|sc| {
        let w = sc.spawn(worker);
        let moved = mover();
        stop.store(true, Ordering::Relaxed);
        (w.join(), moved)
    });
    worked.map_err(|_| "DMA thread panicked".to_string())??;
    let retries = moved?;
    let s1 = stats(&f)?;
    println!(
        "# {} device jobs during {ROUNDS} migrations ({retries} busy-page retries); {} device faults refetched moved pages",
        jobs.load(Ordering::Relaxed),
        s1.faults - faults_before
    );
    if s1.faults == faults_before {
        return Err("the device never faulted: it kept using the pages' old homes".into());
    }
    if dst.bytes()[..LEN] != src.bytes()[..] {
        return Err("the CPU sees another copy than the device compared".into());
    }
    device_reads_back(&f, &src, "after the migrations")?;
    // The destination too: the last round may have moved it after the worker's last job, and a
    // checkpoint records homes the device has read.
    device_reads_back(&f, &dst, "after the migrations (destination)")?;
    homes.checkpoint()?;
    homes.report(1)?;
    clean(&f)
}
