//! Resource bounds: device page-table pages are reclaimed at every level once empty, and one
//! context cannot take the pool from everyone else.

use crate::dev::{self, Mapping};
use crate::ktap::check_eq;
use crate::mirror::{open, stats};
use crate::proc::fork_wait;

use crate::dev::PG;
const HUGE: usize = 2 << 20;
/// 2 MiB blocks reserved: more than a context's default table bound (`max_pt_pages`) can map
/// sparsely, so the context runs out first.
const BLOCKS: usize = 600;

/// A process mirrors one 4 KiB page per 2 MiB (one level-1 table each) until `ENOMEM`; another
/// process can still MAP meanwhile; after the first unmaps everything its context holds only a
/// handful of table pages again.
pub fn pt_pages_bounded_and_reclaimed() -> Result<(), String> {
    let f = open()?;
    let mut region = Mapping::new(
        BLOCKS * HUGE,
        libc::PROT_READ,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        -1,
        HUGE,
    )
    .map_err(|e| e.to_string())?;
    // No huge zero page: each read fault maps a 4 KiB zero page, needing its own table.
    region
        .madvise(0, region.len, libc::MADV_NOHUGEPAGE)
        .map_err(|e| e.to_string())?;
    let mut mapped = 0;
    let mut exhausted = None;
    for i in 0..BLOCKS {
        match dev::map(&f, region.addr + i * HUGE, PG, 0) {
            Ok(_) => mapped += 1,
            Err(e) => {
                exhausted = Some(dev::errno(&e));
                break;
            }
        }
    }
    let full = stats(&f)?;
    println!(
        "# {mapped} sparse pages mapped, then {:?}; {} table pages held",
        exhausted, full.pt_pages
    );
    check_eq(
        exhausted,
        Some(libc::ENOMEM),
        "errno once the context's bound is reached",
    )?;
    check_eq(
        full.pt_pages,
        MAX_PT_PAGES,
        "table pages held at the bound (max_pt_pages)",
    )?;
    let other = fork_wait(|| {
        let Ok(g) = dev::open() else { return 10 };
        let Ok(mut b) = Mapping::anon(16 * PG) else {
            return 11;
        };
        b.bytes_mut().fill(3);
        match dev::map(&g, b.addr, b.len, 0) {
            Ok(_) => 0,
            Err(_) => 12,
        }
    })?;
    check_eq(
        other,
        0,
        "another process's MAP while one context is at its bound",
    )?;
    region.unmap();
    let after = stats(&f)?;
    println!("# after munmap: {} table pages", after.pt_pages);
    // Every table below the root is reclaimed once empty, at every level.
    if after.pt_pages != 1 {
        return Err(format!(
            "{} device page-table pages still held after unmapping everything (expected only the root)",
            after.pt_pages
        ));
    }
    // The pages came back: the same context can map again.
    let mut b = Mapping::anon(PG).map_err(|e| e.to_string())?;
    b.bytes_mut().fill(1);
    dev::map(&f, b.addr, b.len, 0).map_err(|e| format!("MAP after reclaim: {e}"))?;
    Ok(())
}

/// The driver's `max_pt_pages` parameter: its default (`kmod/zapguard.rs`), which the suite
/// loads it with (module parameters are not exported in sysfs).
const MAX_PT_PAGES: u64 = 256;
