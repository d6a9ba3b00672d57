// SPDX-License-Identifier: GPL-2.0

//! The device page table: tables, leaves and 2 MiB blocks, commits, zaps and write-protects, the
//! shootdown with its INV + SYNC, and the aging walk.

use super::*;

impl Mirror {
    /// A zeroed table page, within the context's bound (`ENOMEM` beyond it or when the pool is
    /// empty). Never sleeps.
    fn new_table(&self, st: &mut PtState) -> Result<PtPage> {
        if st.pages >= max_pt_pages() {
            return Err(ENOMEM);
        }
        let page = self.pool().alloc()?.ok_or(ENOMEM)?;
        st.pages += 1;
        Ok(page)
    }

    /// The table entry `idx` of `table` points to, allocating it if `alloc` and absent.
    pub(super) fn child(
        &self,
        st: &mut PtState,
        table: PtRef,
        idx: usize,
        alloc: bool,
    ) -> Result<Option<PtRef>> {
        let entry = self.pool().read(table, idx)?;
        if entry & pte::PTE_P != 0 {
            if entry & pte::PTE_PS != 0 {
                // Only level-2 entries may be huge, and callers never ask for their child.
                return Err(EIO);
            }
            return self.pool().page_at(entry & pte::PTE_ADDR_MASK).map(Some);
        }
        if !alloc {
            return Ok(None);
        }
        let page = self.new_table(st)?;
        // Table entries carry W so that leaf permissions alone decide.
        let child = self
            .pool()
            .attach(table, idx, page, pte::PTE_P | pte::PTE_W)?;
        Ok(Some(child))
    }

    /// The level-2 table covering `va`.
    pub(super) fn l2_table(&self, st: &mut PtState, va: u64, alloc: bool) -> Result<Option<PtRef>> {
        let root = st.root()?;
        let Some(l3) = self.child(st, root, pte::pt_index(va, 4), alloc)? else {
            return Ok(None);
        };
        self.child(st, l3, pte::pt_index(va, 3), alloc)
    }

    /// The 2 MiB leaf for a whole block the CPU maps with one huge frame at `base`, if it can
    /// go in a level-2 slot holding `slot`: an empty slot, or a 2 MiB leaf of the same frame
    /// (a write MAP after a read MAP: the entry stays whole, never loses W without an
    /// invalidation, and keeps the device's A/D bits). A slot holding a table is split work.
    fn huge_leaf(slot: u64, base: Option<u64>, write: bool) -> Option<u64> {
        let base = base?;
        let leaf = base | pte::PTE_P | pte::PTE_PS | write_bit(write);
        if slot & pte::PTE_P == 0 {
            return Some(leaf);
        }
        let same_frame = slot & pte::PTE_PS != 0 && slot & pte::PTE_ADDR_MASK == base;
        same_frame.then_some(leaf | slot & (pte::PTE_W | pte::PTE_A | pte::PTE_D))
    }

    /// Writes device PTEs for `[start, end)` (inside one 2 MiB block) from `pfns`.
    pub(super) fn commit(
        &self,
        st: &mut PtState,
        start: u64,
        end: u64,
        pfns: &[HmmPfn],
        access: Access,
        out: &mut MapOut,
    ) -> Result {
        // Nothing is mapped for a device that failed (or unbound: its maps are gone).
        self.shared.check_live()?;
        // The block's DMA map first: without a spare for it, `EAGAIN` before anything changed.
        st.dma.block(start)?;
        let l2 = self.l2_table(st, start, true)?.ok_or(ENOMEM)?;
        let l2_idx = pte::pt_index(start, 2);
        let l2_entry = self.pool().read(l2, l2_idx)?;
        // A write fault's window gets a writable 2 MiB leaf only if the CPU maps it all
        // writable (else 4 KiB entries, writable where the CPU's are).
        let write = match access {
            Access::Around(_) => pfns.iter().all(|p| p.write()),
            _ => access.write(),
        };
        if end - start == HUGE {
            let base = match huge_frame(pfns, write) {
                Some(_) => self.map_huge(st, start, pfns)?,
                None => None,
            };
            if let Some(leaf) = Self::huge_leaf(l2_entry, base, write) {
                if l2_entry & pte::PTE_P == 0 {
                    self.pool().write(l2, l2_idx, leaf)?;
                    out.huge += 1;
                } else if leaf & !l2_entry & pte::PTE_W != 0 {
                    // The same frame, now writable: an atomic OR keeps the device's A/D bits.
                    self.pool().fetch_or(l2, l2_idx, pte::PTE_W)?;
                    out.huge += 1;
                }
                return Ok(());
            }
        }
        let l1 = if l2_entry & pte::PTE_P == 0 {
            self.child(st, l2, l2_idx, true)?.ok_or(ENOMEM)?
        } else if l2_entry & pte::PTE_PS != 0 {
            self.split_huge(st, l2, l2_idx, l2_entry)?
        } else {
            self.pool().page_at(l2_entry & pte::PTE_ADDR_MASK)?
        };
        for (i, pfn) in pfns.iter().enumerate() {
            if !pfn.valid() || pfn.error() {
                continue;
            }
            let va = start + i as u64 * PAGE;
            let idx = pte::pt_index(va, 1);
            let old = self.pool().read(l1, idx)?;
            // An entry still mapping another page whose leaf is gone is stale only if the device
            // flushed since (else it is skipped, and the device faults here again).
            let unmap_stale = old & pte::PTE_P == 0 && !st.need_flush;
            let dma = match st.dma.map(va, *pfn, unmap_stale) {
                Err(e) if e == EBUSY => continue,
                r => r?,
            };
            let leaf = dma | pte::PTE_P | write_bit(access.write() && pfn.write());
            if old & pte::PTE_P == 0 {
                self.pool().write(l1, idx, leaf)?;
            } else if old & pte::PTE_ADDR_MASK == dma {
                // Never downgrade without an invalidation; keep the device's A/D bits (an
                // atomic OR: the device may be setting them right now).
                if leaf & !old & pte::PTE_W == 0 {
                    continue;
                }
                self.pool().fetch_or(l1, idx, pte::PTE_W)?;
            } else {
                // Another page under a live leaf: an invalidation would have cleared it first.
                continue;
            }
            out.pages += 1;
        }
        Ok(())
    }

    /// Maps the 512 pages of the block at `start` for DMA and returns their base address if
    /// they are contiguous and 2 MiB aligned in DMA space, as a 2 MiB device leaf needs (else
    /// the block gets 4 KiB leaves, which use the same mappings).
    fn map_huge(&self, st: &mut PtState, start: u64, pfns: &[HmmPfn]) -> Result<Option<u64>> {
        let mut base = None;
        for (i, pfn) in pfns.iter().enumerate() {
            let va = start + i as u64 * PAGE;
            let dma = match st.dma.map(va, *pfn, !st.need_flush) {
                Err(e) if e == EBUSY => return Ok(None),
                r => r?,
            };
            let first = *base.get_or_insert(dma);
            if first % HUGE != 0 || dma != first + i as u64 * PAGE {
                return Ok(None);
            }
        }
        Ok(base)
    }

    /// Replaces the 2 MiB leaf at `l2[idx]` by a table of the same translations as 4 KiB
    /// entries, so that part of the block can change. The device may keep using the cached
    /// 2 MiB translation meanwhile: it maps the same pages, and writes through it must stay
    /// visible to dirty tracking, so the leaf's A/D bits (as the swap that replaced it returned
    /// them) go to every 4 KiB entry.
    fn split_huge(&self, st: &mut PtState, l2: PtRef, idx: usize, leaf: u64) -> Result<PtRef> {
        let page = self.new_table(st)?;
        let frame = leaf & pte::PTE_ADDR_MASK;
        let kept = pte::PTE_W | pte::PTE_A | pte::PTE_D;
        for i in 0..ENTRIES {
            let small = (frame + i as u64 * PAGE) | pte::PTE_P | (leaf & kept);
            self.pool().write(page.id(), i, small)?;
        }
        let (l1, old) = self
            .pool()
            .replace_with_table(l2, idx, page, pte::PTE_P | pte::PTE_W)?;
        // A/D the device set after `leaf` was read.
        let late = old & (pte::PTE_A | pte::PTE_D) & !leaf;
        if late != 0 {
            for i in 0..ENTRIES {
                self.pool().fetch_or(l1, i, late)?;
            }
        }
        Ok(l1)
    }

    /// Clears every device PTE in `[z.start, z.end)` below `table` (a table at `level` mapping
    /// from `base`), and detaches every table that ends up empty (freed after the SYNC).
    fn zap_table(
        &self,
        st: &mut PtState,
        table: PtRef,
        level: u32,
        base: u64,
        z: &mut Zap,
    ) -> Result {
        let size = span(level);
        let first = ((z.start.max(base) - base) / size) as usize;
        for idx in first..ENTRIES {
            let lo = base + idx as u64 * size;
            if lo >= z.end {
                break;
            }
            let hi = lo + size;
            let entry = self.pool().read(table, idx)?;
            if entry & pte::PTE_P == 0 {
                continue;
            }
            if level == 1 || entry & pte::PTE_PS != 0 {
                // A 2 MiB leaf only partly in range goes whole: the device faults the rest in.
                let old = self.pool().swap(table, idx, 0)?;
                leaf_dropped(&mut st.dma, lo, old);
                z.add(lo, hi, size / PAGE);
                continue;
            }
            let child = self.pool().page_at(entry & pte::PTE_ADDR_MASK)?;
            // The room is reserved at open; a full list (impossible) just keeps the table.
            let room = st.deferred.len() < st.deferred.capacity();
            // (`ZG_INJ_EARLY_TABLE_FREE` keeps clearing entry by entry: its test times the race
            // of a reused table against the walker, measured with that path.)
            let whole = z.covers(lo, hi) && !self.injected(testing::ZG_INJ_EARLY_TABLE_FREE);
            if level == 2 && room && whole {
                // A whole 2 MiB block goes: detach its level-1 table as it is (freed after the
                // SYNC, zeroed when it is next allocated) instead of clearing 512 entries.
                let leaves = self.pool().present(child)?;
                if let Some(page) = self.pool().detach(table, idx)? {
                    let _ = st.deferred.push_within_capacity((page, lo));
                }
                z.add(lo, hi, leaves);
                continue;
            }
            self.zap_table(st, child, level - 1, lo, z)?;
            let empty = z.covers(lo, hi) || self.pool().is_empty(child)?;
            if empty && room {
                if let Some(page) = self.pool().detach(table, idx)? {
                    let _ = st.deferred.push_within_capacity((page, lo));
                }
            }
        }
        Ok(())
    }

    /// Calls `visit(table, index, entry, va, size)` for each present leaf (a 4 KiB entry or a 2 MiB
    /// one) under `table`, a table at `level` mapping from `base`, that overlaps `[start, end)`,
    /// until `visit` says stop (`Ok(true)`); returns whether it did. The context lock is held.
    fn for_each_leaf(
        &self,
        (table, level, base): (PtRef, u32, u64),
        (start, end): (u64, u64),
        visit: &mut dyn FnMut(PtRef, usize, u64, u64, u64) -> Result<bool>,
    ) -> Result<bool> {
        let size = span(level);
        let first = ((start.max(base) - base) / size) as usize;
        for idx in first..ENTRIES {
            let lo = base + idx as u64 * size;
            if lo >= end {
                break;
            }
            let entry = self.pool().read(table, idx)?;
            if entry & pte::PTE_P == 0 {
                continue;
            }
            let stop = if level == 1 || entry & pte::PTE_PS != 0 {
                visit(table, idx, entry, lo, size)?
            } else {
                let child = self.pool().page_at(entry & pte::PTE_ADDR_MASK)?;
                self.for_each_leaf((child, level - 1, lo), (start, end), visit)?
            };
            if stop {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Makes the device PTEs of `[z.start, z.end)` read-only and clean, keeping their frames and
    /// every table: a write-protect that keeps the pages mapped. A 2 MiB leaf only partly in
    /// range is protected whole (a device write faults it back).
    fn protect_table(&self, st: &mut PtState, z: &mut Zap) -> Result {
        let root = st.root()?;
        let dma = &mut st.dma;
        let range = (z.start, z.end);
        self.for_each_leaf(
            (root, pte::PT_LEVELS, 0),
            range,
            &mut |table, idx, entry, lo, size| {
                if entry & pte::PTE_W != 0 {
                    // D goes with W: the CPU PTE is clean or read-only now, and the device's next
                    // write must fault (breaking COW, or marking the page dirty again). What it
                    // wrote so far is dirty: writeback cleans the page only after this returns.
                    let old = self
                        .pool()
                        .fetch_and(table, idx, !(pte::PTE_W | pte::PTE_D))?;
                    leaf_dropped(dma, lo, old);
                    z.add(lo, lo + size, size / PAGE);
                }
                Ok(false)
            },
        )
        .map(|_| ())
    }

    /// Whether a device leaf in `[z.start, z.end)` has its accessed bit set (the device walked
    /// it since the bit was last cleared); with `clear`, clears every such bit (the leaves added
    /// to `z`), else stops at the first.
    pub(super) fn age_table(&self, root: PtRef, z: &mut Zap, clear: bool) -> Result<bool> {
        let mut young = false;
        let range = (z.start, z.end);
        self.for_each_leaf(
            (root, pte::PT_LEVELS, 0),
            range,
            &mut |table, idx, entry, lo, size| {
                if entry & pte::PTE_A == 0 {
                    return Ok(false);
                }
                young = true;
                if clear {
                    self.pool().fetch_and(table, idx, !pte::PTE_A)?;
                    z.add(lo, lo + size, size / PAGE);
                }
                Ok(!clear)
            },
        )?;
        Ok(young)
    }

    /// Applies `change` to `[start, end)`, invalidates the device TLB and waits per `how` (plus
    /// `ctx_cmds` first, for teardown). Returns pages changed and how the SYNC ended (`None`:
    /// nothing to do). With [`Wait::Spin`], `EAGAIN` when it could not finish without sleeping.
    pub(super) fn shootdown(
        &self,
        st: &mut PtState,
        start: u64,
        end: u64,
        how: Wait,
        ctx_cmds: &[cmd::Command],
        change: Change,
    ) -> Result<(u64, Option<Synced>)> {
        let mut z = Zap::new(start, end);
        let root = st.root()?;
        let zapped = match change {
            Change::Clear => self.zap_table(st, root, pte::PT_LEVELS, 0, &mut z),
            Change::WriteProtect => self.protect_table(st, &mut z),
        };
        if z.pages == 0 && st.deferred.is_empty() && !st.need_flush && ctx_cmds.is_empty() {
            bump(&self.stats.invalidations_empty, 1);
            return zapped.map(|()| (0, None));
        }
        let counter = match change {
            Change::Clear => &self.stats.pages_zapped,
            Change::WriteProtect => &self.stats.pages_write_protected,
        };
        bump(counter, z.pages);
        let stale_anywhere = st.need_flush;
        // Cleared entries must not be trusted to be out of the IOTLB until the SYNC completes.
        let flush_all =
            st.need_flush || !ctx_cmds.is_empty() || (z.hi - z.lo) / PAGE > INV_ASID_THRESHOLD;
        st.need_flush = true;
        let mut cmds = [cmd::Command::default(); 3];
        let mut n = 0;
        for (slot, c) in cmds.iter_mut().zip(ctx_cmds.iter().take(2)) {
            *slot = *c;
            n += 1;
        }
        cmds[n] = self.invalidation(&z, flush_all);
        let cmds = &cmds[..=n];
        if ctx_cmds.is_empty() && self.injected(testing::ZG_INJ_EARLY_TABLE_FREE) {
            self.free_detached_early(st);
        }
        if ctx_cmds.is_empty() && self.injected(testing::ZG_INJ_SKIP_SYNC_WAIT) {
            // Bug on purpose: return before the device confirmed. The detached tables stay
            // pending until a later shootdown that does wait, so the pool stays consistent.
            let _ =
                self.shared
                    .hw
                    .cmdq
                    .post(&self.shared.bar, cmds, true, how, &self.shared.health);
            st.need_flush = false;
            return zapped.map(|()| (z.pages, None));
        }
        let synced = match how {
            Wait::Sleep => self.shared.sync(cmds),
            Wait::Spin => self.shared.sync_nonblocking(cmds)?,
        };
        if let Synced::Done(took) = synced {
            let ns = took.as_nanos().max(0) as u64;
            bump(&self.stats.sync_waits, 1);
            bump(&self.stats.sync_wait_ns, ns);
            self.stats.sync_wait_max_ns.fetch_max(ns, Ordering::Relaxed);
        }
        st.need_flush = false;
        self.free_deferred(st);
        // The device flushed (or is fenced): what it no longer maps can be unmapped for DMA,
        // everywhere if leaves were cleared earlier without a completed SYNC. A context taken
        // off the device (`ctx_cmds`) drops every map itself, once its entry says so: the
        // unmapping can take a while (dma-debug checks each page), and the validator should
        // know the context is gone as soon as the device confirmed it.
        if !ctx_cmds.is_empty() {
        } else if stale_anywhere {
            self.release_dma(st, 0, pte::VA_LIMIT);
        } else if change == Change::Clear {
            self.release_dma(st, z.lo, z.hi);
        }
        zapped.map(|()| (z.pages, Some(synced)))
    }

    /// Unmaps for DMA the pages of `[start, end)` the device tables no longer map. Only after
    /// the device flushed what was cleared there.
    pub(super) fn release_dma(&self, st: &mut PtState, start: u64, end: u64) {
        let Ok(root) = st.root() else {
            st.dma.clear();
            return;
        };
        st.dma
            .release(start, end, &mut |va| self.device_block(root, va));
    }

    /// What the device tables under `root` map in the 2 MiB block at `va` (an unreadable table
    /// counts as mapping everything: kept mapped until the context goes).
    fn device_block(&self, root: PtRef, va: u64) -> DeviceBlock {
        self.read_block(root, va).unwrap_or(DeviceBlock::Huge)
    }

    fn read_block(&self, root: PtRef, va: u64) -> Result<DeviceBlock> {
        let mut table = root;
        for level in [4, 3] {
            let entry = self.pool().read(table, pte::pt_index(va, level))?;
            if entry & pte::PTE_P == 0 {
                return Ok(DeviceBlock::Unmapped);
            }
            table = self.pool().page_at(entry & pte::PTE_ADDR_MASK)?;
        }
        let entry = self.pool().read(table, pte::pt_index(va, 2))?;
        if entry & pte::PTE_P == 0 {
            return Ok(DeviceBlock::Unmapped);
        }
        if entry & pte::PTE_PS != 0 {
            return Ok(DeviceBlock::Huge);
        }
        let l1 = self.pool().page_at(entry & pte::PTE_ADDR_MASK)?;
        let mut present = [0u64; ENTRIES / 64];
        for idx in 0..ENTRIES {
            if self.pool().read(l1, idx)? & pte::PTE_P != 0 {
                present[idx / 64] |= 1 << (idx % 64);
            }
        }
        Ok(DeviceBlock::Pages(present))
    }

    /// The IOTLB command for zap `z`: the ASID, or the span of what was cleared.
    pub(super) fn invalidation(&self, z: &Zap, flush_all: bool) -> cmd::Command {
        if flush_all || z.pages == 0 {
            bump(&self.stats.inv_asid_cmds, 1);
            cmd::Command::new(cmd::CMD_INV_ASID, 0, self.asid, 0, 0)
        } else {
            bump(&self.stats.inv_range_cmds, 1);
            cmd::Command::new(cmd::CMD_INV_RANGE, 0, self.asid, z.lo, z.hi - z.lo)
        }
    }
}

/// The physical base of a 2 MiB block that `pfns` map contiguously with a CPU mapping of order
/// 9 or more (and writable, if `write`), if they do.
fn huge_frame(pfns: &[HmmPfn], write: bool) -> Option<u64> {
    let base = pfns.first()?.phys();
    let contiguous = base % HUGE == 0
        && pfns.iter().enumerate().all(|(i, p)| {
            p.valid()
                && !p.error()
                && p.map_order() >= 9
                && p.phys() == base + i as u64 * PAGE
                && (!write || p.write())
        });
    contiguous.then_some(base)
}

/// A device leaf was cleared, replaced or write-protected (`old` is what the atomic update
/// returned): if its D bit was set, the device wrote its page, which the kernel must then see as
/// dirty (see [`kernel::hmm::mark_dirty`] and the module documentation, "Dirty pages").
/// The leaf was at `va`; its page is the one the block's DMA map has there (a 2 MiB leaf's
/// head page marks the whole folio).
pub(super) fn leaf_dropped(dma: &mut DmaBlocks, va: u64, old: u64) {
    if old & pte::PTE_P != 0 && old & pte::PTE_D != 0 {
        if let Some(phys) = dma.phys(va) {
            // SAFETY: A device leaf is a subset of the CPU mapping (the mirror's invariant): its
            // page is still mapped by the CPU where the device used it, since invalidation drops
            // the leaf before the kernel changes the CPU PTE (module documentation, "Dirty
            // pages").
            unsafe { hmm::mark_dirty(phys) };
        }
    }
}
