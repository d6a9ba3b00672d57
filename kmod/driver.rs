// SPDX-License-Identifier: GPL-2.0

//! The zapguard PCI driver and its `/dev/zapguard` misc device.
//!
//! Lifetimes: the PCI driver data ([`ZgDevice`]) lives from probe to unbind. Open files can outlive
//! an unbind, so they never borrow from it: they hold an [`Arc<Shared>`] whose BAR mapping is a
//! [`pci::DevresBar`], revoked by the driver core at unbind, after which ioctls return `ENODEV`.

use crate::abi::cmd;
use crate::abi::queue;
use crate::abi::{dma, event, pci as zpci, pte, regs, uapi};
use core::pin::Pin;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use kernel::{
    device::Core,
    dma::{Coherent, Device as _, DmaMask},
    fs::File,
    io::Io,
    irq::{self, IrqReturn},
    miscdevice::{MiscDevice, MiscDeviceOptions, MiscDeviceRegistration},
    pci,
    prelude::*,
    sync::Arc,
    time::{delay::fsleep, Delta, Instant, Monotonic},
    transmute::AsBytes,
    uaccess::{UserPtr, UserSlice},
};

const BAR0_SIZE: usize = zpci::BAR0_SIZE as usize;
const NUM_VECTORS: usize = zpci::MSIX_VECTORS as usize;

// SAFETY: `ZgInfo` is `repr(C)` and made only of `u32`s (size asserted in the ABI to be 64 bytes,
// i.e. no padding), so every byte of a value is initialized.
unsafe impl AsBytes for uapi::ZgInfo {}

/// State shared by the PCI device and every open file.
struct Shared {
    /// BAR0, revoked by the driver core when the device unbinds.
    bar: pci::DevresBar<BAR0_SIZE>,
    /// Interrupts seen per MSI-X vector ([`zpci::Vector`] order).
    irqs: [AtomicU64; NUM_VECTORS],
    /// Vectors allocated at probe (set once the handlers, which need `Shared`, exist).
    irq_vectors: AtomicU32,
    /// PCI domain/bus/devfn, as reported by [`uapi::ZgInfo::pci_location`].
    pci_location: u32,
    /// Duration of the probe-time SYNC round trip.
    probe_sync_ns: AtomicU32,
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
}

/// Interrupt handler for one MSI-X vector.
struct VectorHandler {
    shared: Arc<Shared>,
    vector: usize,
}

impl irq::Handler for VectorHandler {
    fn handle(&self) -> IrqReturn {
        if let Some(count) = self.shared.irqs.get(self.vector) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        if self.vector == zpci::Vector::Error as usize {
            if let Some(bar) = self.shared.bar.try_access() {
                // Write-1-to-clear whatever is pending; the bits are reported by later ABI versions.
                let err = bar.read32(regs::ERROR as usize);
                bar.write32(err, regs::ERROR as usize);
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

/// An open `/dev/zapguard`.
struct ZgFile {
    shared: Arc<Shared>,
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
        KBox::new(
            Self {
                shared: outer.shared.clone(),
            },
            GFP_KERNEL,
        )
        .map_err(Into::into)
    }

    fn ioctl(me: &ZgFile, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        match cmd {
            uapi::ZG_IOC_GET_INFO => {
                let info = me.shared.info()?;
                let ptr = UserPtr::from_addr(arg);
                UserSlice::new(ptr, core::mem::size_of::<uapi::ZgInfo>())
                    .writer()
                    .write(&info)?;
                Ok(0)
            }
            _ => Err(ENOTTY),
        }
    }
}

/// MSI-X vectors and their handlers.
///
/// # Invariants
///
/// `_handlers` (held only to be dropped) borrow from `*vectors` with a lifetime extended to `'bound`. This is sound because
/// `vectors` is heap-pinned (its address never changes) and lives until `Drop`, which frees the
/// handlers (`free_irq`) before the vectors (`pci_free_irq_vectors`): fields drop in declaration
/// order, `handlers` first.
struct Vectors<'bound> {
    _handlers: KVec<Pin<KBox<irq::Registration<'bound, VectorHandler>>>>,
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
                irq::Registration::new(
                    vref.index(vector)?.into(),
                    irq::Flags::TRIGGER_NONE,
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
    /// Freed after unbind quiesced the device (see [`Rings`]).
    rings: Rings,
    shared: Arc<Shared>,
}

/// log2 of the number of entries of each ring the driver gives the device.
const RING_LOG2: u32 = 6;
/// Words (u64) per page of coherent memory.
const PAGE_WORDS: usize = 512;
/// Polls of CR0ACK before giving up on the enable/disable handshake (~65 us per read under TCG).
const HANDSHAKE_POLLS: usize = 1000;
/// Upper bound for the probe-time SYNC round trip.
const SYNC_TIMEOUT_MS: i64 = 2000;

/// The device's rings and context table, in DMA-coherent memory.
///
/// # Invariants
///
/// While the device's units are enabled (from [`Rings::enable`] until [`Rings::quiesce`]
/// succeeded), the device may read and write these buffers at any time: they must outlive that
/// window, which is why [`ZgDevice`] owns them and unbind quiesces the device before they drop.
struct Rings {
    cmdq: Coherent<[u64]>,
    evtq: Coherent<[u64]>,
    dmaq: Coherent<[u64]>,
    ctx: Coherent<[u64]>,
    /// SYNC completion words.
    sync: Coherent<[u64]>,
}

impl Rings {
    fn new(dev: &kernel::device::Device<kernel::device::Bound>, asid_count: u32) -> Result<Self> {
        let ring_words = |entry: usize| ((entry << RING_LOG2) / 8).max(PAGE_WORDS);
        let ctx_words = (asid_count as usize)
            .checked_mul(pte::CTX_ENTRY_SIZE / 8)
            .ok_or(EINVAL)?;
        Ok(Self {
            cmdq: Coherent::zeroed_slice(dev, ring_words(cmd::CMD_SIZE), GFP_KERNEL)?,
            evtq: Coherent::zeroed_slice(dev, ring_words(event::EVT_SIZE), GFP_KERNEL)?,
            dmaq: Coherent::zeroed_slice(dev, ring_words(dma::DMA_JOB_SIZE), GFP_KERNEL)?,
            ctx: Coherent::zeroed_slice(dev, ctx_words.max(PAGE_WORDS), GFP_KERNEL)?,
            sync: Coherent::zeroed_slice(dev, PAGE_WORDS, GFP_KERNEL)?,
        })
    }

    /// Programs every unit and enables it, then waits for CR0ACK.
    fn enable(&self, bar: &pci::Bar<'_, BAR0_SIZE>) -> Result {
        // Offsets vary at run time here, so use the checked accessors.
        let program = |lo: u32, hi: u32, addr: u64| -> Result {
            bar.try_write32(addr as u32, lo as usize)?;
            bar.try_write32((addr >> 32) as u32, hi as usize)
        };
        program(regs::CTX_BASE_LO, regs::CTX_BASE_HI, self.ctx.dma_address())?;
        for (lo, hi, size, ring) in [
            (
                regs::CMDQ_BASE_LO,
                regs::CMDQ_BASE_HI,
                regs::CMDQ_LOG2SIZE,
                &self.cmdq,
            ),
            (
                regs::EVTQ_BASE_LO,
                regs::EVTQ_BASE_HI,
                regs::EVTQ_LOG2SIZE,
                &self.evtq,
            ),
            (
                regs::DMAQ_BASE_LO,
                regs::DMAQ_BASE_HI,
                regs::DMAQ_LOG2SIZE,
                &self.dmaq,
            ),
        ] {
            program(lo, hi, ring.dma_address())?;
            bar.try_write32(RING_LOG2, size as usize)?;
        }
        bar.write32(
            regs::IRQ_CMD_EN | regs::IRQ_EVT_EN | regs::IRQ_ERR_EN,
            regs::IRQ_CTRL as usize,
        );
        bar.write32(regs::CR0_MASK, regs::CR0 as usize);
        handshake(bar, regs::CR0_MASK)
    }

    /// Posts a SYNC that writes `value` into the first sync word and waits for it (polling with
    /// sleeps, bounded): the device's completion travels by DMA into guest memory.
    fn sync_round_trip(&self, bar: &pci::Bar<'_, BAR0_SIZE>, value: u32) -> Result<Delta> {
        let start = Instant::<Monotonic>::now();
        let prod = bar.read32(regs::CMDQ_PROD as usize);
        let slot = queue::index(prod, RING_LOG2) as usize * (cmd::CMD_SIZE / 8);
        let c = cmd::Command::new(
            cmd::CMD_SYNC,
            cmd::CMD_F_SYNC_IRQ,
            0,
            self.sync.dma_address(),
            u64::from(value),
        );
        let words: [u64; 4] = crate::abi::bytes_to_words(&c.to_bytes());
        for (i, w) in words.iter().enumerate() {
            kernel::io::io_write!(&self.cmdq, [try: slot + i], *w);
        }
        // The device must see the command before the doorbell: MMIO writes are ordered after
        // earlier normal-memory writes on x86 (wmb() is a compiler barrier there).
        bar.write32(queue::next(prod, RING_LOG2), regs::CMDQ_PROD as usize);
        loop {
            let done: u64 = kernel::io::io_read!(&self.sync, [try: 0]);
            let done = done as u32;
            if done == value {
                return Ok(start.elapsed());
            }
            if start.elapsed() > Delta::from_millis(SYNC_TIMEOUT_MS) {
                return Err(ETIMEDOUT);
            }
            fsleep(Delta::from_micros(100));
        }
    }

    /// Disables every unit and waits until the device acknowledges: after this the device no
    /// longer touches the rings.
    fn quiesce(&self, bar: &pci::Bar<'_, BAR0_SIZE>) -> Result {
        bar.write32(0, regs::CR0 as usize);
        handshake(bar, 0)
    }
}

/// Polls CR0ACK until it equals `want`.
fn handshake(bar: &pci::Bar<'_, BAR0_SIZE>, want: u32) -> Result {
    for _ in 0..HANDSHAKE_POLLS {
        if bar.read32(regs::CR0ACK as usize) == want {
            return Ok(());
        }
        fsleep(Delta::from_micros(10));
    }
    Err(ETIMEDOUT)
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
            let asid_count = bar.read32(regs::ASID_COUNT as usize).min(4096);
            let rings = Rings::new(pdev.as_ref(), asid_count)?;

            let location = u32::from(pdev.dev_id());
            let shared = Arc::new(
                Shared {
                    bar: bar.into_devres()?,
                    irqs: [const { AtomicU64::new(0) }; NUM_VECTORS],
                    irq_vectors: AtomicU32::new(0),
                    pci_location: location,
                    probe_sync_ns: AtomicU32::new(0),
                },
                GFP_KERNEL,
            )?;
            let irqs = Vectors::new(pdev, &shared)?;
            shared
                .irq_vectors
                .store(irqs.vectors.len() as u32, Ordering::Relaxed);
            {
                // `access` with the bound device, not `try_access`: the handshake and the SYNC
                // wait sleep, which an RCU read-side section (try_access's guard) forbids.
                let bar = shared.bar.access(pdev.as_ref())?;
                rings.enable(bar).inspect_err(|_| {
                    dev_err!(pdev, "device did not acknowledge CR0\n");
                })?;
                // Prove the whole path once: command ring -> device worker -> completion by DMA
                // into our memory -> MSI-X. A device that cannot do this is not usable.
                let took = rings.sync_round_trip(bar, 0x5a47_0001).inspect_err(|e| {
                    dev_err!(pdev, "probe SYNC did not complete: {:?}\n", e);
                    let _ = rings.quiesce(bar);
                })?;
                let ns = u32::try_from(took.as_nanos()).unwrap_or(u32::MAX);
                shared.probe_sync_ns.store(ns, Ordering::Relaxed);
                dev_info!(pdev, "SYNC round trip {} us\n", ns / 1000);
            }
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
                rings,
                shared,
            }))
        })
    }

    fn unbind<'bound>(pdev: &'bound pci::Device<Core<'_>>, this: Pin<&Self::Data<'bound>>) {
        let seen: [u64; NUM_VECTORS] =
            core::array::from_fn(|i| this.shared.irqs[i].load(Ordering::Relaxed));
        dev_info!(pdev, "unbind: interrupts seen per vector {:?}\n", seen);
        // The rings are freed when the driver data drops: stop the device using them first.
        // `access` (no RCU section): quiescing sleeps while it polls CR0ACK.
        match this.shared.bar.access(pdev.as_ref()) {
            Ok(bar) => {
                if this.rings.quiesce(bar).is_err() {
                    dev_err!(pdev, "device did not acknowledge CR0=0 at unbind\n");
                }
            }
            Err(_) => dev_err!(pdev, "BAR already revoked at unbind\n"),
        }
    }
}
