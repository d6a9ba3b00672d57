//! The `/dev/zapguard` user API: ioctl numbers and structures.
//!
//! Numbers follow the kernel's `_IOC` encoding (x86/generic: `dir << 30 | size << 16 | type << 8 |
//! nr`), computed here once so the driver and userspace cannot disagree.
//!
//! | ioctl | dir | argument | meaning |
//! |---|---|---|---|
//! | [`ZG_IOC_GET_INFO`] | read | [`ZgInfo`] | identity and parameters of the bound device |
//! | [`ZG_IOC_MAP`] | read/write | [`ZgMap`] | mirror (prefault) a VA range into the device page table |
//! | [`ZG_IOC_DMA`] | read/write | [`ZgDma`] | run one device DMA job on this context's VAs and wait for it |
//! | [`ZG_IOC_SNAPSHOT`] | write | [`ZgSnapshot`] | per-page device-PTE and CPU state of a range |
//! | [`ZG_IOC_STATS`] | read | [`ZgStats`] | this context's counters (and the device's violation count) |
//!
//! Number 0x05 is retired: it was the test build's `INJECT` before 1.0, which moved to debugfs
//! ([`super::testing`]); it is never reused.
//!
//! # Stability (uAPI 1.0)
//!
//! From 1.0 on, a program keeps working with every later driver:
//! - The ioctl numbers never change: each encodes its structure's 1.0 size
//!   (`ZG_*_SIZE_VER0`), whatever the structure's size now.
//! - Every argument structure starts with `__u32 size`, which the caller sets to the size it was
//!   built with (`sizeof`). The driver reads that many bytes, as `copy_struct_from_user()`
//!   does: a smaller (older) structure is zero-extended; a larger (newer) one is accepted if
//!   every byte the driver does not know is zero, and refused with `E2BIG` otherwise (the driver
//!   then writes its own size into `size`). A `size` below the 1.0 size gets `EINVAL`, one above
//!   [`ZG_SIZE_MAX`] `E2BIG`. Answers are written back up to the caller's `size` only.
//! - Fields are only ever added at the end, with zero meaning what the old behaviour was; flag
//!   bits are only added; `pad` fields must be zero (`EINVAL`) so that they can gain a meaning.
//! - The minor version grows with each addition; the major version would change only with a
//!   new device node.
//!
//! Each open file is one *context*: it binds the opener's address space (`current->mm`) and one
//! device ASID. Only that address space may use it: an ioctl from another process gets `EPERM`;
//! once the address space has been torn down (the opener exited, the file lives on elsewhere)
//! every context ioctl gets `EINVAL`. Addresses at or above [`super::pte::VA_LIMIT`] get `EFAULT`;
//! empty, unaligned (MAP) or overflowing ranges and unknown flags get `EINVAL`.

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

/// Version of this uAPI, reported in [`ZgInfo::uapi_version`]: major in bits 31:16, minor in
/// 15:0. 1.0 is the first stable one (the module documentation has the rules); before it, the
/// versions 2 to 8 changed structure layouts and ioctl numbers. Since 1.0:
/// - 1.1: [`ZgStats`] gains `accesses_judged` and `accesses_unjudged` (288 bytes).
pub const UAPI_VERSION: u32 = 1 << 16 | 1;

/// Answer of [`ZG_IOC_GET_INFO`]. Fields are filled from the device's registers at probe time
/// and from the PCI core; `reserved` is zero and keeps the size stable as fields are added.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "host",
    derive(zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable)
)]
pub struct ZgInfo {
    /// In: `sizeof` this structure as the caller's program knows it (see the module
    /// documentation: at least the 1.0 size, at most 4096).
    pub size: u32,
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
    /// Invalidation callbacks of every context, since the driver bound the device, that were
    /// non-blockable (the OOM reaper and `process_mrelease()`: they must never sleep), saturating.
    pub nonblock_invalidations: u32,
    /// Of those, the ones that gave up (returned false: the context lock was taken, or the
    /// device did not confirm the SYNC within the non-blockable spin), saturating. The kernel
    /// retries them, or the process's exit does the blockable teardown.
    pub nonblock_failed: u32,
}

/// `_IOWR('z', 0x00, struct zg_info)` at its 1.0 size: identity and parameters of the device
/// behind this file (the driver reads `size`, then writes the answer).
pub const ZG_IOC_GET_INFO: u32 = ioc(IOC_READ | IOC_WRITE, ZG_IOC_MAGIC, 0x00, ZG_INFO_SIZE_VER0);

/// [`ZgMap::flags`]: populate for write (breaks COW, makes the CPU PTE dirty) and map the pages
/// device-writable; without it pages are mapped read-only even if the CPU may write them.
pub const ZG_MAP_WRITE: u32 = 1 << 0;
/// Every [`ZgMap::flags`] bit the driver knows.
pub const ZG_MAP_FLAGS: u32 = ZG_MAP_WRITE;

/// Argument of [`ZG_IOC_MAP`]: fault in `[va, va + len)` with `hmm_range_fault()` and write the
/// device PTEs (2 MiB entries where the CPU maps 2 MiB). `va` and `len` must be page aligned.
/// Errors: `EFAULT` (no VMA, `PROT_NONE`), `EPERM` (write to a read-only VMA), `EBUSY` (the range
/// kept being invalidated; retry), `ENOMEM` (device page-table pool exhausted).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "host",
    derive(zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable)
)]
pub struct ZgMap {
    /// In: `sizeof` this structure as the caller's program knows it (see the module
    /// documentation: at least the 1.0 size, at most 4096).
    pub size: u32,
    /// In: `ZG_MAP_*`.
    pub flags: u32,
    /// In: first address (page aligned).
    pub va: u64,
    /// In: length in bytes (page aligned, > 0).
    pub len: u64,
    /// Out: 4 KiB device PTEs written.
    pub pages: u64,
    /// Out: 2 MiB device PTEs written.
    pub huge: u64,
    /// Out: times a collision with an invalidation forced a fresh `hmm_range_fault()`.
    pub retries: u32,
    /// In: zero.
    pub pad: u32,
}

/// [`ZgDma::flags`]: do not serve device faults; the first translation fault ends the job
/// (status [`super::dma::DMA_ST_FAULT`], the ioctl returns `EFAULT`).
pub const ZG_DMA_NO_FAULT: u32 = 1 << 0;
/// Every [`ZgDma::flags`] bit the driver knows.
pub const ZG_DMA_FLAGS: u32 = ZG_DMA_NO_FAULT;
/// Largest [`super::dma::DMA_READ`]/[`super::dma::DMA_WRITE`] length (the driver's bounce buffer).
pub const ZG_DMA_BOUNCE_MAX: u64 = 1 << 20;

/// Argument of [`ZG_IOC_DMA`]: one device DMA job on this context's virtual addresses.
///
/// `op` is a [`super::dma`] opcode. `aux` is the fill pattern for `DMA_FILL`, and a user buffer of
/// `len` bytes for `DMA_READ` (receives what the device read at `src`) and `DMA_WRITE` (what the
/// device writes at `dst`). By default the device stalls on a translation fault and the driver
/// serves it like a CPU page fault (`hmm_range_fault()` with the access type, then RESUME); a
/// fault it cannot serve aborts the job and the ioctl returns its error (`EFAULT` for no VMA or
/// `PROT_NONE`, `EPERM` for a write to a read-only mapping) with the status filled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "host",
    derive(zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable)
)]
pub struct ZgDma {
    /// In: `sizeof` this structure as the caller's program knows it (see the module
    /// documentation: at least the 1.0 size, at most 4096).
    pub size: u32,
    /// In: `DMA_*` opcode.
    pub op: u32,
    /// In: `ZG_DMA_*`.
    pub flags: u32,
    /// Out: `DMA_ST_*`.
    pub status: u32,
    /// In: source VA.
    pub src: u64,
    /// In: destination VA.
    pub dst: u64,
    /// In: length in bytes, 1..=[`super::dma::DMA_MAX_LEN`].
    pub len: u64,
    /// In: pattern or user buffer, per opcode.
    pub aux: u64,
    /// Out: bytes processed.
    pub bytes_done: u64,
    /// Out: opcode result (checksum, first difference).
    pub result: u64,
    /// Out: nanoseconds from submission to completion as seen by the driver.
    pub elapsed_ns: u64,
    /// Out: `FAULT_*` reason when the job ended on a fault.
    pub fault_reason: u32,
    /// Out: translation faults the device took (served or not).
    pub faults: u32,
    /// Out: negative errno of the fault the driver could not serve, 0 otherwise.
    pub error: i32,
    /// In: zero.
    pub pad: u32,
}

/// Snapshot byte: the device PTE is present.
pub const ZG_SNAP_DEV_PRESENT: u8 = 1 << 0;
/// Snapshot byte: the device PTE is writable.
pub const ZG_SNAP_DEV_WRITE: u8 = 1 << 1;
/// Snapshot byte: the device maps the page with a 2 MiB entry.
pub const ZG_SNAP_DEV_HUGE: u8 = 1 << 2;
/// Snapshot byte: the device set the dirty bit (it wrote through the entry).
pub const ZG_SNAP_DEV_DIRTY: u8 = 1 << 3;
/// Snapshot byte: the CPU maps the page (HMM snapshot, no fault).
pub const ZG_SNAP_CPU_VALID: u8 = 1 << 4;
/// Snapshot byte: the CPU mapping is writable.
pub const ZG_SNAP_CPU_WRITE: u8 = 1 << 5;
/// Snapshot byte: the CPU maps the page as part of a 2 MiB (or larger) mapping.
pub const ZG_SNAP_CPU_HUGE: u8 = 1 << 6;
/// Snapshot byte: the page cannot be mapped (no VMA, `PROT_NONE`, special mapping).
pub const ZG_SNAP_CPU_ERROR: u8 = 1 << 7;
/// Largest [`ZgSnapshot::npages`].
pub const ZG_SNAPSHOT_MAX_PAGES: u64 = 4096;

/// Argument of [`ZG_IOC_SNAPSHOT`]: one `ZG_SNAP_*` byte per page of `[va, va + npages * 4096)`
/// is written to the user buffer `out`. Faults nothing in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "host",
    derive(zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable)
)]
pub struct ZgSnapshot {
    /// In: `sizeof` this structure as the caller's program knows it (see the module
    /// documentation: at least the 1.0 size, at most 4096).
    pub size: u32,
    /// In: zero (no flags yet).
    pub flags: u32,
    /// First address (page aligned).
    pub va: u64,
    /// Pages, 1..=[`ZG_SNAPSHOT_MAX_PAGES`].
    pub npages: u64,
    /// User buffer of `npages` bytes.
    pub out: u64,
}

/// [`ZgStats::flags`]: the context's address space has been torn down.
pub const ZG_STATS_RELEASED: u32 = 1 << 0;
/// Number of validator violation classes (indexes of [`ZgStats::violations`] are `VIOL_*`).
pub const ZG_VIOL_CLASSES: usize = 8;

/// Answer of [`ZG_IOC_STATS`]: counters of this context since it was opened.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "host",
    derive(zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable)
)]
pub struct ZgStats {
    /// In: `sizeof` this structure as the caller's program knows it (see the module
    /// documentation: at least the 1.0 size, at most 4096).
    pub size: u32,
    /// The context's device ASID.
    pub asid: u32,
    /// `ZG_STATS_*`.
    pub flags: u32,
    /// Zero.
    pub pad: u32,
    /// Invalidation callbacks received.
    pub invalidations: u64,
    /// Of those, callbacks that found nothing mapped in the device (no commands sent).
    pub invalidations_empty: u64,
    /// Non-blockable callbacks that gave up (returned false) rather than sleep.
    pub invalidations_nonblock_failed: u64,
    /// Device PTEs cleared (a 2 MiB entry counts 512).
    pub pages_zapped: u64,
    /// `CMD_INV_RANGE` commands posted.
    pub inv_range_cmds: u64,
    /// `CMD_INV_ASID` commands posted (ranges above the threshold, release, close).
    pub inv_asid_cmds: u64,
    /// SYNCs waited for.
    pub sync_waits: u64,
    /// Total time spent waiting for SYNCs, in ns.
    pub sync_wait_ns: u64,
    /// Longest SYNC wait, in ns.
    pub sync_wait_max_ns: u64,
    /// Populate passes (MAP chunks and served faults).
    pub populates: u64,
    /// Populate passes restarted because an invalidation collided with them.
    pub populate_retries: u64,
    /// 4 KiB device PTEs written.
    pub pages_mapped: u64,
    /// 2 MiB device PTEs written.
    pub huge_mapped: u64,
    /// Device fault events received for this ASID.
    pub faults: u64,
    /// Stalled faults served (RESUME).
    pub faults_resolved: u64,
    /// Stalled faults that could not be served (ABORT).
    pub faults_aborted: u64,
    /// DMA jobs completed.
    pub dma_jobs: u64,
    /// Validator violation events for this ASID, indexed by `VIOL_*` (index 0 unused).
    pub violations: [u64; ZG_VIOL_CLASSES],
    /// The device's global `STAT_VIOLATIONS` counter (all ASIDs, since reset).
    pub device_violations: u64,
    /// Device page-table pages this context holds.
    pub pt_pages: u64,
    /// Pages mapped by served device faults: a fault maps the 2 MiB-aligned block around it
    /// (clamped to its VMA; just the page on userfaultfd ranges), so this over
    /// `faults_resolved` is the fault-around's yield.
    pub fault_pages: u64,
    /// 4 KiB pages whose device PTEs were made read-only instead of cleared (a 2 MiB entry
    /// counts 512): write-protects that keep the pages mapped (fork's COW, writeback's mkclean,
    /// soft-dirty tracking).
    pub pages_write_protected: u64,
    /// Aging queries (`clear_young`, `clear_flush_young`, `test_young`: reclaim, idle-page
    /// tracking) answered "young" from the device PTEs' accessed bits.
    pub aging_young: u64,
    /// Device accessed bits cleared by aging queries (a 2 MiB entry counts 512).
    pub aging_cleared: u64,
    /// Non-blockable invalidation callbacks (the OOM reaper, `process_mrelease()`), including
    /// those counted in `invalidations_nonblock_failed`.
    pub invalidations_nonblock: u64,
    /// (1.1) This context's DMA steps the device's validator judged, each before and after
    /// its bytes moved: the device's per-ASID count since the context was opened. A
    /// production module's device judges nothing (it is given no CPU page table to judge
    /// against), so there every step is in `accesses_unjudged`.
    pub accesses_judged: u64,
    /// (1.1) This context's DMA steps the device did not judge (validation off).
    pub accesses_unjudged: u64,
}

/// `_IOWR('z', 0x01, struct zg_map)` at its 1.0 size.
pub const ZG_IOC_MAP: u32 = ioc(IOC_READ | IOC_WRITE, ZG_IOC_MAGIC, 0x01, ZG_MAP_SIZE_VER0);
/// `_IOWR('z', 0x02, struct zg_dma)` at its 1.0 size.
pub const ZG_IOC_DMA: u32 = ioc(IOC_READ | IOC_WRITE, ZG_IOC_MAGIC, 0x02, ZG_DMA_SIZE_VER0);
/// `_IOW('z', 0x03, struct zg_snapshot)` at its 1.0 size.
pub const ZG_IOC_SNAPSHOT: u32 = ioc(IOC_WRITE, ZG_IOC_MAGIC, 0x03, ZG_SNAPSHOT_SIZE_VER0);
/// `_IOWR('z', 0x04, struct zg_stats)` at its 1.0 size (the driver reads `size`, then writes
/// the answer).
pub const ZG_IOC_STATS: u32 = ioc(IOC_READ | IOC_WRITE, ZG_IOC_MAGIC, 0x04, ZG_STATS_SIZE_VER0);

/// Size of [`ZgInfo`] in uAPI 1.0: the least `size` the driver accepts.
pub const ZG_INFO_SIZE_VER0: usize = 60;
/// Size of [`ZgMap`] in uAPI 1.0.
pub const ZG_MAP_SIZE_VER0: usize = 48;
/// Size of [`ZgDma`] in uAPI 1.0.
pub const ZG_DMA_SIZE_VER0: usize = 88;
/// Size of [`ZgSnapshot`] in uAPI 1.0.
pub const ZG_SNAPSHOT_SIZE_VER0: usize = 32;
/// Size of [`ZgStats`] in uAPI 1.0.
pub const ZG_STATS_SIZE_VER0: usize = 272;
/// Largest `size` the driver reads: a larger one gets `E2BIG`.
pub const ZG_SIZE_MAX: usize = 4096;

/// An argument structure of the extensible uAPI: its first field is `size`, and its 1.0 size
/// is the least the driver accepts.
pub trait Extensible: Sized {
    /// Size of the structure in uAPI 1.0.
    const SIZE_VER0: usize;
    /// The caller's `size` field.
    fn size(&self) -> u32;
    /// Sets the `size` field.
    fn set_size(&mut self, size: u32);
}

/// `Default` (every field zero, `size` this structure's size) and [`Extensible`] for each
/// argument structure, with build-time checks that the 1.0 size only grows and that `size`
/// comes first.
macro_rules! extensible {
    ($($t:ident: $ver0:ident),* $(,)?) => {$(
        impl Default for $t {
            fn default() -> Self {
                // SAFETY: every field is an integer or an array of integers, for which all
                // zeroes is a valid value.
                let mut v: Self = unsafe { core::mem::zeroed() };
                v.size = core::mem::size_of::<Self>() as u32;
                v
            }
        }
        impl Extensible for $t {
            const SIZE_VER0: usize = $ver0;
            fn size(&self) -> u32 {
                self.size
            }
            fn set_size(&mut self, size: u32) {
                self.size = size;
            }
        }
        const _: () = assert!(core::mem::size_of::<$t>() >= $ver0);
        const _: () = assert!(core::mem::offset_of!($t, size) == 0);
        const _: () = assert!(core::mem::size_of::<$t>() <= ZG_SIZE_MAX);
    )*};
}

extensible!(
    ZgInfo: ZG_INFO_SIZE_VER0,
    ZgMap: ZG_MAP_SIZE_VER0,
    ZgDma: ZG_DMA_SIZE_VER0,
    ZgSnapshot: ZG_SNAPSHOT_SIZE_VER0,
    ZgStats: ZG_STATS_SIZE_VER0,
);

// Every `VIOL_*` class has its slot in [`ZgStats::violations`].
const _: () = assert!(ZG_VIOL_CLASSES == super::event::VIOL_CTX_RELEASED as usize + 1);
