// SPDX-License-Identifier: GPL-2.0

//! CPU page-table walks: populate (the `MAP` ioctl and fault service) and snapshots.

use super::*;

/// What an `hmm_range_fault()` pass over `ctx` needs: a user reference on its mm (`EINVAL` once
/// the process is gone) and room for one 2 MiB block of entries (allocated here, outside locks).
fn walk_setup(ctx: &Context) -> Result<(ARef<MmWithUserAsync>, KVec<HmmPfn>)> {
    let mm = ctx.mm().mmget_not_zero().ok_or(EINVAL)?;
    // A worker may hold the last user reference when the process exits: drop it asynchronously
    // so that exit_mmap() (and our Release callback) does not run in the worker.
    let mm = MmWithUser::into_mmput_async(mm);
    let mut pfns = KVec::with_capacity(ENTRIES, GFP_KERNEL)?;
    for _ in 0..ENTRIES {
        pfns.push(HmmPfn::EMPTY, GFP_KERNEL)?;
    }
    Ok((mm, pfns))
}

/// The end of the 2 MiB block holding `s`, capped at `end`: the unit of one populate pass.
fn block_end(s: u64, end: u64) -> u64 {
    end.min((s & !(HUGE - 1)) + HUGE)
}

/// Faults in one block and returns the notifier sequence its entries are valid for, or `None`
/// when an invalidation overtook the walk (retry).
fn fault_block(
    ctx: &Context,
    mm: &MmWithUser,
    start: u64,
    end: u64,
    request: HmmRequest,
    walk: Walk,
    pfns: &mut [HmmPfn],
) -> Result<Option<u64>> {
    let (s, e) = (start as usize, end as usize);
    match walk {
        Walk::Locked => {
            let seq = ctx.read_begin();
            match ctx.hmm_range_fault(mm, s, e, request, seq, pfns)? {
                FaultOutcome::Busy => Ok(None),
                FaultOutcome::Done => Ok(Some(seq)),
            }
        }
        Walk::Unlocked => {
            let timeout = msecs_to_jiffies(POPULATE_TIMEOUT_MS);
            ctx.hmm_range_fault_unlocked(mm, s, e, request, timeout, pfns)
                .map(Some)
        }
    }
}

/// Mirrors `[start, end)` (page aligned, inside the context's interval) into the device, with
/// write intent if `write`.
pub(crate) fn populate(
    ctx: &Context,
    start: u64,
    end: u64,
    access: Access,
    walk: Walk,
    out: &mut MapOut,
) -> Result {
    let (mm, mut pfns) = walk_setup(ctx)?;
    let mut s = start;
    while s < end {
        let e = block_end(s, end);
        let n = ((e - s) / PAGE) as usize;
        let pfns = &mut pfns[..n];
        // The bound is on retries: time spent waiting in a fault handler (a userfaultfd
        // handler resolving the page) does not count, the unlocked walk bounds its own retries;
        // nor does the test knob's populate lag (an artificial window, not the walk's work).
        let started = Instant::<Monotonic>::now();
        let mut not_counted = Delta::from_nanos(0);
        let mut retries = 0;
        loop {
            if started.elapsed() - not_counted > Delta::from_millis(POPULATE_TIMEOUT_MS.into())
                || (walk == Walk::Unlocked && retries >= FAULT_MAX_RETRIES)
            {
                return Err(EBUSY);
            }
            if walk == Walk::Unlocked && ctx.current_answered() {
                // The fault was aborted meanwhile (overdue, or its file closed).
                return Err(ECANCELED);
            }
            retries += 1;
            ctx.shared.check_live()?;
            bump(&ctx.stats.populates, 1);
            let walk_started = Instant::<Monotonic>::now();
            let faulted = fault_block(ctx, &mm, s, e, access.request(), walk, pfns)?;
            if let (Access::Around(page), Some(_)) = (access, faulted) {
                out.zero_after = zero_run_end(s, pfns, page);
            }
            if walk == Walk::Unlocked {
                not_counted += walk_started.elapsed();
            }
            let Some(seq) = faulted else {
                out.retries += 1;
                bump(&ctx.stats.populate_retries, 1);
                continue;
            };
            let ignore_retry = ctx.injected(testing::ZG_INJ_IGNORE_RETRY);
            let lag_started = Instant::<Monotonic>::now();
            ctx.populate_lag();
            not_counted += lag_started.elapsed();
            // A DMA map for a block that has none is allocated here, outside the lock.
            let spare = if ctx.wants_dma_spare.load(Ordering::Relaxed) {
                Some(ctx.shared.dma_spare()?)
            } else {
                None
            };
            let mut st = ctx.state.lock();
            let unused = st.dma.offer(spare);
            if st.released {
                return Err(EINVAL);
            }
            if !ignore_retry && ctx.read_retry(seq) {
                drop(st);
                drop(unused);
                out.retries += 1;
                bump(&ctx.stats.populate_retries, 1);
                continue;
            }
            let (p0, h0) = (out.pages, out.huge);
            let committed = ctx.commit(&mut st, s, e, pfns, access, out);
            ctx.wants_dma_spare
                .store(st.dma.wants_spare(), Ordering::Relaxed);
            drop(st);
            drop(unused);
            if committed == Err(EAGAIN) {
                // No spare map after all (another populate took it): allocate one, walk again.
                continue;
            }
            committed?;
            bump(&ctx.stats.pages_mapped, out.pages - p0);
            bump(&ctx.stats.huge_mapped, out.huge - h0);
            break;
        }
        s = e;
    }
    Ok(())
}

/// The CPU half of a snapshot byte for one HMM entry.
fn cpu_snapshot(p: HmmPfn) -> u8 {
    if p.error() {
        return uapi::ZG_SNAP_CPU_ERROR;
    }
    if !p.valid() {
        return 0;
    }
    let mut b = uapi::ZG_SNAP_CPU_VALID;
    if p.write() {
        b |= uapi::ZG_SNAP_CPU_WRITE;
    }
    if p.map_order() >= 9 {
        b |= uapi::ZG_SNAP_CPU_HUGE;
    }
    b
}

/// The device half of a snapshot byte for the page at `va`.
pub(super) fn device_snapshot(ctx: &Context, st: &mut PtState, va: u64) -> Result<u8> {
    let Some(l2) = ctx.l2_table(st, va, false)? else {
        return Ok(0);
    };
    let l2_entry = ctx.pool().read(l2, pte::pt_index(va, 2))?;
    let (leaf, huge) = if l2_entry & pte::PTE_P == 0 {
        return Ok(0);
    } else if l2_entry & pte::PTE_PS != 0 {
        (l2_entry, true)
    } else {
        let l1 = ctx.pool().page_at(l2_entry & pte::PTE_ADDR_MASK)?;
        (ctx.pool().read(l1, pte::pt_index(va, 1))?, false)
    };
    if leaf & pte::PTE_P == 0 {
        return Ok(0);
    }
    let mut b = uapi::ZG_SNAP_DEV_PRESENT;
    if leaf & pte::PTE_W != 0 {
        b |= uapi::ZG_SNAP_DEV_WRITE;
    }
    if huge {
        b |= uapi::ZG_SNAP_DEV_HUGE;
    }
    if leaf & pte::PTE_D != 0 {
        b |= uapi::ZG_SNAP_DEV_DIRTY;
    }
    Ok(b)
}

/// One byte per page of `[start, start + out.len() * 4096)`: `encode` of what
/// `hmm_range_fault()` sees there without faulting (takes the mmap lock; call it without the
/// context lock).
pub(crate) fn cpu_snapshot_with(
    ctx: &Context,
    start: u64,
    out: &mut [u8],
    encode: fn(HmmPfn) -> u8,
) -> Result {
    let end = start + out.len() as u64 * PAGE;
    let (mm, mut pfns) = walk_setup(ctx)?;
    let mut s = start;
    while s < end {
        let e = block_end(s, end);
        let n = ((e - s) / PAGE) as usize;
        let first = ((s - start) / PAGE) as usize;
        let pf = &mut pfns[..n];
        snapshot_block(ctx, &mm, s, e, pf)?;
        for (o, p) in out.iter_mut().skip(first).zip(pf.iter()) {
            *o = encode(*p);
        }
        s = e;
    }
    Ok(())
}

/// The CPU's entries for `[s, e)` (one block), written in full: a walk an invalidation
/// overtook (`Busy`) may have left entries unwritten, so it is walked again, for at most
/// [`POPULATE_TIMEOUT_MS`] (then `EBUSY`). The result is advisory (it may be stale as soon as
/// it is returned), but every byte describes what the CPU mapped at some point of the call.
fn snapshot_block(ctx: &Context, mm: &MmWithUser, s: u64, e: u64, pfns: &mut [HmmPfn]) -> Result {
    let started = Instant::<Monotonic>::now();
    loop {
        let seq = ctx.read_begin();
        let r = ctx.hmm_range_fault(mm, s as usize, e as usize, HmmRequest::Snapshot, seq, pfns)?;
        if r == FaultOutcome::Done {
            return Ok(());
        }
        if started.elapsed() > Delta::from_millis(POPULATE_TIMEOUT_MS.into()) {
            return Err(EBUSY);
        }
    }
}

/// One `ZG_SNAP_*` byte per page of `[start, start + out.len() * 4096)`.
pub(crate) fn snapshot(ctx: &Context, start: u64, out: &mut [u8]) -> Result {
    // CPU side first (takes the mmap lock; no context lock held).
    cpu_snapshot_with(ctx, start, out, cpu_snapshot)?;
    let mut st = ctx.state.lock();
    for (i, o) in out.iter_mut().enumerate() {
        *o |= device_snapshot(ctx, &mut st, start + i as u64 * PAGE)?;
    }
    Ok(())
}
