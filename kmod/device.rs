// SPDX-License-Identifier: GPL-2.0

//! The state one zapguard device shares with every open file: its BAR, DMA memory and queues,
//! ASIDs, event dispatch, and its health.
//!
//! # Health
//!
//! The driver never trusts the device to finish. A device is *live* until one of these happens:
//! a SYNC or a DMA job does not complete in time, a queue reports an error (`CONS_ERR`, the
//! error vector), a register reads all ones (the device is gone), or unbind cannot quiesce it.
//! Then it is *failed*: [`Shared::fail`] fences it with register writes that do not depend on the
//! command queue (`CR0 = 0`, confirmed by `CR0ACK` within [`FENCE_POLLS`] polls), and if that is
//! not confirmed it clears PCI bus mastering, which stops every DMA and MSI-X of the device. Only
//! once the fence is up is the device *fenced*: nothing it could do can touch memory any more, so
//! invalidations may return without a SYNC, and page-table pages may be freed. From then on
//! nothing waits on the device again, ioctls answer `EIO` (`ENODEV` after unbind), and teardown
//! completes at once. A fenced device stays fenced until it is unbound and probed again.
//!
//! # Locks
//!
//! | lock | kind | protects | taken under |
//! |---|---|---|---|
//! | `Shared::fence_lock` | mutex | the fence procedure (one at a time) | a context's lock |
//! | `Shared::events` | mutex | the event ring consumer | nothing |
//! | `Shared::asids` | spinlock | ASID states, contexts by ASID | `events`, a job waiter's `Jobs::state` |
//! | `Shared::asid_stat_sel` | mutex | the per-ASID statistics select, from the select to the reads | nothing (STATS and context creation take it alone) |
//! | `Shared::binding` | mutex | the device stays bound while a DMA map or bounce buffer is made for it (unbind waits for it) | a context's bounce lock; never a context's lock (what it guards allocates) |
//!
//! See [`crate::hw`] for the queue locks and [`crate::mirror`] for a context's lock.

#[cfg(zapguard_test)]
use crate::abi::testing;
use crate::abi::{cmd, event as ev, pci as zpci, queue, regs as abi_regs, uapi};
use crate::dmamap::Spare;
use crate::dmamem::DmaMem;
use crate::hw::{DevresBar, Health, Hw, Synced, Wait, EVT_LOG2};
use crate::regs;
use core::pin::Pin;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use kernel::{
    device::{Bound, Device},
    io::Io,
    pci,
    prelude::*,
    sync::{aref::ARef, Arc, ArcBorrow, Mutex, SpinLock},
    time::{delay::fsleep, Delta},
};

/// Vectors the device has.
pub(crate) const NUM_VECTORS: usize = zpci::MSIX_VECTORS as usize;
/// Polls of `CR0ACK` (10 us apart, ~65 us per read under TCG) before a fence falls back to
/// clearing bus mastering: about 20 ms.
const FENCE_POLLS: usize = 250;
/// Reads of a 64-bit statistic before one whose HI half held still is given up on (a device
/// that keeps changing it must not hold the reader forever).
const STAT_READ_TRIES: usize = 4;
/// Per-ASID statistics (`ASID_STAT_*`).
const ASID_STATS: usize = abi_regs::ASID_STAT_COUNT as usize;
const _: () = assert!(abi_regs::ASID_STAT_JUDGED == 0 && abi_regs::ASID_STAT_UNJUDGED == 1);

/// A 64-bit statistic whose halves are at `lo` and `hi`: HI, LO, HI until HI holds still, at
/// most [`STAT_READ_TRIES`] times (a counter moving so fast that HI changes under every read is
/// reported as read last).
fn read_split_u64(bar: &crate::hw::Bar<'_>, lo: u32, hi: u32) -> u64 {
    let mut value = 0;
    for _ in 0..STAT_READ_TRIES {
        let h = bar.try_read32(hi as usize).unwrap_or(0);
        let l = bar.try_read32(lo as usize).unwrap_or(0);
        value = u64::from(h) << 32 | u64::from(l);
        if bar.try_read32(hi as usize).unwrap_or(0) == h {
            break;
        }
    }
    value
}

/// Points the per-ASID statistics registers at `asid`, zeroing its counters if `clear`.
/// Callers hold `Shared::asid_stat_sel`.
fn select_asid_stats(bar: &crate::hw::Bar<'_>, asid: u32, clear: bool) -> Result {
    bar.write_reg(
        regs::ASID_STAT_SEL::zeroed()
            .try_with_asid(asid)?
            .with_clear(clear),
    );
    Ok(())
}

/// Error bits that mean the device can no longer be trusted to finish its work.
const FATAL_ERRORS: u32 = abi_regs::ERR_CMDQ | abi_regs::ERR_DMAQ_ABORT | abi_regs::ERR_EVTQ_ABORT;

/// Why a device was failed (for the log and for the error users get).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A SYNC did not complete within the timeout.
    SyncTimeout,
    /// A DMA job did not complete within the timeout.
    JobTimeout,
    /// A queue stopped on an error (`CONS_ERR`), or the command ring stayed full.
    QueueError,
    /// The error vector reported these fatal `ERR_*` bits.
    ErrorIrq(u32),
    /// A register read all ones: the device is gone.
    Gone,
    /// The device was unbound (quiesced, or fenced if it did not confirm).
    Unbound,
}

/// How the fence was put up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fence {
    /// The device confirmed `CR0 = 0`.
    Cr0Ack,
    /// The device did not confirm; bus mastering was cleared.
    BusMaster,
    /// Registers read all ones or the BAR is gone: nothing is there to do DMA.
    Absent,
}

/// What the ASID allocator knows about one ASID.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AsidState {
    Free,
    Used,
    /// Its teardown was never confirmed by the device: never reused on this device instance.
    Quarantined,
}

/// A context as the device layer sees it: what an ASID's events and the device-wide sweeps reach.
/// The hardware layer reports through this trait and never names the mirror, which implements it
/// (so the import graph has no cycle between the two).
pub(crate) trait AsidOwner: Send + Sync {
    /// A device event for this ASID, from the event thread: it must not block.
    fn on_event(self: ArcBorrow<'_, Self>, e: &ev::Event);
    /// Whether its fault in service is older than `job_timeout_ms`.
    fn has_overdue_fault(&self) -> bool;
    /// Aborts that fault (its job fails with `ETIMEDOUT`).
    fn abort_overdue_fault(&self);
    /// Unbind, after the fence: clears its device PTEs and unmaps its pages for DMA.
    fn unmap_for_unbind(&self);
}

/// The test build's debugfs directory of a device ([`crate::testing::device_dir`]); nothing in a
/// production build.
#[cfg(zapguard_test)]
pub(crate) type DebugDir = kernel::debugfs::Dir;
/// The test build's debugfs directory of a device; nothing in a production build.
#[cfg(not(zapguard_test))]
pub(crate) type DebugDir = ();

/// Contexts by ASID, for the event thread. ASID 0 is never handed out.
struct AsidTable {
    state: KVec<AsidState>,
    /// The address space (`mm_struct` address) each used ASID mirrors, to bound contexts per
    /// process.
    owner: KVec<usize>,
    /// Where the next search for a free ASID starts: round robin, so that an ASID is reused as
    /// late as possible (stale device state, and trace lines, are then easy to tell apart).
    next: usize,
    ctxs: KVec<Option<Arc<dyn AsidOwner>>>,
}

/// State shared by the PCI device and every open file.
///
/// # Invariants
///
/// `health` is marked fenced only by [`Shared::fail`], after the device provably stopped
/// touching memory (see the module documentation).
#[pin_data(PinnedDrop)]
pub(crate) struct Shared {
    /// BAR0, revoked by the driver core when the device unbinds.
    pub(crate) bar: DevresBar,
    /// The PCI device, to clear bus mastering when the device does not answer.
    pub(crate) pdev: ARef<pci::Device>,
    /// Interrupts seen per MSI-X vector ([`zpci::Vector`] order).
    pub(crate) irqs: [AtomicU64; NUM_VECTORS],
    /// Vectors allocated at probe (set once the handlers, which need `Shared`, exist).
    pub(crate) irq_vectors: AtomicU32,
    /// PCI domain/bus/devfn, as reported by [`uapi::ZgInfo::pci_location`].
    pci_location: u32,
    /// Duration of the probe-time SYNC round trip.
    pub(crate) probe_sync_ns: AtomicU32,
    /// Non-blockable invalidation callbacks of every context ([`uapi::ZgInfo`]).
    pub(crate) nonblock_invalidations: AtomicU64,
    /// Of those, the ones that gave up.
    pub(crate) nonblock_failed: AtomicU64,
    /// Stalled faults reported by the device and not answered yet, of every context: while
    /// there is one, the in-order DMA engine may be waiting for the driver, not stuck.
    faults_outstanding: AtomicU32,
    /// DMA memory and queues.
    #[pin]
    pub(crate) hw: Hw,
    /// Live, failed, fenced.
    pub(crate) health: Health,
    /// One fence at a time; waiters that saw `failed` take it to wait for the fence.
    #[pin]
    fence_lock: Mutex<()>,
    /// Serialises consumers of the event ring (the event interrupt thread, and ioctls that
    /// drain it so that their answer includes every event the device already posted).
    #[pin]
    events: Mutex<()>,
    #[pin]
    asids: SpinLock<AsidTable>,
    /// Held while a DMA map is made for the device, so that unbind (which waits for it) never
    /// overlaps one. Never taken under a context lock (the allocation may reclaim).
    #[pin]
    binding: Mutex<()>,
    /// The per-ASID statistics select register: held from selecting an ASID to reading its
    /// counters.
    #[pin]
    asid_stat_sel: Mutex<()>,
    /// Test builds: the device's debugfs directory (see [`crate::testing`]).
    #[cfg_attr(not(zapguard_test), allow(dead_code))]
    pub(crate) debugfs: DebugDir,
}

impl Failure {
    /// A small non-zero integer, for [`Health`].
    pub(crate) fn code(self) -> u32 {
        match self {
            Self::SyncTimeout => 1,
            Self::JobTimeout => 2,
            Self::QueueError => 3,
            Self::ErrorIrq(_) => 4,
            Self::Gone => 5,
            Self::Unbound => 6,
        }
    }
}

impl Shared {
    /// The initializer of the state of a device that passed its identity checks.
    pub(crate) fn new(
        pdev: &pci::Device,
        bar: DevresBar,
        hw: impl PinInit<Hw, Error>,
        asid_count: u32,
        debugfs: DebugDir,
    ) -> Result<impl PinInit<Self, Error>> {
        let n = asid_count as usize;
        let mut state = KVec::with_capacity(n, GFP_KERNEL)?;
        let mut owner = KVec::with_capacity(n, GFP_KERNEL)?;
        let mut ctxs = KVec::with_capacity(n, GFP_KERNEL)?;
        for _ in 0..n {
            state.push(AsidState::Free, GFP_KERNEL)?;
            owner.push(0, GFP_KERNEL)?;
            ctxs.push(None, GFP_KERNEL)?;
        }
        let table = AsidTable {
            state,
            owner,
            next: 1,
            ctxs,
        };
        let pci_location = u32::from(pdev.dev_id());
        let pdev: ARef<pci::Device> = pdev.into();
        Ok(try_pin_init!(Shared {
            bar,
            pdev,
            irqs: [const { AtomicU64::new(0) }; NUM_VECTORS],
            irq_vectors: AtomicU32::new(0),
            pci_location,
            probe_sync_ns: AtomicU32::new(0),
            nonblock_invalidations: AtomicU64::new(0),
            nonblock_failed: AtomicU64::new(0),
            faults_outstanding: AtomicU32::new(0),
            hw <- hw,
            health: Health::new(),
            fence_lock <- kernel::new_mutex!((), "zapguard_fence"),
            events <- kernel::new_mutex!((), "zapguard_events"),
            asids <- kernel::new_spinlock!(table, "zapguard_asids"),
            binding <- kernel::new_mutex!((), "zapguard_binding"),
            asid_stat_sel <- kernel::new_mutex!((), "zapguard_asid_stat_sel"),
            debugfs,
        }))
    }

    /// Whether the device failed (or was unbound): no new work may be given to it.
    pub(crate) fn failed(&self) -> bool {
        self.health.failed()
    }

    /// Whether the device can no longer touch memory (fenced after a failure, or unbound).
    pub(crate) fn fenced(&self) -> bool {
        self.health.fenced()
    }

    /// The error users get once the device failed: `ENODEV` after unbind, `EIO` otherwise.
    pub(crate) fn failure_error(&self) -> Error {
        if self.health.failure() == Failure::Unbound.code() {
            ENODEV
        } else {
            EIO
        }
    }

    /// Whether `e` only says that the device unbound under the caller: its DMA memory is gone
    /// (accesses fail with `ENODEV`, see [`crate::dmamem`]) and it is fenced, so whatever the
    /// caller was doing to the device's tables or queues no longer matters.
    pub(crate) fn unbound_under(&self, e: Error) -> bool {
        e == ENODEV && self.fenced()
    }

    /// `Ok` while the device is live, else [`Self::failure_error`].
    pub(crate) fn check_live(&self) -> Result {
        if self.failed() {
            return Err(self.failure_error());
        }
        Ok(())
    }

    /// Marks the device failed and fences it (see the module documentation); returns once the
    /// fence is up, whoever put it up. Sleeps (at most about [`FENCE_POLLS`] register polls).
    pub(crate) fn fail(&self, why: Failure) {
        self.health.set_failed(why.code());
        let _guard = self.fence_lock.lock();
        if self.fenced() {
            return;
        }
        let how = self.put_up_fence();
        // INVARIANT: the fence is up: the device confirmed, lost bus mastering, or is absent.
        self.health.set_fenced();
        if why != Failure::Unbound || how != Fence::Cr0Ack {
            dev_err!(
                self.pdev.as_ref(),
                "device failed ({:?}), fenced by {:?}: DMA stopped, users get {:?}\n",
                why,
                how,
                self.failure_error()
            );
        }
        // Waiters re-check the health at every wake-up.
        self.hw.wake_all();
    }

    /// Disables every unit through `CR0` and waits a short bound for `CR0ACK`; if the device
    /// does not confirm, clears bus mastering.
    fn put_up_fence(&self) -> Fence {
        match self.bar.try_access() {
            Some(bar) => bar.write_reg(regs::CR0::zeroed()),
            None => return Fence::Absent,
        }
        for _ in 0..FENCE_POLLS {
            let ack = match self.bar.try_access() {
                Some(bar) => bar.read(regs::CR0ACK).into_raw(),
                None => return Fence::Absent,
            };
            if ack == u32::MAX {
                return Fence::Absent;
            }
            if ack == 0 {
                return Fence::Cr0Ack;
            }
            fsleep(Delta::from_micros(10));
        }
        self.pdev.clear_master();
        Fence::BusMaster
    }

    /// Unbind: quiesce the device (fence it if it does not confirm) before the BAR goes, then
    /// unmap every user page any context mapped for its DMA (their dirty pages marked first):
    /// open files outlive the binding, their DMA mappings must not.
    pub(crate) fn unbind(&self) {
        self.fail(Failure::Unbound);
        // No DMA map is being made once this is taken (see `dma_spare`).
        drop(self.binding.lock());
        let n = self.asids.lock().ctxs.len();
        for asid in 0..n as u32 {
            if let Some(ctx) = self.lookup(asid) {
                ctx.unmap_for_unbind();
            }
        }
    }

    /// A DMA map for one 2 MiB block of user pages ([`crate::dmamap`]), while the device is
    /// live (else [`Self::failure_error`]). May sleep.
    pub(crate) fn dma_spare(&self) -> Result<Spare> {
        self.while_bound(Spare::new)
    }

    /// A zeroed coherent buffer of `bytes` for the device, while it is live. May sleep.
    pub(crate) fn coherent(&self, bytes: usize) -> Result<DmaMem> {
        self.while_bound(|dev| DmaMem::zeroed(dev, bytes / 8))
    }

    /// Runs `f` with the device, which stays bound meanwhile; [`Self::failure_error`] once
    /// it failed or is unbinding.
    fn while_bound<T>(&self, f: impl FnOnce(&Device<Bound>) -> Result<T>) -> Result<T> {
        let _binding = self.binding.lock();
        self.check_live()?;
        let dev: &Device = self.pdev.as_ref();
        // SAFETY: The device is bound for as long as `_binding` is held: it was live above, and
        // unbind marks it failed before it waits for this lock, and its driver's unbind does
        // not return before that.
        f(unsafe { dev.as_bound() })
    }

    /// Posts `cmds` and a SYNC, and waits for it, sleeping: the device confirmed, or it failed
    /// and is fenced. Either way the device no longer uses what the commands invalidated.
    pub(crate) fn sync(&self, cmds: &[cmd::Command]) -> Synced {
        match self.sync_how(cmds, Wait::Sleep) {
            Ok(s) => s,
            Err(_) => Synced::Fenced,
        }
    }

    /// Like [`Self::sync`], but never sleeps (non-blockable invalidations): `EAGAIN` when the
    /// SYNC did not complete within the spin bound, or the device failed and is not fenced yet.
    pub(crate) fn sync_nonblocking(&self, cmds: &[cmd::Command]) -> Result<Synced> {
        self.sync_how(cmds, Wait::Spin)
    }

    fn sync_how(&self, cmds: &[cmd::Command], how: Wait) -> Result<Synced> {
        if self.fenced() {
            return Ok(Synced::Fenced);
        }
        let failure = match self.hw.cmdq.post(&self.bar, cmds, true, how, &self.health) {
            Ok(seq) => match self.hw.cmdq.wait(seq, how, &self.health) {
                Ok(took) => return Ok(Synced::Done(took)),
                Err(e) if e == EAGAIN => return Err(EAGAIN),
                Err(e) if e == ETIMEDOUT => Failure::SyncTimeout,
                Err(_) => Failure::QueueError,
            },
            Err(e) if e == EAGAIN => return Err(EAGAIN),
            Err(e) if e == ENODEV => Failure::Unbound,
            Err(e) if e == ENXIO => Failure::Gone,
            Err(_) => Failure::QueueError,
        };
        if how == Wait::Spin {
            // Fencing sleeps: a non-blockable caller must give up (unless already fenced).
            return if self.fenced() {
                Ok(Synced::Fenced)
            } else {
                Err(EAGAIN)
            };
        }
        self.fail(failure);
        Ok(Synced::Fenced)
    }

    /// Reads the device's identity and parameters (live MMIO reads, so this also proves the path).
    pub(crate) fn info(&self) -> Result<uapi::ZgInfo> {
        self.check_live()?;
        let bar = self.bar.try_access().ok_or(ENODEV)?;
        Ok(uapi::ZgInfo {
            uapi_version: uapi::UAPI_VERSION,
            ident: bar.read(regs::IDENT).into_raw(),
            version: bar.read(regs::VERSION).into_raw(),
            caps: bar.read(regs::CAPS).into_raw(),
            iotlb_entries: bar.read(regs::IOTLB_ENTRIES).into_raw(),
            asid_count: bar.read(regs::ASID_COUNT).into_raw(),
            irq_vectors: self.irq_vectors.load(Ordering::Relaxed),
            pci_location: self.pci_location,
            irq_count: core::array::from_fn(|i| self.irqs.get(i).map_or(0, saturating_u32)),
            probe_sync_ns: self.probe_sync_ns.load(Ordering::Relaxed),
            nonblock_invalidations: saturating_u32(&self.nonblock_invalidations),
            nonblock_failed: saturating_u32(&self.nonblock_failed),
            ..Default::default()
        })
    }

    /// A 64-bit device statistic, 0 if the device failed or is gone.
    pub(crate) fn device_stat(&self, i: u32) -> u64 {
        if self.failed() {
            return 0;
        }
        let Some(bar) = self.bar.try_access() else {
            return 0;
        };
        // The statistics are an indexed block (`register!` arrays would repeat the ABI's
        // layout); the index is checked by `try_read32`.
        read_split_u64(&bar, abi_regs::stat_lo(i), abi_regs::stat_hi(i))
    }

    /// This ASID's judged and unjudged DMA steps (`ASID_STAT_*` order) since its context was
    /// opened ([`Self::clear_asid_stats`]); zeros if the device failed, is gone, or predates
    /// ABI 1.9.
    pub(crate) fn asid_stats(&self, asid: u32) -> [u64; ASID_STATS] {
        let mut out = [0; ASID_STATS];
        self.with_asid_stats(asid, false, |bar| {
            for (i, v) in (0u32..).zip(out.iter_mut()) {
                *v = read_split_u64(bar, abi_regs::asid_stat_lo(i), abi_regs::asid_stat_hi(i));
            }
        });
        out
    }

    /// Zeroes the device's per-ASID statistics of `asid`, which a new context now owns.
    pub(crate) fn clear_asid_stats(&self, asid: u32) {
        self.with_asid_stats(asid, true, |_| {});
    }

    /// Selects `asid`'s per-ASID statistics (zeroing them if `clear`) and runs `read` while
    /// they stay selected; nothing if the device failed, is gone, or predates ABI 1.9.
    fn with_asid_stats(&self, asid: u32, clear: bool, read: impl FnOnce(&crate::hw::Bar<'_>)) {
        if self.failed() {
            return;
        }
        // Taken before BAR access: the access guard is an RCU read-side section.
        let _selected = self.asid_stat_sel.lock();
        let Some(bar) = self.bar.try_access() else {
            return;
        };
        if bar.read(regs::VERSION).minor().get() >= 9
            && select_asid_stats(&bar, asid, clear).is_ok()
        {
            read(&bar);
        }
    }

    /// Sets the device's test knobs and failure injection from an `inject` write (device-wide),
    /// if the device is live.
    #[cfg(zapguard_test)]
    pub(crate) fn set_knobs(&self, i: &testing::ZgInject) {
        if self.failed() {
            return;
        }
        if let Some(bar) = self.bar.try_access() {
            let minor = bar.read(regs::VERSION).minor().get();
            let base = baseline_knobs();
            let cmd_lag = or_baseline(i.cmd_lag, base.cmd_lag);
            bar.write_reg(regs::CMD_LAG::zeroed().with_value(cmd_lag));
            let walk_lag = or_baseline(i.walk_lag, base.walk_lag);
            bar.write_reg(regs::WALK_LAG::zeroed().with_value(walk_lag));
            if minor >= 4 {
                let fault_lag = or_baseline(i.fault_lag, base.fault_lag);
                bar.write_reg(regs::FAULT_LAG::zeroed().with_value(fault_lag));
                let keep = i.iotlb_keep != 0 || base.iotlb_keep;
                bar.write_reg(regs::IOTLB_KEEP::zeroed().with_keep(keep));
            }
            if minor >= 5 {
                let sync_lag = or_baseline(i.sync_lag, base.sync_lag);
                bar.write_reg(regs::SYNC_LAG::zeroed().with_value(sync_lag));
            }
            bar.write_reg(regs::FAIL_ARG::zeroed().with_value(i.dev_fail_arg));
            // `dev_fail` was checked against the mode field's width by the ioctl.
            bar.write_reg(regs::FAIL_INJECT::from_raw(i.dev_fail));
        }
    }

    /// Points the device's table-lifetime check at the pool's freed-table bitmap (test builds,
    /// ABI 1.4): a walk through a page the driver has freed is then a `table_freed` violation.
    #[cfg(zapguard_test)]
    pub(crate) fn enable_table_lifetime_check(&self) {
        let Some((base, pages)) = self.hw.pool.freed_bitmap_location() else {
            return;
        };
        let Some(bar) = self.bar.try_access() else {
            return;
        };
        if bar.read(regs::VERSION).minor().get() < 4 {
            return;
        }
        bar.write_reg(regs::PT_FREED_BASE_LO::zeroed().with_value(base as u32));
        bar.write_reg(regs::PT_FREED_BASE_HI::zeroed().with_value((base >> 32) as u32));
        bar.write_reg(regs::PT_FREED_PAGES::zeroed().with_value(pages));
    }

    /// Puts the test knobs back to their baseline (when the context that set them closes): off,
    /// or what the `fault_lag_us`, `iotlb_keep`, `sync_lag_us`, `walk_lag_us` and `cmd_lag`
    /// module parameters ask for.
    #[cfg(zapguard_test)]
    pub(crate) fn reset_knobs(&self) {
        self.set_knobs(&testing::ZgInject::default());
    }

    /// Takes a free ASID for a context of the address space `owner`: `EBUSY` when every ASID is
    /// in use (or quarantined), or when `owner` already has `max_per_owner` contexts.
    pub(crate) fn alloc_asid(&self, owner: usize, max_per_owner: usize) -> Result<u32> {
        let mut t = self.asids.lock();
        let n = t.state.len();
        let owned = (0..n)
            .filter(|&a| t.state[a] == AsidState::Used && t.owner[a] == owner)
            .count();
        if owned >= max_per_owner {
            return Err(EBUSY);
        }
        let start = t.next;
        let asid = (0..n)
            .map(|i| (start + i) % n)
            .find(|&a| a != 0 && t.state[a] == AsidState::Free)
            .ok_or(EBUSY)?;
        t.state[asid] = AsidState::Used;
        t.owner[asid] = owner;
        t.next = asid + 1;
        Ok(asid as u32)
    }

    /// Returns an ASID whose teardown the device confirmed (or that it never saw). Freeing one
    /// that is not in use is a driver bug: it is reported and ignored, since the ASID may
    /// already be another context's, or quarantined.
    pub(crate) fn free_asid(&self, asid: u32) {
        let was = {
            let mut t = self.asids.lock();
            let Some(s) = t.state.get_mut(asid as usize) else {
                return;
            };
            let was = *s;
            if was == AsidState::Used {
                *s = AsidState::Free;
            }
            was
        };
        match was {
            AsidState::Used => {}
            AsidState::Free => dev_err!(self.pdev.as_ref(), "bug: ASID {} freed twice\n", asid),
            AsidState::Quarantined => {
                dev_err!(self.pdev.as_ref(), "bug: quarantined ASID {} freed\n", asid)
            }
        }
    }

    /// Keeps an ASID whose teardown was not confirmed out of reuse: the device may still hold
    /// translations or context state for it.
    pub(crate) fn quarantine_asid(&self, asid: u32) {
        if let Some(s) = self.asids.lock().state.get_mut(asid as usize) {
            *s = AsidState::Quarantined;
        }
    }

    /// Makes `ctx` reachable by its ASID from the event thread.
    pub(crate) fn publish(&self, asid: u32, ctx: Arc<dyn AsidOwner>) -> Result {
        let mut t = self.asids.lock();
        let slot = t.ctxs.get_mut(asid as usize).ok_or(EINVAL)?;
        *slot = Some(ctx);
        Ok(())
    }

    /// Stops delivering events to the context of `asid`.
    pub(crate) fn unpublish(&self, asid: u32) {
        let old = self
            .asids
            .lock()
            .ctxs
            .get_mut(asid as usize)
            .and_then(Option::take);
        // Dropped outside the spinlock: the last reference removes the notifier, which sleeps.
        drop(old);
    }

    fn lookup(&self, asid: u32) -> Option<Arc<dyn AsidOwner>> {
        self.asids.lock().ctxs.get(asid as usize)?.clone()
    }

    /// A stalled fault was handed to its context (see [`Self::device_waits_for_driver`]).
    pub(crate) fn fault_reported(&self) {
        self.faults_outstanding.fetch_add(1, Ordering::Relaxed);
    }

    /// A reported fault was answered (RESUME or ABORT), once.
    pub(crate) fn fault_answered(&self) {
        self.faults_outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether the device may be waiting for the driver rather than stuck: a stalled fault of
    /// any context is being served. A job queued behind another context's stalled job waits
    /// for that fault, so its waiter must not blame the device. Aborts every fault overdue
    /// first (`job_timeout_ms` in service: that job alone fails with `ETIMEDOUT`), so that one
    /// user's stall costs only its own job, whether or not its own waiter is still there.
    pub(crate) fn device_waits_for_driver(&self) -> bool {
        if self.faults_outstanding.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.abort_overdue_faults();
        self.faults_outstanding.load(Ordering::Relaxed) != 0
    }

    /// Aborts the overdue fault of every context that has one.
    fn abort_overdue_faults(&self) {
        const BATCH: usize = 8;
        loop {
            let mut overdue: [Option<Arc<dyn AsidOwner>>; BATCH] = Default::default();
            let mut n = 0;
            {
                let t = self.asids.lock();
                for ctx in t.ctxs.iter().flatten() {
                    if n < BATCH && ctx.has_overdue_fault() {
                        overdue[n] = Some(ctx.clone());
                        n += 1;
                    }
                }
            }
            // Outside the spinlock: answering posts a command, and the last reference to a
            // context may be dropped here.
            for ctx in overdue.iter().flatten() {
                ctx.abort_overdue_fault();
            }
            if n < BATCH {
                return;
            }
        }
    }

    /// Command vector: SYNCs and DMA jobs completed.
    pub(crate) fn on_command(&self) {
        self.hw.cmdq.complete();
        self.hw.jobs.complete(&self.bar);
    }

    /// Error vector: log and clear the error bits; fail the device on a fatal one.
    pub(crate) fn on_error(&self) {
        let (err, info) = match self.bar.try_access() {
            Some(bar) => {
                let err = bar.read(regs::ERROR).into_raw();
                let info = bar.read(regs::ERROR_INFO).into_raw();
                if err != u32::MAX {
                    // Write-1-to-clear; a stopped queue is left stopped (the device fails).
                    bar.write_reg(regs::ERROR::from_raw(err & !FATAL_ERRORS));
                }
                (err, info)
            }
            None => return,
        };
        if err == u32::MAX {
            self.fail(Failure::Gone);
        } else if err & FATAL_ERRORS != 0 {
            dev_err!(
                self.pdev.as_ref(),
                "device error {:#x} (info {:#x})\n",
                err,
                info
            );
            self.fail(Failure::ErrorIrq(err & FATAL_ERRORS));
        } else if err != 0 {
            dev_warn!(
                self.pdev.as_ref(),
                "device error {:#x} (info {:#x})\n",
                err,
                info
            );
        }
    }

    /// Event vector: consume the event ring and hand each event to its context. Never serves a
    /// fault here: stalled faults go to their context's own work (see [`crate::mirror`]), so one
    /// fault that blocks cannot hold up the ring, other contexts or ioctls.
    pub(crate) fn on_events(&self) {
        let _guard = self.events.lock();
        loop {
            let prod = match self.bar.try_access() {
                Some(bar) => bar.read(regs::EVTQ_PROD),
                None => return,
            };
            if prod.into_raw() == u32::MAX {
                drop(_guard);
                self.fail(Failure::Gone);
                return;
            }
            let prod = queue::position(prod.position().get(), EVT_LOG2);
            let mut cons = self.hw.evt_cons.load(Ordering::Relaxed);
            if cons == prod {
                return;
            }
            while cons != prod {
                if let Ok(e) = self.hw.event(cons) {
                    self.handle_event(&e);
                }
                cons = queue::next(cons, EVT_LOG2);
                self.hw.evt_cons.store(cons, Ordering::Relaxed);
                match self.bar.try_access() {
                    Some(bar) => match regs::EVTQ_CONS::zeroed().try_with_position(cons) {
                        Ok(r) => bar.write_reg(r),
                        Err(_) => return,
                    },
                    None => return,
                }
            }
        }
    }

    fn handle_event(&self, e: &ev::Event) {
        match self.lookup(e.asid) {
            Some(ctx) => ctx.as_arc_borrow().on_event(e),
            None if e.ty == ev::EVT_FAULT && e.flags & ev::EVT_F_STALLED != 0 => {
                // A context that is going away: its job must not stay stalled.
                self.answer_fault(e.asid, e.info, false);
            }
            None => {}
        }
    }

    /// Answers a stalled fault (`tag` from its event) with RESUME or ABORT. Never waits for the
    /// queue to drain, and does nothing once the device failed (the fence stopped the job).
    pub(crate) fn answer_fault(&self, asid: u32, tag: u64, resume: bool) {
        if self.failed() {
            return;
        }
        let op = if resume {
            cmd::CMD_RESUME
        } else {
            cmd::CMD_ABORT
        };
        let c = cmd::Command::new(op, 0, asid, 0, tag);
        match self
            .hw
            .cmdq
            .post(&self.bar, &[c], false, Wait::Sleep, &self.health)
        {
            Ok(_) => {}
            Err(e) if e == ENODEV => {}
            Err(e) => {
                dev_err!(
                    self.pdev.as_ref(),
                    "cannot answer stalled fault (asid {}): {:?}\n",
                    asid,
                    e
                );
                self.fail(Failure::QueueError);
            }
        }
    }
}

#[pinned_drop]
impl PinnedDrop for Shared {
    fn drop(self: Pin<&mut Self>) {
        // The last file and the device are gone: every page table and ASID must be back, except
        // ASIDs quarantined because the device never confirmed their teardown.
        let lost = self.hw.pool.total() - self.hw.pool.free_pages();
        if lost != 0 {
            dev_err!(
                self.pdev.as_ref(),
                "leak: {} device page-table pages not returned\n",
                lost
            );
        }
        let t = self.asids.lock();
        let used = t.state.iter().filter(|&&s| s == AsidState::Used).count();
        let quarantined = t
            .state
            .iter()
            .filter(|&&s| s == AsidState::Quarantined)
            .count();
        if used != 0 {
            dev_err!(self.pdev.as_ref(), "leak: {} ASIDs not returned\n", used);
        }
        if quarantined != 0 {
            dev_info!(
                self.pdev.as_ref(),
                "{} ASIDs were quarantined until the device reset\n",
                quarantined
            );
        }
    }
}

/// The device knobs every context starts from (module parameters, so that a whole guest suite
/// runs with a knob on).
#[cfg(zapguard_test)]
#[derive(Clone, Copy, Default)]
struct Baseline {
    /// `fault_lag_us`: the `FAULT_LAG` register.
    fault_lag: u32,
    /// `iotlb_keep`: the `IOTLB_KEEP` register.
    iotlb_keep: bool,
    /// `sync_lag_us`: the `SYNC_LAG` register (ABI 1.5).
    sync_lag: u32,
    /// `walk_lag_us`: the `WALK_LAG` register.
    walk_lag: u32,
    /// `cmd_lag`: the `CMD_LAG` register.
    cmd_lag: u32,
}

/// The [`Baseline`] the module parameters ask for.
#[cfg(zapguard_test)]
fn baseline_knobs() -> Baseline {
    Baseline {
        fault_lag: crate::module_parameters::fault_lag_us.value(),
        iotlb_keep: crate::module_parameters::iotlb_keep.value() != 0,
        sync_lag: crate::module_parameters::sync_lag_us.value(),
        walk_lag: crate::module_parameters::walk_lag_us.value(),
        cmd_lag: crate::module_parameters::cmd_lag.value(),
    }
}

/// A knob an `inject` write asks for, or the module parameter's baseline where it asks for 0.
#[cfg(zapguard_test)]
fn or_baseline(requested: u32, baseline: u32) -> u32 {
    if requested != 0 {
        requested
    } else {
        baseline
    }
}

/// A counter as the `u32` [`uapi::ZgInfo`] reports, saturating.
fn saturating_u32(c: &AtomicU64) -> u32 {
    u32::try_from(c.load(Ordering::Relaxed)).unwrap_or(u32::MAX)
}
