//! PCI identity of the zapguard device and its BAR layout.
//!
//! | field | value | meaning |
//! |---|---|---|
//! | vendor ID | [`VENDOR_ID`] | not a PCI-SIG assignment: the device only exists in emulation |
//! | device ID | [`DEVICE_ID`] | zapguard IOMMU-style mirror device |
//! | class code | [`CLASS_CODE`] | base 0x08 (system peripheral), sub 0x06 (IOMMU), prog-if 0 |
//! | revision | [`REVISION`] | bumped with [`super::regs::VERSION_MAJOR`] |
//! | BAR0 | 64-bit memory, non-prefetchable, [`BAR0_SIZE`] bytes | registers, then the MSI-X table and PBA |
//! | MSI-X | [`MSIX_VECTORS`] vectors, table at [`MSIX_TABLE_OFFSET`], PBA at [`MSIX_PBA_OFFSET`] | see [`Vector`] |

/// PCI vendor ID ("ZG"). Emulation only; chosen not to collide with the IDs Linux drivers match.
pub const VENDOR_ID: u16 = 0x5a47;
/// PCI device ID.
pub const DEVICE_ID: u16 = 0x0001;
/// PCI subsystem vendor ID.
pub const SUBSYSTEM_VENDOR_ID: u16 = VENDOR_ID;
/// PCI subsystem ID.
pub const SUBSYSTEM_ID: u16 = 0x0001;
/// PCI revision ID.
pub const REVISION: u8 = 1;
/// 24-bit class code: system peripheral (0x08), IOMMU (0x06), programming interface 0.
pub const CLASS_CODE: u32 = 0x08_06_00;

/// The register BAR.
pub const BAR0: u32 = 0;
/// Size of BAR0 in bytes (a power of two, as PCI requires).
pub const BAR0_SIZE: u64 = 0x4000;
/// Registers occupy `[0, REGS_SIZE)` of BAR0.
pub const REGS_SIZE: u64 = 0x1000;
/// Offset of the MSI-X table in BAR0.
pub const MSIX_TABLE_OFFSET: u32 = 0x2000;
/// Offset of the MSI-X pending-bit array in BAR0.
pub const MSIX_PBA_OFFSET: u32 = 0x3000;
/// Number of MSI-X vectors.
pub const MSIX_VECTORS: u16 = 3;

/// What each MSI-X vector signals.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vector {
    /// Command completion (SYNC with the interrupt flag).
    Command = 0,
    /// Event queue: faults and validator violations.
    Event = 1,
    /// Global error register changed.
    Error = 2,
}

const _: () = assert!(BAR0_SIZE.is_power_of_two());
const _: () = assert!(REGS_SIZE <= MSIX_TABLE_OFFSET as u64);
const _: () =
    assert!((MSIX_TABLE_OFFSET as u64) + 16 * (MSIX_VECTORS as u64) <= MSIX_PBA_OFFSET as u64);
const _: () = assert!((MSIX_PBA_OFFSET as u64) + 8 <= BAR0_SIZE);
