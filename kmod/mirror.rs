// SPDX-License-Identifier: GPL-2.0

//! Contexts: one per open file, mirroring the opener's address space into one device ASID.
//!
//! The mirror follows `lib/test_hmm.c` with a real device behind it:
//!
//! - **Populate** ([`populate`]): `mmu_interval_read_begin()` -> `hmm_range_fault()` (mmap read
//!   lock) -> context lock -> `mmu_interval_read_retry()` -> write device PTEs, in 2 MiB blocks,
//!   with a 2 MiB device entry where the CPU maps 2 MiB.
//! - **Shootdown** ([`Mirror::invalidate`]): context lock -> `mmu_interval_set_seq()` -> clear the
//!   device PTEs -> `CMD_INV_RANGE` (or `CMD_INV_ASID` above [`INV_ASID_THRESHOLD`] pages) + SYNC ->
//!   wait for the SYNC. Page-table pages detached from the tree are freed only after it.
//! - **Release** (the `Release` event, and file close): disable the context on the device
//!   (`CFGI_CTX` + `CMD_INV_ASID` + SYNC) before anything is freed.
//!
//! The context lock (`Mirror::state`) is "the driver lock" of [`crate::mm`]: nothing under it
//! allocates with `GFP_KERNEL` or enters the mm (page-table pages come from the preallocated
//! [`crate::hw::PtPool`]).

use crate::abi::{cmd, event as ev, pte, uapi};
use crate::driver::Shared;
use crate::hw::{PtPage, Wait};
use crate::mm::{self, FaultOutcome, HmmPfn, HmmRequest, IntervalInvalidate, IntervalNotifier};
use crate::mm::{NotifierEvent, NotifierRange};
use core::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use kernel::{
    mm::{MmWithUser, MmWithUserAsync},
    new_mutex,
    prelude::*,
    sync::aref::ARef,
    sync::{Arc, Mutex},
    time::{delay::fsleep, Delta, Instant, Monotonic},
};

/// Pages above which one invalidation flushes the whole ASID instead of a range (SMMUv3's
/// `CMDQ_MAX_TLBI_OPS` heuristic).
pub(crate) const INV_ASID_THRESHOLD: u64 = 512;
/// A populate that keeps colliding with invalidations gives up with `EBUSY` after this long.
const POPULATE_TIMEOUT: Delta = Delta::from_secs(2);
/// Page-table pages detached by one invalidation that can wait for its SYNC to be freed; beyond
/// that, entries are cleared in place.
const MAX_DEFERRED_FREE: usize = 32;
/// Violations printed per context (the rest are only counted).
const VIOLATIONS_LOGGED: u64 = 8;

const PAGE: u64 = pte::PAGE_SIZE;
const HUGE: u64 = pte::HUGE_PAGE_SIZE;
const ENTRIES: usize = pte::PT_ENTRIES;

/// Bytes covered by one entry of a table at `level`.
const fn span(level: u32) -> u64 {
    1 << (12 + 9 * (level - 1))
}

/// A context: the interval notifier with its driver data.
pub(crate) type Context = IntervalNotifier<Mirror>;

/// Page-table state, under the context lock.
struct PtState {
    /// Root (level 4) table.
    root: PtPage,
    /// Table pages held, root included.
    pages: u64,
    /// The address space was torn down: nothing is mapped any more, ioctls get `EINVAL`.
    released: bool,
    /// Device PTEs were cleared without a completed invalidation (a non-blockable callback gave
    /// up, or a SYNC timed out): the next invalidation flushes the ASID whatever it clears.
    need_flush: bool,
    /// The device never confirmed the context was off: its tables (root included) are leaked
    /// rather than reused.
    leaked: bool,
    /// Tables detached by the current invalidation, freed after its SYNC.
    deferred: [PtPage; MAX_DEFERRED_FREE],
    ndeferred: usize,
}

/// Counters, readable without the lock (see [`uapi::ZgStats`]).
#[derive(Default)]
struct Stats {
    invalidations: AtomicU64,
    invalidations_empty: AtomicU64,
    nonblock_failed: AtomicU64,
    pages_zapped: AtomicU64,
    inv_range_cmds: AtomicU64,
    inv_asid_cmds: AtomicU64,
    sync_waits: AtomicU64,
    sync_wait_ns: AtomicU64,
    sync_wait_max_ns: AtomicU64,
    populates: AtomicU64,
    populate_retries: AtomicU64,
    pages_mapped: AtomicU64,
    huge_mapped: AtomicU64,
    faults: AtomicU64,
    faults_resolved: AtomicU64,
    faults_aborted: AtomicU64,
    dma_jobs: AtomicU64,
    violations: [AtomicU64; uapi::ZG_VIOL_CLASSES],
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The driver side of a context.
///
/// # Invariants
///
/// - `asid` is allocated to this context in [`Shared`]'s ASID table from creation until
///   [`Mirror::shutdown`] released it (or until drop, if the context never reached the device).
/// - Every table page reachable from `state.root` (and `state.root` itself) is owned by this
///   context, and freed only once the device can no longer reach it.
#[pin_data(PinnedDrop)]
pub(crate) struct Mirror {
    shared: Arc<Shared>,
    pub(crate) asid: u32,
    /// Whether the CPU page table has 5 levels (for the validator's walk).
    la57: bool,
    #[pin]
    state: Mutex<PtState>,
    stats: Stats,
    /// `ZG_INJ_*` bugs enabled on this context.
    inject: AtomicU32,
    /// This context set the device's CMD_LAG (reset on close).
    set_lag: AtomicBool,
    /// The last fault the driver could not serve: (job id, negative errno).
    abort_job: AtomicU64,
    abort_errno: AtomicI64,
    /// The ASID went back to the allocator (see `shutdown`).
    asid_released: AtomicBool,
}

/// What one populate wrote.
#[derive(Default)]
pub(crate) struct MapOut {
    pub(crate) retries: u32,
    pub(crate) pages: u64,
    pub(crate) huge: u64,
}

/// One zap: the range to clear, and what was cleared.
struct Zap {
    /// Range to clear.
    s: u64,
    e: u64,
    pages: u64,
    lo: u64,
    hi: u64,
}

impl Zap {
    fn add(&mut self, lo: u64, hi: u64, pages: u64) {
        if self.pages == 0 {
            (self.lo, self.hi) = (lo, hi);
        } else {
            self.lo = self.lo.min(lo);
            self.hi = self.hi.max(hi);
        }
        self.pages += pages;
    }
}

/// Creates the context of a file being opened by the current task: an ASID, a root table, the
/// interval notifier over the whole device-addressable range, and the enabled context entry.
pub(crate) fn open(shared: &Arc<Shared>) -> Result<Arc<Context>> {
    let task = kernel::current!();
    let mm = task.mm().ok_or(EINVAL)?;
    let asid = shared.alloc_asid()?;
    let root = match shared.hw.pool.alloc() {
        Ok(Some(p)) => p,
        Ok(None) => {
            shared.free_asid(asid);
            return Err(ENOMEM);
        }
        Err(e) => {
            shared.free_asid(asid);
            return Err(e);
        }
    };
    let la57 = mm::cpu_pt_levels() == 5;
    let data = try_pin_init!(Mirror {
        shared: shared.clone(),
        asid,
        la57,
        state <- new_mutex!(PtState {
            root,
            pages: 1,
            released: false,
            need_flush: false,
            leaked: false,
            deferred: [0; MAX_DEFERRED_FREE],
            ndeferred: 0,
        }, "zapguard_ctx"),
        stats: Stats::default(),
        inject: AtomicU32::new(0),
        set_lag: AtomicBool::new(false),
        abort_job: AtomicU64::new(u64::MAX),
        abort_errno: AtomicI64::new(0),
        asid_released: AtomicBool::new(false),
    }? Error);
    // On failure `data` is dropped, and with it the root page and the ASID.
    let ctx = Arc::pin_init(
        Context::insert(mm, 0, pte::VA_LIMIT as usize, data),
        GFP_KERNEL,
    )?;
    let entry = ctx.entry(root, ctx.mm(), pte::CTX_VALIDATE)?;
    let cfgi = [cmd::Command::new(cmd::CMD_CFGI_CTX, 0, asid, 0, 0)];
    let enable = || -> Result {
        shared.hw.write_ctx(asid, &entry)?;
        let seq = shared.hw.cmdq.post(&shared.bar, &cfgi, true, Wait::Sleep)?;
        shared.hw.cmdq.wait(seq, Wait::Sleep)?;
        shared.publish(asid, ctx.clone())
    };
    if let Err(e) = enable() {
        // Leave no valid entry pointing at tables about to be freed.
        let _ = shared.hw.write_ctx(asid, &pte::ContextEntry::default());
        if let Ok(seq) = shared.hw.cmdq.post(&shared.bar, &cfgi, true, Wait::Sleep) {
            let _ = shared.hw.cmdq.wait(seq, Wait::Sleep);
        }
        return Err(e);
    }
    Ok(ctx)
}

impl Mirror {
    fn pool(&self) -> &crate::hw::PtPool {
        &self.shared.hw.pool
    }

    fn injected(&self, mode: u32) -> bool {
        self.inject.load(Ordering::Relaxed) & mode != 0
    }

    /// The table an entry points to, allocating it if `alloc` and absent.
    fn child(
        &self,
        st: &mut PtState,
        table: PtPage,
        idx: usize,
        alloc: bool,
    ) -> Result<Option<PtPage>> {
        let e = self.pool().read(table, idx)?;
        if e & pte::PTE_P != 0 {
            if e & pte::PTE_PS != 0 {
                // Only level-2 entries may be huge, and callers never ask for their child.
                return Err(EIO);
            }
            return self.pool().page_at(e & pte::PTE_ADDR_MASK).map(Some);
        }
        if !alloc {
            return Ok(None);
        }
        let page = self.pool().alloc()?.ok_or(ENOMEM)?;
        st.pages += 1;
        // Table entries carry W so that leaf permissions alone decide.
        self.pool().write(
            table,
            idx,
            self.pool().addr(page)? | pte::PTE_P | pte::PTE_W,
        )?;
        Ok(Some(page))
    }

    /// The level-2 table covering `va`.
    fn l2(&self, st: &mut PtState, va: u64, alloc: bool) -> Result<Option<PtPage>> {
        let root = st.root;
        let Some(l3) = self.child(st, root, pte::pt_index(va, 4), alloc)? else {
            return Ok(None);
        };
        self.child(st, l3, pte::pt_index(va, 3), alloc)
    }

    /// Writes device PTEs for `[s, e)` (inside one 2 MiB block) from `pfns`.
    fn commit(
        &self,
        st: &mut PtState,
        s: u64,
        e: u64,
        pfns: &[HmmPfn],
        write: bool,
        out: &mut MapOut,
    ) -> Result {
        let l2 = self.l2(st, s, true)?.ok_or(ENOMEM)?;
        let i2 = pte::pt_index(s, 2);
        let l2e = self.pool().read(l2, i2)?;
        let wbit = |w: bool| if w { pte::PTE_W } else { 0 };
        // A 2 MiB device entry when the CPU maps the whole block with one PMD.
        if e - s == HUGE && l2e & pte::PTE_P == 0 {
            let base = pfns.first().map_or(0, |p| p.phys());
            let huge = base % HUGE == 0
                && pfns.iter().enumerate().all(|(i, p)| {
                    p.valid()
                        && !p.error()
                        && p.map_order() >= 9
                        && p.phys() == base + i as u64 * PAGE
                        && (!write || p.write())
                });
            if huge {
                self.pool()
                    .write(l2, i2, base | pte::PTE_P | pte::PTE_PS | wbit(write))?;
                out.huge += 1;
                return Ok(());
            }
        }
        let l1 = if l2e & pte::PTE_P == 0 {
            self.child(st, l2, i2, true)?.ok_or(ENOMEM)?
        } else if l2e & pte::PTE_PS != 0 {
            // Split: the same translations as 4 KiB entries, then update the range. The device
            // may keep using the cached 2 MiB translation meanwhile; it maps the same pages.
            let page = self.pool().alloc()?.ok_or(ENOMEM)?;
            st.pages += 1;
            let frame = l2e & pte::PTE_ADDR_MASK;
            for i in 0..ENTRIES {
                let leaf = (frame + i as u64 * PAGE) | pte::PTE_P | (l2e & pte::PTE_W);
                self.pool().write(page, i, leaf)?;
            }
            self.pool()
                .write(l2, i2, self.pool().addr(page)? | pte::PTE_P | pte::PTE_W)?;
            page
        } else {
            self.pool().page_at(l2e & pte::PTE_ADDR_MASK)?
        };
        for (i, p) in pfns.iter().enumerate() {
            if !p.valid() || p.error() {
                continue;
            }
            let va = s + i as u64 * PAGE;
            let idx = pte::pt_index(va, 1);
            let old = self.pool().read(l1, idx)?;
            let mut leaf = p.phys() | pte::PTE_P | wbit(write && p.write());
            if old & pte::PTE_P != 0 && old & pte::PTE_ADDR_MASK == p.phys() {
                // Never downgrade without an invalidation; keep the device's A/D bits.
                leaf |= old & (pte::PTE_W | pte::PTE_A | pte::PTE_D);
                if leaf == old {
                    continue;
                }
            }
            self.pool().write(l1, idx, leaf)?;
            out.pages += 1;
        }
        Ok(())
    }

    /// Clears every device PTE in `[z.s, z.e)` below `table` (a table at `level` mapping
    /// `base`).
    fn zap_level(
        &self,
        st: &mut PtState,
        table: PtPage,
        level: u32,
        base: u64,
        z: &mut Zap,
    ) -> Result {
        let (s, e) = (z.s, z.e);
        let sz = span(level);
        let first = ((s.max(base) - base) / sz) as usize;
        let mut idx = first;
        while idx < ENTRIES {
            let lo = base + idx as u64 * sz;
            if lo >= e {
                break;
            }
            let hi = lo + sz;
            let ent = self.pool().read(table, idx)?;
            if ent & pte::PTE_P != 0 {
                if level == 1 || ent & pte::PTE_PS != 0 {
                    self.pool().write(table, idx, 0)?;
                    z.add(lo, hi, sz / PAGE);
                } else {
                    let child = self.pool().page_at(ent & pte::PTE_ADDR_MASK)?;
                    if level == 2 && s <= lo && hi <= e && st.ndeferred < MAX_DEFERRED_FREE {
                        // The whole block goes: detach its table, free it after the SYNC.
                        let mut n = 0;
                        for i in 0..ENTRIES {
                            n += self.pool().read(child, i)? & pte::PTE_P;
                        }
                        self.pool().write(table, idx, 0)?;
                        st.deferred[st.ndeferred] = child;
                        st.ndeferred += 1;
                        // Count the block even if empty: its table pointer must be flushed
                        // from nothing (no walk cache) but the SYNC orders the free.
                        z.add(lo, hi, n.max(1));
                    } else {
                        self.zap_level(st, child, level - 1, lo, z)?;
                    }
                }
            }
            idx += 1;
        }
        Ok(())
    }

    /// Clears `[s, e)`, invalidates the device TLB and waits (per `how`). Returns pages zapped.
    fn shootdown(
        &self,
        st: &mut PtState,
        s: u64,
        e: u64,
        how: Wait,
        ctx_cmd: Option<cmd::Command>,
    ) -> Result<u64> {
        let mut z = Zap {
            s,
            e: e.min(pte::VA_LIMIT),
            pages: 0,
            lo: 0,
            hi: 0,
        };
        let root = st.root;
        let r = self.zap_level(st, root, pte::PT_LEVELS, 0, &mut z);
        if z.pages == 0 && !st.need_flush && ctx_cmd.is_none() {
            bump(&self.stats.invalidations_empty, 1);
            return r.map(|()| 0);
        }
        bump(&self.stats.pages_zapped, z.pages);
        let flush_all =
            st.need_flush || ctx_cmd.is_some() || (z.hi - z.lo) / PAGE > INV_ASID_THRESHOLD;
        // Cleared entries must not be trusted to be out of the IOTLB until the SYNC completes.
        st.need_flush = true;
        let mut cmds = [cmd::Command::default(); 2];
        let mut n = 0;
        if let Some(c) = ctx_cmd {
            cmds[n] = c;
            n += 1;
        }
        cmds[n] = if flush_all {
            bump(&self.stats.inv_asid_cmds, 1);
            cmd::Command::new(cmd::CMD_INV_ASID, 0, self.asid, 0, 0)
        } else {
            bump(&self.stats.inv_range_cmds, 1);
            cmd::Command::new(cmd::CMD_INV_RANGE, 0, self.asid, z.lo, z.hi - z.lo)
        };
        n += 1;
        let hw = &self.shared.hw;
        let posted = hw.cmdq.post(&self.shared.bar, &cmds[..n], true, how);
        let seq = match posted {
            Ok(seq) => seq,
            // Unbound: the device was quiesced, nothing can use the translations.
            Err(e) if e == ENODEV => {
                self.free_deferred(st);
                st.need_flush = false;
                return Ok(z.pages);
            }
            Err(e) => return Err(e),
        };
        // Teardown (`ctx_cmd`) always waits: the injected bug is in the mm callbacks only.
        if ctx_cmd.is_none() && self.injected(uapi::ZG_INJ_SKIP_SYNC_WAIT) {
            // Bug on purpose: return before the device confirmed. The detached tables stay
            // pending until a later shootdown that does wait, so the pool stays consistent.
            st.need_flush = false;
            return Ok(z.pages);
        }
        let took = hw.cmdq.wait(seq, how)?;
        bump(&self.stats.sync_waits, 1);
        let ns = took.as_nanos().max(0) as u64;
        bump(&self.stats.sync_wait_ns, ns);
        self.stats.sync_wait_max_ns.fetch_max(ns, Ordering::Relaxed);
        st.need_flush = false;
        self.free_deferred(st);
        r.map(|()| z.pages)
    }

    fn free_deferred(&self, st: &mut PtState) {
        for i in 0..st.ndeferred {
            self.pool().free(st.deferred[i]);
        }
        st.pages -= st.ndeferred as u64;
        st.ndeferred = 0;
    }

    /// Frees every table below `table` (a table at `level`), not `table` itself.
    fn free_tree(&self, st: &mut PtState, table: PtPage, level: u32) -> Result {
        if level == 1 {
            return Ok(());
        }
        for i in 0..ENTRIES {
            let e = self.pool().read(table, i)?;
            if e & pte::PTE_P != 0 && e & pte::PTE_PS == 0 {
                let child = self.pool().page_at(e & pte::PTE_ADDR_MASK)?;
                self.free_tree(st, child, level - 1)?;
                self.pool().write(table, i, 0)?;
                self.pool().free(child);
                st.pages -= 1;
            }
        }
        Ok(())
    }

    /// Disables the context on the device and drops every mapping: the device can no longer
    /// reach this address space when this returns (or the device is gone). `flags` is what the
    /// context entry says afterwards (0, or `CTX_MM_RELEASED` so that the validator flags any
    /// later use); it is written only once the device confirmed the context is off, since the
    /// validator reads it uncached and DMA still in flight before the SYNC is legal.
    fn disable(&self, st: &mut PtState, flags: u64) -> Result {
        let hw = &self.shared.hw;
        hw.write_ctx(self.asid, &pte::ContextEntry::default())?;
        let cfgi = cmd::Command::new(cmd::CMD_CFGI_CTX, 0, self.asid, 0, 0);
        let r = self.shootdown(st, 0, pte::VA_LIMIT, Wait::Sleep, Some(cfgi));
        if r.is_ok() && flags != 0 {
            hw.write_ctx(
                self.asid,
                &pte::ContextEntry {
                    flags,
                    ..Default::default()
                },
            )?;
        }
        if r.is_err() {
            // The device did not confirm (SYNC timeout, queue error): it might still walk the
            // tables, so they are leaked rather than reused (the leak report at unload says so).
            st.leaked = true;
            return r.map(|_| ());
        }
        // With the context invalid and its translations flushed, no walk can reach the tables.
        let root = st.root;
        self.free_tree(st, root, pte::PT_LEVELS)
    }

    /// File close: disable the context, wait for its queued jobs, give the ASID back.
    pub(crate) fn shutdown(&self) {
        let shared = &self.shared;
        shared.unpublish(self.asid);
        {
            let mut st = self.state.lock();
            if let Err(e) = self.disable(&mut st, 0) {
                pr_err!("asid {}: disable failed: {:?}\n", self.asid, e);
            }
            st.released = true;
        }
        if self.set_lag.load(Ordering::Relaxed) {
            shared.set_cmd_lag(0);
        }
        // A job queued by a task that was interrupted still names this ASID: the ASID may be
        // reused only once it is gone (it ends quickly: the context is invalid).
        match shared.hw.jobs.wait_idle(&shared.bar, self.asid) {
            Ok(()) => {
                shared.free_asid(self.asid);
                self.asid_released.store(true, Ordering::Relaxed);
            }
            Err(_) => pr_err!("asid {}: jobs did not drain, ASID leaked\n", self.asid),
        }
    }

    /// Records what the event thread saw for this ASID.
    pub(crate) fn on_event(&self, e: &ev::Event) {
        match e.ty {
            ev::EVT_FAULT => bump(&self.stats.faults, 1),
            ev::EVT_VIOLATION => {
                if let Some(c) = self.stats.violations.get(e.reason as usize) {
                    let n = c.fetch_add(1, Ordering::Relaxed);
                    if n < VIOLATIONS_LOGGED {
                        pr_warn!(
                            "asid {}: validator: {} violation at va {:#x}: device used pa {:#x}, cpu maps {:#x}\n",
                            self.asid,
                            ev::violation_name(e.reason),
                            e.va,
                            e.info,
                            e.info2
                        );
                    }
                }
            }
            _ => {}
        }
    }

    /// Records that job `id` was aborted because its fault could not be served.
    pub(crate) fn record_abort(&self, id: u64, err: Error) {
        self.abort_errno
            .store(err.to_errno().into(), Ordering::Relaxed);
        self.abort_job.store(id, Ordering::Release);
    }

    /// The error recorded for job `id`, if any.
    pub(crate) fn abort_error(&self, id: u64) -> Option<Error> {
        if self.abort_job.load(Ordering::Acquire) == id {
            let e = self.abort_errno.load(Ordering::Relaxed) as i32;
            return Some(Error::from_errno(e));
        }
        None
    }

    pub(crate) fn count_job(&self) {
        bump(&self.stats.dma_jobs, 1);
    }

    pub(crate) fn count_fault_result(&self, ok: bool) {
        bump(
            if ok {
                &self.stats.faults_resolved
            } else {
                &self.stats.faults_aborted
            },
            1,
        );
    }

    /// Whether the address space is gone.
    pub(crate) fn released(&self) -> bool {
        self.state.lock().released
    }

    /// The enabled context entry: valid, stalling, `extra` flags, the CPU root of `mm`.
    fn entry(&self, root: PtPage, mm: &kernel::mm::Mm, extra: u64) -> Result<pte::ContextEntry> {
        let la57 = if self.la57 { pte::CTX_CPU_LA57 } else { 0 };
        Ok(pte::ContextEntry {
            flags: pte::CTX_VALID | pte::CTX_STALL | la57 | extra,
            pt_root: self.pool().addr(root)?,
            cpu_root: mm::pgd_phys(mm),
            reserved: 0,
        })
    }

    /// `CTX_VALIDATE` unless `ZG_DBG_NO_VALIDATE` is on.
    fn validate_flag(&self) -> u64 {
        if self.injected(uapi::ZG_DBG_NO_VALIDATE) {
            0
        } else {
            pte::CTX_VALIDATE
        }
    }

    /// This context's counters.
    pub(crate) fn stats(&self) -> uapi::ZgStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        let (released, pages) = {
            let st = self.state.lock();
            (st.released, st.pages)
        };
        uapi::ZgStats {
            asid: self.asid,
            flags: if released { uapi::ZG_STATS_RELEASED } else { 0 },
            invalidations: l(&s.invalidations),
            invalidations_empty: l(&s.invalidations_empty),
            invalidations_nonblock_failed: l(&s.nonblock_failed),
            pages_zapped: l(&s.pages_zapped),
            inv_range_cmds: l(&s.inv_range_cmds),
            inv_asid_cmds: l(&s.inv_asid_cmds),
            sync_waits: l(&s.sync_waits),
            sync_wait_ns: l(&s.sync_wait_ns),
            sync_wait_max_ns: l(&s.sync_wait_max_ns),
            populates: l(&s.populates),
            populate_retries: l(&s.populate_retries),
            pages_mapped: l(&s.pages_mapped),
            huge_mapped: l(&s.huge_mapped),
            faults: l(&s.faults),
            faults_resolved: l(&s.faults_resolved),
            faults_aborted: l(&s.faults_aborted),
            dma_jobs: l(&s.dma_jobs),
            violations: core::array::from_fn(|i| l(&s.violations[i])),
            device_violations: self.shared.device_stat(crate::abi::regs::STAT_VIOLATIONS),
            pt_pages: pages,
            reserved: [0; 6],
        }
    }
}

#[pinned_drop]
impl PinnedDrop for Mirror {
    fn drop(self: Pin<&mut Self>) {
        // Reached after `shutdown` (tables freed, device context disabled) or when creation
        // failed before the device saw the context: either way the device cannot reach the root.
        let (root, leaked) = {
            let st = self.state.lock();
            (st.root, st.leaked)
        };
        if !leaked {
            self.pool().free(root);
        }
        if !self.asid_released.load(Ordering::Relaxed) && !self.state.lock().released {
            self.shared.free_asid(self.asid);
        }
    }
}

impl IntervalInvalidate for Mirror {
    fn invalidate(
        &self,
        sub: &IntervalNotifier<Self>,
        range: &NotifierRange<'_>,
        cur_seq: u64,
    ) -> bool {
        bump(&self.stats.invalidations, 1);
        let how = if range.blockable() {
            Wait::Sleep
        } else {
            Wait::Spin
        };
        let mut st = if how == Wait::Sleep {
            self.state.lock()
        } else {
            match self.state.try_lock() {
                Some(g) => g,
                None => {
                    bump(&self.stats.nonblock_failed, 1);
                    return false;
                }
            }
        };
        sub.set_seq(cur_seq);
        let event = range.event();
        let skip = self.injected(uapi::ZG_INJ_SKIP_SHOOTDOWN)
            || (self.injected(uapi::ZG_INJ_KEEP_WRITE)
                && matches!(
                    event,
                    NotifierEvent::ProtectionVma | NotifierEvent::ProtectionPage
                ));
        if st.released || skip {
            return true;
        }
        if event == NotifierEvent::Release {
            st.released = true;
            if self.injected(uapi::ZG_INJ_KEEP_AFTER_RELEASE) {
                // Bug on purpose: tell the validator the mm is gone, leave the context enabled.
                let flags = self.validate_flag() | pte::CTX_MM_RELEASED;
                if let Ok(entry) = self.entry(st.root, range.mm(), flags) {
                    let _ = self.shared.hw.write_ctx(self.asid, &entry);
                }
                return true;
            }
            if let Err(e) = self.disable(&mut st, pte::CTX_MM_RELEASED) {
                pr_err!("asid {}: release failed: {:?}\n", self.asid, e);
            }
            return true;
        }
        let (s, e) = (range.start() as u64, range.end() as u64);
        match self.shootdown(&mut st, s, e, how, None) {
            Ok(_) => true,
            Err(e) if how == Wait::Spin => {
                // Nothing slept; the PTEs may be cleared already (need_flush covers it).
                let _ = e;
                bump(&self.stats.nonblock_failed, 1);
                false
            }
            Err(e) => {
                // A blockable callback must not fail; the device is wedged (SYNC timeout).
                pr_err!("asid {}: shootdown failed: {:?}\n", self.asid, e);
                true
            }
        }
    }
}

/// What an `hmm_range_fault()` pass over `ctx` needs: a user reference on its mm (`EINVAL` once
/// the process is gone) and room for one 2 MiB block of entries (allocated here, outside locks).
fn walk_setup(ctx: &Context) -> Result<(ARef<MmWithUserAsync>, KVec<HmmPfn>)> {
    let mm = ctx.mm().mmget_not_zero().ok_or(EINVAL)?;
    // A worker may hold the last user reference when the process exits: drop it asynchronously
    // so that exit_mmap() (and our Release callback) does not run in the worker.
    let mm = MmWithUser::into_mmput_async(mm);
    let mut pfns = KVec::with_capacity(ENTRIES, GFP_KERNEL)?;
    for _ in 0..ENTRIES {
        pfns.push(HmmPfn::EMPTY, GFP_KERNEL)?;
    }
    Ok((mm, pfns))
}

/// The end of the 2 MiB block holding `s`, capped at `end`: the unit of one populate pass.
fn block_end(s: u64, end: u64) -> u64 {
    end.min((s & !(HUGE - 1)) + HUGE)
}

/// Mirrors `[start, end)` (page aligned, inside the context's interval) into the device, with
/// write intent if `write`.
pub(crate) fn populate(
    ctx: &Context,
    start: u64,
    end: u64,
    write: bool,
    out: &mut MapOut,
) -> Result {
    let (mm, mut pfns) = walk_setup(ctx)?;
    let request = if write {
        HmmRequest::Write
    } else {
        HmmRequest::Read
    };
    let mut s = start;
    while s < end {
        let e = block_end(s, end);
        let n = ((e - s) / PAGE) as usize;
        let pfns = &mut pfns[..n];
        let deadline = Instant::<Monotonic>::now();
        loop {
            if deadline.elapsed() > POPULATE_TIMEOUT {
                return Err(EBUSY);
            }
            bump(&ctx.stats.populates, 1);
            let seq = ctx.read_begin();
            match ctx.hmm_range_fault(&mm, s as usize, e as usize, request, seq, pfns)? {
                FaultOutcome::Busy => {
                    out.retries += 1;
                    bump(&ctx.stats.populate_retries, 1);
                    continue;
                }
                FaultOutcome::Done => {}
            }
            let ignore_retry = ctx.injected(uapi::ZG_INJ_IGNORE_RETRY);
            if ignore_retry {
                // Widen the window so that tests reliably land an invalidation in it.
                fsleep(Delta::from_millis(4));
            }
            let mut st = ctx.state.lock();
            if st.released {
                return Err(EINVAL);
            }
            if !ignore_retry && ctx.read_retry(seq) {
                drop(st);
                out.retries += 1;
                bump(&ctx.stats.populate_retries, 1);
                continue;
            }
            let (p0, h0) = (out.pages, out.huge);
            ctx.commit(&mut st, s, e, pfns, write, out)?;
            bump(&ctx.stats.pages_mapped, out.pages - p0);
            bump(&ctx.stats.huge_mapped, out.huge - h0);
            break;
        }
        s = e;
    }
    Ok(())
}

/// One `ZG_SNAP_*` byte per page of `[start, start + out.len() * 4096)`.
pub(crate) fn snapshot(ctx: &Context, start: u64, out: &mut [u8]) -> Result {
    let end = start + out.len() as u64 * PAGE;
    // CPU side first (takes the mmap lock; no context lock held).
    let (mm, mut pfns) = walk_setup(ctx)?;
    let mut s = start;
    while s < end {
        let e = block_end(s, end);
        let n = ((e - s) / PAGE) as usize;
        let first = ((s - start) / PAGE) as usize;
        let pf = &mut pfns[..n];
        let seq = ctx.read_begin();
        // A snapshot is advisory: a concurrent invalidation just makes it a bit stale.
        let _ = ctx.hmm_range_fault(&mm, s as usize, e as usize, HmmRequest::Snapshot, seq, pf)?;
        for (i, p) in pf.iter().enumerate() {
            let mut b = 0;
            if p.error() {
                b |= uapi::ZG_SNAP_CPU_ERROR;
            } else if p.valid() {
                b |= uapi::ZG_SNAP_CPU_VALID;
                if p.write() {
                    b |= uapi::ZG_SNAP_CPU_WRITE;
                }
                if p.map_order() >= 9 {
                    b |= uapi::ZG_SNAP_CPU_HUGE;
                }
            }
            if let Some(o) = out.get_mut(first + i) {
                *o = b;
            }
        }
        s = e;
    }
    let mut st = ctx.state.lock();
    for (i, o) in out.iter_mut().enumerate() {
        let va = start + i as u64 * PAGE;
        let Some(l2) = ctx.l2(&mut st, va, false)? else {
            continue;
        };
        let l2e = ctx.pool().read(l2, pte::pt_index(va, 2))?;
        let (leaf, huge) = if l2e & pte::PTE_P == 0 {
            continue;
        } else if l2e & pte::PTE_PS != 0 {
            (l2e, true)
        } else {
            let l1 = ctx.pool().page_at(l2e & pte::PTE_ADDR_MASK)?;
            (ctx.pool().read(l1, pte::pt_index(va, 1))?, false)
        };
        if leaf & pte::PTE_P != 0 {
            *o |= uapi::ZG_SNAP_DEV_PRESENT;
            if leaf & pte::PTE_W != 0 {
                *o |= uapi::ZG_SNAP_DEV_WRITE;
            }
            if huge {
                *o |= uapi::ZG_SNAP_DEV_HUGE;
            }
            if leaf & pte::PTE_D != 0 {
                *o |= uapi::ZG_SNAP_DEV_DIRTY;
            }
        }
    }
    Ok(())
}

/// Enables injected bugs and debug modes (and sets the device's command lag). Switching
/// `ZG_DBG_NO_VALIDATE` rewrites the context entry and reloads it on the device.
pub(crate) fn set_inject(ctx: &Context, modes: u32, cmd_lag: u32) -> Result {
    let old = ctx.inject.swap(modes, Ordering::Relaxed);
    ctx.shared.set_cmd_lag(cmd_lag);
    ctx.set_lag.store(cmd_lag != 0, Ordering::Relaxed);
    if (old ^ modes) & uapi::ZG_DBG_NO_VALIDATE == 0 {
        return Ok(());
    }
    let st = ctx.state.lock();
    if st.released {
        return Err(EINVAL);
    }
    let entry = ctx.entry(st.root, ctx.mm(), ctx.validate_flag())?;
    let hw = &ctx.shared.hw;
    hw.write_ctx(ctx.asid, &entry)?;
    let cfgi = [cmd::Command::new(cmd::CMD_CFGI_CTX, 0, ctx.asid, 0, 0)];
    let seq = hw.cmdq.post(&ctx.shared.bar, &cfgi, true, Wait::Sleep)?;
    hw.cmdq.wait(seq, Wait::Sleep).map(|_| ())
}

/// Serves one device fault of `ctx`: maps the page with the access type.
pub(crate) fn serve_fault(ctx: &Context, va: u64, write: bool) -> Result {
    if va >= pte::VA_LIMIT {
        return Err(EFAULT);
    }
    let page = va & !(PAGE - 1);
    let mut out = MapOut::default();
    populate(ctx, page, page + PAGE, write, &mut out)
}
