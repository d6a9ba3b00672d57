//! The zapguard device state machine: the BAR0 register file of [`shared_regs::regs`].
//!
//! The device does no I/O of its own: the vfio-user glue ([`crate::server`]) feeds it BAR
//! accesses, and everything observable goes to the injected [`Events`] sink.

use shared_regs::pci::{BAR0, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, MSIX_VECTORS, REGS_SIZE};
use shared_regs::regs::{
    ASID_COUNT, CAPS, CAPS_VALUE, ERROR, ERR_BAD_ACCESS, IDENT, IDENT_MAGIC, IOTLB_ENTRIES,
    SCRATCH, VERSION, VERSION_VALUE,
};

use crate::events::{le_value, Event, Events};

/// Model parameters, fixed for the life of the device and visible in read-only registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Number of IOTLB entries ([`IOTLB_ENTRIES`]).
    pub iotlb_entries: u32,
    /// Number of address-space IDs ([`ASID_COUNT`]).
    pub asid_count: u32,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            iotlb_entries: 64,
            asid_count: 256,
        }
    }
}

/// Register names by offset, for traces.
const REGISTER_NAMES: &[(u32, &str)] = &[
    (IDENT, "IDENT"),
    (VERSION, "VERSION"),
    (CAPS, "CAPS"),
    (IOTLB_ENTRIES, "IOTLB_ENTRIES"),
    (ASID_COUNT, "ASID_COUNT"),
    (SCRATCH, "SCRATCH"),
    (ERROR, "ERROR"),
];

/// The name of the BAR0 register at `offset`, if one starts there.
pub fn register_name(offset: u64) -> Option<&'static str> {
    REGISTER_NAMES
        .iter()
        .find(|(o, _)| u64::from(*o) == offset)
        .map(|(_, name)| *name)
}

/// Bytes of the MSI-X table and PBA in BAR0, as QEMU sizes the regions it overlays there.
const MSIX_TABLE_SIZE: u64 = 16 * MSIX_VECTORS as u64;
const MSIX_PBA_SIZE: u64 = (MSIX_VECTORS as u64).div_ceil(64) * 8;

/// What a BAR0 access hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// An aligned 32-bit access to this register.
    Register(u32),
    /// Inside the MSI-X table or PBA, which QEMU normally intercepts.
    Msix,
    /// Anything else: wrong width, misaligned, undefined or out of range.
    Bad,
}

fn classify(offset: u64, len: usize) -> Target {
    let Some(end) = offset.checked_add(len as u64) else {
        return Target::Bad;
    };
    let inside = |start: u32, size: u64| {
        len > 0 && offset >= u64::from(start) && end <= u64::from(start) + size
    };
    if len == 4 && offset.is_multiple_of(4) && end <= REGS_SIZE {
        if let Some(&(reg, _)) = REGISTER_NAMES.iter().find(|(o, _)| u64::from(*o) == offset) {
            return Target::Register(reg);
        }
    }
    if inside(MSIX_TABLE_OFFSET, MSIX_TABLE_SIZE) || inside(MSIX_PBA_OFFSET, MSIX_PBA_SIZE) {
        return Target::Msix;
    }
    Target::Bad
}

/// The zapguard device.
pub struct ZapguardDevice<E: Events> {
    config: DeviceConfig,
    scratch: u32,
    error: u32,
    events: E,
}

impl<E: Events> ZapguardDevice<E> {
    /// A device in its reset state.
    pub fn new(config: DeviceConfig, events: E) -> Self {
        Self {
            config,
            scratch: 0,
            error: 0,
            events,
        }
    }

    /// The model parameters.
    pub fn config(&self) -> DeviceConfig {
        self.config
    }

    /// The current [`ERROR`] register.
    pub fn error_bits(&self) -> u32 {
        self.error
    }

    /// The event sink, for the glue to report what only it sees (DMA maps, interrupts, ...).
    pub fn events(&mut self) -> &mut E {
        &mut self.events
    }

    /// Reports an error event.
    pub fn report_error(&mut self, what: String) {
        self.events.event(&Event::Error { what });
    }

    /// A BAR0 read of `data.len()` bytes at `offset`. Never fails: a bad access reads 0 and
    /// sets [`ERR_BAD_ACCESS`].
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let target = classify(offset, data.len());
        data.fill(0);
        if let Target::Register(reg) = target {
            let v = self.register(reg);
            data.copy_from_slice(&v.to_le_bytes());
        }
        self.events.event(&Event::BarRead {
            bar: BAR0,
            offset,
            size: data.len(),
            value: le_value(data),
        });
        if target == Target::Bad {
            self.bad_access("read", offset, data.len());
        }
    }

    /// A BAR0 write of `data` at `offset`. Never fails: a bad access is ignored and sets
    /// [`ERR_BAD_ACCESS`]; writes to read-only registers are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let target = classify(offset, data.len());
        self.events.event(&Event::BarWrite {
            bar: BAR0,
            offset,
            size: data.len(),
            value: le_value(data),
        });
        match target {
            Target::Register(reg) => {
                let v = le_value(data) as u32;
                match reg {
                    SCRATCH => self.scratch = v,
                    ERROR => self.error &= !v,
                    _ => {}
                }
            }
            Target::Msix => {}
            Target::Bad => self.bad_access("write", offset, data.len()),
        }
    }

    /// Device reset: every register back to its reset value.
    pub fn reset(&mut self) {
        self.scratch = 0;
        self.error = 0;
        self.events.event(&Event::Reset);
    }

    fn register(&self, reg: u32) -> u32 {
        match reg {
            IDENT => IDENT_MAGIC,
            VERSION => VERSION_VALUE,
            CAPS => CAPS_VALUE,
            IOTLB_ENTRIES => self.config.iotlb_entries,
            ASID_COUNT => self.config.asid_count,
            SCRATCH => self.scratch,
            ERROR => self.error,
            _ => 0,
        }
    }

    fn bad_access(&mut self, dir: &str, offset: u64, len: usize) {
        self.error |= ERR_BAD_ACCESS;
        self.report_error(format!(
            "bad BAR0 {dir} at {offset:#x} of {len} bytes: registers take aligned 4-byte accesses"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventLog;
    use shared_regs::pci::BAR0_SIZE;
    use shared_regs::regs::{version_major, VERSION_MAJOR};

    fn device() -> ZapguardDevice<EventLog> {
        ZapguardDevice::new(DeviceConfig::default(), EventLog::default())
    }

    fn rd(d: &mut ZapguardDevice<EventLog>, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        d.read(reg.into(), &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(d: &mut ZapguardDevice<EventLog>, reg: u32, v: u32) {
        d.write(reg.into(), &v.to_le_bytes());
    }

    #[test]
    fn identity_registers() {
        let cfg = DeviceConfig {
            iotlb_entries: 32,
            asid_count: 16,
        };
        let mut d = ZapguardDevice::new(cfg, EventLog::default());
        let cases = [
            (IDENT, IDENT_MAGIC),
            (VERSION, VERSION_VALUE),
            (CAPS, CAPS_VALUE),
            (IOTLB_ENTRIES, 32),
            (ASID_COUNT, 16),
            (SCRATCH, 0),
            (ERROR, 0),
        ];
        for (reg, want) in cases {
            let mut b = [0u8; 4];
            d.read(reg.into(), &mut b);
            assert_eq!(
                u32::from_le_bytes(b),
                want,
                "{:?}",
                register_name(reg.into())
            );
            // Read-only registers ignore writes, without error.
            if reg != SCRATCH && reg != ERROR {
                d.write(reg.into(), &(!want).to_le_bytes());
                d.read(reg.into(), &mut b);
                assert_eq!(u32::from_le_bytes(b), want);
            }
        }
        assert_eq!(version_major(rd(&mut d, VERSION)), VERSION_MAJOR);
        assert_eq!(d.error_bits(), 0);
        assert!(!d
            .events()
            .events
            .iter()
            .any(|e| matches!(e, Event::Error { .. })));
    }

    #[test]
    fn defaults() {
        let mut d = device();
        assert_eq!(rd(&mut d, IOTLB_ENTRIES), 64);
        assert_eq!(rd(&mut d, ASID_COUNT), 256);
    }

    #[test]
    fn scratch_round_trip_and_events() {
        let mut d = device();
        for v in [0, 1, 0xdead_beef, u32::MAX] {
            wr(&mut d, SCRATCH, v);
            assert_eq!(rd(&mut d, SCRATCH), v);
        }
        let ev = &d.events().events;
        assert_eq!(ev.len(), 8);
        assert_eq!(
            ev[4],
            Event::BarWrite {
                bar: BAR0,
                offset: SCRATCH.into(),
                size: 4,
                value: 0xdead_beef
            }
        );
        assert_eq!(
            ev[5],
            Event::BarRead {
                bar: BAR0,
                offset: SCRATCH.into(),
                size: 4,
                value: 0xdead_beef
            }
        );
    }

    #[test]
    fn error_is_write_one_to_clear() {
        let mut d = device();
        d.read(1, &mut [0u8; 4]);
        assert_eq!(rd(&mut d, ERROR), ERR_BAD_ACCESS);
        wr(&mut d, ERROR, 0);
        assert_eq!(
            rd(&mut d, ERROR),
            ERR_BAD_ACCESS,
            "writing 0 clears nothing"
        );
        wr(&mut d, ERROR, !ERR_BAD_ACCESS);
        assert_eq!(
            rd(&mut d, ERROR),
            ERR_BAD_ACCESS,
            "other bits leave it alone"
        );
        wr(&mut d, ERROR, ERR_BAD_ACCESS);
        assert_eq!(rd(&mut d, ERROR), 0);
    }

    #[test]
    fn bad_accesses_set_error_and_read_zero() {
        // (offset, len): wrong width, misaligned, undefined, past the registers, past the BAR.
        let cases: &[(u64, usize)] = &[
            (u64::from(IDENT), 1),
            (u64::from(IDENT), 2),
            (u64::from(IDENT), 8),
            (u64::from(SCRATCH) + 2, 4),
            (1, 4),
            (0x100, 4),
            (REGS_SIZE - 4, 4),
            (REGS_SIZE, 4),
            (u64::from(MSIX_TABLE_OFFSET) - 4, 8),
            (BAR0_SIZE, 4),
            (u64::MAX - 1, 4),
            (0, 0),
        ];
        for &(offset, len) in cases {
            let mut d = device();
            wr(&mut d, SCRATCH, 0x1234_5678);
            let mut buf = vec![0xaau8; len];
            d.read(offset, &mut buf);
            assert!(buf.iter().all(|&b| b == 0), "{offset:#x}/{len} reads 0");
            assert_eq!(d.error_bits(), ERR_BAD_ACCESS, "{offset:#x}/{len}");
            wr(&mut d, ERROR, ERR_BAD_ACCESS);
            d.write(offset, &vec![0xffu8; len]);
            assert_eq!(d.error_bits(), ERR_BAD_ACCESS, "{offset:#x}/{len}");
            assert_eq!(
                rd(&mut d, SCRATCH),
                0x1234_5678,
                "bad writes change nothing"
            );
            let errors = d
                .events()
                .events
                .iter()
                .filter(|e| matches!(e, Event::Error { .. }))
                .count();
            assert_eq!(errors, 2);
        }
    }

    #[test]
    fn msix_area_is_benign() {
        let cases: &[(u64, usize)] = &[
            (MSIX_TABLE_OFFSET.into(), 4),
            (u64::from(MSIX_TABLE_OFFSET) + 12, 4),
            (u64::from(MSIX_TABLE_OFFSET) + MSIX_TABLE_SIZE - 8, 8),
            (MSIX_PBA_OFFSET.into(), 8),
            (u64::from(MSIX_PBA_OFFSET) + 1, 1),
        ];
        let mut d = device();
        for &(offset, len) in cases {
            let mut buf = vec![0xaau8; len];
            d.read(offset, &mut buf);
            assert!(buf.iter().all(|&b| b == 0));
            d.write(offset, &buf);
        }
        assert_eq!(d.error_bits(), 0);
        // One past the table is not benign.
        d.read(
            u64::from(MSIX_TABLE_OFFSET) + MSIX_TABLE_SIZE,
            &mut [0u8; 4],
        );
        assert_eq!(d.error_bits(), ERR_BAD_ACCESS);
    }

    #[test]
    fn odd_accesses_never_panic() {
        let mut d = device();
        let offsets = (0..0x40)
            .chain(REGS_SIZE - 8..REGS_SIZE + 8)
            .chain(u64::from(MSIX_TABLE_OFFSET) - 4..u64::from(MSIX_TABLE_OFFSET) + 4)
            .chain(BAR0_SIZE - 8..BAR0_SIZE + 8)
            .chain(u64::MAX - 16..=u64::MAX);
        for offset in offsets {
            for len in [0usize, 1, 2, 3, 4, 5, 7, 8, 9, 16, 4096] {
                let mut buf = vec![0x5au8; len];
                d.read(offset, &mut buf);
                d.write(offset, &buf);
                let good = len == 4 && offset.is_multiple_of(4) && register_name(offset).is_some();
                if !good && classify(offset, len) != Target::Msix {
                    assert_eq!(d.error_bits(), ERR_BAD_ACCESS, "{offset:#x}/{len}");
                    wr(&mut d, ERROR, ERR_BAD_ACCESS);
                }
            }
        }
    }

    #[test]
    fn reset_restores_reset_values() {
        let mut d = device();
        wr(&mut d, SCRATCH, 7);
        d.read(3, &mut [0u8; 1]);
        d.reset();
        assert_eq!(d.events().events.last(), Some(&Event::Reset));
        assert_eq!(rd(&mut d, SCRATCH), 0);
        assert_eq!(rd(&mut d, ERROR), 0);
        assert_eq!(rd(&mut d, IDENT), IDENT_MAGIC);
        assert_eq!(rd(&mut d, IOTLB_ENTRIES), 64);
    }

    #[test]
    fn register_names() {
        assert_eq!(register_name(IDENT.into()), Some("IDENT"));
        assert_eq!(register_name(SCRATCH.into()), Some("SCRATCH"));
        assert_eq!(register_name(2), None);
    }
}
