// SPDX-License-Identifier: GPL-2.0

//! The device's DMA-visible memory and the driver's side of its queues: the device page-table
//! pool, the context table, the command queue with SYNC completion, the DMA job ring and the
//! event ring.
//!
//! Everything here lives in [`Hw`], owned by the `Arc` that the PCI device and every open file
//! share: files can outlive an unbind, and the device must never see freed memory. Unbind
//! quiesces the device (`CR0 = 0`) before the BAR is revoked, after which nothing here is
//! touched by the device; the memory itself is freed when the last file closes.
//!
//! # Locks
//!
//! | lock | kind | protects | taken under |
//! |---|---|---|---|
//! | `PtPool::free` | spinlock | free table pages | a context's lock |
//! | `CmdQueue::state` | spinlock | command ring producer, SYNC sequence | a context's lock |
//! | `CmdQueue::done_lock` | mutex | SYNC completion wake-ups (with `done`) | a context's lock |
//! | `Jobs::state` | mutex | DMA ring, job bookkeeping (with `cv`) | nothing |
//! | `Jobs::bounce_lock` | mutex | the READ/WRITE bounce buffer | nothing |
//!
//! None of them is held while allocating with `GFP_KERNEL` or calling into the mm, so they are
//! all safe to take from an mmu_notifier callback (see [`crate::mm`]'s locking rules).

use crate::abi::{cmd, dma, pte, queue, regs};
use core::sync::atomic::AtomicU32;
use kernel::{
    device::{Bound, Device},
    dma::Coherent,
    io::Io,
    new_condvar, new_mutex, new_spinlock, pci,
    prelude::*,
    sync::{CondVar, CondVarTimeoutResult, Mutex, MutexGuard, SpinLock},
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
/// Upper bound for one SYNC to complete before the device is declared wedged.
const SYNC_TIMEOUT: Delta = Delta::from_secs(5);
/// How long a non-blockable invalidation may spin for its SYNC.
const NONBLOCK_SYNC_US: i64 = 20_000;
/// Upper bound for one DMA job (64 MiB with stalls served) before the device is declared wedged.
const JOB_TIMEOUT: Delta = Delta::from_secs(30);
/// Polls of CR0ACK before giving up on the enable/disable handshake (~65 us per read under TCG).
const HANDSHAKE_POLLS: usize = 1000;

/// How a condition wait treats a pending signal.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnSignal {
    /// Give up with `EINTR` (the caller can leave the work running).
    Interrupt,
    /// Keep waiting (the work cannot be abandoned): nap without the lock instead of spinning on
    /// the wait that a pending signal makes return at once.
    Nap,
}

/// Sleeps on `cv` (with `lock`, whose guard is `guard`) for up to 100 ms or a notification.
fn wait_on<'a, T>(
    cv: &CondVar,
    lock: &'a Mutex<T>,
    mut guard: MutexGuard<'a, T>,
    on_signal: OnSignal,
) -> Result<MutexGuard<'a, T>> {
    let r = cv.wait_interruptible_timeout(&mut guard, msecs_to_jiffies(100));
    if let CondVarTimeoutResult::Signal { .. } = r {
        if on_signal == OnSignal::Interrupt {
            return Err(EINTR);
        }
        drop(guard);
        fsleep(Delta::from_micros(50));
        guard = lock.lock();
    }
    Ok(guard)
}

/// Reads `words[i]` of a coherent buffer.
fn rd(buf: &Coherent<[u64]>, i: usize) -> Result<u64> {
    Ok(kernel::io::io_read!(buf, [try: i]))
}

/// Writes `words[i]` of a coherent buffer.
fn wr(buf: &Coherent<[u64]>, i: usize, v: u64) -> Result {
    kernel::io::io_write!(buf, [try: i], v);
    Ok(())
}

/// Writes a 64-bit address into a `_LO`/`_HI` register pair.
fn write_addr(bar: &Bar<'_>, lo: u32, hi: u32, addr: u64) -> Result {
    bar.try_write32(addr as u32, lo as usize)?;
    bar.try_write32((addr >> 32) as u32, hi as usize)
}

/// A device page-table page, by index in the [`PtPool`].
pub(crate) type PtPage = u32;

/// Device page-table pages, allocated at probe so that contexts can take and return pages with a
/// spinlock while holding their own lock (no allocation, hence no reclaim, in the shootdown path).
///
/// # Invariants
///
/// - Every page id `< total()` is either in `free` or owned by exactly one context.
/// - Pages in `free` are not referenced by any device PTE the device can reach.
#[pin_data]
pub(crate) struct PtPool {
    chunks: KVec<Coherent<[u64]>>,
    #[pin]
    free: SpinLock<KVec<PtPage>>,
}

impl PtPool {
    fn new(dev: &Device<Bound>) -> Result<impl PinInit<Self, Error>> {
        let mut chunks = KVec::with_capacity(POOL_CHUNKS, GFP_KERNEL)?;
        let mut free = KVec::with_capacity(POOL_CHUNKS * CHUNK_PAGES, GFP_KERNEL)?;
        for c in 0..POOL_CHUNKS {
            chunks.push(
                Coherent::zeroed_slice(dev, CHUNK_PAGES * PAGE_WORDS, GFP_KERNEL)?,
                GFP_KERNEL,
            )?;
            for p in 0..CHUNK_PAGES {
                free.push((c * CHUNK_PAGES + p) as PtPage, GFP_KERNEL)?;
            }
        }
        Ok(try_pin_init!(Self {
            chunks,
            free <- new_spinlock!(free, "zapguard_pt_pool"),
        }))
    }

    fn locate(&self, page: PtPage, idx: usize) -> Result<(&Coherent<[u64]>, usize)> {
        let page = page as usize;
        let chunk = self.chunks.get(page / CHUNK_PAGES).ok_or(EINVAL)?;
        if idx >= PAGE_WORDS {
            return Err(EINVAL);
        }
        Ok((chunk, (page % CHUNK_PAGES) * PAGE_WORDS + idx))
    }

    /// Entry `idx` of table `page`.
    pub(crate) fn read(&self, page: PtPage, idx: usize) -> Result<u64> {
        let (c, w) = self.locate(page, idx)?;
        rd(c, w)
    }

    /// Sets entry `idx` of table `page`.
    pub(crate) fn write(&self, page: PtPage, idx: usize, v: u64) -> Result {
        let (c, w) = self.locate(page, idx)?;
        wr(c, w, v)
    }

    /// The bus address of `page`.
    pub(crate) fn addr(&self, page: PtPage) -> Result<u64> {
        let (c, w) = self.locate(page, 0)?;
        Ok(c.dma_address() + (w * 8) as u64)
    }

    /// The page whose bus address is `addr` (a table pointer read back from a PTE).
    pub(crate) fn page_at(&self, addr: u64) -> Result<PtPage> {
        for (i, c) in self.chunks.iter().enumerate() {
            let base = c.dma_address();
            if addr >= base && addr - base < c.size() as u64 {
                return Ok((i * CHUNK_PAGES + ((addr - base) / pte::PAGE_SIZE) as usize) as PtPage);
            }
        }
        // A table pointer we did not write: the page table is corrupt.
        Err(EIO)
    }

    /// Takes a zeroed page, or `None` when the pool is exhausted. Never sleeps.
    pub(crate) fn alloc(&self) -> Result<Option<PtPage>> {
        let Some(page) = self.free.lock().pop() else {
            return Ok(None);
        };
        for i in 0..PAGE_WORDS {
            self.write(page, i, 0)?;
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
    /// was cleared and a SYNC covering that completed, or the context is disabled).
    pub(crate) fn free(&self, page: PtPage) {
        // Cannot fail: the vector was allocated with room for every page.
        let _ = self.free.lock().push_within_capacity(page);
    }
}

/// The command ring and the SYNC completion word.
#[pin_data]
pub(crate) struct CmdQueue {
    ring: Coherent<[u64]>,
    /// Word 0: the sequence number of the last completed SYNC (written by the device).
    sync_word: Coherent<[u64]>,
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
    /// Last consumer position read from the device.
    cons: u32,
    /// Sequence number of the last SYNC posted.
    seq: u32,
}

/// How a SYNC wait may wait.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Sleep until the command interrupt (bounded by [`SYNC_TIMEOUT`]).
    Sleep,
    /// Never sleep: spin for at most [`NONBLOCK_SYNC_US`] (non-blockable mmu_notifier ranges).
    Spin,
}

impl CmdQueue {
    fn new(dev: &Device<Bound>) -> Result<impl PinInit<Self, Error>> {
        let ring = Coherent::zeroed_slice(
            dev,
            (RING_ENTRIES * cmd::CMD_SIZE / 8).max(PAGE_WORDS),
            GFP_KERNEL,
        )?;
        let sync_word = Coherent::zeroed_slice(dev, PAGE_WORDS, GFP_KERNEL)?;
        Ok(try_pin_init!(Self {
            ring,
            sync_word,
            state <- new_spinlock!(CmdState { prod: 0, cons: 0, seq: 0 }, "zapguard_cmdq"),
            done_lock <- new_mutex!((), "zapguard_sync_done"),
            done <- new_condvar!("zapguard_sync_done"),
        }))
    }

    /// Posts `cmds`, followed by a SYNC (with interrupt) if `sync`, and rings the doorbell.
    /// Returns the SYNC's sequence number for [`Self::wait`].
    ///
    /// With [`Wait::Spin`] a full ring fails with `EAGAIN` instead of sleeping. `ENODEV` when the
    /// device is gone (unbound: it was quiesced, nothing to invalidate), `EIO` when the command
    /// queue stopped on an error.
    pub(crate) fn post(
        &self,
        bar: &DevresBar,
        cmds: &[cmd::Command],
        sync: bool,
        how: Wait,
    ) -> Result<u32> {
        let need = cmds.len() as u32 + u32::from(sync);
        for _ in 0..100_000 {
            {
                let io = bar.try_access().ok_or(ENODEV)?;
                let mut st = self.state.lock();
                if queue::free(st.prod, st.cons, RING_LOG2) < need {
                    let cons = io.read32(regs::CMDQ_CONS as usize);
                    if cons & regs::CONS_ERR != 0 {
                        return Err(EIO);
                    }
                    st.cons = queue::position(cons, RING_LOG2);
                }
                if queue::free(st.prod, st.cons, RING_LOG2) >= need {
                    let mut prod = st.prod;
                    let mut put = |c: &cmd::Command| -> Result {
                        let slot = queue::index(prod, RING_LOG2) as usize * (cmd::CMD_SIZE / 8);
                        let words: [u64; 4] = crate::abi::bytes_to_words(&c.to_bytes());
                        for (i, w) in words.iter().enumerate() {
                            wr(&self.ring, slot + i, *w)?;
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
                    io.write32(prod, regs::CMDQ_PROD as usize);
                    st.prod = prod;
                    st.seq = seq;
                    return Ok(seq);
                }
            }
            if how == Wait::Spin {
                return Err(EAGAIN);
            }
            fsleep(Delta::from_micros(20));
        }
        Err(ETIMEDOUT)
    }

    /// Whether the SYNC numbered `seq` has completed (SYNCs complete in order).
    fn sync_done(&self, seq: u32) -> bool {
        let done = rd(&self.sync_word, 0).unwrap_or(0) as u32;
        done.wrapping_sub(seq) as i32 >= 0
    }

    /// Waits for the SYNC numbered `seq`; returns how long it took.
    pub(crate) fn wait(&self, seq: u32, how: Wait) -> Result<Delta> {
        let start = Instant::<Monotonic>::now();
        match how {
            Wait::Spin => {
                let mut spun = 0;
                while !self.sync_done(seq) {
                    if spun >= NONBLOCK_SYNC_US {
                        return Err(EAGAIN);
                    }
                    udelay(Delta::from_micros(5));
                    spun += 5;
                }
            }
            Wait::Sleep => {
                let mut guard = self.done_lock.lock();
                while !self.sync_done(seq) {
                    if start.elapsed() > SYNC_TIMEOUT {
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

/// Job bookkeeping, under [`Jobs::state`].
struct JobState {
    /// Our producer position.
    prod: u32,
    /// Consumer position up to which jobs are retired.
    cons: u32,
    /// Jobs submitted (the next job's sequence number).
    submitted: u64,
    /// Jobs retired (completed and accounted).
    retired: u64,
    /// ASID of the job in each ring slot.
    slot_asid: [u32; RING_ENTRIES],
    /// Jobs queued or running, per ASID.
    inflight: KVec<u32>,
    /// The DMA queue stopped on an error or a job timed out: refuse new jobs.
    wedged: bool,
}

/// The DMA job ring, the status records (one per slot) and the READ/WRITE bounce buffer.
#[pin_data]
pub(crate) struct Jobs {
    ring: Coherent<[u64]>,
    status: Coherent<[u64]>,
    bounce: Coherent<[u64]>,
    #[pin]
    state: Mutex<JobState>,
    #[pin]
    cv: CondVar,
    /// Owner of `bounce` for a whole READ/WRITE (copy in, job, copy out).
    #[pin]
    pub(crate) bounce_lock: Mutex<()>,
}

impl Jobs {
    fn new(dev: &Device<Bound>, asid_count: usize) -> Result<impl PinInit<Self, Error>> {
        let mut inflight = KVec::with_capacity(asid_count, GFP_KERNEL)?;
        for _ in 0..asid_count {
            inflight.push(0u32, GFP_KERNEL)?;
        }
        let ring = Coherent::zeroed_slice(dev, RING_ENTRIES * dma::DMA_JOB_SIZE / 8, GFP_KERNEL)?;
        let status = Coherent::zeroed_slice(
            dev,
            (RING_ENTRIES * dma::DMA_STATUS_SIZE / 8).max(PAGE_WORDS),
            GFP_KERNEL,
        )?;
        let bounce = Coherent::zeroed_slice(
            dev,
            crate::abi::uapi::ZG_DMA_BOUNCE_MAX as usize / 8,
            GFP_KERNEL,
        )?;
        Ok(try_pin_init!(Self {
            ring,
            status,
            bounce,
            state <- new_mutex!(JobState {
                prod: 0,
                cons: 0,
                submitted: 0,
                retired: 0,
                slot_asid: [0; RING_ENTRIES],
                inflight,
                wedged: false,
            }, "zapguard_jobs"),
            cv <- new_condvar!("zapguard_jobs"),
            bounce_lock <- new_mutex!((), "zapguard_bounce"),
        }))
    }

    /// The bounce buffer's bus address.
    pub(crate) fn bounce_addr(&self) -> u64 {
        self.bounce.dma_address()
    }

    /// The first `len` bytes of the bounce buffer.
    ///
    /// # Safety
    ///
    /// `owner` is the guard of [`Self::bounce_lock`], and no job using the buffer is queued or
    /// running (the device is the only other party that touches it).
    pub(crate) unsafe fn bounce_bytes<'a>(
        &'a self,
        owner: &'a mut kernel::sync::MutexGuard<'_, ()>,
        len: usize,
    ) -> Result<&'a mut [u8]> {
        let _ = owner;
        if len > self.bounce.size() {
            return Err(EINVAL);
        }
        // SAFETY: The buffer is `size()` bytes of coherent memory, valid while `self` lives; by
        // the function's safety contract nobody else reads or writes it meanwhile.
        Ok(unsafe { core::slice::from_raw_parts_mut(self.bounce.as_mut_ptr().cast::<u8>(), len) })
    }

    /// Accounts every job the device finished (DMAQ_CONS) and wakes waiters.
    fn retire(&self, st: &mut JobState, bar: &DevresBar) {
        if st.retired == st.submitted {
            // Nothing outstanding: spare the MMIO read (an exit to the VMM each).
            return;
        }
        let Some(io) = bar.try_access() else {
            return;
        };
        let cons = io.read32(regs::DMAQ_CONS as usize);
        drop(io);
        if cons & regs::CONS_ERR != 0 {
            st.wedged = true;
        }
        let cons = queue::position(cons, RING_LOG2);
        let mut progress = false;
        while st.cons != cons && st.retired < st.submitted {
            let asid = st.slot_asid[queue::index(st.cons, RING_LOG2) as usize] as usize;
            if let Some(n) = st.inflight.get_mut(asid) {
                *n = n.saturating_sub(1);
            }
            st.cons = queue::next(st.cons, RING_LOG2);
            st.retired += 1;
            progress = true;
        }
        if progress {
            self.cv.notify_all();
        }
    }

    /// Command-vector interrupt: retires finished jobs.
    pub(crate) fn complete(&self, bar: &DevresBar) {
        let mut st = self.state.lock();
        self.retire(&mut st, bar);
    }

    /// Queues `job` (its `status` and `id` are filled in) and rings the doorbell; returns the
    /// job's sequence number for [`Self::wait`].
    pub(crate) fn submit(&self, bar: &DevresBar, mut job: dma::DmaJob) -> Result<u64> {
        let start = Instant::<Monotonic>::now();
        let mut st = self.state.lock();
        loop {
            if st.wedged {
                return Err(EIO);
            }
            self.retire(&mut st, bar);
            if queue::free(st.prod, st.cons, RING_LOG2) > 0 {
                break;
            }
            if start.elapsed() > JOB_TIMEOUT {
                return Err(ETIMEDOUT);
            }
            st = wait_on(&self.cv, &self.state, st, OnSignal::Interrupt)?;
        }
        let slot = queue::index(st.prod, RING_LOG2) as usize;
        let asid = job.asid as usize;
        let seq = st.submitted;
        job.status = self.status.dma_address() + (slot * dma::DMA_STATUS_SIZE) as u64;
        job.id = seq;
        for i in 0..dma::DMA_STATUS_SIZE / 8 {
            wr(&self.status, slot * dma::DMA_STATUS_SIZE / 8 + i, 0)?;
        }
        let words: [u64; 8] = crate::abi::bytes_to_words(&job.to_bytes());
        for (i, w) in words.iter().enumerate() {
            wr(&self.ring, slot * dma::DMA_JOB_SIZE / 8 + i, *w)?;
        }
        let prod = queue::next(st.prod, RING_LOG2);
        {
            let io = bar.try_access().ok_or(ENODEV)?;
            io.write32(prod, regs::DMAQ_PROD as usize);
        }
        st.prod = prod;
        st.slot_asid[slot] = job.asid;
        if let Some(n) = st.inflight.get_mut(asid) {
            *n += 1;
        }
        st.submitted += 1;
        Ok(seq)
    }

    /// Waits for job `seq` and returns its status record. With `interruptible`, a signal ends the
    /// wait with `EINTR` while the job keeps running (its slot is retired later, by whoever
    /// waits next or by the interrupt).
    pub(crate) fn wait(&self, bar: &DevresBar, seq: u64, interruptible: bool) -> Result<JobDone> {
        let start = Instant::<Monotonic>::now();
        let mut st = self.state.lock();
        loop {
            self.retire(&mut st, bar);
            if st.retired > seq {
                let slot = (seq % RING_ENTRIES as u64) as usize;
                let mut words = [0u64; 4];
                for (i, w) in words.iter_mut().enumerate() {
                    *w = rd(&self.status, slot * dma::DMA_STATUS_SIZE / 8 + i)?;
                }
                let status = dma::DmaStatus::from_bytes(&crate::abi::words_to_bytes(words));
                return Ok(JobDone {
                    status,
                    elapsed: start.elapsed(),
                });
            }
            if st.wedged {
                return Err(EIO);
            }
            if start.elapsed() > JOB_TIMEOUT {
                st.wedged = true;
                return Err(ETIMEDOUT);
            }
            let on_signal = if interruptible {
                OnSignal::Interrupt
            } else {
                OnSignal::Nap
            };
            st = wait_on(&self.cv, &self.state, st, on_signal)?;
        }
    }

    /// Waits until no job of `asid` is queued or running (before the ASID can be reused).
    pub(crate) fn wait_idle(&self, bar: &DevresBar, asid: u32) -> Result {
        let start = Instant::<Monotonic>::now();
        let mut st = self.state.lock();
        loop {
            self.retire(&mut st, bar);
            if st.inflight.get(asid as usize).copied().unwrap_or(0) == 0 {
                return Ok(());
            }
            if st.wedged || bar.try_access().is_none() || start.elapsed() > JOB_TIMEOUT {
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
    pub(crate) ctx: Coherent<[u64]>,
    pub(crate) evtq: Coherent<[u64]>,
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
        let ctx = Coherent::zeroed_slice(dev, ctx_words.max(PAGE_WORDS), GFP_KERNEL)?;
        let evtq = Coherent::zeroed_slice(
            dev,
            ((1 << EVT_LOG2) * crate::abi::event::EVT_SIZE / 8).max(PAGE_WORDS),
            GFP_KERNEL,
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

    /// Programs every unit and enables it, then waits for CR0ACK.
    pub(crate) fn enable(&self, bar: &Bar<'_>) -> Result {
        write_addr(
            bar,
            regs::CTX_BASE_LO,
            regs::CTX_BASE_HI,
            self.ctx.dma_address(),
        )?;
        for (lo, hi, size, addr, log2) in [
            (
                regs::CMDQ_BASE_LO,
                regs::CMDQ_BASE_HI,
                regs::CMDQ_LOG2SIZE,
                self.cmdq.ring.dma_address(),
                RING_LOG2,
            ),
            (
                regs::EVTQ_BASE_LO,
                regs::EVTQ_BASE_HI,
                regs::EVTQ_LOG2SIZE,
                self.evtq.dma_address(),
                EVT_LOG2,
            ),
            (
                regs::DMAQ_BASE_LO,
                regs::DMAQ_BASE_HI,
                regs::DMAQ_LOG2SIZE,
                self.jobs.ring.dma_address(),
                RING_LOG2,
            ),
        ] {
            write_addr(bar, lo, hi, addr)?;
            bar.try_write32(log2, size as usize)?;
        }
        bar.write32(
            regs::IRQ_CMD_EN | regs::IRQ_EVT_EN | regs::IRQ_ERR_EN,
            regs::IRQ_CTRL as usize,
        );
        bar.write32(regs::CR0_MASK, regs::CR0 as usize);
        handshake(bar, regs::CR0_MASK)
    }

    /// Disables every unit and waits until the device acknowledges: after this the device no
    /// longer touches any memory here.
    pub(crate) fn quiesce(&self, bar: &Bar<'_>) -> Result {
        bar.write32(0, regs::CR0 as usize);
        handshake(bar, 0)
    }

    /// Writes context entry `asid`. The device's validator reads entries uncached at any time,
    /// so the entry is never seen half-written: flags are cleared first (a reader sees "not
    /// valid, not validated"), then the addresses are written, then the new flags.
    pub(crate) fn write_ctx(&self, asid: u32, e: &pte::ContextEntry) -> Result {
        let base = asid as usize * (pte::CTX_ENTRY_SIZE / 8);
        wr(&self.ctx, base, 0)?;
        wr(&self.ctx, base + 1, e.pt_root)?;
        wr(&self.ctx, base + 2, e.cpu_root)?;
        wr(&self.ctx, base + 3, e.reserved)?;
        wr(&self.ctx, base, e.flags)
    }

    /// The event at ring position `pos`.
    pub(crate) fn event(&self, pos: u32) -> Result<crate::abi::event::Event> {
        let base = queue::index(pos, EVT_LOG2) as usize * (crate::abi::event::EVT_SIZE / 8);
        let mut words = [0u64; 4];
        for (i, w) in words.iter_mut().enumerate() {
            *w = rd(&self.evtq, base + i)?;
        }
        Ok(crate::abi::event::Event::from_bytes(
            &crate::abi::words_to_bytes(words),
        ))
    }
}

/// Polls CR0ACK until it equals `want`.
fn handshake(bar: &Bar<'_>, want: u32) -> Result {
    for _ in 0..HANDSHAKE_POLLS {
        if bar.read32(regs::CR0ACK as usize) == want {
            return Ok(());
        }
        fsleep(Delta::from_micros(10));
    }
    Err(ETIMEDOUT)
}
