//! The command queue: invalidations, context-cache invalidation, SYNC, RESUME/ABORT.
//!
//! Commands execute in order. A malformed command stops the queue (SMMUv3's CMDQ_ERR): the
//! consumer keeps pointing at it with the error code until the driver clears `ERR_CMDQ`. A SYNC
//! whose invalidations are still used by the in-flight DMA job blocks the queue until the job
//! moves past those translations; DMA keeps running meanwhile, so this always resolves (unless
//! a hang is injected). A waiting SYNC is held in the device (`PendingSync`), not fetched
//! again.
//!
//! Injected failures ([`crate::inject`]) act here too: [`FAIL_CMDQ_STOP`] stops fetching,
//! [`FAIL_CMDQ_ERROR`] answers the next command with [`CERR_INJECTED`], and
//! [`FAIL_SYNC_DELAY`] gives each SYNC reached a deadline before which it does not complete.
//! The [`SYNC_LAG`](shared_regs::regs::SYNC_LAG) knob gives it one too (not a failure: not
//! traced as one); with both, the later deadline applies (`SyncHold`).

use shared_regs::cmd::*;
use shared_regs::pci::Vector;
use shared_regs::queue;
use shared_regs::regs::{
    CR0_CMDQ_EN, ERR_CMDQ, FAIL_CMDQ_ERROR, FAIL_CMDQ_STOP, FAIL_NONE, FAIL_SYNC_DELAY,
    STAT_COMMANDS, STAT_SYNCS,
};
use std::time::{Duration, Instant};

use crate::device::ZapguardDevice;
use crate::events::{Activity, Events};
use crate::guest::GuestMem;
use crate::iotlb::IotlbEntry;

/// Outcome of one command.
enum Exec {
    Done(&'static str),
    /// A SYNC waiting (for in-flight DMA or its deadline); `true` if it was just fetched.
    Blocked(bool),
    Error(u8),
}

/// A SYNC the device fetched and holds at the head of the queue until it may complete.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingSync {
    /// Its queue position (the consumer index while it waits).
    pub(crate) pos: u32,
    pub(crate) cmd: Command,
    pub(crate) hold: SyncHold,
}

/// The time a SYNC must wait for, fixed when the device reaches it: the later of its
/// [`FAIL_SYNC_DELAY`] and [`SYNC_LAG`](shared_regs::regs::SYNC_LAG) deadlines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SyncHold {
    /// Not before this time (`None`: as soon as its other conditions are met).
    pub(crate) due: Option<Instant>,
    /// [`FAIL_SYNC_DELAY`] delayed it (its completion or drop is traced as that failure).
    pub(crate) delayed: bool,
    /// The [`SYNC_LAG`](shared_regs::regs::SYNC_LAG) in force when it was reached, in
    /// microseconds (0: none).
    pub(crate) lag_us: u32,
}

/// Name of an opcode, for traces.
pub fn op_name(op: u8) -> &'static str {
    match op {
        CMD_NOP => "nop",
        CMD_INV_RANGE => "inv_range",
        CMD_INV_ASID => "inv_asid",
        CMD_INV_ALL => "inv_all",
        CMD_CFGI_CTX => "cfgi_ctx",
        CMD_SYNC => "sync",
        CMD_RESUME => "resume",
        CMD_ABORT => "abort",
        _ => "unknown",
    }
}

/// Name of a `CERR_*` code, for traces.
pub fn cerr_name(code: u8) -> &'static str {
    match code {
        CERR_ILLEGAL => "illegal",
        CERR_ASID => "bad_asid",
        CERR_RANGE => "bad_range",
        CERR_ABORT => "abort",
        CERR_INJECTED => "injected",
        _ => "unknown",
    }
}

const PAGE_MASK: u64 = shared_regs::pte::PAGE_SIZE - 1;

impl<E: Events> ZapguardDevice<E> {
    /// Executes commands until the queue is empty, stopped or blocked by a SYNC. Returns
    /// whether anything changed.
    pub(crate) fn run_commands(&mut self, mem: &impl GuestMem) -> bool {
        let mut progress = false;
        if self.armed(FAIL_CMDQ_STOP) {
            return false;
        }
        if self.s.lag_left > 0 {
            // CMD_LAG: only a running job makes the commands wait (each step counts down).
            if self.job_runs() {
                return false;
            }
            self.s.lag_left = 0;
        }
        while self.s.cr0ack & CR0_CMDQ_EN != 0 && self.s.cmdq_err == 0 && !self.s.cmdq.is_empty() {
            let pos = self.s.cmdq.cons;
            let (cmd, exec) = match self.s.pending_sync.take() {
                Some(p) if p.pos == pos => (p.cmd, self.sync(mem, pos, &p.cmd, Some(p.hold))),
                _ => {
                    let mut raw = [0u8; CMD_SIZE];
                    let fetched = self
                        .s
                        .cmdq
                        .slot(pos, CMD_SIZE)
                        .is_some_and(|a| mem.read(a, &mut raw).is_ok());
                    let cmd = Command::from_bytes(&raw);
                    let exec = if !fetched {
                        Exec::Error(CERR_ABORT)
                    } else if self.armed(FAIL_CMDQ_ERROR) {
                        // One-shot: the command itself is not looked at.
                        self.s.inject.mode = FAIL_NONE;
                        self.fail_event(FAIL_CMDQ_ERROR, "command error injected", Some(pos), None);
                        Exec::Error(CERR_INJECTED)
                    } else {
                        self.execute(mem, pos, &cmd)
                    };
                    (cmd, exec)
                }
            };
            let result = match exec {
                Exec::Blocked(fetched) => {
                    // Fetching the SYNC changed the device's state even though it cannot
                    // complete yet (`has_work` now sees it waiting).
                    progress |= fetched;
                    break;
                }
                Exec::Done(result) => result,
                Exec::Error(code) => cerr_name(code),
            };
            self.activity(Activity::Command {
                cmd: pos,
                op: op_name(cmd.op),
                asid: cmd.asid,
                va: cmd.addr,
                len: cmd.arg,
                result,
            });
            progress = true;
            if let Exec::Error(code) = exec {
                // The queue stops here: CONS keeps pointing at the bad command.
                self.s.cmdq_err = code;
                self.activity(Activity::QueueError {
                    queue: "cmdq",
                    cmd: pos,
                    result,
                });
                self.set_error(ERR_CMDQ, pos);
                break;
            }
            self.s.cmdq.cons = queue::next(pos, self.s.cmdq.log2);
            self.s.stats[STAT_COMMANDS as usize] += 1;
        }
        progress
    }

    fn execute(&mut self, mem: &impl GuestMem, pos: u32, c: &Command) -> Exec {
        if c.reserved0 != 0 || c.reserved1 != 0 {
            return Exec::Error(CERR_ILLEGAL);
        }
        let allowed_flags = if c.op == CMD_SYNC { CMD_F_SYNC_IRQ } else { 0 };
        if c.flags & !allowed_flags != 0 {
            return Exec::Error(CERR_ILLEGAL);
        }
        // Which operands each opcode takes; the rest must be zero.
        let (uses_asid, uses_addr, uses_arg) = match c.op {
            CMD_NOP | CMD_INV_ALL => (false, false, false),
            CMD_INV_RANGE => (true, true, true),
            CMD_INV_ASID | CMD_CFGI_CTX => (true, false, false),
            CMD_SYNC => (false, true, true),
            CMD_RESUME | CMD_ABORT => (true, false, true),
            _ => return Exec::Error(CERR_ILLEGAL),
        };
        if (!uses_asid && c.asid != 0) || (!uses_addr && c.addr != 0) || (!uses_arg && c.arg != 0) {
            return Exec::Error(CERR_ILLEGAL);
        }
        if uses_asid && c.asid >= self.config.asid_count {
            return Exec::Error(CERR_ASID);
        }
        match c.op {
            CMD_NOP => Exec::Done("ok"),
            CMD_INV_RANGE => {
                let end = c.addr.checked_add(c.arg);
                if c.addr & PAGE_MASK != 0 || c.arg == 0 || c.arg & PAGE_MASK != 0 || end.is_none()
                {
                    return Exec::Error(CERR_RANGE);
                }
                let dropped = self.s.iotlb.invalidate_range(c.asid, c.addr, c.arg);
                let (va, len) = (c.addr, c.arg);
                let held = self.doom_held(|e| {
                    e.asid == c.asid && e.va_base < va + len && va < e.va_base + e.size
                });
                self.invalidated(pos, Some(c.asid), va, len, &dropped, held);
                Exec::Done("ok")
            }
            CMD_INV_ASID => {
                let dropped = self.s.iotlb.invalidate_asid(c.asid);
                let held = self.doom_held(|e| e.asid == c.asid);
                self.invalidated(pos, Some(c.asid), 0, u64::MAX, &dropped, held);
                Exec::Done("ok")
            }
            CMD_INV_ALL => {
                let dropped = self.s.iotlb.invalidate_all();
                let held = self.doom_held(|_| true);
                self.invalidated(pos, None, 0, u64::MAX, &dropped, held);
                Exec::Done("ok")
            }
            CMD_CFGI_CTX => {
                self.s.ctx_cache.remove(&c.asid);
                Exec::Done("ok")
            }
            CMD_SYNC => self.sync(mem, pos, c, None),
            CMD_RESUME | CMD_ABORT => {
                if self.answer_stall(mem, c.asid, c.arg, c.op == CMD_RESUME) {
                    Exec::Done("ok")
                } else {
                    // The job may have ended another way (context disabled, queue reset): a late
                    // answer is harmless, as with SMMUv3's stale STAG.
                    Exec::Done("ignored")
                }
            }
            _ => Exec::Error(CERR_ILLEGAL),
        }
    }

    /// Executes a SYNC: `held` is `Some(hold)` for one already fetched and waiting.
    fn sync(&mut self, mem: &impl GuestMem, pos: u32, c: &Command, held: Option<SyncHold>) -> Exec {
        let hold = match held {
            Some(hold) => hold,
            None => {
                if !c.addr.is_multiple_of(4) || c.arg > u64::from(u32::MAX) {
                    return Exec::Error(CERR_ILLEGAL);
                }
                self.sync_hold(pos)
            }
        };
        // In-flight DMA still using a translation an earlier command invalidated: wait for it.
        let dma = self.s.job.as_ref().is_some_and(|j| j.holds_doomed());
        if dma || hold.due.is_some_and(|d| self.clock.now() < d) {
            self.s.pending_sync = Some(PendingSync { pos, cmd: *c, hold });
            return Exec::Blocked(held.is_none());
        }
        if c.addr != 0 && !self.s.phys.driver_write_ok(c.addr, 4) {
            self.phys_unlent(
                mem,
                None,
                0,
                c.addr,
                true,
                "SYNC word outside driver memory",
            );
        }
        if c.addr != 0 && mem.write_u32(c.addr, c.arg as u32).is_err() {
            return Exec::Error(CERR_ABORT);
        }
        if hold.delayed {
            self.fail_event(FAIL_SYNC_DELAY, "delayed sync completed", Some(pos), None);
        }
        self.s.ledger.sync_completed();
        self.s.stats[STAT_SYNCS as usize] += 1;
        let waited = std::mem::take(&mut self.s.sync_waited);
        self.activity(Activity::SyncDone {
            cmd: pos,
            pa: c.addr,
            value: c.arg as u32,
            waited,
            lag_us: hold.lag_us,
        });
        if c.flags & CMD_F_SYNC_IRQ != 0 {
            self.raise(Vector::Command);
        }
        Exec::Done("ok")
    }

    /// The time before which a SYNC reached now must not complete: [`FAIL_SYNC_DELAY`]'s
    /// deadline, [`SYNC_LAG`](shared_regs::regs::SYNC_LAG)'s, the later of both, or none.
    fn sync_hold(&mut self, pos: u32) -> SyncHold {
        let now = self.clock.now();
        // At most 2^32 ms (49 days) ahead: a monotonic clock does not overflow on that.
        let after = |d: Duration| Some(now.checked_add(d).unwrap_or(now));
        let delayed = self.armed(FAIL_SYNC_DELAY);
        let delay_due = if delayed {
            self.fail_event(FAIL_SYNC_DELAY, "sync delayed", Some(pos), None);
            after(Duration::from_millis(u64::from(self.s.inject.arg)))
        } else {
            None
        };
        let lag = self.sync_lag();
        // `None` orders before any `Some`: the later deadline wins.
        let due = delay_due.max(lag.and_then(after));
        SyncHold {
            due,
            delayed,
            lag_us: lag.map_or(0, |d| d.as_micros() as u32),
        }
    }

    /// Marks the active job's held translations matching `pred` as doomed (usable until the
    /// next SYNC, which waits for them); returns their ids.
    fn doom_held(&mut self, pred: impl Fn(&IotlbEntry) -> bool) -> Vec<u64> {
        let mut ids = vec![];
        if let Some(job) = self.s.job.as_mut() {
            for h in job.held.iter_mut().flatten() {
                if pred(&h.entry) {
                    h.doomed = true;
                    ids.push(h.entry.id);
                }
            }
        }
        ids
    }

    fn invalidated(
        &mut self,
        pos: u32,
        asid: Option<u32>,
        va: u64,
        len: u64,
        dropped: &[IotlbEntry],
        held: Vec<u64>,
    ) {
        for e in dropped {
            self.s.ledger.invalidated(e.id);
        }
        for id in &held {
            self.s.ledger.invalidated(*id);
        }
        self.activity(Activity::IotlbInvalidate {
            cmd: pos,
            asid,
            va,
            len,
            dropped: dropped.len(),
            in_flight: held.len(),
        });
    }
}
