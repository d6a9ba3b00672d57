//! Event queue records: translation faults and validator violations.
//!
//! An event is 32 bytes: four little-endian u64 words.
//!
//! | word | bits | field |
//! |---|---|---|
//! | 0 | 7:0 | type (`EVT_*`) |
//! | 0 | 15:8 | flags (`EVT_F_*`) |
//! | 0 | 31:16 | reason (`FAULT_*` or `VIOL_*`) |
//! | 0 | 63:32 | ASID |
//! | 1 | | VA |
//! | 2 | | `info`: fault: stall tag (0 if not stalled); violation: device PA used ([`VIOL_TABLE_FREED`]: GPA of the freed table; [`VIOL_CTX_RELEASED`]: GPA of the walk's root table) |
//! | 3 | | `info2`: fault: job id; violation: CPU PA ([`NO_PA`] if the CPU maps nothing) |
//!
//! When the queue is full the device drops the event, counts it in `STAT_EVENTS_DROPPED`, sets
//! [`super::regs::EVTQ_PROD_OVERFLOW`] and [`super::regs::ERR_EVTQ_OVERFLOW`]; with the queue
//! disabled it only counts it. A stalled job whose fault cannot be recorded ends with
//! [`super::dma::DMA_ST_FAULT`] instead (nobody could resume it).

/// A translation fault.
pub const EVT_FAULT: u8 = 1;
/// A validator violation: the device used a translation the CPU no longer allows.
pub const EVT_VIOLATION: u8 = 2;

/// The access was a write.
pub const EVT_F_WRITE: u8 = 1 << 0;
/// The job is stalled; answer with RESUME or ABORT and the tag in `info`.
pub const EVT_F_STALLED: u8 = 1 << 1;

/// Fault: no present leaf for the VA.
pub const FAULT_NOT_PRESENT: u16 = 1;
/// Fault: write through a read-only entry.
pub const FAULT_PERMISSION: u16 = 2;
/// Fault: the context is not valid (or ASID out of range).
pub const FAULT_CTX_INVALID: u16 = 3;
/// Fault: a present entry with reserved bits, a misaligned huge frame or PS where illegal.
pub const FAULT_BAD_PTE: u16 = 4;
/// Fault: a page-table pointer outside guest RAM.
pub const FAULT_WALK_ABORT: u16 = 5;
/// Fault: VA not translatable (>= 2^47).
pub const FAULT_ADDRESS: u16 = 6;
/// Fault: the job was aborted by CMD_ABORT (reported in the job status only).
pub const FAULT_ABORTED: u16 = 7;

/// Violation: the CPU maps the VA to another page, or not at all.
pub const VIOL_STALE: u16 = 1;
/// Violation: device write while the CPU PTE is not writable.
pub const VIOL_WRITE_PERM: u16 = 2;
/// Violation: device write through a translation cached while the CPU PTE was dirty, which is
/// clean now (the driver missed the write-protect invalidation of a writeback/mkclean).
pub const VIOL_WRITE_CLEAN: u16 = 3;
/// Violation: access for a context whose address space was released.
pub const VIOL_RELEASED: u16 = 4;
/// Violation: use of a translation after the SYNC covering its invalidation completed.
pub const VIOL_LEDGER: u16 = 5;
/// Violation (ABI 1.4, with the table-lifetime check on, see
/// [`super::regs::PT_FREED_PAGES`]): the page walker read an entry from a device page-table
/// page the driver marked freed in the bitmap. The driver freed a table before the SYNC covering
/// its detachment completed (or never detached it). `va` is the access's VA, `info` the freed
/// table's GPA (page aligned), `info2` [`NO_PA`]. Reported once per table read, before the
/// access; the walk goes on as if the check were off.
pub const VIOL_TABLE_FREED: u16 = 6;
/// Violation (ABI 1.5): a page walk ran through a context the device had cached without
/// [`super::pte::CTX_MM_RELEASED`] while the entry in memory already carried it (read uncached
/// after the walk's lags, as the register map's "Released contexts" describes). The driver
/// writes that flag only once `CMD_CFGI_CTX` and a SYNC confirmed the context is off, so the
/// device should no longer have the context cached: the driver released it without
/// invalidating the device's context cache. `va` is the access's VA, `info` the GPA of the
/// walk's root table (the cached context's `pt_root`), `info2` [`NO_PA`]. Reported once per
/// walk, after it and before its access or fault; the walk's outcome is unchanged. An entry
/// that is merely invalid (cleared, its `CMD_CFGI_CTX` not executed yet) is not reported.
pub const VIOL_CTX_RELEASED: u16 = 7;
/// Violation (ABI 1.6): the CPU page table changed under an access while its bytes moved. The
/// walk made after the access no longer maps the VA to the frame the device used, with the
/// permission it used, although the walk before it did (or the access's verdict before was
/// clean): the driver let the kernel zap, remap or write-protect the page before the device was
/// done with it (its invalidation returned early). `info` the device PA, `info2` what the CPU
/// maps after the access ([`NO_PA`] for nothing). Per-context `STATS` have no slot for it yet
/// (their array ends at [`VIOL_CTX_RELEASED`]); the device-wide count and the trace have it.
pub const VIOL_ZAPPED_DURING_ACCESS: u16 = 8;

/// Violation (ABI 1.8, with the physical-DMA check on, see [`super::regs::PHYS_CTRL`]): an
/// untranslated device access outside the regions the driver lent it: a `DMA_READ`/`DMA_WRITE`
/// job's `aux` access outside its ASID's bounce buffer, or into it after the driver reclaimed
/// or forgot it while the job was queued or running; or a status record, event record or SYNC
/// completion word written outside every driver region. `va` is the job's VA for the step (0
/// for the others), `info` the guest-physical address accessed, `info2` [`NO_PA`]. The access
/// is made as if the check were off. For an event record, the violation is counted and traced
/// but not posted (it would go to the same place).
pub const VIOL_PHYS_UNLENT: u16 = 9;

/// `info2` of a violation when the CPU maps nothing at the VA.
pub const NO_PA: u64 = u64::MAX;

/// Size of an event record in bytes.
pub const EVT_SIZE: usize = 32;

/// An event record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `EVT_*`.
    pub ty: u8,
    /// `EVT_F_*`.
    pub flags: u8,
    /// `FAULT_*` or `VIOL_*`.
    pub reason: u16,
    /// Address-space ID.
    pub asid: u32,
    /// Virtual address.
    pub va: u64,
    /// See the table above.
    pub info: u64,
    /// See the table above.
    pub info2: u64,
}

impl Event {
    /// Little-endian encoding as stored in the ring.
    pub fn to_bytes(&self) -> [u8; EVT_SIZE] {
        let w0 = u64::from(self.ty)
            | u64::from(self.flags) << 8
            | u64::from(self.reason) << 16
            | u64::from(self.asid) << 32;
        super::words_to_bytes([w0, self.va, self.info, self.info2])
    }

    /// Decodes an event read from the ring.
    pub fn from_bytes(b: &[u8; EVT_SIZE]) -> Self {
        let [w0, va, info, info2] = super::bytes_to_words(b);
        Self {
            ty: w0 as u8,
            flags: (w0 >> 8) as u8,
            reason: (w0 >> 16) as u16,
            asid: (w0 >> 32) as u32,
            va,
            info,
            info2,
        }
    }
}

/// Name of a `FAULT_*` reason (for logs and traces).
pub const fn fault_name(reason: u16) -> &'static str {
    match reason {
        FAULT_NOT_PRESENT => "not_present",
        FAULT_PERMISSION => "permission",
        FAULT_CTX_INVALID => "ctx_invalid",
        FAULT_BAD_PTE => "bad_pte",
        FAULT_WALK_ABORT => "walk_abort",
        FAULT_ADDRESS => "address",
        FAULT_ABORTED => "aborted",
        _ => "unknown",
    }
}

/// Name of a `VIOL_*` class (for logs and traces).
pub const fn violation_name(reason: u16) -> &'static str {
    match reason {
        VIOL_STALE => "stale",
        VIOL_WRITE_PERM => "write_perm",
        VIOL_WRITE_CLEAN => "write_clean",
        VIOL_RELEASED => "released",
        VIOL_LEDGER => "ledger",
        VIOL_TABLE_FREED => "table_freed",
        VIOL_CTX_RELEASED => "ctx_released",
        VIOL_ZAPPED_DURING_ACCESS => "zapped_during_access",
        VIOL_PHYS_UNLENT => "phys_unlent",
        _ => "unknown",
    }
}

const _: () = assert!(core::mem::size_of::<Event>() == EVT_SIZE);
const _: () = assert!(core::mem::offset_of!(Event, va) == 8);
