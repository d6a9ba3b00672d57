// SPDX-License-Identifier: GPL-2.0

//! Notifier policy: what the interval notifier's invalidation and the aging notifier's queries
//! do to the device page table.

use super::*;

impl Mirror {
    /// Whether an injected bug skips this invalidation altogether.
    fn skips(&self, event: NotifierEvent) -> bool {
        let protection = matches!(
            event,
            NotifierEvent::ProtectionVma | NotifierEvent::ProtectionPage
        );
        self.injected(testing::ZG_INJ_SKIP_SHOOTDOWN)
            || (protection && self.injected(testing::ZG_INJ_KEEP_WRITE))
    }
}

impl IntervalInvalidate for Mirror {
    fn invalidate(
        &self,
        sub: &IntervalNotifier<Self>,
        range: &NotifierRange<'_>,
        cur_seq: u64,
    ) -> bool {
        bump(&self.stats.invalidations, 1);
        let how = if range.blockable() {
            Wait::Sleep
        } else {
            bump(&self.stats.nonblock, 1);
            bump(&self.shared.nonblock_invalidations, 1);
            Wait::Spin
        };
        let mut st = if how == Wait::Sleep {
            self.state.lock()
        } else {
            match self.state.try_lock() {
                Some(g) => g,
                None => {
                    self.nonblock_gave_up();
                    return false;
                }
            }
        };
        sub.set_seq(cur_seq);
        let event = range.event();
        if st.released || self.skips(event) {
            return true;
        }
        if event == NotifierEvent::Release {
            self.release(&mut st, range.mm());
            return true;
        }
        let (start, end) = (range.start() as u64, range.end() as u64);
        let change = if self.injected(testing::ZG_DBG_ZAP_WRITE_PROTECT) {
            Change::Clear
        } else {
            Change::for_event(event)
        };
        match self.shootdown(&mut st, start, end, how, &[], change) {
            Ok(_) => true,
            Err(e) if e == EAGAIN => {
                // Nothing slept; cleared PTEs are covered by `need_flush`.
                self.nonblock_gave_up();
                false
            }
            // The device unbound meanwhile: it is fenced and its tables are freed.
            Err(e) if self.shared.unbound_under(e) => true,
            Err(e) => {
                // The SYNC (or the fence) ran, but the table walk failed (a corrupt table), so
                // part of the range may still be mapped while the kernel frees its pages: take
                // the whole context off the device before returning.
                dev_err!(
                    self.shared.pdev.as_ref(),
                    "asid {}: shootdown failed: {:?}; context taken off the device\n",
                    self.asid,
                    e
                );
                self.abandon(&mut st);
                true
            }
        }
    }
}

impl Aging for Mirror {
    fn clear_young(&self, start: usize, end: usize, _flush: bool) -> bool {
        // Atomic context: a busy context answers "not young" rather than wait.
        let Some(st) = self.state.try_lock() else {
            return false;
        };
        if st.released {
            return false;
        }
        let mut z = Zap::new(start as u64, end as u64);
        let young = st
            .root()
            .and_then(|root| self.age_table(root, &mut z, true))
            .unwrap_or(false);
        if z.pages > 0 {
            bump(&self.stats.aging_cleared, z.pages);
            // The device sets A again only when it walks: its cached translations of the
            // range must go. Aging is advisory, so the invalidation is posted and never waited
            // for, even for `clear_flush_young` (which runs under the page-table lock, per
            // PTE): a use the device makes before it executes goes unseen once, as a CPU's
            // use does before its TLB flush. A full ring or a failed device is ignored.
            let inv = cmd::Command::new(cmd::CMD_INV_RANGE, 0, self.asid, z.lo, z.hi - z.lo);
            let hw = &self.shared.hw;
            let _ = hw.cmdq.post(
                &self.shared.bar,
                &[inv],
                false,
                Wait::Spin,
                &self.shared.health,
            );
        }
        drop(st);
        if young {
            bump(&self.stats.aging_young, 1);
        }
        young
    }

    fn test_young(&self, address: usize) -> bool {
        let Some(st) = self.state.try_lock() else {
            return false;
        };
        let page = (address as u64) & !(PAGE - 1);
        let mut z = Zap::new(page, page + PAGE);
        let young = !st.released
            && st
                .root()
                .and_then(|root| self.age_table(root, &mut z, false))
                .unwrap_or(false);
        drop(st);
        if young {
            bump(&self.stats.aging_young, 1);
        }
        young
    }
}
