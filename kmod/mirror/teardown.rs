// SPDX-License-Identifier: GPL-2.0

//! Context lifetime: disabling the context on the device, freeing its tables after the SYNC,
//! the `Release` of the address space, unbind and close.

use super::*;

impl Mirror {
    /// Unbind, after the fence: clears every device PTE (marking the pages the device wrote
    /// dirty) and unmaps every page for DMA. The tables stay until the file closes.
    pub(crate) fn unmap_for_unbind(&self) {
        let mut st = self.state.lock();
        if st.root.is_some() {
            let _ = self.shootdown(&mut st, 0, pte::VA_LIMIT, Wait::Sleep, &[], Change::Clear);
        }
        st.dma.clear();
    }

    /// Frees the tables detached before the SYNC that just completed (or the fence). A level-1
    /// table detached whole still holds its leaves: their D bits are final only now (a walk
    /// that read the table before it was detached could set one until the SYNC), so the pages
    /// of those set are marked dirty here, still inside the invalidation callback.
    pub(super) fn free_deferred(&self, st: &mut PtState) {
        while let Some((page, base)) = st.deferred.pop() {
            if self.pool().present(page.id()).unwrap_or(0) > 0 {
                for idx in 0..ENTRIES {
                    let old = self.pool().read(page.id(), idx).unwrap_or(0);
                    leaf_dropped(&mut st.dma, base + idx as u64 * PAGE, old);
                }
            }
            self.pool().free(page);
            st.pages -= 1;
        }
    }

    /// Frees every table below `table` (a table at `level`), not `table` itself. Only once the
    /// device can no longer reach any of them.
    fn free_tree(&self, st: &mut PtState, table: PtRef, level: u32) -> Result {
        if level == 1 {
            return Ok(());
        }
        for i in 0..ENTRIES {
            if let Some(child) = self.pool().detach(table, i)? {
                self.free_tree(st, child.id(), level - 1)?;
                self.pool().free(child);
                st.pages -= 1;
            }
        }
        Ok(())
    }

    /// Disables the context on the device and drops every mapping: the device can no longer
    /// reach this address space when this returns (it confirmed, or it is fenced). `flags` is
    /// what the context entry says afterwards (0, or `CTX_MM_RELEASED` so that the validator
    /// flags any later use); it is written only once the device confirmed the context is off,
    /// since the validator reads it uncached and DMA still in flight before the SYNC is legal.
    pub(super) fn disable(&self, st: &mut PtState, flags: u64) -> Result<Synced> {
        let hw = &self.shared.hw;
        hw.write_ctx(self.asid, &pte::ContextEntry::default())?;
        let load = self.load_cmds();
        let cmds = self.disable_cmds(&load);
        let (_, synced) = self.shootdown(st, 0, pte::VA_LIMIT, Wait::Sleep, cmds, Change::Clear)?;
        let synced = synced.unwrap_or(Synced::Fenced);
        if matches!(synced, Synced::Done(_)) && flags != 0 {
            let entry = pte::ContextEntry {
                flags,
                ..Default::default()
            };
            hw.write_ctx(self.asid, &entry)?;
        }
        // With the context invalid and its translations flushed (or the device fenced), no
        // walk can reach the tables.
        let root = st.root()?;
        self.free_tree(st, root, pte::PT_LEVELS)?;
        st.dma.clear();
        Ok(synced)
    }

    /// File close, device side: disable the context, wait for its queued jobs, then free the
    /// ASID, or quarantine it if the device did not confirm.
    pub(super) fn close_device(&self) {
        // No aging query may look at the tables once teardown starts.
        self.aging.unregister();
        let shared = &self.shared;
        shared.unpublish(self.asid);
        // Its jobs must not wait for a fault service that may never finish (a userfaultfd
        // nobody answers): they end with ABORT now, and the work item's answer is moot.
        self.abort_all_faults();
        let synced = {
            let mut st = self.state.lock();
            let r = self.disable(&mut st, 0);
            st.released = true;
            r
        };
        #[cfg(zapguard_test)]
        if self.set_knobs.load(Ordering::Relaxed) {
            shared.reset_knobs();
        }
        // A job queued by a task that was killed still names this ASID: the ASID may be reused
        // only once it is gone (it ends quickly: the context is invalid).
        let idle = shared
            .hw
            .jobs
            .wait_idle(&shared.bar, self.asid, &shared.health);
        if idle.is_ok() {
            shared
                .hw
                .jobs
                .forget_bounce(&self.bounce, self.asid, &shared.bar);
        }
        match (synced, idle) {
            (Ok(Synced::Done(_)), Ok(())) => shared.free_asid(self.asid),
            (synced, _) => {
                match synced {
                    Err(e) if !shared.unbound_under(e) => {
                        dev_err!(
                            self.shared.pdev.as_ref(),
                            "asid {}: disable failed: {:?}\n",
                            self.asid,
                            e
                        );
                    }
                    _ => {}
                }
                shared.quarantine_asid(self.asid);
            }
        }
        self.asid_done.store(true, Ordering::Relaxed);
    }

    /// Whether the address space is gone.
    pub(crate) fn released(&self) -> bool {
        self.state.lock().released
    }

    /// Takes a context whose tables cannot be trusted off the device: its entry is cleared and
    /// reloaded and its ASID flushed (SYNCed, or the device fenced), so no walk uses its tables
    /// any more; its tables are kept (they cannot be walked to be freed), and its calls get
    /// `EINVAL` from now on.
    pub(super) fn abandon(&self, st: &mut PtState) {
        st.released = true;
        if self
            .shared
            .hw
            .write_ctx(self.asid, &pte::ContextEntry::default())
            .is_err()
        {
            // The entry could not be cleared: only a fence stops the device reading it.
            self.shared.fail(crate::device::Failure::QueueError);
            return;
        }
        let _ = self.shared.sync(&self.load_cmds());
    }

    /// Handles the `Release` event: disable the context before the page tables go.
    pub(super) fn release(&self, st: &mut PtState, mm: &kernel::mm::Mm) {
        st.released = true;
        if self.injected(testing::ZG_INJ_KEEP_AFTER_RELEASE) {
            // Bug on purpose: tell the validator the mm is gone, leave the context enabled.
            let flags = self.no_validate_flag() | pte::CTX_MM_RELEASED;
            if let Ok(entry) = st.root().and_then(|root| self.entry(root, mm, flags)) {
                let _ = self.shared.hw.write_ctx(self.asid, &entry);
            }
            return;
        }
        if let Err(e) = self.disable(st, pte::CTX_MM_RELEASED) {
            dev_err!(
                self.shared.pdev.as_ref(),
                "asid {}: release failed: {:?}\n",
                self.asid,
                e
            );
        }
    }

    /// The commands that take the context off the device: all of `load` (`CFGI_CTX` +
    /// `INV_ASID`), or, under `ZG_INJ_SKIP_CTX_INVALIDATE` (a bug on purpose), `INV_ASID` alone,
    /// so that the device keeps its cached copy of the entry.
    fn disable_cmds<'a>(&self, load: &'a [cmd::Command; 2]) -> &'a [cmd::Command] {
        if self.injected(testing::ZG_INJ_SKIP_CTX_INVALIDATE) {
            &load[1..]
        } else {
            &load[..]
        }
    }

    /// `ZG_INJ_EARLY_TABLE_FREE`, a bug on purpose: tables detached by this invalidation go
    /// back to the pool before its SYNC, while a page walk may still read them.
    pub(super) fn free_detached_early(&self, st: &mut PtState) {
        self.free_deferred(st);
    }
}
