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
//! # Layout
//!
//! This file holds the context's types, its opening and the small helpers; the rest is one
//! child module per concern, each adding methods to [`Mirror`]: [`table`] (the device page table
//! and the shootdown), [`notifier`] (the invalidation and aging policy), [`walk`] (populate and
//! snapshots), [`faults`] (device fault service) and [`teardown`] (disable, release, close).
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
use crate::device::{AsidOwner, Shared};
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
    sync::{Arc, ArcBorrow, Mutex, SpinLock},
    time::{delay::fsleep, msecs_to_jiffies, Delta, Instant, Monotonic},
};

mod faults;
mod notifier;
mod table;
mod teardown;
mod walk;

use faults::*;
use table::*;
use walk::*;
pub(crate) use walk::{cpu_snapshot_with, populate, snapshot};

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

impl AsidOwner for Context {
    fn on_event(self: ArcBorrow<'_, Self>, e: &ev::Event) {
        faults::on_event(&self.into(), e);
    }

    fn has_overdue_fault(&self) -> bool {
        Mirror::has_overdue_fault(self)
    }

    fn abort_overdue_fault(&self) {
        Mirror::abort_overdue_fault(self)
    }

    fn unmap_for_unbind(&self) {
        Mirror::unmap_for_unbind(self)
    }
}

impl ContextShutdown for Context {
    fn shutdown(&self) {
        self.close_device();
        self.remove();
    }
}

/// Writes the context entry and loads it on the device: `CFGI_CTX` + `INV_ASID` (the ASID's
/// previous owner may have left IOTLB entries behind) + SYNC; then events reach it.
fn enable(ctx: &Arc<Context>) -> Result {
    let entry = {
        let st = ctx.state.lock();
        ctx.entry(st.root()?, ctx.mm(), ctx.no_validate_flag())?
    };
    // The ASID's last owner is gone (its teardown was confirmed): its counts are not ours.
    ctx.shared.clear_asid_stats(ctx.asid);
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

/// How a populate faults pages in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Walk {
    /// `hmm_range_fault()` under the mmap read lock (the `MAP` ioctl).
    Locked,
    /// The unlocked variant: fault handlers may drop the mmap lock (userfaultfd); used to
    /// serve device faults.
    Unlocked,
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
        let [judged, unjudged] = self.shared.asid_stats(self.asid);
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
            accesses_judged: judged,
            accesses_unjudged: unjudged,
            ..Default::default()
        }
    }
    /// Counts a non-blockable callback that returns false rather than sleep.
    fn nonblock_gave_up(&self) {
        bump(&self.stats.nonblock_failed, 1);
        bump(&self.shared.nonblock_failed, 1);
    }
}
