//! The children besides the fuzzer processes: a fuzzer thread's fork children
//! ([`Proc::fork`]), the canary child and the unprivileged child.

use super::arena::{errno_of, last_errno, map_at};
use super::board::{Board, Check, Op, Who};
use super::call::ForkHow;
use super::data::{canary_word, fill_bytes, first_bad_word, write_words};
use super::rng::{derive, Rng, UNPRIV_STREAM};
use super::table::{errno_name, Api, Node};
use super::verdict::{Cause, Errnos, Must, ACCESS};
use super::worker::{Fd, Proc, ThreadState};
use super::{reap, Config, CANARY_LEN, CANARY_VA, NSHARED, PG, PRIV_W, UNPRIV_ID};
use crate::dev;
use libc::{EACCES, EPERM};
use shared_regs::dma::{fnv1a64, DMA_CHECKSUM, DMA_FILL, FNV_OFFSET};
use shared_regs::hmm::{self, HmmDmirrorCmd};
use shared_regs::uapi;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

impl Proc<'_> {
    pub(super) fn fork(
        &self,
        ts: &mut ThreadState,
        who: &Who,
        how: ForkHow,
        seed: u64,
        delay_us: u32,
    ) {
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
}

/// Holds its pattern at [`CANARY_VA`], mirrored writable in its own context and read by device
/// checksums until the test is done; then checks it.
pub(super) fn canary_main(board: &Board) -> i32 {
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
pub(super) fn unpriv_main(board: &Board, cfg: &Config) -> i32 {
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
