//! The validator's walker of a process's CPU page table.
//!
//! The driver hands the device `__pa(mm->pgd)`; on every checked access the device walks that
//! x86-64 table (4- or 5-level, 4 KiB/2 MiB/1 GiB leaves) the way the MMU would, to learn what
//! the CPU maps at a user VA right now. The table is guest memory, hence hostile: every read is
//! bounds-checked, and the walk reads at most one entry per level, so a table that points back at
//! itself cannot make it loop.
//!
//! The walk is read-only: unlike the MMU it never sets A or D, since the validator must not
//! change the state it judges.

use crate::guest::GuestMem;
use crate::x86pt::{
    x86_index, x86_levels, X86_ADDR_MASK, X86_D, X86_P, X86_PAT_HUGE, X86_PS, X86_RW, X86_SIZE_1G,
    X86_SIZE_2M, X86_SIZE_4K, X86_USER_LIMIT_4L, X86_USER_LIMIT_5L,
};
use thiserror::Error;

/// What the CPU maps at a VA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuPte {
    /// Nothing: some entry on the path has P clear (unmapped, swap or migration entry,
    /// PROT_NONE), or the VA is not a user address of this paging mode.
    NotPresent,
    /// A present leaf.
    Present {
        /// Guest-physical address of the 4 KiB frame containing the VA (page aligned).
        pa: u64,
        /// RW is set at every level, as x86 requires for a write.
        writable: bool,
        /// The leaf's D bit.
        dirty: bool,
        /// Leaf size: 4 KiB, 2 MiB or 1 GiB.
        size: u64,
    },
}

/// A CPU page table the walker cannot follow.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum CpuWalkError {
    /// The root is not 4 KiB aligned or not below 2^52.
    #[error("CPU page-table root {root:#x} is not a 4 KiB frame")]
    BadRoot {
        /// The root as given.
        root: u64,
    },
    /// An entry to read lies outside guest memory (bad root or table pointer).
    #[error("CPU page-table entry at {gpa:#x} (level {level}) is outside guest memory")]
    Unreadable {
        /// Level of the table being read (5 or 4 = root ... 1 = PT).
        level: u32,
        /// Address of the entry.
        gpa: u64,
    },
    /// A present entry the MMU would reject: PS at PML4/PML5, or reserved bits set in a huge
    /// leaf's frame field (a misaligned huge frame).
    #[error("malformed CPU page-table entry {entry:#x} at {gpa:#x} (level {level})")]
    Malformed {
        /// Level of the entry.
        level: u32,
        /// Address of the entry.
        gpa: u64,
        /// The entry.
        entry: u64,
    },
}

/// Walks the CPU page table rooted at `root` (5-level iff `la57`) for the user address `va`.
pub fn cpu_walk(
    mem: &impl GuestMem,
    root: u64,
    la57: bool,
    va: u64,
) -> Result<CpuPte, CpuWalkError> {
    // Only user addresses reach the validator; anything else (kernel half, non-canonical) is
    // not something a process maps.
    let limit = if la57 {
        X86_USER_LIMIT_5L
    } else {
        X86_USER_LIMIT_4L
    };
    if va >= limit {
        return Ok(CpuPte::NotPresent);
    }
    if root & !X86_ADDR_MASK != 0 {
        return Err(CpuWalkError::BadRoot { root });
    }
    let mut table = root;
    let mut level = x86_levels(la57);
    let mut writable = true;
    // `level` strictly decreases and level 1 always returns: at most 5 reads.
    loop {
        // `table` is below 2^52, so this cannot overflow.
        let gpa = table + 8 * x86_index(va, level);
        let entry = mem
            .load_u64(gpa)
            .map_err(|_| CpuWalkError::Unreadable { level, gpa })?;
        if entry & X86_P == 0 {
            return Ok(CpuPte::NotPresent);
        }
        writable &= entry & X86_RW != 0;
        // Bit 7 of a PT entry is PAT, not PS: a level-1 entry is a 4 KiB leaf whatever it says.
        let size = match (level, entry & X86_PS != 0) {
            (1, _) => X86_SIZE_4K,
            (2, true) => X86_SIZE_2M,
            (3, true) => X86_SIZE_1G,
            (4 | 5, true) => return Err(CpuWalkError::Malformed { level, gpa, entry }),
            _ => {
                table = entry & X86_ADDR_MASK;
                level -= 1;
                continue;
            }
        };
        // Frame bits below the page size must be zero in a huge leaf, except bit 12 (PAT).
        let low = entry & X86_ADDR_MASK & (size - 1) & !X86_PAT_HUGE;
        if size > X86_SIZE_4K && low != 0 {
            return Err(CpuWalkError::Malformed { level, gpa, entry });
        }
        let frame = entry & X86_ADDR_MASK & !(size - 1);
        return Ok(CpuPte::Present {
            pa: frame + (va & (size - 1) & !(X86_SIZE_4K - 1)),
            writable,
            dirty: entry & X86_D != 0,
            size,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::VecMem;
    use crate::x86pt::{CpuFlags, X86PageTable, X86_A, X86_NX, X86_TABLE_FLAGS, X86_US};

    const MEM: usize = 0x10_0000;

    fn setup(la57: bool) -> (VecMem, X86PageTable) {
        let mem = VecMem::new(0, MEM);
        let pt = X86PageTable::new(&mem, 0x1000, 0x8_0000, la57).unwrap();
        (mem, pt)
    }

    fn present(pa: u64, writable: bool, dirty: bool, size: u64) -> CpuPte {
        CpuPte::Present {
            pa,
            writable,
            dirty,
            size,
        }
    }

    #[test]
    fn leaves_of_every_size_both_modes() {
        for la57 in [false, true] {
            let (mem, mut pt) = setup(la57);
            let r = pt.root();
            pt.map_4k(&mem, 0x7fff_ffff_f000, 0x3_4000, CpuFlags::WRITABLE_DIRTY)
                .unwrap();
            pt.map_2m(&mem, 0x60_0000, 0x20_0000, CpuFlags::WRITABLE_CLEAN)
                .unwrap();
            pt.map_1g(&mem, 0x1_c000_0000, 0x8000_0000, CpuFlags::READ_ONLY)
                .unwrap();
            let w = |va| cpu_walk(&mem, r, la57, va).unwrap();
            assert_eq!(
                w(0x7fff_ffff_f123),
                present(0x3_4000, true, true, X86_SIZE_4K)
            );
            assert_eq!(w(0x60_0000), present(0x20_0000, true, false, X86_SIZE_2M));
            assert_eq!(w(0x7f_f001), present(0x3f_f000, true, false, X86_SIZE_2M));
            assert_eq!(
                w(0x1_c123_4567),
                present(0x8123_4000, false, false, X86_SIZE_1G)
            );
            assert_eq!(w(0x7fff_ffff_e000), CpuPte::NotPresent);
            assert_eq!(w(0), CpuPte::NotPresent);
        }
    }

    #[test]
    fn five_level_reaches_above_47_bits() {
        let (mem, mut pt) = setup(true);
        let va = 0x00ab_cdef_1234_5000;
        pt.map_4k(&mem, va, 0x5000, CpuFlags::READ_ONLY).unwrap();
        assert_eq!(
            cpu_walk(&mem, pt.root(), true, va).unwrap(),
            present(0x5000, false, false, X86_SIZE_4K)
        );
        // The same root read as a 4-level table: the VA is out of range.
        assert_eq!(
            cpu_walk(&mem, pt.root(), false, va).unwrap(),
            CpuPte::NotPresent
        );
        // Beyond the 57-bit user range.
        assert_eq!(
            cpu_walk(&mem, pt.root(), true, 1 << 56).unwrap(),
            CpuPte::NotPresent
        );
    }

    #[test]
    fn kernel_and_non_canonical_addresses_are_not_present() {
        let (mem, mut pt) = setup(false);
        let kva = 0xffff_8880_0000_0000;
        pt.map_4k(&mem, kva, 0x5000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        for va in [kva, 0x8000_0000_0000, 0x0000_8000_0000_1000, u64::MAX] {
            assert_eq!(
                cpu_walk(&mem, pt.root(), false, va).unwrap(),
                CpuPte::NotPresent
            );
        }
    }

    #[test]
    fn rw_needed_at_every_level() {
        for level in 1..=5 {
            let (mem, mut pt) = setup(true);
            let va = 0x1234_5000;
            pt.map_4k(&mem, va, 0x9000, CpuFlags::WRITABLE_DIRTY)
                .unwrap();
            pt.set_entry_flags(&mem, va, level, 0, X86_RW).unwrap();
            assert_eq!(
                cpu_walk(&mem, pt.root(), true, va).unwrap(),
                present(0x9000, false, true, X86_SIZE_4K),
                "RW cleared at level {level}"
            );
        }
    }

    #[test]
    fn p_clear_anywhere_is_not_present() {
        for level in 1..=4 {
            let (mem, mut pt) = setup(false);
            let va = 0x4000_0000;
            pt.map_4k(&mem, va, 0x9000, CpuFlags::WRITABLE_DIRTY)
                .unwrap();
            // Like a swap/PROT_NONE entry: other bits stay set, P is clear.
            pt.set_entry_flags(&mem, va, level, 0, X86_P).unwrap();
            assert_eq!(
                cpu_walk(&mem, pt.root(), false, va).unwrap(),
                CpuPte::NotPresent
            );
        }
    }

    #[test]
    fn ignored_and_pat_bits() {
        let (mem, mut pt) = setup(false);
        pt.map_4k(&mem, 0x1000, 0x7000, CpuFlags::READ_ONLY)
            .unwrap();
        pt.map_2m(&mem, 0x20_0000, 0x40_0000, CpuFlags::READ_ONLY)
            .unwrap();
        // PT bit 7 is PAT; software bits 11:9 and 58:52, protection keys 62:59.
        let noise = X86_PS | 0xe00 | (0x7ff << 52);
        pt.set_flags(&mem, 0x1000, noise, 0).unwrap();
        pt.set_flags(&mem, 0x20_0000, X86_PAT_HUGE | 0xe00 | (0x7ff << 52), 0)
            .unwrap();
        assert_eq!(
            cpu_walk(&mem, pt.root(), false, 0x1abc).unwrap(),
            present(0x7000, false, false, X86_SIZE_4K)
        );
        assert_eq!(
            cpu_walk(&mem, pt.root(), false, 0x20_3000).unwrap(),
            present(0x40_3000, false, false, X86_SIZE_2M)
        );
    }

    #[test]
    fn malformed_entries() {
        let (mem, mut pt) = setup(true);
        pt.map_4k(&mem, 0x1000, 0x7000, CpuFlags::READ_ONLY)
            .unwrap();
        pt.map_2m(&mem, 0x4000_0000, 0x40_0000, CpuFlags::READ_ONLY)
            .unwrap();
        // A misaligned 2 MiB frame.
        pt.set_flags(&mem, 0x4000_0000, 0x2000, 0).unwrap();
        assert!(matches!(
            cpu_walk(&mem, pt.root(), true, 0x4000_0000),
            Err(CpuWalkError::Malformed { level: 2, .. })
        ));
        for level in [4, 5] {
            pt.set_entry_flags(&mem, 0x1000, level, X86_PS, 0).unwrap();
            assert!(matches!(
                cpu_walk(&mem, pt.root(), true, 0x1000),
                Err(CpuWalkError::Malformed { level: l, .. }) if l == level
            ));
            pt.set_entry_flags(&mem, 0x1000, level, 0, X86_PS).unwrap();
        }
        assert!(cpu_walk(&mem, pt.root(), true, 0x1000).is_ok());
    }

    #[test]
    fn pointers_outside_memory() {
        let (mem, mut pt) = setup(false);
        assert!(matches!(
            cpu_walk(&mem, MEM as u64, false, 0),
            Err(CpuWalkError::Unreadable { level: 4, .. })
        ));
        assert!(matches!(
            cpu_walk(&mem, X86_ADDR_MASK, false, 0x7fff_ffff_f000),
            Err(CpuWalkError::Unreadable { level: 4, .. })
        ));
        assert_eq!(
            cpu_walk(&mem, 0x1008, false, 0),
            Err(CpuWalkError::BadRoot { root: 0x1008 })
        );
        assert_eq!(
            cpu_walk(&mem, u64::MAX, false, 0),
            Err(CpuWalkError::BadRoot { root: u64::MAX })
        );
        pt.map_4k(&mem, 0x1000, 0x7000, CpuFlags::READ_ONLY)
            .unwrap();
        // The PD entry points past the end of memory (and at the top of the 52-bit space).
        for bad in [0x10_0000, X86_ADDR_MASK] {
            let pd = pt.entry_gpa(&mem, 0x1000, 2).unwrap();
            mem.write_u64(pd, bad | X86_TABLE_FLAGS).unwrap();
            assert!(matches!(
                cpu_walk(&mem, pt.root(), false, 0x1000),
                Err(CpuWalkError::Unreadable { level: 1, .. })
            ));
        }
    }

    #[test]
    fn self_referencing_table_terminates() {
        let mem = VecMem::new(0, 0x2000);
        let root = 0x1000u64;
        // Every entry of the root points at the root itself (a recursive mapping gone wild).
        for i in 0..512 {
            mem.write_u64(root + 8 * i, root | X86_TABLE_FLAGS).unwrap();
        }
        for la57 in [false, true] {
            // The walk reads the root once per level and lands on it as a 4 KiB leaf.
            assert_eq!(
                cpu_walk(&mem, root, la57, 0x7f00_1234_5000).unwrap(),
                present(root, true, false, X86_SIZE_4K)
            );
        }
    }

    #[test]
    fn garbage_tables_never_panic() {
        let mem = VecMem::new(0, 0x4_0000);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            // xorshift64*: deterministic, no dependencies.
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut outcomes = [0u32; 3];
        for round in 0..64u32 {
            for gpa in (0..0x4_0000).step_by(8) {
                let mut v = next();
                // Keep some pointers inside memory so walks go deep, and some P bits set.
                if round.is_multiple_of(2) {
                    v = (v & (0x3_f000 | 0xfff | X86_NX)) | X86_P;
                }
                mem.write_u64(gpa, v).unwrap();
            }
            for _ in 0..64 {
                let root = next()
                    & if round.is_multiple_of(4) {
                        !0
                    } else {
                        0x3_f000
                    };
                let va = next() >> (next() % 20);
                let i = match cpu_walk(&mem, root, next() & 1 == 1, va) {
                    Ok(CpuPte::NotPresent) => 0,
                    Ok(CpuPte::Present { pa, size, .. }) => {
                        assert!(pa.is_multiple_of(X86_SIZE_4K));
                        assert!([X86_SIZE_4K, X86_SIZE_2M, X86_SIZE_1G].contains(&size));
                        1
                    }
                    Err(_) => 2,
                };
                outcomes[i] += 1;
            }
        }
        // The loop exercised every kind of outcome.
        assert!(outcomes.iter().all(|&n| n > 0), "{outcomes:?}");
    }

    #[test]
    fn user_bits_do_not_matter() {
        // The device acts for the process: US/A/NX on the path do not change the verdict.
        let (mem, mut pt) = setup(false);
        let flags = CpuFlags {
            user: false,
            accessed: false,
            nx: false,
            ..CpuFlags::WRITABLE_DIRTY
        };
        pt.map_4k(&mem, 0x5000, 0x6000, flags).unwrap();
        pt.set_entry_flags(&mem, 0x5000, 4, X86_NX, X86_US | X86_A)
            .unwrap();
        assert_eq!(
            cpu_walk(&mem, pt.root(), false, 0x5000).unwrap(),
            present(0x6000, true, true, X86_SIZE_4K)
        );
    }
}
