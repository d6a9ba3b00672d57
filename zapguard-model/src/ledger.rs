//! The SYNC ledger: which translations were invalidated, and which of those have had the SYNC
//! that covers them complete. Using a translation of the second kind is a device bug (a broken
//! IOTLB or a SYNC that returned too early), reported as [`shared_regs::event::VIOL_LEDGER`].
//!
//! A correct device never trips it. It is here so that the property tests, which drive random
//! interleavings of maps, invalidations, SYNCs and DMA, check the device's own SYNC semantics
//! rather than trusting them.

use std::collections::{HashSet, VecDeque};

/// How many retired translation ids are remembered. Ids are never reused, so forgetting the
/// oldest only narrows what the check can see, never makes it wrong.
const DEAD_CAPACITY: usize = 1 << 16;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Invalidated translations whose covering SYNC has not completed yet.
    awaiting_sync: HashSet<u64>,
    /// Translations whose covering SYNC completed, oldest first (bounded).
    dead_order: VecDeque<u64>,
    dead: HashSet<u64>,
}

impl Ledger {
    /// An invalidation command covered translation `id`.
    pub fn invalidated(&mut self, id: u64) {
        if !self.dead.contains(&id) {
            self.awaiting_sync.insert(id);
        }
    }

    /// A SYNC completed: every translation invalidated before it is retired. Returns how many.
    pub fn sync_completed(&mut self) -> usize {
        let n = self.awaiting_sync.len();
        for id in self.awaiting_sync.drain() {
            if self.dead.insert(id) {
                self.dead_order.push_back(id);
            }
        }
        while self.dead_order.len() > DEAD_CAPACITY {
            if let Some(old) = self.dead_order.pop_front() {
                self.dead.remove(&old);
            }
        }
        n
    }

    /// Whether translation `id` was retired by a completed SYNC.
    pub fn is_dead(&self, id: u64) -> bool {
        self.dead.contains(&id)
    }

    /// Invalidated translations still waiting for a SYNC.
    pub fn awaiting(&self) -> usize {
        self.awaiting_sync.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retire_only_after_sync() {
        let mut l = Ledger::default();
        l.invalidated(1);
        l.invalidated(2);
        l.invalidated(2);
        assert!(!l.is_dead(1), "in use before the SYNC is legal");
        assert_eq!(l.awaiting(), 2);
        assert_eq!(l.sync_completed(), 2);
        assert!(l.is_dead(1) && l.is_dead(2));
        assert!(!l.is_dead(3));
        assert_eq!(l.sync_completed(), 0, "a second SYNC retires nothing new");
    }

    #[test]
    fn bounded_memory() {
        let mut l = Ledger::default();
        for id in 0..(DEAD_CAPACITY as u64 + 10) {
            l.invalidated(id);
        }
        l.sync_completed();
        assert_eq!(l.dead.len(), DEAD_CAPACITY);
        assert_eq!(l.dead_order.len(), DEAD_CAPACITY);
    }
}
