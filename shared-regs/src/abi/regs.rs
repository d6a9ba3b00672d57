//! BAR0 register map.
//!
//! All registers are little-endian and accessed with naturally aligned 32-bit accesses; an
//! access of another width or alignment, or to an undefined offset, is ignored for writes and
//! reads as 0, and sets [`ERR_BAD_ACCESS`] in [`ERROR`]. Writes to read-only (RO) registers are
//! ignored without an error, as on most hardware.
//!
//! | offset | name | access | reset | meaning |
//! |---|---|---|---|---|
//! | 0x000 | [`IDENT`] | RO | [`IDENT_MAGIC`] | identifies a zapguard device |
//! | 0x004 | [`VERSION`] | RO | [`VERSION_VALUE`] | ABI version, major in bits 31:16, minor in 15:0 |
//! | 0x008 | [`CAPS`] | RO | [`CAPS_VALUE`] | capability bits `CAP_*` |
//! | 0x00c | [`IOTLB_ENTRIES`] | RO | model parameter | number of IOTLB entries |
//! | 0x010 | [`ASID_COUNT`] | RO | model parameter | number of address-space IDs (contexts) |
//! | 0x014 | [`SCRATCH`] | RW | 0 | free for software; used by probes and tests of the MMIO path |
//! | 0x018 | [`ERROR`] | RW1C | 0 | global error bits `ERR_*`; write 1 to clear |
//!
//! Drivers must check [`IDENT`] and the major version before touching anything else; a minor
//! version bump only adds registers and capability bits.

/// Identity register.
pub const IDENT: u32 = 0x000;
/// Version register.
pub const VERSION: u32 = 0x004;
/// Capability register.
pub const CAPS: u32 = 0x008;
/// IOTLB size register.
pub const IOTLB_ENTRIES: u32 = 0x00c;
/// ASID count register.
pub const ASID_COUNT: u32 = 0x010;
/// Scratch register.
pub const SCRATCH: u32 = 0x014;
/// Global error register (write 1 to clear).
pub const ERROR: u32 = 0x018;

/// Value of [`IDENT`]: the ASCII bytes "ZAPG" read as a little-endian u32.
pub const IDENT_MAGIC: u32 = u32::from_le_bytes(*b"ZAPG");
/// Major ABI version: a driver must refuse a device with another major.
pub const VERSION_MAJOR: u16 = 1;
/// Minor ABI version: additions only.
pub const VERSION_MINOR: u16 = 0;
/// Value of [`VERSION`].
pub const VERSION_VALUE: u32 = ((VERSION_MAJOR as u32) << 16) | VERSION_MINOR as u32;

/// Extracts the major version from a [`VERSION`] value.
pub const fn version_major(v: u32) -> u16 {
    (v >> 16) as u16
}

/// Extracts the minor version from a [`VERSION`] value.
pub const fn version_minor(v: u32) -> u16 {
    v as u16
}

/// Capability: MSI-X interrupts with the vectors of [`super::pci::Vector`].
pub const CAP_MSIX: u32 = 1 << 0;

/// Value of [`CAPS`] for this ABI version.
pub const CAPS_VALUE: u32 = CAP_MSIX;

/// Error: an MMIO access of a wrong width/alignment or to an undefined register.
pub const ERR_BAD_ACCESS: u32 = 1 << 0;
