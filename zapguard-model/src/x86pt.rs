//! A builder of x86-64 CPU page tables, for tests, fuzzing and benchmarks.
//!
//! [`X86PageTable`] writes the tables a Linux process's `mm->pgd` points to (4-level, or 5-level
//! with LA57) into a [`GuestMem`], taking table pages from a bump allocator over a region the
//! caller sets aside. The validator's walker ([`crate::cpu_walk`]) reads the same format, so tests
//! can build exactly the CPU states the kernel produces (COW, mprotect, mkclean, THP, 1 GiB
//! hugetlb, swap entries) and check its verdicts.
//!
//! The constants here are the CPU's page-table format (Intel SDM vol. 3, 4.5), not the zapguard
//! device ABI, which lives in `shared_regs::pte`.
//!
//! Levels are numbered like the device page table: 1 = PT, 2 = PD, 3 = PDPT, 4 = PML4,
//! 5 = PML5 (5-level tables only).

use crate::guest::{GuestMem, MemError};
use thiserror::Error;

/// Present.
pub const X86_P: u64 = 1 << 0;
/// Writable (at every level: a write needs RW set on the whole path).
pub const X86_RW: u64 = 1 << 1;
/// User accessible.
pub const X86_US: u64 = 1 << 2;
/// Accessed.
pub const X86_A: u64 = 1 << 5;
/// Dirty (leaf only).
pub const X86_D: u64 = 1 << 6;
/// Page size: a 1 GiB leaf in a PDPT entry, a 2 MiB leaf in a PD entry, reserved above; in a
/// PT entry the same bit is PAT and has no structural meaning.
pub const X86_PS: u64 = 1 << 7;
/// PAT bit of a 2 MiB or 1 GiB leaf (bit 12, below the huge frame number).
pub const X86_PAT_HUGE: u64 = 1 << 12;
/// Execute disable.
pub const X86_NX: u64 = 1 << 63;
/// Frame of a 4 KiB leaf or of the next table (bits 51:12).
pub const X86_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Frame of a 2 MiB leaf (bits 51:21).
pub const X86_ADDR_MASK_2M: u64 = 0x000f_ffff_ffe0_0000;
/// Frame of a 1 GiB leaf (bits 51:30).
pub const X86_ADDR_MASK_1G: u64 = 0x000f_ffff_c000_0000;

/// Size of a 4 KiB page, and of a page table.
pub const X86_SIZE_4K: u64 = 1 << 12;
/// Size of a 2 MiB page.
pub const X86_SIZE_2M: u64 = 1 << 21;
/// Size of a 1 GiB page.
pub const X86_SIZE_1G: u64 = 1 << 30;
/// Entries per table.
pub const X86_ENTRIES: u64 = 512;

/// Flags Linux gives every non-leaf entry of a user page table (`_PAGE_TABLE`): P|RW|US|A.
pub const X86_TABLE_FLAGS: u64 = X86_P | X86_RW | X86_US | X86_A;

/// First user address past a 4-level table (bit 47 set is the kernel half, or non-canonical).
pub const X86_USER_LIMIT_4L: u64 = 1 << 47;
/// First user address past a 5-level table.
pub const X86_USER_LIMIT_5L: u64 = 1 << 56;

/// Index into the table at `level` (1 = PT ... 5 = PML5) for `va`.
pub const fn x86_index(va: u64, level: u32) -> u64 {
    (va >> (12 + 9 * (level - 1))) & (X86_ENTRIES - 1)
}

/// Number of levels: 5 with LA57, else 4.
pub const fn x86_levels(la57: bool) -> u32 {
    if la57 {
        5
    } else {
        4
    }
}

/// Whether `va` is canonical for the paging mode: bits 63:47 (63:56 with LA57) all equal.
pub const fn x86_canonical(va: u64, la57: bool) -> bool {
    let top = if la57 { 56 } else { 47 };
    let high = va >> top;
    high == 0 || high == u64::MAX >> top
}

/// Leaf permission and state bits, as the kernel sets them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFlags {
    /// RW.
    pub writable: bool,
    /// D.
    pub dirty: bool,
    /// US.
    pub user: bool,
    /// A.
    pub accessed: bool,
    /// NX.
    pub nx: bool,
}

impl CpuFlags {
    /// A user read-only page: the zero page, a COW page before the break, `PROT_READ`.
    pub const READ_ONLY: Self = Self {
        writable: false,
        dirty: false,
        user: true,
        accessed: true,
        nx: true,
    };
    /// A writable page not written yet (shmem read fault, freshly cleaned page).
    pub const WRITABLE_CLEAN: Self = Self {
        writable: true,
        ..Self::READ_ONLY
    };
    /// A writable page that has been written (anonymous write fault).
    pub const WRITABLE_DIRTY: Self = Self {
        dirty: true,
        ..Self::WRITABLE_CLEAN
    };

    /// The entry bits, without P and PS.
    pub const fn bits(self) -> u64 {
        (if self.writable { X86_RW } else { 0 })
            | (if self.dirty { X86_D } else { 0 })
            | (if self.user { X86_US } else { 0 })
            | (if self.accessed { X86_A } else { 0 })
            | (if self.nx { X86_NX } else { 0 })
    }
}

/// A failed page-table edit.
#[derive(Debug, Error)]
pub enum X86PtError {
    /// The allocation region has no room for another table page.
    #[error("no room for another page table in the allocation region")]
    OutOfTables,
    /// The allocation region is empty or wraps.
    #[error("invalid table allocation region {base:#x}..{end:#x}")]
    BadRegion {
        /// Start of the region.
        base: u64,
        /// End of the region.
        end: u64,
    },
    /// The VA is not canonical for the paging mode.
    #[error("virtual address {va:#x} is not canonical")]
    NonCanonical {
        /// Virtual address.
        va: u64,
    },
    /// The VA or PA is not aligned to the page size, or the PA does not fit in 52 bits.
    #[error("cannot map {va:#x} -> {pa:#x} with a {size:#x}-byte page")]
    BadFrame {
        /// Virtual address.
        va: u64,
        /// Physical address.
        pa: u64,
        /// Page size.
        size: u64,
    },
    /// A huge leaf is in the way of a finer mapping, or a table in the way of a huge leaf.
    #[error("conflicting entry at level {level} for {va:#x}")]
    Conflict {
        /// Virtual address.
        va: u64,
        /// Level of the conflicting entry.
        level: u32,
    },
    /// Nothing is mapped at the VA.
    #[error("nothing mapped at {va:#x}")]
    NotMapped {
        /// Virtual address.
        va: u64,
    },
    /// The level is outside 1..=levels.
    #[error("no level {level} in this table")]
    BadLevel {
        /// Requested level.
        level: u32,
    },
    /// Guest memory refused an access.
    #[error(transparent)]
    Mem(#[from] MemError),
}

/// An x86-64 page table under construction in guest memory.
///
/// Holds only the root and the allocator; the tables themselves live in the [`GuestMem`] passed
/// to each call, so tests may also poke entries directly (see [`X86PageTable::entry_gpa`]).
#[derive(Clone, Debug)]
pub struct X86PageTable {
    root: u64,
    la57: bool,
    next: u64,
    end: u64,
}

impl X86PageTable {
    /// Allocates and zeroes the root table; later tables come from `[alloc_base, alloc_end)`
    /// (`alloc_base` is rounded up to 4 KiB).
    pub fn new(
        mem: &impl GuestMem,
        alloc_base: u64,
        alloc_end: u64,
        la57: bool,
    ) -> Result<Self, X86PtError> {
        let bad = X86PtError::BadRegion {
            base: alloc_base,
            end: alloc_end,
        };
        let next = alloc_base
            .checked_next_multiple_of(X86_SIZE_4K)
            .ok_or(bad)?;
        let mut pt = Self {
            root: 0,
            la57,
            next,
            end: alloc_end,
        };
        pt.root = pt.alloc_table(mem)?;
        Ok(pt)
    }

    /// Guest-physical address of the root (what `__pa(mm->pgd)` gives the driver).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Whether the table has 5 levels.
    pub fn la57(&self) -> bool {
        self.la57
    }

    /// Number of levels (4 or 5).
    pub fn levels(&self) -> u32 {
        x86_levels(self.la57)
    }

    /// First address the allocator has not handed out yet.
    pub fn next_free(&self) -> u64 {
        self.next
    }

    /// Maps the 4 KiB page at `va` to `pa`.
    pub fn map_4k(
        &mut self,
        mem: &impl GuestMem,
        va: u64,
        pa: u64,
        flags: CpuFlags,
    ) -> Result<(), X86PtError> {
        self.map(mem, va, pa, flags, 1)
    }

    /// Maps the 2 MiB page at `va` to `pa` (a PD leaf; both 2 MiB aligned).
    pub fn map_2m(
        &mut self,
        mem: &impl GuestMem,
        va: u64,
        pa: u64,
        flags: CpuFlags,
    ) -> Result<(), X86PtError> {
        self.map(mem, va, pa, flags, 2)
    }

    /// Maps the 1 GiB page at `va` to `pa` (a PDPT leaf; both 1 GiB aligned).
    pub fn map_1g(
        &mut self,
        mem: &impl GuestMem,
        va: u64,
        pa: u64,
        flags: CpuFlags,
    ) -> Result<(), X86PtError> {
        self.map(mem, va, pa, flags, 3)
    }

    /// Clears the leaf covering `va`, whatever its size, like `munmap` or `zap_pte_range`.
    /// Returns whether something was mapped. Tables are not freed.
    pub fn unmap(&self, mem: &impl GuestMem, va: u64) -> Result<bool, X86PtError> {
        match self.find_leaf(mem, va)? {
            Some((gpa, _)) => {
                mem.write_u64(gpa, 0)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Sets then clears raw bits in the leaf covering `va` (e.g. clear [`X86_RW`] for COW or
    /// mprotect, clear [`X86_D`] for mkclean, clear [`X86_P`] to model a swap or PROT_NONE
    /// entry). Returns the new entry.
    pub fn set_flags(
        &self,
        mem: &impl GuestMem,
        va: u64,
        set: u64,
        clear: u64,
    ) -> Result<u64, X86PtError> {
        let (gpa, _) = self
            .find_leaf(mem, va)?
            .ok_or(X86PtError::NotMapped { va })?;
        Self::update(mem, gpa, set, clear)
    }

    /// Sets then clears raw bits in the entry at `level` on `va`'s path, which may be a table
    /// entry (e.g. clear [`X86_RW`] in the PMD only). Returns the new entry.
    pub fn set_entry_flags(
        &self,
        mem: &impl GuestMem,
        va: u64,
        level: u32,
        set: u64,
        clear: u64,
    ) -> Result<u64, X86PtError> {
        let gpa = self.entry_gpa(mem, va, level)?;
        Self::update(mem, gpa, set, clear)
    }

    /// Guest-physical address of the entry at `level` on `va`'s path. Every entry above it must
    /// be a present table entry.
    pub fn entry_gpa(&self, mem: &impl GuestMem, va: u64, level: u32) -> Result<u64, X86PtError> {
        if level == 0 || level > self.levels() {
            return Err(X86PtError::BadLevel { level });
        }
        if !x86_canonical(va, self.la57) {
            return Err(X86PtError::NonCanonical { va });
        }
        let mut table = self.root;
        for l in (level + 1..=self.levels()).rev() {
            let entry = mem.read_u64(slot(table, va, l))?;
            if entry & X86_P == 0 || entry & X86_PS != 0 {
                return Err(X86PtError::NotMapped { va });
            }
            table = entry & X86_ADDR_MASK;
        }
        Ok(slot(table, va, level))
    }

    /// The present leaf covering `va`: its entry's address and level.
    fn find_leaf(&self, mem: &impl GuestMem, va: u64) -> Result<Option<(u64, u32)>, X86PtError> {
        if !x86_canonical(va, self.la57) {
            return Err(X86PtError::NonCanonical { va });
        }
        let mut table = self.root;
        for level in (1..=self.levels()).rev() {
            let gpa = slot(table, va, level);
            let entry = mem.read_u64(gpa)?;
            if entry & X86_P == 0 {
                return Ok(None);
            }
            if level == 1 || (level <= 3 && entry & X86_PS != 0) {
                return Ok(Some((gpa, level)));
            }
            table = entry & X86_ADDR_MASK;
        }
        Ok(None)
    }

    fn map(
        &mut self,
        mem: &impl GuestMem,
        va: u64,
        pa: u64,
        flags: CpuFlags,
        leaf_level: u32,
    ) -> Result<(), X86PtError> {
        if !x86_canonical(va, self.la57) {
            return Err(X86PtError::NonCanonical { va });
        }
        let (size, mask, ps) = match leaf_level {
            1 => (X86_SIZE_4K, X86_ADDR_MASK, 0),
            2 => (X86_SIZE_2M, X86_ADDR_MASK_2M, X86_PS),
            _ => (X86_SIZE_1G, X86_ADDR_MASK_1G, X86_PS),
        };
        if !va.is_multiple_of(size) || pa & !mask != 0 {
            return Err(X86PtError::BadFrame { va, pa, size });
        }
        let mut table = self.root;
        for level in (leaf_level + 1..=self.levels()).rev() {
            let gpa = slot(table, va, level);
            let entry = mem.read_u64(gpa)?;
            table = if entry & X86_P == 0 {
                let t = self.alloc_table(mem)?;
                mem.write_u64(gpa, t | X86_TABLE_FLAGS)?;
                t
            } else if entry & X86_PS != 0 {
                return Err(X86PtError::Conflict { va, level });
            } else {
                entry & X86_ADDR_MASK
            };
        }
        let gpa = slot(table, va, leaf_level);
        let old = mem.read_u64(gpa)?;
        // Replacing a table with a leaf would leak (and silently unmap) everything below it.
        if leaf_level > 1 && old & X86_P != 0 && old & X86_PS == 0 {
            return Err(X86PtError::Conflict {
                va,
                level: leaf_level,
            });
        }
        mem.write_u64(gpa, pa | X86_P | ps | flags.bits())?;
        Ok(())
    }

    fn update(mem: &impl GuestMem, gpa: u64, set: u64, clear: u64) -> Result<u64, X86PtError> {
        let new = (mem.read_u64(gpa)? | set) & !clear;
        mem.write_u64(gpa, new)?;
        Ok(new)
    }

    fn alloc_table(&mut self, mem: &impl GuestMem) -> Result<u64, X86PtError> {
        let t = self.next;
        let end = t
            .checked_add(X86_SIZE_4K)
            .filter(|&e| e <= self.end)
            .ok_or(X86PtError::OutOfTables)?;
        if t & !X86_ADDR_MASK != 0 {
            return Err(X86PtError::OutOfTables);
        }
        mem.write(t, &[0u8; X86_SIZE_4K as usize])?;
        self.next = end;
        Ok(t)
    }
}

/// Address of `va`'s entry in the table at `table` (4 KiB aligned, below 2^52: cannot overflow).
fn slot(table: u64, va: u64, level: u32) -> u64 {
    table + 8 * x86_index(va, level)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::VecMem;

    const MEM: u64 = 0x10_0000;

    fn setup(la57: bool) -> (VecMem, X86PageTable) {
        let mem = VecMem::new(0, MEM as usize);
        let pt = X86PageTable::new(&mem, 0x1000, 0x8_0000, la57).unwrap();
        (mem, pt)
    }

    #[test]
    fn index_and_canonical() {
        let va = 0x0123_4567_89ab_c000u64;
        assert_eq!(x86_index(va, 1), (va >> 12) & 0x1ff);
        assert_eq!(x86_index(va, 5), (va >> 48) & 0x1ff);
        assert!(x86_canonical(0x7fff_ffff_f000, false));
        assert!(x86_canonical(0xffff_8000_0000_0000, false));
        assert!(!x86_canonical(0x8000_0000_0000, false));
        assert!(x86_canonical(0x8000_0000_0000, true));
        assert!(!x86_canonical(0x0100_0000_0000_0000, true));
        assert!(x86_canonical(0xff00_0000_0000_0000, true));
    }

    #[test]
    fn builds_linux_shaped_4k_path() {
        let (mem, mut pt) = setup(false);
        let va = 0x7f12_3456_7000;
        pt.map_4k(&mem, va, 0x9_a000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        let mut table = pt.root();
        for level in (2..=4).rev() {
            let e = mem.read_u64(table + 8 * x86_index(va, level)).unwrap();
            assert_eq!(e & !X86_ADDR_MASK, X86_TABLE_FLAGS, "level {level}");
            table = e & X86_ADDR_MASK;
        }
        let leaf = mem.read_u64(table + 8 * x86_index(va, 1)).unwrap();
        assert_eq!(
            leaf,
            0x9_a000 | X86_P | X86_RW | X86_US | X86_A | X86_D | X86_NX
        );
        assert_eq!(
            pt.entry_gpa(&mem, va, 1).unwrap(),
            table + 8 * x86_index(va, 1)
        );
        // Root plus PDPT, PD, PT.
        assert_eq!(pt.next_free(), 0x5000);
    }

    #[test]
    fn huge_leaves_and_conflicts() {
        let (mem, mut pt) = setup(true);
        pt.map_2m(&mem, 0x4000_0000, 0x20_0000, CpuFlags::READ_ONLY)
            .unwrap();
        pt.map_1g(&mem, 0x8000_0000, 0x4000_0000, CpuFlags::READ_ONLY)
            .unwrap();
        let pd = pt.entry_gpa(&mem, 0x4000_0000, 2).unwrap();
        assert_eq!(mem.read_u64(pd).unwrap() & (X86_PS | X86_P), X86_PS | X86_P);
        assert!(matches!(
            pt.map_4k(&mem, 0x4000_1000, 0x1000, CpuFlags::READ_ONLY),
            Err(X86PtError::Conflict { level: 2, .. })
        ));
        assert!(matches!(
            pt.map_1g(&mem, 0x4000_0000, 0, CpuFlags::READ_ONLY),
            Err(X86PtError::Conflict { level: 3, .. })
        ));
        assert!(matches!(
            pt.map_2m(&mem, 0x4010_0000, 0x20_0000, CpuFlags::READ_ONLY),
            Err(X86PtError::BadFrame { .. })
        ));
        assert!(matches!(
            pt.map_2m(&mem, 0x40_0000, 0x30_0000, CpuFlags::READ_ONLY),
            Err(X86PtError::BadFrame { .. })
        ));
        assert!(matches!(
            pt.map_4k(&mem, 0x1000, 1 << 52, CpuFlags::READ_ONLY),
            Err(X86PtError::BadFrame { .. })
        ));
        assert!(matches!(
            pt.map_4k(&mem, 0x0100_0000_0000_0000, 0, CpuFlags::READ_ONLY),
            Err(X86PtError::NonCanonical { .. })
        ));
    }

    #[test]
    fn unmap_and_set_flags() {
        let (mem, mut pt) = setup(false);
        pt.map_2m(&mem, 0x20_0000, 0x40_0000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        let e = pt.set_flags(&mem, 0x21_0000, 0, X86_RW | X86_D).unwrap();
        assert_eq!(e & (X86_RW | X86_D | X86_PS), X86_PS);
        let pmd = pt.set_entry_flags(&mem, 0x20_0000, 3, 0, X86_RW).unwrap();
        assert_eq!(pmd & X86_RW, 0);
        assert!(pt.unmap(&mem, 0x3f_f000).unwrap());
        assert!(!pt.unmap(&mem, 0x3f_f000).unwrap());
        assert!(matches!(
            pt.set_flags(&mem, 0x20_0000, X86_D, 0),
            Err(X86PtError::NotMapped { .. })
        ));
        assert!(matches!(
            pt.entry_gpa(&mem, 0x20_0000, 6),
            Err(X86PtError::BadLevel { level: 6 })
        ));
    }

    #[test]
    fn allocator_bounds() {
        let mem = VecMem::new(0, 0x4000);
        // Only the root fits.
        let mut pt = X86PageTable::new(&mem, 0x800, 0x2000, false).unwrap();
        assert_eq!(pt.root(), 0x1000);
        assert!(matches!(
            pt.map_4k(&mem, 0, 0, CpuFlags::READ_ONLY),
            Err(X86PtError::OutOfTables)
        ));
        // Region inside the allocator's range but outside memory.
        assert!(matches!(
            X86PageTable::new(&mem, 0x8000, 0x9000, false),
            Err(X86PtError::Mem(_))
        ));
        assert!(matches!(
            X86PageTable::new(&mem, u64::MAX - 5, u64::MAX, false),
            Err(X86PtError::BadRegion { .. })
        ));
    }
}
