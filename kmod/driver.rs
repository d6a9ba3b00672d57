// SPDX-License-Identifier: GPL-2.0

//! The zapguard PCI driver and its `/dev/zapguard` misc device.
//!
//! Lifetimes: the PCI driver data ([`ZgDevice`]) lives from probe to unbind. Open files can outlive
//! an unbind, so they never borrow from it: they hold an [`Arc<Shared>`] whose BAR mapping is a
//! [`pci::DevresBar`], revoked by the driver core at unbind, after which ioctls return `ENODEV`.

use crate::abi::{pci as zpci, regs, uapi};
use core::pin::Pin;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use kernel::{
    device::Core,
    fs::File,
    io::Io,
    irq::{self, IrqReturn},
    miscdevice::{MiscDevice, MiscDeviceOptions, MiscDeviceRegistration},
    pci,
    prelude::*,
    sync::Arc,
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
            reserved: [0; 8],
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

            let location = u32::from(pdev.dev_id());
            let shared = Arc::new(
                Shared {
                    bar: bar.into_devres()?,
                    irqs: [const { AtomicU64::new(0) }; NUM_VECTORS],
                    irq_vectors: AtomicU32::new(0),
                    pci_location: location,
                },
                GFP_KERNEL,
            )?;
            let irqs = Vectors::new(pdev, &shared)?;
            shared
                .irq_vectors
                .store(irqs.vectors.len() as u32, Ordering::Relaxed);
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
    }
}
