//! The arena's layout (regions, windows, guard pages, holes) and the system calls the fuzzer
//! makes on it and on its files.

use super::data::{guard_word, write_words};
use super::table::errno_name;
use super::{ARENA, NSHARED, PG, STRIDE};
use crate::dev;
use std::fs::File;
use std::io;

pub(super) fn errno_of(e: &io::Error) -> i32 {
    dev::errno(e)
}

pub(super) fn raw(f: &File, cmd: u32, arg: u64) -> Result<(), i32> {
    dev::ioctl_raw(f, cmd, arg as usize)
        .map(drop)
        .map_err(|e| errno_of(&e))
}

pub(super) fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

/// `mmap` at exactly `addr` (`MAP_FIXED_NOREPLACE`, or `MAP_FIXED` over the fuzzer's own window).
pub(super) fn map_at(addr: u64, len: u64, replace: bool) -> Result<(), i32> {
    let fixed = if replace {
        libc::MAP_FIXED
    } else {
        libc::MAP_FIXED_NOREPLACE
    };
    // SAFETY: `addr` is in the fuzzer's arena (or the canary child's range), which nothing else
    // in the process maps; with MAP_FIXED it replaces only a window of the fuzzer's own.
    let p = unsafe {
        libc::mmap(
            addr as *mut _,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(last_errno());
    }
    if p as u64 != addr {
        // An old kernel ignoring MAP_FIXED_NOREPLACE: not ours to keep.
        // SAFETY: the mapping just made, at the kernel's address.
        unsafe { libc::munmap(p, len as usize) };
        return Err(libc::EEXIST);
    }
    Ok(())
}

pub(super) fn mprotect(addr: u64, len: u64, prot: i32) -> Result<(), i32> {
    // SAFETY: a window or guard page of the fuzzer's arena; nothing holds references into it
    // while its protection changes (CPU accesses check the recorded protection first).
    match unsafe { libc::mprotect(addr as *mut _, len as usize, prot) } {
        0 => Ok(()),
        _ => Err(last_errno()),
    }
}

pub(super) fn madvise(addr: u64, len: u64, advice: i32) -> Result<(), i32> {
    // SAFETY: advice on a window of the fuzzer's arena.
    match unsafe { libc::madvise(addr as *mut _, len as usize, advice) } {
        0 => Ok(()),
        _ => Err(last_errno()),
    }
}

/// Whether `[addr, addr + len)` has no mapping at all (`mincore` says `ENOMEM`).
pub(super) fn unmapped(addr: u64, len: u64) -> bool {
    let mut v = vec![0u8; len.div_ceil(PG) as usize];
    // SAFETY: `v` has a byte per page of the range.
    let r = unsafe { libc::mincore(addr as *mut _, len as usize, v.as_mut_ptr()) };
    r != 0 && last_errno() == libc::ENOMEM
}

pub(super) fn region_base(r: usize) -> u64 {
    ARENA + r as u64 * STRIDE
}
pub(super) const RO_REGION: usize = NSHARED;
pub(super) fn private_region(t: usize, which: usize) -> usize {
    NSHARED + 1 + 2 * t + which
}

/// A page that is never mapped in a fuzzer process.
pub(super) fn hole(page: u16) -> u64 {
    region_base(0) + u64::from(page) * PG
}

/// Maps a guard page at `addr` holding its pattern, then takes every access away.
pub(super) fn place_guard(addr: u64) -> Result<(), String> {
    map_at(addr, PG, false).map_err(|e| format!("guard page {addr:#x}: {}", errno_name(e)))?;
    write_words(addr, PG, guard_word);
    mprotect(addr, PG, libc::PROT_NONE)
        .map_err(|e| format!("mprotect guard {addr:#x}: {}", errno_name(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::call::shared_w;
    use crate::fuzz::generate::clip;
    use crate::fuzz::{
        ARENA, CANARY_LEN, CANARY_VA, HUGE_W, PRIV_W, RO_W, SMALL_W, THREADS, WIN_A, WIN_B,
    };
    use shared_regs::pte::VA_LIMIT;

    /// mm operations stay inside the window; windows, guards and holes never overlap.
    #[test]
    fn layout_and_clipping() {
        for (first, pages) in [(0, 0), (u16::MAX, u16::MAX), (15, 3), (3, 100)] {
            for wp in [SMALL_W / PG, HUGE_W / PG, 1] {
                let (f, n) = clip(first, pages, wp);
                assert!(n >= 1 && f + n <= wp, "{first} {pages} {wp}");
            }
        }
        let mut spans: Vec<(u64, u64)> = vec![];
        let regions = NSHARED + 1 + 2 * THREADS;
        for r in 0..regions {
            let w = if r < NSHARED {
                shared_w(r as u8)
            } else if r == RO_REGION {
                RO_W
            } else {
                PRIV_W
            };
            for win in [WIN_A, WIN_B] {
                let a = region_base(r) + win;
                spans.push((a - PG, a + w + PG));
                assert!(a + w + PG <= region_base(r + 1));
            }
            if r == NSHARED - 1 {
                assert_eq!((region_base(r) + WIN_A) % HUGE_W, 0);
                assert_eq!((region_base(r) + WIN_B) % HUGE_W, 0);
            }
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{w:x?}");
        }
        assert!(hole(255) + PG < region_base(0) + WIN_A - PG);
        const { assert!(CANARY_VA + CANARY_LEN < ARENA) };
        assert!(region_base(regions) < VA_LIMIT);
    }
}
