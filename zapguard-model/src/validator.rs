//! The validator: judges every DMA page access against the process's CPU page table.
//!
//! The kernel changes a CPU PTE only after `invalidate_range_start` returned, and a correct
//! driver's invalidation (with its SYNC) waits for in-flight DMA; so a device access that the
//! CPU table contradicts is always a driver bug. Verdicts, in order:
//!
//! 1. the context is marked [`pte::CTX_MM_RELEASED`]: [`event::VIOL_RELEASED`], whatever the
//!    CPU table says (it may already be freed);
//! 2. [`pte::CTX_NO_VALIDATE`] is set: no check, counted as unjudged (the only off-switch:
//!    an entry that says nothing about validation is judged);
//! 3. the CPU maps nothing at the VA, or another 4 KiB frame than the device used, or its table
//!    cannot be walked: [`event::VIOL_STALE`];
//! 4. a write while RW is clear somewhere on the CPU path: [`event::VIOL_WRITE_PERM`];
//! 5. a write through a translation cached while the CPU PTE was dirty, onto a PTE that is
//!    clean now: [`event::VIOL_WRITE_CLEAN`].
//!
//! The kernel only cleans a dirty PTE under an mmu-notifier invalidation (writeback's
//! `page_mkclean`, `MADV_FREE`), so rule 5 catches a missed invalidation. A write to a writable
//! PTE that was never dirty is legal: shared mappings without write-notify (shmem) get writable
//! clean PTEs on read faults, and the CPU itself would write there without a fault.
//!
//! The DMA engine asks once per side of each step (a step never crosses a page), and shares one
//! CPU walk between an IOTLB fill's snapshot and the verdict ([`Validator::lookup`],
//! [`Validator::judge`]).
//!
//! [`event::VIOL_LEDGER`] is not decided here: it needs the device's invalidation history.

use crate::cpu_walk::{cpu_walk, CpuPte, CpuWalkError};
use crate::guest::GuestMem;
use crate::x86pt::X86_SIZE_4K;
use shared_regs::{event, pte};
use std::collections::BTreeMap;

// The device's frames and the CPU's are compared 4 KiB frame to 4 KiB frame.
const _: () = assert!(pte::PAGE_SIZE == X86_SIZE_4K);

/// What a CPU page-table walk found: a mapping (or none), or a table it could not follow.
pub type CpuLookup = Result<CpuPte, CpuWalkError>;

/// Whether `ctx`'s CPU table has five levels.
pub fn la57(ctx: &pte::ContextEntry) -> bool {
    ctx.flags & pte::CTX_CPU_LA57 != 0
}

/// Whether `ctx` lets the validator judge its accesses: always, unless it opts out explicitly.
pub fn validated(ctx: &pte::ContextEntry) -> bool {
    ctx.flags & pte::CTX_NO_VALIDATE == 0
}

/// Whether `ctx` says its address space was released.
pub fn released(ctx: &pte::ContextEntry) -> bool {
    ctx.flags & pte::CTX_MM_RELEASED != 0
}

/// One device access to one page, as the device is about to perform it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Address-space ID.
    pub asid: u32,
    /// Virtual address accessed.
    pub va: u64,
    /// Guest-physical address the device uses for `va`.
    pub dev_pa: u64,
    /// Write access.
    pub write: bool,
    /// The CPU PTE was dirty when the device cached this translation (see
    /// [`Validator::cpu_snapshot`] and [`event::VIOL_WRITE_CLEAN`]).
    pub cpu_dirty_at_fill: bool,
}

/// A device access the CPU page table contradicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    /// `event::VIOL_*` class.
    pub class: u16,
    /// Address-space ID.
    pub asid: u32,
    /// Virtual address accessed.
    pub va: u64,
    /// Guest-physical address the device used.
    pub dev_pa: u64,
    /// Guest-physical address the CPU maps `va` to (same page offset as `va`), or
    /// [`event::NO_PA`] if it maps nothing, its table cannot be walked, or the address space
    /// was released.
    pub cpu_pa: u64,
    /// Write access.
    pub write: bool,
    /// One human sentence.
    pub why: &'static str,
}

impl Violation {
    /// The event-queue record for this violation.
    pub fn to_event(&self) -> event::Event {
        event::Event {
            ty: event::EVT_VIOLATION,
            flags: if self.write { event::EVT_F_WRITE } else { 0 },
            reason: self.class,
            asid: self.asid,
            va: self.va,
            info: self.dev_pa,
            info2: self.cpu_pa,
        }
    }

    /// Name of the class (`event::violation_name`).
    pub fn name(&self) -> &'static str {
        event::violation_name(self.class)
    }
}

/// What the validator has seen so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ValidatorCounts {
    /// Accesses judged (every [`Validator::check`] call except those skipped).
    pub checks: u64,
    /// Accesses not judged: the context has [`pte::CTX_NO_VALIDATE`] and not
    /// [`pte::CTX_MM_RELEASED`] ([`Validator::unjudged`]).
    pub skipped: u64,
    /// CPU page-table walks that failed (also counted as [`event::VIOL_STALE`]).
    pub walk_errors: u64,
    /// [`event::VIOL_STALE`] violations.
    pub stale: u64,
    /// [`event::VIOL_WRITE_PERM`] violations.
    pub write_perm: u64,
    /// [`event::VIOL_WRITE_CLEAN`] violations.
    pub write_clean: u64,
    /// [`event::VIOL_RELEASED`] violations.
    pub released: u64,
    /// Accesses judged again after their bytes moved ([`Validator::judge_after`]).
    pub after_checks: u64,
    /// [`event::VIOL_ZAPPED_DURING_ACCESS`] violations.
    pub zapped_during_access: u64,
}

impl ValidatorCounts {
    /// Violations of `class` (0 for classes the validator does not decide).
    pub fn of(&self, class: u16) -> u64 {
        match class {
            event::VIOL_STALE => self.stale,
            event::VIOL_WRITE_PERM => self.write_perm,
            event::VIOL_WRITE_CLEAN => self.write_clean,
            event::VIOL_RELEASED => self.released,
            event::VIOL_ZAPPED_DURING_ACCESS => self.zapped_during_access,
            _ => 0,
        }
    }

    /// Violations of every class.
    pub fn violations(&self) -> u64 {
        self.stale + self.write_perm + self.write_clean + self.released + self.zapped_during_access
    }
}

/// What the validator saw of one access: every fact its verdict is a function of. The device
/// records them with the access in its trace, so that `zapguard-trace check` recomputes each
/// verdict offline, from these facts alone, and fails on any disagreement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The access was judged (its context has validation on or is released).
    pub judged: bool,
    /// The context entry said the address space was released.
    pub released: bool,
    /// The CPU walk made before the bytes moved: the 4 KiB frame it maps the VA's page to, and
    /// whether that PTE is writable and dirty. `None`: nothing is mapped, or the table could
    /// not be walked (`walk_error`), or the context was released (no walk).
    pub cpu: Option<(u64, bool, bool)>,
    /// The walk before failed (the table could not be walked).
    pub walk_error: bool,
    /// The translation was cached while the CPU PTE was dirty ([`Access::cpu_dirty_at_fill`]).
    pub fill_dirty: bool,
    /// The walk made after the bytes moved, if one was (the verdict before was clean): the
    /// frame and whether writable, or `None` if nothing is mapped or it could not be walked.
    pub after: Option<Option<(u64, bool)>>,
}

/// A verdict with the facts it was made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judged {
    /// What the validator saw.
    pub facts: Facts,
    /// What it concluded.
    pub violation: Option<Violation>,
}

/// One ASID's share of [`ValidatorCounts::checks`] and [`ValidatorCounts::skipped`] (the
/// device's per-ASID statistics, `ASID_STAT_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AsidCounts {
    /// Accesses judged.
    pub judged: u64,
    /// Accesses made unjudged.
    pub unjudged: u64,
}

/// The validator's state: only counters; every verdict is a pure function of guest memory.
#[derive(Clone, Debug, Default)]
pub struct Validator {
    counts: ValidatorCounts,
    /// Per ASID, the ASIDs that made an access since their last clear (at most the device's
    /// ASID count: jobs of other ASIDs are refused before they access anything).
    per_asid: BTreeMap<u32, AsidCounts>,
    /// Tests: a validator that records the facts but never concludes anything, which the
    /// offline check must catch.
    #[cfg(any(test, feature = "testkit"))]
    pub(crate) blind: bool,
}

impl Validator {
    /// A validator with zero counts.
    pub fn new() -> Self {
        Self::default()
    }

    /// Judges `a`. `ctx` is the context entry as it is in guest memory now (the device re-reads
    /// it uncached for every check, so a release or a new CPU root takes effect at once).
    pub fn check(
        &mut self,
        mem: &impl GuestMem,
        ctx: &pte::ContextEntry,
        a: &Access,
    ) -> Option<Violation> {
        self.judge(mem, ctx, a, None)
    }

    /// [`Self::check`] with the CPU walk of `a.va` under `ctx` already done ([`Self::lookup`]),
    /// if `walked` is given: the device walks the CPU table once per page access and shares
    /// that walk between its IOTLB fill's snapshot and this verdict. Without it, walks here.
    pub fn judge(
        &mut self,
        mem: &impl GuestMem,
        ctx: &pte::ContextEntry,
        a: &Access,
        walked: Option<CpuLookup>,
    ) -> Option<Violation> {
        self.judged(mem, ctx, a, walked).violation
    }

    /// [`Self::judge`], with the facts the verdict was made from.
    pub fn judged(
        &mut self,
        mem: &impl GuestMem,
        ctx: &pte::ContextEntry,
        a: &Access,
        walked: Option<CpuLookup>,
    ) -> Judged {
        if !validated(ctx) && !released(ctx) {
            self.unjudged(a.asid);
            return Judged {
                facts: Facts::default(),
                violation: None,
            };
        }
        self.counts.checks += 1;
        self.per_asid.entry(a.asid).or_default().judged += 1;
        let facts = self.facts(mem, ctx, a, walked);
        let violation = verdict(a, &facts);
        #[cfg(any(test, feature = "testkit"))]
        let violation = violation.filter(|_| !self.blind);
        if let Some(v) = &violation {
            let c = &mut self.counts;
            match v.class {
                event::VIOL_STALE => c.stale += 1,
                event::VIOL_WRITE_PERM => c.write_perm += 1,
                event::VIOL_WRITE_CLEAN => c.write_clean += 1,
                _ => c.released += 1,
            }
        }
        Judged { facts, violation }
    }

    /// The facts a verdict on `a` is made from (see [`Facts`]).
    fn facts(
        &mut self,
        mem: &impl GuestMem,
        ctx: &pte::ContextEntry,
        a: &Access,
        walked: Option<CpuLookup>,
    ) -> Facts {
        let mut f = Facts {
            judged: true,
            released: released(ctx),
            fill_dirty: a.cpu_dirty_at_fill,
            ..Facts::default()
        };
        if f.released {
            return f;
        }
        match walked.unwrap_or_else(|| cpu_walk(mem, ctx.cpu_root, la57(ctx), a.va)) {
            Ok(CpuPte::Present {
                pa,
                writable,
                dirty,
                ..
            }) => f.cpu = Some((pa, writable, dirty)),
            Ok(CpuPte::NotPresent) => {}
            Err(_) => {
                self.counts.walk_errors += 1;
                f.walk_error = true;
            }
        }
        f
    }

    /// Counts an access of `asid` that was made unjudged.
    pub fn unjudged(&mut self, asid: u32) {
        self.counts.skipped += 1;
        self.per_asid.entry(asid).or_default().unjudged += 1;
    }

    /// Judges `a` again once its bytes moved, whose verdict before the access was clean:
    /// `after` is the CPU walk of `a.va` made after the access, under `ctx` as guest memory
    /// held it then (`None`: validation is off or the address space was released by then, and
    /// nothing is judged). The CPU must still map the VA to the frame the device used, with
    /// the permission it used; anything else means that the page was zapped, remapped or
    /// write-protected while the device was using it ([`event::VIOL_ZAPPED_DURING_ACCESS`]).
    /// Accessed and dirty bits may change: the CPU sets them without an invalidation. The walk
    /// goes into `facts.after`.
    pub fn judge_after(
        &mut self,
        a: &Access,
        after: Option<CpuLookup>,
        facts: &mut Facts,
    ) -> Option<Violation> {
        let after = after?;
        self.counts.after_checks += 1;
        facts.after = Some(match after {
            Ok(CpuPte::Present { pa, writable, .. }) => Some((pa, writable)),
            Ok(CpuPte::NotPresent) => None,
            Err(_) => {
                self.counts.walk_errors += 1;
                None
            }
        });
        let v = verdict_after(a, facts)?;
        #[cfg(any(test, feature = "testkit"))]
        if self.blind {
            return None;
        }
        self.counts.zapped_during_access += 1;
        Some(v)
    }

    /// The CPU walk of `va` under `ctx`, if a verdict can need one: `None` if validation is off
    /// for `ctx` or its address space was released.
    pub fn lookup(
        &self,
        mem: &impl GuestMem,
        ctx: &pte::ContextEntry,
        va: u64,
    ) -> Option<CpuLookup> {
        if !validated(ctx) || released(ctx) {
            return None;
        }
        Some(cpu_walk(mem, ctx.cpu_root, la57(ctx), va))
    }

    /// What the CPU maps at `va` now, for the device to record
    /// [`Access::cpu_dirty_at_fill`] when it fills its IOTLB. `None` if validation is off for
    /// `ctx`, its address space was released, or the CPU table cannot be walked (then no write
    /// can be judged "cached while dirty", which errs on the side of no false positive).
    pub fn cpu_snapshot(
        &self,
        mem: &impl GuestMem,
        ctx: &pte::ContextEntry,
        va: u64,
    ) -> Option<CpuPte> {
        self.lookup(mem, ctx, va)?.ok()
    }

    /// Counters so far.
    pub fn counts(&self) -> ValidatorCounts {
        self.counts
    }

    /// `asid`'s share of the judged and unjudged counts since its last [`Self::clear_asid`].
    pub fn asid_counts(&self, asid: u32) -> AsidCounts {
        self.per_asid.get(&asid).copied().unwrap_or_default()
    }

    /// Zeroes `asid`'s share (the device-wide counts keep it).
    pub fn clear_asid(&mut self, asid: u32) {
        self.per_asid.remove(&asid);
    }
}

/// The verdict on `a` before its bytes moved, a pure function of `f` (see [`Facts`]).
pub fn verdict(a: &Access, f: &Facts) -> Option<Violation> {
    let viol = |class: u16, cpu_pa: u64, why: &'static str| {
        Some(Violation {
            class,
            asid: a.asid,
            va: a.va,
            dev_pa: a.dev_pa,
            cpu_pa,
            write: a.write,
            why,
        })
    };
    if f.released {
        return viol(
            event::VIOL_RELEASED,
            event::NO_PA,
            "device access for an address space whose mm was already released",
        );
    }
    let Some((pa, writable, dirty)) = f.cpu else {
        return viol(
            event::VIOL_STALE,
            event::NO_PA,
            if f.walk_error {
                "the CPU page table cannot be walked (pointer outside memory or malformed entry), so the translation cannot be confirmed"
            } else {
                "the CPU maps nothing at this address (unmapped, swapped, migrating or PROT_NONE)"
            },
        );
    };
    let cpu_pa = pa | (a.va & (X86_SIZE_4K - 1));
    if pa != a.dev_pa & !(pte::PAGE_SIZE - 1) {
        return viol(
            event::VIOL_STALE,
            cpu_pa,
            "the CPU maps this address to a different page than the device used",
        );
    }
    if a.write && !writable {
        return viol(
            event::VIOL_WRITE_PERM,
            cpu_pa,
            "device write while the CPU mapping is read-only (COW, mprotect or write-protect)",
        );
    }
    if a.write && !dirty && f.fill_dirty {
        return viol(
            event::VIOL_WRITE_CLEAN,
            cpu_pa,
            "device write through a translation cached while the CPU PTE was dirty, which is clean now (missed writeback/mkclean invalidation)",
        );
    }
    None
}

/// The verdict on `a` after its bytes moved (its verdict before was clean), a pure function of
/// `f.after`: `None` if no walk was made after.
pub fn verdict_after(a: &Access, f: &Facts) -> Option<Violation> {
    let after = f.after?;
    let cpu_pa = match after {
        Some((pa, writable)) => {
            let same_frame = pa == a.dev_pa & !(pte::PAGE_SIZE - 1);
            if same_frame && (writable || !a.write) {
                return None;
            }
            pa | (a.va & (X86_SIZE_4K - 1))
        }
        None => event::NO_PA,
    };
    Some(Violation {
        class: event::VIOL_ZAPPED_DURING_ACCESS,
        asid: a.asid,
        va: a.va,
        dev_pa: a.dev_pa,
        cpu_pa,
        write: a.write,
        why: "the CPU page table changed while the device accessed the page (zapped, remapped or write-protected before the device was done)",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::VecMem;
    use crate::x86pt::{CpuFlags, X86PageTable, X86_D, X86_P, X86_RW, X86_TABLE_FLAGS};
    use event::{NO_PA, VIOL_RELEASED, VIOL_STALE, VIOL_WRITE_CLEAN, VIOL_WRITE_PERM};

    const MEM: usize = 0x100_0000;
    const ASID: u32 = 7;

    struct Fx {
        mem: VecMem,
        pt: X86PageTable,
        ctx: pte::ContextEntry,
        v: Validator,
    }

    impl Fx {
        fn new(la57: bool) -> Self {
            let mem = VecMem::new(0, MEM);
            let pt = X86PageTable::new(&mem, 0x1000, 0x10_0000, la57).unwrap();
            let mut flags = pte::CTX_VALID;
            if la57 {
                flags |= pte::CTX_CPU_LA57;
            }
            let ctx = pte::ContextEntry {
                flags,
                pt_root: 0,
                cpu_root: pt.root(),
                seq: 0,
            };
            Self {
                mem,
                pt,
                ctx,
                v: Validator::new(),
            }
        }

        /// The device's access with its translation cached the way a fill now would.
        fn access(&self, va: u64, dev_pa: u64, write: bool) -> Access {
            let snap = self.v.cpu_snapshot(&self.mem, &self.ctx, va);
            Access {
                asid: ASID,
                va,
                dev_pa,
                write,
                cpu_dirty_at_fill: matches!(snap, Some(CpuPte::Present { dirty: true, .. })),
            }
        }

        fn check(&mut self, a: &Access) -> Option<Violation> {
            self.v.check(&self.mem, &self.ctx, a)
        }

        fn class(&mut self, a: &Access) -> Option<u16> {
            self.check(a).map(|v| v.class)
        }
    }

    #[test]
    fn correct_4k_accesses_pass() {
        for la57 in [false, true] {
            let mut f = Fx::new(la57);
            f.pt.map_4k(&f.mem, 0x7000_0000, 0x20_0000, CpuFlags::WRITABLE_DIRTY)
                .unwrap();
            f.pt.map_4k(&f.mem, 0x7000_1000, 0x20_1000, CpuFlags::READ_ONLY)
                .unwrap();
            f.pt.map_4k(&f.mem, 0x7000_2000, 0x20_2000, CpuFlags::WRITABLE_CLEAN)
                .unwrap();
            for (va, pa, write) in [
                (0x7000_0123, 0x20_0123, true),
                (0x7000_0ff8, 0x20_0ff8, false),
                // Read of a read-only page: zero page, COW before the break.
                (0x7000_1000, 0x20_1000, false),
                // Write to a writable page never dirtied (shmem read fault): legal.
                (0x7000_2800, 0x20_2800, true),
            ] {
                let a = f.access(va, pa, write);
                assert_eq!(f.check(&a), None, "{va:#x} la57={la57}");
            }
            assert_eq!(f.v.counts().checks, 4);
            assert_eq!(f.v.counts().violations(), 0);
        }
    }

    #[test]
    fn five_level_high_user_address() {
        let mut f = Fx::new(true);
        let va = 0x00f0_0000_0000_3000;
        f.pt.map_4k(&f.mem, va, 0x30_3000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        let a = f.access(va, 0x30_3000, true);
        assert_eq!(f.check(&a), None);
        // Without LA57 the same VA is beyond the walked range: nothing there.
        f.ctx.flags &= !pte::CTX_CPU_LA57;
        assert_eq!(f.class(&a), Some(VIOL_STALE));
    }

    #[test]
    fn huge_leaves_frame_arithmetic() {
        let mut f = Fx::new(false);
        f.pt.map_2m(&f.mem, 0x4000_0000, 0x60_0000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        f.pt.map_1g(&f.mem, 0x8000_0000, 0x4000_0000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        // 4 KiB frames inside the huge pages: first, middle, last.
        for (va, pa) in [
            (0x4000_0000, 0x60_0000),
            (0x4012_3456, 0x72_3456),
            (0x401f_ffff, 0x7f_ffff),
            (0x8000_0000, 0x4000_0000),
            (0x9234_5678, 0x5234_5678),
            (0xbfff_f000, 0x7fff_f000),
        ] {
            let a = f.access(va, pa, true);
            assert_eq!(f.check(&a), None, "{va:#x}");
            // Off by one frame either way is stale, and says what the CPU maps.
            for wrong in [pa + X86_SIZE_4K, pa - X86_SIZE_4K] {
                let v = f.check(&f.access(va, wrong, false)).unwrap();
                assert_eq!((v.class, v.cpu_pa, v.dev_pa), (VIOL_STALE, pa, wrong));
            }
        }
        // The huge page's base frame is not the frame for an offset inside it.
        assert_eq!(
            f.class(&f.access(0x4012_3000, 0x60_0000, false)),
            Some(VIOL_STALE)
        );
    }

    #[test]
    fn stale_after_unmap_or_remap() {
        let mut f = Fx::new(false);
        let va = 0x5555_5555_4000;
        f.pt.map_4k(&f.mem, va, 0x40_0000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        let a = f.access(va, 0x40_0000, true);
        assert_eq!(f.check(&a), None);
        // munmap: the device still uses its old translation.
        f.pt.unmap(&f.mem, va).unwrap();
        let v = f.check(&a).unwrap();
        assert_eq!(
            (v.class, v.cpu_pa, v.asid, v.va),
            (VIOL_STALE, NO_PA, ASID, va)
        );
        // munmap + mmap (or migration): the VA now maps another frame.
        f.pt.map_4k(&f.mem, va, 0x41_0000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        let v = f.check(&a).unwrap();
        assert_eq!((v.class, v.cpu_pa), (VIOL_STALE, 0x41_0000));
        // Swap/migration/PROT_NONE entry: P clear, other bits kept.
        f.pt.set_flags(&f.mem, va, 0, X86_P).unwrap();
        assert_eq!(f.class(&a), Some(VIOL_STALE));
        assert_eq!(f.v.counts().stale, 3);
    }

    #[test]
    fn write_perm_after_cow_or_mprotect() {
        let mut f = Fx::new(false);
        let va = 0x6000_0000;
        f.pt.map_4k(&f.mem, va, 0x50_0000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        let w = f.access(va, 0x50_0000, true);
        let r = Access { write: false, ..w };
        // fork write-protects the parent's PTE (D stays set).
        f.pt.set_flags(&f.mem, va, 0, X86_RW).unwrap();
        let v = f.check(&w).unwrap();
        assert_eq!(
            (v.class, v.cpu_pa, v.write),
            (VIOL_WRITE_PERM, 0x50_0000, true)
        );
        assert_eq!(f.check(&r), None, "reads stay legal");
        // RW only cleared in an upper-level table entry.
        f.pt.set_flags(&f.mem, va, X86_RW, 0).unwrap();
        assert_eq!(f.check(&w), None);
        for level in 2..=4 {
            f.pt.set_entry_flags(&f.mem, va, level, 0, X86_RW).unwrap();
            assert_eq!(f.class(&w), Some(VIOL_WRITE_PERM), "level {level}");
            assert_eq!(f.check(&r), None);
            f.pt.set_entry_flags(&f.mem, va, level, X86_RW, 0).unwrap();
        }
        // A read-only huge leaf (mprotect of a THP).
        f.pt.map_2m(&f.mem, 0x20_0000, 0x60_0000, CpuFlags::READ_ONLY)
            .unwrap();
        assert_eq!(
            f.class(&f.access(0x21_0000, 0x61_0000, true)),
            Some(VIOL_WRITE_PERM)
        );
        assert_eq!(f.v.counts().write_perm, 5);
    }

    #[test]
    fn write_clean_after_missed_mkclean() {
        let mut f = Fx::new(false);
        let va = 0x6000_0000;
        f.pt.map_4k(&f.mem, va, 0x50_0000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        let w = f.access(va, 0x50_0000, true);
        assert!(w.cpu_dirty_at_fill);
        assert_eq!(f.check(&w), None);
        // MADV_FREE / writeback cleaned the PTE, keeping it writable.
        f.pt.set_flags(&f.mem, va, 0, X86_D).unwrap();
        let v = f.check(&w).unwrap();
        assert_eq!((v.class, v.cpu_pa), (VIOL_WRITE_CLEAN, 0x50_0000));
        assert_eq!(f.check(&Access { write: false, ..w }), None);
        // A translation cached after the clean (a correct driver refilled) is fine.
        let refilled = f.access(va, 0x50_0000, true);
        assert!(!refilled.cpu_dirty_at_fill);
        assert_eq!(f.check(&refilled), None);
        // Writeback also write-protects: that is reported as the permission problem first.
        f.pt.set_flags(&f.mem, va, 0, X86_RW).unwrap();
        assert_eq!(f.class(&w), Some(VIOL_WRITE_PERM));
        // Huge leaf cleaned.
        f.pt.map_2m(&f.mem, 0x20_0000, 0x60_0000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        let w2 = f.access(0x3f_f000, 0x7f_f000, true);
        f.pt.set_flags(&f.mem, 0x3f_f000, 0, X86_D).unwrap();
        assert_eq!(f.class(&w2), Some(VIOL_WRITE_CLEAN));
        assert_eq!(f.v.counts().write_clean, 2);
    }

    #[test]
    fn released_beats_everything() {
        let mut f = Fx::new(false);
        let va = 0x6000_0000;
        f.pt.map_4k(&f.mem, va, 0x50_0000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        let a = f.access(va, 0x50_0000, false);
        f.ctx.flags |= pte::CTX_MM_RELEASED;
        let v = f.check(&a).unwrap();
        assert_eq!((v.class, v.cpu_pa), (VIOL_RELEASED, NO_PA));
        assert_eq!(v.name(), "released");
        // Even with validation off and a CPU root that points nowhere.
        f.ctx.flags |= pte::CTX_NO_VALIDATE;
        f.ctx.cpu_root = u64::MAX;
        assert_eq!(f.class(&a), Some(VIOL_RELEASED));
        assert_eq!(f.v.cpu_snapshot(&f.mem, &f.ctx, va), None);
        assert_eq!(f.v.counts().released, 2);
    }

    #[test]
    fn validation_off_checks_nothing() {
        let mut f = Fx::new(false);
        f.ctx.flags |= pte::CTX_NO_VALIDATE;
        // Nothing mapped, garbage root: still no verdict.
        f.ctx.cpu_root = 0xdead_b000;
        let a = Access {
            asid: ASID,
            va: 0x1000,
            dev_pa: 0x2000,
            write: true,
            cpu_dirty_at_fill: true,
        };
        assert_eq!(f.check(&a), None);
        assert_eq!(f.v.cpu_snapshot(&f.mem, &f.ctx, 0x1000), None);
        let c = f.v.counts();
        assert_eq!((c.checks, c.skipped, c.violations()), (0, 1, 0));
    }

    /// No silent off-switch: an entry that says nothing about validation is judged; only the
    /// explicit opt-out turns the validator off, and what it skips is counted.
    #[test]
    fn validation_is_off_only_when_the_entry_says_so() {
        let mut f = Fx::new(false);
        f.ctx.flags = pte::CTX_VALID;
        let a = Access {
            asid: ASID,
            va: 0x6000_0000,
            dev_pa: 0x50_0000,
            write: false,
            cpu_dirty_at_fill: false,
        };
        assert_eq!(
            f.class(&a),
            Some(VIOL_STALE),
            "nothing mapped: judged stale"
        );
        assert!(f.v.lookup(&f.mem, &f.ctx, a.va).is_some());
        f.ctx.flags |= pte::CTX_NO_VALIDATE;
        assert_eq!(f.check(&a), None);
        assert_eq!(f.v.lookup(&f.mem, &f.ctx, a.va), None);
        let c = f.v.counts();
        assert_eq!((c.checks, c.skipped), (1, 1));
    }

    #[test]
    fn out_of_range_addresses_are_stale() {
        let mut f = Fx::new(false);
        // Even if something is mapped in the kernel half of the table.
        let kva = 0xffff_8880_0000_0000;
        f.pt.map_4k(&f.mem, kva, 0x50_0000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        for va in [kva, 0x8000_0000_0000, 0x0001_0000_0000_0000, u64::MAX] {
            let v = f.check(&f.access(va, 0x50_0000, false)).unwrap();
            assert_eq!((v.class, v.cpu_pa), (VIOL_STALE, NO_PA), "{va:#x}");
        }
    }

    #[test]
    fn unwalkable_tables_are_stale_not_panics() {
        let mut f = Fx::new(false);
        let va = 0x1000;
        f.pt.map_4k(&f.mem, va, 0x50_0000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        let a = f.access(va, 0x50_0000, true);
        let root = f.ctx.cpu_root;
        for bad_root in [MEM as u64, 0xffff_ffff_f000, root + 8, u64::MAX] {
            f.ctx.cpu_root = bad_root;
            let v = f.check(&a).unwrap();
            assert_eq!((v.class, v.cpu_pa), (VIOL_STALE, NO_PA));
            assert!(v.why.contains("cannot be confirmed"));
            assert_eq!(f.v.cpu_snapshot(&f.mem, &f.ctx, va), None);
        }
        f.ctx.cpu_root = root;
        let pdpt = f.pt.entry_gpa(&f.mem, va, 3).unwrap();
        f.mem
            .write_u64(pdpt, 0x7fff_0000_0000 | X86_TABLE_FLAGS)
            .unwrap();
        assert_eq!(f.class(&a), Some(VIOL_STALE));
        assert_eq!(f.v.counts().walk_errors, 5);
    }

    #[test]
    fn garbage_memory_never_panics() {
        let mut f = Fx::new(false);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // Fill the table area with noise whose pointers mostly stay inside memory.
        for gpa in (0..0x10_0000u64).step_by(8) {
            let v = next();
            let v = if v & 1 == 0 { v & 0xf_ffff } else { v };
            f.mem.write_u64(gpa, v).unwrap();
        }
        for i in 0..20_000u64 {
            f.ctx.flags = next() & pte::CTX_FLAGS_MASK;
            f.ctx.cpu_root = if i.is_multiple_of(3) {
                next()
            } else {
                next() & 0xf_f000
            };
            let va = next() >> (next() % 40);
            let a = Access {
                asid: ASID,
                va,
                dev_pa: next(),
                write: next() & 1 == 1,
                cpu_dirty_at_fill: next() & 1 == 1,
            };
            let _ = f.v.cpu_snapshot(&f.mem, &f.ctx, va);
            if let Some(v) = f.check(&a) {
                assert!(!v.why.is_empty());
                assert!(v.write || ![VIOL_WRITE_PERM, VIOL_WRITE_CLEAN].contains(&v.class));
                let e = v.to_event();
                assert_eq!(event::Event::from_bytes(&e.to_bytes()), e);
            }
        }
        let c = f.v.counts();
        assert_eq!(c.checks + c.skipped, 20_000);
        assert!(c.violations() <= c.checks);
    }

    /// A verdict on a walk done earlier judges that walk: the device shares one CPU walk per
    /// page access between its fill and the verdict, so judge must not walk again.
    #[test]
    fn judge_uses_the_walk_it_is_given() {
        let mut f = Fx::new(false);
        let va = 0x6000_0000;
        f.pt.map_4k(&f.mem, va, 0x50_0000, CpuFlags::WRITABLE_DIRTY)
            .unwrap();
        let a = f.access(va, 0x50_0000, true);
        let walked = f.v.lookup(&f.mem, &f.ctx, va);
        assert_eq!(
            walked,
            Some(Ok(CpuPte::Present {
                pa: 0x50_0000,
                writable: true,
                dirty: true,
                size: X86_SIZE_4K
            }))
        );
        assert_eq!(f.v.judge(&f.mem, &f.ctx, &a, walked), None);
        // The table changes after the walk: the verdict is about the walk, not memory now.
        f.pt.unmap(&f.mem, va).unwrap();
        assert_eq!(f.v.judge(&f.mem, &f.ctx, &a, walked), None);
        assert_eq!(f.class(&a), Some(VIOL_STALE), "check walks itself");
        let stale = Some(Ok(CpuPte::NotPresent));
        let v = f.v.judge(&f.mem, &f.ctx, &a, stale).unwrap();
        assert_eq!((v.class, v.cpu_pa), (VIOL_STALE, NO_PA));
        let broken = Some(Err(CpuWalkError::BadRoot { root: 1 }));
        assert_eq!(
            f.v.judge(&f.mem, &f.ctx, &a, broken).map(|v| v.class),
            Some(VIOL_STALE)
        );
        assert_eq!(f.v.counts().walk_errors, 1);
        // No walk when no verdict needs one; release and "off" are decided by the context.
        f.ctx.flags |= pte::CTX_MM_RELEASED;
        assert_eq!(f.v.lookup(&f.mem, &f.ctx, va), None);
        assert_eq!(
            f.v.judge(&f.mem, &f.ctx, &a, None).map(|v| v.class),
            Some(VIOL_RELEASED)
        );
        f.ctx.flags &= !pte::CTX_MM_RELEASED;
        f.ctx.flags |= pte::CTX_NO_VALIDATE;
        assert_eq!(f.v.lookup(&f.mem, &f.ctx, va), None);
        assert_eq!(f.v.judge(&f.mem, &f.ctx, &a, stale), None);
    }

    #[test]
    fn event_record() {
        let v = Violation {
            class: VIOL_WRITE_PERM,
            asid: 3,
            va: 0x1234,
            dev_pa: 0x5234,
            cpu_pa: 0x5234,
            write: true,
            why: "x",
        };
        let e = v.to_event();
        assert_eq!(
            (e.ty, e.flags, e.reason, e.asid, e.va, e.info, e.info2),
            (
                event::EVT_VIOLATION,
                event::EVT_F_WRITE,
                VIOL_WRITE_PERM,
                3,
                0x1234,
                0x5234,
                0x5234
            )
        );
        let c = ValidatorCounts {
            write_perm: 2,
            stale: 1,
            ..Default::default()
        };
        assert_eq!((c.of(VIOL_WRITE_PERM), c.of(event::VIOL_LEDGER)), (2, 0));
        assert_eq!(c.violations(), 3);
    }
}
