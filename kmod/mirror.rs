// SPDX-License-Identifier: GPL-2.0

//! Contexts: one per open file, mirroring the opener's address space into one device ASID.
//!
//! The mirror follows `lib/test_hmm.c` with a real device behind it:
//!
//! - **Populate** ([`populate`]): `mmu_interval_read_begin()` -> `hmm_range_fault()` (mmap read
//!   lock) -> context lock -> `mmu_interval_read_retry()` -> write device PTEs, in 2 MiB blocks,
//!   with a 2 MiB device entry where the CPU maps 2 MiB.
//! - **Shootdown** ([`Mirror::invalidate`]): context lock -> `mmu_interval_set_seq()` -> clear the
//!   device PTEs, or only make them read-only for the write-protects that keep pages mapped
//!   (`Change::for_event`: fork's COW, mkclean, soft-dirty) -> `CMD_INV_RANGE` (or
//!   `CMD_INV_ASID` above [`INV_ASID_THRESHOLD`] pages) + SYNC ->
//!   wait for the SYNC, or for the fence if the device fails meanwhile
//!   ([`crate::device::Shared::sync`]). Tables emptied at any level are detached and freed only
//!   after that.
//! - **Device faults** ([`on_event`]): the event interrupt queues a stalled fault on its
//!   context; the context's own work item (one at a time per context, on the driver's own
//!   workqueue, [`crate::fault_queue`], drained before the module goes) serves it with the unlocked
//!   `hmm_range_fault()` variant, which lets a userfaultfd handler resolve the fault, and
//!   answers RESUME or ABORT. A fault that blocks holds up only its own context and its own
//!   job: once it is `job_timeout_ms` old, whichever job waiter sees it first aborts it
//!   (`ETIMEDOUT`), and the waiters of other jobs queued behind it do not blame the device
//!   meanwhile ([`crate::device::Shared::device_waits_for_driver`]). Closing the file aborts
//!   its faults at once. A fault that keeps coming back for the same job, page and access with
//!   nothing invalidated in between is aborted (`EFAULT`) after [`FRUITLESS_FAULT_REPEATS`]
//!   services instead of livelocking the device; one whose service keeps colliding with
//!   invalidations gives up after [`FAULT_MAX_RETRIES`] walks, and one already answered
//!   (aborted) stops at its next walk.
//! - **Release** (the `Release` event, and file close): disable the context on the device
//!   (`CFGI_CTX` + `CMD_INV_ASID` + SYNC) before anything is freed. An ASID whose teardown the
//!   device did not confirm (it was fenced instead) is quarantined, never reused. Only then does
//!   the release mark the entry `CTX_MM_RELEASED`: the device walks check that no cached copy
//!   of the entry outlived the `CFGI_CTX` (`ctx_released`).
//!
//! # Dirty pages
//!
//! A device that writes a page must leave it dirty in the kernel's eyes, or reclaim discards
//! (lazyfree, clean swap cache) or never writes back (a cleaned file page) what it wrote:
//! `hmm_range_fault()` does not fault a writable, clean CPU PTE, so nothing else dirties it.
//! The driver marks the page dirty when a device leaf whose D bit is set goes: cleared by a zap,
//! write-protected, replaced ([`leaf_dropped`]), or freed with a table detached whole, after
//! the SYNC ([`Mirror::free_deferred`]), and a 2 MiB leaf's D is carried into the 4 KiB entries
//! it is split into. That marks exactly the pages the device wrote (not, as RDMA ODP does at
//! unmap, every page it could write: a lazyfree page in a write fault's window stays
//! discardable), and it is race-free because every update of a live leaf is an atomic swap,
//! AND or OR on the word the device sets A/D in, and the device's walk starts again when its
//! A/D update finds the entry changed: a D the driver's swap did not return is never followed
//! by a write. It happens in the invalidation callback, before the kernel changes the CPU PTE,
//! so the folio is still mapped, and before the kernel looks at the dirty flag (reclaim after
//! unmapping, writeback after `folio_mkclean()`).
//!
//! # Device addresses
//!
//! A device leaf holds the page's DMA address from the block's `hmm_dma_map` ([`crate::dmamap`]),
//! which is unmapped only once the device flushed the leaf: after the shootdown's SYNC
//! ([`Mirror::release_dma`]), at close, or at unbind ([`Context::unmap_for_unbind`]). Dirty
//! marking finds the page through the same map.
//!
//! # Locks
//!
//! A context's lock (`Mirror::state`) is "the driver lock" of [`kernel::mm::mmu_notifier`]: it is taken in the
//! invalidation callback, under the mm's locks, so nothing under it allocates with `GFP_KERNEL`
//! or enters the mm (table pages come from the preallocated [`crate::hw::PtPool`]; the list of
//! tables to free after a SYNC has its room reserved at open, a block's DMA map is allocated
//! before it is taken). Under it: the pool spinlock, the command queue locks, and the fence
//! mutex when a SYNC fails; it frees DMA maps (unmapping) but never allocates one. `Mirror::faults` is a spinlock
//! taken alone, or under `Shared::asids` (the overdue-fault sweep).
//!
//! # Bounds
//!
//! A context holds at most `max_pt_pages` table pages (module parameter; `ENOMEM` beyond) and a
//! process at most `max_contexts` contexts (`EBUSY` beyond), so that one process cannot take the
//! pool or the ASIDs from everyone else.

use crate::abi::{cmd, event as ev, pte, testing, uapi};
use crate::device::Shared;
use crate::dmamap::{DeviceBlock, DmaBlocks};
use crate::hw::{job_timeout, BounceSlot, PtPage, PtRef, Synced, Wait};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use kernel::hmm::{self, FaultOutcome, Pfn as HmmPfn, Request as HmmRequest};
use kernel::mm::mmu_notifier::{Aging, AgingNotifier, IntervalInvalidate, IntervalNotifier};
use kernel::mm::mmu_notifier::{NotifierEvent, NotifierRange};
use kernel::{
    mm::{MmWithUser, MmWithUserAsync},
    new_mutex, new_spinlock,
    prelude::*,
    sync::aref::ARef,
    sync::{Arc, Mutex, SpinLock},
    time::{delay::fsleep, msecs_to_jiffies, Delta, Instant, Monotonic},
};

/// Pages above which one invalidation flushes the whole ASID instead of a range (SMMUv3's
/// `CMDQ_MAX_TLBI_OPS` heuristic).
pub(crate) const INV_ASID_THRESHOLD: u64 = 512;
/// A populate that keeps colliding with invalidations gives up with `EBUSY` after this long.
const POPULATE_TIMEOUT_MS: u32 = 2000;
/// A fault service (whose walks may wait in fault handlers, which the time bound does not
/// count) gives up with `EBUSY` after this many walks of one block that an invalidation
/// overtook: the interval is the whole address space, so any `munmap` in the process makes a
/// walk retry.
const FAULT_MAX_RETRIES: u32 = 256;
/// Violations printed per context (the rest are only counted).
const VIOLATIONS_LOGGED: u64 = 8;
/// Stalled faults a context can have queued (the device runs one job at a time, so one is
/// the usual number; beyond this they are aborted).
const FAULT_QUEUE: usize = 8;
/// A fault that comes back for the same job, page and access with no invalidation since it
/// was served was not satisfied by its service (a driver bug, or a page the device cannot
/// use): after this many such repeats in a row its job is aborted with `EFAULT` rather than
/// livelocking the device.
const FRUITLESS_FAULT_REPEATS: u32 = 8;

const PAGE: u64 = pte::PAGE_SIZE;
const HUGE: u64 = pte::HUGE_PAGE_SIZE;
const ENTRIES: usize = pte::PT_ENTRIES;

/// Bytes covered by one entry of a table at `level`.
const fn span(level: u32) -> u64 {
    1 << (12 + 9 * (level - 1))
}

/// The most table pages one context may hold (the `max_pt_pages` parameter, at least 4: a
/// root and one path down).
fn max_pt_pages() -> usize {
    (crate::module_parameters::max_pt_pages.value() as usize).max(4)
}

/// A context: the interval notifier with its driver data.
pub(crate) type Context = IntervalNotifier<Mirror>;

/// Page-table state, under the context lock.
struct PtState {
    /// Root (level 4) table; `None` only while the context is being dropped.
    root: Option<PtPage>,
    /// Table pages held, root and `deferred` included.
    pages: usize,
    /// The address space was torn down: nothing is mapped any more, ioctls get `EINVAL`.
    released: bool,
    /// Device PTEs were cleared without a completed invalidation (a non-blockable callback gave
    /// up, or a SYNC was skipped): the next invalidation flushes the ASID whatever it clears.
    need_flush: bool,
    /// Tables detached from the tree, with the address their span starts at, freed after the
    /// next SYNC. Its capacity, reserved at open, is the context's page bound, so pushing never
    /// allocates.
    deferred: KVec<(PtPage, u64)>,
    /// The DMA addresses of the pages the device tables map.
    dma: DmaBlocks,
}

impl PtState {
    fn root(&self) -> Result<PtRef> {
        self.root.as_ref().map(PtPage::id).ok_or(EINVAL)
    }
}

/// One stalled device fault, waiting for its context's work item.
#[derive(Clone, Copy, Default)]
struct Fault {
    va: u64,
    write: bool,
    /// The stall tag to RESUME or ABORT.
    tag: u64,
    /// The job that stalled.
    job: u64,
}

impl Fault {
    /// The same job faulting on the same page for the same access.
    fn same_access(&self, other: &Fault) -> bool {
        self.job == other.job && self.write == other.write && (self.va ^ other.va) < PAGE
    }
}

/// The last fault a context served, to notice one that keeps coming back unchanged.
#[derive(Clone, Copy)]
struct LastServed {
    fault: Fault,
    /// The context's invalidation count when its service finished.
    invalidations: u64,
    /// How many times in a row it came back with no invalidation in between.
    repeats: u32,
}

/// Faults queued for a context's work item, under `Mirror::faults`.
struct FaultQueue {
    pending: [Fault; FAULT_QUEUE],
    head: usize,
    len: usize,
    /// A work item is serving this queue (it stops when the queue is empty).
    serving: bool,
    /// The fault the work item is serving, since when, and whether it was already answered
    /// (aborted for taking too long, or at close): the work item's late answer is then moot.
    current: Option<(Fault, Instant<Monotonic>, bool)>,
    last: Option<LastServed>,
}

impl FaultQueue {
    fn push(&mut self, f: Fault) -> bool {
        if self.len == FAULT_QUEUE {
            return false;
        }
        self.pending[(self.head + self.len) % FAULT_QUEUE] = f;
        self.len += 1;
        true
    }

    fn pop(&mut self) -> Option<Fault> {
        if self.len == 0 {
            return None;
        }
        let f = self.pending[self.head];
        self.head = (self.head + 1) % FAULT_QUEUE;
        self.len -= 1;
        Some(f)
    }
}

/// Counters, readable without the lock (see [`uapi::ZgStats`]).
#[derive(Default)]
struct Stats {
    invalidations: AtomicU64,
    invalidations_empty: AtomicU64,
    nonblock: AtomicU64,
    nonblock_failed: AtomicU64,
    pages_zapped: AtomicU64,
    pages_write_protected: AtomicU64,
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
    /// Pages mapped by served faults (fault-around included).
    fault_pages: AtomicU64,
    dma_jobs: AtomicU64,
    violations: [AtomicU64; uapi::ZG_VIOL_CLASSES],
    /// Aging queries answered "young", and device accessed bits cleared.
    aging_young: AtomicU64,
    aging_cleared: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The driver side of a context.
///
/// # Invariants
///
/// - `asid` is allocated to this context in [`Shared`]'s ASID table from creation until
///   [`Mirror::shutdown`] freed or quarantined it (`asid_done`), or until drop.
/// - Every table page reachable from `state.root` (and the root itself) is owned by this
///   context, and freed only once the device can no longer reach it.
#[pin_data(PinnedDrop)]
pub(crate) struct Mirror {
    /// Answers reclaim's and idle tracking's aging queries from the device PTEs' accessed
    /// bits; registered by [`open`], unregistered by [`Mirror::close_device`]. The first field,
    /// so that if nothing unregistered it, its drop does before any field it reads is gone.
    #[pin]
    aging: AgingNotifier<Mirror>,
    shared: Arc<Shared>,
    pub(crate) asid: u32,
    /// Whether the CPU page table has 5 levels (for the validator's walk).
    la57: bool,
    #[pin]
    state: Mutex<PtState>,
    #[pin]
    faults: SpinLock<FaultQueue>,
    stats: Stats,
    /// `ZG_INJ_*` bugs enabled on this context.
    inject: AtomicU32,
    /// This context set device test knobs (reset on close).
    set_knobs: AtomicBool,
    /// `ZgInject::populate_lag`: microseconds each populate sleeps between walk and commit.
    populate_lag: AtomicU32,
    /// The last fault the driver could not serve: its job id and errno in one word
    /// ([`abort_word`]), so that a waiter never pairs one job with another's errno.
    abort: AtomicU64,
    /// The ASID was freed or quarantined (see `shutdown`).
    asid_done: AtomicBool,
    /// The context's DMA maps have no spare: the next populate allocates one before it takes
    /// the context lock (a hint; a populate that finds none allocates and walks again).
    wants_dma_spare: AtomicBool,
    /// The context's READ/WRITE bounce buffer.
    #[pin]
    pub(crate) bounce: BounceSlot,
}

/// What one populate wrote.
#[derive(Default)]
pub(crate) struct MapOut {
    pub(crate) retries: u32,
    pub(crate) pages: u64,
    pub(crate) huge: u64,
    /// For [`Access::Around`]`(page)`: the end of the run of pages after `page` that the CPU
    /// maps to the shared zero page (never written, so write intent there breaks no COW).
    pub(crate) zero_after: u64,
}

/// What a populate maps for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Read: entries are read-only.
    Read,
    /// Write: entries are writable (the CPU's are made writable and dirty first).
    Write,
    /// The window around a device write fault at this page: faulted for read (so that only
    /// the page the device writes, faulted on its own with [`Access::Write`], is COW-broken or
    /// `page_mkwrite`d), entries writable where the CPU's already are.
    Around(u64),
}

impl Access {
    /// Whether entries may be writable (where the CPU's are).
    fn write(self) -> bool {
        self != Self::Read
    }

    /// What `hmm_range_fault()` asks for.
    fn request(self) -> HmmRequest {
        match self {
            Self::Read | Self::Around(_) => HmmRequest::Read,
            Self::Write => HmmRequest::Write,
        }
    }
}

/// What an invalidation does to the device PTEs of its range.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Clear them: the pages may go away or change.
    Clear,
    /// Make them read-only: the kernel only write-protects pages that stay mapped.
    WriteProtect,
}

impl Change {
    /// Write-protect for the events that only take write permission from pages that stay
    /// mapped at the same frames (7.3: `MMU_NOTIFY_PROTECTION_PAGE` from fork's COW
    /// `copy_page_range()`, writeback's `folio_mkclean()` and the dirty-tracking helpers;
    /// `MMU_NOTIFY_SOFT_DIRTY` from `clear_refs`). Everything else clears, including
    /// `MMU_NOTIFY_PROTECTION_VMA` (mprotect, NUMA hinting, userfaultfd write-protect), which
    /// may remove read access too and does not say so.
    fn for_event(event: NotifierEvent) -> Self {
        match event {
            NotifierEvent::ProtectionPage | NotifierEvent::SoftDirty => Self::WriteProtect,
            _ => Self::Clear,
        }
    }
}

struct Zap {
    start: u64,
    end: u64,
    /// 4 KiB pages whose device PTEs were cleared.
    pages: u64,
    /// The span of the cleared entries (for `INV_RANGE`), valid when `pages > 0`.
    lo: u64,
    hi: u64,
}

impl Zap {
    fn new(start: u64, end: u64) -> Self {
        Self {
            start,
            end: end.min(pte::VA_LIMIT),
            pages: 0,
            lo: 0,
            hi: 0,
        }
    }

    fn add(&mut self, lo: u64, hi: u64, pages: u64) {
        if self.pages == 0 {
            (self.lo, self.hi) = (lo, hi);
        } else {
            self.lo = self.lo.min(lo);
            self.hi = self.hi.max(hi);
        }
        self.pages += pages;
    }

    fn covers(&self, lo: u64, hi: u64) -> bool {
        self.start <= lo && hi <= self.end
    }
}

/// Creates the context of a file being opened by the current task: an ASID, a root table, the
/// interval notifier over the whole device-addressable range, and the enabled context entry.
pub(crate) fn open(shared: &Arc<Shared>) -> Result<Arc<Context>> {
    shared.check_live()?;
    let task = kernel::current!();
    let mm = task.mm().ok_or(EINVAL)?;
    let max_ctx = crate::module_parameters::max_contexts.value().max(1) as usize;
    let asid = shared.alloc_asid(mm.as_raw() as usize, max_ctx)?;
    let data = match new_mirror(shared, asid) {
        Ok(data) => data,
        Err(e) => {
            shared.free_asid(asid);
            return Err(e);
        }
    };
    // On failure `data` is dropped, and with it the root page and the ASID.
    let ctx = Arc::pin_init(
        Context::insert(mm, 0, pte::VA_LIMIT as usize, data),
        GFP_KERNEL,
    )?;
    enable(&ctx)?;
    let mirror: &Mirror = &ctx;
    // SAFETY: `aging` is the first field of `mirror`, which is pinned in the context's `Arc`:
    // `shutdown` unregisters it, or else its drop does, before any other field goes.
    if let Err(e) = unsafe { mirror.aging.register(mirror, mm) } {
        ctx.shutdown();
        return Err(e);
    }
    Ok(ctx)
}

/// The initializer of a context's driver data (allocations happen here, outside any lock).
fn new_mirror(shared: &Arc<Shared>, asid: u32) -> Result<impl PinInit<Mirror, Error>> {
    let deferred = KVec::with_capacity(max_pt_pages(), GFP_KERNEL)?;
    let root = shared.hw.pool.alloc()?.ok_or(ENOMEM)?;
    let state = PtState {
        root: Some(root),
        pages: 1,
        released: false,
        need_flush: false,
        deferred,
        dma: DmaBlocks::new(),
    };
    let queue = FaultQueue {
        pending: [Fault::default(); FAULT_QUEUE],
        head: 0,
        len: 0,
        serving: false,
        current: None,
        last: None,
    };
    let shared = shared.clone();
    Ok(try_pin_init!(Mirror {
        aging <- AgingNotifier::new(),
        shared,
        asid,
        la57: kernel::mm::pgtable_levels() == 5,
        state <- new_mutex!(state, "zapguard_ctx"),
        faults <- new_spinlock!(queue, "zapguard_faults"),
        stats: Stats::default(),
        inject: AtomicU32::new(0),
        set_knobs: AtomicBool::new(false),
        populate_lag: AtomicU32::new(0),
        abort: AtomicU64::new(u64::MAX),
        asid_done: AtomicBool::new(false),
        wants_dma_spare: AtomicBool::new(true),
        bounce <- BounceSlot::new(),
    }? Error))
}

/// What a context's owner does with it beyond its [`Mirror`]: an extension trait, as the context is
/// the kernel's [`IntervalNotifier`] type.
pub(crate) trait ContextShutdown {
    /// File close: takes the context off the device ([`Mirror::close_device`]), then removes
    /// the interval notifier, so that nothing calls into the driver for this address space
    /// any more even if a fault work item still holds the context for a while.
    fn shutdown(&self);
}

impl ContextShutdown for Context {
    fn shutdown(&self) {
        self.close_device();
        self.remove();
    }
}

impl Mirror {
    /// Unbind, after the fence: clears every device PTE (marking the pages the device wrote
    /// dirty) and unmaps every page for DMA. The tables stay until the file closes.
    pub(crate) fn unmap_for_unbind(&self) {
        let mut st = self.state.lock();
        if st.root.is_some() {
            let _ = self.shootdown(&mut st, 0, pte::VA_LIMIT, Wait::Sleep, &[], Change::Clear);
        }
        st.dma.clear();
    }
}

/// Writes the context entry and loads it on the device: `CFGI_CTX` + `INV_ASID` (the ASID's
/// previous owner may have left IOTLB entries behind) + SYNC; then events reach it.
fn enable(ctx: &Arc<Context>) -> Result {
    let entry = {
        let st = ctx.state.lock();
        ctx.entry(st.root()?, ctx.mm(), ctx.no_validate_flag())?
    };
    ctx.shared.hw.write_ctx(ctx.asid, &entry)?;
    match ctx.shared.sync(&ctx.load_cmds()) {
        Synced::Done(_) => ctx.shared.publish(ctx.asid, ctx.clone()),
        Synced::Fenced => {
            // Nothing can reach the tables; the ASID stays out of reuse.
            ctx.shared.quarantine_asid(ctx.asid);
            ctx.asid_done.store(true, Ordering::Relaxed);
            Err(ctx.shared.failure_error())
        }
    }
}

impl Mirror {
    fn pool(&self) -> &crate::hw::PtPool {
        &self.shared.hw.pool
    }

    /// The test knob that widens a populate's window between walk and commit; compiled out
    /// unless the module is built with `ZAPGUARD_TEST=1`.
    fn populate_lag(&self) {
        if !cfg!(zapguard_test) {
            return;
        }
        let us = self.populate_lag.load(Ordering::Relaxed);
        if us > 0 {
            fsleep(Delta::from_micros(us.into()));
        }
    }

    /// Whether injected bug `mode` is on; always `false` (and the branches it guards compiled
    /// out) unless the module is built with `ZAPGUARD_TEST=1`.
    pub(crate) fn injected(&self, mode: u32) -> bool {
        cfg!(zapguard_test) && self.inject.load(Ordering::Relaxed) & mode != 0
    }

    /// The commands that make the device (re)load this context's entry and forget its ASID.
    fn load_cmds(&self) -> [cmd::Command; 2] {
        [
            cmd::Command::new(cmd::CMD_CFGI_CTX, 0, self.asid, 0, 0),
            cmd::Command::new(cmd::CMD_INV_ASID, 0, self.asid, 0, 0),
        ]
    }

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
    fn child(
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
    fn l2_table(&self, st: &mut PtState, va: u64, alloc: bool) -> Result<Option<PtRef>> {
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
    fn commit(
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
    fn age_table(&self, root: PtRef, z: &mut Zap, clear: bool) -> Result<bool> {
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
    fn shootdown(
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
    fn release_dma(&self, st: &mut PtState, start: u64, end: u64) {
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
    fn invalidation(&self, z: &Zap, flush_all: bool) -> cmd::Command {
        if flush_all || z.pages == 0 {
            bump(&self.stats.inv_asid_cmds, 1);
            cmd::Command::new(cmd::CMD_INV_ASID, 0, self.asid, 0, 0)
        } else {
            bump(&self.stats.inv_range_cmds, 1);
            cmd::Command::new(cmd::CMD_INV_RANGE, 0, self.asid, z.lo, z.hi - z.lo)
        }
    }

    /// Frees the tables detached before the SYNC that just completed (or the fence). A level-1
    /// table detached whole still holds its leaves: their D bits are final only now (a walk
    /// that read the table before it was detached could set one until the SYNC), so the pages
    /// of those set are marked dirty here, still inside the invalidation callback.
    fn free_deferred(&self, st: &mut PtState) {
        while let Some((page, base)) = st.deferred.pop() {
            if self.pool().present(page.id()).unwrap_or(0) > 0 {
                for idx in 0..ENTRIES {
                    let old = self.pool().read(page.id(), idx).unwrap_or(0);
                    leaf_dropped(&mut st.dma, base + idx as u64 * PAGE, old);
                }
            }
            self.pool().free(page);
            st.pages -= 1;
        }
    }

    /// Frees every table below `table` (a table at `level`), not `table` itself. Only once the
    /// device can no longer reach any of them.
    fn free_tree(&self, st: &mut PtState, table: PtRef, level: u32) -> Result {
        if level == 1 {
            return Ok(());
        }
        for i in 0..ENTRIES {
            if let Some(child) = self.pool().detach(table, i)? {
                self.free_tree(st, child.id(), level - 1)?;
                self.pool().free(child);
                st.pages -= 1;
            }
        }
        Ok(())
    }

    /// Disables the context on the device and drops every mapping: the device can no longer
    /// reach this address space when this returns (it confirmed, or it is fenced). `flags` is
    /// what the context entry says afterwards (0, or `CTX_MM_RELEASED` so that the validator
    /// flags any later use); it is written only once the device confirmed the context is off,
    /// since the validator reads it uncached and DMA still in flight before the SYNC is legal.
    fn disable(&self, st: &mut PtState, flags: u64) -> Result<Synced> {
        let hw = &self.shared.hw;
        hw.write_ctx(self.asid, &pte::ContextEntry::default())?;
        let load = self.load_cmds();
        let cmds = self.disable_cmds(&load);
        let (_, synced) = self.shootdown(st, 0, pte::VA_LIMIT, Wait::Sleep, cmds, Change::Clear)?;
        let synced = synced.unwrap_or(Synced::Fenced);
        if matches!(synced, Synced::Done(_)) && flags != 0 {
            let entry = pte::ContextEntry {
                flags,
                ..Default::default()
            };
            hw.write_ctx(self.asid, &entry)?;
        }
        // With the context invalid and its translations flushed (or the device fenced), no
        // walk can reach the tables.
        let root = st.root()?;
        self.free_tree(st, root, pte::PT_LEVELS)?;
        st.dma.clear();
        Ok(synced)
    }

    /// File close, device side: disable the context, wait for its queued jobs, then free the
    /// ASID, or quarantine it if the device did not confirm.
    fn close_device(&self) {
        // No aging query may look at the tables once teardown starts.
        self.aging.unregister();
        let shared = &self.shared;
        shared.unpublish(self.asid);
        // Its jobs must not wait for a fault service that may never finish (a userfaultfd
        // nobody answers): they end with ABORT now, and the work item's answer is moot.
        self.abort_all_faults();
        let synced = {
            let mut st = self.state.lock();
            let r = self.disable(&mut st, 0);
            st.released = true;
            r
        };
        #[cfg(zapguard_test)]
        if self.set_knobs.load(Ordering::Relaxed) {
            shared.reset_knobs();
        }
        // A job queued by a task that was killed still names this ASID: the ASID may be reused
        // only once it is gone (it ends quickly: the context is invalid).
        let idle = shared
            .hw
            .jobs
            .wait_idle(&shared.bar, self.asid, &shared.health);
        if idle.is_ok() {
            shared
                .hw
                .jobs
                .forget_bounce(&self.bounce, self.asid, &shared.bar);
        }
        match (synced, idle) {
            (Ok(Synced::Done(_)), Ok(())) => shared.free_asid(self.asid),
            (synced, _) => {
                match synced {
                    Err(e) if !shared.unbound_under(e) => {
                        pr_err!("asid {}: disable failed: {:?}\n", self.asid, e);
                    }
                    _ => {}
                }
                shared.quarantine_asid(self.asid);
            }
        }
        self.asid_done.store(true, Ordering::Relaxed);
    }

    /// Records an event of this context's ASID (counters, violations).
    fn record_event(&self, e: &ev::Event) {
        match e.ty {
            ev::EVT_FAULT => bump(&self.stats.faults, 1),
            ev::EVT_VIOLATION => {
                if let Some(c) = self.stats.violations.get(e.reason as usize) {
                    if c.fetch_add(1, Ordering::Relaxed) < VIOLATIONS_LOGGED {
                        self.log_violation(e);
                    }
                }
            }
            _ => {}
        }
    }

    /// Logs a violation event; `info` is a table's GPA for the walk checks' classes.
    fn log_violation(&self, e: &ev::Event) {
        let name = ev::violation_name(e.reason);
        match e.reason {
            ev::VIOL_TABLE_FREED => pr_warn!(
                "asid {}: validator: {} violation at va {:#x}: walk read freed table {:#x}\n",
                self.asid,
                name,
                e.va,
                e.info
            ),
            ev::VIOL_CTX_RELEASED => pr_warn!(
                "asid {}: validator: {} violation at va {:#x}: walk from root {:#x} through a context cached after its release\n",
                self.asid,
                name,
                e.va,
                e.info
            ),
            _ => pr_warn!(
                "asid {}: validator: {} violation at va {:#x}: device used pa {:#x}, cpu maps {:#x}\n",
                self.asid,
                name,
                e.va,
                e.info,
                e.info2
            ),
        }
    }

    /// Records that job `id` was aborted because its fault could not be served.
    fn record_abort(&self, id: u64, err: Error) {
        self.abort.store(abort_word(id, err), Ordering::Relaxed);
    }

    /// The error recorded for job `id`, if any.
    pub(crate) fn abort_error(&self, id: u64) -> Option<Error> {
        let w = self.abort.load(Ordering::Relaxed);
        if w >> ABORT_ERRNO_BITS == id & ABORT_JOB_MASK {
            let errno = (w & ((1 << ABORT_ERRNO_BITS) - 1)) as i32;
            return Some(Error::from_errno(-errno));
        }
        None
    }

    /// Whether this context's fault in service is older than `job_timeout_ms` and not yet
    /// answered (a page whose fault never completes, a userfaultfd nobody answers).
    pub(crate) fn has_overdue_fault(&self) -> bool {
        let bound = job_timeout();
        matches!(self.faults.lock().current, Some((_, since, false)) if since.elapsed() > bound)
    }

    /// Aborts this context's fault in service if it is overdue ([`Self::has_overdue_fault`]):
    /// that job alone fails with `ETIMEDOUT` once the device retires it, and the device is free
    /// for other jobs; the work item's late answer is ignored.
    pub(crate) fn abort_overdue_fault(&self) {
        let bound = job_timeout();
        let overdue = {
            let mut q = self.faults.lock();
            match q.current.as_mut() {
                Some((f, since, answered)) if !*answered && since.elapsed() > bound => {
                    *answered = true;
                    self.shared.fault_answered();
                    Some(*f)
                }
                _ => None,
            }
        };
        if let Some(f) = overdue {
            pr_warn!(
                "asid {}: fault at {:#x} not served within {} ms: job aborted\n",
                self.asid,
                f.va,
                bound.as_millis()
            );
            self.record_abort(f.job, ETIMEDOUT);
            bump(&self.stats.faults_aborted, 1);
            self.shared.answer_fault(self.asid, f.tag, false);
        }
    }

    /// Answers every fault of this context that is queued or in service with ABORT (`ECANCELED`
    /// for their jobs), so that its jobs end now rather than wait for a fault service that
    /// may never finish (file close: nobody waits for them any more).
    fn abort_all_faults(&self) {
        let current = {
            let mut q = self.faults.lock();
            match q.current.as_mut() {
                Some((f, _, answered)) if !*answered => {
                    *answered = true;
                    Some(*f)
                }
                _ => None,
            }
        };
        if let Some(f) = current {
            self.finish_fault(&f, Err(ECANCELED));
        }
        while let Some(f) = self.faults.lock().pop() {
            self.finish_fault(&f, Err(ECANCELED));
        }
    }

    /// Answers a served (or unservable) fault: RESUME, or ABORT with the reason recorded for
    /// the job's waiter.
    fn finish_fault(&self, f: &Fault, served: Result) {
        if let Err(e) = served {
            self.record_abort(f.job, e);
        }
        self.count_fault_result(served.is_ok());
        self.shared.fault_answered();
        self.shared.answer_fault(self.asid, f.tag, served.is_ok());
    }

    pub(crate) fn count_job(&self) {
        bump(&self.stats.dma_jobs, 1);
    }

    fn count_fault_result(&self, ok: bool) {
        let c = if ok {
            &self.stats.faults_resolved
        } else {
            &self.stats.faults_aborted
        };
        bump(c, 1);
    }

    /// Whether the address space is gone.
    pub(crate) fn released(&self) -> bool {
        self.state.lock().released
    }

    /// The enabled context entry: valid, stalling, `extra` flags; in a test build, the CPU
    /// root of `mm` for the device's validator.
    fn entry(&self, root: PtRef, mm: &kernel::mm::Mm, extra: u64) -> Result<pte::ContextEntry> {
        let la57 = if self.la57 { pte::CTX_CPU_LA57 } else { 0 };
        Ok(pte::ContextEntry {
            flags: pte::CTX_VALID | pte::CTX_STALL | la57 | extra,
            pt_root: self.pool().addr(root)?,
            cpu_root: cpu_root(mm),
            seq: 0,
        })
    }

    /// `CTX_NO_VALIDATE` in a production build (it gives the device no CPU page table to judge
    /// against) and under `ZG_DBG_NO_VALIDATE`; else nothing: a test build's device judges
    /// every access of a context that does not opt out.
    fn no_validate_flag(&self) -> u64 {
        if !cfg!(zapguard_test) || self.injected(testing::ZG_DBG_NO_VALIDATE) {
            pte::CTX_NO_VALIDATE
        } else {
            0
        }
    }

    /// This context's counters.
    pub(crate) fn stats(&self) -> uapi::ZgStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        let (released, pages) = {
            let st = self.state.lock();
            (st.released, st.pages as u64)
        };
        uapi::ZgStats {
            asid: self.asid,
            flags: if released { uapi::ZG_STATS_RELEASED } else { 0 },
            invalidations: l(&s.invalidations),
            invalidations_empty: l(&s.invalidations_empty),
            invalidations_nonblock_failed: l(&s.nonblock_failed),
            invalidations_nonblock: l(&s.nonblock),
            pages_zapped: l(&s.pages_zapped),
            pages_write_protected: l(&s.pages_write_protected),
            aging_young: l(&s.aging_young),
            aging_cleared: l(&s.aging_cleared),
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
            fault_pages: l(&s.fault_pages),
            ..Default::default()
        }
    }

    /// Takes a context whose tables cannot be trusted off the device: its entry is cleared and
    /// reloaded and its ASID flushed (SYNCed, or the device fenced), so no walk uses its tables
    /// any more; its tables are kept (they cannot be walked to be freed), and its calls get
    /// `EINVAL` from now on.
    fn abandon(&self, st: &mut PtState) {
        st.released = true;
        if self
            .shared
            .hw
            .write_ctx(self.asid, &pte::ContextEntry::default())
            .is_err()
        {
            // The entry could not be cleared: only a fence stops the device reading it.
            self.shared.fail(crate::device::Failure::QueueError);
            return;
        }
        let _ = self.shared.sync(&self.load_cmds());
    }

    /// Handles the `Release` event: disable the context before the page tables go.
    fn release(&self, st: &mut PtState, mm: &kernel::mm::Mm) {
        st.released = true;
        if self.injected(testing::ZG_INJ_KEEP_AFTER_RELEASE) {
            // Bug on purpose: tell the validator the mm is gone, leave the context enabled.
            let flags = self.no_validate_flag() | pte::CTX_MM_RELEASED;
            if let Ok(entry) = st.root().and_then(|root| self.entry(root, mm, flags)) {
                let _ = self.shared.hw.write_ctx(self.asid, &entry);
            }
            return;
        }
        if let Err(e) = self.disable(st, pte::CTX_MM_RELEASED) {
            pr_err!("asid {}: release failed: {:?}\n", self.asid, e);
        }
    }

    /// The commands that take the context off the device: all of `load` (`CFGI_CTX` +
    /// `INV_ASID`), or, under `ZG_INJ_SKIP_CTX_INVALIDATE` (a bug on purpose), `INV_ASID` alone,
    /// so that the device keeps its cached copy of the entry.
    fn disable_cmds<'a>(&self, load: &'a [cmd::Command; 2]) -> &'a [cmd::Command] {
        if self.injected(testing::ZG_INJ_SKIP_CTX_INVALIDATE) {
            &load[1..]
        } else {
            &load[..]
        }
    }

    /// Whether an injected bug skips this invalidation altogether.
    fn skips(&self, event: NotifierEvent) -> bool {
        let protection = matches!(
            event,
            NotifierEvent::ProtectionVma | NotifierEvent::ProtectionPage
        );
        self.injected(testing::ZG_INJ_SKIP_SHOOTDOWN)
            || (protection && self.injected(testing::ZG_INJ_KEEP_WRITE))
    }

    /// `ZG_INJ_EARLY_TABLE_FREE`, a bug on purpose: tables detached by this invalidation go
    /// back to the pool before its SYNC, while a page walk may still read them.
    fn free_detached_early(&self, st: &mut PtState) {
        self.free_deferred(st);
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
fn leaf_dropped(dma: &mut DmaBlocks, va: u64, old: u64) {
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

/// Bits of [`abort_word`] for the errno (errnos are below 4096).
const ABORT_ERRNO_BITS: u32 = 12;
/// The job-id bits [`abort_word`] keeps (ids are sequence numbers: they do not wrap in 2^52).
const ABORT_JOB_MASK: u64 = u64::MAX >> ABORT_ERRNO_BITS;

/// Job `id` and the positive errno of `err`, packed in one word.
fn abort_word(id: u64, err: Error) -> u64 {
    let errno = u64::from(err.to_errno().unsigned_abs()) & ((1 << ABORT_ERRNO_BITS) - 1);
    (id & ABORT_JOB_MASK) << ABORT_ERRNO_BITS | errno
}

fn write_bit(write: bool) -> u64 {
    if write {
        pte::PTE_W
    } else {
        0
    }
}

#[pinned_drop]
impl PinnedDrop for Mirror {
    fn drop(self: Pin<&mut Self>) {
        // Reached after `shutdown` (tables freed, device context disabled or the device fenced)
        // or when creation failed before the device saw the context: either way the device
        // cannot reach the root.
        let root = self.state.lock().root.take();
        if let Some(root) = root {
            self.pool().free(root);
        }
        if !self.asid_done.load(Ordering::Relaxed) {
            self.shared.free_asid(self.asid);
        }
    }
}

impl Mirror {
    /// Counts a non-blockable callback that returns false rather than sleep.
    fn nonblock_gave_up(&self) {
        bump(&self.stats.nonblock_failed, 1);
        bump(&self.shared.nonblock_failed, 1);
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
            bump(&self.stats.nonblock, 1);
            bump(&self.shared.nonblock_invalidations, 1);
            Wait::Spin
        };
        let mut st = if how == Wait::Sleep {
            self.state.lock()
        } else {
            match self.state.try_lock() {
                Some(g) => g,
                None => {
                    self.nonblock_gave_up();
                    return false;
                }
            }
        };
        sub.set_seq(cur_seq);
        let event = range.event();
        if st.released || self.skips(event) {
            return true;
        }
        if event == NotifierEvent::Release {
            self.release(&mut st, range.mm());
            return true;
        }
        let (start, end) = (range.start() as u64, range.end() as u64);
        let change = if self.injected(testing::ZG_DBG_ZAP_WRITE_PROTECT) {
            Change::Clear
        } else {
            Change::for_event(event)
        };
        match self.shootdown(&mut st, start, end, how, &[], change) {
            Ok(_) => true,
            Err(e) if e == EAGAIN => {
                // Nothing slept; cleared PTEs are covered by `need_flush`.
                self.nonblock_gave_up();
                false
            }
            // The device unbound meanwhile: it is fenced and its tables are freed.
            Err(e) if self.shared.unbound_under(e) => true,
            Err(e) => {
                // The SYNC (or the fence) ran, but the table walk failed (a corrupt table), so
                // part of the range may still be mapped while the kernel frees its pages: take
                // the whole context off the device before returning.
                pr_err!(
                    "asid {}: shootdown failed: {:?}; context taken off the device\n",
                    self.asid,
                    e
                );
                self.abandon(&mut st);
                true
            }
        }
    }
}

impl Aging for Mirror {
    fn clear_young(&self, start: usize, end: usize, _flush: bool) -> bool {
        // Atomic context: a busy context answers "not young" rather than wait.
        let Some(st) = self.state.try_lock() else {
            return false;
        };
        if st.released {
            return false;
        }
        let mut z = Zap::new(start as u64, end as u64);
        let young = st
            .root()
            .and_then(|root| self.age_table(root, &mut z, true))
            .unwrap_or(false);
        if z.pages > 0 {
            bump(&self.stats.aging_cleared, z.pages);
            // The device sets A again only when it walks: its cached translations of the
            // range must go. Aging is advisory, so the invalidation is posted and never waited
            // for, even for `clear_flush_young` (which runs under the page-table lock, per
            // PTE): a use the device makes before it executes goes unseen once, as a CPU's
            // use does before its TLB flush. A full ring or a failed device is ignored.
            let inv = cmd::Command::new(cmd::CMD_INV_RANGE, 0, self.asid, z.lo, z.hi - z.lo);
            let hw = &self.shared.hw;
            let _ = hw.cmdq.post(
                &self.shared.bar,
                &[inv],
                false,
                Wait::Spin,
                &self.shared.health,
            );
        }
        drop(st);
        if young {
            bump(&self.stats.aging_young, 1);
        }
        young
    }

    fn test_young(&self, address: usize) -> bool {
        let Some(st) = self.state.try_lock() else {
            return false;
        };
        let page = (address as u64) & !(PAGE - 1);
        let mut z = Zap::new(page, page + PAGE);
        let young = !st.released
            && st
                .root()
                .and_then(|root| self.age_table(root, &mut z, false))
                .unwrap_or(false);
        drop(st);
        if young {
            bump(&self.stats.aging_young, 1);
        }
        young
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

/// How a populate faults pages in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Walk {
    /// `hmm_range_fault()` under the mmap read lock (the `MAP` ioctl).
    Locked,
    /// The unlocked variant: fault handlers may drop the mmap lock (userfaultfd); used to
    /// serve device faults.
    Unlocked,
}

/// Faults in one block and returns the notifier sequence its entries are valid for, or `None`
/// when an invalidation overtook the walk (retry).
fn fault_block(
    ctx: &Context,
    mm: &MmWithUser,
    start: u64,
    end: u64,
    request: HmmRequest,
    walk: Walk,
    pfns: &mut [HmmPfn],
) -> Result<Option<u64>> {
    let (s, e) = (start as usize, end as usize);
    match walk {
        Walk::Locked => {
            let seq = ctx.read_begin();
            match ctx.hmm_range_fault(mm, s, e, request, seq, pfns)? {
                FaultOutcome::Busy => Ok(None),
                FaultOutcome::Done => Ok(Some(seq)),
            }
        }
        Walk::Unlocked => {
            let timeout = msecs_to_jiffies(POPULATE_TIMEOUT_MS);
            ctx.hmm_range_fault_unlocked(mm, s, e, request, timeout, pfns)
                .map(Some)
        }
    }
}

/// Mirrors `[start, end)` (page aligned, inside the context's interval) into the device, with
/// write intent if `write`.
pub(crate) fn populate(
    ctx: &Context,
    start: u64,
    end: u64,
    access: Access,
    walk: Walk,
    out: &mut MapOut,
) -> Result {
    let (mm, mut pfns) = walk_setup(ctx)?;
    let mut s = start;
    while s < end {
        let e = block_end(s, end);
        let n = ((e - s) / PAGE) as usize;
        let pfns = &mut pfns[..n];
        // The bound is on retries: time spent waiting in a fault handler (a userfaultfd
        // handler resolving the page) does not count, the unlocked walk bounds its own retries;
        // nor does the test knob's populate lag (an artificial window, not the walk's work).
        let started = Instant::<Monotonic>::now();
        let mut not_counted = Delta::from_nanos(0);
        let mut retries = 0;
        loop {
            if started.elapsed() - not_counted > Delta::from_millis(POPULATE_TIMEOUT_MS.into())
                || (walk == Walk::Unlocked && retries >= FAULT_MAX_RETRIES)
            {
                return Err(EBUSY);
            }
            if walk == Walk::Unlocked && ctx.current_answered() {
                // The fault was aborted meanwhile (overdue, or its file closed).
                return Err(ECANCELED);
            }
            retries += 1;
            ctx.shared.check_live()?;
            bump(&ctx.stats.populates, 1);
            let walk_started = Instant::<Monotonic>::now();
            let faulted = fault_block(ctx, &mm, s, e, access.request(), walk, pfns)?;
            if let (Access::Around(page), Some(_)) = (access, faulted) {
                out.zero_after = zero_run_end(s, pfns, page);
            }
            if walk == Walk::Unlocked {
                not_counted += walk_started.elapsed();
            }
            let Some(seq) = faulted else {
                out.retries += 1;
                bump(&ctx.stats.populate_retries, 1);
                continue;
            };
            let ignore_retry = ctx.injected(testing::ZG_INJ_IGNORE_RETRY);
            let lag_started = Instant::<Monotonic>::now();
            ctx.populate_lag();
            not_counted += lag_started.elapsed();
            // A DMA map for a block that has none is allocated here, outside the lock.
            let spare = if ctx.wants_dma_spare.load(Ordering::Relaxed) {
                Some(ctx.shared.dma_spare()?)
            } else {
                None
            };
            let mut st = ctx.state.lock();
            let unused = st.dma.offer(spare);
            if st.released {
                return Err(EINVAL);
            }
            if !ignore_retry && ctx.read_retry(seq) {
                drop(st);
                drop(unused);
                out.retries += 1;
                bump(&ctx.stats.populate_retries, 1);
                continue;
            }
            let (p0, h0) = (out.pages, out.huge);
            let committed = ctx.commit(&mut st, s, e, pfns, access, out);
            ctx.wants_dma_spare
                .store(st.dma.wants_spare(), Ordering::Relaxed);
            drop(st);
            drop(unused);
            if committed == Err(EAGAIN) {
                // No spare map after all (another populate took it): allocate one, walk again.
                continue;
            }
            committed?;
            bump(&ctx.stats.pages_mapped, out.pages - p0);
            bump(&ctx.stats.huge_mapped, out.huge - h0);
            break;
        }
        s = e;
    }
    Ok(())
}

/// The CPU half of a snapshot byte for one HMM entry.
fn cpu_snapshot(p: HmmPfn) -> u8 {
    if p.error() {
        return uapi::ZG_SNAP_CPU_ERROR;
    }
    if !p.valid() {
        return 0;
    }
    let mut b = uapi::ZG_SNAP_CPU_VALID;
    if p.write() {
        b |= uapi::ZG_SNAP_CPU_WRITE;
    }
    if p.map_order() >= 9 {
        b |= uapi::ZG_SNAP_CPU_HUGE;
    }
    b
}

/// The device half of a snapshot byte for the page at `va`.
fn device_snapshot(ctx: &Context, st: &mut PtState, va: u64) -> Result<u8> {
    let Some(l2) = ctx.l2_table(st, va, false)? else {
        return Ok(0);
    };
    let l2_entry = ctx.pool().read(l2, pte::pt_index(va, 2))?;
    let (leaf, huge) = if l2_entry & pte::PTE_P == 0 {
        return Ok(0);
    } else if l2_entry & pte::PTE_PS != 0 {
        (l2_entry, true)
    } else {
        let l1 = ctx.pool().page_at(l2_entry & pte::PTE_ADDR_MASK)?;
        (ctx.pool().read(l1, pte::pt_index(va, 1))?, false)
    };
    if leaf & pte::PTE_P == 0 {
        return Ok(0);
    }
    let mut b = uapi::ZG_SNAP_DEV_PRESENT;
    if leaf & pte::PTE_W != 0 {
        b |= uapi::ZG_SNAP_DEV_WRITE;
    }
    if huge {
        b |= uapi::ZG_SNAP_DEV_HUGE;
    }
    if leaf & pte::PTE_D != 0 {
        b |= uapi::ZG_SNAP_DEV_DIRTY;
    }
    Ok(b)
}

/// One byte per page of `[start, start + out.len() * 4096)`: `encode` of what
/// `hmm_range_fault()` sees there without faulting (takes the mmap lock; call it without the
/// context lock).
pub(crate) fn cpu_snapshot_with(
    ctx: &Context,
    start: u64,
    out: &mut [u8],
    encode: fn(HmmPfn) -> u8,
) -> Result {
    let end = start + out.len() as u64 * PAGE;
    let (mm, mut pfns) = walk_setup(ctx)?;
    let mut s = start;
    while s < end {
        let e = block_end(s, end);
        let n = ((e - s) / PAGE) as usize;
        let first = ((s - start) / PAGE) as usize;
        let pf = &mut pfns[..n];
        snapshot_block(ctx, &mm, s, e, pf)?;
        for (o, p) in out.iter_mut().skip(first).zip(pf.iter()) {
            *o = encode(*p);
        }
        s = e;
    }
    Ok(())
}

/// The CPU's entries for `[s, e)` (one block), written in full: a walk an invalidation
/// overtook (`Busy`) may have left entries unwritten, so it is walked again, for at most
/// [`POPULATE_TIMEOUT_MS`] (then `EBUSY`). The result is advisory (it may be stale as soon as
/// it is returned), but every byte describes what the CPU mapped at some point of the call.
fn snapshot_block(ctx: &Context, mm: &MmWithUser, s: u64, e: u64, pfns: &mut [HmmPfn]) -> Result {
    let started = Instant::<Monotonic>::now();
    loop {
        let seq = ctx.read_begin();
        let r = ctx.hmm_range_fault(mm, s as usize, e as usize, HmmRequest::Snapshot, seq, pfns)?;
        if r == FaultOutcome::Done {
            return Ok(());
        }
        if started.elapsed() > Delta::from_millis(POPULATE_TIMEOUT_MS.into()) {
            return Err(EBUSY);
        }
    }
}

/// One `ZG_SNAP_*` byte per page of `[start, start + out.len() * 4096)`.
pub(crate) fn snapshot(ctx: &Context, start: u64, out: &mut [u8]) -> Result {
    // CPU side first (takes the mmap lock; no context lock held).
    cpu_snapshot_with(ctx, start, out, cpu_snapshot)?;
    let mut st = ctx.state.lock();
    for (i, o) in out.iter_mut().enumerate() {
        *o |= device_snapshot(ctx, &mut st, start + i as u64 * PAGE)?;
    }
    Ok(())
}

#[cfg(zapguard_test)]
/// Enables injected bugs and debug modes, and sets the device's test knobs. Switching
/// `ZG_DBG_NO_VALIDATE` rewrites the context entry and reloads it on the device.
pub(crate) fn set_inject(ctx: &Context, i: &testing::ZgInject) -> Result {
    let old = ctx.inject.swap(i.modes, Ordering::Relaxed);
    ctx.populate_lag.store(i.populate_lag, Ordering::Relaxed);
    ctx.shared.set_knobs(i);
    ctx.set_knobs.store(true, Ordering::Relaxed);
    if (old ^ i.modes) & testing::ZG_DBG_NO_VALIDATE == 0 {
        return Ok(());
    }
    let st = ctx.state.lock();
    if st.released {
        return Err(EINVAL);
    }
    let entry = ctx.entry(st.root()?, ctx.mm(), ctx.no_validate_flag())?;
    ctx.shared.hw.write_ctx(ctx.asid, &entry)?;
    match ctx.shared.sync(&ctx.load_cmds()[..1]) {
        Synced::Done(_) => Ok(()),
        Synced::Fenced => Err(ctx.shared.failure_error()),
    }
}

/// The CPU page-table root the validator walks (test builds).
#[cfg(zapguard_test)]
fn cpu_root(mm: &kernel::mm::Mm) -> u64 {
    mm.pgd_phys()
}

/// None: a production build's device has no validator to feed.
#[cfg(not(zapguard_test))]
fn cpu_root(_mm: &kernel::mm::Mm) -> u64 {
    0
}

/// The most one served fault maps: the aligned 2 MiB block around it (fault-around).
const FAULT_AROUND: u64 = HUGE;

/// The fault-around window for a fault at `page`: its aligned [`FAULT_AROUND`] block clamped to
/// the VMA. Just the page for a userfaultfd-registered VMA (its handler must only see the pages
/// the device touches) or when the VMA cannot be looked up.
fn fault_window(ctx: &Context, page: u64) -> (u64, u64) {
    let single = (page, page + PAGE);
    let Some(mm) = ctx.mm().mmget_not_zero() else {
        return single;
    };
    let mm = MmWithUser::into_mmput_async(mm);
    let guard = mm.mmap_read_lock();
    let Some(vma) = guard.vma_lookup(page as usize) else {
        return single;
    };
    if vma.userfaultfd_armed() {
        return single;
    }
    let block = page & !(FAULT_AROUND - 1);
    let start = block.max(vma.start() as u64);
    let end = (block + FAULT_AROUND)
        .min(vma.end() as u64)
        .min(pte::VA_LIMIT);
    (start, end)
}

/// Serves one device fault of `ctx` and returns the pages mapped.
///
/// A read maps the window around it ([`fault_window`]) with one `hmm_range_fault()`, or, if the
/// window cannot be faulted in whole (a neighbour that cannot be), just the page. A write must
/// not write any page but its own: write intent breaks COW, turns `MAP_PRIVATE` file pages into
/// anonymous copies and runs `page_mkwrite`, and `hmm_range_fault()` write-faults every page
/// from the first one it must fault to the end of its walk. So the window is mapped for read
/// first ([`Access::Around`]: writable where the CPU's already are, a 2 MiB entry where the
/// CPU maps 2 MiB writable), and then, unless that made the page device-writable, the page is
/// faulted for write, together with the pages after it that map the zero page: those were
/// never written, so write intent there breaks no COW and touches no file (a device that
/// writes fresh memory forward takes one fault per window, not one per page).
fn serve_fault(ctx: &Context, va: u64, write: bool) -> Result<u64> {
    if va >= pte::VA_LIMIT {
        return Err(EFAULT);
    }
    let page = va & !(PAGE - 1);
    let (start, end) = fault_window(ctx, page);
    let mut out = MapOut::default();
    if write && end - start == PAGE {
        populate(
            ctx,
            page,
            page + PAGE,
            Access::Write,
            Walk::Unlocked,
            &mut out,
        )?;
        return Ok(out.pages + out.huge * (HUGE / PAGE));
    }
    let around = if write {
        Access::Around(page)
    } else {
        Access::Read
    };
    let r = populate(ctx, start, end, around, Walk::Unlocked, &mut out);
    if write && !device_writable(ctx, page)? {
        let to = out.zero_after.clamp(page + PAGE, end);
        populate(ctx, page, to, Access::Write, Walk::Unlocked, &mut out)?;
    } else if r.is_err() && end - start > PAGE {
        out = MapOut::default();
        populate(ctx, page, page + PAGE, around, Walk::Unlocked, &mut out)?;
    } else {
        r?;
    }
    Ok(out.pages + out.huge * (HUGE / PAGE))
}

/// The end of the run of entries of `pfns` (which map from `s`) after `page` that are the zero
/// page.
fn zero_run_end(s: u64, pfns: &[HmmPfn], page: u64) -> u64 {
    let Some(first) = page.checked_sub(s).map(|d| (d / PAGE) as usize + 1) else {
        return page + PAGE;
    };
    let run = pfns
        .iter()
        .skip(first)
        .take_while(|p| p.is_zero_page())
        .count();
    s + ((first + run) as u64) * PAGE
}

/// Whether the device PTE of `page` is present and writable.
fn device_writable(ctx: &Context, page: u64) -> Result<bool> {
    let mut st = ctx.state.lock();
    Ok(device_snapshot(ctx, &mut st, page)? & uapi::ZG_SNAP_DEV_WRITE != 0)
}

/// An event for `ctx`'s ASID (from the event interrupt thread): account it, and queue a stalled
/// fault for the context's work item. Never blocks on the mm.
pub(crate) fn on_event(ctx: &Arc<Context>, e: &ev::Event) {
    ctx.record_event(e);
    if e.ty != ev::EVT_FAULT || e.flags & ev::EVT_F_STALLED == 0 {
        return;
    }
    let fault = Fault {
        va: e.va,
        write: e.flags & ev::EVT_F_WRITE != 0,
        tag: e.info,
        job: e.info2,
    };
    ctx.shared.fault_reported();
    let (queued, spawn) = {
        let mut q = ctx.faults.lock();
        let queued = q.push(fault);
        let spawn = queued && !q.serving;
        q.serving |= spawn;
        (queued, spawn)
    };
    if !queued {
        ctx.finish_fault(&fault, Err(EBUSY));
        return;
    }
    if spawn {
        let worker = ctx.clone();
        let spawned = match crate::fault_queue() {
            Some(q) => q
                .try_spawn(GFP_KERNEL, move || serve_queued_faults(&worker))
                .map_err(|_| ENOMEM),
            None => Err(ENODEV),
        };
        if let Err(e) = spawned {
            // No memory for the work item: serve nothing, abort what is queued.
            while let Some(f) = ctx.take_fault() {
                if ctx.claim_current() {
                    ctx.finish_fault(&f, Err(e));
                }
            }
        }
    }
}

impl Mirror {
    /// The next queued fault, now the one in service; clears `serving` when there is none.
    fn take_fault(&self) -> Option<Fault> {
        let mut q = self.faults.lock();
        let f = q.pop();
        q.current = f.map(|f| (f, Instant::<Monotonic>::now(), false));
        if f.is_none() {
            q.serving = false;
        }
        f
    }

    /// How many times in a row `f` came back after its service with no invalidation in
    /// between (0 for a new fault).
    fn fruitless_repeats(&self, f: &Fault) -> u32 {
        let invalidations = self.stats.invalidations.load(Ordering::Relaxed);
        match self.faults.lock().last {
            Some(l) if l.fault.same_access(f) && l.invalidations == invalidations => l.repeats + 1,
            _ => 0,
        }
    }

    /// Remembers that `f` was served (for [`Self::fruitless_repeats`]).
    fn note_served(&self, f: &Fault, repeats: u32) {
        let invalidations = self.stats.invalidations.load(Ordering::Relaxed);
        self.faults.lock().last = Some(LastServed {
            fault: *f,
            invalidations,
            repeats,
        });
    }

    /// Whether the fault in service was answered already (aborted).
    fn current_answered(&self) -> bool {
        matches!(self.faults.lock().current, Some((_, _, true)))
    }

    /// Claims the answer to the fault in service: `false` if it was already answered (aborted
    /// as overdue, or at close), whose answer is then moot.
    fn claim_current(&self) -> bool {
        match self.faults.lock().current.as_mut() {
            Some((_, _, answered)) if !*answered => {
                *answered = true;
                true
            }
            _ => false,
        }
    }
}

/// A context's fault work: serves its queued faults in order, then stops.
fn serve_queued_faults(ctx: &Arc<Context>) {
    while let Some(f) = ctx.take_fault() {
        let repeats = ctx.fruitless_repeats(&f);
        if repeats >= FRUITLESS_FAULT_REPEATS {
            pr_warn!(
                "asid {}: job {} faulted {} times at {:#x} (write {}) with nothing invalidated in between: aborting it\n",
                ctx.asid,
                f.job,
                repeats + 1,
                f.va,
                f.write
            );
            if ctx.claim_current() {
                ctx.finish_fault(&f, Err(EFAULT));
            }
            continue;
        }
        let served = serve_fault(ctx, f.va, f.write);
        ctx.note_served(&f, repeats);
        if let Ok(pages) = served {
            bump(&ctx.stats.fault_pages, pages);
        }
        if ctx.claim_current() {
            ctx.finish_fault(&f, served.map(|_| ()));
        }
    }
}
