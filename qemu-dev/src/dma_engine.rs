//! The DMA engine: jobs from the DMA ring, executed in bursts through the IOTLB, with faults
//! (fail or stall), event reporting and the validator's check on every access.
//!
//! A job holds at most two translations (its read side and its write side) across the bursts of
//! a page, as a device holds translations for transactions in flight. An invalidation that
//! covers a held translation dooms it: the job may finish its burst sequence on that page (the
//! CPU page table cannot change before the driver's SYNC returns), but a SYNC cannot complete
//! until the job lets go, and the ledger flags any use after that SYNC.
//!
//! Nothing runs while bus mastering is off (a job stops between two bursts), and the injected
//! [`FAIL_DMA_HANG`] and [`FAIL_DIE`] fire at a burst ([`crate::inject`]).

use shared_regs::dma::*;
use shared_regs::event::{self as ev, Event as EvtRecord};
use shared_regs::pci::Vector;
use shared_regs::pte::{self, ContextEntry, CTX_ENTRY_SIZE};
use shared_regs::queue;
use shared_regs::regs::*;

use crate::cpu_walk::CpuPte;
use crate::device::ZapguardDevice;
use crate::events::{Activity, Events};
use crate::guest::GuestMem;
use crate::iotlb::IotlbEntry;
use crate::pagetable;
use crate::validator::Access;

/// A translation held by the running job.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Held {
    pub(crate) entry: IotlbEntry,
    /// Covered by an invalidation; the next SYNC waits until it is released.
    pub(crate) doomed: bool,
}

/// A stalled translation waiting for RESUME/ABORT.
#[derive(Clone, Copy, Debug)]
struct Stall {
    tag: u64,
    reason: u16,
}

/// The job being executed.
#[derive(Debug)]
pub(crate) struct ActiveJob {
    desc: DmaJob,
    /// Bytes done.
    pos: u64,
    faults: u32,
    /// Checksum state or compare result.
    result: u64,
    /// [read side, write side].
    pub(crate) held: [Option<Held>; 2],
    stall: Option<Stall>,
}

impl ActiveJob {
    /// Whether the job waits for RESUME/ABORT.
    pub(crate) fn is_stalled(&self) -> bool {
        self.stall.is_some()
    }

    /// Whether it holds a translation an invalidation covered.
    pub(crate) fn holds_doomed(&self) -> bool {
        self.held.iter().flatten().any(|h| h.doomed)
    }

    /// The job's id (cookie).
    pub(crate) fn id(&self) -> u64 {
        self.desc.id
    }

    /// Bytes done.
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }
}

/// Name of a DMA opcode, for traces.
pub fn op_name(op: u8) -> &'static str {
    match op {
        DMA_COPY => "copy",
        DMA_FILL => "fill",
        DMA_WRITE => "write",
        DMA_READ => "read",
        DMA_CHECKSUM => "checksum",
        DMA_COMPARE => "compare",
        _ => "unknown",
    }
}

fn status_name(st: u16) -> &'static str {
    match st {
        DMA_ST_OK => "ok",
        DMA_ST_FAULT => "fault",
        DMA_ST_BAD_JOB => "bad_job",
        DMA_ST_BUF_ERROR => "buf_error",
        _ => "unknown",
    }
}

const READ: usize = 0;
const WRITE: usize = 1;

/// Why a burst could not run.
enum Stop {
    Fault {
        reason: u16,
        va: u64,
        write: bool,
        stallable: bool,
    },
    BufError,
}

fn valid_job(j: &DmaJob) -> bool {
    let known_op = (DMA_COPY..=DMA_COMPARE).contains(&j.op);
    let flags_ok = j.flags & !(DMA_F_STALL | DMA_F_IRQ) == 0;
    let len_ok = j.len >= 1 && j.len <= DMA_MAX_LEN;
    let no_wrap = j.src.checked_add(j.len).is_some() && j.dst.checked_add(j.len).is_some();
    let aux_ok = !matches!(j.op, DMA_WRITE | DMA_READ) || j.aux.checked_add(j.len).is_some();
    known_op && flags_ok && len_ok && no_wrap && aux_ok && j.reserved0 == 0 && j.reserved1 == 0
}

fn page_left(va: u64) -> u64 {
    pte::PAGE_SIZE - (va & (pte::PAGE_SIZE - 1))
}

impl<E: Events> ZapguardDevice<E> {
    /// Runs commands and DMA bursts until neither can progress or `max_bursts` bursts ran.
    /// Commands go first each round, so invalidations interleave with long jobs at burst
    /// granularity. Returns whether anything changed. Does nothing while bus mastering is off
    /// or after [`FAIL_DIE`] fired; returns early after a page walk slowed by [`WALK_LAG`] (the
    /// caller holds a lock that register accesses wait for).
    pub fn process(&mut self, mem: &impl GuestMem, max_bursts: usize) -> bool {
        let mut progress = false;
        for _ in 0..max_bursts.max(1) {
            if !self.bus_master || self.s.inject.died {
                break;
            }
            let walks = self.s.stats[STAT_WALKS as usize];
            let c = self.run_commands(mem);
            let d = self.dma_step(mem);
            progress |= c | d;
            if !c && !d {
                break;
            }
            if self.walk_lag().is_some() && self.s.stats[STAT_WALKS as usize] != walks {
                break;
            }
        }
        progress
    }

    /// Fetches a job or runs one burst of the current one.
    fn dma_step(&mut self, mem: &impl GuestMem) -> bool {
        if self.s.inject.hung {
            return false;
        }
        let Some(job) = self.s.job.as_ref() else {
            return self.fetch_job(mem);
        };
        if job.is_stalled() {
            return false;
        }
        let id = job.id();
        if self.armed(FAIL_DIE) {
            // The process dies before this burst touches memory.
            self.s.inject.died = true;
            self.fail_event(FAIL_DIE, "device died", None, Some(id));
            return true;
        }
        let hang = self.armed(FAIL_DMA_HANG);
        self.burst(mem, hang);
        if hang {
            self.s.inject.hung = true;
            self.fail_event(FAIL_DMA_HANG, "dma engine hung", None, Some(id));
        }
        self.s.lag_left = self.s.lag_left.saturating_sub(1);
        true
    }

    fn fetch_job(&mut self, mem: &impl GuestMem) -> bool {
        if self.s.cr0ack & CR0_DMAQ_EN == 0 || self.s.dmaq_stopped || self.s.dmaq.is_empty() {
            return false;
        }
        let pos = self.s.dmaq.cons;
        let mut raw = [0u8; DMA_JOB_SIZE];
        if self
            .s
            .dmaq
            .slot(pos, DMA_JOB_SIZE)
            .is_none_or(|a| mem.read(a, &mut raw).is_err())
        {
            self.s.dmaq_stopped = true;
            self.activity(Activity::QueueError {
                queue: "dmaq",
                cmd: pos,
                result: "fetch_abort",
            });
            self.set_error(ERR_DMAQ_ABORT, pos);
            return true;
        }
        let desc = DmaJob::from_bytes(&raw);
        self.activity(Activity::JobStart {
            job: desc.id,
            op: op_name(desc.op),
            asid: desc.asid,
            src: desc.src,
            dst: desc.dst,
            len: desc.len,
        });
        self.s.job = Some(ActiveJob {
            desc,
            pos: 0,
            faults: 0,
            result: 0,
            held: [None, None],
            stall: None,
        });
        if !valid_job(&desc) || !desc.status.is_multiple_of(8) {
            self.complete(mem, DMA_ST_BAD_JOB, 0);
        } else if desc.op == DMA_CHECKSUM {
            if let Some(j) = self.s.job.as_mut() {
                j.result = FNV_OFFSET;
            }
        }
        true
    }

    /// One burst of the current job; `hang`: the engine hangs after it, so nothing this burst
    /// ends (the job, with success or a fault) is reported.
    fn burst(&mut self, mem: &impl GuestMem, hang: bool) {
        let Some(job) = self.s.job.as_ref() else {
            return;
        };
        let d = job.desc;
        let pos = job.pos;
        let remaining = d.len - pos;
        let (src, dst) = (d.src.wrapping_add(pos), d.dst.wrapping_add(pos));
        let mut n = remaining.min(u64::from(self.config.dma_burst));
        let reads_va = matches!(d.op, DMA_COPY | DMA_READ | DMA_CHECKSUM | DMA_COMPARE);
        let writes_va = matches!(d.op, DMA_COPY | DMA_FILL | DMA_WRITE);
        let second_read = d.op == DMA_COMPARE;
        if reads_va {
            n = n.min(page_left(src));
        }
        if writes_va || second_read {
            n = n.min(page_left(dst));
        }
        match self.burst_inner(
            mem,
            &d,
            pos,
            src,
            dst,
            n as usize,
            reads_va,
            writes_va,
            second_read,
        ) {
            Ok(done) => {
                let finished = if let Some(j) = self.s.job.as_mut() {
                    j.pos += done;
                    j.pos >= d.len || (d.op == DMA_COMPARE && j.result != 0)
                } else {
                    false
                };
                if finished && !hang {
                    if d.op == DMA_COMPARE {
                        // `result` holds offset+1 of the first difference while running.
                        if let Some(j) = self.s.job.as_mut() {
                            j.result = j.result.checked_sub(1).unwrap_or(u64::MAX);
                        }
                    }
                    self.complete(mem, DMA_ST_OK, 0);
                }
            }
            // A hanging engine reports nothing about the burst that failed either.
            Err(_) if hang => {}
            Err(Stop::BufError) => self.complete(mem, DMA_ST_BUF_ERROR, 0),
            Err(Stop::Fault {
                reason,
                va,
                write,
                stallable,
            }) => self.fault(mem, reason, va, write, stallable),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn burst_inner(
        &mut self,
        mem: &impl GuestMem,
        d: &DmaJob,
        pos: u64,
        src: u64,
        dst: u64,
        n: usize,
        reads_va: bool,
        writes_va: bool,
        second_read: bool,
    ) -> Result<u64, Stop> {
        let mut buf = vec![0u8; n];
        // Translate every side first: a fault must not leave a half-done burst behind.
        let src_pa = if reads_va {
            Some(self.translate(mem, READ, d.asid, src, false)?)
        } else {
            None
        };
        let dst_pa = if writes_va || second_read {
            Some(self.translate(mem, WRITE, d.asid, dst, writes_va)?)
        } else {
            None
        };

        if let Some((pa, id)) = src_pa {
            self.checked_access(mem, d, src, pa, n, false, READ, id);
            mem.read(pa, &mut buf).map_err(|_| Stop::Fault {
                reason: ev::FAULT_WALK_ABORT,
                va: src,
                write: false,
                stallable: false,
            })?;
        }
        match d.op {
            DMA_FILL => {
                let pat = d.aux.to_le_bytes();
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = pat[(pos as usize + i) % 8];
                }
            }
            DMA_WRITE => mem
                .read(d.aux + pos, &mut buf)
                .map_err(|_| Stop::BufError)?,
            _ => {}
        }
        if let Some((pa, id)) = dst_pa {
            self.checked_access(mem, d, dst, pa, n, writes_va, WRITE, id);
            if writes_va {
                mem.write(pa, &buf).map_err(|_| Stop::Fault {
                    reason: ev::FAULT_WALK_ABORT,
                    va: dst,
                    write: true,
                    stallable: false,
                })?;
            } else {
                let mut other = vec![0u8; n];
                mem.read(pa, &mut other).map_err(|_| Stop::Fault {
                    reason: ev::FAULT_WALK_ABORT,
                    va: dst,
                    write: false,
                    stallable: false,
                })?;
                if let Some(k) = buf.iter().zip(&other).position(|(a, b)| a != b) {
                    if let Some(j) = self.s.job.as_mut() {
                        j.result = pos + k as u64 + 1;
                    }
                    return Ok(k as u64);
                }
            }
        }
        match d.op {
            DMA_READ => mem.write(d.aux + pos, &buf).map_err(|_| Stop::BufError)?,
            DMA_CHECKSUM => {
                if let Some(j) = self.s.job.as_mut() {
                    j.result = fnv1a64(j.result, &buf);
                }
            }
            _ => {}
        }
        if self.s.job.as_ref().is_some_and(|j| j.holds_doomed()) {
            self.s.sync_waited += 1;
        }
        Ok(n as u64)
    }

    /// The context of `asid`, from the cache or the context table.
    fn context(&mut self, mem: &impl GuestMem, asid: u32) -> Option<ContextEntry> {
        if self.s.cr0ack & CR0_CTX_EN == 0 || asid >= self.config.asid_count {
            return None;
        }
        if let Some(c) = self.s.ctx_cache.get(&asid) {
            return Some(*c);
        }
        let c = read_context(mem, self.s.ctx_base, asid)?;
        let ok = c.flags & !pte::CTX_FLAGS_MASK == 0
            && c.flags & pte::CTX_VALID != 0
            && c.reserved == 0
            && c.pt_root % pte::PAGE_SIZE == 0
            && c.cpu_root % pte::PAGE_SIZE == 0;
        if ok {
            self.s.ctx_cache.insert(asid, c);
            Some(c)
        } else {
            None
        }
    }

    /// Translates `va` for one side of the job, reusing the held translation when it covers
    /// the access. Returns the guest-physical address and the translation id.
    fn translate(
        &mut self,
        mem: &impl GuestMem,
        side: usize,
        asid: u32,
        va: u64,
        write: bool,
    ) -> Result<(u64, u64), Stop> {
        let usable = |e: &IotlbEntry| {
            e.asid == asid
                && va >= e.va_base
                && va - e.va_base < e.size
                && (!write || (e.writable && e.dirty))
        };
        if let Some(h) = self.s.job.as_ref().and_then(|j| j.held[side]) {
            if usable(&h.entry) {
                return Ok((h.entry.pa_base + (va - h.entry.va_base), h.entry.id));
            }
        }
        // Moving off the held translation releases it (and unblocks a SYNC waiting for it).
        if let Some(j) = self.s.job.as_mut() {
            j.held[side] = None;
        }
        let ctx = self.context(mem, asid).ok_or(Stop::Fault {
            reason: ev::FAULT_CTX_INVALID,
            va,
            write,
            stallable: false,
        })?;
        let entry = match self.s.iotlb.lookup(asid, va) {
            Some(e) if usable(&e) => e,
            // A miss, or a hit lacking write permission or the dirty bit: walk again (the
            // driver may have upgraded the entry; a write must set D before it happens).
            _ => self.fill(mem, &ctx, asid, va, write)?,
        };
        if let Some(j) = self.s.job.as_mut() {
            j.held[side] = Some(Held {
                entry,
                doomed: false,
            });
        }
        Ok((entry.pa_base + (va - entry.va_base), entry.id))
    }

    fn fill(
        &mut self,
        mem: &impl GuestMem,
        ctx: &ContextEntry,
        asid: u32,
        va: u64,
        write: bool,
    ) -> Result<IotlbEntry, Stop> {
        self.s.stats[STAT_WALKS as usize] += 1;
        // WALK_LAG: the walker sleeps before each table read, holding the device lock.
        let (lag, clock) = (self.walk_lag(), &self.clock);
        let pace = |_level| {
            if let Some(d) = lag {
                clock.sleep(d);
            }
        };
        let t =
            pagetable::walk_paced(mem, ctx.pt_root, va, write, pace).map_err(|f| Stop::Fault {
                reason: f.reason,
                va,
                write,
                stallable: matches!(f.reason, ev::FAULT_NOT_PRESENT | ev::FAULT_PERMISSION),
            })?;
        // The snapshot describes one CPU leaf: it may stand for the whole entry only if that
        // leaf covers it (a 2 MiB device entry over 4 KiB CPU pages must not inherit one page's
        // dirty bit, or a clean sibling would look like a missed mkclean).
        let snapshot_dirty = matches!(
            self.s.validator.cpu_snapshot(mem, ctx, va),
            Some(CpuPte::Present { dirty: true, size, .. }) if size >= t.size
        );
        // Re-walking a translation that was never invalidated (a read entry upgraded for a
        // write) keeps what the device knew when it first cached it: otherwise a missed mkclean
        // would be forgotten by the second walk.
        let previous = self
            .s
            .iotlb
            .peek(asid, va)
            .filter(|o| o.va_base == t.va_base && o.size == t.size)
            .is_some_and(|o| o.cpu_dirty_at_fill);
        let cpu_dirty_at_fill = snapshot_dirty || previous;
        let id = self.s.next_translation_id;
        self.s.next_translation_id += 1;
        let entry = IotlbEntry {
            asid,
            va_base: t.va_base,
            size: t.size,
            pa_base: t.pa_base,
            writable: t.writable,
            dirty: t.dirty,
            id,
            cpu_dirty_at_fill,
        };
        // Replacing the same page in place is not an eviction.
        if let Some(old) = self
            .s
            .iotlb
            .insert(entry)
            .filter(|o| o.va_base != t.va_base || o.size != t.size || o.asid != asid)
        {
            self.activity(Activity::IotlbEvict {
                asid: old.asid,
                va: old.va_base,
                len: old.size,
                id: old.id,
            });
        }
        self.activity(Activity::IotlbFill {
            asid,
            va: t.va_base,
            pa: t.pa_base,
            len: t.size,
            writable: t.writable,
            id,
        });
        Ok(entry)
    }

    /// Traces an access and runs the ledger and validator checks on it.
    #[allow(clippy::too_many_arguments)]
    fn checked_access(
        &mut self,
        mem: &impl GuestMem,
        d: &DmaJob,
        va: u64,
        pa: u64,
        n: usize,
        write: bool,
        side: usize,
        id: u64,
    ) {
        self.activity(Activity::DmaAccess {
            job: d.id,
            asid: d.asid,
            va,
            pa,
            len: n as u64,
            write,
            id,
        });
        if self.s.ledger.is_dead(id) {
            self.violation(
                mem,
                d,
                ev::VIOL_LEDGER,
                va,
                pa,
                None,
                write,
                "translation used after the SYNC covering its invalidation completed",
            );
        }
        // The validator reads the context entry uncached: it judges what the driver says now.
        let Some(fresh) = read_context(mem, self.s.ctx_base, d.asid) else {
            return;
        };
        let dirty_at_fill = self
            .s
            .job
            .as_ref()
            .and_then(|j| j.held[side])
            .is_some_and(|h| h.entry.cpu_dirty_at_fill);
        let access = Access {
            asid: d.asid,
            va,
            dev_pa: pa,
            write,
            cpu_dirty_at_fill: dirty_at_fill,
        };
        if let Some(v) = self.s.validator.check(mem, &fresh, &access) {
            let cpu_pa = (v.cpu_pa != ev::NO_PA).then_some(v.cpu_pa);
            self.violation(mem, d, v.class, va, pa, cpu_pa, write, v.why);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn violation(
        &mut self,
        mem: &impl GuestMem,
        d: &DmaJob,
        class: u16,
        va: u64,
        pa: u64,
        cpu_pa: Option<u64>,
        write: bool,
        why: &'static str,
    ) {
        self.s.stats[STAT_VIOLATIONS as usize] += 1;
        self.activity(Activity::Violation {
            job: d.id,
            asid: d.asid,
            va,
            pa,
            cpu_pa,
            write,
            result: ev::violation_name(class),
            why,
        });
        let flags = if write { ev::EVT_F_WRITE } else { 0 };
        self.post_event(
            mem,
            &EvtRecord {
                ty: ev::EVT_VIOLATION,
                flags,
                reason: class,
                asid: d.asid,
                va,
                info: pa,
                info2: cpu_pa.unwrap_or(ev::NO_PA),
            },
        );
    }

    fn fault(&mut self, mem: &impl GuestMem, reason: u16, va: u64, write: bool, stallable: bool) {
        let Some(job) = self.s.job.as_mut() else {
            return;
        };
        job.faults += 1;
        let d = job.desc;
        self.s.stats[STAT_FAULTS as usize] += 1;
        let ctx_stalls = self
            .s
            .ctx_cache
            .get(&d.asid)
            .is_some_and(|c| c.flags & pte::CTX_STALL != 0);
        let stall = stallable && d.flags & DMA_F_STALL != 0 && ctx_stalls;
        let tag = if stall {
            let t = self.s.next_stall_tag;
            self.s.next_stall_tag += 1;
            t
        } else {
            0
        };
        self.activity(Activity::Fault {
            job: d.id,
            asid: d.asid,
            va,
            write,
            result: ev::fault_name(reason),
            stalled: stall,
            tag,
        });
        let mut flags = if write { ev::EVT_F_WRITE } else { 0 };
        if stall {
            flags |= ev::EVT_F_STALLED;
        }
        let posted = self.post_event(
            mem,
            &EvtRecord {
                ty: ev::EVT_FAULT,
                flags,
                reason,
                asid: d.asid,
                va,
                info: tag,
                info2: d.id,
            },
        );
        if stall && posted {
            if let Some(j) = self.s.job.as_mut() {
                // A stalled job holds nothing: a SYNC must never wait on the driver's answer.
                j.held = [None, None];
                j.stall = Some(Stall { tag, reason });
            }
        } else {
            // Not stallable, or nobody could learn the tag: the job ends here.
            self.complete(mem, DMA_ST_FAULT, reason);
        }
    }

    /// RESUME or ABORT of the stalled job with `tag`; false if no such job.
    pub(crate) fn answer_stall(
        &mut self,
        mem: &impl GuestMem,
        asid: u32,
        tag: u64,
        resume: bool,
    ) -> bool {
        if self.s.inject.hung {
            // A hung engine does not answer for its job.
            return false;
        }
        let Some(job) = self.s.job.as_mut() else {
            return false;
        };
        let Some(stall) = job.stall.filter(|s| s.tag == tag && job.desc.asid == asid) else {
            return false;
        };
        if resume {
            job.stall = None;
        } else {
            let _ = stall.reason;
            self.complete(mem, DMA_ST_FAULT, ev::FAULT_ABORTED);
        }
        true
    }

    /// Writes the job's status, advances the DMA ring and retires the job.
    fn complete(&mut self, mem: &impl GuestMem, status: u16, fault_reason: u16) {
        let Some(job) = self.s.job.take() else { return };
        let d = job.desc;
        let result = if status == DMA_ST_OK { job.result } else { 0 };
        let rec = DmaStatus {
            status,
            fault_reason,
            faults: job.faults,
            bytes_done: job.pos,
            result,
            id: d.id,
        };
        if mem.write(d.status, &rec.to_bytes()).is_err() {
            self.activity(Activity::QueueError {
                queue: "dmaq",
                cmd: self.s.dmaq.cons,
                result: "status_write_abort",
            });
        }
        self.s.stats[STAT_DMA_JOBS as usize] += 1;
        self.s.stats[STAT_DMA_BYTES as usize] += job.pos;
        self.activity(Activity::JobDone {
            job: d.id,
            asid: d.asid,
            result: status_name(status),
            len: job.pos,
            faults: job.faults,
        });
        self.s.dmaq.cons = queue::next(self.s.dmaq.cons, self.s.dmaq.log2);
        if d.flags & DMA_F_IRQ != 0 {
            self.raise(Vector::Command);
        }
    }

    /// Appends an event record; false if it was dropped (queue disabled, full or unwritable).
    pub(crate) fn post_event(&mut self, mem: &impl GuestMem, rec: &EvtRecord) -> bool {
        let q = self.s.evtq;
        if self.s.cr0ack & CR0_EVTQ_EN == 0 {
            self.s.stats[STAT_EVENTS_DROPPED as usize] += 1;
            return false;
        }
        if queue::is_full(q.prod, q.cons, q.log2) {
            self.s.stats[STAT_EVENTS_DROPPED as usize] += 1;
            self.s.evtq_overflow = true;
            self.activity(Activity::QueueError {
                queue: "evtq",
                cmd: q.prod,
                result: "overflow",
            });
            self.set_error(ERR_EVTQ_OVERFLOW, q.prod);
            return false;
        }
        if q.slot(q.prod, ev::EVT_SIZE)
            .is_none_or(|a| mem.write(a, &rec.to_bytes()).is_err())
        {
            self.s.stats[STAT_EVENTS_DROPPED as usize] += 1;
            self.activity(Activity::QueueError {
                queue: "evtq",
                cmd: q.prod,
                result: "write_abort",
            });
            self.set_error(ERR_EVTQ_ABORT, q.prod);
            return false;
        }
        self.s.evtq.prod = queue::next(q.prod, q.log2);
        self.raise(Vector::Event);
        true
    }
}

/// Reads context entry `asid` from the table at `base`.
pub(crate) fn read_context(mem: &impl GuestMem, base: u64, asid: u32) -> Option<ContextEntry> {
    let addr = base.checked_add(u64::from(asid) * CTX_ENTRY_SIZE as u64)?;
    let mut raw = [0u8; CTX_ENTRY_SIZE];
    mem.read(addr, &mut raw).ok()?;
    Some(ContextEntry::from_bytes(&raw))
}
