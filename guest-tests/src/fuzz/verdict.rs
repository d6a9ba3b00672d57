//! What must fail: the rules that say why a call cannot succeed ([`Must`], [`Cause`]) and which
//! errnos ([`Errnos`]) each reason explains.

use super::call::{HmmCmd, Ptr, Target};
use super::table::{errno_name, Node};
use super::{HMM_MAX_BYTES, HMM_MAX_SNAPSHOT_PAGES, PG};
use libc::{E2BIG, EBUSY, EFAULT, EINVAL, ENOMEM, EPERM, ETIMEDOUT};
use shared_regs::dma::{
    DMA_CHECKSUM, DMA_COMPARE, DMA_COPY, DMA_FILL, DMA_MAX_LEN, DMA_READ, DMA_WRITE,
};
use shared_regs::pte::VA_LIMIT;
use shared_regs::uapi;
use std::fmt;

/// A set of errnos (each below 128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Errnos(u128);

impl Errnos {
    pub(crate) const fn of(list: &[i32]) -> Self {
        let mut bits = 0u128;
        let mut i = 0;
        while i < list.len() {
            bits |= 1 << list[i];
            i += 1;
        }
        Self(bits)
    }

    pub(crate) fn contains(self, e: i32) -> bool {
        (0..128).contains(&e) && self.0 & (1 << e) != 0
    }

    fn iter(self) -> impl Iterator<Item = i32> {
        (0..128).filter(move |&e| self.contains(e))
    }
}

impl fmt::Display for Errnos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(errno_name).collect();
        f.write_str(&names.join("|"))
    }
}

/// Why a call must fail, and the errnos that reason explains: the argument checks the driver
/// makes before any work answer exactly one; an access the device cannot make may also end
/// first in what serving its faults can answer ([`ACCESS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cause {
    pub(crate) why: &'static str,
    pub(crate) errnos: Errnos,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, so {}", self.why, self.errnos)
    }
}

pub(super) const INVAL: Errnos = Errnos::of(&[EINVAL]);
pub(super) const FAULT: Errnos = Errnos::of(&[EFAULT]);
/// An access the device cannot make: `EFAULT` (unmapped, `PROT_NONE`, past a guard page) or
/// `EPERM` (a write to read-only memory), or what serving the faults before it can answer:
/// out of table pages (`ENOMEM`), a walk invalidations kept overtaking (`EBUSY`), a fault not
/// served in time (`ETIMEDOUT`), a job whose fault another thread's close aborted (`EFAULT`).
pub(super) const ACCESS: Errnos = Errnos::of(&[EFAULT, EPERM, ENOMEM, EBUSY, ETIMEDOUT]);

/// An argument the driver cannot read answers `EFAULT`; one it reads from the read-only
/// pattern (which no structure accepts) is refused by its `size` (`EINVAL` below the 1.0 size,
/// `E2BIG` above it with a non-zero tail) or its fields (`EINVAL`), or `EFAULT` when the answer
/// is written back.
pub(crate) const BAD_POINTER: Cause = Cause {
    why: "a bad argument pointer",
    errnos: Errnos::of(&[EFAULT, EINVAL, E2BIG]),
};
pub(super) const NOT_HMM: Cause = Cause {
    why: "not a command of the test_hmm node",
    errnos: INVAL,
};

/// Whether the call must fail, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Must {
    Any,
    Fail(Cause),
    Succeed(&'static str),
}

fn fail_if(cond: bool, why: &'static str, errnos: Errnos) -> Option<Cause> {
    cond.then_some(Cause { why, errnos })
}

/// Every cause that applies: the first one's reason, and the errnos any of them explains
/// (the driver may check them in another order).
fn causes<const N: usize>(all: [Option<Cause>; N]) -> Option<Cause> {
    all.into_iter().flatten().reduce(|a, b| Cause {
        why: a.why,
        errnos: Errnos(a.errnos.0 | b.errnos.0),
    })
}

/// The causes of a call whose arguments the driver checks before it does any work: if one
/// of `args` applies, the errno is theirs; only a call with valid arguments can fail on an
/// access (`access`).
fn checked_first<const A: usize, const B: usize>(
    args: [Option<Cause>; A],
    access: [Option<Cause>; B],
) -> Option<Cause> {
    causes(args).or_else(|| causes(access))
}

/// Why a `/dev/zapguard` ioctl with no other argument to check must fail: a bad argument
/// pointer, or a file of the test_hmm node (which does not know the command).
pub(super) fn pointer_or_node(arg: Ptr, node: Node) -> Option<Cause> {
    causes([
        (arg != Ptr::Valid).then_some(BAD_POINTER),
        (node == Node::Hmm).then_some(NOT_HMM),
    ])
}

/// A range that wraps is refused with `EINVAL`, one that ends past the device-addressable
/// range with `EFAULT` (`check_range`).
fn range_cause(va: u64, len: u64, what: &'static str) -> Option<Cause> {
    match va.checked_add(len) {
        None => fail_if(true, what, INVAL),
        Some(end) => fail_if(end > VA_LIMIT, what, FAULT),
    }
}

/// The facts a DMA verdict needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DmaFacts {
    pub(crate) op: u32,
    pub(crate) flags: u32,
    pub(crate) src: u64,
    pub(crate) dst: u64,
    pub(crate) len: u64,
    pub(crate) src_t: Target,
    pub(crate) dst_t: Target,
    /// The READ/WRITE user buffer can take (READ) or give (WRITE) `len` bytes.
    pub(crate) aux_ok: bool,
    pub(crate) arg_ok: bool,
}

/// Why a DMA call cannot succeed, if it cannot (the uAPI's rules in `shared_regs::uapi` and the
/// device's: a job must access every byte it names, except a COMPARE, which ends at the first
/// difference).
pub(crate) fn dma_must_fail(f: &DmaFacts) -> Option<Cause> {
    let op = u8::try_from(f.op).unwrap_or(0);
    let known = (DMA_COPY..=DMA_COMPARE).contains(&op);
    let reads = matches!(op, DMA_COPY | DMA_READ | DMA_CHECKSUM | DMA_COMPARE);
    let writes = matches!(op, DMA_COPY | DMA_FILL | DMA_WRITE);
    let uses_dst = writes || op == DMA_COMPARE;
    let whole = op != DMA_COMPARE;
    let args = [
        fail_if(!f.arg_ok, BAD_POINTER.why, BAD_POINTER.errnos),
        fail_if(!known, "an unknown op", INVAL),
        fail_if(f.flags & !uapi::ZG_DMA_FLAGS != 0, "unknown flags", INVAL),
        fail_if(f.len == 0, "an empty range", INVAL),
        fail_if(f.len > DMA_MAX_LEN, "longer than DMA_MAX_LEN", INVAL),
        fail_if(
            matches!(op, DMA_READ | DMA_WRITE) && f.len > uapi::ZG_DMA_BOUNCE_MAX,
            "longer than the bounce buffer",
            INVAL,
        ),
        range_cause(
            f.src,
            f.len,
            "a source range that wraps or leaves the device-addressable range",
        )
        .filter(|_| reads),
        range_cause(
            f.dst,
            f.len,
            "a destination range that wraps or leaves the device-addressable range",
        )
        .filter(|_| uses_dst),
        // A WRITE's user buffer is copied in before the job is queued.
        fail_if(op == DMA_WRITE && !f.aux_ok, "a bad user buffer", FAULT),
        // The device refuses a job with any address field that wraps, used or not.
        fail_if(
            !reads && f.src.checked_add(f.len).is_none(),
            "an unused source field that wraps with the length",
            INVAL,
        ),
        fail_if(
            !uses_dst && f.dst.checked_add(f.len).is_none(),
            "an unused destination field that wraps with the length",
            INVAL,
        ),
    ];
    let access = [
        fail_if(
            reads && f.src_t.inaccessible(false),
            "a source the device cannot read",
            ACCESS,
        ),
        fail_if(
            uses_dst && f.dst_t.inaccessible(writes),
            "a destination the device cannot access",
            ACCESS,
        ),
        // Into the guard page after an accessible start (an inaccessible one is above).
        fail_if(
            whole && reads && !f.src_t.inaccessible(false) && f.src_t.blocked(f.len, false),
            "a source that runs into a guard page",
            ACCESS,
        ),
        fail_if(
            whole && writes && !f.dst_t.inaccessible(true) && f.dst_t.blocked(f.len, true),
            "a destination that runs into a guard page",
            ACCESS,
        ),
        // A READ's is written after the job.
        fail_if(op == DMA_READ && !f.aux_ok, "a bad user buffer", FAULT),
    ];
    checked_first(args, access)
}

/// Why a MAP cannot succeed, if it cannot.
pub(crate) fn map_must_fail(
    va: u64,
    len: u64,
    flags: u32,
    at: Target,
    arg_ok: bool,
) -> Option<Cause> {
    let write = flags & uapi::ZG_MAP_WRITE != 0;
    let args = [
        fail_if(!arg_ok, BAD_POINTER.why, BAD_POINTER.errnos),
        fail_if(flags & !uapi::ZG_MAP_FLAGS != 0, "unknown flags", INVAL),
        fail_if(
            !va.is_multiple_of(PG) || !len.is_multiple_of(PG),
            "an unaligned range",
            INVAL,
        ),
        fail_if(len == 0, "an empty range", INVAL),
        range_cause(
            va,
            len,
            "a range that wraps or leaves the device-addressable range",
        ),
    ];
    let access = [fail_if(
        at.blocked(len, write),
        "memory that cannot be faulted in (for this access)",
        ACCESS,
    )];
    checked_first(args, access)
}

/// Why a SNAPSHOT cannot succeed, if it cannot (it faults nothing in: unmapped memory is fine).
pub(crate) fn snapshot_must_fail(
    va: u64,
    npages: u64,
    out_ok: bool,
    arg_ok: bool,
) -> Option<Cause> {
    let args = [
        fail_if(!arg_ok, BAD_POINTER.why, BAD_POINTER.errnos),
        fail_if(
            npages == 0 || npages > uapi::ZG_SNAPSHOT_MAX_PAGES,
            "a page count out of 1..=ZG_SNAPSHOT_MAX_PAGES",
            INVAL,
        ),
        fail_if(!va.is_multiple_of(PG), "an unaligned address", INVAL),
        range_cause(
            va,
            npages.saturating_mul(PG),
            "a range that leaves the device-addressable range",
        ),
    ];
    // The answer is copied out after the walk, which invalidations may overtake (EBUSY).
    let access = [fail_if(
        !out_ok,
        "a bad output buffer",
        Errnos::of(&[EFAULT, EBUSY]),
    )];
    checked_first(args, access)
}

/// The facts a test_hmm verdict needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HmmFacts {
    pub(crate) cmd: HmmCmd,
    pub(crate) addr: u64,
    pub(crate) npages: u64,
    pub(crate) at: Target,
    pub(crate) buf_ok: bool,
    pub(crate) arg_ok: bool,
}

/// Why a test_hmm command on its node cannot succeed, if it cannot.
pub(crate) fn hmm_must_fail(f: &HmmFacts) -> Option<Cause> {
    let data = matches!(f.cmd, HmmCmd::Read | HmmCmd::ReadUnlocked | HmmCmd::Write);
    let max = if data {
        HMM_MAX_BYTES / PG
    } else {
        HMM_MAX_SNAPSHOT_PAGES
    };
    let bytes = f.npages.saturating_mul(PG);
    let args = [
        fail_if(
            matches!(f.cmd, HmmCmd::Unsupported(_)),
            "a command that needs device memory",
            INVAL,
        ),
        fail_if(!f.arg_ok, BAD_POINTER.why, BAD_POINTER.errnos),
        fail_if(!f.addr.is_multiple_of(PG), "an unaligned address", INVAL),
        fail_if(
            f.npages == 0 || f.npages > max,
            "a page count out of range",
            INVAL,
        ),
        range_cause(
            f.addr,
            bytes,
            "a range that leaves the device-addressable range",
        ),
    ];
    let access = [
        fail_if(
            data && f.at.blocked(bytes, f.cmd == HmmCmd::Write),
            "memory the device cannot access",
            ACCESS,
        ),
        fail_if(!f.buf_ok, "a bad user buffer", Errnos::of(&[EFAULT, EBUSY])),
    ];
    checked_first(args, access)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::call::tests::shared;
    use crate::fuzz::{KERNEL_ADDRS, SMALL_W};
    use libc::EIO;

    fn facts(op: u8, src: Target, dst: Target, len: u64) -> DmaFacts {
        DmaFacts {
            op: op.into(),
            flags: 0,
            src: 0x3000_0020_0000 + 4096,
            dst: 0x3000_0020_0000 + 8192,
            len,
            src_t: src,
            dst_t: dst,
            aux_ok: true,
            arg_ok: true,
        }
    }

    #[test]
    fn dma_rules() {
        let ok = facts(DMA_COPY, shared(0), shared(4096), 100);
        assert_eq!(dma_must_fail(&ok), None);
        let ro = Target::ReadOnly { off: 0 };
        assert_eq!(dma_must_fail(&facts(DMA_COPY, ro, shared(0), 100)), None);
        assert!(dma_must_fail(&facts(DMA_COPY, shared(0), ro, 100)).is_some());
        assert!(dma_must_fail(&facts(DMA_FILL, shared(0), ro, 100)).is_some());
        assert_eq!(dma_must_fail(&facts(DMA_COMPARE, shared(0), ro, 100)), None);
        let guard = Target::Guard {
            buf: 0,
            before: false,
        };
        assert!(dma_must_fail(&facts(DMA_CHECKSUM, guard, shared(0), 1)).is_some());
        // Into the guard page after the window: only COMPARE may stop before it.
        let over = SMALL_W + 1;
        assert!(dma_must_fail(&facts(DMA_CHECKSUM, shared(0), shared(0), over)).is_some());
        assert!(dma_must_fail(&facts(DMA_FILL, shared(0), shared(0), over)).is_some());
        assert_eq!(
            dma_must_fail(&facts(DMA_COMPARE, shared(0), shared(0), over)),
            None
        );
        assert_eq!(
            dma_must_fail(&facts(DMA_FILL, shared(0), shared(0), SMALL_W)),
            None
        );
        assert!(dma_must_fail(&facts(DMA_COPY, shared(0), shared(0), 0)).is_some());
        assert!(dma_must_fail(&facts(DMA_READ, shared(0), shared(0), (1 << 20) + 1)).is_some());
        assert!(dma_must_fail(&facts(DMA_CHECKSUM, shared(0), shared(0), u64::MAX)).is_some());
        assert!(dma_must_fail(&DmaFacts { op: 0, ..ok }).is_some());
        assert!(dma_must_fail(&DmaFacts { flags: 2, ..ok }).is_some());
        assert!(dma_must_fail(&DmaFacts {
            arg_ok: false,
            ..ok
        })
        .is_some());
        let read = facts(DMA_READ, shared(0), shared(0), 10);
        assert!(dma_must_fail(&DmaFacts {
            aux_ok: false,
            ..read
        })
        .is_some());
        let fill = facts(DMA_FILL, guard, shared(0), 10);
        assert_eq!(
            dma_must_fail(&DmaFacts {
                aux_ok: false,
                ..fill
            }),
            None
        );
        let wrap = DmaFacts {
            src: u64::MAX - 10,
            ..facts(DMA_CHECKSUM, Target::Wrap(10), shared(0), 100)
        };
        assert!(dma_must_fail(&wrap).is_some());
        // Each reason explains its own errnos: an unknown op is EINVAL, never EFAULT.
        let unknown = dma_must_fail(&DmaFacts { op: 0, ..ok }).unwrap();
        assert!(unknown.errnos.contains(EINVAL) && !unknown.errnos.contains(EFAULT));
        let bad_ptr = dma_must_fail(&DmaFacts {
            arg_ok: false,
            ..ok
        })
        .unwrap();
        assert_eq!(bad_ptr.errnos, Errnos::of(&[EFAULT, EINVAL, E2BIG]));
        // Two reasons at once: either errno (the driver checks in its own order).
        let both = dma_must_fail(&DmaFacts {
            flags: 2,
            src: VA_LIMIT - 10,
            ..ok
        })
        .unwrap();
        assert_eq!(both.errnos, Errnos::of(&[EFAULT, EINVAL]));
        // A device write to read-only memory: EPERM, or what serving the faults before it may
        // answer, never EINVAL.
        let ro_write = dma_must_fail(&facts(DMA_FILL, shared(0), ro, 100)).unwrap();
        assert!(ro_write.errnos.contains(EPERM) && !ro_write.errnos.contains(EINVAL));
        // A wrapping range is EINVAL; one past the device's reach EFAULT.
        assert_eq!(dma_must_fail(&wrap).unwrap().errnos, Errnos::of(&[EINVAL]));
        for e in [EIO, libc::ENODEV] {
            assert!(!ACCESS.contains(e), "{e}");
        }
    }

    #[test]
    fn map_snapshot_and_hmm_rules() {
        let va = 0x3000_0020_0000;
        assert_eq!(map_must_fail(va, PG, 0, shared(0), true), None);
        assert_eq!(
            map_must_fail(va, SMALL_W, uapi::ZG_MAP_WRITE, shared(0), true),
            None
        );
        assert!(map_must_fail(va, SMALL_W + PG, 0, shared(0), true).is_some());
        assert!(map_must_fail(va + 1, PG, 0, shared(1), true).is_some());
        assert!(map_must_fail(va, PG, 2, shared(0), true).is_some());
        let ro = Target::ReadOnly { off: 0 };
        assert_eq!(map_must_fail(va, PG, 0, ro, true), None);
        assert!(map_must_fail(va, PG, uapi::ZG_MAP_WRITE, ro, true).is_some());
        assert!(map_must_fail(0, PG, 0, Target::Low(0), true).is_some());
        // A snapshot of unmapped memory is fine; of kernel addresses not.
        assert_eq!(snapshot_must_fail(0, 1, true, true), None);
        assert_eq!(snapshot_must_fail(VA_LIMIT - PG, 1, true, true), None);
        assert!(snapshot_must_fail(VA_LIMIT - PG, 2, true, true).is_some());
        assert!(snapshot_must_fail(KERNEL_ADDRS[0], 1, true, true).is_some());
        assert!(snapshot_must_fail(0, 4097, true, true).is_some());
        assert!(snapshot_must_fail(0, 1, false, true).is_some());
        let h = HmmFacts {
            cmd: HmmCmd::Read,
            addr: va,
            npages: 2,
            at: shared(0),
            buf_ok: true,
            arg_ok: true,
        };
        assert_eq!(hmm_must_fail(&h), None);
        assert!(hmm_must_fail(&HmmFacts {
            cmd: HmmCmd::Unsupported(0),
            ..h
        })
        .is_some());
        assert!(hmm_must_fail(&HmmFacts {
            cmd: HmmCmd::Write,
            at: ro,
            ..h
        })
        .is_some());
        assert_eq!(hmm_must_fail(&HmmFacts { at: ro, ..h }), None);
        assert_eq!(
            hmm_must_fail(&HmmFacts {
                cmd: HmmCmd::Snapshot,
                at: Target::Hole { page: 0 },
                ..h
            }),
            None
        );
        assert!(hmm_must_fail(&HmmFacts {
            at: Target::Hole { page: 0 },
            ..h
        })
        .is_some());
        assert!(hmm_must_fail(&HmmFacts { npages: 16385, ..h }).is_some());
        assert!(hmm_must_fail(&HmmFacts {
            npages: u64::MAX / PG + 1,
            ..h
        })
        .is_some());
    }
}
