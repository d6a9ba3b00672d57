//! The device page table: the walker the device runs on an IOTLB miss, and
//! [`PageTableBuilder`], which writes tables the way a driver does (for tests, fuzzing, property
//! tests and benches).
//!
//! The format is defined in [`shared_regs::pte`]. Tables live in guest memory and are written by
//! the guest, so every entry is hostile: the walker reads at most [`pte::PT_LEVELS`] entries
//! (self-referencing tables terminate), never panics, and reports every malformed entry as a
//! [`WalkFault`].
//!
//! Choices where the ABI text leaves room, following x86 and VT-d:
//!
//! - The fault reported is the first one met going down the tree, except that a missing write
//!   permission is only reported once a leaf is reached: a not-present or bad entry below a
//!   read-only one reports not-present/bad (like x86's error code, P=0 wins).
//! - A and D are set only by a walk that succeeds: a faulting walk leaves guest memory untouched,
//!   so a stalled DMA that is resumed after the driver fixed the table sees a clean state.
//! - `PS` in a level-1 entry is ignored (it is the PAT bit on x86, free for software here).
//! - A/D are set with `fetch_or` on the entries as read. If the driver rewrote an entry between
//!   the read and the `fetch_or` (the value the RMW returns differs from the one read in
//!   anything but A and D), the walk starts again, at most [`WALK_RESTARTS`] times, like an x86
//!   walker whose locked A/D update finds the entry changed. So D in the value the driver swaps
//!   out of a leaf is exactly "the device may have written through it": a write never follows a
//!   D the driver could not see, which its dirty tracking relies on.

use crate::guest::{GuestMem, MemError};
use shared_regs::{event, pte};
use std::fmt;

/// Byte size of a page-table entry.
const ENTRY_SIZE: u64 = 8;
/// Byte size of one table (one 4 KiB page).
const TABLE_SIZE: u64 = pte::PAGE_SIZE;

/// A successful walk: the page covering the address walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// First virtual address of the page.
    pub va_base: u64,
    /// Page size: [`pte::PAGE_SIZE`] or [`pte::HUGE_PAGE_SIZE`].
    pub size: u64,
    /// Guest-physical address of the page frame.
    pub pa_base: u64,
    /// Every level grants write permission.
    pub writable: bool,
    /// The leaf's D bit is set (after this walk: always true for a write walk).
    pub dirty: bool,
    /// Guest-physical address of the leaf entry.
    pub leaf_gpa: u64,
}

impl Translation {
    /// Whether `va` lies in this page.
    pub fn contains(&self, va: u64) -> bool {
        va.wrapping_sub(self.va_base) < self.size
    }

    /// Guest-physical address of `va`; meaningful only if [`Self::contains`] `va`.
    pub fn pa(&self, va: u64) -> u64 {
        self.pa_base
            .wrapping_add(va.wrapping_sub(self.va_base) & self.size.wrapping_sub(1))
    }
}

/// A failed walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkFault {
    /// Why: an [`event`] `FAULT_*` reason.
    pub reason: u16,
    /// Level of the entry at fault (4 = root table, 1 = last). [`event::FAULT_ADDRESS`] reports
    /// [`pte::PT_LEVELS`] (nothing was read); [`event::FAULT_PERMISSION`] the highest level whose
    /// entry lacks W.
    pub level: u32,
}

impl fmt::Display for WalkFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} fault at level {}",
            event::fault_name(self.reason),
            self.level
        )
    }
}

impl std::error::Error for WalkFault {}

fn fault(reason: u16, level: u32) -> WalkFault {
    WalkFault { reason, level }
}

/// Address of the entry for `va` in the table at `table` (already masked, so no overflow).
fn entry_gpa(table: u64, va: u64, level: u32) -> u64 {
    table + pte::pt_index(va, level) as u64 * ENTRY_SIZE
}

/// Walks the device page table rooted at `root` (a context entry's `pt_root`, masked with
/// [`pte::PTE_ADDR_MASK`]) for an access to `va`; a `write` walk needs W at every level.
///
/// On success sets A in every entry walked and, for a write, D in the leaf, each only if not
/// already set, with [`GuestMem::fetch_or_u64`]. Reads at most [`pte::PT_LEVELS`] entries.
pub fn walk<M: GuestMem + ?Sized>(
    mem: &M,
    root: u64,
    va: u64,
    write: bool,
) -> Result<Translation, WalkFault> {
    walk_paced(mem, root, va, write, |_, _| {})
}

/// [`walk`], calling `pace(level, table)` before reading the entry at each level (4 = root table
/// first; `table`: the GPA of the table page the entry is about to be read from). The device's
/// `WALK_LAG` sleeps there, and its table-lifetime check (`PT_FREED_PAGES`) reads the table's
/// bit there: every table is read from guest memory at that moment, never earlier, so whatever
/// the guest writes to a table (or to the bitmap) before the walker reaches it is what the
/// walker sees.
pub fn walk_paced<M: GuestMem + ?Sized>(
    mem: &M,
    root: u64,
    va: u64,
    write: bool,
    mut pace: impl FnMut(u32, u64),
) -> Result<Translation, WalkFault> {
    for _ in 0..WALK_RESTARTS {
        match walk_once(mem, root, va, write, &mut pace) {
            Err(Walked::Changed) => continue,
            Err(Walked::Fault(f)) => return Err(f),
            Ok(t) => return Ok(t),
        }
    }
    // An entry that changes under every walk: the driver is rewriting the table as fast as the
    // device walks it.
    Err(fault(event::FAULT_WALK_ABORT, pte::PT_LEVELS))
}

/// Walks a driver may force to start again (an entry rewritten between the walker's read and its
/// A/D update) before the access aborts.
pub const WALK_RESTARTS: usize = 8;

/// Why one walk attempt did not return a translation.
enum Walked {
    Fault(WalkFault),
    /// An entry changed between its read and the A/D update: walk again.
    Changed,
}

impl From<WalkFault> for Walked {
    fn from(f: WalkFault) -> Self {
        Self::Fault(f)
    }
}

fn walk_once<M: GuestMem + ?Sized>(
    mem: &M,
    root: u64,
    va: u64,
    write: bool,
    pace: &mut impl FnMut(u32, u64),
) -> Result<Translation, Walked> {
    if va >= pte::VA_LIMIT {
        return Err(fault(event::FAULT_ADDRESS, pte::PT_LEVELS).into());
    }
    // (entry address, entry value, level) of each entry walked, for the A/D pass.
    let mut walked = [(0u64, 0u64, 0u32); pte::PT_LEVELS as usize];
    let mut n = 0;
    let mut denied = None;
    let mut table = root & pte::PTE_ADDR_MASK;
    let mut level = pte::PT_LEVELS;
    loop {
        let gpa = entry_gpa(table, va, level);
        pace(level, table);
        let e = mem
            .load_u64(gpa)
            .map_err(|_| fault(event::FAULT_WALK_ABORT, level))?;
        if e & pte::PTE_P == 0 {
            return Err(fault(event::FAULT_NOT_PRESENT, level).into());
        }
        if e & pte::PTE_RESERVED != 0 || (e & pte::PTE_PS != 0 && level > 2) {
            return Err(fault(event::FAULT_BAD_PTE, level).into());
        }
        if let Some(slot) = walked.get_mut(n) {
            *slot = (gpa, e, level);
            n += 1;
        }
        if write && e & pte::PTE_W == 0 && denied.is_none() {
            denied = Some(level);
        }
        let huge = level == 2 && e & pte::PTE_PS != 0;
        if level > 1 && !huge {
            table = e & pte::PTE_ADDR_MASK;
            level -= 1;
            continue;
        }

        let size = if huge {
            pte::HUGE_PAGE_SIZE
        } else {
            pte::PAGE_SIZE
        };
        let pa_base = e & pte::PTE_ADDR_MASK;
        if pa_base & (size - 1) != 0 {
            return Err(fault(event::FAULT_BAD_PTE, level).into());
        }
        if let Some(l) = denied {
            return Err(fault(event::FAULT_PERMISSION, l).into());
        }
        let walked = &walked[..n];
        for (i, &(gpa, e, l)) in walked.iter().enumerate() {
            let mut bits = pte::PTE_A;
            if write && i + 1 == walked.len() {
                bits |= pte::PTE_D;
            }
            // Skip the atomic RMW when the bits are already there: the common, hot case.
            if e & bits != bits {
                let was = mem
                    .fetch_or_u64(gpa, bits)
                    .map_err(|_| fault(event::FAULT_WALK_ABORT, l))?;
                if (was ^ e) & !(pte::PTE_A | pte::PTE_D) != 0 {
                    return Err(Walked::Changed);
                }
            }
        }
        return Ok(Translation {
            va_base: va & !(size - 1),
            size,
            pa_base,
            writable: walked.iter().all(|w| w.1 & pte::PTE_W != 0),
            dirty: write || e & pte::PTE_D != 0,
            leaf_gpa: gpa,
        });
    }
}

/// Why [`PageTableBuilder`] could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A VA or PA not aligned to the page size, a VA at or above [`pte::VA_LIMIT`], a PA with bits
    /// outside [`pte::PTE_ADDR_MASK`], or an allocation region that wraps.
    #[error("bad address: va {va:#x} pa {pa:#x}")]
    BadAddress {
        /// The virtual address (or allocation base).
        va: u64,
        /// The physical address (or allocation end).
        pa: u64,
    },
    /// The allocation region has no room for another table.
    #[error("page-table allocation region exhausted")]
    OutOfTables,
    /// The entry at `level` on the way to `va` is a mapping of the other size, or malformed.
    #[error("conflicting entry at level {level} for va {va:#x}")]
    Conflict {
        /// The virtual address being mapped.
        va: u64,
        /// Level of the conflicting entry.
        level: u32,
    },
    /// A table is outside guest memory.
    #[error(transparent)]
    Mem(#[from] MemError),
}

/// Writes device page tables into guest memory like a driver does, allocating tables from a
/// bump region `[alloc_base, alloc_end)`; tables are never freed.
///
/// Intermediate entries are created present and writable, so write permission is decided by the
/// leaf; A and D are left for the device to set. The builder holds no borrow of the memory, so
/// tests can hand the same memory to the device in between.
#[derive(Clone, Debug)]
pub struct PageTableBuilder {
    root: u64,
    next: u64,
    end: u64,
}

impl PageTableBuilder {
    /// Allocates and zeroes a root table at `alloc_base` (rounded up to 4 KiB).
    pub fn new<M: GuestMem + ?Sized>(
        mem: &M,
        alloc_base: u64,
        alloc_end: u64,
    ) -> Result<Self, BuildError> {
        let base = alloc_base
            .checked_next_multiple_of(TABLE_SIZE)
            .filter(|b| b & !pte::PTE_ADDR_MASK == 0)
            .ok_or(BuildError::BadAddress {
                va: alloc_base,
                pa: alloc_end,
            })?;
        let mut b = Self {
            root: 0,
            next: base,
            end: alloc_end,
        };
        b.root = b.alloc(mem)?;
        Ok(b)
    }

    /// Guest-physical address of the root table (what goes in the context entry's `pt_root`).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Number of bytes of the allocation region used so far (the root included).
    pub fn allocated(&self) -> u64 {
        self.next - self.root
    }

    fn alloc<M: GuestMem + ?Sized>(&mut self, mem: &M) -> Result<u64, BuildError> {
        let t = self.next;
        // The table must be addressable by an entry, i.e. fit in PTE_ADDR_MASK.
        let end = t
            .checked_add(TABLE_SIZE)
            .filter(|&e| e <= self.end && t & !pte::PTE_ADDR_MASK == 0)
            .ok_or(BuildError::OutOfTables)?;
        mem.write(t, &[0u8; TABLE_SIZE as usize])?;
        self.next = end;
        Ok(t)
    }

    /// Address of the entry for `va` at `target` level, creating missing tables above it.
    fn slot<M: GuestMem + ?Sized>(
        &mut self,
        mem: &M,
        va: u64,
        target: u32,
    ) -> Result<u64, BuildError> {
        let mut table = self.root;
        for level in (target + 1..=pte::PT_LEVELS).rev() {
            let gpa = entry_gpa(table, va, level);
            let e = mem.read_u64(gpa)?;
            table = if e & pte::PTE_P == 0 {
                let t = self.alloc(mem)?;
                mem.write_u64(gpa, t | pte::PTE_P | pte::PTE_W)?;
                t
            } else if e & (pte::PTE_PS | pte::PTE_RESERVED) != 0 {
                return Err(BuildError::Conflict { va, level });
            } else {
                e & pte::PTE_ADDR_MASK
            };
        }
        Ok(entry_gpa(table, va, target))
    }

    fn check(va: u64, pa: u64, size: u64) -> Result<(), BuildError> {
        if !va.is_multiple_of(size)
            || !pa.is_multiple_of(size)
            || va >= pte::VA_LIMIT
            || pa & !pte::PTE_ADDR_MASK != 0
        {
            return Err(BuildError::BadAddress { va, pa });
        }
        Ok(())
    }

    fn leaf(pa: u64, writable: bool) -> u64 {
        pa | pte::PTE_P | if writable { pte::PTE_W } else { 0 }
    }

    /// Maps the 4 KiB page at `va` to `pa`, replacing a 4 KiB mapping already there. Fails with
    /// [`BuildError::Conflict`] if a 2 MiB mapping covers `va`.
    pub fn map_4k<M: GuestMem + ?Sized>(
        &mut self,
        mem: &M,
        va: u64,
        pa: u64,
        writable: bool,
    ) -> Result<(), BuildError> {
        Self::check(va, pa, pte::PAGE_SIZE)?;
        let gpa = self.slot(mem, va, 1)?;
        mem.write_u64(gpa, Self::leaf(pa, writable))?;
        Ok(())
    }

    /// Maps the 2 MiB page at `va` to `pa`, replacing a 2 MiB mapping already there. Fails with
    /// [`BuildError::Conflict`] if a level-1 table (4 KiB mappings) is in the way.
    pub fn map_2m<M: GuestMem + ?Sized>(
        &mut self,
        mem: &M,
        va: u64,
        pa: u64,
        writable: bool,
    ) -> Result<(), BuildError> {
        Self::check(va, pa, pte::HUGE_PAGE_SIZE)?;
        let gpa = self.slot(mem, va, 2)?;
        let e = mem.read_u64(gpa)?;
        if e & pte::PTE_P != 0 && e & pte::PTE_PS == 0 {
            return Err(BuildError::Conflict { va, level: 2 });
        }
        mem.write_u64(gpa, Self::leaf(pa, writable) | pte::PTE_PS)?;
        Ok(())
    }

    /// Address of the present leaf entry (4 KiB or 2 MiB) covering `va`, if any. Reads the
    /// tables as they are in memory, whoever wrote them.
    pub fn leaf_gpa<M: GuestMem + ?Sized>(&self, mem: &M, va: u64) -> Option<u64> {
        if va >= pte::VA_LIMIT {
            return None;
        }
        let mut table = self.root;
        for level in (1..=pte::PT_LEVELS).rev() {
            let gpa = entry_gpa(table, va, level);
            let e = mem.read_u64(gpa).ok()?;
            if e & pte::PTE_P == 0 || e & pte::PTE_RESERVED != 0 {
                return None;
            }
            if level == 1 || e & pte::PTE_PS != 0 {
                // PS above level 2 is malformed, not a leaf.
                return (level <= 2).then_some(gpa);
            }
            table = e & pte::PTE_ADDR_MASK;
        }
        None
    }

    /// The present leaf entry covering `va`, with the A/D bits the device set.
    pub fn read_leaf<M: GuestMem + ?Sized>(&self, mem: &M, va: u64) -> Option<u64> {
        mem.read_u64(self.leaf_gpa(mem, va)?).ok()
    }

    /// Clears the leaf covering `va` (the whole 2 MiB page for a huge mapping). Returns whether
    /// there was one. The caller invalidates the IOTLB, as a driver must.
    pub fn unmap<M: GuestMem + ?Sized>(&mut self, mem: &M, va: u64) -> bool {
        self.leaf_gpa(mem, va)
            .is_some_and(|gpa| mem.write_u64(gpa, 0).is_ok())
    }

    /// Sets or clears W in the leaf covering `va`, keeping A/D. Returns whether there was one.
    pub fn set_writable<M: GuestMem + ?Sized>(&mut self, mem: &M, va: u64, writable: bool) -> bool {
        let Some(gpa) = self.leaf_gpa(mem, va) else {
            return false;
        };
        let Ok(e) = mem.read_u64(gpa) else {
            return false;
        };
        let e = if writable {
            e | pte::PTE_W
        } else {
            e & !pte::PTE_W
        };
        mem.write_u64(gpa, e).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::VecMem;
    use event::*;
    use pte::*;
    use std::cell::Cell;

    const MEM_BASE: u64 = 0x10_0000;
    const MEM_SIZE: usize = 16 << 20;
    const PT_BASE: u64 = MEM_BASE;
    const PT_END: u64 = MEM_BASE + (1 << 20);

    fn setup() -> (VecMem, PageTableBuilder) {
        let mem = VecMem::new(MEM_BASE, MEM_SIZE);
        let b = PageTableBuilder::new(&mem, PT_BASE, PT_END).unwrap();
        (mem, b)
    }

    /// Counts reads and atomic RMWs, to check walk bounds and the skip of redundant RMWs.
    struct Counting<'a> {
        inner: &'a VecMem,
        reads: Cell<usize>,
        rmws: Cell<usize>,
    }

    impl<'a> Counting<'a> {
        fn new(inner: &'a VecMem) -> Self {
            Self {
                inner,
                reads: Cell::new(0),
                rmws: Cell::new(0),
            }
        }
    }

    impl GuestMem for Counting<'_> {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.reads.set(self.reads.get() + 1);
            self.inner.read(gpa, buf)
        }
        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
            self.inner.write(gpa, buf)
        }
        fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
            self.rmws.set(self.rmws.get() + 1);
            self.inner.fetch_or_u64(gpa, bits)
        }
    }

    /// Entry addresses on the way to `va`, root first (for corrupting them in tests).
    fn path(mem: &VecMem, root: u64, va: u64) -> Vec<u64> {
        let mut out = vec![];
        let mut table = root;
        for level in (1..=PT_LEVELS).rev() {
            let gpa = entry_gpa(table, va, level);
            out.push(gpa);
            let e = mem.read_u64(gpa).unwrap();
            if e & PTE_P == 0 || (level == 2 && e & PTE_PS != 0) {
                break;
            }
            table = e & PTE_ADDR_MASK;
        }
        out
    }

    fn err(reason: u16, level: u32) -> Result<Translation, WalkFault> {
        Err(WalkFault { reason, level })
    }

    #[test]
    fn maps_and_walks_4k() {
        let (mem, mut b) = setup();
        let va = 0x7f12_3456_7000;
        b.map_4k(&mem, va, 0x80_3000, true).unwrap();
        let t = walk(&mem, b.root(), va + 0x123, false).unwrap();
        assert_eq!(
            t,
            Translation {
                va_base: va,
                size: PAGE_SIZE,
                pa_base: 0x80_3000,
                writable: true,
                dirty: false,
                leaf_gpa: b.leaf_gpa(&mem, va).unwrap(),
            }
        );
        assert!(t.contains(va + 0xfff) && !t.contains(va + 0x1000) && !t.contains(va - 1));
        assert_eq!(t.pa(va + 0x123), 0x80_3123);
        // Neighbouring pages stay unmapped.
        assert_eq!(
            walk(&mem, b.root(), va + PAGE_SIZE, false),
            err(FAULT_NOT_PRESENT, 1)
        );
        assert_eq!(walk(&mem, b.root(), 0, false), err(FAULT_NOT_PRESENT, 4));
    }

    #[test]
    fn maps_and_walks_2m() {
        let (mem, mut b) = setup();
        let va = 0x4000_0000 + 3 * HUGE_PAGE_SIZE;
        b.map_2m(&mem, va, 0x20_0000, false).unwrap();
        let t = walk(&mem, b.root(), va + 0x1f_f123, false).unwrap();
        assert_eq!(
            (t.va_base, t.size, t.pa_base),
            (va, HUGE_PAGE_SIZE, 0x20_0000)
        );
        assert!(!t.writable && !t.dirty);
        assert_eq!(t.pa(va + 0x1f_f123), 0x3f_f123);
        assert_eq!(
            walk(&mem, b.root(), va, true),
            err(FAULT_PERMISSION, 2),
            "read-only huge leaf"
        );
    }

    #[test]
    fn sets_accessed_and_dirty_only_when_needed() {
        let (mem, mut b) = setup();
        let va = 0x1000_0000;
        b.map_4k(&mem, va, 0x40_0000, true).unwrap();
        let root = b.root();
        let c = Counting::new(&mem);

        let t = walk(&c, root, va, false).unwrap();
        assert!(!t.dirty);
        assert_eq!(
            (c.reads.get(), c.rmws.get()),
            (4, 4),
            "A set at every level"
        );
        for gpa in path(&mem, root, va) {
            assert_ne!(mem.read_u64(gpa).unwrap() & PTE_A, 0);
        }
        assert_eq!(b.read_leaf(&mem, va).unwrap() & PTE_D, 0, "read leaves D");

        walk(&c, root, va, false).unwrap();
        assert_eq!(c.rmws.get(), 4, "no RMW when A is already set");

        let t = walk(&c, root, va, true).unwrap();
        assert!(t.dirty && t.writable);
        assert_eq!(c.rmws.get(), 5, "one RMW, for D on the leaf");
        assert_eq!(
            b.read_leaf(&mem, va).unwrap(),
            0x40_0000 | PTE_P | PTE_W | PTE_A | PTE_D
        );

        let t = walk(&c, root, va, false).unwrap();
        assert!(t.dirty, "read reports the D bit already set");
        walk(&c, root, va, true).unwrap();
        assert_eq!(c.rmws.get(), 5);
    }

    #[test]
    fn first_write_sets_a_and_d_in_one_rmw() {
        let (mem, mut b) = setup();
        b.map_2m(&mem, 0, 0x20_0000, true).unwrap();
        let c = Counting::new(&mem);
        walk(&c, b.root(), 0x1234, true).unwrap();
        assert_eq!(c.rmws.get(), 3);
        let leaf = b.read_leaf(&mem, 0).unwrap();
        assert_eq!(leaf & (PTE_A | PTE_D | PTE_PS), PTE_A | PTE_D | PTE_PS);
    }

    #[test]
    fn faulting_walk_has_no_side_effects() {
        let (mem, mut b) = setup();
        let va = 0x20_0000_0000;
        b.map_4k(&mem, va, 0x30_0000, false).unwrap();
        let before: Vec<u64> = path(&mem, b.root(), va)
            .iter()
            .map(|&g| mem.read_u64(g).unwrap())
            .collect();
        assert_eq!(walk(&mem, b.root(), va, true), err(FAULT_PERMISSION, 1));
        let after: Vec<u64> = path(&mem, b.root(), va)
            .iter()
            .map(|&g| mem.read_u64(g).unwrap())
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn write_permission_needed_at_every_level() {
        for lvl in (1..=PT_LEVELS).rev() {
            let (mem, mut b) = setup();
            let va = 0x3_0000_0000;
            b.map_4k(&mem, va, 0x30_0000, true).unwrap();
            let gpa = path(&mem, b.root(), va)[(PT_LEVELS - lvl) as usize];
            let e = mem.read_u64(gpa).unwrap();
            mem.write_u64(gpa, e & !PTE_W).unwrap();
            assert_eq!(walk(&mem, b.root(), va, true), err(FAULT_PERMISSION, lvl));
            let t = walk(&mem, b.root(), va, false).unwrap();
            assert!(
                !t.writable,
                "read-only at level {lvl} makes the page read-only"
            );
        }
    }

    #[test]
    fn not_present_below_read_only_reports_not_present() {
        let (mem, mut b) = setup();
        let va = 0x5000_0000;
        b.map_4k(&mem, va, 0x30_0000, true).unwrap();
        let p = path(&mem, b.root(), va);
        let e = mem.read_u64(p[0]).unwrap();
        mem.write_u64(p[0], e & !PTE_W).unwrap();
        mem.write_u64(p[3], 0).unwrap();
        assert_eq!(walk(&mem, b.root(), va, true), err(FAULT_NOT_PRESENT, 1));
    }

    #[test]
    fn address_limit() {
        let (mem, mut b) = setup();
        b.map_4k(&mem, VA_LIMIT - PAGE_SIZE, 0x30_0000, true)
            .unwrap();
        assert!(walk(&mem, b.root(), VA_LIMIT - 1, true).is_ok());
        for va in [VA_LIMIT, VA_LIMIT + 0x1000, u64::MAX, 0xffff_8000_0000_0000] {
            assert_eq!(walk(&mem, b.root(), va, false), err(FAULT_ADDRESS, 4));
        }
        assert!(matches!(
            b.map_4k(&mem, VA_LIMIT, 0x30_0000, true),
            Err(BuildError::BadAddress { .. })
        ));
    }

    #[test]
    fn reserved_bits_are_bad_at_every_level() {
        for lvl in (1..=PT_LEVELS).rev() {
            for bit in [52, 58, 63] {
                let (mem, mut b) = setup();
                let va = 0x1234_5000;
                b.map_4k(&mem, va, 0x30_0000, true).unwrap();
                let gpa = path(&mem, b.root(), va)[(PT_LEVELS - lvl) as usize];
                let e = mem.read_u64(gpa).unwrap();
                assert_eq!(1u64 << bit & PTE_RESERVED, 1 << bit);
                mem.write_u64(gpa, e | 1 << bit).unwrap();
                assert_eq!(walk(&mem, b.root(), va, false), err(FAULT_BAD_PTE, lvl));
                // Not present: the other bits are the driver's, not a bad entry.
                mem.write_u64(gpa, (e | 1 << bit) & !PTE_P).unwrap();
                assert_eq!(walk(&mem, b.root(), va, false), err(FAULT_NOT_PRESENT, lvl));
            }
        }
    }

    #[test]
    fn ps_rules() {
        let (mem, mut b) = setup();
        let va = 0x4000_1000;
        b.map_4k(&mem, va, 0x30_0000, true).unwrap();
        let p = path(&mem, b.root(), va);
        // PS at level 1 is ignored (PAT on x86).
        let e1 = mem.read_u64(p[3]).unwrap();
        mem.write_u64(p[3], e1 | PTE_PS).unwrap();
        assert_eq!(walk(&mem, b.root(), va, false).unwrap().size, PAGE_SIZE);
        // PS at levels 4 and 3 is illegal.
        for (i, lvl) in [(0, 4), (1, 3)] {
            let e = mem.read_u64(p[i]).unwrap();
            mem.write_u64(p[i], e | PTE_PS).unwrap();
            assert_eq!(walk(&mem, b.root(), va, false), err(FAULT_BAD_PTE, lvl));
            mem.write_u64(p[i], e).unwrap();
        }
        // PS at level 2 turns the level-1 table pointer into a 2 MiB frame; this one (the table
        // address, 4 KiB aligned) is misaligned.
        let e2 = mem.read_u64(p[2]).unwrap();
        assert_ne!(e2 & PTE_ADDR_MASK & (HUGE_PAGE_SIZE - 1), 0);
        mem.write_u64(p[2], e2 | PTE_PS).unwrap();
        assert_eq!(walk(&mem, b.root(), va, false), err(FAULT_BAD_PTE, 2));
        // Aligned: a huge page.
        mem.write_u64(p[2], 0x40_0000 | PTE_P | PTE_PS).unwrap();
        let t = walk(&mem, b.root(), va, false).unwrap();
        assert_eq!(
            (t.va_base, t.size, t.pa_base),
            (0x4000_0000, HUGE_PAGE_SIZE, 0x40_0000)
        );
    }

    #[test]
    fn huge_frame_alignment_checks_only_address_bits() {
        let (mem, mut b) = setup();
        b.map_2m(&mem, 0, 0x60_0000, true).unwrap();
        let gpa = b.leaf_gpa(&mem, 0).unwrap();
        // Software-available bits 8..11 are not part of the frame.
        let e = mem.read_u64(gpa).unwrap();
        mem.write_u64(gpa, e | 0xf00).unwrap();
        assert_eq!(
            walk(&mem, b.root(), 0x1000, false).unwrap().pa_base,
            0x60_0000
        );
        mem.write_u64(gpa, e | 0x1000).unwrap();
        assert_eq!(walk(&mem, b.root(), 0x1000, false), err(FAULT_BAD_PTE, 2));
    }

    #[test]
    fn pointers_outside_memory_abort_the_walk() {
        let (mem, mut b) = setup();
        let va = 0x7000_0000;
        b.map_4k(&mem, va, 0x30_0000, true).unwrap();
        for lvl in (2..=PT_LEVELS).rev() {
            let gpa = path(&mem, b.root(), va)[(PT_LEVELS - lvl) as usize];
            let e = mem.read_u64(gpa).unwrap();
            mem.write_u64(gpa, (e & !PTE_ADDR_MASK) | 0x000f_ffff_ffff_f000)
                .unwrap();
            assert_eq!(
                walk(&mem, b.root(), va, false),
                err(FAULT_WALK_ABORT, lvl - 1)
            );
            mem.write_u64(gpa, e).unwrap();
        }
        // Root outside memory.
        assert_eq!(walk(&mem, 0x1000, va, false), err(FAULT_WALK_ABORT, 4));
        // Root with garbage low and high bits is masked, not trusted.
        let t = walk(&mem, b.root() | 0xfff | PTE_RESERVED, va, false).unwrap();
        assert_eq!(t.pa_base, 0x30_0000);
    }

    /// Memory whose atomic RMW always fails (e.g. a read-only region).
    struct NoRmw<'a>(&'a VecMem);

    impl GuestMem for NoRmw<'_> {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.0.read(gpa, buf)
        }
        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
            self.0.write(gpa, buf)
        }
        fn fetch_or_u64(&self, gpa: u64, _: u64) -> Result<u64, MemError> {
            Err(MemError::ReadOnly { gpa, len: 8 })
        }
    }

    #[test]
    fn failing_fetch_or_aborts() {
        let (mem, mut b) = setup();
        b.map_4k(&mem, 0x1000, 0x30_0000, true).unwrap();
        assert_eq!(
            walk(&NoRmw(&mem), b.root(), 0x1000, false),
            err(FAULT_WALK_ABORT, 4)
        );
        // With A already set everywhere, a read needs no RMW; the first write needs one on the leaf.
        walk(&mem, b.root(), 0x1000, false).unwrap();
        assert!(walk(&NoRmw(&mem), b.root(), 0x1000, false).is_ok());
        assert_eq!(
            walk(&NoRmw(&mem), b.root(), 0x1000, true),
            err(FAULT_WALK_ABORT, 1)
        );
    }

    /// Memory where the driver rewrites the entry at `gpa` to `new` just before the walker's
    /// first atomic RMW on it lands (between the walker's read and its A/D update).
    struct RacingDriver<'a> {
        inner: &'a VecMem,
        gpa: u64,
        new: u64,
        done: Cell<bool>,
    }

    impl GuestMem for RacingDriver<'_> {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.inner.read(gpa, buf)
        }
        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
            self.inner.write(gpa, buf)
        }
        fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
            if gpa == self.gpa && !self.done.replace(true) {
                self.inner.write_u64(gpa, self.new)?;
            }
            self.inner.fetch_or_u64(gpa, bits)
        }
    }

    /// A leaf the driver clears or write-protects between the walker's read and its D update
    /// must not yield a writable translation: the driver saw no D in what it swapped out, so a
    /// write would be lost to its dirty tracking. The walk starts again and faults, like an x86
    /// walker whose locked A/D update finds the entry changed. An update that only cleared A
    /// (aging) changes nothing the walk relies on.
    #[test]
    fn entry_changed_under_the_ad_update_restarts_the_walk() {
        for (new, expect) in [
            (0, Some(FAULT_NOT_PRESENT)),
            (0x30_0000 | PTE_P, Some(FAULT_PERMISSION)),
            (0x30_0000 | PTE_P | PTE_W, None),
        ] {
            let (mem, mut b) = setup();
            b.map_4k(&mem, 0x1000, 0x30_0000, true).unwrap();
            // A set along the path by a read, so that the write's only RMW is the leaf's.
            walk(&mem, b.root(), 0x1000, false).unwrap();
            let leaf = path(&mem, b.root(), 0x1000)[3];
            let racing = RacingDriver {
                inner: &mem,
                gpa: leaf,
                new,
                done: Cell::new(false),
            };
            let r = walk(&racing, b.root(), 0x1000, true);
            match expect {
                Some(reason) => assert_eq!(r, err(reason, 1), "driver wrote {new:#x}"),
                None => {
                    let t = r.unwrap();
                    assert!(t.writable && t.dirty);
                    assert_ne!(mem.read_u64(leaf).unwrap() & PTE_D, 0);
                }
            }
        }
    }

    #[test]
    fn self_referencing_tables_terminate() {
        let mem = VecMem::new(MEM_BASE, MEM_SIZE);
        let root = MEM_BASE;
        // Every entry of the root points back at the root.
        for i in 0..PT_ENTRIES as u64 {
            mem.write_u64(root + i * 8, root | PTE_P | PTE_W).unwrap();
        }
        let c = Counting::new(&mem);
        for va in [0, 0x1234_5678_9000, VA_LIMIT - 1] {
            let t = walk(&c, root, va, true).unwrap();
            // The loop is read as an ordinary 4-level tree whose leaf maps the root itself.
            assert_eq!(t.pa_base, root);
        }
        assert_eq!(c.reads.get(), 12, "4 reads per walk");
        // The same loop with PS set is a bad entry at the root, still bounded.
        for i in 0..PT_ENTRIES as u64 {
            mem.write_u64(root + i * 8, root | PTE_P | PTE_PS).unwrap();
        }
        assert_eq!(walk(&c, root, 0x5000, false), err(FAULT_BAD_PTE, 4));
        // A level-2 entry pointing back at its own table.
        let (mem, mut b) = setup();
        b.map_4k(&mem, 0x20_0000, 0x30_0000, true).unwrap();
        let p = path(&mem, b.root(), 0x20_0000);
        mem.write_u64(p[2], (p[2] & !0xfff) | PTE_P).unwrap();
        let c = Counting::new(&mem);
        let r = walk(&c, b.root(), 0x20_0000, false);
        assert!(c.reads.get() <= 4);
        // The level-1 read lands in the level-2 table itself: entry 0 is not present.
        assert_eq!(r, err(FAULT_NOT_PRESENT, 1));
    }

    #[test]
    fn pace_runs_before_each_table_read() {
        let (mem, mut b) = setup();
        let va = 0x1234_5000;
        b.map_4k(&mem, va, 0x30_0000, true).unwrap();
        let c = Counting::new(&mem);
        let mut seen = vec![];
        let mut tables = vec![];
        walk_paced(&c, b.root(), va, false, |level, table| {
            seen.push((level, c.reads.get()));
            tables.push(table);
        })
        .unwrap();
        assert_eq!(
            seen,
            [(4, 0), (3, 1), (2, 2), (1, 3)],
            "(level, reads so far)"
        );
        // Each pace names the table page the entry is then read from.
        let p = path(&mem, b.root(), va);
        assert_eq!(tables[0], b.root());
        let pages: Vec<u64> = p.iter().map(|&g| g & !(PAGE_SIZE - 1)).collect();
        assert_eq!(tables, pages);
        // A walk that stops early paces only the levels it reads.
        mem.write_u64(p[2], 0).unwrap();
        let mut levels = vec![];
        let r = walk_paced(&mem, b.root(), va, false, |l, _| levels.push(l));
        assert_eq!(r, err(FAULT_NOT_PRESENT, 2));
        assert_eq!(levels, [4, 3, 2]);
    }

    #[test]
    fn builder_conflicts_and_remaps() {
        let (mem, mut b) = setup();
        b.map_2m(&mem, 0x20_0000, 0x40_0000, true).unwrap();
        assert!(matches!(
            b.map_4k(&mem, 0x20_1000, 0x30_0000, true),
            Err(BuildError::Conflict { level: 2, .. })
        ));
        b.map_4k(&mem, 0x40_1000, 0x30_0000, true).unwrap();
        assert!(matches!(
            b.map_2m(&mem, 0x40_0000, 0x60_0000, true),
            Err(BuildError::Conflict { level: 2, .. })
        ));
        // Remapping the same size replaces the leaf.
        b.map_2m(&mem, 0x20_0000, 0x80_0000, false).unwrap();
        assert_eq!(
            b.read_leaf(&mem, 0x3f_ffff),
            Some(0x80_0000 | PTE_P | PTE_PS)
        );
        b.map_4k(&mem, 0x40_1000, 0x31_0000, false).unwrap();
        assert_eq!(b.read_leaf(&mem, 0x40_1fff), Some(0x31_0000 | PTE_P));
        assert_eq!(b.read_leaf(&mem, 0x40_2000), None);
        // Misaligned arguments.
        for (va, pa) in [(0x1001, 0x1000), (0x1000, 0x1001), (0x1000, 1 << 52)] {
            assert!(matches!(
                b.map_4k(&mem, va, pa, true),
                Err(BuildError::BadAddress { .. })
            ));
        }
        assert!(matches!(
            b.map_2m(&mem, 0x60_0000, 0x1000, true),
            Err(BuildError::BadAddress { .. })
        ));
    }

    #[test]
    fn builder_unmap_and_set_writable() {
        let (mem, mut b) = setup();
        b.map_4k(&mem, 0x1000, 0x30_0000, false).unwrap();
        b.map_2m(&mem, 0x40_0000, 0x60_0000, true).unwrap();
        assert_eq!(walk(&mem, b.root(), 0x1000, true), err(FAULT_PERMISSION, 1));
        assert!(b.set_writable(&mem, 0x1000, true));
        assert!(walk(&mem, b.root(), 0x1000, true).unwrap().writable);
        assert!(b.set_writable(&mem, 0x1000, false), "keeps A/D");
        assert_eq!(
            b.read_leaf(&mem, 0x1000).unwrap(),
            0x30_0000 | PTE_P | PTE_A | PTE_D
        );
        assert!(b.set_writable(&mem, 0x40_0000, false));
        assert_eq!(
            walk(&mem, b.root(), 0x5f_f000, true),
            err(FAULT_PERMISSION, 2)
        );

        assert!(b.unmap(&mem, 0x5f_ffff), "any address in the huge page");
        assert_eq!(
            walk(&mem, b.root(), 0x40_0000, false),
            err(FAULT_NOT_PRESENT, 2)
        );
        assert!(!b.unmap(&mem, 0x40_0000));
        assert!(!b.set_writable(&mem, 0x40_0000, true));
        assert!(b.unmap(&mem, 0x1000));
        assert_eq!(b.read_leaf(&mem, 0x1000), None);
        assert!(!b.unmap(&mem, VA_LIMIT));
    }

    #[test]
    fn builder_allocation_limits() {
        let mem = VecMem::new(MEM_BASE, 4 * PAGE_SIZE as usize);
        // Base rounded up to a page.
        let mut b = PageTableBuilder::new(&mem, MEM_BASE + 1, MEM_BASE + 4 * PAGE_SIZE).unwrap();
        assert_eq!(b.root(), MEM_BASE + PAGE_SIZE);
        assert_eq!(b.allocated(), PAGE_SIZE);
        // Root + 3 tables needed for the first mapping; only 2 pages left.
        assert!(matches!(
            b.map_4k(&mem, 0, 0, true),
            Err(BuildError::OutOfTables)
        ));
        // Region outside memory.
        assert!(matches!(
            PageTableBuilder::new(&mem, MEM_BASE + (1 << 20), MEM_BASE + (2 << 20)),
            Err(BuildError::Mem(_))
        ));
        assert!(matches!(
            PageTableBuilder::new(&mem, u64::MAX - 5, u64::MAX),
            Err(BuildError::BadAddress { .. })
        ));
        assert!(matches!(
            PageTableBuilder::new(&mem, MEM_BASE, MEM_BASE + 100),
            Err(BuildError::OutOfTables)
        ));
    }

    #[test]
    fn tables_are_shared_between_mappings() {
        let (mem, mut b) = setup();
        b.map_4k(&mem, 0x1000, 0x30_0000, true).unwrap();
        let used = b.allocated();
        assert_eq!(used, 4 * PAGE_SIZE);
        b.map_4k(&mem, 0x2000, 0x30_1000, true).unwrap();
        b.map_2m(&mem, 0x20_0000, 0x40_0000, true).unwrap();
        assert_eq!(b.allocated(), used, "same tables reused");
        assert_eq!(
            walk(&mem, b.root(), 0x2000, false).unwrap().pa_base,
            0x30_1000
        );
    }
}
