//! A fuzzer for the driver's user API (`uapi_fuzz`; `just fuzz-guest N [--seed S]`).
//!
//! # What runs
//!
//! The test forks [`PROCS`] fuzzer processes of [`THREADS`] threads each, an unprivileged child
//! and a canary child, and waits for them:
//!
//! - Each fuzzer thread issues its share of the `N` calls, drawn by [`gen_call`] from its own
//!   seeded generator: open and close of `/dev/zapguard` and `/dev/zapguard_hmm0` (the
//!   test_hmm-compatible uAPI lives on its own nodes, not on `/dev/zapguard`'s file), `GET_INFO`,
//!   `MAP` (every flag combination the uAPI knows, plus unknown bits), `DMA` (every opcode of
//!   `shared_regs::dma`, with and without `ZG_DMA_NO_FAULT`, plus unknown opcodes and flags;
//!   the uAPI has only synchronous jobs), `SNAPSHOT`, `STATS`, the test_hmm commands, ioctl
//!   numbers nobody serves (unknown numbers, the retired 0x05, known numbers with the wrong
//!   size or direction, the other node's numbers), `munmap`,
//!   `mmap`, `mprotect`, `madvise` (`DONTNEED`, `FREE`, `PAGEOUT`, `COLD`, `COLLAPSE`), `mremap`
//!   (with and without `MREMAP_DONTUNMAP`) of the buffers the other thread's ioctls use, and
//!   `fork`: the child uses its parent's files (which must fail: a context serves its opener
//!   only), opens one of its own, has the device write its copy of a buffer, then exits, in a
//!   third of the cases with a job running in another thread, in another third killed by
//!   `SIGKILL` in the middle of a job. Fuzzer processes exit with their files open.
//! - Arguments are hostile in a fixed share of calls: kernel and non-canonical addresses, NULL
//!   and low addresses, never-mapped addresses, `PROT_NONE` pages, read-only pages as
//!   destinations, lengths 0, 1, 2, 2^40, `u64::MAX`, one over each limit, unaligned and
//!   wrapping ranges, garbage in opcodes, flags and output fields, and argument pointers that
//!   are NULL, kernel, unmapped, `PROT_NONE`, read-only or that run into a guard page.
//! - The unprivileged child drops to uid/gid 65534 before it opens `/dev/zapguard` (the test
//!   opens the node to everyone for its duration and restores its mode afterwards) and, among
//!   ordinary calls, tries to open its context's debugfs `inject` file for writing, which must
//!   fail with `EACCES` (debugfs is root-only; a production module has no such file). Nothing
//!   in the fuzz enables an injected bug.
//!
//! # Safety of the fuzzer itself
//!
//! Every address a device write or a kernel copy can reach is in the fuzzer's *arena*, a fixed
//! range (from [`ARENA`]) that nothing else in the process maps: each buffer's window is
//! bounded by `PROT_NONE` guard pages, so a job with a huge length stops at the guard with a
//! fault. Buffers move only between two windows of their own region (`mremap` with
//! `MREMAP_FIXED`), and unmapped windows are refilled with `MAP_FIXED` only by their owner.
//! Random numbers become addresses only in the kernel half, below `mmap_min_addr`, or in ranges
//! nothing maps. An argument structure is read by the driver from memory the fuzzer wrote only
//! if the fuzzer built it; read-only pages hold a pattern with the top bit of every byte set,
//! which no structure of the uAPI accepts (unaligned or kernel addresses, unknown opcodes and
//! modes).
//!
//! # What is checked
//!
//! - Every errno must be one the README documents for that call ([`TABLE`]; a host unit test
//!   checks each quoted README line is in README.md), and a call that cannot succeed (an
//!   argument the uAPI refuses, an address that cannot be accessed, a context used from another
//!   process) must fail with an errno one of its
//!   reasons explains ([`Cause`]); `STATS` must always answer. Each call type must succeed
//!   often enough ([`MIN_SUCCESS_PER_MILLE`]).
//! - Data, where nothing may legitimately change it: each thread owns two private buffers that
//!   only it maps, protects, advises and uses in jobs, so a successful job over them must have
//!   moved exactly the right bytes (and a failed one only its `bytes_done` prefix), a job
//!   writing one while it is read-only must fail and change nothing, and a stalling job on
//!   read-write memory must succeed (unless the device is busy, out of table pages or failed).
//!   After a fork the parent's private buffers must be what they were before the child's device
//!   writes. No data is checked in the shared buffers, which other threads unmap and advise.
//! - Snapshots of never-mapped and guard pages must say the CPU cannot map them and the device
//!   has no entry; the read-only pages must never be device-writable.
//! - Canaries: (a) a read-only pattern, used as a destination and as argument pointers; (b) a
//!   canary child holding a pattern at [`CANARY_VA`], which the fuzzers use as an unmapped
//!   address, mirrored (writable) into its own context and read by device checksums all along;
//!   (c) a guard page with a pattern on each side of every fuzzer buffer, checked through
//!   `mprotect(PROT_READ)` at the end. A changed byte fails the run.
//! - Every `STATS` answer must show zero violations in every class for its context and the
//!   device's global counter where it was before the fuzzer started; each context is checked
//!   before it is closed and at the end, and the test compares the device's global counter
//!   before and after (that covers the test_hmm nodes' contexts and the children's). The
//!   harness fails the run on kernel splats; the fuzzer never changes the console log level.
//!
//! # Seeds and replay
//!
//! The master seed (`zg.fuzz_seed=S`, default from the clock; printed first as
//! `ZAPGUARD-FUZZ seed=S calls=N`) derives every thread's seed ([`thread_seed`]), and each
//! call's arguments, including the data patterns and the fork children's seeds, come from its
//! thread's generator only, never from what earlier calls returned: the same seed and call
//! count give every thread the same call sequence. Scheduling is not deterministic: which call
//! of one thread lands during which call of another, and so the errnos and the order of events
//! in the device, differ from run to run. A failure prints the seed, the process, thread and
//! call index, the call with its resolved arguments, and `just fuzz-guest N --seed S`.

use crate::dev;
use crate::proc::fork_child;
use shared_regs::dma::{
    fnv1a64, DMA_CHECKSUM, DMA_COMPARE, DMA_COPY, DMA_FILL, DMA_MAX_LEN, DMA_READ, DMA_WRITE,
    FNV_OFFSET,
};
use shared_regs::hmm::{self, HmmDmirrorCmd};
use shared_regs::pte::VA_LIMIT;
use shared_regs::uapi::{self, ZgDma, ZgInfo, ZgMap, ZgSnapshot, ZgStats};
use std::fmt;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// [`crate::dev::PG`], for the fuzzer's 64-bit address arithmetic.
const PG: u64 = crate::dev::PG as u64;
/// Calls when the kernel command line does not say (`zg.fuzz_calls=N`).
pub(crate) const DEFAULT_CALLS: u64 = 100_000;
/// Fuzzer processes, and threads in each.
const PROCS: usize = 4;
const THREADS: usize = 2;
/// File slots of a fuzzer process (the driver's `max_contexts` default).
const NFD: usize = 4;
/// Shared buffers per process: three small ones and a THP-sized one (the last).
const NSHARED: usize = 4;
const SMALL_W: u64 = 16 * PG;
const HUGE_W: u64 = 2 << 20;
/// A thread's private buffers.
const PRIV_W: u64 = 8 * PG;
/// The read-only canary.
const RO_W: u64 = 4 * PG;
/// The fuzzer's arena: region `r` is `[ARENA + r * STRIDE, + STRIDE)`; its window A starts
/// 2 MiB in, window B 8 MiB in, each with a guard page on both sides; the rest stays unmapped.
const ARENA: u64 = 0x3000_0000_0000;
const STRIDE: u64 = 16 << 20;
const WIN_A: u64 = 2 << 20;
const WIN_B: u64 = 8 << 20;
/// Where the canary child keeps its pattern; never mapped in the fuzzers.
const CANARY_VA: u64 = 0x2000_0000_0000;
const CANARY_LEN: u64 = 16 * PG;
/// Bytes of a thread's scratch buffer: `DMA_READ`'s and test_hmm's user buffers, snapshot
/// output, unknown ioctls' argument (at least the largest size an ioctl number encodes).
const SCRATCH: u64 = 1 << 20;
const UNPRIV_ID: u32 = 65534;
const HMM_NODE: &str = "/dev/zapguard_hmm0";
/// Kernel and non-canonical addresses.
const KERNEL_ADDRS: [u64; 4] = [
    0xffff_8880_0000_0000,
    0xffff_ffff_8100_0000,
    0x8000_0000_0000,
    0xdead_beef_0000_0000,
];
/// Below `mmap_min_addr`: never mapped.
const LOW_LIMIT: u64 = 0x1_0000;
const GUARD_MAGIC: u64 = 0x6775_6172_6400_0000;
const RO_MAGIC: u64 = 0x726f_6361_6e61_7279;
const CANARY_MAGIC: u64 = 0x6361_6e61_7279_0000;
/// The largest test_hmm READ/WRITE and SNAPSHOT (`kmod/hmm_uapi.rs`).
const HMM_MAX_BYTES: u64 = 64 << 20;
const HMM_MAX_SNAPSHOT_PAGES: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Random numbers and seeds
// ---------------------------------------------------------------------------------------------

/// splitmix64: small, self-contained, good enough to drive a fuzzer.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 if `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `per_mille` / 1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    fn weighted<T: Copy>(&mut self, table: &[(u32, T)]) -> T {
        let total: u64 = table.iter().map(|(w, _)| u64::from(*w)).sum();
        let mut x = self.below(total);
        for &(w, v) in table {
            if x < u64::from(w) {
                return v;
            }
            x -= u64::from(w);
        }
        table[table.len() - 1].1
    }
}

/// The seed of stream `stream` (a thread, a child) of master seed `master`.
pub(crate) fn derive(master: u64, stream: u64) -> u64 {
    let mut r = Rng::new(master ^ stream.wrapping_mul(0xd134_2543_de82_ef95));
    r.next_u64();
    r.next_u64()
}

/// Thread `t` of fuzzer process `p`.
pub(crate) fn thread_seed(master: u64, p: usize, t: usize) -> u64 {
    derive(master, ((p as u64 + 1) << 16) | (t as u64 + 1))
}

const UNPRIV_STREAM: u64 = 0xffff_0001;

/// What the run does: `zg.fuzz_calls=N` and `zg.fuzz_seed=S` (decimal or `0x` hex) on the kernel
/// command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Config {
    pub(crate) calls: u64,
    pub(crate) seed: u64,
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

impl Config {
    pub(crate) fn from_cmdline(cmdline: &str, default_seed: u64) -> Result<Self, String> {
        let mut c = Config {
            calls: DEFAULT_CALLS,
            seed: default_seed,
        };
        for w in cmdline.split_whitespace() {
            if let Some(v) = w.strip_prefix("zg.fuzz_calls=") {
                c.calls = parse_u64(v).ok_or_else(|| format!("bad zg.fuzz_calls: {v}"))?;
            } else if let Some(v) = w.strip_prefix("zg.fuzz_seed=") {
                c.seed = parse_u64(v).ok_or_else(|| format!("bad zg.fuzz_seed: {v}"))?;
            }
        }
        Ok(c)
    }

    /// Calls of thread `t` of process `p`: the `N` calls split as evenly as they go.
    pub(crate) fn calls_for(&self, p: usize, t: usize) -> u64 {
        let n = (PROCS * THREADS) as u64;
        let i = (p * THREADS + t) as u64;
        self.calls / n + u64::from(i < self.calls % n)
    }

    /// Calls of the unprivileged child (on top of `N`).
    pub(crate) fn unpriv_calls(&self) -> u64 {
        (self.calls / 100).clamp(50, 2000)
    }

    pub(crate) fn replay(&self) -> String {
        format!("just fuzz-guest {} --seed {}", self.calls, self.seed)
    }
}

fn clock_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    derive(t, u64::from(std::process::id()))
}

// ---------------------------------------------------------------------------------------------
// The calls and the errnos the README allows for each
// ---------------------------------------------------------------------------------------------

/// What a call is, for the errno table and the counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    Open,
    OpenHmm,
    Close,
    GetInfo,
    Map,
    Dma,
    Snapshot,
    Stats,
    /// The unprivileged child's open of its context's debugfs `inject` file.
    DebugfsUnpriv,
    /// A number no node serves.
    Unknown,
    HmmRead,
    HmmReadUnlocked,
    HmmWrite,
    HmmSnapshot,
    /// test_hmm's commands that need device memory.
    HmmUnsupported,
}

const APIS: [Api; 15] = [
    Api::Open,
    Api::OpenHmm,
    Api::Close,
    Api::GetInfo,
    Api::Map,
    Api::Dma,
    Api::Snapshot,
    Api::Stats,
    Api::DebugfsUnpriv,
    Api::Unknown,
    Api::HmmRead,
    Api::HmmReadUnlocked,
    Api::HmmWrite,
    Api::HmmSnapshot,
    Api::HmmUnsupported,
];
const NAPI: usize = APIS.len();

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Api::Open => "open(/dev/zapguard)",
            Api::OpenHmm => "open(/dev/zapguard_hmm0)",
            Api::Close => "close",
            Api::GetInfo => "GET_INFO",
            Api::Map => "MAP",
            Api::Dma => "DMA",
            Api::Snapshot => "SNAPSHOT",
            Api::Stats => "STATS",
            Api::DebugfsUnpriv => "open(debugfs inject, unprivileged)",
            Api::Unknown => "unknown ioctl",
            Api::HmmRead => "HMM_DMIRROR_READ",
            Api::HmmReadUnlocked => "HMM_DMIRROR_READ_UNLOCKED",
            Api::HmmWrite => "HMM_DMIRROR_WRITE",
            Api::HmmSnapshot => "HMM_DMIRROR_SNAPSHOT",
            Api::HmmUnsupported => "HMM_DMIRROR_(migrate|exclusive|release|flags)",
        })
    }
}

/// Which node a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Node {
    /// `/dev/zapguard`.
    Zg,
    /// `/dev/zapguard_hmm0` (test_hmm's uAPI).
    Hmm,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Node::Zg => "/dev/zapguard",
            Node::Hmm => "/dev/zapguard_hmm0",
        })
    }
}

/// One row of [`TABLE`]: the errnos `apis` may return on `node`, each with the README text that
/// documents it (whitespace-normalised; a unit test finds each in README.md).
pub(crate) struct Row {
    pub(crate) apis: &'static [Api],
    pub(crate) node: Node,
    pub(crate) allowed: &'static [(i32, &'static str)],
}

use libc::{E2BIG, EACCES, EBUSY, EFAULT, EINVAL, EIO, ENODEV, ENOMEM, ENOTTY, EPERM, ETIMEDOUT};

// The README's "Errors, by call" table (the `| errno | when |` rows), line by line.
const R_EINVAL: (i32, &str) = (
    EINVAL,
    "| `EINVAL` | empty, unaligned or wrapping ranges, unknown ops, flags or reserved fields",
);
const R_EINVAL_EXITED: (i32, &str) = (EINVAL, "a context whose process has exited |");
const R_EFAULT: (i32, &str) = (
    EFAULT,
    "| `EFAULT` | addresses the device cannot translate; faults on unmapped or `PROT_NONE` memory; a bad argument pointer",
);
const R_EFAULT_PTR: (i32, &str) = (EFAULT, "a bad argument pointer");
const R_EPERM: (i32, &str) = (
    EPERM,
    "| `EPERM` | a write fault on read-only memory; a context used from another process",
);
const R_EACCES_DEBUGFS: (i32, &str) = (
    EACCES,
    "| `EACCES` | opening a test build's debugfs `inject` file without root (debugfs is root-only)",
);
const R_ENOMEM: (i32, &str) = (
    ENOMEM,
    "| `ENOMEM` | `MAP` or a device fault needing more page-table pages",
);
const R_EBUSY_OPEN: (i32, &str) = (
    EBUSY,
    "| `EBUSY` | `open()` when every ASID is in use, or the process already has `max_contexts` contexts",
);
const R_EBUSY_MAP: (i32, &str) = (
    EBUSY,
    "`MAP` that kept colliding with invalidations for 2 s, or a device fault whose service was overtaken by invalidations 256 times",
);
const R_EBUSY_SNAPSHOT: (i32, &str) = (
    EBUSY,
    "`SNAPSHOT` whose walk kept colliding with invalidations for 2 s |",
);
const R_ENOMEM_OPEN: (i32, &str) = (
    ENOMEM,
    "`open()` when the pool has no page left for the context's root table;",
);
const R_ETIMEDOUT: (i32, &str) = (
    ETIMEDOUT,
    "| `ETIMEDOUT` | `DMA` whose device fault was not served within `job_timeout_ms`",
);
const R_ENOTTY: (i32, &str) = (ENOTTY, "| `ENOTTY` | unknown ioctls |");
const R_EINVAL_SIZE: (i32, &str) = (
    EINVAL,
    "a `size` below the structure's 1.0 size (`ZG_*_SIZE_VER0`) or a non-zero `pad`",
);
const R_E2BIG: (i32, &str) = (
    E2BIG,
    "| `E2BIG` | a `size` above 4096 (`ZG_SIZE_MAX`), or a structure larger than the driver's whose bytes past the driver's size are not all zero",
);
// The test_hmm-compatible nodes ("The kernel's own hmm-tests, unmodified": its "Errors:").
const H_EINVAL: (i32, &str) = (
    EINVAL,
    "Errors: `EINVAL` (unaligned `addr`, zero or too many pages: more than 64 MiB of data or 2^20 pages of snapshot, unknown commands, a context whose process has exited)",
);
const H_EFAULT: (i32, &str) = (
    EFAULT,
    "`EFAULT` (unmapped or `PROT_NONE` pages, a bad `ptr`)",
);
const H_EPERM: (i32, &str) = (
    EPERM,
    "`EPERM` (WRITE of read-only memory, another process)",
);
const H_EBUSY: (i32, &str) = (
    EBUSY,
    "`EBUSY` (invalidations kept undoing 16 fault passes in a row)",
);
const H_UNSUPPORTED: (i32, &str) = (
    EINVAL,
    "| migration, exclusive access, `RELEASE`, `FLAGS` | `EINVAL`",
);

/// The errnos each call may return, from the README. A call whose errno is not in its row
/// fails the run; a call that must fail must also fail with an errno its reason explains
/// ([`Cause`]), and a few must succeed. `EIO` and `ENODEV` (a failed or unbound device) are
/// documented for every call, but the fuzz never fails or unbinds the device, so no row
/// accepts them.
pub(crate) const TABLE: &[Row] = &[
    // open(): README EBUSY row ("`open()` when every ASID is in use, or ... `max_contexts`"),
    // EIO and ENODEV rows ("any call (and `open()`)").
    Row {
        apis: &[Api::Open],
        node: Node::Zg,
        allowed: &[R_EBUSY_OPEN, R_ENOMEM_OPEN],
    },
    // GET_INFO: a bad argument pointer (EFAULT row); EIO/ENODEV ("any call").
    Row {
        apis: &[Api::GetInfo],
        node: Node::Zg,
        allowed: &[R_EFAULT_PTR, R_EINVAL_SIZE, R_E2BIG],
    },
    // MAP: every row that names ranges, faults, contexts, page-table pages or MAP.
    Row {
        apis: &[Api::Map],
        node: Node::Zg,
        allowed: &[
            R_EINVAL,
            R_EINVAL_EXITED,
            R_EFAULT,
            R_EPERM,
            R_ENOMEM,
            R_EBUSY_MAP,
            R_E2BIG,
        ],
    },
    // DMA: as MAP (a device fault is served like a MAP: "or a device fault", "(or a fault)"),
    // plus ETIMEDOUT ("`DMA` whose device fault was not served within `job_timeout_ms`").
    Row {
        apis: &[Api::Dma],
        node: Node::Zg,
        allowed: &[
            R_EINVAL,
            R_EINVAL_EXITED,
            R_EFAULT,
            R_EPERM,
            R_ENOMEM,
            R_EBUSY_MAP,
            R_ETIMEDOUT,
            R_E2BIG,
        ],
    },
    // SNAPSHOT: ranges (EINVAL), untranslatable addresses and bad pointers (EFAULT), another
    // process (EPERM), a walk invalidations kept overtaking (EBUSY), EIO/ENODEV.
    Row {
        apis: &[Api::Snapshot],
        node: Node::Zg,
        allowed: &[
            R_EINVAL,
            R_EINVAL_EXITED,
            R_EFAULT,
            R_EPERM,
            R_EBUSY_SNAPSHOT,
            R_E2BIG,
        ],
    },
    // STATS: only a bad pointer; "every call answers `EIO` ..., `STATS` keeps answering"
    // ("When the device fails").
    Row {
        apis: &[Api::Stats],
        node: Node::Zg,
        allowed: &[R_EFAULT_PTR, R_EINVAL_SIZE, R_E2BIG],
    },
    // The unprivileged child's open of its debugfs `inject` file: EACCES.
    Row {
        apis: &[Api::DebugfsUnpriv],
        node: Node::Zg,
        allowed: &[R_EACCES_DEBUGFS],
    },
    // Numbers /dev/zapguard does not serve, including test_hmm's: "| `ENOTTY` | unknown ioctls |".
    Row {
        apis: &[
            Api::Unknown,
            Api::HmmRead,
            Api::HmmReadUnlocked,
            Api::HmmWrite,
            Api::HmmSnapshot,
            Api::HmmUnsupported,
        ],
        node: Node::Zg,
        allowed: &[R_ENOTTY],
    },
    // The test_hmm node: "Each open file is a context, like one of `/dev/zapguard`", so its
    // open() is /dev/zapguard's (the EBUSY, EIO and ENODEV rows).
    Row {
        apis: &[Api::OpenHmm],
        node: Node::Hmm,
        allowed: &[R_EBUSY_OPEN, R_ENOMEM_OPEN],
    },
    // Its data and snapshot commands: the README's "Errors:" for the node.
    Row {
        apis: &[
            Api::HmmRead,
            Api::HmmReadUnlocked,
            Api::HmmWrite,
            Api::HmmSnapshot,
        ],
        node: Node::Hmm,
        allowed: &[H_EINVAL, H_EFAULT, H_EPERM, H_EBUSY],
    },
    // Commands that need device memory, unknown commands, and /dev/zapguard's numbers:
    // "migration, exclusive access, RELEASE, FLAGS | EINVAL" and "unknown commands".
    Row {
        apis: &[
            Api::HmmUnsupported,
            Api::Unknown,
            Api::GetInfo,
            Api::Map,
            Api::Dma,
            Api::Snapshot,
            Api::Stats,
            Api::DebugfsUnpriv,
        ],
        node: Node::Hmm,
        allowed: &[H_UNSUPPORTED, H_EINVAL],
    },
];

/// The errnos `api` may return on `node` (empty: it never fails, or it is never issued there).
pub(crate) fn allowed(api: Api, node: Node) -> &'static [(i32, &'static str)] {
    TABLE
        .iter()
        .find(|r| r.node == node && r.apis.contains(&api))
        .map_or(&[], |r| r.allowed)
}

pub(crate) fn errno_name(e: i32) -> &'static str {
    match e {
        0 => "ok",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::E2BIG => "E2BIG",
        libc::EMFILE => "EMFILE",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHWPOISON => "EHWPOISON",
        _ => "errno",
    }
}

struct Names(&'static [(i32, &'static str)]);

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut seen: Vec<i32> = vec![];
        for (e, _) in self.0 {
            if !seen.contains(e) {
                if !seen.is_empty() {
                    f.write_str(", ")?;
                }
                f.write_str(errno_name(*e))?;
                seen.push(*e);
            }
        }
        if seen.is_empty() {
            f.write_str("nothing")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Generated calls
// ---------------------------------------------------------------------------------------------

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
    /// A kernel or non-canonical address ([`KERNEL_ADDRS`]).
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
    fn blocked(self, len: u64, write: bool) -> bool {
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

const HMM_UNSUPPORTED: [u32; 6] = [
    hmm::HMM_DMIRROR_MIGRATE_TO_DEV,
    hmm::HMM_DMIRROR_MIGRATE_TO_SYS,
    hmm::HMM_DMIRROR_EXCLUSIVE,
    hmm::HMM_DMIRROR_CHECK_EXCLUSIVE,
    hmm::HMM_DMIRROR_RELEASE,
    hmm::HMM_DMIRROR_FLAGS,
];

impl HmmCmd {
    fn number(self) -> u32 {
        match self {
            HmmCmd::Read => hmm::HMM_DMIRROR_READ,
            HmmCmd::ReadUnlocked => hmm::HMM_DMIRROR_READ_UNLOCKED,
            HmmCmd::Write => hmm::HMM_DMIRROR_WRITE,
            HmmCmd::Snapshot => hmm::HMM_DMIRROR_SNAPSHOT,
            HmmCmd::Unsupported(i) => HMM_UNSUPPORTED[i as usize % HMM_UNSUPPORTED.len()],
        }
    }

    fn api(self) -> Api {
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
    fn file_slot(&self) -> Option<u8> {
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

pub(crate) fn shared_w(buf: u8) -> u64 {
    if buf as usize % NSHARED == NSHARED - 1 {
        HUGE_W
    } else {
        SMALL_W
    }
}

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

// ---------------------------------------------------------------------------------------------
// What must fail
// ---------------------------------------------------------------------------------------------

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

const INVAL: Errnos = Errnos::of(&[EINVAL]);
const FAULT: Errnos = Errnos::of(&[EFAULT]);
/// An access the device cannot make: `EFAULT` (unmapped, `PROT_NONE`, past a guard page) or
/// `EPERM` (a write to read-only memory), or what serving the faults before it can answer:
/// out of table pages (`ENOMEM`), a walk invalidations kept overtaking (`EBUSY`), a fault not
/// served in time (`ETIMEDOUT`), a job whose fault another thread's close aborted (`EFAULT`).
const ACCESS: Errnos = Errnos::of(&[EFAULT, EPERM, ENOMEM, EBUSY, ETIMEDOUT]);

/// An argument the driver cannot read answers `EFAULT`; one it reads from the read-only
/// pattern (which no structure accepts) is refused by its `size` (`EINVAL` below the 1.0 size,
/// `E2BIG` above it with a non-zero tail) or its fields (`EINVAL`), or `EFAULT` when the answer
/// is written back.
pub(crate) const BAD_POINTER: Cause = Cause {
    why: "a bad argument pointer",
    errnos: Errnos::of(&[EFAULT, EINVAL, E2BIG]),
};
const NOT_HMM: Cause = Cause {
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
fn pointer_or_node(arg: Ptr, node: Node) -> Option<Cause> {
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

// ---------------------------------------------------------------------------------------------
// Expected data
// ---------------------------------------------------------------------------------------------

/// `DMA_FILL`'s bytes: the 8-byte little-endian pattern repeated from the job's first byte.
pub(crate) fn fill_bytes(pattern: u64, len: usize) -> Vec<u8> {
    let p = pattern.to_le_bytes();
    (0..len).map(|i| p[i % 8]).collect()
}

/// `DMA_COMPARE`'s result: the offset of the first difference, or `u64::MAX`.
pub(crate) fn first_diff(a: &[u8], b: &[u8]) -> u64 {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .map_or(u64::MAX, |i| i as u64)
}

/// Bytes from `seed`.
fn seeded(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The pattern word of a guard page, the read-only canary and the canary child, at `addr`.
fn guard_word(addr: u64) -> u64 {
    addr ^ GUARD_MAGIC
}
fn ro_word(addr: u64) -> u64 {
    (addr ^ RO_MAGIC) | 0x8080_8080_8080_8080
}
fn data_word(addr: u64) -> u64 {
    addr.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}
fn canary_word(addr: u64) -> u64 {
    addr.rotate_left(17) ^ CANARY_MAGIC
}

/// The first word of `[addr, addr + len)` that differs from `word(address)`, if any.
fn first_bad_word(addr: u64, len: u64, word: fn(u64) -> u64) -> Option<(u64, u64)> {
    (addr..addr + len).step_by(8).find_map(|a| {
        // SAFETY: the caller passes a range it mapped readable.
        let v = unsafe { std::ptr::read_volatile(a as *const u64) };
        (v != word(a)).then_some((a, v))
    })
}

fn write_words(addr: u64, len: u64, word: fn(u64) -> u64) {
    for a in (addr..addr + len).step_by(8) {
        // SAFETY: the caller passes a range it mapped writable and owns.
        unsafe { std::ptr::write_volatile(a as *mut u64, word(a)) };
    }
}

// ---------------------------------------------------------------------------------------------
// The board: counters and the first failure, shared by every process of the run
// ---------------------------------------------------------------------------------------------

/// Slots per call in [`Board::results`]: 0 counts successes, `e` errno `e` (the last: larger).
const NERR: usize = 136;
const MSG_MAX: usize = 3072;

/// Non-ioctl operations counted in the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Munmap,
    Mmap,
    Mprotect,
    DontNeed,
    Free,
    Pageout,
    Cold,
    Collapse,
    Mremap,
    MremapDontUnmap,
    Touch,
    PrivDontNeed,
    PrivFree,
    PrivCold,
    PrivPageout,
    PrivProtect,
    Fork,
    ForkExitMidDma,
    ForkKilled,
}
const OPS: [(Op, &str); 19] = [
    (Op::Munmap, "munmap"),
    (Op::Mmap, "mmap"),
    (Op::Mprotect, "mprotect"),
    (Op::DontNeed, "madvise(DONTNEED)"),
    (Op::Free, "madvise(FREE)"),
    (Op::Pageout, "madvise(PAGEOUT)"),
    (Op::Cold, "madvise(COLD)"),
    (Op::Collapse, "madvise(COLLAPSE)"),
    (Op::Mremap, "mremap"),
    (Op::MremapDontUnmap, "mremap(DONTUNMAP)"),
    (Op::Touch, "CPU writes"),
    (Op::PrivDontNeed, "private madvise(DONTNEED)"),
    (Op::PrivFree, "private madvise(FREE)"),
    (Op::PrivCold, "private madvise(COLD)"),
    (Op::PrivPageout, "private madvise(PAGEOUT)"),
    (Op::PrivProtect, "private mprotect"),
    (Op::Fork, "fork (child exits after its calls)"),
    (Op::ForkExitMidDma, "fork (child exits mid-DMA)"),
    (Op::ForkKilled, "fork (child killed mid-DMA)"),
];

/// Checks counted in the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    GuardPages,
    RoPages,
    CanaryPages,
    CanaryChecksums,
    PrivateData,
    Cow,
    Contexts,
    Snapshots,
    NoFile,
}
const CHECKS: [(Check, &str); 9] = [
    (Check::GuardPages, "guard pages unchanged"),
    (Check::RoPages, "read-only canary pages unchanged"),
    (Check::CanaryPages, "canary child pages unchanged"),
    (
        Check::CanaryChecksums,
        "canary child device checksums right",
    ),
    (Check::PrivateData, "private-buffer jobs data-checked"),
    (Check::Cow, "fork children left the parent's buffers alone"),
    (Check::Contexts, "contexts' STATS with zero violations"),
    (
        Check::Snapshots,
        "snapshot pages of never-mapped, guard or read-only memory",
    ),
    (
        Check::NoFile,
        "generated calls skipped, not counted (their file slot was closed)",
    ),
];

/// Lives in a `MAP_SHARED` mapping made before the first fork: every process of the run counts
/// into it and the first failure is kept in it.
#[repr(C)]
pub(crate) struct Board {
    seed: AtomicU64,
    baseline: AtomicU64,
    results: [[AtomicU64; NERR]; NAPI],
    ops: [[AtomicU64; 2]; OPS.len()],
    checks: [AtomicU64; CHECKS.len()],
    failures: AtomicU64,
    first: AtomicU32,
    msg_len: AtomicU32,
    msg: [AtomicU8; MSG_MAX],
    canary_ready: AtomicU32,
    canary_stop: AtomicU32,
}

/// The board's mapping.
pub(crate) struct BoardMem(dev::Mapping);

impl BoardMem {
    pub(crate) fn new() -> io::Result<Self> {
        let len = std::mem::size_of::<Board>().next_multiple_of(PG as usize);
        dev::Mapping::shared_anon(len).map(Self)
    }

    pub(crate) fn board(&self) -> &Board {
        // SAFETY: the mapping is at least `size_of::<Board>()` bytes, page aligned, zero-filled
        // at creation (a valid `Board`: atomics only), and lives as long as the borrow.
        unsafe { &*(self.0.addr as *const Board) }
    }
}

/// Who made a call, for failure messages.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Who {
    Thread { p: usize, t: usize, i: u64 },
    ForkChild { p: usize, t: usize, i: u64 },
    Process(usize),
    Unpriv(u64),
    Canary,
    Test,
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Who::Thread { p, t, i } => write!(f, "process {p} thread {t} call {i}"),
            Who::ForkChild { p, t, i } => {
                write!(f, "fork child of process {p} thread {t} (its call {i})")
            }
            Who::Process(p) => write!(f, "process {p}"),
            Who::Unpriv(i) => write!(f, "unprivileged child call {i}"),
            Who::Canary => write!(f, "canary child"),
            Who::Test => write!(f, "test"),
        }
    }
}

/// A `fmt::Write` into a fixed buffer, so that forked children of threaded processes need not
/// allocate to report.
struct Fixed<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl fmt::Write for Fixed<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl Board {
    pub(crate) fn init(&self, cfg: &Config, baseline: u64) {
        self.seed.store(cfg.seed, Relaxed);
        self.baseline.store(baseline, Relaxed);
    }

    fn count(&self, api: Api, res: Result<(), i32>) {
        let slot = match res {
            Ok(()) => 0,
            Err(e) => (e.max(1) as usize).min(NERR - 1),
        };
        self.results[api as usize][slot].fetch_add(1, Relaxed);
    }

    fn op(&self, op: Op, ok: bool) {
        self.ops[op as usize][usize::from(!ok)].fetch_add(1, Relaxed);
    }

    fn check(&self, c: Check, n: u64) {
        self.checks[c as usize].fetch_add(n, Relaxed);
    }

    pub(crate) fn failed(&self) -> bool {
        self.failures.load(Relaxed) > 0
    }

    /// Records a failure; the first one's message is kept.
    pub(crate) fn fail(&self, who: &Who, what: fmt::Arguments<'_>) {
        use fmt::Write as _;
        self.failures.fetch_add(1, Relaxed);
        if self.first.compare_exchange(0, 1, Relaxed, Relaxed).is_err() {
            return;
        }
        let mut buf = [0u8; MSG_MAX];
        let mut w = Fixed {
            buf: &mut buf,
            len: 0,
        };
        let _ = write!(w, "seed {}: {who}: {what}", self.seed.load(Relaxed));
        let n = w.len;
        for (d, s) in self.msg.iter().zip(&buf[..n]) {
            d.store(*s, Relaxed);
        }
        self.msg_len.store(n as u32, Relaxed);
        self.first.store(2, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn message(&self) -> Option<String> {
        if self.first.load(std::sync::atomic::Ordering::Acquire) != 2 {
            return self
                .failed()
                .then(|| "a process failed while recording its failure".to_string());
        }
        let n = self.msg_len.load(Relaxed) as usize;
        let bytes: Vec<u8> = self.msg[..n].iter().map(|b| b.load(Relaxed)).collect();
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Counts a call's result and judges it against [`TABLE`] and `must`.
    fn verdict(
        &self,
        who: &Who,
        api: Api,
        node: Node,
        res: Result<(), i32>,
        must: Must,
        call: fmt::Arguments<'_>,
    ) -> Result<(), i32> {
        self.count(api, res);
        let ok = allowed(api, node);
        match (res, must) {
            (Err(e), _) if !ok.iter().any(|(a, _)| *a == e) => self.fail(
                who,
                format_args!(
                    "{api} on {node} failed with {} ({e}), which the README does not document for it (it allows {}); the call: {call}",
                    errno_name(e),
                    Names(ok)
                ),
            ),
            (Err(e), Must::Fail(cause)) if !cause.errnos.contains(e) => self.fail(
                who,
                format_args!(
                    "{api} on {node} failed with {} ({e}), which its reason to fail does not explain ({cause}); the call: {call}",
                    errno_name(e)
                ),
            ),
            (Err(e), Must::Succeed(why)) => self.fail(
                who,
                format_args!(
                    "{api} on {node} failed with {} but must succeed ({why}); the call: {call}",
                    errno_name(e)
                ),
            ),
            (Ok(()), Must::Fail(why)) => self.fail(
                who,
                format_args!("{api} on {node} succeeded but must fail ({why}); the call: {call}"),
            ),
            _ => {}
        }
        res
    }

    /// A context's counters: no violation in any class, the device's counter where it was.
    fn judge_stats(&self, who: &Who, s: &ZgStats, when: &str) {
        let base = self.baseline.load(Relaxed);
        if s.violations.iter().any(|&v| v != 0) || s.device_violations != base {
            self.fail(
                who,
                format_args!(
                    "validator violations {when}: asid {} counts {:?} by class, the device {} (it counted {base} before the fuzzer started)",
                    s.asid, s.violations, s.device_violations
                ),
            );
        } else {
            self.check(Check::Contexts, 1);
        }
    }

    /// A copy of the counters.
    pub(crate) fn tally(&self) -> Tally {
        Tally {
            results: self
                .results
                .iter()
                .map(|r| r.iter().map(|c| c.load(Relaxed)).collect())
                .collect(),
            ops: self
                .ops
                .iter()
                .map(|o| [o[0].load(Relaxed), o[1].load(Relaxed)])
                .collect(),
            checks: self.checks.iter().map(|c| c.load(Relaxed)).collect(),
        }
    }
}

/// The counters at the end of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Per [`APIS`] entry: successes, then the count of each errno.
    pub(crate) results: Vec<Vec<u64>>,
    /// Per [`OPS`] entry: (succeeded, failed).
    pub(crate) ops: Vec<[u64; 2]>,
    /// Per [`CHECKS`] entry.
    pub(crate) checks: Vec<u64>,
}

/// The share of its calls (per mille) each call type must see succeed, once it was issued at
/// least [`MIN_CALLS_JUDGED`] times: a run whose calls were nearly all refused early checks
/// little. The test_hmm commands go to both nodes and to read-only or unmapped memory, so few
/// of them can succeed (about 1.5-7% in a 100k-call run). The rest never succeed (each such
/// call must fail).
const MIN_SUCCESS_PER_MILLE: [(Api, u64); 12] = [
    (Api::Open, 500),
    (Api::OpenHmm, 500),
    (Api::Close, 500),
    (Api::GetInfo, 50),
    (Api::Map, 50),
    (Api::Dma, 50),
    (Api::Snapshot, 50),
    (Api::Stats, 50),
    (Api::HmmRead, 3),
    (Api::HmmReadUnlocked, 3),
    (Api::HmmWrite, 3),
    (Api::HmmSnapshot, 3),
];
const MIN_CALLS_JUDGED: u64 = 300;

impl Tally {
    pub(crate) fn ioctls(&self) -> u64 {
        self.results.iter().flatten().sum()
    }

    /// The call types that succeeded less often than [`MIN_SUCCESS_PER_MILLE`] asks.
    pub(crate) fn too_few_successes(&self) -> Vec<String> {
        MIN_SUCCESS_PER_MILLE
            .iter()
            .filter_map(|&(api, per_mille)| {
                let i = APIS.iter().position(|a| *a == api)?;
                let counts = &self.results[i];
                let (ok, total) = (counts[0], counts.iter().sum::<u64>());
                (total >= MIN_CALLS_JUDGED && ok * 1000 < total * per_mille).then(|| {
                    format!(
                        "{api}: {ok} of {total} calls succeeded, fewer than {}.{}%",
                        per_mille / 10,
                        per_mille % 10
                    )
                })
            })
            .collect()
    }

    /// The summary, one `ZAPGUARD-FUZZ` line each.
    pub(crate) fn lines(&self) -> Vec<String> {
        let mut out = vec![];
        for (api, counts) in APIS.iter().zip(&self.results) {
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            let mut line = format!("ZAPGUARD-FUZZ calls {api}: {total}, ok {}", counts[0]);
            for (e, n) in counts.iter().enumerate().skip(1) {
                if *n > 0 {
                    line += &format!(", {} {n}", errno_name(e as i32));
                    if errno_name(e as i32) == "errno" {
                        line += &format!("({e})");
                    }
                }
            }
            out.push(line);
        }
        let ops: Vec<String> = OPS
            .iter()
            .zip(&self.ops)
            .filter(|(_, c)| c[0] + c[1] > 0)
            .map(|((_, name), c)| format!("{name} {} ({} failed)", c[0] + c[1], c[1]))
            .collect();
        out.push(format!(
            "ZAPGUARD-FUZZ mm and processes: {}",
            ops.join(", ")
        ));
        let checks: Vec<String> = CHECKS
            .iter()
            .zip(&self.checks)
            .map(|((_, name), n)| format!("{name} {n}"))
            .collect();
        out.push(format!("ZAPGUARD-FUZZ checks: {}", checks.join(", ")));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// A fuzzer process
// ---------------------------------------------------------------------------------------------

fn errno_of(e: &io::Error) -> i32 {
    dev::errno(e)
}

fn raw(f: &File, cmd: u32, arg: u64) -> Result<(), i32> {
    dev::ioctl_raw(f, cmd, arg as usize)
        .map(drop)
        .map_err(|e| errno_of(&e))
}

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

/// `mmap` at exactly `addr` (`MAP_FIXED_NOREPLACE`, or `MAP_FIXED` over the fuzzer's own window).
fn map_at(addr: u64, len: u64, replace: bool) -> Result<(), i32> {
    let fixed = if replace {
        libc::MAP_FIXED
    } else {
        libc::MAP_FIXED_NOREPLACE
    };
    // SAFETY: `addr` is in the fuzzer's arena (or the canary child's range), which nothing else
    // in the process maps; with MAP_FIXED it replaces only a window of the fuzzer's own.
    let p = unsafe {
        libc::mmap(
            addr as *mut _,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(last_errno());
    }
    if p as u64 != addr {
        // An old kernel ignoring MAP_FIXED_NOREPLACE: not ours to keep.
        // SAFETY: the mapping just made, at the kernel's address.
        unsafe { libc::munmap(p, len as usize) };
        return Err(libc::EEXIST);
    }
    Ok(())
}

fn mprotect(addr: u64, len: u64, prot: i32) -> Result<(), i32> {
    // SAFETY: a window or guard page of the fuzzer's arena; nothing holds references into it
    // while its protection changes (CPU accesses check the recorded protection first).
    match unsafe { libc::mprotect(addr as *mut _, len as usize, prot) } {
        0 => Ok(()),
        _ => Err(last_errno()),
    }
}

fn madvise(addr: u64, len: u64, advice: i32) -> Result<(), i32> {
    // SAFETY: advice on a window of the fuzzer's arena.
    match unsafe { libc::madvise(addr as *mut _, len as usize, advice) } {
        0 => Ok(()),
        _ => Err(last_errno()),
    }
}

/// Whether `[addr, addr + len)` has no mapping at all (`mincore` says `ENOMEM`).
fn unmapped(addr: u64, len: u64) -> bool {
    let mut v = vec![0u8; len.div_ceil(PG) as usize];
    // SAFETY: `v` has a byte per page of the range.
    let r = unsafe { libc::mincore(addr as *mut _, len as usize, v.as_mut_ptr()) };
    r != 0 && last_errno() == libc::ENOMEM
}

fn region_base(r: usize) -> u64 {
    ARENA + r as u64 * STRIDE
}
const RO_REGION: usize = NSHARED;
fn private_region(t: usize, which: usize) -> usize {
    NSHARED + 1 + 2 * t + which
}

/// A page that is never mapped in a fuzzer process.
fn hole(page: u16) -> u64 {
    region_base(0) + u64::from(page) * PG
}

/// Maps a guard page at `addr` holding its pattern, then takes every access away.
fn place_guard(addr: u64) -> Result<(), String> {
    map_at(addr, PG, false).map_err(|e| format!("guard page {addr:#x}: {}", errno_name(e)))?;
    write_words(addr, PG, guard_word);
    mprotect(addr, PG, libc::PROT_NONE)
        .map_err(|e| format!("mprotect guard {addr:#x}: {}", errno_name(e)))
}

/// A shared buffer: two windows, either one current (or unmapped), bounded by guards.
struct SharedBuf {
    a: u64,
    b: u64,
    w: u64,
    /// The window the buffer is (or was last) at; read without the lock by the ioctls.
    cur: AtomicU64,
    /// The window, and whether the whole of it is known mapped read-write (CPU writes are
    /// made only then). Held for every mm operation on the buffer.
    st: Mutex<(u64, bool)>,
}

#[derive(Clone)]
struct Fd {
    file: Arc<File>,
    node: Node,
}

/// A thread's own state: its private buffers and scratch memory.
struct ThreadState {
    p0: u64,
    p1: u64,
    p1_ro: bool,
    scratch: Vec<u8>,
}

impl ThreadState {
    fn new(t: usize) -> Self {
        ThreadState {
            p0: region_base(private_region(t, 0)) + WIN_A,
            p1: region_base(private_region(t, 1)) + WIN_A,
            p1_ro: false,
            scratch: vec![0u8; SCRATCH as usize],
        }
    }

    fn p0(&mut self) -> &mut [u8] {
        // SAFETY: P0 is this thread's private window, mapped read-write for good; only this
        // thread touches it, and the device writes it only inside this thread's own ioctls,
        // never while the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.p0 as *mut u8, PRIV_W as usize) }
    }

    fn p1(&self) -> &[u8] {
        // SAFETY: P1 is this thread's private window, always readable (read-only or
        // read-write), written only by this thread and its own jobs.
        unsafe { std::slice::from_raw_parts(self.p1 as *const u8, PRIV_W as usize) }
    }

    fn p1_mut(&mut self) -> Option<&mut [u8]> {
        if self.p1_ro {
            return None;
        }
        // SAFETY: as in `p1`, and it is read-write now.
        Some(unsafe { std::slice::from_raw_parts_mut(self.p1 as *mut u8, PRIV_W as usize) })
    }

    fn scratch(&mut self) -> u64 {
        self.scratch.as_mut_ptr() as u64
    }
}

/// A fuzzer process.
struct Proc<'b> {
    idx: usize,
    board: &'b Board,
    shared: Vec<SharedBuf>,
    ro: u64,
    fds: Vec<Mutex<Option<Fd>>>,
    guards: Vec<u64>,
}

fn open_node(node: Node) -> io::Result<File> {
    match node {
        Node::Zg => dev::open(),
        Node::Hmm => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(HMM_NODE),
    }
}

impl<'b> Proc<'b> {
    /// Lays out the arena (in a freshly forked process) and, with `files`, opens the first
    /// files (three of `/dev/zapguard`, one of the test_hmm node).
    fn new(idx: usize, board: &'b Board, files: bool) -> Result<Self, String> {
        let mut guards = vec![];
        let mut window = |r: usize, w: u64, both: bool| -> Result<(u64, u64), String> {
            let a = region_base(r) + WIN_A;
            let b = region_base(r) + WIN_B;
            map_at(a, w, false).map_err(|e| format!("window {a:#x}: {}", errno_name(e)))?;
            for g in [a - PG, a + w] {
                place_guard(g)?;
                guards.push(g);
            }
            if both {
                for g in [b - PG, b + w] {
                    place_guard(g)?;
                    guards.push(g);
                }
            }
            Ok((a, b))
        };
        let mut shared = vec![];
        for buf in 0..NSHARED {
            let w = shared_w(buf as u8);
            let (a, b) = window(buf, w, true)?;
            if w == HUGE_W {
                let _ = madvise(a, w, libc::MADV_HUGEPAGE);
            }
            write_words(a, w, data_word);
            shared.push(SharedBuf {
                a,
                b,
                w,
                cur: AtomicU64::new(a),
                st: Mutex::new((a, true)),
            });
        }
        let (ro, _) = window(RO_REGION, RO_W, false)?;
        write_words(ro, RO_W, ro_word);
        mprotect(ro, RO_W, libc::PROT_READ).map_err(|e| format!("mprotect ro: {e}"))?;
        for t in 0..THREADS {
            for which in 0..2 {
                let (p, _) = window(private_region(t, which), PRIV_W, false)?;
                write_words(p, PRIV_W, data_word);
            }
        }
        let proc = Proc {
            idx,
            board,
            shared,
            ro,
            fds: (0..NFD).map(|_| Mutex::new(None)).collect(),
            guards,
        };
        for slot in (0..NFD).filter(|_| files) {
            let node = if slot == NFD - 1 { Node::Hmm } else { Node::Zg };
            proc.open(&Who::Process(idx), slot as u8, node);
        }
        Ok(proc)
    }

    fn fd(&self, slot: u8) -> Option<Fd> {
        self.fds[slot as usize % NFD]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The first open `/dev/zapguard` file, in slot order.
    fn first_zg(&self) -> Option<Fd> {
        (0..NFD as u8)
            .filter_map(|s| self.fd(s))
            .find(|f| f.node == Node::Zg)
    }

    fn all_fds(&self) -> Vec<Fd> {
        (0..NFD as u8).filter_map(|s| self.fd(s)).collect()
    }

    /// Checks a context's counters before its file goes.
    fn retire(&self, who: &Who, old: Fd) {
        self.board.count(Api::Close, Ok(()));
        if old.node == Node::Zg {
            let mut s = ZgStats::default();
            let r = dev::ioctl_rw(&old.file, uapi::ZG_IOC_STATS, &mut s).map_err(|e| errno_of(&e));
            let r = self.board.verdict(
                who,
                Api::Stats,
                Node::Zg,
                r.map(drop),
                Must::Succeed("STATS always answers"),
                format_args!("STATS before close"),
            );
            if r.is_ok() {
                self.board.judge_stats(who, &s, "of a context being closed");
            }
        }
    }

    fn open(&self, who: &Who, slot: u8, node: Node) {
        let mut g = self.fds[slot as usize % NFD]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(old) = g.take() {
            self.retire(who, old);
        }
        let api = if node == Node::Zg {
            Api::Open
        } else {
            Api::OpenHmm
        };
        let r = open_node(node).map_err(|e| errno_of(&e));
        let _ = self.board.verdict(
            who,
            api,
            node,
            r.as_ref().map(drop).map_err(|e| *e),
            Must::Any,
            format_args!("open of {node} into slot {slot}"),
        );
        if let Ok(f) = r {
            *g = Some(Fd {
                file: Arc::new(f),
                node,
            });
        }
    }

    fn close(&self, who: &Who, slot: u8) {
        let old = self.fds[slot as usize % NFD]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match old {
            Some(old) => self.retire(who, old),
            None => self.board.check(Check::NoFile, 1),
        }
    }

    fn addr(&self, t: Target) -> u64 {
        match t {
            Target::Shared { buf, off } => {
                self.shared[buf as usize % NSHARED].cur.load(Relaxed) + u64::from(off)
            }
            Target::ReadOnly { off } => self.ro + u64::from(off),
            Target::Guard { buf, before } => {
                let s = &self.shared[buf as usize % NSHARED];
                if before {
                    s.a - PG
                } else {
                    s.a + s.w
                }
            }
            Target::CanaryVa { off } => CANARY_VA + u64::from(off),
            Target::Hole { page } => hole(page),
            Target::Low(x) => x.into(),
            Target::Kernel(i) => KERNEL_ADDRS[i as usize % KERNEL_ADDRS.len()],
            Target::TopOfUser => VA_LIMIT - PG,
            Target::Wrap(n) => u64::MAX - u64::from(n),
        }
    }

    /// The address an argument pointer of kind `p` (not `Valid`) passes for a `size`-byte
    /// structure.
    fn arg_addr(&self, p: Ptr, size: usize) -> u64 {
        let s0 = &self.shared[0];
        match p {
            Ptr::Valid | Ptr::Null => 0,
            Ptr::Kernel => KERNEL_ADDRS[0],
            Ptr::Unmapped => CANARY_VA + 0x40,
            Ptr::Hole => hole(3) + 0x80,
            Ptr::Guard => s0.a + s0.w,
            Ptr::ReadOnly => self.ro,
            Ptr::Straddle => s0.a + s0.w - (size as u64 / 2).max(1),
        }
    }

    /// A user buffer of `need` bytes of kind `p`, and whether the kernel can copy `need` bytes
    /// to it (`kernel_writes`) or from it.
    fn buf(&self, ts: &mut ThreadState, p: Ptr, need: u64, kernel_writes: bool) -> (u64, bool) {
        match p {
            Ptr::Valid if need <= SCRATCH => (ts.scratch(), true),
            Ptr::ReadOnly => (self.ro, !kernel_writes && need <= RO_W),
            Ptr::Straddle => (self.arg_addr(p, 2), need <= 1),
            _ => (self.arg_addr(p, 16), false),
        }
    }

    /// Issues `cmd` with `s` as its argument, or with a bad pointer of kind `arg`.
    fn issue<T: zerocopy::IntoBytes + zerocopy::FromBytes>(
        &self,
        f: &Fd,
        cmd: u32,
        arg: Ptr,
        s: &mut T,
    ) -> Result<(), i32> {
        if arg == Ptr::Valid {
            dev::ioctl_rw(&f.file, cmd, s)
                .map(drop)
                .map_err(|e| errno_of(&e))
        } else {
            raw(&f.file, cmd, self.arg_addr(arg, std::mem::size_of::<T>()))
        }
    }

    /// What a snapshot byte of the page at `va` may not say: never-mapped and guard pages are
    /// CPU errors without a device entry; the read-only canary is never writable.
    fn snapshot_rule(&self, va: u64) -> Option<(u8, u8)> {
        let never = va < LOW_LIMIT
            || (CANARY_VA..CANARY_VA + (1 << 30)).contains(&va)
            || (region_base(0)..region_base(0) + WIN_A - PG).contains(&va)
            || va == VA_LIMIT - PG
            || self.guards.contains(&va);
        if never {
            // (must have, must not have)
            return Some((
                uapi::ZG_SNAP_CPU_ERROR,
                uapi::ZG_SNAP_DEV_PRESENT | uapi::ZG_SNAP_CPU_VALID,
            ));
        }
        if (self.ro..self.ro + RO_W).contains(&va) {
            return Some((0, uapi::ZG_SNAP_DEV_WRITE | uapi::ZG_SNAP_CPU_WRITE));
        }
        None
    }

    fn exec(&self, ts: &mut ThreadState, who: &Who, call: &Call) {
        match *call {
            Call::Open { fd, hmm } => {
                self.open(who, fd, if hmm { Node::Hmm } else { Node::Zg });
            }
            Call::Close { fd } => self.close(who, fd),
            Call::GetInfo { fd, arg } => {
                let Some(f) = self.fd(fd) else {
                    return self.board.check(Check::NoFile, 1);
                };
                let mut info = ZgInfo::default();
                let r = self.issue(&f, uapi::ZG_IOC_GET_INFO, arg, &mut info);
                let must = pointer_or_node(arg, f.node).map_or(Must::Any, Must::Fail);
                let r = self.board.verdict(
                    who,
                    Api::GetInfo,
                    f.node,
                    r,
                    must,
                    format_args!("{call:?}"),
                );
                if r.is_ok() && arg == Ptr::Valid && info.ident != shared_regs::regs::IDENT_MAGIC {
                    self.board
                        .fail(who, format_args!("GET_INFO answered {info:x?}"));
                }
            }
            Call::Stats { fd, arg } => {
                let Some(f) = self.fd(fd) else {
                    return self.board.check(Check::NoFile, 1);
                };
                let mut s = ZgStats::default();
                let r = self.issue(&f, uapi::ZG_IOC_STATS, arg, &mut s);
                let must = pointer_or_node(arg, f.node)
                    .map_or(Must::Succeed("STATS always answers"), Must::Fail);
                let r =
                    self.board
                        .verdict(who, Api::Stats, f.node, r, must, format_args!("{call:?}"));
                if r.is_ok() && arg == Ptr::Valid {
                    self.board.judge_stats(who, &s, "in a STATS answer");
                }
            }
            Call::Map {
                fd,
                at,
                len,
                flags,
                arg,
                junk,
            } => {
                let Some(f) = self.fd(fd) else {
                    return self.board.check(Check::NoFile, 1);
                };
                let va = self.addr(at);
                let n = len.resolve(va, at);
                let mut m = ZgMap {
                    va,
                    len: n,
                    flags,
                    retries: junk as u32,
                    pages: junk,
                    huge: junk,
                    ..Default::default()
                };
                let must = if f.node == Node::Hmm {
                    Some(NOT_HMM)
                } else {
                    map_must_fail(va, n, flags, at, arg == Ptr::Valid)
                };
                let r = self.issue(&f, uapi::ZG_IOC_MAP, arg, &mut m);
                let _ = self.board.verdict(
                    who,
                    Api::Map,
                    f.node,
                    r,
                    must.map_or(Must::Any, Must::Fail),
                    format_args!("{call:?}: va {va:#x} len {n:#x} flags {flags:#x}"),
                );
            }
            Call::Dma {
                fd,
                op,
                flags,
                src,
                dst,
                len,
                aux,
                fill,
                arg,
                junk,
            } => {
                let Some(f) = self.fd(fd) else {
                    return self.board.check(Check::NoFile, 1);
                };
                let (s, d) = (self.addr(src), self.addr(dst));
                let opb = u8::try_from(op).unwrap_or(0);
                let reads = matches!(opb, DMA_COPY | DMA_READ | DMA_CHECKSUM | DMA_COMPARE);
                let n = if reads {
                    len.resolve(s, src)
                } else {
                    len.resolve(d, dst)
                };
                let (aux_v, aux_ok) = match opb {
                    DMA_READ => self.buf(ts, aux, n, true),
                    DMA_WRITE => self.buf(ts, aux, n, false),
                    _ => (fill, true),
                };
                let facts = DmaFacts {
                    op,
                    flags,
                    src: s,
                    dst: d,
                    len: n,
                    src_t: src,
                    dst_t: dst,
                    aux_ok,
                    arg_ok: arg == Ptr::Valid,
                };
                let must = if f.node == Node::Hmm {
                    Some(NOT_HMM)
                } else {
                    dma_must_fail(&facts)
                };
                let mut job = ZgDma {
                    op,
                    flags,
                    src: s,
                    dst: d,
                    len: n,
                    aux: aux_v,
                    status: junk as u32,
                    fault_reason: (junk >> 32) as u32,
                    faults: junk as u32,
                    error: (junk >> 16) as i32,
                    bytes_done: junk,
                    result: junk,
                    elapsed_ns: junk,
                    ..Default::default()
                };
                let r = self.issue(&f, uapi::ZG_IOC_DMA, arg, &mut job);
                let _ = self.board.verdict(
                    who,
                    Api::Dma,
                    f.node,
                    r,
                    must.map_or(Must::Any, Must::Fail),
                    format_args!("{call:?}: src {s:#x} dst {d:#x} len {n:#x} aux {aux_v:#x}"),
                );
            }
            Call::Snapshot {
                fd,
                at,
                npages,
                out,
                arg,
            } => {
                let Some(f) = self.fd(fd) else {
                    return self.board.check(Check::NoFile, 1);
                };
                let va = self.addr(at);
                let (out_v, out_ok) = self.buf(ts, out, npages, true);
                let must = if f.node == Node::Hmm {
                    Some(NOT_HMM)
                } else {
                    snapshot_must_fail(va, npages, out_ok, arg == Ptr::Valid)
                };
                let mut s = ZgSnapshot {
                    va,
                    npages,
                    out: out_v,
                    ..Default::default()
                };
                let r = self.issue(&f, uapi::ZG_IOC_SNAPSHOT, arg, &mut s);
                let r = self.board.verdict(
                    who,
                    Api::Snapshot,
                    f.node,
                    r,
                    must.map_or(Must::Any, Must::Fail),
                    format_args!("{call:?}: va {va:#x} npages {npages} out {out_v:#x}"),
                );
                if r.is_ok() && out == Ptr::Valid {
                    self.check_snapshot(ts, who, va, npages, call);
                }
            }
            Call::Unknown { fd, cmd, arg } => {
                let Some(f) = self.fd(fd) else {
                    return self.board.check(Check::NoFile, 1);
                };
                let ptr = if arg == Ptr::Valid {
                    ts.scratch()
                } else {
                    self.arg_addr(arg, 64)
                };
                let r = raw(&f.file, cmd, ptr);
                let _ = self.board.verdict(
                    who,
                    Api::Unknown,
                    f.node,
                    r,
                    Must::Fail(Cause {
                        why: "an ioctl number nobody serves",
                        // test_hmm answers a command it does not know with EINVAL.
                        errnos: if f.node == Node::Hmm {
                            INVAL
                        } else {
                            Errnos::of(&[ENOTTY])
                        },
                    }),
                    format_args!("{call:?}: ioctl {cmd:#010x} arg {ptr:#x}"),
                );
            }
            Call::Hmm {
                fd,
                cmd,
                at,
                npages,
                buf,
                arg,
                junk,
            } => self.hmm(
                ts,
                who,
                call,
                HmmCall {
                    fd,
                    cmd,
                    at,
                    npages,
                    buf,
                    arg,
                    junk,
                },
            ),
            Call::Private(j) => self.private(ts, who, &j),
            Call::PrivateMm { buf, op } => self.private_mm(ts, who, buf, op),
            Call::Mm {
                buf,
                op,
                first,
                pages,
            } => self.mm(buf, op, first, pages),
            Call::Fork {
                how,
                seed,
                delay_us,
            } => self.fork(ts, who, how, seed, delay_us),
        }
    }

    fn check_snapshot(&self, ts: &mut ThreadState, who: &Who, va: u64, npages: u64, call: &Call) {
        let bytes = &ts.scratch[..npages as usize];
        let mut checked = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let page = va + i as u64 * PG;
            if let Some((must, must_not)) = self.snapshot_rule(page) {
                checked += 1;
                if b & must != must || b & must_not != 0 {
                    self.board.fail(
                        who,
                        format_args!(
                            "SNAPSHOT says {} for page {page:#x}, which must have {:#x} and none of {:#x}; the call: {call:?}",
                            dev::snap_names(&[b]),
                            must,
                            must_not
                        ),
                    );
                    return;
                }
            }
        }
        self.board.check(Check::Snapshots, checked);
    }

    fn hmm(&self, ts: &mut ThreadState, who: &Who, call: &Call, h: HmmCall) {
        let Some(f) = self.fd(h.fd) else {
            return self.board.check(Check::NoFile, 1);
        };
        let addr = self.addr(h.at);
        let snap = h.cmd == HmmCmd::Snapshot;
        let need = if snap {
            h.npages
        } else {
            h.npages.saturating_mul(PG)
        };
        let (ptr, buf_ok) = self.buf(ts, h.buf, need, h.cmd != HmmCmd::Write);
        let facts = HmmFacts {
            cmd: h.cmd,
            addr,
            npages: h.npages,
            at: h.at,
            buf_ok,
            arg_ok: h.arg == Ptr::Valid,
        };
        let must = if f.node == Node::Zg {
            Some(Cause {
                why: "a test_hmm number on /dev/zapguard",
                errnos: Errnos::of(&[ENOTTY]),
            })
        } else {
            hmm_must_fail(&facts)
        };
        let mut c = HmmDmirrorCmd {
            addr,
            ptr,
            npages: h.npages,
            cpages: h.junk,
            faults: h.junk,
        };
        let r = self.issue(&f, h.cmd.number(), h.arg, &mut c);
        let r = self.board.verdict(
            who,
            h.cmd.api(),
            f.node,
            r,
            must.map_or(Must::Any, Must::Fail),
            format_args!("{call:?}: addr {addr:#x} ptr {ptr:#x}"),
        );
        // Pages nothing maps are errors in test_hmm's encoding too.
        if r.is_ok() && snap && h.buf == Ptr::Valid {
            let bytes = &ts.scratch[..h.npages as usize];
            for (i, &b) in bytes.iter().enumerate() {
                let page = addr + i as u64 * PG;
                let never = self
                    .snapshot_rule(page)
                    .is_some_and(|(m, _)| m == uapi::ZG_SNAP_CPU_ERROR);
                if never && b != hmm::HMM_DMIRROR_PROT_ERROR {
                    self.board.fail(
                        who,
                        format_args!(
                            "HMM_DMIRROR_SNAPSHOT says {b:#x} for never-mapped page {page:#x}; the call: {call:?}"
                        ),
                    );
                    return;
                }
            }
        }
    }

    /// A data-checked job on the thread's private buffers.
    fn private(&self, ts: &mut ThreadState, who: &Who, j: &PrivJob) {
        let Some(f) = self.first_zg() else {
            return self.board.check(Check::NoFile, 1);
        };
        let (soff, doff, len) = (j.soff as usize, j.doff as usize, j.len as usize);
        let mut data = Rng::new(j.seed);
        let src = seeded(data.next_u64(), len);
        ts.p0()[soff..soff + len].copy_from_slice(&src);
        if j.op == DMA_COMPARE {
            let plant = data.chance(500).then(|| data.below(len as u64) as usize);
            if let Some(p1) = ts.p1_mut() {
                p1[doff..doff + len].copy_from_slice(&src);
                if let Some(k) = plant {
                    p1[doff + k] ^= 0x5a;
                }
            }
        }
        let wdata = seeded(data.next_u64(), len);
        let fill = data.next_u64();
        let sh0 = ts.p0().to_vec();
        let sh1 = ts.p1().to_vec();
        let (p0, p1) = (ts.p0 + soff as u64, ts.p1 + doff as u64);
        let mut job = match j.op {
            DMA_COPY => dev::job(DMA_COPY, p0 as usize, p1 as usize, len, 0),
            DMA_FILL => dev::job(DMA_FILL, 0, p1 as usize, len, fill),
            DMA_WRITE => dev::job(DMA_WRITE, 0, p1 as usize, len, wdata.as_ptr() as u64),
            DMA_READ => dev::job(DMA_READ, p0 as usize, 0, len, ts.scratch()),
            DMA_CHECKSUM => dev::job(DMA_CHECKSUM, p0 as usize, 0, len, 0),
            _ => dev::job(DMA_COMPARE, p0 as usize, p1 as usize, len, 0),
        };
        if j.no_fault {
            job.flags = uapi::ZG_DMA_NO_FAULT;
        }
        let writes = matches!(j.op, DMA_COPY | DMA_FILL | DMA_WRITE);
        let ro = ts.p1_ro && writes;
        let must = if ro {
            Must::Fail(Cause {
                why: "a device write to read-only memory",
                // Without fault service the device's first fault ends the job: EFAULT.
                errnos: if j.no_fault { FAULT } else { ACCESS },
            })
        } else {
            Must::Any
        };
        let r = dev::dma(&f.file, job);
        let res = r.as_ref().map(drop).map_err(|(e, _)| errno_of(e));
        let d = match &r {
            Ok(d) | Err((_, d)) => *d,
        };
        let what = format_args!(
            "{j:?} on private buffers {:#x} (src) and {:#x} (dst, {}): {d:?}",
            ts.p0,
            ts.p1,
            if ts.p1_ro { "read-only" } else { "read-write" }
        );
        let _ = self.board.verdict(who, Api::Dma, Node::Zg, res, must, what);
        // A stalling job on memory it may access must succeed unless the device is out of
        // resources or failed.
        if let Err(e) = res {
            let resource = matches!(e, EBUSY | ENOMEM | EIO | ENODEV);
            if !ro && !j.no_fault && !resource {
                self.board.fail(
                    who,
                    format_args!(
                        "a job on this thread's own mapped memory failed with {}: {j:?}: {d:?}",
                        errno_name(e)
                    ),
                );
            }
        }
        // What the device must have written to P1: all of it on success, the `bytes_done`
        // prefix when the job ended on a fault (its status record was written), otherwise
        // at most the job's range.
        let src_now = &sh0[soff..soff + len];
        let moved: Option<Vec<u8>> = match j.op {
            DMA_COPY => Some(src_now.to_vec()),
            DMA_FILL => Some(fill_bytes(fill, len)),
            DMA_WRITE => Some(wdata.clone()),
            _ => None,
        };
        let p1_now = ts.p1().to_vec();
        let mut bad: Option<String> = None;
        if ts.p0().to_vec() != sh0 {
            bad = Some("the device changed the source buffer".into());
        }
        let outside_ok = p1_now[..doff] == sh1[..doff] && p1_now[doff + len..] == sh1[doff + len..];
        if bad.is_none() && !outside_ok {
            bad = Some("the device wrote outside the job's range".into());
        }
        match (&res, &moved) {
            (Ok(()), Some(m)) if bad.is_none() && p1_now[doff..doff + len] != m[..] => {
                bad = Some(format!(
                    "the destination holds other bytes than the job moved (first difference at {})",
                    first_diff(&p1_now[doff..doff + len], m)
                ));
            }
            (Ok(()), None) if bad.is_none() && p1_now != sh1 => {
                bad = Some("a job that only reads changed the destination buffer".into());
            }
            (Err(e), _) if bad.is_none() && (ro || !writes) && p1_now != sh1 => {
                bad = Some(format!(
                    "a failed job ({}) changed a buffer it may not write",
                    errno_name(*e)
                ));
            }
            (Err(e), Some(m)) if bad.is_none() && matches!(*e, EFAULT | EPERM) => {
                let done = d.bytes_done as usize;
                if done > len {
                    bad = Some(format!("bytes_done {done} > len {len}"));
                } else if p1_now[doff..doff + done] != m[..done]
                    || p1_now[doff + done..doff + len] != sh1[doff + done..doff + len]
                {
                    bad = Some(format!(
                        "a job that ended on a fault after {done} bytes left other bytes"
                    ));
                }
            }
            _ => {}
        }
        if bad.is_none() && res.is_ok() {
            let expect = match j.op {
                DMA_READ => (ts.scratch[..len] != *src_now).then_some("READ returned other bytes"),
                DMA_CHECKSUM => (d.result != fnv1a64(FNV_OFFSET, src_now))
                    .then_some("CHECKSUM differs from the CPU's"),
                DMA_COMPARE => (d.result != first_diff(src_now, &sh1[doff..doff + len]))
                    .then_some("COMPARE's first difference is wrong"),
                _ => (d.bytes_done != len as u64).then_some("bytes_done is not len"),
            };
            bad = expect.map(String::from);
        }
        match bad {
            Some(why) => self.board.fail(
                who,
                format_args!("data check: {why}: {j:?}: {d:?} (result {:#x})", d.result),
            ),
            None => self.board.check(Check::PrivateData, 1),
        }
    }

    fn private_mm(&self, ts: &mut ThreadState, who: &Who, buf: u8, op: PrivMm) {
        let addr = if buf == 0 { ts.p0 } else { ts.p1 };
        let (kind, r) = match op {
            PrivMm::DontNeed => (Op::PrivDontNeed, madvise(addr, PRIV_W, libc::MADV_DONTNEED)),
            PrivMm::Cold => (Op::PrivCold, madvise(addr, PRIV_W, libc::MADV_COLD)),
            PrivMm::Pageout => (Op::PrivPageout, madvise(addr, PRIV_W, libc::MADV_PAGEOUT)),
            PrivMm::Free => {
                if buf == 1 && ts.p1_ro {
                    return self.board.op(Op::PrivFree, false);
                }
                let r = madvise(addr, PRIV_W, libc::MADV_FREE);
                // Written again at once: a freed page the kernel has not dropped yet is kept
                // once written, so the buffer's contents stay what the CPU wrote.
                write_words(addr, PRIV_W, data_word);
                (Op::PrivFree, r)
            }
            PrivMm::Protect => {
                let prot = if ts.p1_ro {
                    libc::PROT_READ | libc::PROT_WRITE
                } else {
                    libc::PROT_READ
                };
                let r = mprotect(ts.p1, PRIV_W, prot);
                if r.is_ok() {
                    ts.p1_ro = !ts.p1_ro;
                }
                (Op::PrivProtect, r)
            }
        };
        if let Err(e) = r {
            // Nothing should refuse advice or protection on the thread's own buffers.
            if op != PrivMm::Pageout {
                self.board.fail(
                    who,
                    format_args!("{op:?} of private buffer {addr:#x}: {}", errno_name(e)),
                );
            }
        }
        self.board.op(kind, r.is_ok());
    }

    fn mm(&self, buf: u8, op: MmOp, first: u16, pages: u16) {
        let s = &self.shared[buf as usize % NSHARED];
        let mut st = s.st.lock().unwrap_or_else(|p| p.into_inner());
        let (at, whole_rw) = *st;
        let (first, pages) = clip(first, pages, s.w / PG);
        let (lo, n) = (at + first * PG, pages * PG);
        let whole = n == s.w;
        let other = if at == s.a { s.b } else { s.a };
        let (kind, r) = match op {
            MmOp::Munmap => {
                // SAFETY: part of this buffer's current window, never referenced by the CPU
                // except under this lock while known read-write.
                let r = unsafe { libc::munmap(lo as *mut _, n as usize) };
                st.1 = false;
                (Op::Munmap, if r == 0 { Ok(()) } else { Err(last_errno()) })
            }
            MmOp::Mmap { alt } => {
                let to = if alt { other } else { at };
                let r = map_at(to, s.w, true);
                if r.is_ok() {
                    if s.w == HUGE_W {
                        let _ = madvise(to, s.w, libc::MADV_HUGEPAGE);
                    }
                    *st = (to, true);
                    s.cur.store(to, Relaxed);
                    write_words(to, s.w, data_word);
                }
                (Op::Mmap, r)
            }
            MmOp::Mprotect(prot) => {
                let r = mprotect(lo, n, prot);
                let rw = prot == libc::PROT_READ | libc::PROT_WRITE;
                st.1 = match (&r, rw) {
                    (Ok(()), true) => whole_rw || whole,
                    _ => false,
                };
                (Op::Mprotect, r)
            }
            MmOp::Madvise(advice) => {
                let kind = match advice {
                    libc::MADV_DONTNEED => Op::DontNeed,
                    libc::MADV_FREE => Op::Free,
                    libc::MADV_PAGEOUT => Op::Pageout,
                    _ => Op::Cold,
                };
                (kind, madvise(lo, n, advice))
            }
            MmOp::Collapse => (Op::Collapse, madvise(at, s.w, dev::MADV_COLLAPSE)),
            MmOp::Mremap { dontunmap } => {
                let flags = libc::MREMAP_MAYMOVE
                    | libc::MREMAP_FIXED
                    | if dontunmap { libc::MREMAP_DONTUNMAP } else { 0 };
                // SAFETY: moves this buffer's window to its other window (whatever was there
                // is the buffer's own leftover); the guards around both stay.
                let p = unsafe {
                    libc::mremap(
                        at as *mut _,
                        s.w as usize,
                        s.w as usize,
                        flags,
                        other as *mut libc::c_void,
                    )
                };
                let r = if p == libc::MAP_FAILED {
                    Err(last_errno())
                } else {
                    st.0 = other;
                    s.cur.store(other, Relaxed);
                    Ok(())
                };
                let kind = if dontunmap {
                    Op::MremapDontUnmap
                } else {
                    Op::Mremap
                };
                (kind, r)
            }
            MmOp::Touch => {
                if whole_rw {
                    write_words(lo, n, data_word);
                }
                (Op::Touch, Ok(()))
            }
        };
        drop(st);
        self.board.op(kind, r.is_ok());
    }

    fn fork(&self, ts: &mut ThreadState, who: &Who, how: ForkHow, seed: u64, delay_us: u32) {
        let fds = self.all_fds();
        let sh0 = ts.p0().to_vec();
        let sh1 = ts.p1().to_vec();
        let child_who = match *who {
            Who::Thread { p, t, i } => Who::ForkChild { p, t, i },
            w => w,
        };
        // SAFETY: the child runs `fork_child`, which takes no lock of this process and prints
        // nothing (the parent's other threads may hold them), and `_exit`s.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return self
                .board
                .fail(who, format_args!("fork: {}", errno_name(last_errno())));
        }
        if pid == 0 {
            // A panic must not unwind out of this copy of the parent's thread.
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.fork_child(ts, &child_who, how, seed, delay_us, &fds)
            }))
            .unwrap_or(101);
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        if how == ForkHow::Killed {
            std::thread::sleep(Duration::from_micros(delay_us.into()));
            // SAFETY: our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let status = reap(pid);
        let kind = match how {
            ForkHow::Calls => Op::Fork,
            ForkHow::ExitMidDma => Op::ForkExitMidDma,
            ForkHow::Killed => Op::ForkKilled,
        };
        let killed = libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL;
        let clean = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        self.board.op(kind, clean || killed);
        if !(clean || (killed && how == ForkHow::Killed)) {
            self.board.fail(
                who,
                format_args!("fork child ({how:?}) ended with status {status:#x}"),
            );
        }
        if ts.p0().to_vec() != sh0 || ts.p1().to_vec() != sh1 {
            self.board.fail(
                who,
                format_args!(
                    "a fork child's device writes reached the parent's private buffers ({how:?})"
                ),
            );
        } else {
            self.board.check(Check::Cow, 1);
        }
    }

    /// The child of a fork: its parent's files must refuse it, its own context works on its
    /// copy of the buffers; then it ends as `how` says.
    fn fork_child(
        &self,
        ts: &ThreadState,
        who: &Who,
        how: ForkHow,
        seed: u64,
        delay_us: u32,
        fds: &[Fd],
    ) -> i32 {
        let mut r = Rng::new(seed);
        let b = self.board;
        let foreign = Must::Fail(Cause {
            why: "a context used from another process",
            errnos: Errnos::of(&[EPERM]),
        });
        if let Some(f) = fds.iter().find(|f| f.node == Node::Zg) {
            let m = dev::map(&f.file, ts.p0 as usize, PRIV_W as usize, 0);
            let _ = b.verdict(
                who,
                Api::Map,
                Node::Zg,
                m.map(drop).map_err(|e| errno_of(&e)),
                foreign,
                format_args!("MAP of the parent's buffer {:#x} through its file", ts.p0),
            );
            let j = dev::dma(
                &f.file,
                dev::job(DMA_FILL, 0, ts.p1 as usize, 64, r.next_u64()),
            );
            let _ = b.verdict(
                who,
                Api::Dma,
                Node::Zg,
                j.map(drop).map_err(|(e, _)| errno_of(&e)),
                foreign,
                format_args!("DMA FILL of {:#x} through the parent's file", ts.p1),
            );
            let s = dev::snapshot(&f.file, ts.p0 as usize, 1);
            let _ = b.verdict(
                who,
                Api::Snapshot,
                Node::Zg,
                s.map(drop).map_err(|e| errno_of(&e)),
                foreign,
                format_args!("SNAPSHOT through the parent's file"),
            );
        }
        if let Some(f) = fds.iter().find(|f| f.node == Node::Hmm) {
            let mut out = [0u8; 64];
            let mut c = HmmDmirrorCmd {
                addr: ts.p0,
                ptr: out.as_mut_ptr() as u64,
                npages: 1,
                ..Default::default()
            };
            let res = dev::ioctl_rw(&f.file, hmm::HMM_DMIRROR_SNAPSHOT, &mut c);
            let _ = b.verdict(
                who,
                Api::HmmSnapshot,
                Node::Hmm,
                res.map(drop).map_err(|e| errno_of(&e)),
                foreign,
                format_args!("HMM_DMIRROR_SNAPSHOT through the parent's file"),
            );
        }
        let own = dev::open();
        let _ = b.verdict(
            who,
            Api::Open,
            Node::Zg,
            own.as_ref().map(drop).map_err(errno_of),
            Must::Any,
            format_args!("open in a fork child"),
        );
        let Ok(g) = own else {
            return i32::from(b.failed());
        };
        let pattern = r.next_u64();
        let j = dev::dma(
            &g,
            dev::job(DMA_FILL, 0, ts.p1 as usize, PRIV_W as usize, pattern),
        );
        let ok = b.verdict(
            who,
            Api::Dma,
            Node::Zg,
            j.map(drop).map_err(|(e, _)| errno_of(&e)),
            if ts.p1_ro {
                Must::Fail(Cause {
                    why: "a device write to read-only memory",
                    errnos: ACCESS,
                })
            } else {
                Must::Any
            },
            format_args!("DMA FILL of the child's copy of {:#x}", ts.p1),
        );
        if ok.is_ok() && !ts.p1_ro {
            if ts.p1() != fill_bytes(pattern, PRIV_W as usize) {
                b.fail(
                    who,
                    format_args!("the child does not see its device write to {:#x}", ts.p1),
                );
            } else {
                b.check(Check::PrivateData, 1);
            }
        }
        let huge = &self.shared[NSHARED - 1];
        let job = dev::job(
            DMA_CHECKSUM,
            huge.cur.load(Relaxed) as usize,
            0,
            huge.w as usize,
            0,
        );
        match how {
            ForkHow::Calls => i32::from(b.failed()),
            ForkHow::ExitMidDma => {
                let g = Arc::new(g);
                let g2 = g.clone();
                let jobs = std::thread::Builder::new().spawn(move || loop {
                    let _ = dev::dma(&g2, job);
                });
                if let Err(e) = jobs {
                    b.fail(who, format_args!("a fork child cannot start a thread: {e}"));
                }
                std::thread::sleep(Duration::from_micros(delay_us.into()));
                i32::from(b.failed())
            }
            ForkHow::Killed => loop {
                let _ = dev::dma(&g, job);
            },
        }
    }

    /// Issues this thread's share of the calls. A generated call whose file slot is closed
    /// would issue nothing: it is counted as skipped and does not use up the budget, so the
    /// budget is calls made (`i` still numbers the generated sequence, which the seed fixes).
    fn run_thread(&self, cfg: &Config, t: usize) {
        let seed = thread_seed(cfg.seed, self.idx, t);
        let mut r = Rng::new(seed);
        let mut ts = ThreadState::new(t);
        let budget = cfg.calls_for(self.idx, t);
        let (mut i, mut issued) = (0, 0);
        while issued < budget && !self.board.failed() {
            let call = gen_call(&mut r);
            i += 1;
            if call.file_slot().is_some_and(|s| self.fd(s).is_none()) {
                self.board.check(Check::NoFile, 1);
                continue;
            }
            let who = Who::Thread {
                p: self.idx,
                t,
                i: i - 1,
            };
            self.exec(&mut ts, &who, &call);
            issued += 1;
        }
    }

    /// The end of a fuzzer process: every context's counters, the guard pages, the read-only
    /// canary; the files stay open (the process exits with them).
    fn finish(&self) -> i32 {
        let who = Who::Process(self.idx);
        for f in self.all_fds() {
            if f.node == Node::Zg {
                let mut s = ZgStats::default();
                match dev::ioctl_rw(&f.file, uapi::ZG_IOC_STATS, &mut s) {
                    Ok(_) => self.board.judge_stats(&who, &s, "at the end"),
                    Err(e) => self.board.fail(&who, format_args!("STATS at the end: {e}")),
                }
            }
        }
        for &g in &self.guards {
            if let Err(e) = mprotect(g, PG, libc::PROT_READ) {
                self.board.fail(
                    &who,
                    format_args!(
                        "mprotect(PROT_READ) of guard page {g:#x}: {}",
                        errno_name(e)
                    ),
                );
                continue;
            }
            if let Some((a, v)) = first_bad_word(g, PG, guard_word) {
                self.board.fail(
                    &who,
                    format_args!(
                        "guard page {g:#x} changed: {v:#018x} at {a:#x}, expected {:#018x}",
                        guard_word(a)
                    ),
                );
            } else {
                self.board.check(Check::GuardPages, 1);
            }
        }
        if let Some((a, v)) = first_bad_word(self.ro, RO_W, ro_word) {
            self.board.fail(
                &who,
                format_args!(
                    "read-only canary changed: {v:#018x} at {a:#x}, expected {:#018x}",
                    ro_word(a)
                ),
            );
        } else {
            self.board.check(Check::RoPages, RO_W / PG);
        }
        if !unmapped(CANARY_VA, CANARY_LEN) {
            self.board.fail(
                &who,
                format_args!("the canary range {CANARY_VA:#x} is mapped here"),
            );
        }
        i32::from(self.board.failed())
    }
}

/// A test_hmm call's fields.
struct HmmCall {
    fd: u8,
    cmd: HmmCmd,
    at: Target,
    npages: u64,
    buf: Ptr,
    arg: Ptr,
    junk: u64,
}

fn fuzzer_main(board: &Board, cfg: &Config, p: usize) -> i32 {
    let who = Who::Process(p);
    let proc = match Proc::new(p, board, true) {
        Ok(proc) => proc,
        Err(e) => {
            board.fail(&who, format_args!("setting up: {e}"));
            return 1;
        }
    };
    if !unmapped(CANARY_VA, CANARY_LEN) {
        board.fail(
            &who,
            format_args!("the canary range {CANARY_VA:#x} is mapped here"),
        );
        return 1;
    }
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let proc = &proc;
            s.spawn(move || proc.run_thread(cfg, t));
        }
    });
    proc.finish()
}

// ---------------------------------------------------------------------------------------------
// The other children
// ---------------------------------------------------------------------------------------------

/// Holds its pattern at [`CANARY_VA`], mirrored writable in its own context and read by device
/// checksums until the test is done; then checks it.
fn canary_main(board: &Board) -> i32 {
    let who = Who::Canary;
    if let Err(e) = map_at(CANARY_VA, CANARY_LEN, false) {
        board.fail(
            &who,
            format_args!("mmap at {CANARY_VA:#x}: {}", errno_name(e)),
        );
        return 1;
    }
    write_words(CANARY_VA, CANARY_LEN, canary_word);
    // SAFETY: the canary mapping made above, read-write.
    let bytes = unsafe { std::slice::from_raw_parts(CANARY_VA as *const u8, CANARY_LEN as usize) };
    let sum = fnv1a64(FNV_OFFSET, bytes);
    let f = match dev::open() {
        Ok(f) => f,
        Err(e) => {
            board.fail(&who, format_args!("open: {e}"));
            return 1;
        }
    };
    let m = dev::map(
        &f,
        CANARY_VA as usize,
        CANARY_LEN as usize,
        uapi::ZG_MAP_WRITE,
    );
    let _ = board.verdict(
        &who,
        Api::Map,
        Node::Zg,
        m.map(drop).map_err(|e| errno_of(&e)),
        Must::Succeed("the canary mirrors its own memory"),
        format_args!("MAP of the canary"),
    );
    board.canary_ready.store(1, Relaxed);
    let job = dev::job(DMA_CHECKSUM, CANARY_VA as usize, 0, CANARY_LEN as usize, 0);
    let mut rounds = 0;
    while board.canary_stop.load(Relaxed) == 0 && !board.failed() {
        match dev::dma(&f, job) {
            Ok(d) if d.result == sum => rounds += 1,
            Ok(d) => board.fail(
                &who,
                format_args!(
                    "the device's checksum of the canary is {:#x}, not {sum:#x}",
                    d.result
                ),
            ),
            Err((e, d)) => board.fail(
                &who,
                format_args!("a checksum of the canary failed: {e}: {d:?}"),
            ),
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    board.check(Check::CanaryChecksums, rounds);
    if let Some((a, v)) = first_bad_word(CANARY_VA, CANARY_LEN, canary_word) {
        board.fail(
            &who,
            format_args!(
                "canary changed: {v:#018x} at {a:#x}, expected {:#018x}",
                canary_word(a)
            ),
        );
    } else {
        board.check(Check::CanaryPages, CANARY_LEN / PG);
    }
    match dev::stats(&f) {
        Ok(s) => board.judge_stats(&who, &s, "of the canary"),
        Err(e) => board.fail(&who, format_args!("STATS: {e}")),
    }
    i32::from(board.failed())
}

/// Drops to uid/gid 65534, opens `/dev/zapguard` and mixes ordinary calls with attempts to
/// open its context's debugfs `inject` file for writing: each must fail with `EACCES`.
fn unpriv_main(board: &Board, cfg: &Config) -> i32 {
    let who = Who::Unpriv(0);
    // SAFETY: credential changes of this single-threaded child.
    let dropped = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setgid(UNPRIV_ID) == 0
            && libc::setuid(UNPRIV_ID) == 0
    };
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if !dropped || uid != UNPRIV_ID || gid != UNPRIV_ID {
        board.fail(
            &who,
            format_args!("could not drop privileges (euid {uid}, egid {gid})"),
        );
        return 1;
    }
    let f = match dev::open() {
        Ok(f) => f,
        Err(e) => {
            board.fail(&who, format_args!("open as uid {UNPRIV_ID}: {e}"));
            return 1;
        }
    };
    board.count(Api::Open, Ok(()));
    let mut buf = match dev::Mapping::anon(4 * PG as usize) {
        Ok(m) => m,
        Err(e) => {
            board.fail(&who, format_args!("mmap: {e}"));
            return 1;
        }
    };
    buf.bytes_mut().fill(0x11);
    // Where a test build keeps this context's `inject` file (the PCI name is public in sysfs).
    let inject_path = match (crate::bound_devices(), dev::stats(&f)) {
        (Ok(d), Ok(st)) if d.len() == 1 => {
            format!("{}/zapguard-{}/{}/inject", dev::DEBUGFS, d[0], st.asid)
        }
        (d, st) => {
            board.fail(&who, format_args!("device name {d:?}, STATS {st:?}"));
            return 1;
        }
    };
    let mut r = Rng::new(derive(cfg.seed, UNPRIV_STREAM));
    for i in 0..cfg.unpriv_calls() {
        if board.failed() {
            break;
        }
        let who = Who::Unpriv(i);
        match r.below(8) {
            0..=3 => {
                let res = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&inject_path)
                    .map(drop);
                let _ = board.verdict(
                    &who,
                    Api::DebugfsUnpriv,
                    Node::Zg,
                    res.map_err(|e| errno_of(&e)),
                    Must::Fail(Cause {
                        why: "the debugfs inject file without root",
                        errnos: Errnos::of(&[EACCES]),
                    }),
                    format_args!("open({inject_path}) for writing"),
                );
            }
            4 => {
                let res = dev::get_info(&f).map(drop).map_err(|e| errno_of(&e));
                let _ = board.verdict(
                    &who,
                    Api::GetInfo,
                    Node::Zg,
                    res,
                    Must::Any,
                    format_args!("GET_INFO"),
                );
            }
            5 => match dev::stats(&f) {
                Ok(s) => {
                    board.count(Api::Stats, Ok(()));
                    board.judge_stats(&who, &s, "of the unprivileged child");
                }
                Err(e) => {
                    let _ = board.verdict(
                        &who,
                        Api::Stats,
                        Node::Zg,
                        Err(errno_of(&e)),
                        Must::Succeed("STATS always answers"),
                        format_args!("STATS"),
                    );
                }
            },
            6 => {
                let flags = if r.chance(500) { uapi::ZG_MAP_WRITE } else { 0 };
                let res = dev::map(&f, buf.addr, buf.len, flags)
                    .map(drop)
                    .map_err(|e| errno_of(&e));
                let _ = board.verdict(
                    &who,
                    Api::Map,
                    Node::Zg,
                    res,
                    Must::Any,
                    format_args!("MAP of its buffer"),
                );
            }
            _ => {
                let pattern = r.next_u64();
                let res = dev::dma(&f, dev::job(DMA_FILL, 0, buf.addr, buf.len, pattern));
                let ok = board.verdict(
                    &who,
                    Api::Dma,
                    Node::Zg,
                    res.map(drop).map_err(|(e, _)| errno_of(&e)),
                    Must::Any,
                    format_args!("DMA FILL of its buffer"),
                );
                if ok.is_ok() {
                    if buf.bytes() != fill_bytes(pattern, buf.len) {
                        board.fail(&who, format_args!("its FILL is not in its buffer"));
                    } else {
                        board.check(Check::PrivateData, 1);
                    }
                }
            }
        }
    }
    i32::from(board.failed())
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

fn exited_cleanly(status: i32) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

fn reap(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid || last_errno() != libc::EINTR {
            return status;
        }
    }
}

/// `/dev/zapguard` open to everyone while the fuzzer runs (the unprivileged child opens it),
/// its mode restored afterwards.
struct OpenToAll(u32);

impl OpenToAll {
    fn new() -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(dev::DEV_PATH).map_err(|e| format!("{}: {e}", dev::DEV_PATH))?;
        let old = meta.permissions().mode() & 0o7777;
        std::fs::set_permissions(dev::DEV_PATH, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| format!("chmod {}: {e}", dev::DEV_PATH))?;
        Ok(Self(old))
    }
}

impl Drop for OpenToAll {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dev::DEV_PATH, std::fs::Permissions::from_mode(self.0));
    }
}

/// The guest test: see the module documentation.
pub fn uapi_fuzz() -> Result<(), String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cfg = Config::from_cmdline(&cmdline, clock_seed())?;
    println!("ZAPGUARD-FUZZ seed={} calls={}", cfg.seed, cfg.calls);
    println!(
        "# {PROCS} processes x {THREADS} threads, {} calls per thread; an unprivileged child ({} calls) and a canary child at {CANARY_VA:#x}; replay: {}",
        cfg.calls_for(0, 0),
        cfg.unpriv_calls(),
        cfg.replay()
    );
    let start = Instant::now();
    let baseline = crate::mirror::device_violations()?;
    let mem = BoardMem::new().map_err(|e| format!("mmap: {e}"))?;
    let board = mem.board();
    board.init(&cfg, baseline);
    let run = run_children(board, &cfg);
    let after = crate::mirror::device_violations();
    let health = device_works();
    let wall = start.elapsed();
    let tally = board.tally();
    for line in tally.lines() {
        println!("{line}");
    }
    println!(
        "ZAPGUARD-FUZZ done: seed={} calls={} ({} ioctls and opens in all), {} failures, device violations {baseline} -> {}, {:.1} s",
        cfg.seed,
        cfg.calls,
        tally.ioctls(),
        board.failures.load(Relaxed),
        after.as_ref().map_or_else(|e| e.clone(), |a| a.to_string()),
        wall.as_secs_f64()
    );
    println!(
        "# uapi_fuzz: {} calls in {:.1} s, {} checks passed",
        tally.ioctls(),
        wall.as_secs_f64(),
        tally.checks.iter().sum::<u64>()
    );
    let mut problems = vec![];
    if let Err(e) = run {
        problems.push(e);
    }
    if let Some(m) = board.message() {
        problems.push(m);
    }
    problems.extend(tally.too_few_successes());
    match after {
        Ok(a) if a != baseline => problems.push(format!(
            "the device counted {} validator violation(s) during the fuzzer's run",
            a - baseline
        )),
        Ok(_) => {}
        Err(e) => problems.push(e),
    }
    if let Err(e) = health {
        problems.push(format!("the device does not work after the fuzzer: {e}"));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let replay = format!("replay: {}", cfg.replay());
    println!("ZAPGUARD-FUZZ FAILED; {replay}");
    problems.push(replay);
    Err(problems.join("\n"))
}

/// Forks the children, waits for them, stops the canary last.
fn run_children(board: &Board, cfg: &Config) -> Result<(), String> {
    let mode = OpenToAll::new()?;
    let canary = fork_child(|| canary_main(board))?;
    let t = Instant::now();
    let mut canary_up = false;
    while t.elapsed() < Duration::from_secs(20) {
        if board.canary_ready.load(Relaxed) == 1 {
            canary_up = true;
            break;
        }
        let mut status = 0;
        // SAFETY: polling our own child.
        if unsafe { libc::waitpid(canary, &mut status, libc::WNOHANG) } == canary {
            return Err(format!(
                "the canary child ended at its start (status {status:#x})"
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut pids = vec![];
    let mut res = if canary_up {
        Ok(())
    } else {
        Err("the canary child did not get ready".to_string())
    };
    if res.is_ok() {
        for p in 0..PROCS {
            match fork_child(|| fuzzer_main(board, cfg, p)) {
                Ok(pid) => pids.push((pid, format!("fuzzer process {p}"))),
                Err(e) => res = Err(e),
            }
        }
        match fork_child(|| unpriv_main(board, cfg)) {
            Ok(pid) => pids.push((pid, "unprivileged child".to_string())),
            Err(e) => res = Err(e),
        }
    }
    for (pid, what) in pids {
        let status = reap(pid);
        if !exited_cleanly(status) && !board.failed() {
            board.fail(
                &Who::Test,
                format_args!("{what} ended with status {status:#x}"),
            );
        }
    }
    board.canary_stop.store(1, Relaxed);
    let status = reap(canary);
    if !exited_cleanly(status) && !board.failed() {
        board.fail(
            &Who::Test,
            format_args!("the canary child ended with status {status:#x}"),
        );
    }
    drop(mode);
    res
}

/// A fresh context still maps, writes and reads.
fn device_works() -> Result<(), String> {
    let f = crate::mirror::open()?;
    let mut m = dev::Mapping::anon(4 * PG as usize).map_err(|e| e.to_string())?;
    m.bytes_mut().fill(1);
    crate::mirror::map(&f, &m, true)?;
    crate::mirror::run(&f, crate::mirror::fill_job(m.addr, m.len, 0x77))?;
    if m.bytes().iter().any(|&b| b != 0x77) {
        return Err("a device FILL is not in memory".into());
    }
    crate::mirror::clean(&f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_its_reference() {
        // The reference implementation's first outputs for seed 0 and 1234567.
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        let mut r = Rng::new(1_234_567);
        assert_eq!(r.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(r.next_u64(), 3_203_168_211_198_807_973);
    }

    #[test]
    fn seeds_are_deterministic_and_distinct() {
        let mut all = vec![];
        for p in 0..PROCS {
            for t in 0..THREADS {
                assert_eq!(thread_seed(42, p, t), thread_seed(42, p, t));
                all.push(thread_seed(42, p, t));
            }
        }
        all.push(derive(42, UNPRIV_STREAM));
        let mut sorted = all.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), all.len());
        assert_ne!(thread_seed(42, 0, 0), thread_seed(43, 0, 0));
    }

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

    #[test]
    fn calls_split_exactly() {
        for calls in [0, 1, 7, 100_000, 1_000_003] {
            let cfg = Config { calls, seed: 1 };
            let sum: u64 = (0..PROCS)
                .flat_map(|p| (0..THREADS).map(move |t| (p, t)))
                .map(|(p, t)| cfg.calls_for(p, t))
                .sum();
            assert_eq!(sum, calls);
        }
    }

    #[test]
    fn cmdline_words() {
        let c = Config::from_cmdline("console=ttyS0 zg.filter=uapi_fuzz", 5).unwrap();
        assert_eq!(
            c,
            Config {
                calls: DEFAULT_CALLS,
                seed: 5
            }
        );
        let c = Config::from_cmdline("a zg.fuzz_calls=1000000 zg.fuzz_seed=0xff b", 5).unwrap();
        assert_eq!(
            c,
            Config {
                calls: 1_000_000,
                seed: 255
            }
        );
        let c = Config::from_cmdline("zg.fuzz_seed=18446744073709551615", 5).unwrap();
        assert_eq!(c.seed, u64::MAX);
        assert!(Config::from_cmdline("zg.fuzz_calls=lots", 5).is_err());
        assert_eq!(
            c.replay(),
            format!("just fuzz-guest {DEFAULT_CALLS} --seed {}", u64::MAX)
        );
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

    /// The read-only pattern is no valid structure: an argument pointer to it must fail.
    #[test]
    fn read_only_pattern_is_no_valid_argument() {
        for a in (0..RO_W)
            .step_by(8)
            .map(|o| region_base(RO_REGION) + WIN_A + o)
        {
            let w = ro_word(a);
            assert!(w as u32 > u32::from(DMA_COMPARE), "a DMA op");
            assert_ne!(w % PG, 0, "an aligned MAP/SNAPSHOT address");
        }
    }

    fn normalise(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// Each allowed errno quotes the README line that documents it.
    #[test]
    fn table_quotes_the_readme() {
        let readme = normalise(include_str!("../../README.md"));
        for row in TABLE {
            for (e, quote) in row.allowed {
                assert!(
                    readme.contains(&normalise(quote)),
                    "{:?} on {:?}: README.md has no `{quote}`",
                    row.apis,
                    row.node
                );
                // The quote names the errno, or is a clause of the README row that does.
                let (q, name) = (normalise(quote), errno_name(*e));
                let at = readme.find(&q).unwrap_or(0);
                let in_row = readme[..at].rfind("| `E").is_some_and(|s| {
                    let row = &readme[s..at];
                    row.starts_with(&format!("| `{name}` |")) && !row.contains("| |")
                });
                assert!(
                    q.contains(name) || in_row,
                    "the quote for {name} is not from its README row: {quote}"
                );
            }
        }
    }

    #[test]
    fn table_covers_every_call_once() {
        for api in APIS {
            for node in [Node::Zg, Node::Hmm] {
                let rows = TABLE
                    .iter()
                    .filter(|r| r.node == node && r.apis.contains(&api))
                    .count();
                assert!(rows <= 1, "{api} on {node}: {rows} rows");
                let needed = !matches!(
                    (api, node),
                    (Api::Close, _) | (Api::Open, Node::Hmm) | (Api::OpenHmm, Node::Zg)
                );
                assert_eq!(rows == 1, needed, "{api} on {node}");
            }
        }
        let names = |a, n| {
            let mut v: Vec<i32> = allowed(a, n).iter().map(|(e, _)| *e).collect();
            v.dedup();
            v
        };
        assert_eq!(names(Api::Unknown, Node::Zg), vec![ENOTTY]);
        assert_eq!(names(Api::HmmRead, Node::Zg), vec![ENOTTY]);
        assert_eq!(names(Api::DebugfsUnpriv, Node::Zg), vec![EACCES]);
        assert_eq!(names(Api::Stats, Node::Zg), vec![EFAULT, EINVAL, E2BIG]);
        assert_eq!(names(Api::Dma, Node::Hmm), vec![EINVAL]);
        assert!(allowed(Api::GetInfo, Node::Zg)
            .iter()
            .all(|(e, _)| *e != EPERM));
    }

    fn shared(off: u32) -> Target {
        Target::Shared { buf: 0, off }
    }

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

    /// mm operations stay inside the window; windows, guards and holes never overlap.
    #[test]
    fn layout_and_clipping() {
        for (first, pages) in [(0, 0), (u16::MAX, u16::MAX), (15, 3), (3, 100)] {
            for wp in [SMALL_W / PG, HUGE_W / PG, 1] {
                let (f, n) = clip(first, pages, wp);
                assert!(n >= 1 && f + n <= wp, "{first} {pages} {wp}");
            }
        }
        let mut spans: Vec<(u64, u64)> = vec![];
        let regions = NSHARED + 1 + 2 * THREADS;
        for r in 0..regions {
            let w = if r < NSHARED {
                shared_w(r as u8)
            } else if r == RO_REGION {
                RO_W
            } else {
                PRIV_W
            };
            for win in [WIN_A, WIN_B] {
                let a = region_base(r) + win;
                spans.push((a - PG, a + w + PG));
                assert!(a + w + PG <= region_base(r + 1));
            }
            if r == NSHARED - 1 {
                assert_eq!((region_base(r) + WIN_A) % HUGE_W, 0);
                assert_eq!((region_base(r) + WIN_B) % HUGE_W, 0);
            }
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{w:x?}");
        }
        assert!(hole(255) + PG < region_base(0) + WIN_A - PG);
        const { assert!(CANARY_VA + CANARY_LEN < ARENA) };
        assert!(region_base(regions) < VA_LIMIT);
    }

    #[test]
    fn expected_data() {
        assert_eq!(
            fill_bytes(0x0807_0605_0403_0201, 10),
            vec![1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
        );
        assert_eq!(first_diff(b"abcd", b"abXd"), 2);
        assert_eq!(first_diff(b"abcd", b"abcd"), u64::MAX);
        assert_eq!(seeded(5, 13), seeded(5, 13));
        assert_eq!(seeded(5, 13).len(), 13);
    }

    #[test]
    fn enum_indexes_match_their_tables() {
        for (i, api) in APIS.iter().enumerate() {
            assert_eq!(*api as usize, i);
        }
        for (i, (op, _)) in OPS.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
        for (i, (c, _)) in CHECKS.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    /// Runs `f` in a forked child (the arena lives at fixed addresses); its exit status.
    fn in_child(f: impl FnOnce() -> i32) -> i32 {
        let pid = fork_child(f).unwrap();
        let status = reap(pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// The real mm operations of many generated calls (no device on the host: every ioctl is
    /// skipped for want of a file) leave every guard page and the read-only canary alone, never
    /// touch memory that is not read-write (no SIGSEGV), and the end checks pass.
    #[test]
    fn mm_operations_stay_in_their_windows() {
        let mem = BoardMem::new().unwrap();
        let b = mem.board();
        b.init(&Config { calls: 0, seed: 5 }, 0);
        let code = in_child(|| {
            let proc = Proc::new(0, b, false).unwrap();
            let mut ts = ThreadState::new(0);
            let mut r = Rng::new(5);
            let mut i = 0;
            while i < 6000 {
                let call = gen_call(&mut r);
                if matches!(call, Call::Fork { .. } | Call::Open { .. }) {
                    continue;
                }
                proc.exec(&mut ts, &Who::Thread { p: 0, t: 0, i }, &call);
                i += 1;
            }
            proc.finish()
        });
        assert_eq!(code, 0, "{:?}", b.message());
        let t = b.tally();
        assert_eq!(
            t.checks[Check::GuardPages as usize],
            4 * NSHARED as u64 + 2 + 4 * THREADS as u64
        );
        assert_eq!(t.checks[Check::RoPages as usize], RO_W / PG);
        for op in [
            Op::Munmap,
            Op::Mmap,
            Op::Mprotect,
            Op::DontNeed,
            Op::Mremap,
            Op::PrivProtect,
        ] {
            assert!(
                t.ops[op as usize][0] > 0,
                "{op:?} never succeeded: {:?}",
                t.ops
            );
        }
    }

    /// A changed guard page or read-only canary fails the end checks.
    #[test]
    fn a_changed_canary_fails() {
        for what in ["guard", "ro"] {
            let mem = BoardMem::new().unwrap();
            let b = mem.board();
            b.init(&Config { calls: 0, seed: 6 }, 0);
            let code = in_child(|| {
                let proc = Proc::new(1, b, false).unwrap();
                let at = if what == "guard" {
                    proc.guards[3]
                } else {
                    proc.ro + 8
                };
                mprotect(at & !(PG - 1), PG, libc::PROT_READ | libc::PROT_WRITE).unwrap();
                // SAFETY: the page was just made writable; it is this child's own.
                unsafe {
                    let b = std::ptr::read_volatile(at as *const u8);
                    std::ptr::write_volatile(at as *mut u8, b ^ 0x5a);
                }
                proc.finish()
            });
            assert_eq!(code, 1, "{what}: {:?}", b.message());
            let msg = b.message().unwrap();
            assert!(msg.contains("changed"), "{what}: {msg}");
        }
    }

    #[test]
    fn board_counts_and_keeps_the_first_failure() {
        let mem = BoardMem::new().unwrap();
        let b = mem.board();
        b.init(
            &Config {
                calls: 10,
                seed: 77,
            },
            0,
        );
        let who = Who::Thread { p: 1, t: 0, i: 5 };
        let _ = b.verdict(
            &who,
            Api::Dma,
            Node::Zg,
            Err(EFAULT),
            Must::Any,
            format_args!("x"),
        );
        let _ = b.verdict(
            &who,
            Api::Dma,
            Node::Zg,
            Ok(()),
            Must::Any,
            format_args!("x"),
        );
        assert!(!b.failed());
        let _ = b.verdict(
            &who,
            Api::Stats,
            Node::Zg,
            Err(EIO),
            Must::Any,
            format_args!("STATS y"),
        );
        let _ = b.verdict(
            &who,
            Api::Map,
            Node::Zg,
            Ok(()),
            Must::Fail(BAD_POINTER),
            format_args!("MAP"),
        );
        assert!(b.failed());
        let msg = b.message().unwrap();
        assert!(
            msg.starts_with("seed 77: process 1 thread 0 call 5: STATS"),
            "{msg}"
        );
        assert!(
            msg.contains("EIO") && msg.contains("allows EFAULT"),
            "{msg}"
        );
        let t = b.tally();
        assert_eq!(t.results[Api::Dma as usize][0], 1);
        assert_eq!(t.results[Api::Dma as usize][EFAULT as usize], 1);
        let lines = t.lines();
        assert!(
            lines
                .iter()
                .any(|l| l == "ZAPGUARD-FUZZ calls DMA: 2, ok 1, EFAULT 1"),
            "{lines:?}"
        );
        assert_eq!(t.ioctls(), 4);
    }

    #[test]
    fn a_must_fail_call_fails_with_its_reasons_errno() {
        let mem = BoardMem::new().unwrap();
        let b = mem.board();
        b.init(&Config { calls: 10, seed: 5 }, 0);
        let who = Who::Thread { p: 0, t: 1, i: 2 };
        let unknown_op = Must::Fail(Cause {
            why: "an unknown op",
            errnos: INVAL,
        });
        let _ = b.verdict(
            &who,
            Api::Dma,
            Node::Zg,
            Err(EINVAL),
            unknown_op,
            format_args!("a"),
        );
        assert!(!b.failed());
        // EFAULT is documented for DMA, but not for an unknown op.
        let _ = b.verdict(
            &who,
            Api::Dma,
            Node::Zg,
            Err(EFAULT),
            unknown_op,
            format_args!("b"),
        );
        assert!(b.failed());
        let msg = b.message().unwrap();
        assert!(
            msg.contains("does not explain (an unknown op, so EINVAL)"),
            "{msg}"
        );
    }

    #[test]
    fn too_few_successes_fail_the_run() {
        let row = |ok: u64, efault: u64| {
            let mut v = vec![0; NERR];
            v[0] = ok;
            v[EFAULT as usize] = efault;
            v
        };
        let mut t = Tally {
            results: vec![row(0, 0); NAPI],
            ops: vec![],
            checks: vec![],
        };
        // Too few calls to judge.
        t.results[Api::Dma as usize] = row(0, MIN_CALLS_JUDGED - 1);
        assert!(t.too_few_successes().is_empty());
        // 4.9% of DMA calls succeeded: fewer than 5%.
        t.results[Api::Dma as usize] = row(49, 951);
        let low = t.too_few_successes();
        assert_eq!(low.len(), 1, "{low:?}");
        assert!(low[0].starts_with("DMA: 49 of 1000"), "{low:?}");
        t.results[Api::Dma as usize] = row(50, 950);
        assert!(t.too_few_successes().is_empty());
    }
}
