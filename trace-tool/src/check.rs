//! `check`: re-verify the device's invariants from the trace alone.
//!
//! - **Ledger**: once a SYNC completes, no DMA burst uses a translation that an invalidation
//!   before that SYNC covered (translations are named by `id` in `iotlb_fill` and `dma_access`).
//! - **SYNC completion**: every command the driver published was executed by the end of the
//!   trace (a SYNC stuck behind a stopped queue shows up here), and the command queue never
//!   stopped on an error, except where the device's failure injection made it
//!   (`result: "injected"`, counted in [`Checker::injected_queue_errors`]).
//! - **Validator**: every `violation` the device reported online is a failure here too (the CPU
//!   page tables it judged against are not in the trace; whether the mm was released neither), so
//!   that `check` and the online validator agree on every trace.

use crate::cmdq::CmdqClock;
use crate::{field_str, field_u64, kind};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::fmt;

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// 1-based trace line (0: at the end of the trace).
    pub line: u64,
    /// Which invariant.
    pub what: &'static str,
    /// The offending event, or a description.
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.what, self.detail)
    }
}

/// The checker's state (aggregates only; translations are forgotten once dead and unused).
#[derive(Debug, Default)]
pub struct Checker {
    /// Translation id -> (asid, va, len), from `iotlb_fill`.
    live: HashMap<u64, (u64, u64, u64)>,
    /// Ids per ASID, to apply invalidations.
    by_asid: HashMap<u64, HashSet<u64>>,
    /// Invalidated, waiting for the next SYNC.
    pending: HashSet<u64>,
    /// Covered by a completed SYNC: using them is a ledger violation. Value: the SYNC's line.
    dead: HashMap<u64, u64>,
    cmdq: CmdqClock,
    /// Everything broken so far.
    pub findings: Vec<Finding>,
    /// Violations the device reported online.
    pub device_violations: u64,
    /// Ledger violations found offline.
    pub ledger_violations: u64,
    /// Command-queue errors the device's failure injection (`FAIL_CMDQ_ERROR`) caused on
    /// purpose: expected, not findings.
    pub injected_queue_errors: u64,
}

impl Checker {
    /// Checks one event (at trace line `line`).
    pub fn add(&mut self, line: u64, v: &Value) {
        let u = |k| field_u64(v, k);
        self.cmdq.observe(v);
        match kind(v) {
            // A new device (another run appended) or a device reset: translation ids and queue
            // positions start over.
            "connect" | "reset" => {
                self.live.clear();
                self.by_asid.clear();
                self.pending.clear();
                self.dead.clear();
            }
            "command" => {
                self.cmdq.executed(u("cmd").unwrap_or(0));
            }
            "iotlb_fill" => {
                if let (Some(id), Some(asid)) = (u("id"), u("asid")) {
                    let range = (asid, u("va").unwrap_or(0), u("len").unwrap_or(4096));
                    self.live.insert(id, range);
                    self.by_asid.entry(asid).or_default().insert(id);
                }
            }
            "iotlb_invalidate" => {
                let (va, len) = (u("va").unwrap_or(0), u("len").unwrap_or(u64::MAX));
                let end = va.saturating_add(len);
                let asids: Vec<u64> = match u("asid") {
                    Some(a) => vec![a],
                    None => self.by_asid.keys().copied().collect(),
                };
                for asid in asids {
                    let Some(ids) = self.by_asid.get_mut(&asid) else {
                        continue;
                    };
                    let live = &self.live;
                    let hit: Vec<u64> = ids
                        .iter()
                        .copied()
                        .filter(|id| {
                            live.get(id).is_some_and(|&(_, tva, tlen)| {
                                tva < end && va < tva.saturating_add(tlen)
                            })
                        })
                        .collect();
                    for id in hit {
                        ids.remove(&id);
                        self.live.remove(&id);
                        self.pending.insert(id);
                    }
                }
            }
            "sync_done" => {
                self.cmdq.executed(u("cmd").unwrap_or(0));
                for id in self.pending.drain() {
                    self.dead.insert(id, line);
                }
            }
            "dma_access" => {
                if let Some(sync_line) = u("id").and_then(|id| self.dead.get(&id)) {
                    self.ledger_violations += 1;
                    self.findings.push(Finding {
                        line,
                        what: "translation used after the SYNC that covered its invalidation",
                        detail: format!("{v} (SYNC at line {sync_line})"),
                    });
                }
            }
            "violation" => {
                self.device_violations += 1;
                self.findings.push(Finding {
                    line,
                    what: "device validator violation",
                    detail: v.to_string(),
                });
            }
            "queue_error"
                if field_str(v, "queue") == Some("cmdq")
                    && field_str(v, "result") == Some("injected") =>
            {
                self.injected_queue_errors += 1;
            }
            "queue_error" if field_str(v, "queue") == Some("cmdq") => {
                self.findings.push(Finding {
                    line,
                    what: "command queue stopped on an error",
                    detail: v.to_string(),
                });
            }
            _ => {}
        }
    }

    /// End of trace: commands that were published but never executed.
    pub fn finish(&mut self) {
        let stuck = self.cmdq.outstanding();
        if stuck > 0 {
            self.findings.push(Finding {
                line: 0,
                what: "commands published but never executed (a SYNC never completed)",
                detail: format!("{stuck} command(s) outstanding at the end of the trace"),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(events: &[Value]) -> Checker {
        let mut c = Checker::default();
        for (i, e) in events.iter().enumerate() {
            c.add(i as u64 + 1, e);
        }
        c.finish();
        c
    }

    fn fill(id: u64, va: u64) -> Value {
        json!({"kind": "iotlb_fill", "asid": 1, "va": va, "len": 4096, "id": id})
    }

    fn access(id: u64, va: u64) -> Value {
        json!({"kind": "dma_access", "asid": 1, "va": va, "id": id})
    }

    #[test]
    fn use_before_the_sync_is_legal_after_is_not() {
        let c = check(&[
            json!({"kind": "bar_write", "reg": "CMDQ_PROD", "value": 2}),
            fill(7, 0x1000),
            fill(8, 0x5000),
            json!({"kind": "command", "cmd": 0, "op": "inv_range", "asid": 1}),
            json!({"kind": "iotlb_invalidate", "cmd": 0, "asid": 1, "va": 0x1000, "len": 4096}),
            access(7, 0x1000), // doomed but in flight: legal until the SYNC
            json!({"kind": "sync_done", "cmd": 1}),
            access(8, 0x5000), // not covered
            access(7, 0x1000), // the bug
        ]);
        assert_eq!(c.ledger_violations, 1, "{:?}", c.findings);
        assert_eq!(c.findings.len(), 1);
        assert_eq!(c.findings[0].line, 9);
    }

    #[test]
    fn inv_all_and_inv_asid_cover_everything() {
        let c = check(&[
            json!({"kind": "bar_write", "reg": "CMDQ_PROD", "value": 4}),
            fill(1, 0x1000),
            json!({"kind": "iotlb_invalidate", "cmd": 0, "asid": 1, "va": 0, "len": u64::MAX}),
            json!({"kind": "sync_done", "cmd": 1}),
            fill(2, 0x2000),
            json!({"kind": "iotlb_invalidate", "cmd": 2, "va": 0, "len": u64::MAX}),
            json!({"kind": "sync_done", "cmd": 3}),
            access(1, 0x1000),
            access(2, 0x2000),
        ]);
        assert_eq!(c.ledger_violations, 2, "{:?}", c.findings);
    }

    #[test]
    fn injected_queue_errors_are_expected_others_are_findings() {
        let c = check(&[
            json!({"kind": "queue_error", "queue": "cmdq", "cmd": 3, "result": "injected"}),
            json!({"kind": "reset"}),
            json!({"kind": "queue_error", "queue": "cmdq", "cmd": 5, "result": "illegal"}),
        ]);
        assert_eq!(c.injected_queue_errors, 1);
        assert_eq!(c.findings.len(), 1, "{:?}", c.findings);
        assert_eq!(c.findings[0].line, 3);
    }

    #[test]
    fn a_new_device_starts_a_new_ledger() {
        let c = check(&[
            json!({"kind": "bar_write", "reg": "CMDQ_PROD", "value": 2}),
            fill(1, 0x1000),
            json!({"kind": "iotlb_invalidate", "cmd": 0, "asid": 1, "va": 0, "len": u64::MAX}),
            json!({"kind": "sync_done", "cmd": 1}),
            json!({"kind": "connect"}),
            fill(1, 0x1000),
            access(1, 0x1000),
        ]);
        assert!(c.findings.is_empty(), "{:?}", c.findings);
    }

    #[test]
    fn device_violations_and_stuck_commands_are_reported() {
        let c = check(&[
            json!({"kind": "bar_write", "reg": "CMDQ_PROD", "value": 3}),
            json!({"kind": "command", "cmd": 0, "op": "inv_asid", "asid": 1}),
            json!({"kind": "violation", "asid": 1, "result": "stale"}),
        ]);
        assert_eq!(c.device_violations, 1);
        let whats: Vec<_> = c.findings.iter().map(|f| f.what).collect();
        assert!(
            whats.iter().any(|w| w.contains("never executed")),
            "{whats:?}"
        );
        let clean = check(&[
            json!({"kind": "bar_write", "reg": "CMDQ_PROD", "value": 1}),
            json!({"kind": "sync_done", "cmd": 0}),
        ]);
        assert!(clean.findings.is_empty(), "{:?}", clean.findings);
        assert!(check(&[]).findings.is_empty());
    }

    #[test]
    fn every_device_violation_class_is_a_finding() {
        // Every class the device reports (shared-regs' `violation_name`), the walk checks'
        // table_freed (ABI 1.4) and ctx_released (1.5) included.
        let classes: Vec<&str> = (1..shared_regs::uapi::ZG_VIOL_CLASSES as u16)
            .map(shared_regs::event::violation_name)
            .collect();
        assert!(classes.contains(&"table_freed") && classes.contains(&"ctx_released"));
        for class in classes {
            let c = check(&[json!({"kind": "violation", "asid": 1, "va": 4096,
                "pa": 0x20_3000, "write": true, "result": class})]);
            assert_eq!(c.device_violations, 1, "{class}");
            assert_eq!(c.findings.len(), 1, "{class}");
        }
    }
}
