//! Command-queue positions (index + wrap bit) unwrapped into running totals.

use std::collections::VecDeque;

/// Unwraps command-queue positions (index + wrap bit) into running totals, to pair each SYNC's
/// completion with the doorbell that published it.
#[derive(Debug)]
pub(crate) struct CmdqClock {
    log2: u32,
    prod_pos: u64,
    prod_total: u64,
    cons_pos: u64,
    cons_total: u64,
    /// (commands published so far, time) per doorbell not yet matched.
    doorbells: VecDeque<(u64, u64)>,
    /// A command was seen executing (so `cons_total` names the last executed one).
    any_executed: bool,
}

impl Default for CmdqClock {
    fn default() -> Self {
        Self {
            log2: 6,
            prod_pos: 0,
            prod_total: 0,
            cons_pos: 0,
            cons_total: 0,
            doorbells: VecDeque::new(),
            any_executed: false,
        }
    }
}

impl CmdqClock {
    fn delta(&self, from: u64, to: u64) -> u64 {
        let modulus = 2u64 << self.log2.min(20);
        (to.wrapping_sub(from)) % modulus
    }

    /// Follows the events that move the queue's positions: doorbells (`CMDQ_PROD`), the queue's
    /// size, its reprogramming, and a new device or a reset (positions start over).
    pub(crate) fn observe(&mut self, v: &serde_json::Value) {
        let value = || crate::field_u64(v, "value").unwrap_or(0);
        match crate::kind(v) {
            "connect" | "reset" => *self = Self::default(),
            "bar_write" => match crate::field_str(v, "reg") {
                Some("CMDQ_PROD") => {
                    self.doorbell(value(), crate::field_u64(v, "t_ns").unwrap_or(0))
                }
                Some("CMDQ_LOG2SIZE") => self.set_log2(crate::field_u64(v, "value").unwrap_or(6)),
                Some("CMDQ_BASE_LO") => self.reset(),
                _ => {}
            },
            _ => {}
        }
    }

    /// The queue's size changed (`CMDQ_LOG2SIZE`).
    fn set_log2(&mut self, log2: u64) {
        self.log2 = log2.min(20) as u32;
    }

    /// The queue was reprogrammed: positions restart at 0.
    fn reset(&mut self) {
        *self = Self {
            log2: self.log2,
            ..Self::default()
        };
    }

    /// Commands published but not executed (as far as the trace shows).
    pub(crate) fn outstanding(&self) -> u64 {
        self.prod_total
            .saturating_sub(self.cons_total + u64::from(self.any_executed))
    }

    /// A `CMDQ_PROD` doorbell with `value` at time `t`.
    fn doorbell(&mut self, value: u64, t: u64) {
        let pos = value & ((2u64 << self.log2.min(20)) - 1);
        self.prod_total += self.delta(self.prod_pos, pos);
        self.prod_pos = pos;
        self.doorbells.push_back((self.prod_total, t));
    }

    /// Index of the command at position `pos` (commands execute in order).
    pub(crate) fn executed(&mut self, pos: u64) -> u64 {
        self.cons_total += self.delta(self.cons_pos, pos);
        self.cons_pos = pos;
        self.any_executed = true;
        self.cons_total
    }

    /// When the command with index `idx` was published.
    pub(crate) fn published(&mut self, idx: u64) -> Option<u64> {
        while self
            .doorbells
            .front()
            .is_some_and(|&(total, _)| total <= idx)
        {
            self.doorbells.pop_front();
        }
        self.doorbells.front().map(|&(_, t)| t)
    }
}
