//! What a fuzzer thread's call is ([`Call`]): where its addresses point, its lengths, argument
//! pointers, test_hmm commands, mm operations and fork children.

use super::table::Api;
use super::{HUGE_W, NSHARED, PG, RO_W, SMALL_W};
use shared_regs::dma::DMA_MAX_LEN;
use shared_regs::hmm;
use shared_regs::uapi;

/// Where an address of a call points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// `off` bytes into a shared buffer's current window.
    Shared { buf: u8, off: u32 },
    /// Into the read-only canary.
    ReadOnly { off: u32 },
    /// A `PROT_NONE` guard page of a shared buffer's window A (before or after it).
    Guard { buf: u8, before: bool },
    /// Into the canary child's range, unmapped here.
    CanaryVa { off: u32 },
    /// A page of the arena that is never mapped.
    Hole { page: u16 },
    /// Below `mmap_min_addr`.
    Low(u16),
    /// A kernel or non-canonical address ([`KERNEL_ADDRS`](super::KERNEL_ADDRS)).
    Kernel(u8),
    /// `VA_LIMIT - 4096`: user half, never mappable.
    TopOfUser,
    /// `u64::MAX - n`.
    Wrap(u16),
}

impl Target {
    /// No access at the target's first byte can succeed (for a write: read-only counts too).
    pub(crate) fn inaccessible(self, write: bool) -> bool {
        match self {
            Target::Shared { .. } => false,
            Target::ReadOnly { .. } => write,
            _ => true,
        }
    }

    /// Bytes from the target to the guard page that ends its window.
    pub(crate) fn room(self) -> Option<u64> {
        match self {
            Target::Shared { buf, off } => Some(shared_w(buf).saturating_sub(off.into())),
            Target::ReadOnly { off } => Some(RO_W.saturating_sub(off.into())),
            _ => None,
        }
    }

    /// A range of `len` bytes from the target reaches memory no access can succeed on (its
    /// first byte, or the guard page after its window).
    pub(super) fn blocked(self, len: u64, write: bool) -> bool {
        self.inaccessible(write) || self.room().is_some_and(|r| len > r)
    }
}

/// A length, resolved against the address it goes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Len {
    Bytes(u32),
    Pages(u16),
    /// Up to the guard page that ends the target's window (a page for other targets).
    Room,
    Zero,
    BouncePlus1,
    DmaMax,
    DmaMaxPlus1,
    Tera,
    Max,
    /// `va + len` wraps past 2^64.
    Wrapping,
}

impl Len {
    pub(crate) fn resolve(self, va: u64, t: Target) -> u64 {
        match self {
            Len::Bytes(n) => n.into(),
            Len::Pages(n) => u64::from(n) * PG,
            Len::Room => t.room().unwrap_or(PG).max(1),
            Len::Zero => 0,
            Len::BouncePlus1 => uapi::ZG_DMA_BOUNCE_MAX + 1,
            Len::DmaMax => DMA_MAX_LEN,
            Len::DmaMaxPlus1 => DMA_MAX_LEN + 1,
            Len::Tera => 1 << 40,
            Len::Max => u64::MAX,
            Len::Wrapping if va <= 1 => u64::MAX,
            Len::Wrapping => (u64::MAX - va) + 2,
        }
    }
}

/// An argument or buffer pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Ptr {
    /// A structure the fuzzer built, or its scratch buffer.
    Valid,
    Null,
    Kernel,
    /// The canary child's address, unmapped here.
    Unmapped,
    /// An arena hole.
    Hole,
    /// A guard page.
    Guard,
    /// The read-only canary (its pattern is no valid structure).
    ReadOnly,
    /// Runs from a shared window into its guard page.
    Straddle,
}

/// test_hmm commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HmmCmd {
    Read,
    ReadUnlocked,
    Write,
    Snapshot,
    /// One of the commands that need device memory (index into [`HMM_UNSUPPORTED`]).
    Unsupported(u8),
}

pub(super) const HMM_UNSUPPORTED: [u32; 6] = [
    hmm::HMM_DMIRROR_MIGRATE_TO_DEV,
    hmm::HMM_DMIRROR_MIGRATE_TO_SYS,
    hmm::HMM_DMIRROR_EXCLUSIVE,
    hmm::HMM_DMIRROR_CHECK_EXCLUSIVE,
    hmm::HMM_DMIRROR_RELEASE,
    hmm::HMM_DMIRROR_FLAGS,
];

impl HmmCmd {
    pub(super) fn number(self) -> u32 {
        match self {
            HmmCmd::Read => hmm::HMM_DMIRROR_READ,
            HmmCmd::ReadUnlocked => hmm::HMM_DMIRROR_READ_UNLOCKED,
            HmmCmd::Write => hmm::HMM_DMIRROR_WRITE,
            HmmCmd::Snapshot => hmm::HMM_DMIRROR_SNAPSHOT,
            HmmCmd::Unsupported(i) => HMM_UNSUPPORTED[i as usize % HMM_UNSUPPORTED.len()],
        }
    }

    pub(super) fn api(self) -> Api {
        match self {
            HmmCmd::Read => Api::HmmRead,
            HmmCmd::ReadUnlocked => Api::HmmReadUnlocked,
            HmmCmd::Write => Api::HmmWrite,
            HmmCmd::Snapshot => Api::HmmSnapshot,
            HmmCmd::Unsupported(_) => Api::HmmUnsupported,
        }
    }
}

/// An mm operation on a shared buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MmOp {
    Munmap,
    /// Map the window fresh (`alt`: the other window of the buffer).
    Mmap {
        alt: bool,
    },
    Mprotect(i32),
    Madvise(i32),
    /// Move the buffer to its other window.
    Mremap {
        dontunmap: bool,
    },
    Collapse,
    /// CPU writes (only while the whole window is known read-write).
    Touch,
}

/// An mm operation of a thread on its own private buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PrivMm {
    DontNeed,
    /// `MADV_FREE`, then rewritten (so that no page is dropped later).
    Free,
    Cold,
    Pageout,
    /// Toggle the destination buffer between read-only and read-write.
    Protect,
}

/// How a fork child ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ForkHow {
    /// After its calls.
    Calls,
    /// `_exit` while another of its threads runs jobs.
    ExitMidDma,
    /// `SIGKILL` from the parent while it runs jobs.
    Killed,
}

/// A data-checked job on the thread's private buffers: source window P0 at `soff`, destination
/// window P1 at `doff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PrivJob {
    pub(crate) op: u8,
    pub(crate) no_fault: bool,
    pub(crate) soff: u32,
    pub(crate) doff: u32,
    pub(crate) len: u32,
    pub(crate) seed: u64,
}

/// One step of a fuzzer thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Call {
    Open {
        fd: u8,
        hmm: bool,
    },
    Close {
        fd: u8,
    },
    GetInfo {
        fd: u8,
        arg: Ptr,
    },
    Stats {
        fd: u8,
        arg: Ptr,
    },
    Map {
        fd: u8,
        at: Target,
        len: Len,
        flags: u32,
        arg: Ptr,
        junk: u64,
    },
    Dma {
        fd: u8,
        op: u32,
        flags: u32,
        src: Target,
        dst: Target,
        len: Len,
        aux: Ptr,
        fill: u64,
        arg: Ptr,
        junk: u64,
    },
    Snapshot {
        fd: u8,
        at: Target,
        npages: u64,
        out: Ptr,
        arg: Ptr,
    },
    Unknown {
        fd: u8,
        cmd: u32,
        arg: Ptr,
    },
    Hmm {
        fd: u8,
        cmd: HmmCmd,
        at: Target,
        npages: u64,
        buf: Ptr,
        arg: Ptr,
        junk: u64,
    },
    Private(PrivJob),
    PrivateMm {
        buf: u8,
        op: PrivMm,
    },
    Mm {
        buf: u8,
        op: MmOp,
        first: u16,
        pages: u16,
    },
    Fork {
        how: ForkHow,
        seed: u64,
        delay_us: u32,
    },
}

impl Call {
    /// The file slot the call uses, if it uses an open file (`Open` fills its slot instead).
    pub(super) fn file_slot(&self) -> Option<u8> {
        match *self {
            Call::Close { fd }
            | Call::GetInfo { fd, .. }
            | Call::Stats { fd, .. }
            | Call::Map { fd, .. }
            | Call::Dma { fd, .. }
            | Call::Snapshot { fd, .. }
            | Call::Unknown { fd, .. }
            | Call::Hmm { fd, .. } => Some(fd),
            _ => None,
        }
    }
}

pub(crate) fn shared_w(buf: u8) -> u64 {
    if buf as usize % NSHARED == NSHARED - 1 {
        HUGE_W
    } else {
        SMALL_W
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn shared(off: u32) -> Target {
        Target::Shared { buf: 0, off }
    }

    #[test]
    fn lengths_resolve() {
        let t = shared(4096);
        assert_eq!(Len::Room.resolve(0, t), SMALL_W - 4096);
        assert_eq!(
            Len::Room.resolve(0, Target::Shared { buf: 3, off: 0 }),
            HUGE_W
        );
        let va: u64 = 0x3000_0000_1000;
        assert!(va.checked_add(Len::Wrapping.resolve(va, t)).is_none());
        assert!(1u64.checked_add(Len::Wrapping.resolve(1, t)).is_none());
        assert_eq!(Len::Pages(3).resolve(0, t), 3 * PG);
    }
}
