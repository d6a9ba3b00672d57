//! The `/dev/zapguard` user API: ioctl numbers and structures.
//!
//! Numbers follow the kernel's `_IOC` encoding (x86/generic: `dir << 30 | size << 16 | type << 8 |
//! nr`), computed here once so the driver and userspace cannot disagree.
//!
//! | ioctl | dir | argument | meaning |
//! |---|---|---|---|
//! | [`ZG_IOC_GET_INFO`] | read | [`ZgInfo`] | identity and parameters of the bound device |

/// ioctl type byte for zapguard (`'z'`).
pub const ZG_IOC_MAGIC: u8 = b'z';

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;

/// `_IOC_WRITE`: userspace writes the argument (copy_from_user in the driver).
pub const IOC_WRITE: u32 = 1;
/// `_IOC_READ`: userspace reads the argument (copy_to_user in the driver).
pub const IOC_READ: u32 = 2;

/// The kernel's `_IOC(dir, type, nr, size)`.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < (1 << IOC_SIZEBITS));
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// The kernel's `_IOC_SIZE(cmd)`.
pub const fn ioc_size(cmd: u32) -> usize {
    ((cmd >> IOC_SIZESHIFT) & ((1 << IOC_SIZEBITS) - 1)) as usize
}

/// Version of this uAPI, reported in [`ZgInfo::uapi_version`] (2: `irq_count`, `probe_sync_ns`).
pub const UAPI_VERSION: u32 = 2;

/// Answer of [`ZG_IOC_GET_INFO`]. Fields are filled from the device's registers at probe time
/// and from the PCI core; `reserved` is zero and keeps the size stable as fields are added.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZgInfo {
    /// [`UAPI_VERSION`] of the driver.
    pub uapi_version: u32,
    /// Device [`super::regs::IDENT`] register.
    pub ident: u32,
    /// Device [`super::regs::VERSION`] register.
    pub version: u32,
    /// Device [`super::regs::CAPS`] register.
    pub caps: u32,
    /// Device [`super::regs::IOTLB_ENTRIES`] register.
    pub iotlb_entries: u32,
    /// Device [`super::regs::ASID_COUNT`] register.
    pub asid_count: u32,
    /// Number of interrupt vectors the driver allocated.
    pub irq_vectors: u32,
    /// PCI location: bus in bits 15:8, devfn in 7:0 (bits 31:16 zero).
    pub pci_location: u32,
    /// Interrupts the driver has seen per MSI-X vector (command, event, error), saturating.
    pub irq_count: [u32; 3],
    /// Nanoseconds the probe-time SYNC round trip took (post, device completes into memory,
    /// driver sees it), 0 if it was not measured.
    pub probe_sync_ns: u32,
    /// Zero; room for additions without changing the ioctl number.
    pub reserved: [u32; 4],
}

/// `_IOR('z', 0x00, struct zg_info)`: identity and parameters of the device behind this file.
pub const ZG_IOC_GET_INFO: u32 = ioc(IOC_READ, ZG_IOC_MAGIC, 0x00, core::mem::size_of::<ZgInfo>());

const _: () = assert!(core::mem::size_of::<ZgInfo>() == 64);
const _: () = assert!(ioc_size(ZG_IOC_GET_INFO) == 64);
