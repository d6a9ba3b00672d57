//! How a fuzzer thread issues a call and judges it ([`Proc::exec`]): the ioctls, the
//! data-checked jobs on its private buffers, and the mm operations.

use super::arena::{errno_of, last_errno, madvise, map_at, mprotect, raw};
use super::board::{Check, Op, Who};
use super::call::{Call, HmmCmd, MmOp, PrivJob, PrivMm, Ptr, Target};
use super::data::{data_word, fill_bytes, first_diff, seeded, write_words};
use super::generate::clip;
use super::rng::Rng;
use super::table::{errno_name, Api, Node};
use super::verdict::{
    dma_must_fail, hmm_must_fail, map_must_fail, pointer_or_node, snapshot_must_fail, Cause,
    DmaFacts, Errnos, HmmFacts, Must, ACCESS, FAULT, INVAL, NOT_HMM,
};
use super::worker::{Proc, ThreadState};
use super::{HUGE_W, NSHARED, PG, PRIV_W};
use crate::dev;
use libc::{EBUSY, EFAULT, EIO, ENODEV, ENOMEM, ENOTTY, EPERM};
use shared_regs::dma::{
    fnv1a64, DMA_CHECKSUM, DMA_COMPARE, DMA_COPY, DMA_FILL, DMA_READ, DMA_WRITE, FNV_OFFSET,
};
use shared_regs::hmm::{self, HmmDmirrorCmd};
use shared_regs::uapi::{self, ZgDma, ZgInfo, ZgMap, ZgSnapshot, ZgStats};
use std::sync::atomic::Ordering::Relaxed;

impl Proc<'_> {
    pub(super) fn exec(&self, ts: &mut ThreadState, who: &Who, call: &Call) {
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
