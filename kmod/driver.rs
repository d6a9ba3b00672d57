// SPDX-License-Identifier: GPL-2.0

//! The zapguard PCI driver, its `/dev/zapguard` misc device and the test_hmm-compatible
//! `/dev/zapguard_hmm0` and `1` ([`crate::hmm_uapi`]).
//!
//! Lifetimes: the PCI driver data ([`ZgDevice`]) lives from probe to unbind. Open files can outlive
//! an unbind, so they never borrow from it: they hold an [`Arc<Shared>`] whose BAR mapping is a
//! [`pci::DevresBar`], revoked by the driver core at unbind, after which ioctls return `ENODEV`.

use crate::abi::{pci as zpci, pte, regs as abi_regs, uapi};
use crate::context_file::{bounce, check_range, open_context, run_job, usable_context, MiscReg};
use crate::device::{Shared, NUM_VECTORS};
use crate::hmm_uapi::HmmFile;
use crate::hw::{Hw, Synced, BAR0_SIZE};
use crate::mirror::{self, Access, Context, ContextShutdown, Walk};
use crate::regs;
use crate::uarg::{answer_ext, read_ext, write_ext};
use core::pin::Pin;
use core::sync::atomic::Ordering;
use kernel::{
    device::Core,
    dma::{Device as _, DmaMask},
    fs::File,
    io::Io,
    irq::{self, IrqReturn},
    miscdevice::{MiscDevice, MiscDeviceRegistration},
    pci,
    prelude::*,
    sync::Arc,
    uaccess::{UserPtr, UserSlice},
};

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
            _ => self.shared.on_error(),
        }
        IrqReturn::Handled
    }
}

impl<T: MiscDevice> MiscReg<T> {
    /// [`Self::new`] for the probe's last registration, which a test build fails on purpose
    /// when told to (`probe_fail_at=2`).
    fn new_last(shared: Arc<Shared>, name: &'static CStr) -> impl PinInit<Self, Error> {
        pin_init::pin_init_scope(move || {
            injected_probe_failure(ProbeStep::Misc)?;
            Ok(Self::new(shared, name))
        })
    }
}

/// An open `/dev/zapguard`: one context.
struct ZgFile {
    shared: Arc<Shared>,
    ctx: Arc<Context>,
    /// Test builds: the context's debugfs `inject` file.
    #[cfg(zapguard_test)]
    knobs: Option<crate::testing::ContextKnobs>,
}

impl ZgFile {
    fn new(shared: Arc<Shared>, ctx: Arc<Context>) -> Result<Self> {
        Ok(Self {
            #[cfg(zapguard_test)]
            knobs: Some(crate::testing::ContextKnobs::new(
                &shared.debugfs,
                ctx.clone(),
            )?),
            shared,
            ctx,
        })
    }
}

impl Drop for ZgFile {
    fn drop(&mut self) {
        // No write to the context's debugfs file runs once it is removed.
        #[cfg(zapguard_test)]
        drop(self.knobs.take());
        self.ctx.shutdown();
    }
}

impl ZgFile {
    fn ctx(&self) -> Result<&Context> {
        usable_context(&self.shared, &self.ctx)
    }

    fn map(&self, arg: usize) -> Result {
        let mut m: uapi::ZgMap = read_ext(arg)?;
        let page = pte::PAGE_SIZE - 1;
        if m.flags & !uapi::ZG_MAP_FLAGS != 0 || m.pad != 0 || m.va & page != 0 || m.len & page != 0
        {
            return Err(EINVAL);
        }
        check_range(m.va, m.len)?;
        let ctx = self.ctx()?;
        let mut out = mirror::MapOut::default();
        let access = if m.flags & uapi::ZG_MAP_WRITE != 0 {
            Access::Write
        } else {
            Access::Read
        };
        let r = mirror::populate(ctx, m.va, m.va + m.len, access, Walk::Locked, &mut out);
        m.retries = out.retries;
        m.pages = out.pages;
        m.huge = out.huge;
        write_ext(arg, &m)?;
        r
    }

    /// Checks a DMA request and builds its job (without the bounce address).
    fn dma_job(&self, d: &uapi::ZgDma, ctx: &Context) -> Result<crate::abi::dma::DmaJob> {
        use crate::abi::dma::*;
        let op = u8::try_from(d.op).map_err(|_| EINVAL)?;
        if !(DMA_COPY..=DMA_COMPARE).contains(&op)
            || d.flags & !uapi::ZG_DMA_FLAGS != 0
            || d.pad != 0
        {
            return Err(EINVAL);
        }
        if matches!(op, DMA_COPY | DMA_READ | DMA_CHECKSUM | DMA_COMPARE) {
            check_range(d.src, d.len)?;
        }
        if matches!(op, DMA_COPY | DMA_FILL | DMA_WRITE | DMA_COMPARE) {
            check_range(d.dst, d.len)?;
        }
        if matches!(op, DMA_READ | DMA_WRITE) && d.len > uapi::ZG_DMA_BOUNCE_MAX {
            return Err(EINVAL);
        }
        let stall = if d.flags & uapi::ZG_DMA_NO_FAULT != 0 {
            0
        } else {
            DMA_F_STALL
        };
        Ok(DmaJob {
            op,
            flags: DMA_F_IRQ | stall,
            asid: ctx.asid,
            src: d.src,
            dst: d.dst,
            len: d.len,
            aux: d.aux,
            ..Default::default()
        })
    }

    fn run_job(
        &self,
        ctx: &Context,
        job: crate::abi::dma::DmaJob,
        bounce: bool,
    ) -> Result<crate::hw::JobDone> {
        run_job(&self.shared, ctx, job, bounce)
    }

    fn dma(&self, arg: usize) -> Result {
        use crate::abi::dma::*;
        let mut d: uapi::ZgDma = read_ext(arg)?;
        let ctx = self.ctx()?;
        let mut job = self.dma_job(&d, ctx)?;
        let len = d.len as usize;
        // READ/WRITE own the context's bounce buffer from the copy-in to the copy-out.
        let mut bounce = if matches!(job.op, DMA_READ | DMA_WRITE) {
            Some(bounce(&self.shared, ctx, len)?)
        } else {
            None
        };
        if let Some(b) = bounce.as_mut() {
            job.aux = b.addr()?;
            if job.op == DMA_WRITE {
                b.fill_from_user(d.aux as usize, len)?;
            }
        }
        let done = self.run_job(ctx, job, bounce.is_some())?;
        let st = done.status;
        d.status = st.status.into();
        d.fault_reason = st.fault_reason.into();
        d.faults = st.faults;
        d.bytes_done = st.bytes_done;
        d.result = st.result;
        d.elapsed_ns = done.elapsed.as_nanos().max(0) as u64;
        let abort = if st.status == DMA_ST_FAULT {
            ctx.abort_error(st.id)
        } else {
            None
        };
        d.error = abort.map_or(0, |e| e.to_errno());
        if let (Some(b), DMA_READ, DMA_ST_OK) = (bounce.as_ref(), job.op, st.status) {
            b.drain_to_user(d.aux as usize, len)?;
        }
        write_ext(arg, &d)?;
        match st.status {
            DMA_ST_OK => Ok(()),
            DMA_ST_FAULT => Err(abort.unwrap_or(EFAULT)),
            DMA_ST_BAD_JOB => Err(EINVAL),
            _ => Err(EIO),
        }
    }

    fn snapshot(&self, arg: usize) -> Result {
        let s: uapi::ZgSnapshot = read_ext(arg)?;
        if s.flags != 0
            || s.npages == 0
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
}

#[vtable]
impl MiscDevice for ZgFile {
    type Ptr = KBox<Self>;

    fn open(_file: &File, misc: &MiscDeviceRegistration<Self>) -> Result<KBox<Self>> {
        let (shared, ctx) = open_context(misc)?;
        match Self::new(shared, ctx.clone()).and_then(|f| Ok(KBox::new(f, GFP_KERNEL)?)) {
            Ok(f) => Ok(f),
            Err(e) => {
                ctx.shutdown();
                Err(e)
            }
        }
    }

    fn ioctl(me: &ZgFile, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        match cmd {
            uapi::ZG_IOC_GET_INFO => answer_ext(arg, || me.shared.info())?,
            uapi::ZG_IOC_MAP => me.map(arg)?,
            uapi::ZG_IOC_DMA => me.dma(arg)?,
            uapi::ZG_IOC_SNAPSHOT => me.snapshot(arg)?,
            uapi::ZG_IOC_STATS => {
                // Readable by any task holding the file, even after the mm is gone.
                me.shared.on_events();
                answer_ext(arg, || Ok(me.ctx.stats()))?
            }
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
    misc: MiscReg<ZgFile>,
    /// The test_hmm-compatible nodes (two, as `hmm2` fixtures open units 0 and 1).
    #[pin]
    hmm0: MiscReg<HmmFile>,
    #[pin]
    hmm1: MiscReg<HmmFile>,
    irqs: Vectors<'bound>,
    shared: Arc<Shared>,
    /// Initialised before the fallible misc registrations, whose failure drops it: the device
    /// is then quiesced before the rest of the probe's state goes.
    _quiesce: Quiesce,
}

/// Where a test build's probe fails on purpose (`probe_fail_at`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ProbeStep {
    /// Once the device is enabled, before the misc devices.
    Started = 1,
    /// At the last misc device's registration (a second device fails there: the names are
    /// fixed), once the device is enabled and the other nodes are registered.
    Misc = 2,
}

/// `EIO` where a test build is told to fail the probe (`probe_fail_at` = `step`).
fn injected_probe_failure(step: ProbeStep) -> Result {
    #[cfg(zapguard_test)]
    if crate::module_parameters::probe_fail_at.value() == step as u32 {
        pr_info!("probe fails on purpose (probe_fail_at={})\n", step as u32);
        return Err(EIO);
    }
    #[cfg(not(zapguard_test))]
    let _ = step;
    Ok(())
}

/// Quiesces (fences) the device when dropped: on a failed probe, and again (a no-op) after
/// unbind.
struct Quiesce(Arc<Shared>);

impl Drop for Quiesce {
    fn drop(&mut self) {
        self.0.unbind();
    }
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
        let ident = bar.read(regs::IDENT).into_raw();
        let version = bar.read(regs::VERSION);
        if ident != abi_regs::IDENT_MAGIC {
            dev_err!(
                pdev,
                "bad IDENT {:#010x}, expected {:#010x}\n",
                ident,
                abi_regs::IDENT_MAGIC
            );
            return Err(ENODEV);
        }
        let (major, minor) = (version.major().get(), version.minor().get());
        if major != u32::from(abi_regs::VERSION_MAJOR) {
            dev_err!(
                pdev,
                "unsupported ABI {}.{}, driver speaks {}.x\n",
                major,
                minor,
                abi_regs::VERSION_MAJOR
            );
            return Err(ENODEV);
        }
        // A posted write followed by a read proves the MMIO path round-trips before we rely on it.
        for pattern in [
            !abi_regs::IDENT_MAGIC,
            abi_regs::IDENT_MAGIC.rotate_left(7),
            0,
        ] {
            bar.write_reg(regs::SCRATCH::zeroed().with_value(pattern));
            let back = bar.read(regs::SCRATCH).into_raw();
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
            let version = bar.read(regs::VERSION);
            // SAFETY: called from probe, before any DMA allocation or mapping of this device.
            unsafe { pdev.dma_set_mask_and_coherent(DmaMask::new::<64>())? };
            let asid_count = bar.read(regs::ASID_COUNT).into_raw().clamp(2, 4096);
            let hw = Hw::new(pdev.as_ref(), asid_count)?;
            #[cfg(zapguard_test)]
            let debugfs = crate::testing::device_dir(pdev)?;
            #[cfg(not(zapguard_test))]
            let debugfs = ();
            let shared = Shared::new(pdev, bar.into_devres()?, hw, asid_count, debugfs)?;
            let shared = Arc::pin_init(shared, GFP_KERNEL)?;
            let irqs = Vectors::new(pdev, &shared)?;
            shared
                .irq_vectors
                .store(irqs.vectors.len() as u32, Ordering::Relaxed);
            // From here the device is enabled and masters the bus: a probe that fails must
            // quiesce it before its rings, context table and pool are freed.
            Self::start_device(pdev, &shared)
                .and_then(|()| injected_probe_failure(ProbeStep::Started))
                .inspect_err(|_| shared.unbind())?;
            let quiesce = Quiesce(shared.clone());
            dev_info!(
                pdev,
                "zapguard ABI {}.{}, {} MSI-X vectors, /dev/zapguard, /dev/zapguard_hmm[01]\n",
                version.major().get(),
                version.minor().get(),
                irqs.vectors.len()
            );
            Ok(try_pin_init!(ZgDevice {
                pdev: &**pdev,
                misc <- MiscReg::new(shared.clone(), c"zapguard"),
                hmm0 <- MiscReg::new(shared.clone(), c"zapguard_hmm0"),
                hmm1 <- MiscReg::new_last(shared.clone(), c"zapguard_hmm1"),
                irqs,
                shared,
                _quiesce: quiesce,
            }))
        })
    }

    fn unbind<'bound>(pdev: &'bound pci::Device<Core<'_>>, this: Pin<&Self::Data<'bound>>) {
        let seen: [u64; NUM_VECTORS] =
            core::array::from_fn(|i| this.shared.irqs[i].load(Ordering::Relaxed));
        dev_info!(pdev, "unbind: interrupts seen per vector {:?}\n", seen);
        // Open files keep the DMA memory alive, but the BAR goes: stop the device using it now
        // (CR0 = 0, or bus mastering off if it does not answer). Files then get ENODEV.
        this.shared.unbind();
    }
}

impl ZapguardDriver {
    /// Enables the device's units and proves the whole path once: command ring -> device
    /// worker -> completion by DMA into our memory -> MSI-X -> interrupt thread. A device that
    /// cannot do this is unusable.
    fn start_device(pdev: &pci::Device<Core<'_>>, shared: &Shared) -> Result {
        {
            // `access` with the bound device, not `try_access`: the handshake sleeps, which an
            // RCU read-side section (try_access's guard) forbids.
            let bar = shared.bar.access(pdev.as_ref())?;
            // Whatever a previous driver instance left (a failed, hung or half-configured
            // device) goes with a device reset (ABI 1.3).
            if bar.read(regs::VERSION).minor().get() >= 3 {
                bar.write_reg(regs::RESET::zeroed().with_value(abi_regs::RESET_KEY));
            }
            shared.hw.enable(bar).inspect_err(|_| {
                dev_err!(pdev, "device did not acknowledge CR0\n");
            })?;
        }
        // The test knobs the module parameters ask for (test builds only).
        #[cfg(zapguard_test)]
        {
            shared.reset_knobs();
            shared.enable_table_lifetime_check();
        }
        let start = kernel::time::Instant::<kernel::time::Monotonic>::now();
        // INV_ALL: nothing a previous driver instance left in the IOTLB survives.
        let inv_all = crate::abi::cmd::Command::new(crate::abi::cmd::CMD_INV_ALL, 0, 0, 0, 0);
        if let Synced::Fenced = shared.sync(&[inv_all]) {
            dev_err!(pdev, "probe SYNC did not complete\n");
            return Err(EIO);
        }
        let ns = u32::try_from(start.elapsed().as_nanos()).unwrap_or(u32::MAX);
        shared.probe_sync_ns.store(ns, Ordering::Relaxed);
        dev_info!(
            pdev,
            "SYNC round trip {} us, {} CPU page-table levels\n",
            ns / 1000,
            kernel::mm::pgtable_levels()
        );
        Ok(())
    }
}
