// SPDX-License-Identifier: GPL-2.0

//! The device's DMA-visible memory and the driver's side of its queues: the device page-table
//! pool, the context table, the command queue with SYNC completion, the DMA job ring and the
//! event ring.
//!
//! Everything here lives in [`Hw`], owned by the `Arc` that the PCI device and every open file
//! share: files can outlive an unbind, and the device must never see freed memory. Unbind
//! fences the device (`CR0 = 0`, or bus mastering off if it does not confirm, see
//! [`crate::device`]) before the BAR is revoked, after which nothing here is touched by the
//! device. The DMA memory itself is a [`DmaMem`] each: the driver core frees it right after the
//! unbind, open files or not, and every access after that fails with `ENODEV` (the queue state
//! and locks live on until the last file closes).
//!
//! Every wait here is bounded (the `sync_timeout_ms` and `job_timeout_ms` parameters) and
//! returns as soon as [`Health`] says the device failed; the caller then fails and fences the
//! device before it lets go of anything the device might still use.
//!
//! # Locks
//!
//! | lock | kind | protects | taken under |
//! |---|---|---|---|
//! | `PtPool::free` | spinlock | free table pages | a context's lock |
//! | `CmdQueue::state` | spinlock | command ring producer, SYNC sequence | a context's lock |
//! | `CmdQueue::done_lock` | mutex | SYNC completion wake-ups (with `done`) | a context's lock, the fence lock |
//! | `Jobs::state` | mutex | DMA ring, slot results, in-flight counts (with `cv`); the `PHYS_*` staging registers while a region is declared | a bounce lock |
//! | `BounceSlot::buf` | mutex | one context's READ/WRITE bounce buffer | nothing |
//!
//! None of them is held while allocating with `GFP_KERNEL` or calling into the mm, so they are
//! all safe to take from an mmu_notifier callback (see [`kernel::mm::mmu_notifier`]'s locking rules).

use crate::abi::{cmd, dma, pte, queue, regs as abi_regs};
use crate::dmamem::DmaMem;
use crate::regs;
use crate::task::fatal_signal_pending;
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use kernel::{
    device::{Bound, Device},
    io::Io,
    new_condvar, new_mutex, new_spinlock, pci,
    prelude::*,
    sync::{
        barrier::{dma_mb, Write},
        CondVar, CondVarTimeoutResult, Mutex, MutexGuard, SpinLock,
    },
    time::{
        delay::{fsleep, udelay},
        msecs_to_jiffies, Delta, Instant, Monotonic,
    },
};

/// Size of BAR0.
pub(crate) const BAR0_SIZE: usize = crate::abi::pci::BAR0_SIZE as usize;
/// BAR0, revocable.
pub(crate) type DevresBar = pci::DevresBar<BAR0_SIZE>;
/// A mapped BAR0.
pub(crate) type Bar<'a> = pci::Bar<'a, BAR0_SIZE>;

/// log2 of the entries of the command and DMA rings.
pub(crate) const RING_LOG2: u32 = 6;
/// log2 of the entries of the event ring: larger, as one job can report a violation per burst.
pub(crate) const EVT_LOG2: u32 = 9;
const RING_ENTRIES: usize = 1 << RING_LOG2;
/// u64 words per 4 KiB page.
const PAGE_WORDS: usize = 512;
/// Table pages per pool chunk: 1 MiB of physically contiguous coherent memory.
const CHUNK_PAGES: usize = 256;
/// Pool chunks allocated at probe: 2048 table pages, enough to map 4 GiB with 4 KiB pages.
const POOL_CHUNKS: usize = 8;
/// How long a SYNC may take before the device is failed (`sync_timeout_ms`, 5 s by default).
fn sync_timeout() -> Delta {
    Delta::from_millis(i64::from(
        crate::module_parameters::sync_timeout_ms.value().max(10),
    ))
}
/// How long a non-blockable invalidation may spin for its SYNC.
const NONBLOCK_SYNC_US: i64 = 20_000;
/// How long a sleeping SYNC wait spins on the completion word first.
const SYNC_SPIN: Delta = Delta::from_micros(50);
/// How long a DMA job may make no progress before the device is failed (`job_timeout_ms`,
/// 30 s by default: 64 MiB with stalls served under TCG).
pub(crate) fn job_timeout() -> Delta {
    Delta::from_millis(i64::from(
        crate::module_parameters::job_timeout_ms.value().max(10),
    ))
}
/// Polls of CR0ACK before giving up on the enable/disable handshake (~65 us per read under TCG).
const HANDSHAKE_POLLS: usize = 1000;

/// The device's health, as the queues see it (policy and the fence live in
/// [`crate::device::Shared::fail`]).
///
/// # Invariants
///
/// `fenced` implies `failed`; neither is ever cleared.
pub(crate) struct Health {
    /// No new work may be given to the device; waiters stop waiting.
    failed: AtomicBool,
    /// The device can no longer touch memory.
    fenced: AtomicBool,
    /// Why it failed, as [`crate::device::Failure::code`]; 0 while live.
    failure: AtomicU32,
}

impl Health {
    pub(crate) const fn new() -> Self {
        Self {
            failed: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            failure: AtomicU32::new(0),
        }
    }

    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub(crate) fn fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    pub(crate) fn failure(&self) -> u32 {
        self.failure.load(Ordering::Relaxed)
    }

    /// Marks the device failed; the first reason sticks.
    pub(crate) fn set_failed(&self, code: u32) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            self.failure.store(code, Ordering::Relaxed);
        }
    }

    /// Marks the device fenced. Only [`crate::device::Shared::fail`] calls this, once the
    /// fence is up.
    pub(crate) fn set_fenced(&self) {
        self.failed.store(true, Ordering::Release);
        self.fenced.store(true, Ordering::Release);
    }
}

/// How a condition wait treats a pending signal.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnSignal {
    /// A fatal signal ends the wait with `EINTR` (the work is left to finish safely); other
    /// signals are ignored, so a job is never given up half done for a `SIGCHLD`.
    Killable,
    /// Keep waiting whatever is pending (the work cannot be abandoned, e.g. the SYNC of a
    /// dying task's release).
    Nap,
}

/// Sleeps on `cv` (with `lock`, whose guard is `guard`) for up to 100 ms or a notification.
/// Callers re-check their condition, and the device's health, at every return.
fn wait_on<'a, T>(
    cv: &CondVar,
    lock: &'a Mutex<T>,
    mut guard: MutexGuard<'a, T>,
    on_signal: OnSignal,
) -> Result<MutexGuard<'a, T>> {
    let r = cv.wait_interruptible_timeout(&mut guard, msecs_to_jiffies(100));
    if let CondVarTimeoutResult::Signal { .. } = r {
        if on_signal == OnSignal::Killable && fatal_signal_pending() {
            return Err(EINTR);
        }
        // The wait returns at once while a signal is pending: nap without the lock instead
        // (1 ms: a dying task's SYNC wait must not spin; a completion is seen at most that
        // late).
        drop(guard);
        fsleep(Delta::from_millis(1));
        guard = lock.lock();
    }
    Ok(guard)
}

/// A device page-table page, by index in the [`PtPool`], owned by whoever holds the value.
///
/// Not `Copy` or `Clone`: a page comes out of [`PtPool::alloc`] or [`PtPool::detach`], goes
/// back with [`PtPool::free`] or into a table with [`PtPool::attach`], each of which consumes
/// it, so freeing a page twice, or freeing one still attached, does not type-check. Dropping
/// one leaks it (on purpose, for a page the device might still walk).
#[must_use = "a dropped page-table page is leaked"]
pub(crate) struct PtPage(u32);

impl PtPage {
    /// The page's name, for reading and writing its entries.
    pub(crate) fn id(&self) -> PtRef {
        PtRef(self.0)
    }
}

/// A device page-table page in use, named by index: reads and writes its entries, owns nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PtRef(u32);

/// Device page-table pages, allocated at probe so that contexts can take and return pages with a
/// spinlock while holding their own lock (no allocation, hence no reclaim, in the shootdown path).
///
/// # Invariants
///
/// - Every page index `< total()` is either in `free` or owned by exactly one [`PtPage`] value
///   or one present table entry.
/// - Pages in `free` are not referenced by any device PTE the device can reach.
/// - With a `freed` bitmap, a pool page's bit is set exactly while it is in `free` (both change
///   under the `free` lock), so the device's table-lifetime check flags any walk through it.
#[pin_data]
pub(crate) struct PtPool {
    chunks: KVec<DmaMem>,
    /// Test builds: one bit per guest page up to the pool's highest page, set for the pool's
    /// free pages; the device reads it at every table read (`PT_FREED_*`, ABI 1.4).
    freed: Option<DmaMem>,
    /// Present entries per page, kept by [`Self::write`], so that an emptied table is found
    /// without reading its 512 entries (uncached memory, slow). A page's count changes only
    /// under its owner's lock, like its entries.
    present: KVec<AtomicU16>,
    #[pin]
    free: SpinLock<KVec<u32>>,
}

impl PtPool {
    fn new(dev: &Device<Bound>) -> Result<impl PinInit<Self, Error>> {
        let mut chunks = KVec::with_capacity(POOL_CHUNKS, GFP_KERNEL)?;
        let mut free = KVec::with_capacity(POOL_CHUNKS * CHUNK_PAGES, GFP_KERNEL)?;
        let mut present = KVec::with_capacity(POOL_CHUNKS * CHUNK_PAGES, GFP_KERNEL)?;
        for c in 0..POOL_CHUNKS {
            chunks.push(DmaMem::zeroed(dev, CHUNK_PAGES * PAGE_WORDS)?, GFP_KERNEL)?;
            for p in 0..CHUNK_PAGES {
                free.push((c * CHUNK_PAGES + p) as u32, GFP_KERNEL)?;
                present.push(AtomicU16::new(0), GFP_KERNEL)?;
            }
        }
        let freed = Self::freed_bitmap(dev, &chunks)?;
        Ok(try_pin_init!(Self {
            chunks,
            present,
            freed,
            free <- new_spinlock!(free, "zapguard_pt_pool"),
        }))
    }

    /// The freed-table bitmap for the device's table-lifetime check, every pool page marked
    /// free: only in test builds, and only if it stays small (the pool below 32 GiB).
    fn freed_bitmap(dev: &Device<Bound>, chunks: &[DmaMem]) -> Result<Option<DmaMem>> {
        const MAX_WORDS: u64 = 1 << 17;
        let end = chunks
            .iter()
            .map(|c| c.dma_address() + c.size() as u64)
            .max()
            .unwrap_or(0);
        let words = (end / pte::PAGE_SIZE).div_ceil(64);
        if !cfg!(zapguard_test) || words == 0 || words > MAX_WORDS {
            return Ok(None);
        }
        let map = DmaMem::zeroed(dev, words as usize)?;
        for c in chunks {
            let first = c.dma_address() / pte::PAGE_SIZE;
            for p in first..first + (c.size() as u64 / pte::PAGE_SIZE) {
                Self::mark(&map, p, true)?;
            }
        }
        Ok(Some(map))
    }

    /// Sets or clears guest page `pfn`'s bit in `map` (callers serialize: probe, or the `free`
    /// lock).
    fn mark(map: &DmaMem, pfn: u64, freed: bool) -> Result {
        let (w, bit) = ((pfn / 64) as usize, 1u64 << (pfn % 64));
        let old = map.read(w)?;
        map.write(w, if freed { old | bit } else { old & !bit })
    }

    /// Marks `page` free or in use in the freed-table bitmap, if there is one.
    fn mark_page(&self, page: PtRef, freed: bool) -> Result {
        match &self.freed {
            Some(map) => Self::mark(map, self.addr(page)? / pte::PAGE_SIZE, freed),
            None => Ok(()),
        }
    }

    /// Where the freed-table bitmap is and how many guest pages it covers (`None` without one).
    #[cfg(zapguard_test)]
    pub(crate) fn freed_bitmap_location(&self) -> Option<(u64, u32)> {
        let map = self.freed.as_ref()?;
        let pages = u32::try_from(map.size() as u64 * 8).ok()?;
        Some((map.dma_address(), pages))
    }

    fn locate(&self, page: PtRef, idx: usize) -> Result<(&DmaMem, usize)> {
        let page = page.0 as usize;
        let chunk = self.chunks.get(page / CHUNK_PAGES).ok_or(EINVAL)?;
        if idx >= PAGE_WORDS {
            return Err(EINVAL);
        }
        Ok((chunk, (page % CHUNK_PAGES) * PAGE_WORDS + idx))
    }

    /// Entry `idx` of table `page`.
    pub(crate) fn read(&self, page: PtRef, idx: usize) -> Result<u64> {
        self.atomic(page, idx, |w| w.load(Ordering::Acquire))
    }

    /// Runs `f` on entry `idx` of table `page` as an atomic word. The device sets A and D with
    /// atomic ORs on the entries it walks, so every read-modify-write of a leaf the device can
    /// reach must be atomic too, or a D the device set between the read and the write is lost.
    fn atomic<R>(&self, page: PtRef, idx: usize, f: impl FnOnce(&AtomicU64) -> R) -> Result<R> {
        let (c, w) = self.locate(page, idx)?;
        c.atomic(w, f)
    }

    /// Keeps `page`'s present count when one of its entries goes from `old` to `new`.
    fn count_present(&self, page: PtRef, old: u64, new: u64) -> Result {
        let (was, is) = (old & pte::PTE_P != 0, new & pte::PTE_P != 0);
        if was != is {
            let count = self.present.get(page.0 as usize).ok_or(EINVAL)?;
            if is {
                count.fetch_add(1, Ordering::Relaxed);
            } else {
                count.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Sets entry `idx` of table `page` (a leaf, or clearing a leaf: table pointers go through
    /// [`Self::attach`] and [`Self::detach`]) and returns what it replaced, the A and D bits
    /// the device set up to that instant included.
    pub(crate) fn swap(&self, page: PtRef, idx: usize, v: u64) -> Result<u64> {
        let old = self.atomic(page, idx, |w| w.swap(v, Ordering::AcqRel))?;
        self.count_present(page, old, v)?;
        Ok(old)
    }

    /// [`Self::swap`], for callers that do not need the old entry.
    pub(crate) fn write(&self, page: PtRef, idx: usize, v: u64) -> Result {
        self.swap(page, idx, v).map(|_| ())
    }

    /// Clears the bits of entry `idx` of `page` that `mask` does not keep (never `PTE_P`),
    /// atomically with the device's A/D updates; returns the entry before.
    pub(crate) fn fetch_and(&self, page: PtRef, idx: usize, mask: u64) -> Result<u64> {
        self.atomic(page, idx, |w| {
            w.fetch_and(mask | pte::PTE_P, Ordering::AcqRel)
        })
    }

    /// Sets `bits` (permission bits, never `PTE_P`) in entry `idx` of `page`, atomically with
    /// the device's A/D updates; returns the entry before.
    pub(crate) fn fetch_or(&self, page: PtRef, idx: usize, bits: u64) -> Result<u64> {
        self.atomic(page, idx, |w| {
            w.fetch_or(bits & !pte::PTE_P, Ordering::AcqRel)
        })
    }

    /// Present entries of `page`.
    pub(crate) fn present(&self, page: PtRef) -> Result<u64> {
        let count = self.present.get(page.0 as usize).ok_or(EINVAL)?;
        Ok(count.load(Ordering::Relaxed).into())
    }

    /// Whether every entry of `page` is clear.
    pub(crate) fn is_empty(&self, page: PtRef) -> Result<bool> {
        Ok(self.present(page)? == 0)
    }

    /// The bus address of `page`.
    pub(crate) fn addr(&self, page: PtRef) -> Result<u64> {
        let (c, w) = self.locate(page, 0)?;
        Ok(c.dma_address() + (w * 8) as u64)
    }

    /// The page whose bus address is `addr` (a table pointer read back from a PTE).
    pub(crate) fn page_at(&self, addr: u64) -> Result<PtRef> {
        for (i, c) in self.chunks.iter().enumerate() {
            let base = c.dma_address();
            if addr >= base && addr - base < c.size() as u64 {
                let page = i * CHUNK_PAGES + ((addr - base) / pte::PAGE_SIZE) as usize;
                return Ok(PtRef(page as u32));
            }
        }
        // A table pointer we did not write: the page table is corrupt.
        Err(EIO)
    }

    /// Points entry `idx` of `table` at `child` (with `flags`), which the tree then owns.
    pub(crate) fn attach(
        &self,
        table: PtRef,
        idx: usize,
        child: PtPage,
        flags: u64,
    ) -> Result<PtRef> {
        self.replace_with_table(table, idx, child, flags)
            .map(|(id, _)| id)
    }

    /// [`Self::attach`] over whatever entry `idx` held (a 2 MiB leaf being split), returning
    /// that entry as the atomic swap saw it (with the A/D bits the device set up to then).
    pub(crate) fn replace_with_table(
        &self,
        table: PtRef,
        idx: usize,
        child: PtPage,
        flags: u64,
    ) -> Result<(PtRef, u64)> {
        let id = child.id();
        let old = self.swap(table, idx, self.addr(id)? | flags)?;
        Ok((id, old))
    }

    /// Clears entry `idx` of `table` if it points at a table, and hands that table over. The
    /// device may still walk it until a SYNC that follows the clearing completes.
    pub(crate) fn detach(&self, table: PtRef, idx: usize) -> Result<Option<PtPage>> {
        let e = self.read(table, idx)?;
        if e & pte::PTE_P == 0 || e & pte::PTE_PS != 0 {
            return Ok(None);
        }
        let child = self.page_at(e & pte::PTE_ADDR_MASK)?;
        self.write(table, idx, 0)?;
        Ok(Some(PtPage(child.0)))
    }

    /// Takes a zeroed page, or `None` when the pool is exhausted. Never sleeps.
    pub(crate) fn alloc(&self) -> Result<Option<PtPage>> {
        let page = {
            let mut free = self.free.lock();
            let Some(page) = free.pop() else {
                return Ok(None);
            };
            let page = PtPage(page);
            if let Err(e) = self.mark_page(page.id(), false) {
                let _ = free.push_within_capacity(page.0);
                return Err(e);
            }
            page
        };
        let (c, w) = self.locate(page.id(), 0)?;
        c.zero(w, PAGE_WORDS)?;
        if let Some(count) = self.present.get(page.0 as usize) {
            count.store(0, Ordering::Relaxed);
        }
        Ok(Some(page))
    }

    /// Pages in the pool.
    pub(crate) fn total(&self) -> usize {
        self.chunks.len() * CHUNK_PAGES
    }

    /// Pages currently free.
    pub(crate) fn free_pages(&self) -> usize {
        self.free.lock().len()
    }

    /// Returns a page. The caller guarantees the device can no longer reach it (its parent entry
    /// was cleared and a SYNC covering that completed, or the context is disabled, or the device
    /// is fenced).
    pub(crate) fn free(&self, page: PtPage) {
        let mut free = self.free.lock();
        // Marked before it can be taken again; a page the pool cannot name is not ours.
        let _ = self.mark_page(page.id(), true);
        // Cannot fail: the vector was allocated with room for every page.
        let _ = free.push_within_capacity(page.0);
    }
}

/// The command ring and the SYNC completion word.
#[pin_data]
pub(crate) struct CmdQueue {
    ring: DmaMem,
    /// Word 0: the sequence number of the last completed SYNC (written by the device).
    sync_word: DmaMem,
    #[pin]
    state: SpinLock<CmdState>,
    #[pin]
    done_lock: Mutex<()>,
    #[pin]
    done: CondVar,
}

struct CmdState {
    /// Our producer position.
    prod: u32,
    /// A consumer position the device has reached (read from the device, or known from a
    /// completed SYNC).
    cons: u32,
    /// Sequence number of the last SYNC posted.
    seq: u32,
    /// The last SYNCs posted: (sequence number, producer position after it, commands posted
    /// before it). A completed one tells how far the device consumed without reading
    /// `CMDQ_CONS`, while it is less than a ring behind (positions repeat every two rings).
    syncs: [(u32, u32, u64); SYNCS_TRACKED],
    /// Commands posted so far.
    posted: u64,
    /// Where the next SYNC goes in `syncs`.
    next_sync: usize,
}

/// SYNCs whose ring position the command queue remembers.
const SYNCS_TRACKED: usize = 8;

/// How a SYNC ended: either way the device no longer uses what the commands before it
/// invalidated.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Synced {
    /// The device completed the SYNC after this long.
    Done(Delta),
    /// The device failed and is fenced: it touches no memory any more.
    Fenced,
}

/// How a SYNC wait may wait.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Sleep until the command interrupt (bounded by the `sync_timeout_ms` parameter).
    Sleep,
    /// Never sleep: spin for at most [`NONBLOCK_SYNC_US`] (non-blockable mmu_notifier ranges).
    Spin,
}

impl CmdQueue {
    fn new(dev: &Device<Bound>) -> Result<impl PinInit<Self, Error>> {
        let ring = DmaMem::zeroed(dev, (RING_ENTRIES * cmd::CMD_SIZE / 8).max(PAGE_WORDS))?;
        let sync_word = DmaMem::zeroed(dev, PAGE_WORDS)?;
        Ok(try_pin_init!(Self {
            ring,
            sync_word,
            state <- new_spinlock!(CmdState {
                prod: 0,
                cons: 0,
                seq: 0,
                syncs: [(0, 0, 0); SYNCS_TRACKED],
                posted: 0,
                next_sync: 0,
            }, "zapguard_cmdq"),
            done_lock <- new_mutex!((), "zapguard_sync_done"),
            done <- new_condvar!("zapguard_sync_done"),
        }))
    }

    /// Posts `cmds`, followed by a SYNC (with interrupt) if `sync`, and rings the doorbell.
    /// Returns the SYNC's sequence number for [`Self::wait`].
    ///
    /// With [`Wait::Spin`] a full ring fails with `EAGAIN` instead of sleeping. `ENODEV` when the
    /// device is unbound, `ENXIO` when it reads all ones (gone), `EIO` when the command queue
    /// stopped on an error or the device already failed, `ETIMEDOUT` when the ring stayed full.
    pub(crate) fn post(
        &self,
        bar: &DevresBar,
        cmds: &[cmd::Command],
        sync: bool,
        how: Wait,
        health: &Health,
    ) -> Result<u32> {
        let need = cmds.len() as u32 + u32::from(sync);
        let start = Instant::<Monotonic>::now();
        loop {
            if health.failed() {
                return Err(EIO);
            }
            if let Some(seq) = self.try_post(bar, cmds, sync, need)? {
                return Ok(seq);
            }
            if how == Wait::Spin {
                return Err(EAGAIN);
            }
            if start.elapsed() > sync_timeout() {
                return Err(ETIMEDOUT);
            }
            fsleep(Delta::from_micros(20));
        }
    }

    /// Writes the commands and rings the doorbell if the ring has room (`None` if not).
    fn try_post(
        &self,
        bar: &DevresBar,
        cmds: &[cmd::Command],
        sync: bool,
        need: u32,
    ) -> Result<Option<u32>> {
        let io = bar.try_access().ok_or(ENODEV)?;
        let mut st = self.state.lock();
        if queue::free(st.prod, st.cons, RING_LOG2) < need {
            // The newest completed SYNC says how far the device got, without an MMIO read.
            let recent = |posted: u64| st.posted - posted < RING_ENTRIES as u64;
            let known = st.syncs.iter().rev().find(|&&(seq, pos, posted)| {
                recent(posted)
                    && self.sync_done(seq)
                    && queue::free(st.prod, pos, RING_LOG2) >= need
            });
            if let Some(&(_, pos, _)) = known {
                st.cons = pos;
            }
        }
        if queue::free(st.prod, st.cons, RING_LOG2) < need {
            let cons = io.read(regs::CMDQ_CONS);
            if cons.into_raw() == u32::MAX {
                return Err(ENXIO);
            }
            if cons.err() {
                return Err(EIO);
            }
            st.cons = queue::position(cons.position().get(), RING_LOG2);
            if queue::free(st.prod, st.cons, RING_LOG2) < need {
                return Ok(None);
            }
        }
        let mut prod = st.prod;
        let mut put = |c: &cmd::Command| -> Result {
            let slot = queue::index(prod, RING_LOG2) as usize * (cmd::CMD_SIZE / 8);
            let words: [u64; 4] = crate::abi::bytes_to_words(&c.to_bytes());
            for (i, w) in words.iter().enumerate() {
                self.ring.write(slot + i, *w)?;
            }
            prod = queue::next(prod, RING_LOG2);
            Ok(())
        };
        for c in cmds {
            put(c)?;
        }
        let mut seq = st.seq;
        if sync {
            seq = seq.wrapping_add(1);
            put(&cmd::Command::new(
                cmd::CMD_SYNC,
                cmd::CMD_F_SYNC_IRQ,
                0,
                self.sync_word.dma_address(),
                u64::from(seq),
            ))?;
        }
        // x86: MMIO writes are ordered after the ring writes above.
        io.write_reg(regs::CMDQ_PROD::zeroed().try_with_position(prod)?);
        st.prod = prod;
        st.seq = seq;
        st.posted += u64::from(need);
        if sync {
            let slot = st.next_sync;
            st.syncs[slot] = (seq, prod, st.posted);
            st.next_sync = (slot + 1) % SYNCS_TRACKED;
        }
        Ok(Some(seq))
    }

    /// Whether the SYNC numbered `seq` has completed (SYNCs complete in order).
    fn sync_done(&self, seq: u32) -> bool {
        let done = self.sync_word.read(0).unwrap_or(0) as u32;
        done.wrapping_sub(seq) as i32 >= 0
    }

    /// Waits for the SYNC numbered `seq`; returns how long it took. `EIO` as soon as the device
    /// failed, `ETIMEDOUT` after the `sync_timeout_ms` module parameter (sleeping), `EAGAIN`
    /// after [`NONBLOCK_SYNC_US`] (spinning).
    pub(crate) fn wait(&self, seq: u32, how: Wait, health: &Health) -> Result<Delta> {
        let start = Instant::<Monotonic>::now();
        match how {
            Wait::Spin => {
                let mut spun = 0;
                while !self.sync_done(seq) {
                    if health.failed() {
                        return Err(EIO);
                    }
                    if spun >= NONBLOCK_SYNC_US {
                        return Err(EAGAIN);
                    }
                    udelay(Delta::from_micros(5));
                    spun += 5;
                }
            }
            Wait::Sleep => {
                // The fast path: a SYNC usually completes within microseconds, sooner than a
                // sleep and an interrupt-thread wake-up take.
                while !self.sync_done(seq) && start.elapsed() < SYNC_SPIN {
                    core::hint::spin_loop();
                }
                let mut guard = self.done_lock.lock();
                while !self.sync_done(seq) {
                    if health.failed() {
                        return Err(EIO);
                    }
                    if start.elapsed() > sync_timeout() {
                        return Err(ETIMEDOUT);
                    }
                    // A dying task (exit_mmap's release) must still wait for its SYNC.
                    guard = wait_on(&self.done, &self.done_lock, guard, OnSignal::Nap)?;
                }
            }
        }
        Ok(start.elapsed())
    }

    /// Command-vector interrupt: wakes SYNC waiters.
    pub(crate) fn complete(&self) {
        let _guard = self.done_lock.lock();
        self.done.notify_all();
    }
}

/// What a waiter gets back from a finished job.
pub(crate) struct JobDone {
    pub(crate) status: dma::DmaStatus,
    pub(crate) elapsed: Delta,
}

/// The state of one DMA ring slot, as far as its waiter is concerned.
#[derive(Clone, Copy)]
enum Slot {
    /// No job, or its result was collected: the slot may take a new job.
    Free,
    /// A job is queued or running; `bounce` if it uses its context's bounce buffer.
    Queued { bounce: bool },
    /// The job retired; its status record was copied here when it did.
    Done(dma::DmaStatus),
    /// Its waiter left (fatal signal): the result is dropped when the job retires.
    Orphaned { bounce: bool },
}

/// Job bookkeeping, under [`Jobs::state`].
struct JobState {
    /// Our producer position.
    prod: u32,
    /// Consumer position up to which jobs are retired.
    cons: u32,
    /// Jobs submitted (the next job's sequence number); job `seq` uses slot `seq % RING_ENTRIES`.
    submitted: u64,
    /// Jobs retired (completed and accounted).
    retired: u64,
    /// ASID of the job in each ring slot.
    slot_asid: [u32; RING_ENTRIES],
    /// Each slot's job, until its waiter collected the result.
    slots: [Slot; RING_ENTRIES],
    /// Jobs queued or running, per ASID.
    inflight: KVec<u32>,
    /// Orphaned jobs that use their context's bounce buffer and have not retired, per ASID:
    /// the buffer is not reused (or freed, or grown) meanwhile.
    bounce_orphans: KVec<u32>,
}

/// The DMA job ring and the status records (one per slot).
///
/// # Invariants
///
/// A slot takes a new job only once the device consumed the previous one (`DMAQ_CONS`) and its
/// waiter collected (or abandoned) the result, so a status record is never overwritten before
/// it is read; a context's bounce buffer is handed out only while no orphaned job of its ASID
/// may still use it.
#[pin_data]
pub(crate) struct Jobs {
    ring: DmaMem,
    status: DmaMem,
    /// The device checks untranslated DMA against what the driver lent it (ABI 1.8): bounce
    /// buffers are declared, reclaimed and forgotten.
    phys_check: AtomicBool,
    #[pin]
    state: Mutex<JobState>,
    #[pin]
    cv: CondVar,
}

/// The smallest bounce buffer a context gets (it grows to fit its largest READ/WRITE, up to
/// `ZG_DMA_BOUNCE_MAX`).
const BOUNCE_MIN: usize = 64 * 1024;

/// One context's READ/WRITE bounce buffer: allocated at its first READ/WRITE, grown to fit,
/// used by one READ/WRITE at a time (copy in, job, copy out) under its lock, so that a user
/// who stalls there stalls only its own context. Freed with the context, once its jobs retired
/// (a context's close waits for them) or the device is fenced.
#[pin_data]
pub(crate) struct BounceSlot {
    #[pin]
    buf: Mutex<Option<DmaMem>>,
}

impl BounceSlot {
    pub(crate) fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            buf <- new_mutex!(None, "zapguard_bounce"),
        })
    }
}

/// Ownership of a context's bounce buffer for one READ/WRITE: its lock, taken once no
/// orphaned job of the context may still use the buffer.
pub(crate) struct Bounce<'a> {
    guard: MutexGuard<'a, Option<DmaMem>>,
}

impl Bounce<'_> {
    fn buf(&self) -> Result<&DmaMem> {
        self.guard.as_ref().ok_or(EINVAL)
    }

    /// The buffer's bus address.
    pub(crate) fn addr(&self) -> Result<u64> {
        Ok(self.buf()?.dma_address())
    }

    /// Copies `src` to the start of the buffer. Only while no job of ours uses it: the caller has not submitted
    /// its job yet. `ENODEV` once the device unbound.
    pub(crate) fn fill(&mut self, src: &[u8]) -> Result {
        // Nobody else uses the buffer: `self` holds its lock, taken only once no orphaned job
        // could still use it, and the caller's own job is not queued.
        self.buf()?.copy_in(0, src)
    }

    /// Copies the start of the buffer into `dst`, once the caller collected its job's result.
    /// `ENODEV` once the device unbound.
    pub(crate) fn drain(&self, dst: &mut [u8]) -> Result {
        self.buf()?.copy_out(0, dst)
    }

    /// [`Self::fill`] with `len` bytes from user address `src`: copied straight in, with page
    /// faults served outside the device memory's RCU section (see [`crate::dmamem`]).
    pub(crate) fn fill_from_user(&mut self, src: usize, len: usize) -> Result {
        self.buf()?.copy_from_user(0, src, len)
    }

    /// [`Self::drain`] to `len` bytes at user address `dst`.
    pub(crate) fn drain_to_user(&self, dst: usize, len: usize) -> Result {
        self.buf()?.copy_to_user(0, dst, len)
    }
}

impl Jobs {
    fn new(dev: &Device<Bound>, asid_count: usize) -> Result<impl PinInit<Self, Error>> {
        let mut inflight = KVec::with_capacity(asid_count, GFP_KERNEL)?;
        let mut bounce_orphans = KVec::with_capacity(asid_count, GFP_KERNEL)?;
        for _ in 0..asid_count {
            inflight.push(0u32, GFP_KERNEL)?;
            bounce_orphans.push(0u32, GFP_KERNEL)?;
        }
        let ring = DmaMem::zeroed(dev, RING_ENTRIES * dma::DMA_JOB_SIZE / 8)?;
        let status = DmaMem::zeroed(
            dev,
            (RING_ENTRIES * dma::DMA_STATUS_SIZE / 8).max(PAGE_WORDS),
        )?;
        Ok(try_pin_init!(Self {
            ring,
            status,
            phys_check: AtomicBool::new(false),
            state <- new_mutex!(JobState {
                prod: 0,
                cons: 0,
                submitted: 0,
                retired: 0,
                slot_asid: [0; RING_ENTRIES],
                slots: [Slot::Free; RING_ENTRIES],
                inflight,
                bounce_orphans,
            }, "zapguard_jobs"),
            cv <- new_condvar!("zapguard_jobs"),
        }))
    }

    /// Takes `slot`, the bounce buffer of the context of `asid`, for a READ/WRITE of `len`
    /// bytes, once no abandoned job of that context may still use it (unless `early`, the
    /// injected bug `ZG_INJ_EARLY_BOUNCE_REUSE`); allocates or grows it with `alloc(bytes)`
    /// (may sleep) when it is missing or too small. The device is told that the CPU took the
    /// buffer back (`PHYS_OP_RECLAIM`), or that it has a new one (`PHYS_OP_BOUNCE`).
    pub(crate) fn bounce<'a>(
        &self,
        slot: &'a BounceSlot,
        asid: u32,
        len: usize,
        (bar, health, early): (&DevresBar, &Health, bool),
        alloc: impl FnOnce(usize) -> Result<DmaMem>,
    ) -> Result<Bounce<'a>> {
        let mut guard = slot.buf.lock();
        if !early {
            self.wait_bounce_orphans(asid, bar, health)?;
        }
        if guard.as_ref().is_none_or(|b| b.size() < len) {
            // Nothing uses the old one: its orphans retired and its owner is us.
            *guard = None;
            let max = crate::abi::uapi::ZG_DMA_BOUNCE_MAX as usize;
            let buf = alloc(len.next_power_of_two().clamp(BOUNCE_MIN, max))?;
            self.lend(bar, abi_regs::PHYS_OP_BOUNCE, asid, Some(&buf));
            *guard = Some(buf);
        } else {
            self.lend(bar, abi_regs::PHYS_OP_RECLAIM, asid, None);
        }
        Ok(Bounce { guard })
    }

    /// Frees `slot`, the bounce buffer of the context of `asid`, once its jobs retired (the
    /// context is closing), and tells the device (`PHYS_OP_FORGET`).
    pub(crate) fn forget_bounce(&self, slot: &BounceSlot, asid: u32, bar: &DevresBar) {
        let mut guard = slot.buf.lock();
        if guard.take().is_some() {
            self.lend(bar, abi_regs::PHYS_OP_FORGET, asid, None);
        }
    }

    /// Writes `PHYS_CTRL` operation `op` for `asid`, with `mem` as its region if it names one,
    /// when the device checks untranslated DMA. Under the job lock: declarations share the
    /// staging registers.
    fn lend(&self, bar: &DevresBar, op: u32, asid: u32, mem: Option<&DmaMem>) {
        if !self.phys_check.load(Ordering::Relaxed) {
            return;
        }
        let _st = self.state.lock();
        let Some(io) = bar.try_access() else {
            return;
        };
        match mem {
            Some(mem) => declare(&io, op, asid, mem),
            None => io.write_reg(regs::PHYS_CTRL::from_raw(abi_regs::phys_ctrl(op, asid))),
        }
    }

    /// Waits until no orphaned job of `asid` may still use its context's bounce buffer.
    fn wait_bounce_orphans(&self, asid: u32, bar: &DevresBar, health: &Health) -> Result {
        let start = Instant::<Monotonic>::now();
        let mut st = self.state.lock();
        loop {
            self.retire(&mut st, bar)?;
            // A fenced device writes nothing any more.
            let orphans = st.bounce_orphans.get(asid as usize).copied().unwrap_or(0);
            if orphans == 0 || health.fenced() {
                return Ok(());
            }
            if health.failed() {
                return Err(EIO);
            }
            if start.elapsed() > job_timeout() {
                return Err(ETIMEDOUT);
            }
            st = wait_on(&self.cv, &self.state, st, OnSignal::Killable)?;
        }
    }

    fn status_record(&self, slot: usize) -> Result<dma::DmaStatus> {
        let mut words = [0u64; 4];
        for (i, w) in words.iter_mut().enumerate() {
            *w = self.status.read(slot * dma::DMA_STATUS_SIZE / 8 + i)?;
        }
        Ok(dma::DmaStatus::from_bytes(&crate::abi::words_to_bytes(
            words,
        )))
    }

    /// Accounts every job the device finished (DMAQ_CONS), copies their status records out and
    /// wakes waiters. `EIO` if the DMA queue stopped on an error, `ENXIO` if the device is gone.
    fn retire(&self, st: &mut JobState, bar: &DevresBar) -> Result {
        if st.retired == st.submitted {
            // Nothing outstanding: spare the MMIO read (an exit to the VMM each).
            return Ok(());
        }
        let Some(io) = bar.try_access() else {
            return Ok(());
        };
        let cons = io.read(regs::DMAQ_CONS);
        drop(io);
        if cons.into_raw() == u32::MAX {
            return Err(ENXIO);
        }
        let stopped = cons.err();
        let cons = queue::position(cons.position().get(), RING_LOG2);
        let mut progress = false;
        while st.cons != cons && st.retired < st.submitted {
            let slot = queue::index(st.cons, RING_LOG2) as usize;
            let asid = st.slot_asid[slot] as usize;
            if let Some(n) = st.inflight.get_mut(asid) {
                *n = n.saturating_sub(1);
            }
            st.slots[slot] = match st.slots[slot] {
                Slot::Orphaned { bounce } => {
                    if let Some(n) = st.bounce_orphans.get_mut(asid) {
                        *n -= u32::from(bounce);
                    }
                    Slot::Free
                }
                _ => Slot::Done(self.status_record(slot)?),
            };
            st.cons = queue::next(st.cons, RING_LOG2);
            st.retired += 1;
            progress = true;
        }
        if progress {
            self.cv.notify_all();
        }
        if stopped {
            return Err(EIO);
        }
        Ok(())
    }

    /// Command-vector interrupt: retires finished jobs (errors are for the waiters to see).
    pub(crate) fn complete(&self, bar: &DevresBar) {
        let mut st = self.state.lock();
        let _ = self.retire(&mut st, bar);
    }

    /// Wakes every waiter (they re-check the device's health).
    pub(crate) fn wake(&self) {
        self.cv.notify_all();
    }

    /// Queues `job` (its `status` and `id` are filled in) and rings the doorbell; returns the
    /// job's sequence number for [`Self::wait`]. `bounce` says the job uses the bounce buffer.
    /// Killable while the ring is full; errors as for [`Self::wait`] (the ring staying full for
    /// `job_timeout_ms` while `driver_busy()` is false is `ETIMEDOUT`).
    pub(crate) fn submit(
        &self,
        bar: &DevresBar,
        mut job: dma::DmaJob,
        bounce: bool,
        health: &Health,
        driver_busy: &dyn Fn() -> bool,
    ) -> Result<u64> {
        let mut idle_since = Instant::<Monotonic>::now();
        let mut st = self.state.lock();
        loop {
            if health.failed() {
                return Err(EIO);
            }
            self.retire(&mut st, bar)?;
            let slot = queue::index(st.prod, RING_LOG2) as usize;
            if queue::free(st.prod, st.cons, RING_LOG2) > 0 && matches!(st.slots[slot], Slot::Free)
            {
                break;
            }
            if driver_busy() {
                idle_since = Instant::<Monotonic>::now();
            } else if idle_since.elapsed() > job_timeout() {
                return Err(ETIMEDOUT);
            }
            st = wait_on(&self.cv, &self.state, st, OnSignal::Killable)?;
        }
        let slot = queue::index(st.prod, RING_LOG2) as usize;
        let asid = job.asid as usize;
        let seq = st.submitted;
        job.status = self.status.dma_address() + (slot * dma::DMA_STATUS_SIZE) as u64;
        job.id = seq;
        for i in 0..dma::DMA_STATUS_SIZE / 8 {
            self.status.write(slot * dma::DMA_STATUS_SIZE / 8 + i, 0)?;
        }
        let words: [u64; 8] = crate::abi::bytes_to_words(&job.to_bytes());
        for (i, w) in words.iter().enumerate() {
            self.ring.write(slot * dma::DMA_JOB_SIZE / 8 + i, *w)?;
        }
        let prod = queue::next(st.prod, RING_LOG2);
        {
            let io = bar.try_access().ok_or(ENODEV)?;
            io.write_reg(regs::DMAQ_PROD::zeroed().try_with_position(prod)?);
        }
        st.prod = prod;
        st.slot_asid[slot] = job.asid;
        st.slots[slot] = Slot::Queued { bounce };
        if let Some(n) = st.inflight.get_mut(asid) {
            *n += 1;
        }
        st.submitted += 1;
        Ok(seq)
    }

    /// Waits for job `seq` and returns its status record.
    ///
    /// Killable: a fatal signal ends the wait with `EINTR` and leaves the job to finish (its
    /// slot, and the bounce buffer if it uses it, stay out of reuse until it retires). `EIO` once
    /// the device failed or its DMA queue stopped, `ENXIO` if it is gone, `ETIMEDOUT` if the job
    /// made no progress for the `job_timeout_ms` parameter while `driver_busy()` was false (the
    /// job waits for nothing the driver is doing, such as serving its fault).
    pub(crate) fn wait(
        &self,
        bar: &DevresBar,
        seq: u64,
        health: &Health,
        driver_busy: &dyn Fn() -> bool,
    ) -> Result<JobDone> {
        let slot = (seq % RING_ENTRIES as u64) as usize;
        self.wait_slot(bar, slot, health, driver_busy)
            .inspect_err(|_| self.abandon(slot))
    }

    fn wait_slot(
        &self,
        bar: &DevresBar,
        slot: usize,
        health: &Health,
        driver_busy: &dyn Fn() -> bool,
    ) -> Result<JobDone> {
        let start = Instant::<Monotonic>::now();
        let mut idle_since = start;
        let mut st = self.state.lock();
        loop {
            let retired = self.retire(&mut st, bar);
            if let Slot::Done(status) = st.slots[slot] {
                st.slots[slot] = Slot::Free;
                self.cv.notify_all();
                return Ok(JobDone {
                    status,
                    elapsed: start.elapsed(),
                });
            }
            retired?;
            if health.failed() {
                return Err(EIO);
            }
            if driver_busy() {
                idle_since = Instant::<Monotonic>::now();
            } else if idle_since.elapsed() > job_timeout() {
                return Err(ETIMEDOUT);
            }
            st = wait_on(&self.cv, &self.state, st, OnSignal::Killable)?;
        }
    }

    /// The waiter of `slot` leaves: drop its result now, or when the job retires.
    fn abandon(&self, slot: usize) {
        let mut st = self.state.lock();
        let asid = st.slot_asid[slot] as usize;
        st.slots[slot] = match st.slots[slot] {
            Slot::Queued { bounce } => {
                if let Some(n) = st.bounce_orphans.get_mut(asid) {
                    *n += u32::from(bounce);
                }
                Slot::Orphaned { bounce }
            }
            _ => Slot::Free,
        };
        self.cv.notify_all();
    }

    /// Waits until no job of `asid` is queued or running (before the ASID can be reused).
    /// Returns at once once the device is fenced (it runs nothing any more); `ETIMEDOUT` if the
    /// jobs do not drain.
    pub(crate) fn wait_idle(&self, bar: &DevresBar, asid: u32, health: &Health) -> Result {
        let start = Instant::<Monotonic>::now();
        let mut st = self.state.lock();
        loop {
            let _ = self.retire(&mut st, bar);
            if st.inflight.get(asid as usize).copied().unwrap_or(0) == 0 || health.fenced() {
                return Ok(());
            }
            if health.failed() || start.elapsed() > job_timeout() {
                return Err(ETIMEDOUT);
            }
            st = wait_on(&self.cv, &self.state, st, OnSignal::Nap)?;
        }
    }
}

/// The device's DMA-visible memory and queue state (see the module documentation).
#[pin_data]
pub(crate) struct Hw {
    pub(crate) asid_count: u32,
    pub(crate) ctx: DmaMem,
    pub(crate) evtq: DmaMem,
    /// Event ring consumer position (only the event interrupt thread moves it).
    pub(crate) evt_cons: AtomicU32,
    #[pin]
    pub(crate) pool: PtPool,
    #[pin]
    pub(crate) cmdq: CmdQueue,
    #[pin]
    pub(crate) jobs: Jobs,
}

impl Hw {
    pub(crate) fn new(dev: &Device<Bound>, asid_count: u32) -> Result<impl PinInit<Self, Error>> {
        let ctx_words = (asid_count as usize)
            .checked_mul(pte::CTX_ENTRY_SIZE / 8)
            .ok_or(EINVAL)?;
        let ctx = DmaMem::zeroed(dev, ctx_words.max(PAGE_WORDS))?;
        let evtq = DmaMem::zeroed(
            dev,
            ((1 << EVT_LOG2) * crate::abi::event::EVT_SIZE / 8).max(PAGE_WORDS),
        )?;
        let pool = PtPool::new(dev)?;
        let cmdq = CmdQueue::new(dev)?;
        let jobs = Jobs::new(dev, asid_count as usize)?;
        Ok(try_pin_init!(Self {
            asid_count,
            ctx,
            evtq,
            evt_cons: AtomicU32::new(0),
            pool <- pool,
            cmdq <- cmdq,
            jobs <- jobs,
        }))
    }

    /// Wakes every waiter on the device (after a failure: they re-check its health).
    pub(crate) fn wake_all(&self) {
        self.cmdq.complete();
        self.jobs.wake();
    }

    /// Programs every unit and enables it, then waits for CR0ACK.
    pub(crate) fn enable(&self, bar: &Bar<'_>) -> Result {
        let (lo, hi) = split(self.ctx.dma_address());
        bar.write_reg(regs::CTX_BASE_LO::zeroed().with_value(lo));
        bar.write_reg(regs::CTX_BASE_HI::zeroed().with_value(hi));
        let (lo, hi) = split(self.cmdq.ring.dma_address());
        bar.write_reg(regs::CMDQ_BASE_LO::zeroed().with_value(lo));
        bar.write_reg(regs::CMDQ_BASE_HI::zeroed().with_value(hi));
        bar.write_reg(regs::CMDQ_LOG2SIZE::zeroed().with_value(RING_LOG2));
        let (lo, hi) = split(self.evtq.dma_address());
        bar.write_reg(regs::EVTQ_BASE_LO::zeroed().with_value(lo));
        bar.write_reg(regs::EVTQ_BASE_HI::zeroed().with_value(hi));
        bar.write_reg(regs::EVTQ_LOG2SIZE::zeroed().with_value(EVT_LOG2));
        let (lo, hi) = split(self.jobs.ring.dma_address());
        bar.write_reg(regs::DMAQ_BASE_LO::zeroed().with_value(lo));
        bar.write_reg(regs::DMAQ_BASE_HI::zeroed().with_value(hi));
        bar.write_reg(regs::DMAQ_LOG2SIZE::zeroed().with_value(RING_LOG2));
        bar.write_reg(
            regs::IRQ_CTRL::zeroed()
                .with_cmd_en(true)
                .with_evt_en(true)
                .with_err_en(true),
        );
        let all = regs::CR0::zeroed()
            .with_cmdq_en(true)
            .with_evtq_en(true)
            .with_dmaq_en(true)
            .with_ctx_en(true);
        bar.write_reg(all);
        handshake(bar, all.into_raw())?;
        self.declare_driver_memory(bar);
        Ok(())
    }

    /// Lends the device the driver memory it writes without translation (status records, event
    /// ring, SYNC word) and turns its physical-DMA check on (ABI 1.8; nothing on an older
    /// device). Bounce buffers are lent per context ([`Jobs::bounce`]).
    fn declare_driver_memory(&self, bar: &Bar<'_>) {
        if bar.read(regs::VERSION).minor().get() < 8 {
            return;
        }
        for mem in [&self.jobs.status, &self.evtq, &self.cmdq.sync_word] {
            declare(bar, abi_regs::PHYS_OP_DRIVER, 0, mem);
        }
        bar.write_reg(regs::PHYS_CTRL::from_raw(abi_regs::PHYS_OP_CHECK));
        self.jobs.phys_check.store(true, Ordering::Relaxed);
    }

    /// Writes context entry `asid` (`e.seq` is ignored). The device reads entries uncached at
    /// any time, so it must never act on one half-written: the entry's sequence word is made
    /// odd, then the other words are written, then it is made even again; the device uses an
    /// entry only when it read the same even sequence before and after the other words.
    /// Callers serialise the writes of one entry (they own its ASID).
    pub(crate) fn write_ctx(&self, asid: u32, e: &pte::ContextEntry) -> Result {
        let base = asid as usize * (pte::CTX_ENTRY_SIZE / 8);
        let seq = self.ctx.read(base + 3)? | 1;
        self.ctx.write(base + 3, seq)?;
        dma_mb(Write);
        self.ctx.write(base, e.flags)?;
        self.ctx.write(base + 1, e.pt_root)?;
        self.ctx.write(base + 2, e.cpu_root)?;
        dma_mb(Write);
        self.ctx.write(base + 3, seq.wrapping_add(1))
    }

    /// The event at ring position `pos`.
    pub(crate) fn event(&self, pos: u32) -> Result<crate::abi::event::Event> {
        let base = queue::index(pos, EVT_LOG2) as usize * (crate::abi::event::EVT_SIZE / 8);
        let mut words = [0u64; 4];
        for (i, w) in words.iter_mut().enumerate() {
            *w = self.evtq.read(base + i)?;
        }
        Ok(crate::abi::event::Event::from_bytes(
            &crate::abi::words_to_bytes(words),
        ))
    }
}

/// Declares `mem` to the device with `PHYS_CTRL` operation `op` for `asid` (ABI 1.8). The
/// caller keeps other declarations out meanwhile (the staging registers are shared).
fn declare(bar: &Bar<'_>, op: u32, asid: u32, mem: &DmaMem) {
    let (lo, hi) = split(mem.dma_address());
    bar.write_reg(regs::PHYS_ADDR_LO::zeroed().with_value(lo));
    bar.write_reg(regs::PHYS_ADDR_HI::zeroed().with_value(hi));
    let len = u32::try_from(mem.size()).unwrap_or(u32::MAX);
    bar.write_reg(regs::PHYS_LEN::zeroed().with_value(len));
    bar.write_reg(regs::PHYS_CTRL::from_raw(abi_regs::phys_ctrl(op, asid)));
}

/// The low and high halves of a 64-bit bus address, for a `_LO`/`_HI` register pair.
fn split(addr: u64) -> (u32, u32) {
    (addr as u32, (addr >> 32) as u32)
}

/// Polls CR0ACK until it equals `want` (a `CR0` value).
fn handshake(bar: &Bar<'_>, want: u32) -> Result {
    for _ in 0..HANDSHAKE_POLLS {
        if bar.read(regs::CR0ACK).into_raw() == want {
            return Ok(());
        }
        fsleep(Delta::from_micros(10));
    }
    Err(ETIMEDOUT)
}
