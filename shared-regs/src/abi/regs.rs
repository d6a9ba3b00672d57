//! BAR0 register map.
//!
//! All registers are little-endian and accessed with naturally aligned 32-bit accesses; an
//! access of another width or alignment, or to an undefined offset, is ignored for writes and
//! reads as 0, and sets [`ERR_BAD_ACCESS`] in [`ERROR`] (the offset goes to [`ERROR_INFO`]).
//! Writes to read-only (RO) registers are ignored without an error, as on most hardware.
//! 64-bit addresses are split into `_LO`/`_HI` halves; the device latches them when the unit
//! using them is enabled in [`CR0`].
//!
//! | offset | name | access | reset | meaning |
//! |---|---|---|---|---|
//! | 0x000 | [`IDENT`] | RO | [`IDENT_MAGIC`] | identifies a zapguard device |
//! | 0x004 | [`VERSION`] | RO | [`VERSION_VALUE`] | ABI version, major in bits 31:16, minor in 15:0 |
//! | 0x008 | [`CAPS`] | RO | [`CAPS_VALUE`] | capability bits `CAP_*` |
//! | 0x00c | [`IOTLB_ENTRIES`] | RO | model parameter | number of IOTLB entries |
//! | 0x010 | [`ASID_COUNT`] | RO | model parameter | number of ASIDs = context-table entries |
//! | 0x014 | [`SCRATCH`] | RW | 0 | free for software; used by probes and tests of the MMIO path |
//! | 0x018 | [`ERROR`] | RW1C | 0 | global error bits `ERR_*`; write 1 to clear |
//! | 0x01c | [`ERROR_INFO`] | RO | 0 | detail of the last error: the offending register offset for `ERR_BAD_ACCESS`/`ERR_CONFIG` |
//! | 0x020 | [`CR0`] | RW | 0 | enables `CR0_*` |
//! | 0x024 | [`CR0ACK`] | RO | 0 | `CR0` as applied by the device; poll it after writing `CR0` |
//! | 0x028 | [`IRQ_CTRL`] | RW | 0 | MSI-X causes enabled, `IRQ_*` |
//! | 0x02c | [`CMD_LAG`] | RW | 0 | test knob (1.2): DMA steps a running job may still do after a doorbell before the device executes the commands it published |
//! | 0x030 | [`CTX_BASE_LO`] | RW | 0 | context table GPA bits 31:0 (4 KiB aligned) |
//! | 0x034 | [`CTX_BASE_HI`] | RW | 0 | context table GPA bits 63:32 |
//! | 0x040 | [`CMDQ_BASE_LO`] | RW | 0 | command ring GPA bits 31:0 (64-byte aligned) |
//! | 0x044 | [`CMDQ_BASE_HI`] | RW | 0 | command ring GPA bits 63:32 |
//! | 0x048 | [`CMDQ_LOG2SIZE`] | RW | 0 | log2 of the number of entries ([`super::queue::MIN_LOG2`]..=[`super::queue::MAX_LOG2`]) |
//! | 0x04c | [`CMDQ_PROD`] | RW | 0 | producer: index + wrap bit, written by the driver |
//! | 0x050 | [`CMDQ_CONS`] | RO | 0 | consumer: index + wrap bit; [`CONS_ERR`] + code on a command error |
//! | 0x060 | [`EVTQ_BASE_LO`] | RW | 0 | event ring GPA bits 31:0 (64-byte aligned) |
//! | 0x064 | [`EVTQ_BASE_HI`] | RW | 0 | event ring GPA bits 63:32 |
//! | 0x068 | [`EVTQ_LOG2SIZE`] | RW | 0 | log2 of the number of entries |
//! | 0x06c | [`EVTQ_PROD`] | RO | 0 | producer (device); [`EVTQ_PROD_OVERFLOW`] when events were dropped |
//! | 0x070 | [`EVTQ_CONS`] | RW | 0 | consumer (driver) |
//! | 0x080 | [`DMAQ_BASE_LO`] | RW | 0 | DMA job ring GPA bits 31:0 (64-byte aligned) |
//! | 0x084 | [`DMAQ_BASE_HI`] | RW | 0 | DMA job ring GPA bits 63:32 |
//! | 0x088 | [`DMAQ_LOG2SIZE`] | RW | 0 | log2 of the number of entries |
//! | 0x08c | [`DMAQ_PROD`] | RW | 0 | producer (driver) |
//! | 0x090 | [`DMAQ_CONS`] | RO | 0 | consumer (device): advances as jobs complete; [`CONS_ERR`] on a fetch abort |
//! | 0x0a0 | [`FAIL_INJECT`] | RW | [`FAIL_NONE`] | test knob (1.3): device failure mode `FAIL_*` armed, bits 7:0 |
//! | 0x0a4 | [`FAIL_ARG`] | RW | 0 | test knob (1.3): argument of the armed mode ([`FAIL_SYNC_DELAY`]: milliseconds) |
//! | 0x0a8 | [`WALK_LAG`] | RW | 0 | test knob (1.3): microseconds the page walker waits before each table read (at most [`WALK_LAG_MAX`]) |
//! | 0x0ac | [`RESET`] | WO | 0 | (1.3) writing [`RESET_KEY`] resets the device as a function-level reset does; reads 0 |
//! | 0x0b0 | [`FAULT_LAG`] | RW | 0 | test knob (1.4): microseconds the device waits between finding a DMA job's translation fault and reporting it (at most [`FAULT_LAG_MAX`]) |
//! | 0x0b4 | [`IOTLB_KEEP`] | RW | 0 | test knob (1.4): [`IOTLB_KEEP_EN`] in bit 0: a full IOTLB evicts nothing, new translations are used without being cached; bits 31:1 reserved |
//! | 0x0b8 | [`PT_FREED_BASE_LO`] | RW | 0 | test knob (1.4): freed-table bitmap GPA bits 31:0 (8-byte aligned; a misaligned write is refused with [`ERR_CONFIG`]) |
//! | 0x0bc | [`PT_FREED_BASE_HI`] | RW | 0 | test knob (1.4): freed-table bitmap GPA bits 63:32 |
//! | 0x0c0 | [`PT_FREED_PAGES`] | RW | 0 | test knob (1.4): guest pages the bitmap covers; 0 = table-lifetime check off |
//! | 0x0c4 | [`SYNC_LAG`] | RW | 0 | test knob (1.5): microseconds a SYNC waits, from when it is reached, before its completion is written (at most [`SYNC_LAG_MAX`]) |
//! | 0x0c8 | [`PHYS_ADDR_LO`] | RW | 0 | (1.8) start of the region the next [`PHYS_CTRL`] write declares, bits 31:0 |
//! | 0x0cc | [`PHYS_ADDR_HI`] | RW | 0 | (1.8) bits 63:32 of that start |
//! | 0x0d0 | [`PHYS_LEN`] | RW | 0 | (1.8) length in bytes of that region |
//! | 0x0d4 | [`PHYS_CTRL`] | RW | 0 | (1.8) write: operation `PHYS_OP_*` in bits 3:0, ASID in 31:16; read: 1 while the physical-DMA check is on |
//! | 0x0d8 | [`ASID_STAT_SEL`] | RW | 0 | (1.9) the ASID whose statistics [`asid_stat_lo`]/[`asid_stat_hi`] show, bits 15:0; writing [`ASID_STAT_CLEAR`] with it zeroes them |
//! | 0x0e0 + 8·i | [`asid_stat_lo`]`(i)` | RO | 0 | (1.9) per-ASID statistic `ASID_STAT_*` i of the selected ASID, bits 31:0 |
//! | 0x0e4 + 8·i | [`asid_stat_hi`]`(i)` | RO | 0 | (1.9) bits 63:32 of it (read HI, LO, HI again) |
//! | 0x100 + 8·i | [`stat_lo`]`(i)` | RO | 0 | statistic `STAT_*` i, bits 31:0 |
//! | 0x104 + 8·i | [`stat_hi`]`(i)` | RO | 0 | statistic i, bits 63:32 (read HI, LO, HI again for a consistent value) |
//!
//! Drivers must check [`IDENT`] and the major version before touching anything else; a minor
//! version bump only adds registers and capability bits.
//!
//! **Enabling.** Program a unit's base and size while its `CR0` bit is clear, then set the bit
//! and poll [`CR0ACK`]. Enabling resets the unit's indices to 0 (empty queue). A bad
//! configuration (size out of range, misaligned base) is refused: the bit stays clear in
//! `CR0ACK` and [`ERR_CONFIG`] is raised. Writes to a unit's base/size registers while it is
//! enabled are ignored and raise `ERR_CONFIG`.
//!
//! **Bus mastering.** The device honours the PCI command register's bus-master enable like
//! hardware: while it is clear the device makes no memory access at all (no command or job
//! fetch, no DMA, no completion, status, event or SYNC write) and raises no MSI-X (an MSI is a
//! memory write; vectors due meanwhile are lost, not delivered later). A job in flight stops at
//! a step boundary (see [`CMD_LAG`]) and continues where it stopped once bus mastering is set
//! again. Register accesses keep working. Clearing bus mastering is how a driver fences a device
//! that no longer answers `CR0` (see [`FAIL_DMA_HANG`]).
//!
//! **Failure injection (1.3).** [`FAIL_INJECT`] makes the device fail in one of the ways a
//! driver must survive (DESIGN.md, "When the device fails"), so that tests can prove the
//! driver's fallbacks. One mode is armed at a time; writing the register replaces it (writing
//! [`FAIL_NONE`] disarms). A value with an unknown mode or reserved bits set is refused: nothing
//! is stored, [`ERR_CONFIG`] is raised with [`ERROR_INFO`] = [`FAIL_INJECT`]. A device reset
//! disarms every mode, ends a hang and zeroes [`CMD_LAG`], [`FAIL_ARG`], [`WALK_LAG`], the 1.4
//! knobs [`FAULT_LAG`], [`IOTLB_KEEP`], [`PT_FREED_BASE_LO`], [`PT_FREED_BASE_HI`] and
//! [`PT_FREED_PAGES`], and the 1.5 knob [`SYNC_LAG`] (the list is [`RESET_KNOBS`]).
//!
//! **Table lifetime (1.4).** [`PT_FREED_BASE_LO`]/[`PT_FREED_BASE_HI`] and [`PT_FREED_PAGES`]
//! name a bitmap in guest memory, one bit per 4 KiB guest page: bit `i` (byte `i / 8`, bit
//! `i % 8`, least significant first) stands for the page at GPA `i * 4096`. The driver sets a
//! page's bit when it frees a device page-table page and clears it when it allocates one, with
//! plain memory writes. While [`PT_FREED_PAGES`] is not 0 the page walker, before it reads an
//! entry from a table (every level, the root named by the context entry included), reads that
//! table's bit (one byte read, after the [`WALK_LAG`] wait, so a bit set mid-walk is seen at the
//! next table read); a set bit is reported as a
//! [`super::event::VIOL_TABLE_FREED`] violation, a table at or beyond page `PT_FREED_PAGES` is
//! not checked, and a bitmap byte outside guest RAM reads as "not freed". A driver that frees a
//! table before the SYNC covering its detachment completes is then caught at the walk that reads
//! it, whether or not the page was reused yet. The registers are not latched: the walker uses
//! their current values, so program the base before [`PT_FREED_PAGES`].
//!
//! **Released contexts (1.5).** Independently of the knobs, every page walk of a DMA job ends
//! with an uncached read of its ASID's context entry (after the walk's [`WALK_LAG`] waits). The
//! walk itself runs through the context the device cached; if the entry in memory now carries
//! [`super::pte::CTX_MM_RELEASED`] and the cached copy does not, the driver declared the
//! context off (it writes that flag only after `CMD_CFGI_CTX` and a SYNC confirmed it) while the
//! device still had the earlier entry cached: it released the context without invalidating the
//! device's context cache. That walk is reported as one [`super::event::VIOL_CTX_RELEASED`]
//! violation (see there); its outcome is unchanged. An entry that is merely invalid (no
//! [`super::pte::CTX_VALID`], no `CTX_MM_RELEASED`) is the legal window between the driver
//! clearing it and its `CMD_CFGI_CTX` executing, and is not reported. (An entry loaded with the
//! flag already set is not this check's business: every access through it is a
//! [`super::event::VIOL_RELEASED`] violation.)
//!
//! **No silent off-switch (1.8).** Before each DMA step moves bytes, the device reads the
//! step's context entry uncached; the validator judges the step against it. If that entry is
//! unreadable or is neither valid nor released (cleared, and still cached by the device), the
//! step faults with [`super::event::FAULT_CTX_INVALID`] before any byte moves: an access is
//! judged, or refused, never made unjudged. Only [`super::pte::CTX_NO_VALIDATE`] skips the
//! verdict, and such steps are counted in [`STAT_ACCESSES_UNJUDGED`].
//!
//! **Physical DMA (1.8).** Some device accesses are not translated: DMA status records, event
//! records and SYNC completion words, which the device writes to the driver's memory, and the
//! `aux` buffer of `DMA_READ`/`DMA_WRITE` jobs (a context's bounce buffer). The driver declares
//! that memory with [`PHYS_CTRL`]: [`PHYS_OP_DRIVER`] regions for its own structures,
//! [`PHYS_OP_BOUNCE`] for each ASID's bounce buffer, [`PHYS_OP_RECLAIM`] each time it takes a
//! bounce buffer back from the device (before it fills it for a new job or gives it to another
//! user), [`PHYS_OP_FORGET`] when it frees one. After [`PHYS_OP_CHECK`], a status, event or SYNC
//! write outside every driver region, and an `aux` access of a job outside its ASID's bounce
//! buffer, or into it after a reclaim made while the job was queued or running, is a
//! [`super::event::VIOL_PHYS_UNLENT`] violation. The access is made all the same. A device reset
//! forgets every region and turns the check off.
//!
//! **Reserved bits.** Reserved bits of a register that has them read as 0 and are ignored when
//! written (as in [`CR0`], [`IRQ_CTRL`], [`IOTLB_KEEP`]); [`FAIL_INJECT`] alone refuses a value
//! with reserved bits (it could arm an unknown mode).

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
/// Detail of the last error.
pub const ERROR_INFO: u32 = 0x01c;
/// Control register 0: unit enables.
pub const CR0: u32 = 0x020;
/// Control register 0 acknowledge.
pub const CR0ACK: u32 = 0x024;
/// Interrupt cause enables.
pub const IRQ_CTRL: u32 = 0x028;
/// Command lag (ABI 1.2), a test knob modelling a slow command processor: after a
/// [`CMDQ_PROD`] doorbell, a running (not stalled) DMA job may do this many more steps before the
/// device executes the newly published commands. A step is the device's unit of DMA work;
/// commands run between steps. It ends at the next page boundary of the job's source or
/// destination, whichever comes first, so it moves at most one page (less on a model configured
/// with smaller steps). With no job running the commands execute at once, and SYNC semantics are
/// unchanged (it still completes only after the lagged invalidations). A driver that waits for
/// its SYNC is correct at any lag; one that does not is caught by the validator
/// deterministically once the lag is large.
pub const CMD_LAG: u32 = 0x02c;
/// Failure injection (ABI 1.3), a test knob: the `FAIL_*` mode armed, in bits 7:0 (bits 31:8
/// are reserved and must be written as 0). Reads back the armed mode; a one-shot mode reads
/// [`FAIL_NONE`] once it fired.
pub const FAIL_INJECT: u32 = 0x0a0;
/// Argument of the armed failure mode (ABI 1.3): for [`FAIL_SYNC_DELAY`] the delay in
/// milliseconds; unused by the other modes. Read when the mode fires, so it may be written
/// before or after [`FAIL_INJECT`].
pub const FAIL_ARG: u32 = 0x0a4;
/// Page-walk lag (ABI 1.3), a test knob modelling a slow page-table walker: the walker waits
/// this many microseconds before each table read of a walk, so a 4-level walk takes at least
/// four lags. Larger values than [`WALK_LAG_MAX`] are stored (and read back) as the maximum.
/// The walker reads guest memory live, level by level, like hardware; the lag widens the window
/// between reading a table entry and reading the table it points to. A driver that frees a
/// device page-table page (and lets the kernel reuse it) only after the SYNC that covers its
/// detachment is correct at any lag; one that frees it earlier lets the walker read the reused
/// page, and a large lag makes that race likely enough to catch.
///
/// With [`WALK_LAG_IN_STEP`] set (ABI 1.8) the device also waits the lag once in the middle of
/// every DMA step: after the validator's CPU walk before the access, before the bytes move (a
/// slow copy). A page the guest zaps meanwhile is then touched after its zap inside one step,
/// which only the walk after the access can see ([`super::event::VIOL_ZAPPED_DURING_ACCESS`]).
pub const WALK_LAG: u32 = 0x0a8;
/// [`WALK_LAG`] bit 31 (ABI 1.8): the lag applies inside every DMA step too. Stored and read
/// back as written; bits 30:0 are the lag, clamped to [`WALK_LAG_MAX`].
pub const WALK_LAG_IN_STEP: u32 = 1 << 31;
/// Device reset (ABI 1.3): writing [`RESET_KEY`] returns every register, queue, cache, job and
/// armed failure mode to its reset value, as a function-level reset does (PCI config space,
/// bus mastering included, is untouched). A driver writes it at probe so that whatever a
/// previous driver instance left behind (a failed, hung or half-configured device) is gone.
/// Other values are ignored with [`ERR_CONFIG`]. Reads 0.
pub const RESET: u32 = 0x0ac;
/// The value that [`RESET`] takes: "RSET" as a little-endian u32.
pub const RESET_KEY: u32 = u32::from_le_bytes(*b"RSET");
/// Fault lag (ABI 1.4), a test knob modelling a slow fault path: when a step of a DMA job faults
/// (the walker found no valid or permitted translation, or any other `FAULT_*` a job can take:
/// every fault the job reports), the device waits this many microseconds before it reports the
/// fault: [`STAT_FAULTS`], the fault event, the stall of the job or its fault status, and the
/// event interrupt all come after the wait. Larger values than [`FAULT_LAG_MAX`] are stored (and
/// read back) as the maximum; 0 reports at once.
///
/// Like the [`WALK_LAG`] wait, this one holds the device: register accesses (doorbells, `CR0`)
/// wait until the fault is reported, and published commands do not execute during the wait.
/// What can change meanwhile is guest memory: the CPU and device page tables, the rings. The
/// device ends its processing slice right after a lagged fault, so the register accesses that
/// waited get in before it does more, and the commands they published run before the DMA
/// engine's next step. So the window between a fault and the driver's service of it widens: an
/// unmap or migration that edits the page tables and publishes its invalidations during the
/// wait has them executed before the driver reads the fault event, which by then describes a
/// VA the driver's fault handler must look up again rather than trust.
pub const FAULT_LAG: u32 = 0x0b0;
/// IOTLB keep (ABI 1.4), a test knob: while [`IOTLB_KEEP_EN`] is set, a full IOTLB never evicts.
/// A translation the walker finds when the IOTLB is full is used for the access (and held by the
/// job as usual) but not cached, and counted in [`STAT_IOTLB_NOT_CACHED`]; the cached entries
/// stay until an invalidation command (or a device reset) removes them. Refilling an entry that
/// is already cached (the same page, say to add write permission) still replaces it in place.
/// Bits 31:1 are reserved: they read as 0 and writing them is ignored.
///
/// Cached translations then live as long as possible, so a driver that misses an invalidation,
/// or issues one too narrow, is caught by the validator when the device uses the stale entry,
/// instead of natural eviction hiding the bug.
pub const IOTLB_KEEP: u32 = 0x0b4;
/// [`IOTLB_KEEP`]: a full IOTLB evicts nothing.
pub const IOTLB_KEEP_EN: u32 = 1 << 0;
/// The defined bits of [`IOTLB_KEEP`].
pub const IOTLB_KEEP_MASK: u32 = IOTLB_KEEP_EN;
/// Freed-table bitmap base (ABI 1.4), a test knob: bits 31:0 of the guest-physical address of
/// the bitmap of the table-lifetime check (see the module documentation, "Table lifetime").
/// The base must be [`PT_FREED_BASE_ALIGN`]-aligned: a write with bits 2:0 set is refused like
/// a misaligned base at a unit's enable: nothing is stored (the register keeps its value) and
/// [`ERR_CONFIG`] is raised with [`ERROR_INFO`] = [`PT_FREED_BASE_LO`]. Unlike the queue bases,
/// it may be written at any time (there is no unit to enable; the walker reads it live).
pub const PT_FREED_BASE_LO: u32 = 0x0b8;
/// Freed-table bitmap base (ABI 1.4), bits 63:32.
pub const PT_FREED_BASE_HI: u32 = 0x0bc;
/// Freed-table pages (ABI 1.4), a test knob: how many 4 KiB guest pages, from GPA 0, the bitmap
/// at [`PT_FREED_BASE_LO`] covers (its size is `PT_FREED_PAGES / 8` bytes, rounded up). 0 turns
/// the table-lifetime check off. Tables at or above `PT_FREED_PAGES * 4096` are not checked.
///
/// With the check on, a walk that reads an entry from a table page whose bit is set reports one
/// [`super::event::VIOL_TABLE_FREED`] violation per such read, for the access's ASID and VA,
/// with the freed table's GPA in the place of the device PA (event `info`, trace `pa`). The walk
/// then goes on with what the page holds, as if the check were off (a page freed too early
/// still holds its entries until it is reused): the access's outcome (translation, fault) is
/// the same with the check on or off, only the violation is added.
pub const PT_FREED_PAGES: u32 = 0x0c0;
/// Required alignment of [`PT_FREED_BASE_LO`]/[`PT_FREED_BASE_HI`].
pub const PT_FREED_BASE_ALIGN: u64 = 8;
/// SYNC lag (ABI 1.5), a test knob modelling a slow completion path: a SYNC writes its
/// completion word and raises its interrupt no earlier than this many microseconds after the
/// device reached it (fetched it at the head of the queue), even once every earlier command has
/// run and no in-flight DMA holds a translation it must wait for. Meanwhile it holds the queue
/// like any waiting SYNC: the commands after it wait too. The lag in force when the SYNC is
/// reached applies to it (rewriting the register does not move a waiting SYNC's time). Larger
/// values than [`SYNC_LAG_MAX`] are stored (and read back) as the maximum; 0 completes as soon
/// as the SYNC's conditions are met. Combined with [`FAIL_SYNC_DELAY`], the later of the two
/// times applies. It is not a failure mode: nothing is traced as `fail_inject`; the trace's
/// `sync_done` carries the lag it applied (`lag_us`).
///
/// What it makes observable: a SYNC then always takes longer than a driver's spin, so the
/// driver must sleep for it and be woken by the completion interrupt (the interrupt-driven
/// path, rarely taken when the device answers within the spin), and a driver that reads a
/// completion word it did not wait for (or waits for the wrong SYNC) sees it not yet written,
/// where a fast device would have hidden the bug.
pub const SYNC_LAG: u32 = 0x0c4;
/// Physical-region address (ABI 1.8), bits 31:0: the start of the region the next
/// [`PHYS_CTRL`] write declares (see "Physical DMA" in the module documentation).
pub const PHYS_ADDR_LO: u32 = 0x0c8;
/// Physical-region address (ABI 1.8), bits 63:32.
pub const PHYS_ADDR_HI: u32 = 0x0cc;
/// Physical-region length in bytes (ABI 1.8), for the next [`PHYS_CTRL`] declaration.
pub const PHYS_LEN: u32 = 0x0d0;
/// Physical-region control (ABI 1.8): writing it performs operation `PHYS_OP_*` (bits 3:0) for
/// the ASID in bits 31:16 (where the operation names one) on the region staged in
/// [`PHYS_ADDR_LO`]/[`PHYS_ADDR_HI`]/[`PHYS_LEN`]. A value with an unknown operation or other
/// bits set, an empty or wrapping region, an ASID at or beyond [`ASID_COUNT`], or a full
/// driver-region table is refused: nothing changes, [`ERR_CONFIG`] is raised with
/// [`ERROR_INFO`] = [`PHYS_CTRL`]. Reads return 1 while the check is on, else 0.
pub const PHYS_CTRL: u32 = 0x0d4;
/// [`PHYS_CTRL`] operation: the staged region is the driver's own memory that the device may
/// write without translation (DMA status records, the event ring, SYNC completion words).
pub const PHYS_OP_DRIVER: u32 = 1;
/// [`PHYS_CTRL`] operation: the staged region is the bounce buffer of the ASID in bits 31:16
/// (replacing its previous one): the one place its `DMA_READ`/`DMA_WRITE` jobs may access
/// through their guest-physical `aux`.
pub const PHYS_OP_BOUNCE: u32 = 2;
/// [`PHYS_CTRL`] operation: the ASID's bounce buffer is gone (freed); no job may touch it.
pub const PHYS_OP_FORGET: u32 = 3;
/// [`PHYS_CTRL`] operation: the CPU takes the ASID's bounce buffer back (to fill it for a new
/// job, or hand it to another user): every job queued or running now (up to the device's
/// current [`DMAQ_PROD`]) may no longer touch it; jobs queued later may.
pub const PHYS_OP_RECLAIM: u32 = 4;
/// [`PHYS_CTRL`] operation: start checking untranslated DMA against the declared regions (off
/// after reset; there is no operation that turns it off).
pub const PHYS_OP_CHECK: u32 = 5;
/// Per-ASID statistics select (ABI 1.9): the ASID in bits 15:0 whose counters
/// [`asid_stat_lo`]/[`asid_stat_hi`] read. Writing it with [`ASID_STAT_CLEAR`] also zeroes that
/// ASID's counters (a driver does so when it gives the ASID to a new context); the bit reads as
/// 0. A value with an ASID at or beyond [`ASID_COUNT`] or other bits set is refused: nothing
/// changes, [`ERR_CONFIG`] is raised with [`ERROR_INFO`] = [`ASID_STAT_SEL`]. The counters
/// are device-wide state like the statistics: a reset zeroes them.
pub const ASID_STAT_SEL: u32 = 0x0d8;
/// [`ASID_STAT_SEL`] flag: zero the selected ASID's counters.
pub const ASID_STAT_CLEAR: u32 = 1 << 31;
/// [`ASID_STAT_SEL`]: the ASID field.
pub const ASID_STAT_ASID_MASK: u32 = 0xffff;
/// First per-ASID statistics register.
pub const ASID_STATS_BASE: u32 = 0x0e0;
/// Per-ASID statistic (ABI 1.9): the ASID's DMA steps the validator judged (its share of
/// [`STAT_ACCESSES_JUDGED`]).
pub const ASID_STAT_JUDGED: u32 = 0;
/// Per-ASID statistic (ABI 1.9): the ASID's DMA steps not judged (its share of
/// [`STAT_ACCESSES_UNJUDGED`]).
pub const ASID_STAT_UNJUDGED: u32 = 1;
/// Number of per-ASID statistics.
pub const ASID_STAT_COUNT: u32 = 2;

/// Offset of the low half of per-ASID statistic `i` of the ASID [`ASID_STAT_SEL`] selects.
pub const fn asid_stat_lo(i: u32) -> u32 {
    ASID_STATS_BASE + 8 * i
}

/// Offset of the high half of per-ASID statistic `i`.
pub const fn asid_stat_hi(i: u32) -> u32 {
    ASID_STATS_BASE + 8 * i + 4
}

/// The operation field of [`PHYS_CTRL`].
pub const PHYS_OP_MASK: u32 = 0xf;
/// Shift of the ASID field of [`PHYS_CTRL`] (bits 31:16).
pub const PHYS_CTRL_ASID_SHIFT: u32 = 16;
/// Driver regions ([`PHYS_OP_DRIVER`]) the device keeps; a declaration beyond is refused.
pub const PHYS_DRIVER_MAX: usize = 32;

/// [`PHYS_CTRL`] value performing `op` for `asid`.
pub const fn phys_ctrl(op: u32, asid: u32) -> u32 {
    op | asid << PHYS_CTRL_ASID_SHIFT
}

/// Context table base, low half.
pub const CTX_BASE_LO: u32 = 0x030;
/// Context table base, high half.
pub const CTX_BASE_HI: u32 = 0x034;
/// Command ring base, low half.
pub const CMDQ_BASE_LO: u32 = 0x040;
/// Command ring base, high half.
pub const CMDQ_BASE_HI: u32 = 0x044;
/// Command ring log2 size.
pub const CMDQ_LOG2SIZE: u32 = 0x048;
/// Command ring producer.
pub const CMDQ_PROD: u32 = 0x04c;
/// Command ring consumer.
pub const CMDQ_CONS: u32 = 0x050;
/// Event ring base, low half.
pub const EVTQ_BASE_LO: u32 = 0x060;
/// Event ring base, high half.
pub const EVTQ_BASE_HI: u32 = 0x064;
/// Event ring log2 size.
pub const EVTQ_LOG2SIZE: u32 = 0x068;
/// Event ring producer.
pub const EVTQ_PROD: u32 = 0x06c;
/// Event ring consumer.
pub const EVTQ_CONS: u32 = 0x070;
/// DMA job ring base, low half.
pub const DMAQ_BASE_LO: u32 = 0x080;
/// DMA job ring base, high half.
pub const DMAQ_BASE_HI: u32 = 0x084;
/// DMA job ring log2 size.
pub const DMAQ_LOG2SIZE: u32 = 0x088;
/// DMA job ring producer.
pub const DMAQ_PROD: u32 = 0x08c;
/// DMA job ring consumer.
pub const DMAQ_CONS: u32 = 0x090;
/// First statistics register.
pub const STATS_BASE: u32 = 0x100;

/// Statistic: IOTLB lookups that hit.
pub const STAT_IOTLB_HITS: u32 = 0;
/// Statistic: IOTLB lookups that missed (each starts a page walk).
pub const STAT_IOTLB_MISSES: u32 = 1;
/// Statistic: IOTLB entries evicted to make room.
pub const STAT_IOTLB_EVICTIONS: u32 = 2;
/// Statistic: IOTLB entries dropped by invalidation commands.
pub const STAT_IOTLB_INVALIDATED: u32 = 3;
/// Statistic: page-table walks.
pub const STAT_WALKS: u32 = 4;
/// Statistic: commands executed.
pub const STAT_COMMANDS: u32 = 5;
/// Statistic: SYNCs completed.
pub const STAT_SYNCS: u32 = 6;
/// Statistic: DMA jobs completed.
pub const STAT_DMA_JOBS: u32 = 7;
/// Statistic: bytes moved by DMA jobs.
pub const STAT_DMA_BYTES: u32 = 8;
/// Statistic: translation faults.
pub const STAT_FAULTS: u32 = 9;
/// Statistic: validator violations.
pub const STAT_VIOLATIONS: u32 = 10;
/// Statistic: events dropped because the event queue was full or disabled.
pub const STAT_EVENTS_DROPPED: u32 = 11;
/// Statistic (ABI 1.4): translations used without being cached, because the IOTLB was full and
/// [`IOTLB_KEEP`] forbade an eviction.
pub const STAT_IOTLB_NOT_CACHED: u32 = 12;
/// Statistic (ABI 1.7): DMA steps the validator judged, before and after their bytes moved.
pub const STAT_ACCESSES_JUDGED: u32 = 13;
/// Statistic (ABI 1.7): DMA steps not judged, because their context's entry turns validation
/// off ([`super::pte::CTX_NO_VALIDATE`] without [`super::pte::CTX_MM_RELEASED`]). A run that
/// validated nothing shows here, not as a clean run. (Since 1.8 an entry that is unreadable or
/// not valid at the step faults it instead, [`super::event::FAULT_CTX_INVALID`].)
pub const STAT_ACCESSES_UNJUDGED: u32 = 14;
/// Number of statistics.
pub const STAT_COUNT: u32 = 15;

/// Offset of the low half of statistic `i`.
pub const fn stat_lo(i: u32) -> u32 {
    STATS_BASE + 8 * i
}

/// Offset of the high half of statistic `i`.
pub const fn stat_hi(i: u32) -> u32 {
    STATS_BASE + 8 * i + 4
}

/// Value of [`IDENT`]: the ASCII bytes "ZAPG" read as a little-endian u32.
pub const IDENT_MAGIC: u32 = u32::from_le_bytes(*b"ZAPG");
/// Major ABI version: a driver must refuse a device with another major.
pub const VERSION_MAJOR: u16 = 1;
/// Minor ABI version: additions only.
pub const VERSION_MINOR: u16 = 9;
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
/// Capability: command, event and DMA job queues as described here.
pub const CAP_QUEUES: u32 = 1 << 1;
/// Capability: 2 MiB leaves in the device page table.
pub const CAP_HUGE_2M: u32 = 1 << 2;
/// Capability: stalled faults with RESUME/ABORT.
pub const CAP_STALL: u32 = 1 << 3;
/// Capability: the CPU-page-table validator (4- and 5-level CPU tables).
pub const CAP_VALIDATOR: u32 = 1 << 4;

/// Value of [`CAPS`] for this ABI version.
pub const CAPS_VALUE: u32 = CAP_MSIX | CAP_QUEUES | CAP_HUGE_2M | CAP_STALL | CAP_VALIDATOR;

/// CR0: command queue enable.
pub const CR0_CMDQ_EN: u32 = 1 << 0;
/// CR0: event queue enable.
pub const CR0_EVTQ_EN: u32 = 1 << 1;
/// CR0: DMA job queue enable.
pub const CR0_DMAQ_EN: u32 = 1 << 2;
/// CR0: context table enable (translation for every ASID faults while clear).
pub const CR0_CTX_EN: u32 = 1 << 3;
/// All CR0 bits.
pub const CR0_MASK: u32 = CR0_CMDQ_EN | CR0_EVTQ_EN | CR0_DMAQ_EN | CR0_CTX_EN;

/// IRQ_CTRL: command vector (SYNC with IRQ flag, DMA job with IRQ flag).
pub const IRQ_CMD_EN: u32 = 1 << 0;
/// IRQ_CTRL: event vector (an event was written).
pub const IRQ_EVT_EN: u32 = 1 << 1;
/// IRQ_CTRL: error vector (an `ERR_*` bit was set).
pub const IRQ_ERR_EN: u32 = 1 << 2;

/// Consumer register flag: the queue stopped on an error (code in bits 30:24).
pub const CONS_ERR: u32 = 1 << 31;
/// Shift of the error code in a consumer register.
pub const CONS_ERR_SHIFT: u32 = 24;
/// Mask of the error code in a consumer register (after shifting).
pub const CONS_ERR_CODE_MASK: u32 = 0x7f;
/// Event producer flag: events were dropped since `ERR_EVTQ_OVERFLOW` was last cleared.
pub const EVTQ_PROD_OVERFLOW: u32 = 1 << 31;

/// Error: an MMIO access of a wrong width/alignment or to an undefined register.
pub const ERR_BAD_ACCESS: u32 = 1 << 0;
/// Error: the command queue stopped on a command error (a malformed command, or one injected
/// with [`FAIL_CMDQ_ERROR`]; see `CMDQ_CONS`); clearing this bit resumes processing at the
/// consumer index.
pub const ERR_CMDQ: u32 = 1 << 1;
/// Error: events were dropped because the event queue was full. (With the queue disabled,
/// events are dropped silently and only counted in [`STAT_EVENTS_DROPPED`].)
pub const ERR_EVTQ_OVERFLOW: u32 = 1 << 2;
/// Error: a unit was enabled with a bad configuration, or reconfigured while enabled, or
/// [`FAIL_INJECT`] was written with a value it does not know, or [`PT_FREED_BASE_LO`] with a
/// misaligned address.
pub const ERR_CONFIG: u32 = 1 << 3;
/// Error: an event could not be written (event ring outside guest RAM).
pub const ERR_EVTQ_ABORT: u32 = 1 << 4;
/// Error: a DMA job could not be fetched (ring outside guest RAM); the DMA queue stopped.
/// Clearing this bit resumes fetching at the consumer index.
pub const ERR_DMAQ_ABORT: u32 = 1 << 5;
/// All error bits.
pub const ERR_MASK: u32 =
    ERR_BAD_ACCESS | ERR_CMDQ | ERR_EVTQ_OVERFLOW | ERR_CONFIG | ERR_EVTQ_ABORT | ERR_DMAQ_ABORT;

/// [`FAIL_INJECT`] bits holding the mode; the others are reserved.
pub const FAIL_MODE_MASK: u32 = 0xff;
/// Failure mode: none, the device works.
pub const FAIL_NONE: u32 = 0;
/// Failure mode: the command processor stops consuming. `CMDQ_CONS` freezes, nothing after it
/// executes, no SYNC completes, and no error is reported. `CR0`/`CR0ACK` still work (disabling
/// the command queue is acknowledged). Disarming resumes the queue where it stopped.
pub const FAIL_CMDQ_STOP: u32 = 1;
/// Failure mode: every SYNC reached while armed completes [`FAIL_ARG`] milliseconds (wall clock)
/// later than it could, blocking the queue behind it like a slow device. Its completion write
/// and interrupt then happen only if the command queue is still enabled and bus mastering is on
/// (a SYNC whose queue was disabled meanwhile never completes; one waiting for bus mastering
/// completes once it is set again).
pub const FAIL_SYNC_DELAY: u32 = 2;
/// Failure mode, one-shot: the next command the device executes is answered with a command
/// error instead: `CMDQ_CONS` points at it with [`CONS_ERR`] and
/// [`super::cmd::CERR_INJECTED`], [`ERR_CMDQ`] is raised (and the error vector). The mode then
/// reads [`FAIL_NONE`]; clearing `ERR_CMDQ` resumes the queue at that command, which then
/// executes normally.
pub const FAIL_CMDQ_ERROR: u32 = 3;
/// Failure mode: the command vector is never raised. SYNC completion words and DMA job status
/// records are still written.
pub const FAIL_DROP_CMD_MSI: u32 = 4;
/// Failure mode: the DMA engine hangs inside the next job it runs (the current one, if a job is
/// in flight) after one more step of it (see [`CMD_LAG`]): no further step, no job fetch, no
/// completion (even if that step was the job's last). The hung job keeps the translations that
/// step used, so a SYNC that must wait for them never completes; RESUME/ABORT of its stall are
/// ignored. While hung, a `CR0` write clearing [`CR0_DMAQ_EN`] or [`CR0_CTX_EN`] is not
/// acknowledged (`CR0ACK` keeps those bits): a hung engine does not answer the control path, so
/// the driver must fence the device by clearing PCI bus mastering. Only a device reset ends the
/// hang (rewriting [`FAIL_INJECT`] only changes what is armed).
pub const FAIL_DMA_HANG: u32 = 5;
/// Failure mode: the device dies at the next DMA step (see [`CMD_LAG`]), before it touches
/// memory. The device process flushes its trace and exits without answering the VMM; the guest
/// then sees a device that is gone (MMIO reads return all ones).
pub const FAIL_DIE: u32 = 6;
/// Largest effective [`WALK_LAG`], in microseconds.
pub const WALK_LAG_MAX: u32 = 100_000;
/// Largest effective [`FAULT_LAG`], in microseconds (as for [`WALK_LAG`]: a tenth of a second
/// per fault is long enough to widen any race and short enough not to look like a hang).
pub const FAULT_LAG_MAX: u32 = 100_000;
/// Largest effective [`SYNC_LAG`], in microseconds (as for [`WALK_LAG`]).
pub const SYNC_LAG_MAX: u32 = 100_000;

/// The test-knob registers a device reset ([`RESET`], or a function-level reset) zeroes.
pub const RESET_KNOBS: [u32; 10] = [
    CMD_LAG,
    FAIL_INJECT,
    FAIL_ARG,
    WALK_LAG,
    FAULT_LAG,
    IOTLB_KEEP,
    PT_FREED_BASE_LO,
    PT_FREED_BASE_HI,
    PT_FREED_PAGES,
    SYNC_LAG,
];

/// Required alignment of queue bases.
pub const QUEUE_BASE_ALIGN: u64 = 64;
/// Required alignment of the context table base.
pub const CTX_BASE_ALIGN: u64 = 4096;

/// Name of a register offset, for traces and logs; `None` for undefined offsets.
pub const fn name(offset: u32) -> Option<&'static str> {
    Some(match offset {
        IDENT => "IDENT",
        VERSION => "VERSION",
        CAPS => "CAPS",
        IOTLB_ENTRIES => "IOTLB_ENTRIES",
        ASID_COUNT => "ASID_COUNT",
        SCRATCH => "SCRATCH",
        ERROR => "ERROR",
        ERROR_INFO => "ERROR_INFO",
        CR0 => "CR0",
        CR0ACK => "CR0ACK",
        IRQ_CTRL => "IRQ_CTRL",
        CMD_LAG => "CMD_LAG",
        CTX_BASE_LO => "CTX_BASE_LO",
        CTX_BASE_HI => "CTX_BASE_HI",
        CMDQ_BASE_LO => "CMDQ_BASE_LO",
        CMDQ_BASE_HI => "CMDQ_BASE_HI",
        CMDQ_LOG2SIZE => "CMDQ_LOG2SIZE",
        CMDQ_PROD => "CMDQ_PROD",
        CMDQ_CONS => "CMDQ_CONS",
        EVTQ_BASE_LO => "EVTQ_BASE_LO",
        EVTQ_BASE_HI => "EVTQ_BASE_HI",
        EVTQ_LOG2SIZE => "EVTQ_LOG2SIZE",
        EVTQ_PROD => "EVTQ_PROD",
        EVTQ_CONS => "EVTQ_CONS",
        DMAQ_BASE_LO => "DMAQ_BASE_LO",
        DMAQ_BASE_HI => "DMAQ_BASE_HI",
        DMAQ_LOG2SIZE => "DMAQ_LOG2SIZE",
        DMAQ_PROD => "DMAQ_PROD",
        DMAQ_CONS => "DMAQ_CONS",
        FAIL_INJECT => "FAIL_INJECT",
        FAIL_ARG => "FAIL_ARG",
        WALK_LAG => "WALK_LAG",
        RESET => "RESET",
        FAULT_LAG => "FAULT_LAG",
        IOTLB_KEEP => "IOTLB_KEEP",
        PT_FREED_BASE_LO => "PT_FREED_BASE_LO",
        PT_FREED_BASE_HI => "PT_FREED_BASE_HI",
        PT_FREED_PAGES => "PT_FREED_PAGES",
        SYNC_LAG => "SYNC_LAG",
        PHYS_ADDR_LO => "PHYS_ADDR_LO",
        PHYS_ADDR_HI => "PHYS_ADDR_HI",
        PHYS_LEN => "PHYS_LEN",
        PHYS_CTRL => "PHYS_CTRL",
        ASID_STAT_SEL => "ASID_STAT_SEL",
        o if o % 4 == 0 && o >= ASID_STATS_BASE && o < ASID_STATS_BASE + 8 * ASID_STAT_COUNT => {
            if o % 8 == 0 {
                "ASID_STAT_LO"
            } else {
                "ASID_STAT_HI"
            }
        }
        o if o >= STATS_BASE && o < STATS_BASE + 8 * STAT_COUNT => {
            if o % 8 == 0 {
                "STAT_LO"
            } else {
                "STAT_HI"
            }
        }
        _ => return None,
    })
}
