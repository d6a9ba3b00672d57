//! A fuzzer process ([`Proc`]): its arena, files and threads, and the checks at its end; a
//! thread's own buffers ([`ThreadState`]).

use super::arena::{
    errno_of, hole, madvise, map_at, mprotect, place_guard, private_region, raw, region_base,
    unmapped, RO_REGION,
};
use super::board::{Board, Check, Who};
use super::call::{shared_w, Ptr, Target};
use super::data::{data_word, first_bad_word, guard_word, ro_word, write_words};
use super::generate::gen_call;
use super::rng::{thread_seed, Rng};
use super::table::{errno_name, Api, Node};
use super::verdict::Must;
use super::{
    Config, CANARY_LEN, CANARY_VA, HMM_NODE, HUGE_W, KERNEL_ADDRS, LOW_LIMIT, NFD, NSHARED, PG,
    PRIV_W, RO_W, SCRATCH, THREADS, WIN_A, WIN_B,
};
use crate::dev;
use shared_regs::pte::VA_LIMIT;
use shared_regs::uapi::{self, ZgStats};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// A shared buffer: two windows, either one current (or unmapped), bounded by guards.
pub(super) struct SharedBuf {
    pub(super) a: u64,
    pub(super) b: u64,
    pub(super) w: u64,
    /// The window the buffer is (or was last) at; read without the lock by the ioctls.
    pub(super) cur: AtomicU64,
    /// The window, and whether the whole of it is known mapped read-write (CPU writes are
    /// made only then). Held for every mm operation on the buffer.
    pub(super) st: Mutex<(u64, bool)>,
}

#[derive(Clone)]
pub(super) struct Fd {
    pub(super) file: Arc<File>,
    pub(super) node: Node,
}

/// A thread's own state: its private buffers and scratch memory.
pub(super) struct ThreadState {
    pub(super) p0: u64,
    pub(super) p1: u64,
    pub(super) p1_ro: bool,
    pub(super) scratch: Vec<u8>,
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

    pub(super) fn p0(&mut self) -> &mut [u8] {
        // SAFETY: P0 is this thread's private window, mapped read-write for good; only this
        // thread touches it, and the device writes it only inside this thread's own ioctls,
        // never while the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.p0 as *mut u8, PRIV_W as usize) }
    }

    pub(super) fn p1(&self) -> &[u8] {
        // SAFETY: P1 is this thread's private window, always readable (read-only or
        // read-write), written only by this thread and its own jobs.
        unsafe { std::slice::from_raw_parts(self.p1 as *const u8, PRIV_W as usize) }
    }

    pub(super) fn p1_mut(&mut self) -> Option<&mut [u8]> {
        if self.p1_ro {
            return None;
        }
        // SAFETY: as in `p1`, and it is read-write now.
        Some(unsafe { std::slice::from_raw_parts_mut(self.p1 as *mut u8, PRIV_W as usize) })
    }

    pub(super) fn scratch(&mut self) -> u64 {
        self.scratch.as_mut_ptr() as u64
    }
}

/// A fuzzer process.
pub(super) struct Proc<'b> {
    idx: usize,
    pub(super) board: &'b Board,
    pub(super) shared: Vec<SharedBuf>,
    pub(super) ro: u64,
    fds: Vec<Mutex<Option<Fd>>>,
    pub(super) guards: Vec<u64>,
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

    pub(super) fn fd(&self, slot: u8) -> Option<Fd> {
        self.fds[slot as usize % NFD]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The first open `/dev/zapguard` file, in slot order.
    pub(super) fn first_zg(&self) -> Option<Fd> {
        (0..NFD as u8)
            .filter_map(|s| self.fd(s))
            .find(|f| f.node == Node::Zg)
    }

    pub(super) fn all_fds(&self) -> Vec<Fd> {
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

    pub(super) fn open(&self, who: &Who, slot: u8, node: Node) {
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

    pub(super) fn close(&self, who: &Who, slot: u8) {
        let old = self.fds[slot as usize % NFD]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match old {
            Some(old) => self.retire(who, old),
            None => self.board.check(Check::NoFile, 1),
        }
    }

    pub(super) fn addr(&self, t: Target) -> u64 {
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
    pub(super) fn arg_addr(&self, p: Ptr, size: usize) -> u64 {
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
    pub(super) fn buf(
        &self,
        ts: &mut ThreadState,
        p: Ptr,
        need: u64,
        kernel_writes: bool,
    ) -> (u64, bool) {
        match p {
            Ptr::Valid if need <= SCRATCH => (ts.scratch(), true),
            Ptr::ReadOnly => (self.ro, !kernel_writes && need <= RO_W),
            Ptr::Straddle => (self.arg_addr(p, 2), need <= 1),
            _ => (self.arg_addr(p, 16), false),
        }
    }

    /// Issues `cmd` with `s` as its argument, or with a bad pointer of kind `arg`.
    pub(super) fn issue<T: zerocopy::IntoBytes + zerocopy::FromBytes>(
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
    pub(super) fn snapshot_rule(&self, va: u64) -> Option<(u8, u8)> {
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

pub(super) fn fuzzer_main(board: &Board, cfg: &Config, p: usize) -> i32 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::board::{BoardMem, Op};
    use crate::fuzz::call::Call;
    use crate::fuzz::reap;
    use crate::proc::fork_child;

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
}
