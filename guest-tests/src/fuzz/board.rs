//! The board: counters and the first failure, shared by every process of the run ([`Board`]),
//! and the counters at the end ([`Tally`]).

use super::table::{allowed, errno_name, Api, Names, Node, APIS, NAPI};
use super::verdict::Must;
use super::{Config, PG};
use crate::dev;
use shared_regs::uapi::ZgStats;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};

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
    pub(super) failures: AtomicU64,
    first: AtomicU32,
    msg_len: AtomicU32,
    msg: [AtomicU8; MSG_MAX],
    pub(super) canary_ready: AtomicU32,
    pub(super) canary_stop: AtomicU32,
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

    pub(super) fn count(&self, api: Api, res: Result<(), i32>) {
        let slot = match res {
            Ok(()) => 0,
            Err(e) => (e.max(1) as usize).min(NERR - 1),
        };
        self.results[api as usize][slot].fetch_add(1, Relaxed);
    }

    pub(super) fn op(&self, op: Op, ok: bool) {
        self.ops[op as usize][usize::from(!ok)].fetch_add(1, Relaxed);
    }

    pub(super) fn check(&self, c: Check, n: u64) {
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
    ///
    /// [`TABLE`]: super::table::TABLE
    pub(super) fn verdict(
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
                    "{api} on {node} failed with {} ({e}), which docs/uapi.md does not document for it (it allows {}); the call: {call}",
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
    pub(super) fn judge_stats(&self, who: &Who, s: &ZgStats, when: &str) {
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
pub(super) const MIN_SUCCESS_PER_MILLE: [(Api, u64); 12] = [
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::verdict::{Cause, BAD_POINTER, INVAL};
    use libc::{EFAULT, EINVAL, EIO};

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
