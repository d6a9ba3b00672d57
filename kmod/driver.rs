// SPDX-License-Identifier: GPL-2.0

//! The zapguard PCI driver and its `/dev/zapguard` misc device.
//!
//! Lifetimes: the PCI driver data ([`ZgDevice`]) lives from probe to unbind. Open files can outlive
//! an unbind, so they never borrow from it: they hold an [`Arc<Shared>`] whose BAR mapping is a
//! [`pci::DevresBar`], revoked by the driver core at unbind, after which ioctls return `ENODEV`.

use crate::abi::{cmd, event as ev, pci as zpci, pte, queue, regs, uapi};
use crate::hw::{DevresBar, Hw, Wait, BAR0_SIZE, EVT_LOG2};
use crate::mirror::{self, Context};
use core::pin::Pin;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use kernel::{
    device::Core,
    dma::{Device as _, DmaMask},
    fs::File,
    io::Io,
    irq::{self, IrqReturn},
    miscdevice::{MiscDevice, MiscDeviceOptions, MiscDeviceRegistration},
    new_mutex, new_spinlock, pci,
    prelude::*,
    sync::{Arc, Mutex, SpinLock},
    transmute::{AsBytes, FromBytes},
    uaccess::{UserPtr, UserSlice},
};

const NUM_VECTORS: usize = zpci::MSIX_VECTORS as usize;

// SAFETY: These uAPI structures are `repr(C)` and made only of integers laid out without padding
// (their sizes are asserted in the ABI), so every byte is initialised and any bytes are a valid
// value.
unsafe impl AsBytes for uapi::ZgInfo {}
// SAFETY: See above.
unsafe impl AsBytes for uapi::ZgMap {}
// SAFETY: See above.
unsafe impl FromBytes for uapi::ZgMap {}
// SAFETY: See above.
unsafe impl AsBytes for uapi::ZgDma {}
// SAFETY: See above.
unsafe impl FromBytes for uapi::ZgDma {}
// SAFETY: See above.
unsafe impl FromBytes for uapi::ZgSnapshot {}
// SAFETY: See above.
unsafe impl AsBytes for uapi::ZgStats {}
// SAFETY: See above.
unsafe impl FromBytes for uapi::ZgInject {}

/// Contexts by ASID, for the event thread. ASID 0 is never handed out.
struct AsidTable {
    used: KVec<bool>,
    /// Where the next search for a free ASID starts: round robin, so that an ASID is reused as
    /// late as possible (stale device state, and trace lines, are then easy to tell apart).
    next: usize,
    ctxs: KVec<Option<Arc<Context>>>,
}

/// State shared by the PCI device and every open file.
#[pin_data(PinnedDrop)]
pub(crate) struct Shared {
    /// BAR0, revoked by the driver core when the device unbinds.
    pub(crate) bar: DevresBar,
    /// Interrupts seen per MSI-X vector ([`zpci::Vector`] order).
    irqs: [AtomicU64; NUM_VECTORS],
    /// Vectors allocated at probe (set once the handlers, which need `Shared`, exist).
    irq_vectors: AtomicU32,
    /// PCI domain/bus/devfn, as reported by [`uapi::ZgInfo::pci_location`].
    pci_location: u32,
    /// Duration of the probe-time SYNC round trip.
    probe_sync_ns: AtomicU32,
    /// DMA memory and queues.
    #[pin]
    pub(crate) hw: Hw,
    /// Serialises consumers of the event ring (the event interrupt thread, and ioctls that
    /// drain it so that their answer includes every event the device already posted).
    #[pin]
    events: Mutex<()>,
    #[pin]
    asids: SpinLock<AsidTable>,
}

impl Shared {
    /// Reads the device's identity and parameters (live MMIO reads, so this also proves the path).
    fn info(&self) -> Result<uapi::ZgInfo> {
        let bar = self.bar.try_access().ok_or(ENODEV)?;
        Ok(uapi::ZgInfo {
            uapi_version: uapi::UAPI_VERSION,
            ident: bar.read32(regs::IDENT as usize),
            version: bar.read32(regs::VERSION as usize),
            caps: bar.read32(regs::CAPS as usize),
            iotlb_entries: bar.read32(regs::IOTLB_ENTRIES as usize),
            asid_count: bar.read32(regs::ASID_COUNT as usize),
            irq_vectors: self.irq_vectors.load(Ordering::Relaxed),
            pci_location: self.pci_location,
            irq_count: core::array::from_fn(|i| {
                let n = self.irqs.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
                u32::try_from(n).unwrap_or(u32::MAX)
            }),
            probe_sync_ns: self.probe_sync_ns.load(Ordering::Relaxed),
            reserved: [0; 4],
        })
    }

    /// A 64-bit device statistic (HI, LO, HI until stable), 0 if the device is gone.
    pub(crate) fn device_stat(&self, i: u32) -> u64 {
        let Some(bar) = self.bar.try_access() else {
            return 0;
        };
        loop {
            let hi = bar.try_read32(regs::stat_hi(i) as usize).unwrap_or(0);
            let lo = bar.try_read32(regs::stat_lo(i) as usize).unwrap_or(0);
            if bar.try_read32(regs::stat_hi(i) as usize).unwrap_or(0) == hi {
                return u64::from(hi) << 32 | u64::from(lo);
            }
        }
    }

    /// Sets the device's command lag (a test knob, see [`regs::CMD_LAG`]).
    pub(crate) fn set_cmd_lag(&self, lag: u32) {
        if let Some(bar) = self.bar.try_access() {
            bar.write32(lag, regs::CMD_LAG as usize);
        }
    }

    /// Takes a free ASID.
    pub(crate) fn alloc_asid(&self) -> Result<u32> {
        let mut t = self.asids.lock();
        let n = t.used.len();
        let start = t.next;
        let asid = (0..n)
            .map(|i| (start + i) % n)
            .find(|&a| a != 0 && !t.used[a])
            .ok_or(EBUSY)?;
        t.used[asid] = true;
        t.next = asid + 1;
        Ok(asid as u32)
    }

    /// Returns an ASID (its context is disabled and no job names it).
    pub(crate) fn free_asid(&self, asid: u32) {
        if let Some(u) = self.asids.lock().used.get_mut(asid as usize) {
            *u = false;
        }
    }

    /// Makes `ctx` reachable by its ASID from the event thread.
    pub(crate) fn publish(&self, asid: u32, ctx: Arc<Context>) -> Result {
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

    fn lookup(&self, asid: u32) -> Option<Arc<Context>> {
        self.asids.lock().ctxs.get(asid as usize)?.clone()
    }

    /// Command vector: SYNCs and DMA jobs completed.
    fn on_command(&self) {
        self.hw.cmdq.complete();
        self.hw.jobs.complete(&self.bar);
    }

    /// Event vector: consume the event ring; serve stalled faults (this sleeps: it runs in the
    /// vector's interrupt thread, or in an ioctl draining the ring).
    pub(crate) fn on_events(&self) {
        let _guard = self.events.lock();
        loop {
            let prod = match self.bar.try_access() {
                Some(bar) => bar.read32(regs::EVTQ_PROD as usize),
                None => return,
            };
            let prod = queue::position(prod & !regs::EVTQ_PROD_OVERFLOW, EVT_LOG2);
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
                    Some(bar) => bar.write32(cons, regs::EVTQ_CONS as usize),
                    None => return,
                }
            }
        }
    }

    fn handle_event(&self, e: &ev::Event) {
        let ctx = self.lookup(e.asid);
        if let Some(ctx) = ctx.as_deref() {
            ctx.on_event(e);
        }
        if e.ty != ev::EVT_FAULT || e.flags & ev::EVT_F_STALLED == 0 {
            return;
        }
        let write = e.flags & ev::EVT_F_WRITE != 0;
        let served = match ctx.as_deref() {
            Some(c) => mirror::serve_fault(c, e.va, write).inspect_err(|err| {
                c.record_abort(e.info2, *err);
            }),
            None => Err(ESRCH),
        };
        if let Some(c) = ctx.as_deref() {
            c.count_fault_result(served.is_ok());
        }
        let op = if served.is_ok() {
            cmd::CMD_RESUME
        } else {
            cmd::CMD_ABORT
        };
        let c = cmd::Command::new(op, 0, e.asid, 0, e.info);
        if let Err(err) = self.hw.cmdq.post(&self.bar, &[c], false, Wait::Sleep) {
            pr_err!("cannot answer stalled fault (asid {}): {:?}\n", e.asid, err);
        }
    }
}

#[pinned_drop]
impl PinnedDrop for Shared {
    fn drop(self: Pin<&mut Self>) {
        // The last file and the device are gone: every page table and ASID must be back.
        let lost = self.hw.pool.total() - self.hw.pool.free_pages();
        if lost != 0 {
            pr_err!("leak: {} device page-table pages not returned\n", lost);
        }
        let asids = self.asids.lock().used.iter().filter(|&&u| u).count();
        if asids != 0 {
            pr_err!("leak: {} ASIDs not returned\n", asids);
        }
    }
}

/// Interrupt handler for one MSI-X vector: the hard handler counts, the thread does the work.
struct VectorHandler {
    shared: Arc<Shared>,
    vector: usize,
}

impl irq::ThreadedHandler for VectorHandler {
    fn handle(&self) -> irq::ThreadedIrqReturn {
        if let Some(count) = self.shared.irqs.get(self.vector) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        irq::ThreadedIrqReturn::WakeThread
    }

    fn handle_threaded(&self) -> IrqReturn {
        match self.vector {
            v if v == zpci::Vector::Command as usize => self.shared.on_command(),
            v if v == zpci::Vector::Event as usize => self.shared.on_events(),
            _ => {
                if let Some(bar) = self.shared.bar.try_access() {
                    let err = bar.read32(regs::ERROR as usize);
                    let info = bar.read32(regs::ERROR_INFO as usize);
                    // Write-1-to-clear; a stopped command queue is left stopped (its SYNC
                    // waiters time out and report it).
                    bar.write32(err & !regs::ERR_CMDQ, regs::ERROR as usize);
                    pr_warn!("device error {:#x} (info {:#x})\n", err, info);
                }
            }
        }
        IrqReturn::Handled
    }
}

/// `/dev/zapguard`'s registration, paired with the state its files need.
///
/// # Invariants
///
/// Every `MiscDeviceRegistration<ZgFile>` is the `reg` field of a `MiscReg`: this is the only
/// place one is created, which lets [`ZgFile::open`] find `shared` with `container_of!`.
#[pin_data]
struct MiscReg {
    shared: Arc<Shared>,
    #[pin]
    reg: MiscDeviceRegistration<ZgFile>,
}

impl MiscReg {
    fn new(shared: Arc<Shared>) -> impl PinInit<Self, Error> {
        // `shared` is initialised first: open() can run as soon as `reg` is registered.
        try_pin_init!(Self {
            shared,
            reg <- MiscDeviceRegistration::register(MiscDeviceOptions { name: c"zapguard" }),
        })
    }
}

/// An open `/dev/zapguard`: one context.
struct ZgFile {
    shared: Arc<Shared>,
    ctx: Arc<Context>,
}

impl Drop for ZgFile {
    fn drop(&mut self) {
        self.ctx.shutdown();
    }
}

/// Reads an ioctl argument of type `T`.
fn read_arg<T: FromBytes>(arg: usize) -> Result<T> {
    UserSlice::new(UserPtr::from_addr(arg), core::mem::size_of::<T>())
        .reader()
        .read()
}

/// Writes an ioctl result of type `T`.
fn write_arg<T: AsBytes>(arg: usize, v: &T) -> Result {
    UserSlice::new(UserPtr::from_addr(arg), core::mem::size_of::<T>())
        .writer()
        .write(v)
}

/// Checks `[va, va + len)`: `EINVAL` if empty or wrapping, `EFAULT` if not device-addressable.
fn check_range(va: u64, len: u64) -> Result {
    let end = va.checked_add(len).ok_or(EINVAL)?;
    if len == 0 {
        return Err(EINVAL);
    }
    if end > pte::VA_LIMIT {
        return Err(EFAULT);
    }
    Ok(())
}

impl ZgFile {
    /// The context, if the caller may use it: `EINVAL` once its address space is gone, `EPERM`
    /// for a task of another address space (a context mirrors its opener only).
    fn ctx(&self) -> Result<&Context> {
        if self.ctx.released() {
            return Err(EINVAL);
        }
        let task = kernel::current!();
        let mine = task.mm().map(|m| m.as_raw());
        if mine != Some(self.ctx.mm().as_raw()) {
            return Err(EPERM);
        }
        Ok(&self.ctx)
    }

    fn map(&self, arg: usize) -> Result {
        let mut m: uapi::ZgMap = read_arg(arg)?;
        let page = pte::PAGE_SIZE - 1;
        if m.flags & !uapi::ZG_MAP_FLAGS != 0 || m.va & page != 0 || m.len & page != 0 {
            return Err(EINVAL);
        }
        check_range(m.va, m.len)?;
        let ctx = self.ctx()?;
        let mut out = mirror::MapOut::default();
        let r = mirror::populate(
            ctx,
            m.va,
            m.va + m.len,
            m.flags & uapi::ZG_MAP_WRITE != 0,
            &mut out,
        );
        m.retries = out.retries;
        m.pages = out.pages;
        m.huge = out.huge;
        write_arg(arg, &m)?;
        r
    }

    fn dma(&self, arg: usize) -> Result {
        use crate::abi::dma::*;
        let mut d: uapi::ZgDma = read_arg(arg)?;
        let op = u8::try_from(d.op).map_err(|_| EINVAL)?;
        if !(DMA_COPY..=DMA_COMPARE).contains(&op) || d.flags & !uapi::ZG_DMA_FLAGS != 0 {
            return Err(EINVAL);
        }
        if d.len == 0 || d.len > DMA_MAX_LEN {
            return Err(EINVAL);
        }
        if matches!(op, DMA_COPY | DMA_READ | DMA_CHECKSUM | DMA_COMPARE) {
            check_range(d.src, d.len)?;
        }
        if matches!(op, DMA_COPY | DMA_FILL | DMA_WRITE | DMA_COMPARE) {
            check_range(d.dst, d.len)?;
        }
        let bounce = matches!(op, DMA_READ | DMA_WRITE);
        if bounce && d.len > uapi::ZG_DMA_BOUNCE_MAX {
            return Err(EINVAL);
        }
        let ctx = self.ctx()?;
        let jobs = &self.shared.hw.jobs;
        let len = d.len as usize;
        // READ/WRITE own the bounce buffer from the copy-in to the copy-out.
        let mut owner = bounce.then(|| jobs.bounce_lock.lock());
        let aux = if bounce { jobs.bounce_addr() } else { d.aux };
        if op == DMA_WRITE {
            // SAFETY: `owner` holds the bounce lock and no job is using the buffer (jobs that
            // use it run under that lock and are waited for uninterruptibly).
            let buf = unsafe { jobs.bounce_bytes(owner.as_mut().ok_or(EINVAL)?, len)? };
            UserSlice::new(UserPtr::from_addr(d.aux as usize), len)
                .reader()
                .read_slice(buf)?;
        }
        let stall = if d.flags & uapi::ZG_DMA_NO_FAULT != 0 {
            0
        } else {
            DMA_F_STALL
        };
        let job = DmaJob {
            op,
            flags: DMA_F_IRQ | stall,
            asid: ctx.asid,
            src: d.src,
            dst: d.dst,
            len: d.len,
            aux,
            ..Default::default()
        };
        let seq = jobs.submit(&self.shared.bar, job)?;
        let done = jobs.wait(&self.shared.bar, seq, !bounce)?;
        // The job's events (violations) are in the ring by now: account them before answering.
        self.shared.on_events();
        ctx.count_job();
        let st = done.status;
        d.status = st.status.into();
        d.fault_reason = st.fault_reason.into();
        d.faults = st.faults;
        d.bytes_done = st.bytes_done;
        d.result = st.result;
        d.elapsed_ns = done.elapsed.as_nanos().max(0) as u64;
        let abort = if st.status == DMA_ST_FAULT {
            ctx.abort_error(seq)
        } else {
            None
        };
        d.error = abort.map_or(0, |e| e.to_errno());
        if op == DMA_READ && st.status == DMA_ST_OK {
            // SAFETY: As for DMA_WRITE above; the job has completed.
            let buf = unsafe { jobs.bounce_bytes(owner.as_mut().ok_or(EINVAL)?, len)? };
            UserSlice::new(UserPtr::from_addr(d.aux as usize), len)
                .writer()
                .write_slice(buf)?;
        }
        write_arg(arg, &d)?;
        match st.status {
            DMA_ST_OK => Ok(()),
            DMA_ST_FAULT => Err(abort.unwrap_or(EFAULT)),
            DMA_ST_BAD_JOB => Err(EINVAL),
            _ => Err(EIO),
        }
    }

    fn snapshot(&self, arg: usize) -> Result {
        let s: uapi::ZgSnapshot = read_arg(arg)?;
        if s.npages == 0
            || s.npages > uapi::ZG_SNAPSHOT_MAX_PAGES
            || s.va & (pte::PAGE_SIZE - 1) != 0
        {
            return Err(EINVAL);
        }
        check_range(s.va, s.npages * pte::PAGE_SIZE)?;
        let ctx = self.ctx()?;
        let n = s.npages as usize;
        let mut out = KVec::with_capacity(n, GFP_KERNEL)?;
        out.resize(n, 0u8, GFP_KERNEL)?;
        mirror::snapshot(ctx, s.va, &mut out)?;
        UserSlice::new(UserPtr::from_addr(s.out as usize), n)
            .writer()
            .write_slice(&out)
    }

    fn inject(&self, arg: usize) -> Result {
        // SAFETY: `capable()` only reads the current task's credentials.
        if !unsafe { kernel::bindings::capable(kernel::bindings::CAP_SYS_ADMIN as i32) } {
            return Err(EPERM);
        }
        let i: uapi::ZgInject = read_arg(arg)?;
        if i.modes & !uapi::ZG_INJ_MODES != 0 {
            return Err(EINVAL);
        }
        let ctx = self.ctx()?;
        pr_info!(
            "asid {}: injecting driver bugs {:#x}, device command lag {}\n",
            ctx.asid,
            i.modes,
            i.cmd_lag
        );
        mirror::set_inject(ctx, i.modes, i.cmd_lag)
    }
}

#[vtable]
impl MiscDevice for ZgFile {
    type Ptr = KBox<Self>;

    fn open(_file: &File, misc: &MiscDeviceRegistration<Self>) -> Result<KBox<Self>> {
        let reg = core::ptr::from_ref(misc).cast_mut();
        // SAFETY: by `MiscReg`'s invariant `misc` is the `reg` field of a `MiscReg`, which is
        // alive: the misc core calls open() only while the device is registered, and
        // deregistration (in `MiscReg`'s drop) waits for open() under `misc_mtx`.
        let outer = unsafe { &*kernel::container_of!(reg, MiscReg, reg) };
        let shared = outer.shared.clone();
        if shared.bar.try_access().is_none() {
            return Err(ENODEV);
        }
        let ctx = mirror::open(&shared)?;
        match KBox::new(
            Self {
                shared,
                ctx: ctx.clone(),
            },
            GFP_KERNEL,
        ) {
            Ok(f) => Ok(f),
            Err(e) => {
                ctx.shutdown();
                Err(e.into())
            }
        }
    }

    fn ioctl(me: &ZgFile, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        match cmd {
            uapi::ZG_IOC_GET_INFO => write_arg(arg, &me.shared.info()?)?,
            uapi::ZG_IOC_MAP => me.map(arg)?,
            uapi::ZG_IOC_DMA => me.dma(arg)?,
            uapi::ZG_IOC_SNAPSHOT => me.snapshot(arg)?,
            uapi::ZG_IOC_STATS => {
                // Readable by any task holding the file, even after the mm is gone.
                me.shared.on_events();
                write_arg(arg, &me.ctx.stats())?
            }
            uapi::ZG_IOC_INJECT => me.inject(arg)?,
            _ => return Err(ENOTTY),
        }
        Ok(0)
    }
}

/// MSI-X vectors and their (threaded) handlers.
///
/// # Invariants
///
/// `_handlers` (held only to be dropped) borrow from `*vectors` with a lifetime extended to
/// `'bound`. This is sound because `vectors` is heap-pinned (its address never changes) and lives
/// until `Drop`, which frees the handlers (`free_irq`) before the vectors
/// (`pci_free_irq_vectors`): fields drop in declaration order, `handlers` first.
struct Vectors<'bound> {
    _handlers: KVec<Pin<KBox<irq::ThreadedRegistration<'bound, VectorHandler>>>>,
    vectors: Pin<KBox<pci::IrqVectorRegistration<'bound>>>,
}

impl<'bound> Vectors<'bound> {
    fn new(pdev: &'bound pci::Device<Core<'_>>, shared: &Arc<Shared>) -> Result<Self> {
        let types = pci::IrqTypes::default().with(pci::IrqType::MsiX);
        let vectors = KBox::pin(
            pdev.alloc_irq_vectors(1, NUM_VECTORS as u32, types)?,
            GFP_KERNEL,
        )?;
        // SAFETY: see the type invariant: the allocation outlives every handler registered on it.
        let vref: &'bound pci::IrqVectorRegistration<'bound> =
            unsafe { &*core::ptr::from_ref(vectors.as_ref().get_ref()) };
        let mut handlers = KVec::with_capacity(vref.len(), GFP_KERNEL)?;
        for vector in 0..vref.len() {
            let handler = VectorHandler {
                shared: shared.clone(),
                vector,
            };
            // SAFETY: the registration is stored in `handlers` and dropped, never leaked.
            let reg = unsafe {
                irq::ThreadedRegistration::new(
                    vref.index(vector)?.into(),
                    irq::Flags::TRIGGER_NONE | irq::Flags::ONESHOT,
                    c"zapguard",
                    Ok::<_, Error>(handler),
                )
            };
            handlers.push(KBox::pin_init(reg, GFP_KERNEL)?, GFP_KERNEL)?;
        }
        Ok(Self {
            _handlers: handlers,
            vectors,
        })
    }
}

/// Per-device driver data, from probe to unbind.
#[pin_data]
pub struct ZgDevice<'bound> {
    pdev: &'bound pci::Device,
    /// Dropped first: no new opens once unbinding starts.
    #[pin]
    misc: MiscReg,
    irqs: Vectors<'bound>,
    shared: Arc<Shared>,
}

/// The PCI driver.
pub struct ZapguardDriver;

kernel::pci_device_table!(
    PCI_TABLE,
    <ZapguardDriver as pci::Driver>::IdInfo,
    // The Rust PCI API builds vendor IDs only from the kernel's known-vendor list, so match our
    // class code and check the IDs in probe (other IOMMU-class functions get ENODEV).
    [(pci::DeviceId::from_class(zpci::CLASS_CODE, 0xff_ffff), ())]
);

impl ZapguardDriver {
    /// Refuses anything that is not a zapguard device of our major ABI version with working MMIO.
    fn check_identity(pdev: &pci::Device<Core<'_>>, bar: &pci::Bar<'_, BAR0_SIZE>) -> Result {
        if pdev.vendor_id().as_raw() != zpci::VENDOR_ID || pdev.device_id() != zpci::DEVICE_ID {
            return Err(ENODEV);
        }
        let ident = bar.read32(regs::IDENT as usize);
        let version = bar.read32(regs::VERSION as usize);
        if ident != regs::IDENT_MAGIC {
            dev_err!(
                pdev,
                "bad IDENT {:#010x}, expected {:#010x}\n",
                ident,
                regs::IDENT_MAGIC
            );
            return Err(ENODEV);
        }
        if regs::version_major(version) != regs::VERSION_MAJOR {
            dev_err!(
                pdev,
                "unsupported ABI {}.{}, driver speaks {}.x\n",
                regs::version_major(version),
                regs::version_minor(version),
                regs::VERSION_MAJOR
            );
            return Err(ENODEV);
        }
        // A posted write followed by a read proves the MMIO path round-trips before we rely on it.
        for pattern in [!regs::IDENT_MAGIC, regs::IDENT_MAGIC.rotate_left(7), 0] {
            bar.write32(pattern, regs::SCRATCH as usize);
            let back = bar.read32(regs::SCRATCH as usize);
            if back != pattern {
                dev_err!(
                    pdev,
                    "SCRATCH read back {:#010x}, wrote {:#010x}\n",
                    back,
                    pattern
                );
                return Err(EIO);
            }
        }
        Ok(())
    }
}

impl pci::Driver for ZapguardDriver {
    type IdInfo = ();
    type Data<'bound> = ZgDevice<'bound>;

    const ID_TABLE: pci::IdTable<Self::IdInfo> = &PCI_TABLE;

    fn probe<'bound>(
        pdev: &'bound pci::Device<Core<'_>>,
        _info: Option<&'bound Self::IdInfo>,
    ) -> impl PinInit<Self::Data<'bound>, Error> + 'bound {
        pin_init::pin_init_scope(move || {
            pdev.enable_device_mem()?;
            pdev.set_master();
            let bar = pdev.iomap_region_sized::<BAR0_SIZE>(zpci::BAR0, c"zapguard")?;
            Self::check_identity(pdev, &bar)?;
            let version = bar.read32(regs::VERSION as usize);
            // SAFETY: called from probe, before any DMA allocation or mapping of this device.
            unsafe { pdev.dma_set_mask_and_coherent(DmaMask::new::<64>())? };
            let asid_count = bar.read32(regs::ASID_COUNT as usize).clamp(2, 4096);
            let hw = Hw::new(pdev.as_ref(), asid_count)?;
            let mut used = KVec::with_capacity(asid_count as usize, GFP_KERNEL)?;
            let mut ctxs = KVec::with_capacity(asid_count as usize, GFP_KERNEL)?;
            for _ in 0..asid_count {
                used.push(false, GFP_KERNEL)?;
                ctxs.push(None, GFP_KERNEL)?;
            }
            let location = u32::from(pdev.dev_id());
            let shared = Arc::pin_init(
                try_pin_init!(Shared {
                    bar: bar.into_devres()?,
                    irqs: [const { AtomicU64::new(0) }; NUM_VECTORS],
                    irq_vectors: AtomicU32::new(0),
                    pci_location: location,
                    probe_sync_ns: AtomicU32::new(0),
                    hw <- hw,
                    events <- new_mutex!((), "zapguard_events"),
                    asids <- new_spinlock!(AsidTable { used, next: 1, ctxs }, "zapguard_asids"),
                }),
                GFP_KERNEL,
            )?;
            let irqs = Vectors::new(pdev, &shared)?;
            shared
                .irq_vectors
                .store(irqs.vectors.len() as u32, Ordering::Relaxed);
            {
                // `access` with the bound device, not `try_access`: the handshake sleeps, which
                // an RCU read-side section (try_access's guard) forbids.
                let bar = shared.bar.access(pdev.as_ref())?;
                shared.hw.enable(bar).inspect_err(|_| {
                    dev_err!(pdev, "device did not acknowledge CR0\n");
                })?;
            }
            // Prove the whole path once: command ring -> device worker -> completion by DMA into
            // our memory -> MSI-X -> interrupt thread. A device that cannot do this is unusable.
            let start = kernel::time::Instant::<kernel::time::Monotonic>::now();
            let synced = shared
                .hw
                .cmdq
                .post(&shared.bar, &[], true, Wait::Sleep)
                .and_then(|seq| shared.hw.cmdq.wait(seq, Wait::Sleep));
            if let Err(e) = synced {
                dev_err!(pdev, "probe SYNC did not complete: {:?}\n", e);
                if let Ok(bar) = shared.bar.access(pdev.as_ref()) {
                    let _ = shared.hw.quiesce(bar);
                }
                return Err(e);
            }
            let ns = u32::try_from(start.elapsed().as_nanos()).unwrap_or(u32::MAX);
            shared.probe_sync_ns.store(ns, Ordering::Relaxed);
            dev_info!(
                pdev,
                "SYNC round trip {} us, {} CPU page-table levels\n",
                ns / 1000,
                crate::mm::cpu_pt_levels()
            );
            dev_info!(
                pdev,
                "zapguard ABI {}.{}, {} MSI-X vectors, /dev/zapguard\n",
                regs::version_major(version),
                regs::version_minor(version),
                irqs.vectors.len()
            );

            Ok(try_pin_init!(ZgDevice {
                pdev: &**pdev,
                misc <- MiscReg::new(shared.clone()),
                irqs,
                shared,
            }))
        })
    }

    fn unbind<'bound>(pdev: &'bound pci::Device<Core<'_>>, this: Pin<&Self::Data<'bound>>) {
        let seen: [u64; NUM_VECTORS] =
            core::array::from_fn(|i| this.shared.irqs[i].load(Ordering::Relaxed));
        dev_info!(pdev, "unbind: interrupts seen per vector {:?}\n", seen);
        // Open files keep the DMA memory alive, but the BAR goes: stop the device using it now.
        // `access` (no RCU section): quiescing sleeps while it polls CR0ACK.
        match this.shared.bar.access(pdev.as_ref()) {
            Ok(bar) => {
                if this.shared.hw.quiesce(bar).is_err() {
                    dev_err!(pdev, "device did not acknowledge CR0=0 at unbind\n");
                }
            }
            Err(_) => dev_err!(pdev, "BAR already revoked at unbind\n"),
        }
    }
}
