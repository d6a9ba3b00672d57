//! How a fuzzer thread draws its calls ([`gen_call`]): the weight of each kind of call and the
//! generators of its arguments.

use super::call::{
    shared_w, Call, ForkHow, HmmCmd, Len, MmOp, PrivJob, PrivMm, Ptr, Target, HMM_UNSUPPORTED,
};
use super::rng::Rng;
use super::{
    CANARY_LEN, HMM_MAX_BYTES, HMM_MAX_SNAPSHOT_PAGES, KERNEL_ADDRS, LOW_LIMIT, NFD, NSHARED, PG,
    PRIV_W, RO_W,
};
use shared_regs::dma::{DMA_COMPARE, DMA_COPY};
use shared_regs::hmm;
use shared_regs::uapi;

#[derive(Clone, Copy)]
enum Kind {
    Open,
    Close,
    GetInfo,
    Stats,
    Map,
    Dma,
    Snapshot,
    Unknown,
    Hmm,
    Private,
    PrivateMm,
    Mm,
    Fork,
}

const KINDS: &[(u32, Kind)] = &[
    (290, Kind::Dma),
    (150, Kind::Private),
    (110, Kind::Map),
    (110, Kind::Mm),
    (55, Kind::Snapshot),
    (60, Kind::Hmm),
    (35, Kind::Stats),
    (30, Kind::GetInfo),
    (30, Kind::Unknown),
    (40, Kind::PrivateMm),
    (12, Kind::Open),
    (10, Kind::Close),
    (3, Kind::Fork),
];

fn gen_fd(r: &mut Rng) -> u8 {
    r.below(NFD as u64) as u8
}

fn gen_ptr(r: &mut Rng, valid_per_mille: u64) -> Ptr {
    if r.chance(valid_per_mille) {
        return Ptr::Valid;
    }
    [
        Ptr::Null,
        Ptr::Kernel,
        Ptr::Unmapped,
        Ptr::Hole,
        Ptr::Guard,
        Ptr::ReadOnly,
        Ptr::Straddle,
    ][r.below(7) as usize]
}

/// An offset into a window of `w` bytes: page aligned three times in four.
fn gen_off(r: &mut Rng, w: u64) -> u32 {
    if r.chance(750) {
        (r.below(w / PG) * PG) as u32
    } else {
        r.below(w) as u32
    }
}

fn gen_target(r: &mut Rng) -> Target {
    #[derive(Clone, Copy)]
    enum T {
        Shared,
        Ro,
        Guard,
        Canary,
        Hole,
        Low,
        Kernel,
        Top,
        Wrap,
    }
    match r.weighted(&[
        (720, T::Shared),
        (60, T::Ro),
        (50, T::Guard),
        (40, T::Canary),
        (30, T::Hole),
        (20, T::Low),
        (30, T::Kernel),
        (20, T::Top),
        (30, T::Wrap),
    ]) {
        T::Shared => {
            let buf = r.below(NSHARED as u64) as u8;
            Target::Shared {
                buf,
                off: gen_off(r, shared_w(buf)),
            }
        }
        T::Ro => Target::ReadOnly {
            off: gen_off(r, RO_W),
        },
        T::Guard => Target::Guard {
            buf: r.below(NSHARED as u64) as u8,
            before: r.chance(500),
        },
        T::Canary => Target::CanaryVa {
            off: gen_off(r, CANARY_LEN),
        },
        T::Hole => Target::Hole {
            page: r.below(256) as u16,
        },
        T::Low => Target::Low(r.below(LOW_LIMIT) as u16),
        T::Kernel => Target::Kernel(r.below(KERNEL_ADDRS.len() as u64) as u8),
        T::Top => Target::TopOfUser,
        T::Wrap => Target::Wrap(r.below(8192) as u16),
    }
}

fn gen_dma_len(r: &mut Rng) -> Len {
    #[derive(Clone, Copy)]
    enum L {
        Small,
        Pages,
        Room,
        One,
        Two,
        Zero,
        Bounce,
        Max,
        MaxPlus,
        Tera,
        U64,
        Wrap,
    }
    match r.weighted(&[
        (500, L::Small),
        (120, L::Pages),
        (80, L::Room),
        (30, L::One),
        (20, L::Two),
        (30, L::Zero),
        (30, L::Bounce),
        (30, L::Max),
        (30, L::MaxPlus),
        (40, L::Tera),
        (40, L::U64),
        (50, L::Wrap),
    ]) {
        L::Small => Len::Bytes(r.range(1, 3 * PG) as u32),
        L::Pages => Len::Pages(r.range(1, 4) as u16),
        L::Room => Len::Room,
        L::One => Len::Bytes(1),
        L::Two => Len::Bytes(2),
        L::Zero => Len::Zero,
        L::Bounce => Len::BouncePlus1,
        L::Max => Len::DmaMax,
        L::MaxPlus => Len::DmaMaxPlus1,
        L::Tera => Len::Tera,
        L::U64 => Len::Max,
        L::Wrap => Len::Wrapping,
    }
}

fn gen_map_len(r: &mut Rng) -> Len {
    match r.below(100) {
        0..=69 => Len::Pages(r.range(1, 16) as u16),
        70..=79 => Len::Room,
        80..=84 => Len::Bytes(r.range(1, 4 * PG) as u32 | 1),
        85..=87 => Len::Zero,
        88..=91 => Len::Tera,
        92..=95 => Len::Max,
        _ => Len::Wrapping,
    }
}

/// Flags: none, the known ones, or with an unknown bit.
fn gen_flags(r: &mut Rng, known: u32) -> u32 {
    match r.below(100) {
        0..=44 => 0,
        45..=89 => known,
        _ => {
            let unknown = 1u32 << r.range(1, 31);
            (r.next_u64() as u32 & !known) | unknown | (known * r.below(2) as u32)
        }
    }
}

fn gen_dma_op(r: &mut Rng) -> u32 {
    if r.chance(920) {
        return r.range(u64::from(DMA_COPY), u64::from(DMA_COMPARE)) as u32;
    }
    [0, 7, 255, 0x101, u32::MAX, r.next_u64() as u32 | 0x80][r.below(6) as usize]
}

fn gen_snapshot_pages(r: &mut Rng) -> u64 {
    match r.below(100) {
        0..=59 => r.range(1, 16),
        60..=69 => r.range(17, 512),
        70..=74 => uapi::ZG_SNAPSHOT_MAX_PAGES,
        75..=79 => 0,
        80..=84 => uapi::ZG_SNAPSHOT_MAX_PAGES + 1,
        85..=89 => u64::MAX,
        90..=94 => 1 << 52,
        _ => r.next_u64(),
    }
}

fn gen_hmm_pages(r: &mut Rng) -> u64 {
    match r.below(100) {
        0..=64 => r.range(1, 32),
        65..=69 => 0,
        70..=74 => HMM_MAX_BYTES / PG + 1,
        75..=79 => HMM_MAX_SNAPSHOT_PAGES + 1,
        80..=84 => u64::MAX,
        85..=89 => 1 << 40,
        90..=94 => u64::MAX / PG + 1,
        _ => r.range(33, 256),
    }
}

/// Every number the drivers serve.
const KNOWN_IOCTLS: [u32; 15] = [
    uapi::ZG_IOC_GET_INFO,
    uapi::ZG_IOC_MAP,
    uapi::ZG_IOC_DMA,
    uapi::ZG_IOC_SNAPSHOT,
    uapi::ZG_IOC_STATS,
    hmm::HMM_DMIRROR_READ,
    hmm::HMM_DMIRROR_WRITE,
    hmm::HMM_DMIRROR_MIGRATE_TO_DEV,
    hmm::HMM_DMIRROR_MIGRATE_TO_SYS,
    hmm::HMM_DMIRROR_SNAPSHOT,
    hmm::HMM_DMIRROR_EXCLUSIVE,
    hmm::HMM_DMIRROR_CHECK_EXCLUSIVE,
    hmm::HMM_DMIRROR_RELEASE,
    hmm::HMM_DMIRROR_FLAGS,
    hmm::HMM_DMIRROR_READ_UNLOCKED,
];

/// ioctl types the VFS answers itself before a driver sees the number (`do_vfs_ioctl`:
/// `FIOCLEX`/`FIONBIO`/`FIONREAD` 'T', `FIFREEZE`/`FS_IOC_FSGETXATTR` 'X', `FS_IOC_*` 'f',
/// `FICLONE` 0x94, `FS_IOC_GETFSUUID` 0x15, `FIGETBSZ` 0).
const VFS_TYPES: [u8; 6] = [0x00, b'T', b'X', b'f', 0x94, 0x15];

pub(crate) fn is_unknown_ioctl(cmd: u32) -> bool {
    let ty = (cmd >> 8) as u8;
    !KNOWN_IOCTLS.contains(&cmd) && !VFS_TYPES.contains(&ty)
}

fn gen_unknown_cmd(r: &mut Rng) -> u32 {
    loop {
        let dir = r.below(4) as u32;
        let size = r.below(1 << 14) as usize;
        let cmd = match r.below(4) {
            // From 0x05: the retired number of the test build's old INJECT is unknown too.
            0 => uapi::ioc(dir, uapi::ZG_IOC_MAGIC, r.range(5, 255) as u8, size),
            1 => {
                // A served number with another size or direction.
                let known = KNOWN_IOCTLS[r.below(5) as usize];
                let other = uapi::ioc(
                    dir,
                    uapi::ZG_IOC_MAGIC,
                    known as u8,
                    uapi::ioc_size(known) ^ (1 + r.below(63) as usize),
                );
                if r.chance(500) {
                    other
                } else {
                    (known & !(3 << 30)) | (((known >> 30) ^ (1 + r.below(3) as u32)) << 30)
                }
            }
            2 => uapi::ioc(dir, hmm::HMM_IOC_MAGIC, r.range(10, 255) as u8, size),
            _ => r.next_u64() as u32,
        };
        if is_unknown_ioctl(cmd) {
            return cmd;
        }
    }
}

/// The next call of a thread: a function of its generator alone.
pub(crate) fn gen_call(r: &mut Rng) -> Call {
    match r.weighted(KINDS) {
        Kind::Open => Call::Open {
            fd: gen_fd(r),
            hmm: r.chance(250),
        },
        Kind::Close => Call::Close { fd: gen_fd(r) },
        Kind::GetInfo => Call::GetInfo {
            fd: gen_fd(r),
            arg: gen_ptr(r, 800),
        },
        Kind::Stats => Call::Stats {
            fd: gen_fd(r),
            arg: gen_ptr(r, 850),
        },
        Kind::Map => Call::Map {
            fd: gen_fd(r),
            at: gen_target(r),
            len: gen_map_len(r),
            flags: gen_flags(r, uapi::ZG_MAP_FLAGS),
            arg: gen_ptr(r, 900),
            junk: if r.chance(200) { r.next_u64() } else { 0 },
        },
        Kind::Dma => Call::Dma {
            fd: gen_fd(r),
            op: gen_dma_op(r),
            flags: gen_flags(r, uapi::ZG_DMA_FLAGS),
            src: gen_target(r),
            dst: gen_target(r),
            len: gen_dma_len(r),
            aux: gen_ptr(r, 850),
            fill: r.next_u64(),
            arg: gen_ptr(r, 920),
            junk: if r.chance(200) { r.next_u64() } else { 0 },
        },
        Kind::Snapshot => Call::Snapshot {
            fd: gen_fd(r),
            at: gen_target(r),
            npages: gen_snapshot_pages(r),
            out: gen_ptr(r, 850),
            arg: gen_ptr(r, 900),
        },
        Kind::Unknown => Call::Unknown {
            fd: gen_fd(r),
            cmd: gen_unknown_cmd(r),
            arg: gen_ptr(r, 700),
        },
        Kind::Hmm => Call::Hmm {
            fd: gen_fd(r),
            cmd: match r.below(10) {
                0..=2 => HmmCmd::Read,
                3 => HmmCmd::ReadUnlocked,
                4..=6 => HmmCmd::Write,
                7 | 8 => HmmCmd::Snapshot,
                _ => HmmCmd::Unsupported(r.below(HMM_UNSUPPORTED.len() as u64) as u8),
            },
            at: gen_target(r),
            npages: gen_hmm_pages(r),
            buf: gen_ptr(r, 850),
            arg: gen_ptr(r, 900),
            junk: if r.chance(200) { r.next_u64() } else { 0 },
        },
        Kind::Private => {
            let op = r.range(u64::from(DMA_COPY), u64::from(DMA_COMPARE)) as u8;
            let no_fault = r.chance(300);
            let aligned = r.chance(500);
            let off = |r: &mut Rng| {
                if aligned {
                    (r.below(PRIV_W / PG) * PG) as u32
                } else {
                    r.below(PRIV_W) as u32
                }
            };
            let (soff, doff) = (off(r), off(r));
            let room = PRIV_W - u64::from(soff.max(doff));
            let len = if r.chance(300) {
                room
            } else {
                r.range(1, room.min(3 * PG))
            } as u32;
            Call::Private(PrivJob {
                op,
                no_fault,
                soff,
                doff,
                len,
                seed: r.next_u64(),
            })
        }
        Kind::PrivateMm => Call::PrivateMm {
            buf: r.below(2) as u8,
            op: [
                PrivMm::DontNeed,
                PrivMm::Free,
                PrivMm::Cold,
                PrivMm::Pageout,
                PrivMm::Protect,
                PrivMm::Protect,
            ][r.below(6) as usize],
        },
        Kind::Mm => Call::Mm {
            buf: r.below(NSHARED as u64) as u8,
            op: r.weighted(&[
                (12, MmOp::Munmap),
                (7, MmOp::Mmap { alt: false }),
                (7, MmOp::Mmap { alt: true }),
                (7, MmOp::Mprotect(libc::PROT_NONE)),
                (7, MmOp::Mprotect(libc::PROT_READ)),
                (10, MmOp::Mprotect(libc::PROT_READ | libc::PROT_WRITE)),
                (14, MmOp::Madvise(libc::MADV_DONTNEED)),
                (10, MmOp::Madvise(libc::MADV_FREE)),
                (8, MmOp::Madvise(libc::MADV_PAGEOUT)),
                (8, MmOp::Madvise(libc::MADV_COLD)),
                (5, MmOp::Mremap { dontunmap: false }),
                (5, MmOp::Mremap { dontunmap: true }),
                (3, MmOp::Collapse),
                (10, MmOp::Touch),
            ]),
            first: r.next_u64() as u16,
            pages: r.next_u64() as u16,
        },
        Kind::Fork => Call::Fork {
            how: [ForkHow::Calls, ForkHow::ExitMidDma, ForkHow::Killed][r.below(3) as usize],
            seed: r.next_u64(),
            delay_us: r.below(2000) as u32,
        },
    }
}

/// `[first, first + pages)` of a window of `wp` pages, from the generator's raw numbers.
pub(crate) fn clip(first: u16, pages: u16, wp: u64) -> (u64, u64) {
    let first = u64::from(first) % wp;
    let pages = 1 + u64::from(pages) % (wp - first);
    (first, pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::rng::thread_seed;

    fn sequence(seed: u64, n: usize) -> Vec<Call> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| gen_call(&mut r)).collect()
    }

    #[test]
    fn same_seed_same_calls() {
        let a = sequence(thread_seed(7, 1, 1), 5000);
        assert_eq!(a, sequence(thread_seed(7, 1, 1), 5000));
        assert_ne!(a, sequence(thread_seed(7, 1, 0), 5000));
    }

    /// Every kind of call, every opcode and every flag combination shows up.
    #[test]
    fn generator_covers_the_uapi() {
        let calls = sequence(99, 200_000);
        let mut dma_ops = std::collections::HashSet::new();
        let mut dma_flags = std::collections::HashSet::new();
        let mut map_flags = std::collections::HashSet::new();
        let mut kinds = std::collections::HashSet::new();
        let mut hmm_cmds = std::collections::HashSet::new();
        let mut priv_ops = std::collections::HashSet::new();
        let mut mm_ops = std::collections::HashSet::new();
        let mut forks = std::collections::HashSet::new();
        let mut ptrs = std::collections::HashSet::new();
        for c in &calls {
            kinds.insert(std::mem::discriminant(c));
            match *c {
                Call::Dma { op, flags, arg, .. } => {
                    dma_ops.insert(if (1..=6).contains(&op) { op } else { 7 });
                    dma_flags.insert(match flags {
                        0 => 0,
                        uapi::ZG_DMA_NO_FAULT => 1,
                        _ => 2,
                    });
                    ptrs.insert(arg);
                }
                Call::Map { flags, .. } => {
                    map_flags.insert(match flags {
                        0 => 0,
                        uapi::ZG_MAP_WRITE => 1,
                        _ => 2,
                    });
                }
                Call::Hmm { cmd, .. } => {
                    hmm_cmds.insert(std::mem::discriminant(&cmd));
                }
                Call::Private(j) => {
                    priv_ops.insert((j.op, j.no_fault));
                    assert!(u64::from(j.soff.max(j.doff) + j.len) <= PRIV_W && j.len > 0);
                }
                Call::Mm { op, .. } => {
                    mm_ops.insert(format!("{op:?}"));
                }
                Call::Fork { how, .. } => {
                    forks.insert(how as u8);
                }
                _ => {}
            }
        }
        assert_eq!(kinds.len(), 13, "every kind of call");
        assert_eq!(dma_ops.len(), 7, "the six opcodes and garbage: {dma_ops:?}");
        assert_eq!(dma_flags.len(), 3);
        assert_eq!(map_flags.len(), 3);
        assert_eq!(hmm_cmds.len(), 5);
        assert_eq!(priv_ops.len(), 12);
        assert_eq!(mm_ops.len(), 14, "{mm_ops:?}");
        assert_eq!(forks.len(), 3);
        assert_eq!(ptrs.len(), 8);
    }

    #[test]
    fn unknown_numbers_are_unknown() {
        let mut r = Rng::new(3);
        for _ in 0..20_000 {
            let cmd = gen_unknown_cmd(&mut r);
            assert!(!KNOWN_IOCTLS.contains(&cmd), "{cmd:#x}");
            assert!(!VFS_TYPES.contains(&((cmd >> 8) as u8)), "{cmd:#x}");
        }
        // The retired INJECT number (test builds use debugfs now).
        assert!(is_unknown_ioctl(uapi::ioc(uapi::IOC_WRITE, b'z', 0x05, 40)));
        assert!(!is_unknown_ioctl(hmm::HMM_DMIRROR_READ));
        assert!(!is_unknown_ioctl(0x5421)); // FIONBIO
        assert!(is_unknown_ioctl(uapi::ioc(uapi::IOC_READ, b'z', 0x00, 32)));
    }
}
