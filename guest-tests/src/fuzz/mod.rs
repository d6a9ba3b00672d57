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
//! - Every errno must be one docs/uapi.md documents for that call ([`TABLE`]; a host unit test
//!   checks each quoted line is in docs/uapi.md), and a call that cannot succeed (an
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
//!
//! [`gen_call`]: generate::gen_call
//! [`TABLE`]: table::TABLE
//! [`Cause`]: verdict::Cause
//! [`MIN_SUCCESS_PER_MILLE`]: board::MIN_SUCCESS_PER_MILLE
//! [`thread_seed`]: rng::thread_seed

mod arena;
mod board;
mod call;
mod children;
mod data;
mod exec;
mod generate;
mod rng;
mod table;
mod verdict;
mod worker;

use crate::dev;
use crate::proc::fork_child;
use arena::last_errno;
use board::{Board, BoardMem, Who};
use children::{canary_main, unpriv_main};
use rng::clock_seed;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use worker::fuzzer_main;

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
}
