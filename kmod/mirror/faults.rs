// SPDX-License-Identifier: GPL-2.0

//! Device fault service: events from the device, the per-context fault queue and its work item,
//! aborts (overdue, fruitless, at close) and the fault-around window.

use super::*;

impl Mirror {
    /// Records an event of this context's ASID (counters, violations).
    fn record_event(&self, e: &ev::Event) {
        match e.ty {
            ev::EVT_FAULT => bump(&self.stats.faults, 1),
            ev::EVT_VIOLATION => {
                if let Some(c) = self.stats.violations.get(e.reason as usize) {
                    if c.fetch_add(1, Ordering::Relaxed) < VIOLATIONS_LOGGED {
                        self.log_violation(e);
                    }
                }
            }
            _ => {}
        }
    }

    /// Logs a violation event; `info` is a table's GPA for the walk checks' classes.
    fn log_violation(&self, e: &ev::Event) {
        let name = ev::violation_name(e.reason);
        match e.reason {
            ev::VIOL_TABLE_FREED => dev_warn!(
                self.shared.pdev.as_ref(),
                "asid {}: validator: {} violation at va {:#x}: walk read freed table {:#x}\n",
                self.asid,
                name,
                e.va,
                e.info
            ),
            ev::VIOL_CTX_RELEASED => dev_warn!(
                self.shared.pdev.as_ref(),
                "asid {}: validator: {} violation at va {:#x}: walk from root {:#x} through a context cached after its release\n",
                self.asid,
                name,
                e.va,
                e.info
            ),
            _ => dev_warn!(
                self.shared.pdev.as_ref(),
                "asid {}: validator: {} violation at va {:#x}: device used pa {:#x}, cpu maps {:#x}\n",
                self.asid,
                name,
                e.va,
                e.info,
                e.info2
            ),
        }
    }

    /// Records that job `id` was aborted because its fault could not be served.
    fn record_abort(&self, id: u64, err: Error) {
        self.abort.store(abort_word(id, err), Ordering::Relaxed);
    }

    /// The error recorded for job `id`, if any.
    pub(crate) fn abort_error(&self, id: u64) -> Option<Error> {
        let w = self.abort.load(Ordering::Relaxed);
        if w >> ABORT_ERRNO_BITS == id & ABORT_JOB_MASK {
            let errno = (w & ((1 << ABORT_ERRNO_BITS) - 1)) as i32;
            return Some(Error::from_errno(-errno));
        }
        None
    }

    /// Whether this context's fault in service is older than `job_timeout_ms` and not yet
    /// answered (a page whose fault never completes, a userfaultfd nobody answers).
    pub(crate) fn has_overdue_fault(&self) -> bool {
        let bound = job_timeout();
        matches!(self.faults.lock().current, Some((_, since, false)) if since.elapsed() > bound)
    }

    /// Aborts this context's fault in service if it is overdue ([`Self::has_overdue_fault`]):
    /// that job alone fails with `ETIMEDOUT` once the device retires it, and the device is free
    /// for other jobs; the work item's late answer is ignored.
    pub(crate) fn abort_overdue_fault(&self) {
        let bound = job_timeout();
        let overdue = {
            let mut q = self.faults.lock();
            match q.current.as_mut() {
                Some((f, since, answered)) if !*answered && since.elapsed() > bound => {
                    *answered = true;
                    self.shared.fault_answered();
                    Some(*f)
                }
                _ => None,
            }
        };
        if let Some(f) = overdue {
            dev_warn!(
                self.shared.pdev.as_ref(),
                "asid {}: fault at {:#x} not served within {} ms: job aborted\n",
                self.asid,
                f.va,
                bound.as_millis()
            );
            self.record_abort(f.job, ETIMEDOUT);
            bump(&self.stats.faults_aborted, 1);
            self.shared.answer_fault(self.asid, f.tag, false);
        }
    }

    /// Answers every fault of this context that is queued or in service with ABORT (`ECANCELED`
    /// for their jobs), so that its jobs end now rather than wait for a fault service that
    /// may never finish (file close: nobody waits for them any more).
    pub(super) fn abort_all_faults(&self) {
        let current = {
            let mut q = self.faults.lock();
            match q.current.as_mut() {
                Some((f, _, answered)) if !*answered => {
                    *answered = true;
                    Some(*f)
                }
                _ => None,
            }
        };
        if let Some(f) = current {
            self.finish_fault(&f, Err(ECANCELED));
        }
        while let Some(f) = self.faults.lock().pop() {
            self.finish_fault(&f, Err(ECANCELED));
        }
    }

    /// Answers a served (or unservable) fault: RESUME, or ABORT with the reason recorded for
    /// the job's waiter.
    fn finish_fault(&self, f: &Fault, served: Result) {
        if let Err(e) = served {
            self.record_abort(f.job, e);
        }
        self.count_fault_result(served.is_ok());
        self.shared.fault_answered();
        self.shared.answer_fault(self.asid, f.tag, served.is_ok());
    }

    pub(crate) fn count_job(&self) {
        bump(&self.stats.dma_jobs, 1);
    }

    fn count_fault_result(&self, ok: bool) {
        let c = if ok {
            &self.stats.faults_resolved
        } else {
            &self.stats.faults_aborted
        };
        bump(c, 1);
    }
    /// The next queued fault, now the one in service; clears `serving` when there is none.
    fn take_fault(&self) -> Option<Fault> {
        let mut q = self.faults.lock();
        let f = q.pop();
        q.current = f.map(|f| (f, Instant::<Monotonic>::now(), false));
        if f.is_none() {
            q.serving = false;
        }
        f
    }

    /// How many times in a row `f` came back after its service with no invalidation in
    /// between (0 for a new fault).
    fn fruitless_repeats(&self, f: &Fault) -> u32 {
        let invalidations = self.stats.invalidations.load(Ordering::Relaxed);
        match self.faults.lock().last {
            Some(l) if l.fault.same_access(f) && l.invalidations == invalidations => l.repeats + 1,
            _ => 0,
        }
    }

    /// Remembers that `f` was served (for [`Self::fruitless_repeats`]).
    fn note_served(&self, f: &Fault, repeats: u32) {
        let invalidations = self.stats.invalidations.load(Ordering::Relaxed);
        self.faults.lock().last = Some(LastServed {
            fault: *f,
            invalidations,
            repeats,
        });
    }

    /// Whether the fault in service was answered already (aborted).
    pub(super) fn current_answered(&self) -> bool {
        matches!(self.faults.lock().current, Some((_, _, true)))
    }

    /// Claims the answer to the fault in service: `false` if it was already answered (aborted
    /// as overdue, or at close), whose answer is then moot.
    fn claim_current(&self) -> bool {
        match self.faults.lock().current.as_mut() {
            Some((_, _, answered)) if !*answered => {
                *answered = true;
                true
            }
            _ => false,
        }
    }
}

/// The fault-around window for a fault at `page`: its aligned [`FAULT_AROUND`] block clamped to
/// the VMA. Just the page for a userfaultfd-registered VMA (its handler must only see the pages
/// the device touches) or when the VMA cannot be looked up.
fn fault_window(ctx: &Context, page: u64) -> (u64, u64) {
    let single = (page, page + PAGE);
    let Some(mm) = ctx.mm().mmget_not_zero() else {
        return single;
    };
    let mm = MmWithUser::into_mmput_async(mm);
    let guard = mm.mmap_read_lock();
    let Some(vma) = guard.vma_lookup(page as usize) else {
        return single;
    };
    if vma.userfaultfd_armed() {
        return single;
    }
    let block = page & !(FAULT_AROUND - 1);
    let start = block.max(vma.start() as u64);
    let end = (block + FAULT_AROUND)
        .min(vma.end() as u64)
        .min(pte::VA_LIMIT);
    (start, end)
}

/// Serves one device fault of `ctx` and returns the pages mapped.
///
/// A read maps the window around it ([`fault_window`]) with one `hmm_range_fault()`, or, if the
/// window cannot be faulted in whole (a neighbour that cannot be), just the page. A write must
/// not write any page but its own: write intent breaks COW, turns `MAP_PRIVATE` file pages into
/// anonymous copies and runs `page_mkwrite`, and `hmm_range_fault()` write-faults every page
/// from the first one it must fault to the end of its walk. So the window is mapped for read
/// first ([`Access::Around`]: writable where the CPU's already are, a 2 MiB entry where the
/// CPU maps 2 MiB writable), and then, unless that made the page device-writable, the page is
/// faulted for write, together with the pages after it that map the zero page: those were
/// never written, so write intent there breaks no COW and touches no file (a device that
/// writes fresh memory forward takes one fault per window, not one per page).
fn serve_fault(ctx: &Context, va: u64, write: bool) -> Result<u64> {
    if va >= pte::VA_LIMIT {
        return Err(EFAULT);
    }
    let page = va & !(PAGE - 1);
    let (start, end) = fault_window(ctx, page);
    let mut out = MapOut::default();
    if write && end - start == PAGE {
        populate(
            ctx,
            page,
            page + PAGE,
            Access::Write,
            Walk::Unlocked,
            &mut out,
        )?;
        return Ok(out.pages + out.huge * (HUGE / PAGE));
    }
    let around = if write {
        Access::Around(page)
    } else {
        Access::Read
    };
    let r = populate(ctx, start, end, around, Walk::Unlocked, &mut out);
    if write && !device_writable(ctx, page)? {
        let to = out.zero_after.clamp(page + PAGE, end);
        populate(ctx, page, to, Access::Write, Walk::Unlocked, &mut out)?;
    } else if r.is_err() && end - start > PAGE {
        out = MapOut::default();
        populate(ctx, page, page + PAGE, around, Walk::Unlocked, &mut out)?;
    } else {
        r?;
    }
    Ok(out.pages + out.huge * (HUGE / PAGE))
}

/// The end of the run of entries of `pfns` (which map from `s`) after `page` that are the zero
/// page.
pub(super) fn zero_run_end(s: u64, pfns: &[HmmPfn], page: u64) -> u64 {
    let Some(first) = page.checked_sub(s).map(|d| (d / PAGE) as usize + 1) else {
        return page + PAGE;
    };
    let run = pfns
        .iter()
        .skip(first)
        .take_while(|p| p.is_zero_page())
        .count();
    s + ((first + run) as u64) * PAGE
}

/// Whether the device PTE of `page` is present and writable.
fn device_writable(ctx: &Context, page: u64) -> Result<bool> {
    let mut st = ctx.state.lock();
    Ok(device_snapshot(ctx, &mut st, page)? & uapi::ZG_SNAP_DEV_WRITE != 0)
}

/// An event for `ctx`'s ASID (from the event interrupt thread): account it, and queue a stalled
/// fault for the context's work item. Never blocks on the mm.
pub(super) fn on_event(ctx: &Arc<Context>, e: &ev::Event) {
    ctx.record_event(e);
    if e.ty != ev::EVT_FAULT || e.flags & ev::EVT_F_STALLED == 0 {
        return;
    }
    let fault = Fault {
        va: e.va,
        write: e.flags & ev::EVT_F_WRITE != 0,
        tag: e.info,
        job: e.info2,
    };
    ctx.shared.fault_reported();
    let (queued, spawn) = {
        let mut q = ctx.faults.lock();
        let queued = q.push(fault);
        let spawn = queued && !q.serving;
        q.serving |= spawn;
        (queued, spawn)
    };
    if !queued {
        ctx.finish_fault(&fault, Err(EBUSY));
        return;
    }
    if spawn {
        let worker = ctx.clone();
        let spawned = match crate::fault_queue() {
            Some(q) => q
                .try_spawn(GFP_KERNEL, move || serve_queued_faults(&worker))
                .map_err(|_| ENOMEM),
            None => Err(ENODEV),
        };
        if let Err(e) = spawned {
            // No memory for the work item: serve nothing, abort what is queued.
            while let Some(f) = ctx.take_fault() {
                if ctx.claim_current() {
                    ctx.finish_fault(&f, Err(e));
                }
            }
        }
    }
}

/// A context's fault work: serves its queued faults in order, then stops.
fn serve_queued_faults(ctx: &Arc<Context>) {
    while let Some(f) = ctx.take_fault() {
        let repeats = ctx.fruitless_repeats(&f);
        if repeats >= FRUITLESS_FAULT_REPEATS {
            dev_warn!(
                ctx.shared.pdev.as_ref(),
                "asid {}: job {} faulted {} times at {:#x} (write {}) with nothing invalidated in between: aborting it\n",
                ctx.asid,
                f.job,
                repeats + 1,
                f.va,
                f.write
            );
            if ctx.claim_current() {
                ctx.finish_fault(&f, Err(EFAULT));
            }
            continue;
        }
        let served = serve_fault(ctx, f.va, f.write);
        ctx.note_served(&f, repeats);
        if let Ok(pages) = served {
            bump(&ctx.stats.fault_pages, pages);
        }
        if ctx.claim_current() {
            ctx.finish_fault(&f, served.map(|_| ()));
        }
    }
}
