//! The device page table and the context entry.
//!
//! # Device page table
//!
//! A 4-level radix tree like x86-64's, written by the driver in guest memory and walked by the
//! device. Each table is a 4 KiB page of 512 little-endian u64 entries. A 48-bit virtual address
//! selects entries with bits 47:39 (level 4), 38:30 (level 3), 29:21 (level 2) and 20:12
//! (level 1). Addresses at or above `1 << 47` are not translatable (fault [`super::event::FAULT_ADDRESS`]).
//!
//! | bit | name | meaning |
//! |---|---|---|
//! | 0 | [`PTE_P`] | present |
//! | 1 | [`PTE_W`] | writable (leaf: device may write; table: must be set for writes below) |
//! | 5 | [`PTE_A`] | accessed: set by the device on every entry it walks |
//! | 6 | [`PTE_D`] | dirty: set by the device in a leaf before its first write through it |
//! | 7 | [`PTE_PS`] | leaf at level 2: a 2 MiB page; illegal at levels 3 and 4 |
//! | 51:12 | [`PTE_ADDR_MASK`] | next table, or the page frame (2 MiB aligned for a 2 MiB leaf) |
//! | 63:52 | [`PTE_RESERVED`] | must be zero |
//!
//! Other bits are ignored by the device and free for software (`PS` in a level-1 entry too). A
//! present entry with reserved bits set, a misaligned 2 MiB frame, or `PS` at level 3/4 is a bad
//! entry ([`super::event::FAULT_BAD_PTE`]); reserved bits of a non-present entry are ignored.
//!
//! Walk rules, as on x86: the first problem met going down the tree is reported, except that a
//! missing `W` is reported only once a leaf is reached (not-present and bad entries win). A and D
//! are set only by a walk that succeeds, with atomic read-modify-writes; a driver clearing an
//! entry concurrently may therefore find A/D set in the entry it just cleared, and must ignore
//! them (the invalidation it issues next removes the translation the device read).
//!
//! The context's `pt_root` and `cpu_root` must be 4 KiB aligned: otherwise the context is
//! invalid and every access faults with [`super::event::FAULT_CTX_INVALID`].
//!
//! # Context entry
//!
//! The context table holds [`super::regs::ASID_COUNT`] entries of 32 bytes, indexed by ASID, at
//! the address in [`super::regs::CTX_BASE_LO`]/`HI`. The device caches entries: after changing one
//! the driver issues [`super::cmd::CMD_CFGI_CTX`] (and a SYNC to know it took effect).
//!
//! The device also reads an entry uncached, for the validator, at any time. Every device read of
//! an entry word or a page-table entry is one atomic 8-byte load. An entry is four words (flags,
//! `pt_root`, `cpu_root`, `seq`); since ABI 1.8 `seq` makes rewriting a live entry safe: the
//! driver makes it odd, writes the other words, and makes it even again, and the device uses only
//! an entry whose `seq` read the same even value before and after the other words (it retries a
//! bounded number of times, then treats the entry as unreadable: the access faults with
//! [`super::event::FAULT_CTX_INVALID`]).

/// Present.
pub const PTE_P: u64 = 1 << 0;
/// Writable.
pub const PTE_W: u64 = 1 << 1;
/// Accessed (set by the device).
pub const PTE_A: u64 = 1 << 5;
/// Dirty (set by the device before writing).
pub const PTE_D: u64 = 1 << 6;
/// Page size: a 2 MiB leaf at level 2.
pub const PTE_PS: u64 = 1 << 7;
/// Address bits.
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Bits that must be zero in a present entry.
pub const PTE_RESERVED: u64 = 0xfff0_0000_0000_0000;

/// Entries per table.
pub const PT_ENTRIES: usize = 512;
/// Levels of the device page table.
pub const PT_LEVELS: u32 = 4;
/// Size of a small page.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a 2 MiB page.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// First virtual address the device cannot translate.
pub const VA_LIMIT: u64 = 1 << 47;

/// Index into the table at `level` (4 = root, 1 = last) for `va`.
pub const fn pt_index(va: u64, level: u32) -> usize {
    ((va >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

/// Context flag: the entry is in use; DMA for an invalid context faults with
/// [`super::event::FAULT_CTX_INVALID`].
pub const CTX_VALID: u64 = 1 << 0;
/// Context flag: faults of jobs that ask for it stall until RESUME/ABORT instead of failing.
pub const CTX_STALL: u64 = 1 << 1;
/// Context flag: the address space this context mirrors has been torn down (mmu_notifier
/// release). Read by the validator on every access, uncached: a DMA for a context marked
/// released is a violation ([`super::event::VIOL_RELEASED`]). Read uncached after every page
/// walk too (ABI 1.5): a walk through a cached context whose entry now says released is a
/// [`super::event::VIOL_CTX_RELEASED`] violation.
pub const CTX_MM_RELEASED: u64 = 1 << 2;
/// Context flag: the CPU page table at `cpu_root` has 5 levels (LA57).
pub const CTX_CPU_LA57: u64 = 1 << 3;
/// Context flag, ABI 1.0-1.7: check this context's accesses against the CPU page table at
/// `cpu_root`. Since 1.8 it is accepted and ignored: every access of a valid context is judged
/// unless the entry carries [`CTX_NO_VALIDATE`], so an entry that forgets a flag is checked,
/// never silently not.
pub const CTX_VALIDATE: u64 = 1 << 4;
/// Context flag (ABI 1.8): do not judge this context's accesses against the CPU page table at
/// `cpu_root` (the process's kernel PGD, `__pa(mm->pgd)`). The only way to switch the validator
/// off: the production driver never sets it, the test build sets it only for
/// `ZG_DBG_NO_VALIDATE`. [`CTX_MM_RELEASED`] is checked whether or not it is set.
pub const CTX_NO_VALIDATE: u64 = 1 << 5;
/// Flags the device understands; other bits must be zero.
pub const CTX_FLAGS_MASK: u64 =
    CTX_VALID | CTX_STALL | CTX_MM_RELEASED | CTX_CPU_LA57 | CTX_VALIDATE | CTX_NO_VALIDATE;

/// A context entry (32 bytes, little-endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContextEntry {
    /// `CTX_*` flags.
    pub flags: u64,
    /// Guest-physical address of the device page table's root (4 KiB aligned).
    pub pt_root: u64,
    /// Guest-physical address of the process's CPU page-table root, `__pa(mm->pgd)` (4 KiB
    /// aligned); used only by the validator.
    pub cpu_root: u64,
    /// Sequence word (ABI 1.8; "must be zero" before): odd while the driver rewrites the entry.
    /// The driver makes it odd, writes the other words, then makes it even again; the device
    /// uses an entry only when it read the same even value before and after the other words,
    /// so it never acts on a torn entry. A driver that never rewrites a live entry may leave it
    /// 0.
    pub seq: u64,
}

/// Size of a context entry in bytes.
pub const CTX_ENTRY_SIZE: usize = 32;

impl ContextEntry {
    /// Little-endian encoding as stored in guest memory.
    pub fn to_bytes(&self) -> [u8; CTX_ENTRY_SIZE] {
        super::words_to_bytes([self.flags, self.pt_root, self.cpu_root, self.seq])
    }

    /// Decodes an entry read from guest memory.
    pub fn from_bytes(b: &[u8; CTX_ENTRY_SIZE]) -> Self {
        let [flags, pt_root, cpu_root, seq] = super::bytes_to_words(b);
        Self {
            flags,
            pt_root,
            cpu_root,
            seq,
        }
    }
}

const _: () = assert!(core::mem::size_of::<ContextEntry>() == CTX_ENTRY_SIZE);
const _: () = assert!(core::mem::offset_of!(ContextEntry, cpu_root) == 16);
const _: () = assert!(pt_index(0x0000_7fff_ffff_f000, 4) == 255);
const _: () =
    assert!(pt_index(0x0000_0000_0020_1000, 2) == 1 && pt_index(0x0000_0000_0020_1000, 1) == 1);
