//! PCI configuration space of the zapguard device.
//!
//! QEMU's vfio-pci emulates BAR addresses and MSI-X itself but still reads the device's config
//! space to learn its identity, BAR types and capabilities, and forwards most writes. This is a
//! consistent shadow: a type-0 header with the identity of [`shared_regs::pci`], BAR0 as a
//! 64-bit non-prefetchable memory BAR (BAR0+BAR1), and one capability, MSI-X, whose table and
//! PBA live in BAR0. Every byte has a write mask, so BAR sizing, read-only IDs and the
//! writable command/MSI-X control bits behave like hardware.
//!
//! Only the first 256 bytes are implemented; the extended space (up to 4096) reads 0, which
//! tells software there are no extended capabilities.

use shared_regs::pci::{
    BAR0_SIZE, CLASS_CODE, DEVICE_ID, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, MSIX_VECTORS, REVISION,
    SUBSYSTEM_ID, SUBSYSTEM_VENDOR_ID, VENDOR_ID,
};
use thiserror::Error;

/// Size of the config-space region exposed to the VMM (PCIe extended config space).
pub const CONFIG_SPACE_SIZE: u64 = 4096;
/// Size of the implemented, conventional part.
const STD_SIZE: usize = 256;

// Standard type-0 header offsets and bits (PCI Local Bus spec; not part of the zapguard ABI).
/// Vendor ID.
pub const PCI_VENDOR_ID: usize = 0x00;
/// Device ID.
pub const PCI_DEVICE_ID: usize = 0x02;
/// Command register.
pub const PCI_COMMAND: usize = 0x04;
/// Status register.
pub const PCI_STATUS: usize = 0x06;
/// Revision ID; the class code follows in 0x09..0x0c.
pub const PCI_REVISION_ID: usize = 0x08;
/// Cache line size.
pub const PCI_CACHE_LINE_SIZE: usize = 0x0c;
/// Header type.
pub const PCI_HEADER_TYPE: usize = 0x0e;
/// First BAR.
pub const PCI_BASE_ADDRESS_0: usize = 0x10;
/// Subsystem vendor ID.
pub const PCI_SUBSYSTEM_VENDOR_ID: usize = 0x2c;
/// Subsystem ID.
pub const PCI_SUBSYSTEM_ID: usize = 0x2e;
/// Expansion ROM BAR.
pub const PCI_ROM_ADDRESS: usize = 0x30;
/// Capability list pointer.
pub const PCI_CAPABILITY_LIST: usize = 0x34;
/// Interrupt line.
pub const PCI_INTERRUPT_LINE: usize = 0x3c;
/// Interrupt pin.
pub const PCI_INTERRUPT_PIN: usize = 0x3d;

/// Command: memory space enable.
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command: bus master enable (the device may only DMA while set).
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Command: parity error response.
const PCI_COMMAND_PARITY: u16 = 1 << 6;
/// Command: SERR# enable.
const PCI_COMMAND_SERR: u16 = 1 << 8;
/// Command: INTx disable.
pub const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status: capability list present.
pub const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
/// BAR: 64-bit memory BAR type.
const PCI_BASE_ADDRESS_MEM_TYPE_64: u32 = 0b100;
/// BAR: low bits that are never part of the address.
const PCI_BASE_ADDRESS_MEM_FLAGS: u32 = 0xf;

/// Capability ID of MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Where the MSI-X capability lives (a layout choice; software finds it by walking the list).
pub const MSIX_CAP_OFFSET: usize = 0x40;
/// MSI-X message control: function mask.
pub const PCI_MSIX_FLAGS_MASKALL: u16 = 1 << 14;
/// MSI-X message control: enable.
pub const PCI_MSIX_FLAGS_ENABLE: u16 = 1 << 15;
/// MSI-X message control: table size minus one.
pub const PCI_MSIX_FLAGS_QSIZE: u16 = 0x7ff;
/// MSI-X capability: message control offset.
const MSIX_FLAGS: usize = 2;
/// MSI-X capability: table offset/BIR.
const MSIX_TABLE: usize = 4;
/// MSI-X capability: PBA offset/BIR.
const MSIX_PBA: usize = 8;

const _: () = assert!(MSIX_VECTORS >= 1 && MSIX_VECTORS <= 2048);
const _: () = assert!(MSIX_TABLE_OFFSET & 0x7 == 0 && MSIX_PBA_OFFSET & 0x7 == 0);
const _: () = assert!(BAR0_SIZE.is_power_of_two() && BAR0_SIZE >= 16);

/// A config-space access outside the region.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("config access at {offset:#x} of {len} bytes is outside the {CONFIG_SPACE_SIZE}-byte config space")]
pub struct OutOfRange {
    /// Offset of the access.
    pub offset: u64,
    /// Length of the access.
    pub len: usize,
}

/// The config space: current values plus a per-byte write mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciConfig {
    bytes: [u8; STD_SIZE],
    wmask: [u8; STD_SIZE],
}

impl Default for PciConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl PciConfig {
    /// The power-on config space.
    pub fn new() -> Self {
        let mut c = Self {
            bytes: [0; STD_SIZE],
            wmask: [0; STD_SIZE],
        };
        c.set_u16(PCI_VENDOR_ID, VENDOR_ID);
        c.set_u16(PCI_DEVICE_ID, DEVICE_ID);
        c.set_u16(PCI_STATUS, PCI_STATUS_CAP_LIST);
        c.set_u32(PCI_REVISION_ID, (CLASS_CODE << 8) | u32::from(REVISION));
        c.set_u16(PCI_SUBSYSTEM_VENDOR_ID, SUBSYSTEM_VENDOR_ID);
        c.set_u16(PCI_SUBSYSTEM_ID, SUBSYSTEM_ID);
        // Header type 0, single function: bytes[PCI_HEADER_TYPE] stays 0.
        debug_assert_eq!(c.bytes[PCI_HEADER_TYPE], 0);
        c.bytes[PCI_CAPABILITY_LIST] = MSIX_CAP_OFFSET as u8;
        // INTx is offered as a fallback (the server reports one INTx vector).
        c.bytes[PCI_INTERRUPT_PIN] = 1;

        // No I/O BARs, so I/O space enable stays hardwired to 0.
        let command = PCI_COMMAND_MEMORY
            | PCI_COMMAND_MASTER
            | PCI_COMMAND_PARITY
            | PCI_COMMAND_SERR
            | PCI_COMMAND_INTX_DISABLE;
        c.set_mask_u16(PCI_COMMAND, command);
        c.wmask[PCI_CACHE_LINE_SIZE] = 0xff;
        c.wmask[PCI_INTERRUPT_LINE] = 0xff;

        // BAR0 (low half) and BAR1 (high half): address bits above the size are writable, so
        // writing all-ones reads back the size mask. BAR2..5 and the ROM BAR stay 0: absent.
        let size_mask = !(BAR0_SIZE - 1);
        c.set_u32(PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_MEM_TYPE_64);
        c.set_mask_u32(
            PCI_BASE_ADDRESS_0,
            (size_mask as u32) & !PCI_BASE_ADDRESS_MEM_FLAGS,
        );
        c.set_mask_u32(PCI_BASE_ADDRESS_0 + 4, (size_mask >> 32) as u32);

        let cap = MSIX_CAP_OFFSET;
        c.bytes[cap] = PCI_CAP_ID_MSIX;
        c.bytes[cap + 1] = 0; // end of list
        c.set_u16(cap + MSIX_FLAGS, (MSIX_VECTORS - 1) & PCI_MSIX_FLAGS_QSIZE);
        c.set_mask_u16(
            cap + MSIX_FLAGS,
            PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL,
        );
        // BIR 0 in the low 3 bits: both structures are in BAR0.
        c.set_u32(cap + MSIX_TABLE, MSIX_TABLE_OFFSET);
        c.set_u32(cap + MSIX_PBA, MSIX_PBA_OFFSET);
        c
    }

    /// Back to power-on values (device reset).
    pub fn reset(&mut self) {
        *self = Self::new();
    }

    /// Reads `data.len()` bytes at `offset`. Bytes past the implemented header read 0; an
    /// access that leaves the config space reads 0 there and is reported.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), OutOfRange> {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
        check_range(offset, data.len())
    }

    /// Writes `data` at `offset`, bit by bit through the write mask. Bytes outside the
    /// implemented header are ignored; an access that leaves the config space is reported.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), OutOfRange> {
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .filter(|&o| o < STD_SIZE)
            else {
                continue;
            };
            let m = self.wmask[o];
            self.bytes[o] = (self.bytes[o] & !m) | (b & m);
        }
        check_range(offset, data.len())
    }

    /// The byte at `offset` (0 outside the implemented header).
    pub fn read_u8(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0)
    }

    /// The little-endian u16 at `offset`.
    pub fn read_u16(&self, offset: usize) -> u16 {
        let hi = offset.checked_add(1).map_or(0, |o| self.read_u8(o));
        u16::from_le_bytes([self.read_u8(offset), hi])
    }

    /// The little-endian u32 at `offset`.
    pub fn read_u32(&self, offset: usize) -> u32 {
        let hi = offset.checked_add(2).map_or(0, |o| self.read_u16(o));
        u32::from(self.read_u16(offset)) | (u32::from(hi) << 16)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(PCI_COMMAND)
    }

    /// Whether the driver allowed the device to master the bus (DMA).
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & PCI_COMMAND_MASTER != 0
    }

    /// MSI-X message control.
    pub fn msix_control(&self) -> u16 {
        self.read_u16(MSIX_CAP_OFFSET + MSIX_FLAGS)
    }

    /// Whether MSI-X is enabled and not function-masked.
    pub fn msix_active(&self) -> bool {
        let ctl = self.msix_control();
        ctl & PCI_MSIX_FLAGS_ENABLE != 0 && ctl & PCI_MSIX_FLAGS_MASKALL == 0
    }

    fn set_u16(&mut self, offset: usize, v: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u32(&mut self, offset: usize, v: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn set_mask_u16(&mut self, offset: usize, m: u16) {
        self.wmask[offset..offset + 2].copy_from_slice(&m.to_le_bytes());
    }

    fn set_mask_u32(&mut self, offset: usize, m: u32) {
        self.wmask[offset..offset + 4].copy_from_slice(&m.to_le_bytes());
    }
}

fn check_range(offset: u64, len: usize) -> Result<(), OutOfRange> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= CONFIG_SPACE_SIZE => Ok(()),
        _ => Err(OutOfRange { offset, len }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(c: &PciConfig, offset: u64, len: usize) -> u64 {
        let mut buf = vec![0u8; len];
        c.read(offset, &mut buf).expect("in range");
        crate::events::le_value(&buf)
    }

    fn wr(c: &mut PciConfig, offset: u64, len: usize, v: u64) {
        c.write(offset, &v.to_le_bytes()[..len]).expect("in range");
    }

    #[test]
    fn identity_fields() {
        let c = PciConfig::new();
        let cases: &[(u64, usize, u64)] = &[
            (0x00, 2, VENDOR_ID.into()),
            (0x02, 2, DEVICE_ID.into()),
            (0x00, 4, (u64::from(DEVICE_ID) << 16) | u64::from(VENDOR_ID)),
            (0x08, 1, REVISION.into()),
            (0x09, 1, (CLASS_CODE & 0xff).into()),
            (0x0a, 1, ((CLASS_CODE >> 8) & 0xff).into()),
            (0x0b, 1, (CLASS_CODE >> 16).into()),
            (0x0e, 1, 0),
            (0x2c, 2, SUBSYSTEM_VENDOR_ID.into()),
            (0x2e, 2, SUBSYSTEM_ID.into()),
            (0x06, 2, PCI_STATUS_CAP_LIST.into()),
            (0x3d, 1, 1),
        ];
        for &(offset, len, want) in cases {
            assert_eq!(rd(&c, offset, len), want, "offset {offset:#x} len {len}");
        }
    }

    #[test]
    fn bar_sizing() {
        // (offset, value read back after writing all-ones)
        let size_mask = !(BAR0_SIZE - 1);
        let cases: &[(u64, u32)] = &[
            (0x10, (size_mask as u32 & !0xf) | 0b100),
            (0x14, (size_mask >> 32) as u32),
            (0x18, 0),
            (0x1c, 0),
            (0x20, 0),
            (0x24, 0),
            (0x30, 0),
        ];
        let mut c = PciConfig::new();
        assert_eq!(
            rd(&c, 0x10, 4),
            0b100,
            "64-bit, non-prefetchable memory BAR"
        );
        for &(offset, want) in cases {
            wr(&mut c, offset, 4, 0xffff_ffff);
            assert_eq!(rd(&c, offset, 4), u64::from(want), "BAR at {offset:#x}");
        }
        // Decode the size the way firmware does.
        let lo = u64::from(c.read_u32(0x10) & !0xf);
        let hi = u64::from(c.read_u32(0x14));
        assert_eq!((!((hi << 32) | lo)).wrapping_add(1), BAR0_SIZE);
        // Program an address: it sticks, type bits stay.
        wr(&mut c, 0x10, 4, 0xfebf_0000);
        wr(&mut c, 0x14, 4, 0x1);
        assert_eq!(rd(&c, 0x10, 4), 0xfebf_0004);
        assert_eq!(rd(&c, 0x14, 4), 1);
    }

    #[test]
    fn capability_walk_finds_msix() {
        let c = PciConfig::new();
        assert_ne!(c.read_u16(PCI_STATUS) & PCI_STATUS_CAP_LIST, 0);
        let mut ptr = usize::from(c.read_u8(PCI_CAPABILITY_LIST));
        let mut found = Vec::new();
        for _ in 0..48 {
            if ptr == 0 {
                break;
            }
            assert!(ptr >= 0x40 && ptr.is_multiple_of(4), "bad pointer {ptr:#x}");
            found.push((c.read_u8(ptr), ptr));
            ptr = usize::from(c.read_u8(ptr + 1));
        }
        assert_eq!(found, vec![(PCI_CAP_ID_MSIX, MSIX_CAP_OFFSET)]);
        let ctl = c.msix_control();
        assert_eq!(ctl & PCI_MSIX_FLAGS_QSIZE, MSIX_VECTORS - 1);
        assert_eq!(ctl & (PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL), 0);
        assert_eq!(c.read_u32(MSIX_CAP_OFFSET + 4), MSIX_TABLE_OFFSET);
        assert_eq!(c.read_u32(MSIX_CAP_OFFSET + 8), MSIX_PBA_OFFSET);
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let cases: &[(u64, usize)] = &[
            (0x00, 4),
            (0x06, 2),
            (0x08, 4),
            (0x0e, 1),
            (0x2c, 4),
            (0x34, 1),
            (0x3d, 1),
            (0x40, 2),
            (0x44, 4),
            (0x48, 4),
        ];
        for &(offset, len) in cases {
            let mut c = PciConfig::new();
            let before = rd(&c, offset, len);
            wr(&mut c, offset, len, !before);
            assert_eq!(rd(&c, offset, len), before, "offset {offset:#x}");
            wr(&mut c, offset, len, 0);
            assert_eq!(rd(&c, offset, len), before, "offset {offset:#x}");
        }
    }

    #[test]
    fn writable_fields() {
        let mut c = PciConfig::new();
        wr(&mut c, 0x04, 2, 0xffff);
        assert_eq!(c.command(), 0x0546, "IO enable is hardwired to 0");
        assert!(c.bus_master_enabled());
        wr(&mut c, 0x04, 2, 0);
        assert!(!c.bus_master_enabled());
        wr(&mut c, 0x3c, 1, 0x0b);
        assert_eq!(rd(&c, 0x3c, 1), 0x0b);

        // MSI-X enable/mask are writable, the table size is not; a 4-byte write at the
        // capability header must not move the ID or the next pointer.
        wr(&mut c, MSIX_CAP_OFFSET as u64, 4, 0xffff_ffff);
        assert_eq!(c.read_u8(MSIX_CAP_OFFSET), PCI_CAP_ID_MSIX);
        assert_eq!(c.read_u8(MSIX_CAP_OFFSET + 1), 0);
        let ctl = c.msix_control();
        assert_eq!(
            ctl,
            PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL | (MSIX_VECTORS - 1)
        );
        assert!(!c.msix_active());
        wr(&mut c, MSIX_CAP_OFFSET as u64 + 3, 1, 0x80);
        assert!(c.msix_active());

        c.reset();
        assert_eq!(c, PciConfig::new());
    }

    #[test]
    fn extended_space_and_out_of_range() {
        let mut c = PciConfig::new();
        assert_eq!(rd(&c, 0x100, 4), 0);
        assert_eq!(rd(&c, 0xffc, 4), 0);
        wr(&mut c, 0x100, 4, 0xdead_beef);
        assert_eq!(rd(&c, 0x100, 4), 0);

        let mut whole = vec![0xaau8; CONFIG_SPACE_SIZE as usize];
        c.read(0, &mut whole).expect("whole space");
        assert_eq!(whole[..2], VENDOR_ID.to_le_bytes());
        assert!(whole[STD_SIZE..].iter().all(|&b| b == 0));

        let mut buf = [0xaau8; 8];
        let err = c.read(0xffc, &mut buf).expect_err("crosses the end");
        assert_eq!(
            err,
            OutOfRange {
                offset: 0xffc,
                len: 8
            }
        );
        assert_eq!(buf, [0; 8]);
        assert!(c.read(u64::MAX, &mut buf).is_err());
        assert!(c.write(u64::MAX - 1, &[0xff; 4]).is_err());
        assert!(c.write(CONFIG_SPACE_SIZE, &[1]).is_err());
        assert_eq!(c.read_u32(usize::MAX), 0);
        assert_eq!(c, PciConfig::new());
    }
}
