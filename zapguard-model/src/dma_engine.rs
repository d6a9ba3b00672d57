//! The DMA engine: jobs from the DMA ring, executed in steps through the IOTLB, with faults
//! (fail or stall), event reporting and the validator's check on every page access.
//!
//! A step ends where either side's translation ends or the CPU leaf its verdict used ends
//! (a page boundary, for 4 KiB entries), after [`crate::DeviceConfig::dma_burst`] bytes (16
//! pages by default), and, for the opcodes staged through the device's buffer (FILL, CHECKSUM,
//! COMPARE), at every page boundary: every byte of a step has one translation id and one
//! verdict. Per step, each side
//! is translated once (held translation, IOTLB hit or walk) and walked in the CPU page table
//! before its bytes move (the walk an IOTLB fill makes for its snapshot is the one that verdict
//! uses), the bytes move with one guest-to-guest copy or through a staging buffer the device
//! keeps (no allocation), and each side is traced as one `dma_access` and judged by the ledger
//! and the validator: first against the walk before, then, if that was clean, against a second
//! walk made after the bytes moved (the guest runs meanwhile): a CPU mapping that changed under
//! the access is a [`shared_regs::event::VIOL_ZAPPED_DURING_ACCESS`] violation. Commands run
//! between steps.
//!
//! A job holds at most two translations (its read side and its write side) from the step that
//! translated them until a later step translates another page, as a device holds translations
//! for transactions in flight. An invalidation that covers a held translation dooms it: the job
//! may keep using it (with a correct driver the CPU page table cannot change before the
//! driver's SYNC returns; the walk after each access checks that), but a SYNC cannot complete
//! until the job lets go, and the ledger flags any use after that SYNC.
//!
//! Nothing runs while bus mastering is off (a job stops between two steps), and the injected
//! [`FAIL_DMA_HANG`] and [`FAIL_DIE`] fire at a step ([`crate::inject`]). The test knobs
//! [`WALK_LAG`] and [`FAULT_LAG`] sleep on the device's clock inside a step (before each table
//! read of a walk; before a fault is reported), holding whatever the caller of
//! [`ZapguardDevice::process`] holds. With the table-lifetime check on ([`PT_FREED_PAGES`]),
//! each table read of a walk is preceded by a read of the table's bit in the guest's bitmap; a
//! set bit is a [`shared_regs::event::VIOL_TABLE_FREED`] violation (the table's GPA in the
//! violation's `pa`), reported after the walk and before its access or fault, and the walk's
//! outcome is unchanged. Every walk also ends with an uncached read of its ASID's context
//! entry: an entry marked [`pte::CTX_MM_RELEASED`] while the walk ran through a cached copy
//! without that flag is a [`shared_regs::event::VIOL_CTX_RELEASED`] violation (the walk's root
//! in `pa`), reported after the walk's `table_freed` ones, with the same outcome rule.

use std::time::Instant;

use shared_regs::dma::*;
use shared_regs::event::{self as ev, Event as EvtRecord};
use shared_regs::pci::Vector;
use shared_regs::pte::{self, ContextEntry, CTX_ENTRY_SIZE};
use shared_regs::queue;
use shared_regs::regs::*;

use crate::cpu_walk::CpuPte;
use crate::device::ZapguardDevice;
use crate::events::{Activity, Events};
use crate::guest::{CopyError, GuestMem};
use crate::iotlb::IotlbEntry;
use crate::pagetable;
use crate::validator::{la57, Access, CpuLookup, Facts, Violation};

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
    /// A step halfway through its `WALK_LAG_IN_STEP` lag: judged before its access, its bytes
    /// not moved yet.
    pub(crate) mid_step: Option<MidStep>,
}

/// A DMA step waiting out [`WALK_LAG_IN_STEP`] between its judgement before the access and
/// its copy. The device does not sleep there: the step ends, the job waits for `due` like a
/// lagged SYNC, and the guest (whose MMIO the device lock would otherwise hold up) runs on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MidStep {
    pub(crate) due: Instant,
    /// The CPU walks made before the access, source side and destination side.
    walks: (Option<CpuLookup>, Option<CpuLookup>),
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

/// Bytes of the device's staging buffer: two pages, for COMPARE's two sides.
pub(crate) const STAGING_SIZE: usize = 2 * pte::PAGE_SIZE as usize;

/// A CPU walk made at an IOTLB fill, with the root and mode it walked.
#[derive(Clone, Copy, Debug)]
struct Walked {
    cpu_root: u64,
    la57: bool,
    result: CpuLookup,
}

/// One side of a step, translated.
#[derive(Clone, Copy, Debug)]
struct Side {
    /// Held-translation slot ([`READ`] or [`WRITE`]).
    slot: usize,
    /// First VA of the step on this side.
    va: u64,
    /// Its guest-physical address.
    pa: u64,
    /// Translation id.
    id: u64,
    /// The VA where the translation ends.
    end: u64,
    /// A write (false for both sides of a COMPARE).
    write: bool,
    /// The CPU walk the fill made, if this step filled the translation.
    walked: Option<Walked>,
}

/// Which access of a step's data movement failed.
enum Missed {
    /// Reading the source VA.
    Src,
    /// Writing (or, for COMPARE, reading) the destination VA.
    Dst,
    /// Reading the DMA_WRITE buffer (before the destination is touched).
    AuxRead,
    /// Writing the DMA_READ buffer.
    AuxWrite,
}

/// Why a step could not run.
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

impl Side {
    /// Bytes from the side's VA that one step may move under one verdict: up to the end of
    /// its translation and of the CPU leaf `cpu` found (a page when the CPU maps nothing
    /// there, so that a violation names one page; unbounded when no verdict needs a walk).
    fn reach(&self, cpu: Option<CpuLookup>) -> u64 {
        let in_leaf = match cpu {
            None => u64::MAX,
            Some(Ok(CpuPte::Present { size, .. })) => size - (self.va & (size - 1)),
            Some(_) => page_left(self.va),
        };
        (self.end - self.va).min(in_leaf)
    }
}

impl<E: Events> ZapguardDevice<E> {
    /// Runs commands and DMA steps until neither can progress or `max_steps` rounds ran (a
    /// round: every command that can run, then one DMA step or job fetch). Commands go first
    /// each round, so invalidations interleave with long jobs at step granularity. Returns
    /// whether anything changed. Does nothing while bus mastering is off or after [`FAIL_DIE`]
    /// fired; returns early after a page walk slowed by [`WALK_LAG`] or a fault delayed by
    /// [`FAULT_LAG`] (the caller holds a lock that register accesses wait for).
    pub fn process(&mut self, mem: &impl GuestMem, max_steps: usize) -> bool {
        let mut progress = false;
        for _ in 0..max_steps.max(1) {
            if !self.bus_master || self.s.inject.died {
                break;
            }
            let walks = self.s.stats[STAT_WALKS as usize];
            let faults = self.s.stats[STAT_FAULTS as usize];
            let c = self.run_commands(mem);
            let d = self.dma_step(mem);
            progress |= c | d;
            if !c && !d {
                break;
            }
            let lagged_walk =
                self.walk_lag().is_some() && self.s.stats[STAT_WALKS as usize] != walks;
            let lagged_fault =
                self.fault_lag().is_some() && self.s.stats[STAT_FAULTS as usize] != faults;
            if lagged_walk || lagged_fault {
                break;
            }
        }
        progress
    }

    /// Fetches a job or runs one step of the current one.
    fn dma_step(&mut self, mem: &impl GuestMem) -> bool {
        if self.s.inject.hung {
            return false;
        }
        let Some(job) = self.s.job.as_ref() else {
            return self.fetch_job(mem);
        };
        if job.is_stalled() || job.mid_step.is_some_and(|m| self.clock.now() < m.due) {
            return false;
        }
        let id = job.id();
        if self.armed(FAIL_DIE) {
            // The process dies before this step touches memory.
            self.s.inject.died = true;
            self.fail_event(FAIL_DIE, "device died", None, Some(id));
            return true;
        }
        let hang = self.armed(FAIL_DMA_HANG);
        self.step(mem, hang);
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
            mid_step: None,
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

    /// One step of the current job; `hang`: the engine hangs after it, so nothing this step
    /// ends (the job, with success or a fault) is reported.
    fn step(&mut self, mem: &impl GuestMem, hang: bool) {
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
        if !matches!(d.op, DMA_COPY | DMA_READ | DMA_WRITE) {
            // Staged opcodes end at page boundaries: the staging buffer holds a page per side.
            n = n.min(pte::PAGE_SIZE);
            if reads_va {
                n = n.min(page_left(src));
            }
            if writes_va || second_read {
                n = n.min(page_left(dst));
            }
        }
        let sides = (reads_va, writes_va, second_read);
        match self.step_inner(mem, &d, pos, src, dst, n as usize, sides) {
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
            // A hanging engine reports nothing about the step that failed either.
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

    /// Translates, moves `n` bytes, then traces and judges the sides the step reached; returns
    /// the bytes done. `sides`: (reads `src`, writes `dst`, reads `dst`).
    #[allow(clippy::too_many_arguments)]
    fn step_inner(
        &mut self,
        mem: &impl GuestMem,
        d: &DmaJob,
        pos: u64,
        src: u64,
        dst: u64,
        n: usize,
        (reads_va, writes_va, second_read): (bool, bool, bool),
    ) -> Result<u64, Stop> {
        // Translate every side first: a fault must not leave a half-done step behind.
        let src_side = if reads_va {
            Some(self.translate(mem, READ, d.asid, src, false)?)
        } else {
            None
        };
        let dst_side = if writes_va || second_read {
            Some(self.translate(mem, WRITE, d.asid, dst, writes_va)?)
        } else {
            None
        };
        // The validator reads the context entry uncached: it judges what the driver says now.
        // An entry that cannot be judged refuses the step (no silent off-switch).
        let first = src_side.as_ref().or(dst_side.as_ref());
        let fresh = self.judgeable_context(mem, d.asid).ok_or(Stop::Fault {
            reason: ev::FAULT_CTX_INVALID,
            va: first.map_or(src, |s| s.va),
            write: first.is_some_and(|s| s.write),
            stallable: false,
        })?;
        // One CPU walk per side before the access (the fill's if it still applies; the one made
        // before the lag for a step resumed after WALK_LAG_IN_STEP); the walk after it is
        // `checked_access`'s.
        let resumed = self.s.job.as_mut().and_then(|j| j.mid_step.take());
        let cpu = |s: &Side| self.cpu_walk(mem, &fresh, s);
        let (src_cpu, dst_cpu) = match resumed {
            Some(m) => m.walks,
            None => (
                src_side.as_ref().and_then(cpu),
                dst_side.as_ref().and_then(cpu),
            ),
        };
        // The step stays inside both sides' translations and CPU leaves: one translation id
        // and one verdict hold for every byte of it.
        let n = [(&src_side, src_cpu), (&dst_side, dst_cpu)]
            .into_iter()
            .filter_map(|(s, cpu)| s.as_ref().map(|s| s.reach(cpu)))
            .fold(n as u64, u64::min) as usize;

        // WALK_LAG_IN_STEP: a slow copy, during which the guest runs on. The job keeps its
        // translations (a SYNC waits for them) and comes back at the deadline.
        if let (None, Some(lag)) = (resumed, self.step_lag()) {
            let due = self.clock.now() + lag;
            if let Some(j) = self.s.job.as_mut() {
                j.mid_step = Some(MidStep {
                    due,
                    walks: (src_cpu, dst_cpu),
                });
            }
            return Ok(0);
        }
        let moved = self.move_data(
            mem,
            d,
            pos,
            n,
            src_side.map(|s| s.pa),
            dst_side.map(|s| s.pa),
        );
        // Trace and judge what the step touched, in order; a side the step never reached (the
        // source could not be read, or DMA_WRITE's buffer) is neither.
        if let Some(s) = &src_side {
            self.checked_access(mem, d, &fresh, s, n, src_cpu);
        }
        if !matches!(moved, Err(Missed::Src | Missed::AuxRead)) {
            if let Some(s) = &dst_side {
                self.checked_access(mem, d, &fresh, s, n, dst_cpu);
            }
        }
        let abort = |va, write| Stop::Fault {
            reason: ev::FAULT_WALK_ABORT,
            va,
            write,
            stallable: false,
        };
        if matches!(d.op, DMA_READ | DMA_WRITE) && moved.is_ok() {
            let side = if d.op == DMA_READ {
                &src_side
            } else {
                &dst_side
            };
            let va = side.as_ref().map_or(0, |s| s.va);
            self.check_aux(mem, d, d.aux.wrapping_add(pos), n as u64, va);
        }
        let done = moved.map_err(|m| match m {
            Missed::Src => abort(src, false),
            Missed::Dst => abort(dst, writes_va),
            Missed::AuxRead | Missed::AuxWrite => Stop::BufError,
        })?;
        if self.s.job.as_ref().is_some_and(|j| j.holds_doomed()) {
            self.s.sync_waited += 1;
        }
        Ok(done)
    }

    /// The CPU walk for one side's verdict: the one its fill made if the context still names
    /// the same table, else a new one (`None` when no verdict needs a walk).
    fn cpu_walk(&self, mem: &impl GuestMem, ctx: &ContextEntry, s: &Side) -> Option<CpuLookup> {
        match s.walked {
            Some(w) if w.cpu_root == ctx.cpu_root && w.la57 == la57(ctx) => Some(w.result),
            _ => self.s.validator.lookup(mem, ctx, s.va),
        }
    }

    /// Performs the job's operation on `n` bytes at offset `pos`, through the translated
    /// guest-physical addresses; returns the bytes done (less than `n` only when a COMPARE
    /// found a difference).
    fn move_data(
        &mut self,
        mem: &impl GuestMem,
        d: &DmaJob,
        pos: u64,
        n: usize,
        src: Option<u64>,
        dst: Option<u64>,
    ) -> Result<u64, Missed> {
        let aux = d.aux.wrapping_add(pos);
        let (staging, job) = (&mut self.staging, &mut self.s.job);
        match (d.op, src, dst) {
            (DMA_COPY, Some(s), Some(t)) => mem.copy(s, t, n).map_err(|e| match e {
                CopyError::Read(_) => Missed::Src,
                CopyError::Write(_) => Missed::Dst,
            })?,
            (DMA_READ, Some(s), _) => mem.copy(s, aux, n).map_err(|e| match e {
                CopyError::Read(_) => Missed::Src,
                CopyError::Write(_) => Missed::AuxWrite,
            })?,
            (DMA_WRITE, _, Some(t)) => mem.copy(aux, t, n).map_err(|e| match e {
                CopyError::Read(_) => Missed::AuxRead,
                CopyError::Write(_) => Missed::Dst,
            })?,
            (DMA_FILL, _, Some(t)) => {
                let buf = &mut staging[..n];
                // The 8-byte pattern as seen from this step's first byte.
                let mut pat = d.aux.to_le_bytes();
                pat.rotate_left((pos % 8) as usize);
                for c in buf.chunks_mut(8) {
                    c.copy_from_slice(&pat[..c.len()]);
                }
                mem.write(t, buf).map_err(|_| Missed::Dst)?;
            }
            (DMA_CHECKSUM, Some(s), _) => {
                let buf = &mut staging[..n];
                mem.read(s, buf).map_err(|_| Missed::Src)?;
                if let Some(j) = job.as_mut() {
                    j.result = fnv1a64(j.result, buf);
                }
            }
            (DMA_COMPARE, Some(s), Some(t)) => {
                let (a, b) = staging.split_at_mut(STAGING_SIZE / 2);
                let (a, b) = (&mut a[..n], &mut b[..n]);
                mem.read(s, a).map_err(|_| Missed::Src)?;
                mem.read(t, b).map_err(|_| Missed::Dst)?;
                if a != b {
                    let k = a.iter().zip(&*b).position(|(x, y)| x != y).unwrap_or(0);
                    if let Some(j) = job.as_mut() {
                        j.result = pos + k as u64 + 1;
                    }
                    return Ok(k as u64);
                }
            }
            // `step` translated exactly the sides each opcode uses.
            _ => {}
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
    /// the access.
    fn translate(
        &mut self,
        mem: &impl GuestMem,
        slot: usize,
        asid: u32,
        va: u64,
        write: bool,
    ) -> Result<Side, Stop> {
        let usable = |e: &IotlbEntry| {
            e.asid == asid
                && va >= e.va_base
                && va - e.va_base < e.size
                && (!write || (e.writable && e.dirty))
        };
        let side = |e: &IotlbEntry, walked| Side {
            slot,
            va,
            pa: e.pa_base + (va - e.va_base),
            id: e.id,
            end: e.va_base + e.size,
            write,
            walked,
        };
        if let Some(h) = self.s.job.as_ref().and_then(|j| j.held[slot]) {
            if usable(&h.entry) {
                return Ok(side(&h.entry, None));
            }
        }
        // Moving off the held translation releases it (and unblocks a SYNC waiting for it).
        if let Some(j) = self.s.job.as_mut() {
            j.held[slot] = None;
        }
        let ctx = self.context(mem, asid).ok_or(Stop::Fault {
            reason: ev::FAULT_CTX_INVALID,
            va,
            write,
            stallable: false,
        })?;
        let (entry, walked) = match self.s.iotlb.lookup(asid, va) {
            Some(e) if usable(&e) => (e, None),
            // A miss, or a hit lacking write permission or the dirty bit: walk again (the
            // driver may have upgraded the entry; a write must set D before it happens).
            _ => self.fill(mem, &ctx, asid, va, write)?,
        };
        if let Some(j) = self.s.job.as_mut() {
            j.held[slot] = Some(Held {
                entry,
                doomed: false,
            });
        }
        Ok(side(&entry, walked))
    }

    /// Walks the device table for `va` and caches the translation; also returns the CPU walk
    /// its snapshot made, for the step's verdict to reuse.
    fn fill(
        &mut self,
        mem: &impl GuestMem,
        ctx: &ContextEntry,
        asid: u32,
        va: u64,
        write: bool,
    ) -> Result<(IotlbEntry, Option<Walked>), Stop> {
        self.s.stats[STAT_WALKS as usize] += 1;
        // WALK_LAG: the walker sleeps before each table read, holding the device lock. Then the
        // table-lifetime check (PT_FREED_PAGES) reads the table's bit in the guest's bitmap, at
        // that moment: the driver sets bits with plain memory writes, so one set during the
        // sleep counts. At most one table per level is read.
        let (lag, clock, freed) = (self.walk_lag(), &self.clock, self.freed_tables());
        let mut freed_reads = [0u64; pte::PT_LEVELS as usize];
        let mut n_freed = 0;
        let pace = |_level, table| {
            if let Some(d) = lag {
                clock.sleep(d);
            }
            if freed.is_some_and(|f| f.is_freed(mem, table)) {
                if let Some(slot) = freed_reads.get_mut(n_freed) {
                    *slot = table;
                    n_freed += 1;
                }
            }
        };
        let walk = pagetable::walk_paced(mem, ctx.pt_root, va, write, pace);
        let released = self.walked_released_ctx(mem, asid);
        // Reported whatever the walk's outcome, before the access or the fault: the walk is not
        // changed by the checks (the freed page's entries are used as read).
        if let Some(d) = self.s.job.as_ref().map(|j| j.desc) {
            for &table in &freed_reads[..n_freed] {
                self.s.inject.tables_freed += 1;
                self.violation(
                    mem,
                    &d,
                    ev::VIOL_TABLE_FREED,
                    va,
                    table,
                    None,
                    write,
                    "page walk read a device page-table page the driver marked freed",
                );
            }
            if released {
                self.s.ctx_released += 1;
                self.violation(
                    mem,
                    &d,
                    ev::VIOL_CTX_RELEASED,
                    va,
                    ctx.pt_root,
                    None,
                    write,
                    "page walk through a cached context the driver marked released \
                     (its context-cache invalidation is missing)",
                );
            }
        }
        let t = walk.map_err(|f| Stop::Fault {
            reason: f.reason,
            va,
            write,
            stallable: matches!(f.reason, ev::FAULT_NOT_PRESENT | ev::FAULT_PERMISSION),
        })?;
        // The snapshot describes one CPU leaf: it may stand for the whole entry only if that
        // leaf covers it (a 2 MiB device entry over 4 KiB CPU pages must not inherit one page's
        // dirty bit, or a clean sibling would look like a missed mkclean).
        let walked = self.s.validator.lookup(mem, ctx, va).map(|result| Walked {
            cpu_root: ctx.cpu_root,
            la57: la57(ctx),
            result,
        });
        let snapshot_dirty = matches!(
            walked.map(|w| w.result),
            Some(Ok(CpuPte::Present { dirty: true, size, .. })) if size >= t.size
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
        // Replacing the same page in place is not an eviction. With IOTLB_KEEP a full IOTLB
        // leaves the entry out: the job still holds and uses it (and the fill is traced, which
        // names the translation id for the trace's checks).
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
        Ok((entry, walked))
    }

    /// Whether a walk for `asid` just ran through a cached context that the entry in memory,
    /// read now (after the walk's lags) and uncached, marks released while the cached copy does
    /// not. The driver writes that flag only after CFGI_CTX + SYNC confirmed the context is off,
    /// so a copy still cached from before means it skipped the invalidation. A merely invalid
    /// entry is the legal window before its CFGI_CTX runs and does not count; an entry cached
    /// with the flag (loaded released) is the validator's `released` at the access.
    fn walked_released_ctx(&self, mem: &impl GuestMem, asid: u32) -> bool {
        let released = |c: &ContextEntry| c.flags & pte::CTX_MM_RELEASED != 0;
        self.s.ctx_cache.get(&asid).is_some_and(|c| !released(c))
            && read_context(mem, self.s.ctx_base, asid).is_some_and(|c| released(&c))
    }

    /// The context entry of `asid` as guest memory holds it now, if a step can be judged
    /// against it (or is explicitly not to be): a valid entry, or one marked released. `None`:
    /// unreadable, or cleared while the device still caches it.
    fn judgeable_context(&self, mem: &impl GuestMem, asid: u32) -> Option<ContextEntry> {
        read_context(mem, self.s.ctx_base, asid)
            .filter(|c| c.flags & (pte::CTX_VALID | pte::CTX_MM_RELEASED) != 0)
    }

    /// Traces one side's access of `n` bytes and runs the ledger and validator checks on it.
    /// `fresh`: the context entry as guest memory held it before the bytes moved; `walked`: the
    /// CPU walk of the side's VA under it.
    fn checked_access(
        &mut self,
        mem: &impl GuestMem,
        d: &DmaJob,
        fresh: &ContextEntry,
        s: &Side,
        n: usize,
        walked: Option<CpuLookup>,
    ) {
        let (facts, verdict) = self.judge_step(mem, d, fresh, s, walked);
        self.activity(dma_access(d, s, n, &facts));
        if self.s.ledger.is_dead(s.id) {
            self.violation(
                mem,
                d,
                ev::VIOL_LEDGER,
                s.va,
                s.pa,
                None,
                s.write,
                "translation used after the SYNC covering its invalidation completed",
            );
        }
        if let Some(v) = verdict {
            let cpu_pa = (v.cpu_pa != ev::NO_PA).then_some(v.cpu_pa);
            self.violation(mem, d, v.class, s.va, s.pa, cpu_pa, s.write, v.why);
        }
    }

    /// Judges one step against its context entry `fresh`, before (`walked`, the CPU walk made
    /// before the bytes moved) and, if that was clean, after its bytes moved: the facts seen,
    /// and the violation.
    fn judge_step(
        &mut self,
        mem: &impl GuestMem,
        d: &DmaJob,
        fresh: &ContextEntry,
        s: &Side,
        walked: Option<CpuLookup>,
    ) -> (Facts, Option<Violation>) {
        let dirty_at_fill = self
            .s
            .job
            .as_ref()
            .and_then(|j| j.held[s.slot])
            .is_some_and(|h| h.entry.cpu_dirty_at_fill);
        let access = Access {
            asid: d.asid,
            va: s.va,
            dev_pa: s.pa,
            write: s.write,
            cpu_dirty_at_fill: dirty_at_fill,
        };
        let mut j = self.s.validator.judged(mem, fresh, &access, walked);
        if j.facts.judged && j.violation.is_none() {
            // Cleared meanwhile (the driver began a teardown whose SYNC waits for this step):
            // the address space is still the one `fresh` named.
            let now = self.judgeable_context(mem, d.asid).unwrap_or(*fresh);
            let after = self.s.validator.lookup(mem, &now, s.va);
            j.violation = self.s.validator.judge_after(&access, after, &mut j.facts);
        }
        (j.facts, j.violation)
    }

    /// Checks the `aux` access of a `DMA_READ`/`DMA_WRITE` step (`n` bytes at `pa`, for the
    /// job's `va`) against the job's bounce buffer.
    fn check_aux(&mut self, mem: &impl GuestMem, d: &DmaJob, pa: u64, n: u64, va: u64) {
        if !self.s.phys.aux_ok(d.asid, pa, n) {
            let write = d.op == DMA_READ;
            let why =
                "aux access outside the job's bounce buffer, or after the driver reclaimed it";
            self.phys_unlent(mem, Some((d.id, d.asid)), va, pa, write, why);
        }
    }

    /// Reports an untranslated access at `pa` the driver did not lend
    /// ([`ev::VIOL_PHYS_UNLENT`]): counted, traced and posted as an event. `job`: the job's id
    /// and ASID, if a job made it.
    pub(crate) fn phys_unlent(
        &mut self,
        mem: &impl GuestMem,
        job: Option<(u64, u32)>,
        va: u64,
        pa: u64,
        write: bool,
        why: &'static str,
    ) {
        let v = Found::unlent(job, va, pa, write, why);
        self.record_violation(&v);
        self.post_violation(mem, &v);
    }

    /// [`Self::phys_unlent`] without the event (for an event record's own write).
    fn phys_unlent_unposted(
        &mut self,
        job: Option<(u64, u32)>,
        va: u64,
        pa: u64,
        write: bool,
        why: &'static str,
    ) {
        self.record_violation(&Found::unlent(job, va, pa, write, why));
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
        let v = Found {
            job: Some((d.id, d.asid)),
            class,
            va,
            pa,
            cpu_pa,
            write,
            why,
        };
        self.record_violation(&v);
        self.post_violation(mem, &v);
    }

    /// Counts and traces violation `v`.
    fn record_violation(&mut self, v: &Found) {
        self.s.stats[STAT_VIOLATIONS as usize] += 1;
        self.activity(Activity::Violation {
            job: v.job.map_or(0, |j| j.0),
            asid: v.asid(),
            va: v.va,
            pa: v.pa,
            cpu_pa: v.cpu_pa,
            write: v.write,
            result: ev::violation_name(v.class),
            why: v.why,
        });
    }

    /// Posts violation `v` to the event queue.
    fn post_violation(&mut self, mem: &impl GuestMem, v: &Found) {
        let flags = if v.write { ev::EVT_F_WRITE } else { 0 };
        self.post_event(
            mem,
            &EvtRecord {
                ty: ev::EVT_VIOLATION,
                flags,
                reason: v.class,
                asid: v.asid(),
                va: v.va,
                info: v.pa,
                info2: v.cpu_pa.unwrap_or(ev::NO_PA),
            },
        );
    }

    fn fault(&mut self, mem: &impl GuestMem, reason: u16, va: u64, write: bool, stallable: bool) {
        if self.s.job.is_none() {
            return;
        }
        // FAULT_LAG: the device waits before it reports the fault, holding the device lock like
        // WALK_LAG's sleeps (only guest memory can change meanwhile); `process` then ends its
        // slice so that the register accesses that waited get in.
        if let Some(d) = self.fault_lag() {
            self.clock.sleep(d);
        }
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
        if !self
            .s
            .phys
            .driver_write_ok(d.status, DMA_STATUS_SIZE as u64)
        {
            let job = (d.id, d.asid);
            self.phys_unlent(
                mem,
                Some(job),
                0,
                d.status,
                true,
                "status record outside driver memory",
            );
        }
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
        self.s.phys.consumed(self.s.dmaq.cons);
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
        let slot = q.slot(q.prod, ev::EVT_SIZE);
        if let Some(a) = slot.filter(|&a| !self.s.phys.driver_write_ok(a, ev::EVT_SIZE as u64)) {
            let job = self.s.job.as_ref().map(|j| (j.id(), rec.asid));
            self.phys_unlent_unposted(job, 0, a, true, "event record outside driver memory");
        }
        if slot.is_none_or(|a| mem.write(a, &rec.to_bytes()).is_err()) {
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
/// The trace record of one step of `d` on side `s` (`n` bytes), with what the validator saw.
fn dma_access(d: &DmaJob, s: &Side, n: usize, f: &Facts) -> Activity {
    let after = f.after.flatten();
    Activity::DmaAccess {
        job: d.id,
        asid: d.asid,
        va: s.va,
        pa: s.pa,
        len: n as u64,
        write: s.write,
        id: s.id,
        judged: f.judged,
        released: f.released,
        cpu_pa: f.cpu.map(|c| c.0),
        cpu_w: f.cpu.is_some_and(|c| c.1),
        cpu_d: f.cpu.is_some_and(|c| c.2),
        fill_d: f.fill_dirty,
        after: f.after.is_some(),
        after_pa: after.map(|c| c.0),
        after_w: after.is_some_and(|c| c.1),
    }
}

/// A violation the device found, for the event queue and the trace.
struct Found {
    /// The job that made the access (id, ASID), if one did.
    job: Option<(u64, u32)>,
    class: u16,
    va: u64,
    pa: u64,
    cpu_pa: Option<u64>,
    write: bool,
    why: &'static str,
}

impl Found {
    /// A [`ev::VIOL_PHYS_UNLENT`] access at `pa`.
    fn unlent(job: Option<(u64, u32)>, va: u64, pa: u64, write: bool, why: &'static str) -> Self {
        Self {
            job,
            class: ev::VIOL_PHYS_UNLENT,
            va,
            pa,
            cpu_pa: None,
            write,
            why,
        }
    }

    fn asid(&self) -> u32 {
        self.job.map_or(0, |j| j.1)
    }
}

/// Times [`read_context`] reads an entry the driver is rewriting before it gives up on it: the
/// first [`CTX_READ_SPINS`] back to back, the rest after yielding the host CPU (the guest's
/// writer may be a vCPU thread of this host that is not running).
const CTX_READ_TRIES: u32 = 1024;
/// See [`CTX_READ_TRIES`].
const CTX_READ_SPINS: u32 = 16;

/// Context entry `asid`, read whole: `None` if it is unreadable, or if the driver was rewriting
/// it through [`CTX_READ_TRIES`] reads (its sequence word odd, or changed while the other words
/// were read; see [`ContextEntry::seq`]). Every word is an atomic load, so no entry is used torn.
pub(crate) fn read_context(mem: &impl GuestMem, base: u64, asid: u32) -> Option<ContextEntry> {
    let addr = base.checked_add(u64::from(asid) * CTX_ENTRY_SIZE as u64)?;
    let word = |i: u64| mem.load_u64(addr.checked_add(8 * i)?).ok();
    for i in 0..CTX_READ_TRIES {
        let seq = word(3)?;
        if seq & 1 == 0 {
            let (flags, pt_root, cpu_root) = (word(0)?, word(1)?, word(2)?);
            if word(3)? == seq {
                return Some(ContextEntry {
                    flags,
                    pt_root,
                    cpu_root,
                    seq,
                });
            }
        }
        if i < CTX_READ_SPINS {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use shared_regs::cmd::{Command, CMD_INV_RANGE};
    use shared_regs::pte::{HUGE_PAGE_SIZE, PAGE_SIZE as PG};

    use super::*;
    use crate::events::EventLog;
    use crate::guest::MemError;
    use crate::testkit::{job, Rig, CPU_PT, FRAMES};
    use crate::x86pt::CpuFlags;
    use crate::{DeviceConfig, VecMem};

    const VA: u64 = 0x7f00_0000_0000;

    /// Guest memory that counts reads of the CPU page tables in `reads`: four per 4-level walk.
    struct CpuWalks<'a> {
        mem: &'a VecMem,
        reads: &'a Cell<u64>,
    }

    impl GuestMem for CpuWalks<'_> {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            if (CPU_PT..FRAMES).contains(&gpa) {
                self.reads.set(self.reads.get() + 1);
            }
            self.mem.read(gpa, buf)
        }

        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
            self.mem.write(gpa, buf)
        }

        fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
            self.mem.fetch_or_u64(gpa, bits)
        }

        fn copy(&self, src: u64, dst: u64, len: usize) -> Result<(), CopyError> {
            self.mem.copy(src, dst, len)
        }
    }

    /// (va, len, write, id) of every `dma_access`.
    fn accesses(r: &mut Rig<EventLog>) -> Vec<(u64, u64, bool, u64)> {
        r.activity()
            .iter()
            .filter_map(|a| match *a {
                Activity::DmaAccess {
                    va, len, write, id, ..
                } => Some((va, len, write, id)),
                _ => None,
            })
            .collect()
    }

    fn rig() -> Rig<EventLog> {
        Rig::with_asid1()
    }

    #[test]
    fn steps_end_at_the_first_page_boundary_of_either_side() {
        let mut r = rig();
        let (src, dst) = (VA, VA + 0x10_0000);
        let src_frames = r.patterned_pages(src, 4, 1);
        let dst_frames = r.patterned_pages(dst, 4, 100);
        let (src_off, dst_off, len) = (0x100, 0x800, 3 * PG);
        let mut want: Vec<u8> = src_frames
            .iter()
            .flat_map(|&f| r.peek(f, PG as usize))
            .collect();
        want.drain(..src_off as usize);
        want.truncate(len as usize);

        let reads = Cell::new(0);
        r.submit(job(DMA_COPY, 1, src + src_off, dst + dst_off, len, 0));
        let counting = CpuWalks {
            mem: &r.mem,
            reads: &reads,
        };
        while r.dev.process(&counting, 64) {}

        let mut got: Vec<u8> = dst_frames
            .iter()
            .flat_map(|&f| r.peek(f, PG as usize))
            .collect();
        got.drain(..dst_off as usize);
        got.truncate(len as usize);
        assert!(got == want, "copied across both sides' page boundaries");
        // Boundaries: the destination's at job offsets 0x800, 0x1800, 0x2800 and the source's
        // at 0xf00, 0x1f00, 0x2f00; each step is one read and one write.
        let cuts = [0, 0x800, 0xf00, 0x1800, 0x1f00, 0x2800, 0x2f00, 0x3000];
        let acts = accesses(&mut r);
        assert_eq!(acts.len(), 2 * (cuts.len() - 1), "{acts:x?}");
        for (step, w) in cuts.windows(2).enumerate() {
            let (at, n) = (w[0], w[1] - w[0]);
            let (read, write) = (acts[2 * step], acts[2 * step + 1]);
            assert_eq!((read.0, read.1, read.2), (src + src_off + at, n, false));
            assert_eq!((write.0, write.1, write.2), (dst + dst_off + at, n, true));
        }
        // Each page of either side translated once, each side of each step judged before and
        // after its bytes moved, with one CPU walk each time.
        assert_eq!(r.dev.stat(STAT_WALKS), 8);
        let steps = (cuts.len() - 1) as u64;
        let counts = r.dev.s.validator.counts();
        assert_eq!((counts.checks, counts.after_checks), (2 * steps, 2 * steps));
        assert_eq!(reads.get() / 4, 4 * steps);
        assert_eq!(r.dev.stat(STAT_VIOLATIONS), 0);
        let done = r.status(crate::testkit::STATUS);
        assert_eq!((done.status, done.bytes_done), (DMA_ST_OK, len));
    }

    /// Every step says in the trace whether it was judged, and the device counts both kinds:
    /// a context with validation off shows up as unjudged accesses, not as a clean run.
    #[test]
    fn judged_and_unjudged_steps_are_traced_and_counted() {
        let mut r = rig();
        r.patterned_pages(VA, 2, 3);
        let judged_of = |r: &mut Rig<EventLog>| -> Vec<bool> {
            r.activity()
                .iter()
                .filter_map(|a| match *a {
                    Activity::DmaAccess { judged, .. } => Some(judged),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(
            r.dma(job(DMA_CHECKSUM, 1, VA, 0, 2 * PG, 0)).status,
            DMA_ST_OK
        );
        let on = judged_of(&mut r);
        assert!(!on.is_empty() && on.iter().all(|&j| j), "{on:?}");
        let n = on.len() as u64;
        assert_eq!(
            (
                r.dev.stat(STAT_ACCESSES_JUDGED),
                r.dev.stat(STAT_ACCESSES_UNJUDGED)
            ),
            (n, 0)
        );
        // Validation off: the same job, every step unjudged.
        let mut c = r.ctx(1);
        c.flags |= pte::CTX_NO_VALIDATE;
        r.write_ctx(1, c);
        r.cfgi(1);
        assert_eq!(
            r.dma(job(DMA_CHECKSUM, 1, VA, 0, 2 * PG, 0)).status,
            DMA_ST_OK
        );
        let all = judged_of(&mut r);
        let off = &all[on.len()..];
        assert_eq!(off.len() as u64, n);
        assert!(off.iter().all(|&j| !j), "{off:?}");
        assert_eq!(
            (
                r.dev.stat(STAT_ACCESSES_JUDGED),
                r.dev.stat(STAT_ACCESSES_UNJUDGED)
            ),
            (n, n)
        );
    }

    /// A per-ASID statistic, read through the select register as a driver must (HI, LO, HI).
    fn asid_stat(r: &mut Rig<EventLog>, asid: u32, i: u32) -> u64 {
        r.set(ASID_STAT_SEL, asid);
        loop {
            let hi = r.reg(asid_stat_hi(i));
            let lo = r.reg(asid_stat_lo(i));
            if r.reg(asid_stat_hi(i)) == hi {
                return u64::from(hi) << 32 | u64::from(lo);
            }
        }
    }

    /// The device splits its judged and unjudged counts by ASID (ABI 1.9), so a driver can tell
    /// each context what was validated: the shares add up to the device-wide counters, another
    /// ASID's steps never land in them, a clear zeroes one ASID only, and a reset zeroes all.
    #[test]
    fn judged_and_unjudged_steps_are_counted_per_asid() {
        let mut r = rig();
        r.bind(2, pte::CTX_NO_VALIDATE);
        r.patterned_pages(VA, 2, 3);
        for p in 0..2 {
            r.map_page(2, VA + p * PG);
        }
        for asid in [1, 2, 1] {
            assert_eq!(
                r.dma(job(DMA_CHECKSUM, asid, VA, 0, 2 * PG, 0)).status,
                DMA_ST_OK
            );
        }
        let (judged, unjudged) = (
            r.dev.stat(STAT_ACCESSES_JUDGED),
            r.dev.stat(STAT_ACCESSES_UNJUDGED),
        );
        assert!(judged > 0 && unjudged > 0 && judged == 2 * unjudged);
        let per = |r: &mut Rig<EventLog>, asid| {
            (
                asid_stat(r, asid, ASID_STAT_JUDGED),
                asid_stat(r, asid, ASID_STAT_UNJUDGED),
            )
        };
        assert_eq!(per(&mut r, 1), (judged, 0));
        assert_eq!(per(&mut r, 2), (0, unjudged));
        assert_eq!(per(&mut r, 3), (0, 0), "an ASID that ran nothing");
        assert_eq!(r.reg(ASID_STAT_SEL), 3);
        r.set(ASID_STAT_SEL, 1 | ASID_STAT_CLEAR);
        assert_eq!(r.reg(ASID_STAT_SEL), 1, "the clear bit reads as 0");
        assert_eq!(per(&mut r, 1), (0, 0));
        assert_eq!(
            per(&mut r, 2),
            (0, unjudged),
            "a clear zeroes one ASID only"
        );
        assert_eq!(r.dev.stat(STAT_ACCESSES_JUDGED), judged, "nor the device's");
        assert_eq!(r.dev.error_bits(), 0);
        r.set(RESET, RESET_KEY);
        assert_eq!(r.reg(ASID_STAT_SEL), 0);
        assert_eq!(r.reg(asid_stat_lo(ASID_STAT_UNJUDGED)), 0);
        r.set(ASID_STAT_SEL, 2);
        assert_eq!(
            r.reg(asid_stat_lo(ASID_STAT_UNJUDGED)),
            0,
            "a reset zeroes all"
        );
    }

    /// A select beyond the ASIDs, or with reserved bits, is refused with `ERR_CONFIG` and keeps
    /// the selection (and the counters) as they were.
    #[test]
    fn a_bad_asid_stat_select_is_refused() {
        let mut r = rig();
        r.patterned_pages(VA, 1, 3);
        assert_eq!(r.dma(job(DMA_CHECKSUM, 1, VA, 0, PG, 0)).status, DMA_ST_OK);
        r.set(ASID_STAT_SEL, 1);
        let judged = r.reg(asid_stat_lo(ASID_STAT_JUDGED));
        assert!(judged > 0);
        let count = r.dev.config().asid_count;
        for bad in [
            count,
            ASID_STAT_ASID_MASK,
            1 << 16 | 1,
            count | ASID_STAT_CLEAR,
        ] {
            r.set(ASID_STAT_SEL, bad);
            assert_eq!(r.dev.error_bits(), ERR_CONFIG, "{bad:#x}");
            assert_eq!(r.reg(ERROR_INFO), ASID_STAT_SEL);
            r.set(ERROR, ERR_CONFIG);
            assert_eq!(r.reg(ASID_STAT_SEL), 1, "{bad:#x}: selection kept");
            assert_eq!(r.reg(asid_stat_lo(ASID_STAT_JUDGED)), judged);
        }
    }

    #[test]
    fn every_opcode_moves_whole_steps() {
        let mut r = rig();
        let (a, b) = (VA, VA + 0x10_0000);
        let fa = r.patterned_pages(a, 3, 7);
        let fb = r.patterned_pages(b, 3, 7);
        let off = 0x234;
        let len = 2 * PG;
        let bytes = |r: &Rig<EventLog>, frames: &[u64]| -> Vec<u8> {
            let all: Vec<u8> = frames
                .iter()
                .flat_map(|&f| r.peek(f, PG as usize))
                .collect();
            all[off as usize..(off + len) as usize].to_vec()
        };
        // Equal contents: COMPARE runs to the end; then one byte differs.
        let st = r.dma(job(DMA_COMPARE, 1, a + off, b + off, len, 0));
        assert_eq!(
            (st.status, st.result, st.bytes_done),
            (DMA_ST_OK, u64::MAX, len)
        );
        r.poke(fb[1] + 0x10, &[0xee]);
        let diff = PG - off + 0x10;
        let st = r.dma(job(DMA_COMPARE, 1, a + off, b + off, len, 0));
        assert_eq!(
            (st.status, st.result, st.bytes_done),
            (DMA_ST_OK, diff, diff)
        );
        // CHECKSUM is FNV-1a over the bytes, whatever the steps.
        let st = r.dma(job(DMA_CHECKSUM, 1, a + off, 0, len, 0));
        assert_eq!(st.result, fnv1a64(FNV_OFFSET, &bytes(&r, &fa)));
        // FILL keeps the pattern's phase across steps.
        let pat = 0x0807_0605_0403_0201u64;
        r.dma(job(DMA_FILL, 1, 0, b + off, len, pat));
        let filled = bytes(&r, &fb);
        assert!(filled
            .iter()
            .enumerate()
            .all(|(i, &x)| x == (i % 8) as u8 + 1));
        // READ then WRITE through the AUX buffer: a round trip.
        let aux = crate::testkit::AUX;
        r.dma(job(DMA_READ, 1, a + off, 0, len, aux));
        assert_eq!(r.peek(aux, len as usize), bytes(&r, &fa));
        r.dma(job(DMA_WRITE, 1, 0, b + off, len, aux));
        assert_eq!(bytes(&r, &fb), bytes(&r, &fa));
        // The offset splits every job into three steps, none longer than a page.
        let acts = accesses(&mut r);
        let lens: Vec<u64> = acts.iter().map(|a| a.1).collect();
        let three = [PG - off, PG, off];
        // The first COMPARE: three steps, two sides each.
        assert_eq!(
            lens[..6],
            [three[0], three[0], three[1], three[1], three[2], three[2]]
        );
        assert_eq!(r.dev.stat(STAT_VIOLATIONS), 0);
    }

    /// An invalidation between two steps dooms the translation the job still holds; the SYNC
    /// after it completes right after the step that moves the job off that page, and not before.
    #[test]
    fn sync_waits_exactly_until_the_job_leaves_the_doomed_page() {
        let mut r = rig();
        let (src, dst) = (VA, VA + 0x10_0000);
        r.patterned_pages(src, 3, 1);
        r.patterned_pages(dst, 3, 2);
        // Steps: [0, 0x800) ends the destination's first page, [0x800, 0xf00) the source's.
        r.submit(job(DMA_COPY, 1, src + 0x100, dst + 0x800, 2 * PG, 0));
        r.dev.process(&r.mem, 1); // fetch
        r.dev.process(&r.mem, 1); // step 1: the source is still on its first page
        assert_eq!(accesses(&mut r).len(), 2);
        let src_id = accesses(&mut r)[0].3;
        r.post(Command::new(CMD_INV_RANGE, 0, 1, src, PG));
        let s = r.post_sync();
        r.dev.process(&r.mem, 1); // INV, SYNC waits; step 2 still reads the doomed page
        assert!(!r.sync_done(s));
        assert_eq!(
            accesses(&mut r)[2],
            (
                src + 0xf00 - 0x100 + 0x100 - 0x800 + 0x800 - 0xf00 + 0x900,
                0x700,
                false,
                src_id
            )
        );
        r.dev.process(&r.mem, 1); // step 3 moves the source to its second page
        assert!(
            !r.sync_done(s),
            "commands ran before step 3 released the page"
        );
        r.dev.process(&r.mem, 1); // the SYNC completes first thing
        assert!(r.sync_done(s));

        let acts = r.activity();
        let inv = acts.iter().find_map(|a| match a {
            Activity::IotlbInvalidate { in_flight, .. } => Some(*in_flight),
            _ => None,
        });
        assert_eq!(inv, Some(1), "only the source's translation was held there");
        let done_at = acts
            .iter()
            .position(|a| matches!(a, Activity::SyncDone { .. }))
            .expect("sync_done");
        let before: Vec<(u64, u64)> = acts[..done_at]
            .iter()
            .filter_map(|a| match *a {
                Activity::DmaAccess { va, id, .. } => Some((va, id)),
                _ => None,
            })
            .collect();
        assert_eq!(before.len(), 6, "three steps ran before the SYNC completed");
        assert_eq!(
            before[4],
            (src + PG, before[4].1),
            "step 3 read the next source page"
        );
        assert_ne!(before[4].1, src_id);
        assert!(
            acts[done_at + 1..].iter().all(|a| !matches!(a,
                Activity::DmaAccess { id, .. } if *id == src_id)),
            "no use of the doomed translation after the SYNC"
        );
        assert!(matches!(
            acts[done_at],
            Activity::SyncDone { waited: 1, .. }
        ));
        r.run();
        assert_eq!(r.dev.stat(STAT_VIOLATIONS), 0);
    }

    /// CMD_LAG counts steps: with page steps, a lag of 2 lets the job move two more pages.
    #[test]
    fn cmd_lag_counts_page_steps() {
        let mut r = rig();
        r.patterned_pages(VA, 6, 0);
        r.set(CMD_LAG, 2);
        r.submit(job(DMA_FILL, 1, 0, VA, 6 * PG, 0x77));
        r.dev.process(&r.mem, 2); // fetch, page 0
        let s = r.post_sync();
        for page in 1..=2 {
            r.dev.process(&r.mem, 1);
            assert!(!r.sync_done(s), "lagged while the job writes page {page}");
        }
        r.dev.process(&r.mem, 1);
        assert!(r.sync_done(s), "the lag is over: commands first");
        let acts = accesses(&mut r);
        assert_eq!(
            acts.len(),
            4,
            "page 3 was written in that same round, after the SYNC"
        );
        assert_eq!(acts[2].0, VA + 2 * PG);
    }

    /// FAIL_DMA_HANG with page steps: one more step (a whole page), then nothing; the hung job
    /// keeps that page's translation, so a SYNC covering it never completes. FAIL_DIE fires
    /// before the next step touches memory.
    #[test]
    fn hang_and_death_fire_at_page_steps() {
        let mut r = rig();
        let frames = r.patterned_pages(VA, 3, 0);
        r.set(FAIL_INJECT, FAIL_DMA_HANG);
        let st = r.submit(job(DMA_FILL, 1, 0, VA, 3 * PG, 0x4242_4242_4242_4242));
        r.run();
        assert_eq!(accesses(&mut r).len(), 1, "one step, then the hang");
        assert_eq!(r.peek(frames[0] + PG - 1, 1), [0x42], "a whole page");
        assert_ne!(r.peek(frames[1], 1), [0x42]);
        assert_eq!(r.status(st).status, DMA_ST_PENDING);
        r.post(Command::new(CMD_INV_RANGE, 0, 1, VA, PG));
        let s = r.post_sync();
        r.run();
        assert!(!r.sync_done(s), "the hung job holds page 0");
        r.dev.set_bus_master(false);
        assert!(r.activity().contains(&Activity::BusMaster {
            enabled: false,
            job: Some(1),
            pos: Some(PG),
        }));

        let mut r = rig();
        let frames = r.patterned_pages(VA, 2, 0);
        let st = r.submit(job(DMA_FILL, 1, 0, VA, 2 * PG, 0x4242_4242_4242_4242));
        r.dev.process(&r.mem, 2); // fetch, page 0
        r.set(FAIL_INJECT, FAIL_DIE);
        r.run();
        assert!(r.dev.die_requested());
        assert_eq!(accesses(&mut r).len(), 1);
        assert_ne!(r.peek(frames[1], 1), [0x42], "died before the step");
        assert_eq!(r.status(st).status, DMA_ST_PENDING);
    }

    /// A 2 MiB translation serves every step inside it: one walk, one IOTLB lookup, and still
    /// one validator check (one CPU walk) per 4 KiB step, since the CPU may map 4 KiB pages
    /// under it.
    /// A COPY between 2 MiB device entries moves `dma_burst` bytes per step while both CPU
    /// leaves are 2 MiB too; over 4 KiB CPU pages its steps end at their boundaries, so every
    /// byte of a step has one translation and one verdict.
    #[test]
    fn copies_step_by_burst_inside_translations_and_cpu_leaves() {
        let burst = u64::from(DeviceConfig::default().dma_burst);
        assert!(burst > PG);
        for dst_cpu_huge in [true, false] {
            let mut r = rig();
            let (src, dst) = (0x7e00_0000_0000, 0x7e00_4000_0000);
            let (sf, df) = (r.huge_frame(), r.huge_frame());
            r.dev_map_2m(1, src, sf, false);
            r.dev_map_2m(1, dst, df, true);
            r.cpu_map_2m(1, src, sf, CpuFlags::WRITABLE_DIRTY);
            if dst_cpu_huge {
                r.cpu_map_2m(1, dst, df, CpuFlags::WRITABLE_DIRTY);
            } else {
                for p in 0..HUGE_PAGE_SIZE / PG {
                    r.cpu_map(1, dst + p * PG, df + p * PG, CpuFlags::WRITABLE_DIRTY);
                }
            }
            let (off, len) = (0x800, 3 * burst);
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
            r.poke(sf + off, &data);
            r.submit(job(DMA_COPY, 1, src + off, dst + off, len, 0));
            r.run();
            assert_eq!(r.peek(df + off, len as usize), data);
            let acts = accesses(&mut r);
            let step = if dst_cpu_huge { burst } else { PG };
            let writes: Vec<u64> = acts.iter().filter(|a| a.2).map(|a| a.1).collect();
            let first = if dst_cpu_huge { step } else { PG - off };
            assert_eq!(writes[0], first, "huge CPU leaf on dst: {dst_cpu_huge}");
            assert!(writes[1..writes.len() - 1].iter().all(|&n| n == step));
            assert_eq!(writes.iter().sum::<u64>(), len);
            assert_eq!(r.dev.s.validator.counts().checks, acts.len() as u64);
            assert_eq!(r.dev.stat(STAT_WALKS), 2);
            assert_eq!(r.dev.stat(STAT_VIOLATIONS), 0);
        }
    }

    #[test]
    fn a_huge_translation_serves_many_steps_without_a_walk() {
        let mut r = rig();
        let va = 0x7e00_0000_0000;
        let hf = r.huge_frame();
        r.dev_map_2m(1, va, hf, true);
        for p in 0..HUGE_PAGE_SIZE / PG {
            r.cpu_map(1, va + p * PG, hf + p * PG, CpuFlags::WRITABLE_DIRTY);
        }
        let len = 64 * PG;
        let reads = Cell::new(0);
        r.submit(job(DMA_FILL, 1, 0, va + 0x1000, len, 0x5a5a_5a5a_5a5a_5a5a));
        // Mid-job, an invalidation of a page the job has not reached dooms the whole 2 MiB
        // translation: the job keeps using it, the SYNC waits for the end of the job.
        for _ in 0..9 {
            r.dev.process(
                &CpuWalks {
                    mem: &r.mem,
                    reads: &reads,
                },
                1,
            );
        }
        r.post(Command::new(CMD_INV_RANGE, 0, 1, va + 0x10_0000, PG));
        let s = r.post_sync();
        r.dev.process(
            &CpuWalks {
                mem: &r.mem,
                reads: &reads,
            },
            1,
        );
        assert!(!r.sync_done(s));
        while r.dev.process(
            &CpuWalks {
                mem: &r.mem,
                reads: &reads,
            },
            64,
        ) {}
        assert!(r.sync_done(s));

        assert_eq!(r.peek(hf + 0x1000 + len - 1, 1), [0x5a]);
        assert_eq!(r.peek(hf + 0x1000 + len, 1), [0]);
        let acts = accesses(&mut r);
        assert_eq!(acts.len(), 64);
        assert!(acts
            .iter()
            .all(|&(_, n, w, id)| n == PG && w && id == acts[0].3));
        assert_eq!(r.dev.stat(STAT_WALKS), 1);
        assert_eq!(
            (r.dev.stat(STAT_IOTLB_MISSES), r.dev.stat(STAT_IOTLB_HITS)),
            (1, 0)
        );
        assert_eq!(r.dev.s.validator.counts().checks, 64);
        assert_eq!(r.dev.s.validator.counts().after_checks, 64);
        assert_eq!(
            reads.get() / 4,
            2 * 64,
            "two CPU walks per step, before and after its bytes moved: the fill's served its step's first"
        );
        assert_eq!(r.dev.stat(STAT_VIOLATIONS), 0);
        let waited = r.activity().iter().find_map(|a| match a {
            Activity::SyncDone { waited, .. } => Some(*waited),
            _ => None,
        });
        assert_eq!(waited, Some(64 - 8), "every step after the invalidation");
    }

    /// `(type, reason, va, info, info2)` of the events written so far.
    fn event_log(r: &mut Rig<EventLog>) -> Vec<(u8, u16, u64, u64, u64)> {
        r.take_events()
            .into_iter()
            .map(|e| (e.ty, e.reason, e.va, e.info, e.info2))
            .collect()
    }

    /// ASID 1 with `pages` pages mapped from `VA` and its context cached by a first job; then
    /// the "driver" rewrites the entry in memory to `flags` (pointers kept) and flushes the
    /// ASID's translations with INV_ASID + SYNC but no CFGI_CTX: the next access walks through
    /// the context the device still caches. Returns the walk's root.
    fn cached_then_rewritten(r: &mut Rig<EventLog>, pages: u64, flags: u64) -> u64 {
        for p in 0..pages {
            r.map_page(1, VA + p * PG);
        }
        assert_eq!(r.dma(job(DMA_CHECKSUM, 1, VA, 0, 8, 0)).status, DMA_ST_OK);
        let old = r.ctx(1);
        r.write_ctx(1, ContextEntry { flags, ..old });
        r.post(Command::new(shared_regs::cmd::CMD_INV_ASID, 0, 1, 0, 0));
        let s = r.post_sync();
        r.run();
        assert!(r.sync_done(s));
        assert!(event_log(r).is_empty());
        old.pt_root
    }

    #[test]
    fn a_walk_through_a_cached_context_the_driver_released_is_caught() {
        let mut r = rig();
        let root = cached_then_rewritten(&mut r, 2, pte::CTX_MM_RELEASED);
        let walks = r.dev.stat(STAT_WALKS);
        // One violation per walk (two pages: two walks), with the walk's root in `info`; the
        // walks translate as before (the validator then flags each access as `released`).
        let st = r.dma(job(DMA_CHECKSUM, 1, VA, 0, 2 * PG, 0));
        assert_eq!((st.status, st.bytes_done), (DMA_ST_OK, 2 * PG));
        assert_eq!(r.dev.stat(STAT_WALKS), walks + 2);
        let ctx_released = (ev::EVT_VIOLATION, ev::VIOL_CTX_RELEASED);
        let released = (ev::EVT_VIOLATION, ev::VIOL_RELEASED);
        let log = event_log(&mut r);
        let kinds: Vec<_> = log.iter().map(|e| (e.0, e.1)).collect();
        assert_eq!(kinds, [ctx_released, released, ctx_released, released]);
        assert_eq!((log[0].2, log[0].3, log[0].4), (VA, root, ev::NO_PA));
        assert_eq!((log[2].2, log[2].3, log[2].4), (VA + PG, root, ev::NO_PA));
        assert_eq!(r.dev.s.ctx_released, 2);
        assert_eq!(r.dev.stat(STAT_VIOLATIONS), 4);
        let traced = r.activity().into_iter().find_map(|a| match a {
            Activity::Violation {
                result: "ctx_released",
                pa,
                ..
            } => Some(pa),
            _ => None,
        });
        assert_eq!(traced, Some(root), "traced with the root in `pa`");
    }

    #[test]
    fn a_released_context_walk_that_faults_still_reports_and_faults_the_same() {
        // The walk's outcome does not depend on the check: the same fault either way.
        let outcome = |flags| {
            let mut r = rig();
            cached_then_rewritten(&mut r, 1, flags);
            r.dev_unmap(1, VA);
            let st = r.dma(job(DMA_CHECKSUM, 1, VA, 0, 8, 0));
            let kinds: Vec<_> = event_log(&mut r).iter().map(|e| (e.0, e.1)).collect();
            ((st.status, st.fault_reason), kinds)
        };
        let fault = (ev::EVT_FAULT, ev::FAULT_NOT_PRESENT);
        let (released, kinds) = outcome(pte::CTX_MM_RELEASED);
        assert_eq!(released, (DMA_ST_FAULT, ev::FAULT_NOT_PRESENT));
        assert_eq!(
            kinds,
            [(ev::EVT_VIOLATION, ev::VIOL_CTX_RELEASED), fault],
            "reported before the fault"
        );
        let (invalid, kinds) = outcome(0);
        assert_eq!(invalid, released);
        assert_eq!(kinds, [fault]);
    }

    /// No silent off-switch: an entry cleared in memory while the device still caches it (the
    /// window before its CFGI_CTX, or a driver that forgot it) does not let the access pass
    /// unjudged. The step faults before any byte moves, and the fault is traced.
    #[test]
    fn a_zeroed_context_entry_faults_the_step_instead_of_passing_unjudged() {
        let mut r = rig();
        cached_then_rewritten(&mut r, 1, 0);
        let counted = |r: &mut Rig<EventLog>| {
            r.dev.stat(STAT_ACCESSES_JUDGED) + r.dev.stat(STAT_ACCESSES_UNJUDGED)
        };
        let before = counted(&mut r);
        let pa = r.dev_leaf(1, VA).unwrap() & pte::PTE_ADDR_MASK;
        let old = r.peek(pa, 8);
        let st = r.dma(job(DMA_FILL, 1, 0, VA, 8, 0x5a5a_5a5a_5a5a_5a5a));
        assert_eq!(
            (st.status, st.fault_reason, st.bytes_done),
            (DMA_ST_FAULT, ev::FAULT_CTX_INVALID, 0)
        );
        assert_eq!(r.peek(pa, 8), old, "no byte moved");
        assert_eq!(counted(&mut r), before, "no access made");
        let kinds: Vec<_> = event_log(&mut r).iter().map(|e| (e.0, e.1)).collect();
        assert_eq!(kinds, [(ev::EVT_FAULT, ev::FAULT_CTX_INVALID)]);
        assert_eq!(r.dev.stat(STAT_VIOLATIONS), 0);
        let traced = r.activity().into_iter().any(|a| {
            matches!(a, Activity::Fault { result, .. } if result == ev::fault_name(ev::FAULT_CTX_INVALID))
        });
        assert!(traced, "the fault is in the trace");
    }

    #[test]
    fn after_cfgi_ctx_a_released_context_has_no_walk_to_report() {
        let mut r = rig();
        cached_then_rewritten(&mut r, 1, pte::CTX_MM_RELEASED);
        // The correct release: CFGI_CTX drops the cached entry; the entry now in memory is not
        // valid, so the access faults before any walk.
        r.cfgi(1);
        let walks = r.dev.stat(STAT_WALKS);
        let st = r.dma(job(DMA_CHECKSUM, 1, VA, 0, 8, 0));
        assert_eq!(
            (st.status, st.fault_reason),
            (DMA_ST_FAULT, ev::FAULT_CTX_INVALID)
        );
        assert_eq!(r.dev.stat(STAT_WALKS), walks);
        let kinds: Vec<_> = event_log(&mut r).iter().map(|e| (e.0, e.1)).collect();
        assert_eq!(kinds, [(ev::EVT_FAULT, ev::FAULT_CTX_INVALID)]);
        assert_eq!(r.dev.stat(STAT_VIOLATIONS), 0);
    }

    #[test]
    fn a_context_loaded_released_is_the_validators_not_this_checks() {
        // VALID | MM_RELEASED loaded with CFGI_CTX: the device was told; every access is a
        // `released` violation, the walk reports nothing more.
        let mut r = rig();
        r.map_page(1, VA);
        let c = r.ctx(1);
        r.write_ctx(
            1,
            ContextEntry {
                flags: c.flags | pte::CTX_MM_RELEASED,
                ..c
            },
        );
        r.cfgi(1);
        r.dma(job(DMA_CHECKSUM, 1, VA, 0, 8, 0));
        let kinds: Vec<_> = event_log(&mut r).iter().map(|e| (e.0, e.1)).collect();
        assert_eq!(kinds, [(ev::EVT_VIOLATION, ev::VIOL_RELEASED)]);
    }

    /// Writes context entry 1 as released (pointers kept) at the walker's first read of a
    /// device page-table page, as a driver would between the walker's table reads.
    struct ReleaseMidWalk<'a> {
        mem: &'a VecMem,
        done: Cell<bool>,
    }

    impl GuestMem for ReleaseMidWalk<'_> {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            let r = self.mem.read(gpa, buf);
            if (crate::testkit::DEV_PT..CPU_PT).contains(&gpa) && !self.done.replace(true) {
                let at = crate::testkit::CTX_TABLE + CTX_ENTRY_SIZE as u64;
                let mut raw = [0u8; CTX_ENTRY_SIZE];
                self.mem.read(at, &mut raw)?;
                let mut c = ContextEntry::from_bytes(&raw);
                c.flags = pte::CTX_MM_RELEASED;
                self.mem.write(at, &c.to_bytes())?;
            }
            r
        }

        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
            self.mem.write(gpa, buf)
        }

        fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
            self.mem.fetch_or_u64(gpa, bits)
        }
    }

    #[test]
    fn a_release_written_during_the_walk_is_seen_after_it() {
        // The entry is read once the walk is over, not when it starts.
        let mut r = rig();
        r.map_page(1, VA);
        r.dma(job(DMA_CHECKSUM, 1, VA, 0, 8, 0));
        r.post(Command::new(shared_regs::cmd::CMD_INV_ASID, 0, 1, 0, 0));
        r.post_sync();
        r.run();
        r.take_events();
        r.submit(job(DMA_CHECKSUM, 1, VA, 0, 8, 0));
        let mem = ReleaseMidWalk {
            mem: &r.mem,
            done: Cell::new(false),
        };
        while r.dev.process(&mem, 64) {}
        assert!(mem.done.get());
        let kinds: Vec<_> = event_log(&mut r).iter().map(|e| (e.0, e.1)).collect();
        assert_eq!(kinds[0], (ev::EVT_VIOLATION, ev::VIOL_CTX_RELEASED));
    }

    /// A driver rewriting context entry 1 while the device reads it: when the device's read
    /// reaches byte `at` of the entry, the "driver" writes `new` the way ABI 1.8 says (sequence
    /// word odd, the words, sequence word even), or stops halfway (`finish: false`: the
    /// sequence word stays odd, one word written).
    struct CtxWriterMidRead<'a> {
        mem: &'a VecMem,
        at: u64,
        new: ContextEntry,
        finish: bool,
        done: Cell<bool>,
    }

    const CTX1: u64 = crate::testkit::CTX_TABLE + CTX_ENTRY_SIZE as u64;

    impl CtxWriterMidRead<'_> {
        fn rewrite(&self) -> Result<(), MemError> {
            let seq = self.mem.read_u64(CTX1 + 24)?;
            self.mem.write_u64(CTX1 + 24, seq | 1)?;
            self.mem.write_u64(CTX1, self.new.flags)?;
            if !self.finish {
                return Ok(());
            }
            self.mem.write_u64(CTX1 + 8, self.new.pt_root)?;
            self.mem.write_u64(CTX1 + 16, self.new.cpu_root)?;
            self.mem.write_u64(CTX1 + 24, (seq | 1) + 1)
        }
    }

    impl GuestMem for CtxWriterMidRead<'_> {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            let split = CTX1 + self.at;
            let end = gpa + buf.len() as u64;
            if (gpa..end).contains(&split) && !self.done.replace(true) {
                let k = (split - gpa) as usize;
                self.mem.read(gpa, &mut buf[..k])?;
                self.rewrite()?;
                return self.mem.read(split, &mut buf[k..]);
            }
            self.mem.read(gpa, buf)
        }

        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
            self.mem.write(gpa, buf)
        }

        fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
            self.mem.fetch_or_u64(gpa, bits)
        }
    }

    /// The context entry read while the driver rewrites it (landing at byte `at` of the read).
    fn ctx_read_mid_write(at: u64, finish: bool) -> (Option<ContextEntry>, ContextEntry) {
        let r = rig();
        let old = r.ctx(1);
        let new = ContextEntry {
            flags: pte::CTX_VALID | pte::CTX_STALL,
            pt_root: old.pt_root + 0x20_0000,
            cpu_root: old.cpu_root + 0x20_0000,
            ..old
        };
        let mem = CtxWriterMidRead {
            mem: &r.mem,
            at,
            new,
            finish,
            done: Cell::new(false),
        };
        let got = read_context(&mem, crate::testkit::CTX_TABLE, 1);
        assert!(mem.done.get(), "the writer ran");
        (
            got,
            ContextEntry {
                seq: old.seq + 2,
                ..new
            },
        )
    }

    /// Item 5 of #24: a context entry is never used torn. Whichever word the driver's rewrite
    /// lands before, the device reads the old entry or the new one whole, and an entry left
    /// half-written (its sequence word odd) is not used at all.
    #[test]
    fn a_context_entry_rewritten_mid_read_is_never_used_torn() {
        for at in [8, 16, 24] {
            let (got, new) = ctx_read_mid_write(at, true);
            assert_eq!(got, Some(new), "rewrite landing at byte {at}");
        }
        assert_eq!(ctx_read_mid_write(8, false).0, None, "half-written entry");
    }

    /// ASID 1 with `pages` pages mapped at `VA`, the physical-DMA check on, the rig's status
    /// records, event ring and SYNC word declared as driver memory, and `AUX` as ASID 1's
    /// bounce buffer.
    fn phys_rig(pages_n: u64) -> Rig<EventLog> {
        use crate::testkit::{AUX, AUX_SIZE, EVTQ, STATUS, SYNC_WORD};
        let mut r = rig();
        r.patterned_pages(VA, pages_n, 5);
        let declare = |r: &mut Rig<EventLog>, pa: u64, len: u64, op: u32, asid: u32| {
            r.set(PHYS_ADDR_LO, pa as u32);
            r.set(PHYS_ADDR_HI, (pa >> 32) as u32);
            r.set(PHYS_LEN, len as u32);
            r.set(PHYS_CTRL, phys_ctrl(op, asid));
        };
        for (pa, len) in [(STATUS, 0x1_0000), (EVTQ, 0x8000), (SYNC_WORD, 8)] {
            declare(&mut r, pa, len, PHYS_OP_DRIVER, 0);
        }
        declare(&mut r, AUX, AUX_SIZE, PHYS_OP_BOUNCE, 1);
        r.set(PHYS_CTRL, PHYS_OP_CHECK);
        assert_eq!(r.reg(PHYS_CTRL), 1, "check on");
        r
    }

    fn phys_violations(r: &mut Rig<EventLog>) -> Vec<(u64, u64)> {
        event_log(r)
            .iter()
            .filter(|e| (e.0, e.1) == (ev::EVT_VIOLATION, ev::VIOL_PHYS_UNLENT))
            .map(|e| (e.2, e.3))
            .collect()
    }

    /// Item 4 of #24: a bounce buffer the driver takes back while a job still writes it (the
    /// next user fills it) is caught at each later step of that job, and not before; a job
    /// queued after the reclaim uses it legally.
    #[test]
    fn a_bounce_buffer_reclaimed_while_a_job_still_writes_it_is_caught() {
        use crate::testkit::AUX;
        let mut r = phys_rig(4);
        r.submit(job(DMA_READ, 1, VA, 0, 4 * PG, AUX));
        r.dev.process(&r.mem, 2); // fetch, first page
        r.set(PHYS_CTRL, phys_ctrl(PHYS_OP_RECLAIM, 1));
        r.run();
        let got = phys_violations(&mut r);
        let want: Vec<_> = (1..4).map(|p| (VA + p * PG, AUX + p * PG)).collect();
        assert_eq!(got, want, "the three steps after the reclaim");
        assert_eq!(r.dev.stat(STAT_VIOLATIONS), 3);
        // The next user's job, queued after the reclaim, is legal.
        assert_eq!(
            r.dma(job(DMA_READ, 1, VA, 0, 4 * PG, AUX)).status,
            DMA_ST_OK
        );
        assert_eq!(phys_violations(&mut r), []);
    }

    /// The correct order: the job retires, then the driver reclaims; nothing to report. A
    /// job outside its bounce buffer, or using another ASID's, is caught.
    #[test]
    fn bounce_buffer_use_is_checked_against_its_owner_and_bounds() {
        use crate::testkit::AUX;
        let mut r = phys_rig(2);
        assert_eq!(
            r.dma(job(DMA_WRITE, 1, 0, VA, 2 * PG, AUX)).status,
            DMA_ST_OK
        );
        r.set(PHYS_CTRL, phys_ctrl(PHYS_OP_RECLAIM, 1));
        assert_eq!(
            r.dma(job(DMA_READ, 1, VA, 0, 2 * PG, AUX)).status,
            DMA_ST_OK
        );
        assert_eq!(phys_violations(&mut r), []);
        // Past its end: only the step outside is caught.
        let end = AUX + crate::testkit::AUX_SIZE;
        assert_eq!(
            r.dma(job(DMA_READ, 1, VA, 0, 2 * PG, end - PG)).status,
            DMA_ST_OK
        );
        assert_eq!(phys_violations(&mut r), [(VA + PG, end)]);
        // Another ASID's buffer (ASID 2 has none).
        r.bind(2, 0);
        r.map_page(2, VA);
        assert_eq!(r.dma(job(DMA_READ, 2, VA, 0, 8, AUX)).status, DMA_ST_OK);
        assert_eq!(phys_violations(&mut r), [(VA, AUX)]);
        // A forgotten buffer.
        r.set(PHYS_CTRL, phys_ctrl(PHYS_OP_FORGET, 1));
        assert_eq!(r.dma(job(DMA_READ, 1, VA, 0, 8, AUX)).status, DMA_ST_OK);
        assert_eq!(phys_violations(&mut r), [(VA, AUX)]);
    }

    /// Status records and SYNC words written outside every driver region are caught; with the
    /// check off (the reset state) nothing is.
    #[test]
    fn status_and_sync_writes_outside_driver_memory_are_caught() {
        use crate::testkit::{STATUS, SYNC_WORD};
        let mut r = rig();
        r.map_page(1, VA);
        assert_eq!(r.dma(job(DMA_CHECKSUM, 1, VA, 0, 8, 0)).status, DMA_ST_OK);
        r.cfgi(1);
        assert_eq!(r.dev.stat(STAT_VIOLATIONS), 0, "check off");
        r.set(PHYS_CTRL, PHYS_OP_CHECK);
        let st = r.submit(job(DMA_CHECKSUM, 1, VA, 0, 8, 0));
        r.run();
        assert_eq!(r.status(st).status, DMA_ST_OK, "written all the same");
        assert!((STATUS..STATUS + 0x1_0000).contains(&st));
        assert_eq!(phys_violations(&mut r), [(0, st)]);
        r.cfgi(1);
        assert_eq!(phys_violations(&mut r), [(0, SYNC_WORD)]);
    }

    /// Bad PHYS_CTRL values are refused with ERR_CONFIG and change nothing.
    #[test]
    fn bad_physical_region_declarations_are_refused() {
        let mut r = rig();
        for v in [
            0,
            6,
            0xf,
            PHYS_OP_CHECK | 0x10,
            phys_ctrl(PHYS_OP_BOUNCE, 0x100),
        ] {
            r.set(PHYS_LEN, 0x1000);
            r.set(PHYS_CTRL, v);
            assert_ne!(r.reg(ERROR) & ERR_CONFIG, 0, "{v:#x}");
            assert_eq!(r.reg(ERROR_INFO), PHYS_CTRL);
            r.set(ERROR, ERR_CONFIG);
        }
        r.set(PHYS_LEN, 0);
        r.set(PHYS_CTRL, PHYS_OP_DRIVER);
        assert_ne!(r.reg(ERROR) & ERR_CONFIG, 0, "empty region");
        r.set(ERROR, ERR_CONFIG);
        r.set(PHYS_ADDR_LO, 0xffff_f000);
        r.set(PHYS_ADDR_HI, u32::MAX);
        r.set(PHYS_LEN, 0x2000);
        r.set(PHYS_CTRL, PHYS_OP_DRIVER);
        assert_ne!(r.reg(ERROR) & ERR_CONFIG, 0, "wrapping region");
        r.set(ERROR, ERR_CONFIG);
        r.set(PHYS_ADDR_HI, 0);
        r.set(PHYS_LEN, 8);
        for _ in 0..PHYS_DRIVER_MAX {
            r.set(PHYS_CTRL, PHYS_OP_DRIVER);
        }
        assert_eq!(r.reg(ERROR) & ERR_CONFIG, 0);
        r.set(PHYS_CTRL, PHYS_OP_DRIVER);
        assert_ne!(r.reg(ERROR) & ERR_CONFIG, 0, "table full");
        assert_eq!(r.reg(PHYS_CTRL), 0, "check still off");
    }

    /// Rewrites guest memory at `gpa` (a CPU page-table entry: a zap, a COW break, a dirty bit;
    /// or a context entry) when the device first reads data frame `frame`, before the read
    /// returns: a change that lands mid-access.
    struct ChangeMidAccess<'a> {
        mem: &'a VecMem,
        frame: u64,
        gpa: u64,
        new: Vec<u8>,
        done: Cell<bool>,
    }

    impl GuestMem for ChangeMidAccess<'_> {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            if (self.frame..self.frame + PG).contains(&gpa) && !self.done.replace(true) {
                self.mem.write(self.gpa, &self.new)?;
            }
            self.mem.read(gpa, buf)
        }

        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
            self.mem.write(gpa, buf)
        }

        fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
            self.mem.fetch_or_u64(gpa, bits)
        }
    }

    /// A device checksum of one page whose CPU leaf becomes `new_pte(old)` while the device
    /// reads it; returns the (class, va) of each violation event and the violation count.
    fn checksum_with_cpu_change(new_pte: impl Fn(u64) -> u64) -> (Vec<(u16, u64)>, u64) {
        let mut r = rig();
        let frame = r.map_page(1, VA);
        let pte_gpa = r.cpu_leaf_gpa(1, VA);
        let old = r.mem.read_u64(pte_gpa).expect("cpu leaf");
        r.submit(job(DMA_CHECKSUM, 1, VA, 0, PG, 0));
        let mem = ChangeMidAccess {
            mem: &r.mem,
            frame,
            gpa: pte_gpa,
            new: new_pte(old).to_le_bytes().to_vec(),
            done: Cell::new(false),
        };
        while r.dev.process(&mem, 64) {}
        assert!(mem.done.get(), "the device read the page");
        let violations = event_log(&mut r)
            .iter()
            .filter(|e| e.0 == ev::EVT_VIOLATION)
            .map(|e| (e.1, e.2))
            .collect();
        (violations, r.dev.stat(STAT_VIOLATIONS))
    }

    #[test]
    fn a_zap_landing_mid_access_is_caught_after_it() {
        // The walk before the access saw the page mapped; the CPU unmapped it while the bytes
        // moved (a driver that returned from its invalidation before the device was done).
        let (v, violations) = checksum_with_cpu_change(|_| 0);
        assert_eq!(violations, 1, "{v:x?}");
        assert_eq!(v, [(ev::VIOL_ZAPPED_DURING_ACCESS, VA)]);
    }

    #[test]
    fn a_page_remapped_mid_access_is_caught_after_it() {
        // COW or migration without the device's shootdown: same permissions, another frame.
        let (v, violations) = checksum_with_cpu_change(|old| old ^ (16 * PG));
        assert_eq!(violations, 1, "{v:x?}");
        assert_eq!(v, [(ev::VIOL_ZAPPED_DURING_ACCESS, VA)]);
    }

    /// The driver clearing the entry mid-step starts a teardown whose SYNC waits for the step:
    /// the step is judged after its access under the entry it began with, not skipped, and not
    /// walked through the cleared entry's null CPU root.
    #[test]
    fn a_context_cleared_mid_access_is_judged_after_under_the_entry_it_began_with() {
        let mut r = rig();
        let frame = r.map_page(1, VA);
        r.submit(job(DMA_CHECKSUM, 1, VA, 0, PG, 0));
        let mem = ChangeMidAccess {
            mem: &r.mem,
            frame,
            gpa: crate::testkit::CTX_TABLE + pte::CTX_ENTRY_SIZE as u64,
            new: ContextEntry::default().to_bytes().to_vec(),
            done: Cell::new(false),
        };
        while r.dev.process(&mem, 64) {}
        assert!(mem.done.get(), "the device read the page");
        assert_eq!(r.dev.stat(STAT_VIOLATIONS), 0, "{:x?}", event_log(&mut r));
        let afters: Vec<_> = r
            .activity()
            .into_iter()
            .filter_map(|a| match a {
                Activity::DmaAccess {
                    va,
                    after,
                    after_pa,
                    ..
                } if va == VA => Some((after, after_pa)),
                _ => None,
            })
            .collect();
        assert_eq!(afters, [(true, Some(frame))]);
    }

    #[test]
    fn accessed_and_dirty_bits_set_mid_access_are_no_violation() {
        // The CPU setting A/D on the same frame changes nothing the device relies on.
        let ad = crate::x86pt::X86_A | crate::x86pt::X86_D;
        let (events, violations) = checksum_with_cpu_change(|old| old | ad);
        assert_eq!(violations, 0, "{events:x?}");
    }
}
