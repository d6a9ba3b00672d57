//! DMA job descriptors and their status records.
//!
//! Jobs operate on process virtual addresses of one ASID, translated page by page through the
//! IOTLB and the device page table; `aux` buffers are guest-physical (the driver's own memory).
//! A job is 64 bytes: eight little-endian u64 words.
//!
//! | word | bits | field |
//! |---|---|---|
//! | 0 | 7:0 | opcode (`DMA_*`) |
//! | 0 | 15:8 | flags (`DMA_F_*`) |
//! | 0 | 31:16 | reserved, zero |
//! | 0 | 63:32 | ASID |
//! | 1 | | `src` VA |
//! | 2 | | `dst` VA |
//! | 3 | | `len` bytes, 1..=[`DMA_MAX_LEN`] |
//! | 4 | | `aux`: pattern or guest-physical buffer, per opcode |
//! | 5 | | `status`: guest-physical address of the 32-byte [`DmaStatus`], 8-aligned |
//! | 6 | | `id`: cookie, echoed in the status |
//! | 7 | | reserved, zero |
//!
//! | opcode | reads | writes | `result` |
//! |---|---|---|---|
//! | [`DMA_COPY`] | `src` VA | `dst` VA | 0 |
//! | [`DMA_FILL`] | — | `dst` VA with the 8-byte little-endian `aux` repeated | 0 |
//! | [`DMA_WRITE`] | `aux` GPA buffer | `dst` VA | 0 |
//! | [`DMA_READ`] | `src` VA | `aux` GPA buffer | 0 |
//! | [`DMA_CHECKSUM`] | `src` VA | — | FNV-1a 64 of the bytes ([`fnv1a64`]) |
//! | [`DMA_COMPARE`] | `src` and `dst` VAs | — | offset of the first difference, or `u64::MAX` if equal |
//!
//! Jobs run one at a time in queue order. A translation fault ends the job with
//! [`DMA_ST_FAULT`] after recording a fault event, unless the job has [`DMA_F_STALL`] and its
//! context [`super::pte::CTX_STALL`]: then the event carries a stall tag and the job (and the queue
//! behind it) waits for `CMD_RESUME` or `CMD_ABORT` with that tag. `DMAQ_CONS` advances when a job
//! completes; its status record is written first.

/// Copy `src` VA to `dst` VA.
pub const DMA_COPY: u8 = 1;
/// Fill `dst` VA with a pattern.
pub const DMA_FILL: u8 = 2;
/// Write a guest-physical buffer to `dst` VA.
pub const DMA_WRITE: u8 = 3;
/// Read `src` VA into a guest-physical buffer.
pub const DMA_READ: u8 = 4;
/// Checksum `src` VA.
pub const DMA_CHECKSUM: u8 = 5;
/// Compare `src` VA with `dst` VA.
pub const DMA_COMPARE: u8 = 6;

/// Job flag: stall on a translation fault instead of failing.
pub const DMA_F_STALL: u8 = 1 << 0;
/// Job flag: raise the command vector when the job completes.
pub const DMA_F_IRQ: u8 = 1 << 1;

/// Largest job length in bytes.
pub const DMA_MAX_LEN: u64 = 64 << 20;

/// Status: not completed yet (the driver initialises the record with this).
pub const DMA_ST_PENDING: u16 = 0;
/// Status: done, every byte processed.
pub const DMA_ST_OK: u16 = 1;
/// Status: ended by a translation fault or CMD_ABORT; `fault_reason` says which fault.
pub const DMA_ST_FAULT: u16 = 2;
/// Status: malformed descriptor (opcode, flags, reserved fields, length, alignment).
pub const DMA_ST_BAD_JOB: u16 = 3;
/// Status: an `aux` buffer lies outside guest RAM.
pub const DMA_ST_BUF_ERROR: u16 = 4;

/// Size of a job descriptor in bytes.
pub const DMA_JOB_SIZE: usize = 64;
/// Size of a status record in bytes.
pub const DMA_STATUS_SIZE: usize = 32;

/// A DMA job descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaJob {
    /// `DMA_*` opcode.
    pub op: u8,
    /// `DMA_F_*`.
    pub flags: u8,
    /// Must be zero.
    pub reserved0: u16,
    /// Address-space ID.
    pub asid: u32,
    /// Source VA.
    pub src: u64,
    /// Destination VA.
    pub dst: u64,
    /// Length in bytes.
    pub len: u64,
    /// Pattern or guest-physical buffer.
    pub aux: u64,
    /// Guest-physical address of the status record.
    pub status: u64,
    /// Cookie.
    pub id: u64,
    /// Must be zero.
    pub reserved1: u64,
}

impl DmaJob {
    /// Little-endian encoding as stored in the ring.
    pub fn to_bytes(&self) -> [u8; DMA_JOB_SIZE] {
        let w0 = u64::from(self.op)
            | u64::from(self.flags) << 8
            | u64::from(self.reserved0) << 16
            | u64::from(self.asid) << 32;
        super::words_to_bytes([
            w0,
            self.src,
            self.dst,
            self.len,
            self.aux,
            self.status,
            self.id,
            self.reserved1,
        ])
    }

    /// Decodes a job read from the ring.
    pub fn from_bytes(b: &[u8; DMA_JOB_SIZE]) -> Self {
        let [w0, src, dst, len, aux, status, id, reserved1] = super::bytes_to_words(b);
        Self {
            op: w0 as u8,
            flags: (w0 >> 8) as u8,
            reserved0: (w0 >> 16) as u16,
            asid: (w0 >> 32) as u32,
            src,
            dst,
            len,
            aux,
            status,
            id,
            reserved1,
        }
    }
}

/// A job's completion record, written by the device to `DmaJob::status`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaStatus {
    /// `DMA_ST_*`.
    pub status: u16,
    /// For [`DMA_ST_FAULT`]: the `FAULT_*` reason of the fault that ended the job.
    pub fault_reason: u16,
    /// Translation faults taken (including resumed stalls).
    pub faults: u32,
    /// Bytes processed before the job ended.
    pub bytes_done: u64,
    /// Opcode-specific result.
    pub result: u64,
    /// The job's `id`.
    pub id: u64,
}

impl DmaStatus {
    /// Little-endian encoding as stored in guest memory.
    pub fn to_bytes(&self) -> [u8; DMA_STATUS_SIZE] {
        let w0 = u64::from(self.status)
            | u64::from(self.fault_reason) << 16
            | u64::from(self.faults) << 32;
        super::words_to_bytes([w0, self.bytes_done, self.result, self.id])
    }

    /// Decodes a status record.
    pub fn from_bytes(b: &[u8; DMA_STATUS_SIZE]) -> Self {
        let [w0, bytes_done, result, id] = super::bytes_to_words(b);
        Self {
            status: w0 as u16,
            fault_reason: (w0 >> 16) as u16,
            faults: (w0 >> 32) as u32,
            bytes_done,
            result,
            id,
        }
    }
}

/// FNV-1a 64 offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64 prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Continues an FNV-1a 64 hash over `bytes` (start with [`FNV_OFFSET`]): [`DMA_CHECKSUM`]'s result.
pub fn fnv1a64(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

const _: () = assert!(core::mem::size_of::<DmaJob>() == DMA_JOB_SIZE);
const _: () =
    assert!(core::mem::offset_of!(DmaJob, status) == 40 && core::mem::offset_of!(DmaJob, id) == 48);
const _: () = assert!(core::mem::size_of::<DmaStatus>() == DMA_STATUS_SIZE);
const _: () = assert!(core::mem::offset_of!(DmaStatus, bytes_done) == 8);
