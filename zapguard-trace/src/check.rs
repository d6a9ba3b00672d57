//! `check`: re-verify the device's invariants from the trace alone.
//!
//! - **Ledger**: once a SYNC completes, no DMA burst uses a translation that an invalidation
//!   before that SYNC covered (translations are named by `id` in `iotlb_fill` and `dma_access`);
//!   nor one evicted from the IOTLB once no job that could hold it runs any more (a job uses only
//!   what it holds or looks up, and ids are never reused).
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
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;

/// How many of the newest dead translations keep the line of the SYNC that retired them (for
/// the finding's detail); older ones are only known to be dead.
const RECENT_DEAD: usize = 1 << 16;
/// A ledger finding whose SYNC is known.
const USED_AFTER_SYNC: &str = "translation used after the SYNC that covered its invalidation";
/// A ledger finding about an older retired translation.
const USED_AFTER_RETIRED: &str =
    "translation used after it was retired (its invalidation SYNCed, or evicted with no job left holding it)";

/// A set of translation ids as disjoint ranges. The device never reuses an id (until a reset),
/// and the ids that die are nearly contiguous, so the set stays a handful of ranges however
/// long the trace.
#[derive(Debug, Default)]
struct IdRanges(BTreeMap<u64, u64>);

impl IdRanges {
    fn contains(&self, id: u64) -> bool {
        self.0
            .range(..=id)
            .next_back()
            .is_some_and(|(_, &end)| id < end)
    }

    fn insert(&mut self, id: u64) {
        if self.contains(id) {
            return;
        }
        let (mut start, mut end) = (id, id.saturating_add(1));
        if let Some((&s, &e)) = self.0.range(..id).next_back() {
            if e == id {
                start = s;
            }
        }
        if let Some(e) = self.0.remove(&end) {
            end = e;
        }
        self.0.insert(start, end);
    }

    /// Ranges held.
    fn len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// The violation classes the device's validator decides per access, from the facts a judged
/// `dma_access` records (the walk-time classes `ledger`, `table_freed`, `ctx_released` are not).
const ACCESS_CLASSES: [&str; 5] = [
    "stale",
    "write_perm",
    "write_clean",
    "released",
    "zapped_during_access",
];

/// The verdict a judged `dma_access`'s recorded facts call for, worked out here from the record
/// alone, independently of the device's validator: its violation class, or `None` (clean).
fn recomputed_verdict(v: &Value) -> Option<&'static str> {
    let flag = |k| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    let num = |k| v.get(k).and_then(Value::as_u64);
    let frame = num("pa").unwrap_or(0) & !0xfff;
    let write = flag("write");
    if flag("released") {
        return Some("released");
    }
    // Before the bytes moved: the CPU must map the page the device used, writable for a write,
    // and not cleaned since the translation was cached while dirty.
    match num("cpu_pa") {
        Some(cpu) if cpu == frame => {}
        _ => return Some("stale"),
    }
    if write && !flag("cpu_w") {
        return Some("write_perm");
    }
    if write && flag("fill_d") && !flag("cpu_d") {
        return Some("write_clean");
    }
    // After: still the same page, still writable for a write.
    if !flag("after") {
        return None;
    }
    match num("after_pa") {
        Some(after) if after == frame && (flag("after_w") || !write) => None,
        _ => Some("zapped_during_access"),
    }
}

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

/// The checker's state. It stays bounded however long the trace: a translation is *retired*
/// once its invalidation's SYNC completed, or once it was evicted and no job that could hold it
/// still runs; retired ids are kept as ranges (ids are never reused, so they pack densely).
#[derive(Debug, Default)]
pub struct Checker {
    /// Translation id -> (asid, va, len), from `iotlb_fill`, until invalidated.
    live: HashMap<u64, (u64, u64, u64)>,
    /// Ids per ASID, to apply invalidations.
    by_asid: HashMap<u64, HashSet<u64>>,
    /// Invalidated, waiting for the next SYNC.
    pending: HashSet<u64>,
    /// Retired: using them is a ledger violation.
    retired: IdRanges,
    /// The SYNC line of the newest [`RECENT_DEAD`] ids retired by a SYNC, oldest first.
    recent: VecDeque<(u64, u64)>,
    recent_line: HashMap<u64, u64>,
    /// Jobs started and not done.
    running: HashSet<u64>,
    /// Evicted from the IOTLB while jobs ran (one may still hold them): forgotten once none runs.
    evicted: Vec<u64>,
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
    /// Judged accesses whose verdict was recomputed from their recorded facts.
    pub recomputed: u64,
    /// Of those, the ones whose recomputed verdict the device's disagreed with.
    pub disagreements: u64,
    /// The verdict the last judged access's facts call for, until the device's own verdict
    /// (a violation right after it, or none) is known: (line, class or None, the access).
    expect: Option<(u64, Option<&'static str>, String)>,
    /// The trace records the facts of its verdicts (traces from before them do not).
    facts_seen: bool,
}

impl Checker {
    /// Checks one event (at trace line `line`).
    pub fn add(&mut self, line: u64, v: &Value) {
        let u = |k| field_u64(v, k);
        self.cmdq.observe(v);
        // A judged access's own violation follows it at once (after a ledger violation, if
        // any): anything else means the device's verdict was "clean".
        if kind(v) != "violation" {
            self.device_verdict(line, None, v);
        }
        if kind(v) == "dma_access" && v.get("judged").is_some() {
            self.facts_seen = true;
        }
        if kind(v) == "dma_access" && v.get("judged").and_then(Value::as_bool) == Some(true) {
            self.recomputed += 1;
            self.expect = Some((line, recomputed_verdict(v), v.to_string()));
        }
        match kind(v) {
            // A new device (another run appended) or a device reset: translation ids and queue
            // positions start over.
            "connect" | "reset" => {
                self.live.clear();
                self.by_asid.clear();
                self.pending.clear();
                self.retired.clear();
                self.recent.clear();
                self.recent_line.clear();
                self.running.clear();
                self.evicted.clear();
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
                let pending = std::mem::take(&mut self.pending);
                for id in pending {
                    self.retire(id, line);
                }
            }
            "iotlb_evict" => {
                if let Some(id) = u("id") {
                    self.evicted.push(id);
                }
                self.forget_evicted();
            }
            "job_start" => {
                if let Some(job) = u("job") {
                    self.running.insert(job);
                }
            }
            "job_done" => {
                if let Some(job) = u("job") {
                    self.running.remove(&job);
                }
                self.forget_evicted();
            }
            "dma_access" => {
                if let Some(id) = u("id").filter(|&id| self.retired.contains(id)) {
                    let (what, detail) = match self.recent_line.get(&id) {
                        Some(l) => (USED_AFTER_SYNC, format!("{v} (SYNC at line {l})")),
                        None => (USED_AFTER_RETIRED, v.to_string()),
                    };
                    self.ledger_violations += 1;
                    self.findings.push(Finding { line, what, detail });
                }
            }
            "violation" => {
                self.device_violations += 1;
                self.findings.push(Finding {
                    line,
                    what: "device validator violation",
                    detail: v.to_string(),
                });
                let class = field_str(v, "result").unwrap_or("");
                if self.facts_seen && ACCESS_CLASSES.contains(&class) {
                    self.device_verdict(line, Some(class), v);
                }
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

    /// The device's verdict on the last judged access: `class`, or clean (`None`, seen at the
    /// event `v` after it). Compared with the verdict its recorded facts call for.
    fn device_verdict(&mut self, line: u64, class: Option<&str>, v: &Value) {
        let Some((at, want, access)) = self.expect.take() else {
            if let Some(class) = class {
                self.disagree(
                    line,
                    format!("a {class} violation after no judged access: {v}"),
                );
            }
            return;
        };
        if want != class {
            let said = |c: Option<&str>| c.unwrap_or("clean").to_string();
            self.disagree(
                at,
                format!(
                    "the facts call for {}, the device said {}: {access}",
                    said(want),
                    said(class)
                ),
            );
        }
    }

    fn disagree(&mut self, line: u64, detail: String) {
        self.disagreements += 1;
        self.findings.push(Finding {
            line,
            what: "the device's verdict disagrees with the facts it recorded",
            detail,
        });
    }

    /// Translation `id` is retired by the SYNC at `line`.
    fn retire(&mut self, id: u64, line: u64) {
        self.retired.insert(id);
        self.recent.push_back((id, line));
        self.recent_line.insert(id, line);
        if self.recent.len() > RECENT_DEAD {
            if let Some((old, _)) = self.recent.pop_front() {
                self.recent_line.remove(&old);
            }
        }
    }

    /// Forgets evicted translations once no job runs that could still hold one: the device
    /// caches them no more, and a job only uses the translations it holds or looks up.
    fn forget_evicted(&mut self) {
        if !self.running.is_empty() {
            return;
        }
        for id in self.evicted.drain(..) {
            if let Some((asid, _, _)) = self.live.remove(&id) {
                if let Some(ids) = self.by_asid.get_mut(&asid) {
                    ids.remove(&id);
                }
                self.retired.insert(id);
            }
        }
    }

    /// What the checker holds: (live translations, retired id ranges, ids with their SYNC
    /// line, jobs running). Bounded by the device's IOTLB and the jobs in flight, not by the
    /// trace's length.
    pub fn held(&self) -> (usize, usize, usize, usize) {
        (
            self.live.len() + self.evicted.len(),
            self.retired.len(),
            self.recent.len(),
            self.running.len(),
        )
    }

    /// End of trace: commands that were published but never executed.
    pub fn finish(&mut self) {
        self.device_verdict(0, None, &Value::Null);
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

    /// A long trace of fills, evictions, invalidations and SYNCs: the checker's state stays
    /// small, and a use of the very first dead translation is still caught at the end.
    #[test]
    fn state_stays_bounded_and_old_dead_ids_are_still_caught() {
        let mut c = Checker::default();
        let mut line = 0;
        let mut add = |c: &mut Checker, v: Value| {
            line += 1;
            c.add(line, &v);
        };
        for i in 1..=200_000u64 {
            let va = i * 0x1000;
            add(&mut c, json!({"kind": "job_start", "job": i, "asid": 1}));
            add(&mut c, fill(2 * i, va));
            add(&mut c, fill(2 * i + 1, va + 0x100_0000));
            add(&mut c, access(2 * i, va));
            add(
                &mut c,
                json!({"kind": "iotlb_evict", "asid": 1, "va": va + 0x100_0000, "len": 4096, "id": 2 * i + 1}),
            );
            add(&mut c, json!({"kind": "job_done", "job": i, "asid": 1}));
            add(
                &mut c,
                json!({"kind": "iotlb_invalidate", "cmd": 0, "asid": 1, "va": va, "len": 4096}),
            );
            add(&mut c, json!({"kind": "sync_done", "cmd": 1}));
        }
        let (live, dead_ranges, recent, running) = c.held();
        assert!(live <= 2, "{live} live translations held");
        assert!(dead_ranges <= 2, "{dead_ranges} retired ranges");
        assert_eq!(recent, RECENT_DEAD);
        assert_eq!(running, 0);
        add(&mut c, access(2, 0x1000));
        add(&mut c, access(3, 0x100_1000));
        add(&mut c, access(400_000, 200_000 * 0x1000));
        assert_eq!(c.ledger_violations, 3, "{:?}", c.findings);
        assert!(
            c.findings[..2].iter().all(|f| f.what == USED_AFTER_RETIRED),
            "{:?}",
            c.findings
        );
        assert_eq!(c.findings[2].what, USED_AFTER_SYNC);
    }

    /// A judged access with the facts of `class` (None: clean) for a read or a write.
    fn judged(va: u64, write: bool, class: Option<&str>) -> Value {
        let frame = 0x40_0000;
        let mut v = json!({"kind": "dma_access", "asid": 1, "va": va, "pa": frame, "write": write,
            "id": 1, "judged": true, "released": false, "cpu_pa": frame, "cpu_w": true,
            "cpu_d": true, "fill_d": false, "after": true, "after_pa": frame, "after_w": true});
        match class {
            None => {}
            Some("stale") => v["cpu_pa"] = json!(null),
            Some("write_perm") => v["cpu_w"] = json!(false),
            Some("write_clean") => (v["cpu_d"], v["fill_d"]) = (json!(false), json!(true)),
            Some("released") => v["released"] = json!(true),
            Some("zapped_during_access") => v["after_pa"] = json!(frame + 0x1000),
            Some(c) => panic!("{c}"),
        }
        v
    }

    fn said(va: u64, class: &str) -> Value {
        json!({"kind": "violation", "asid": 1, "va": va, "result": class})
    }

    /// The facts a judged access records are enough to recompute every verdict: the device's
    /// own agrees on every class, and any edit, or a validator that saw nothing, is a finding.
    #[test]
    fn verdicts_are_recomputed_from_the_recorded_facts() {
        for class in ACCESS_CLASSES {
            let write = class != "stale";
            let c = check(&[judged(0x1000, write, Some(class)), said(0x1000, class)]);
            assert_eq!(
                (c.recomputed, c.disagreements),
                (1, 0),
                "{class}: {:?}",
                c.findings
            );
            // A blind validator: the facts say violation, the device said nothing.
            let c = check(&[
                judged(0x1000, write, Some(class)),
                judged(0x2000, write, None),
            ]);
            assert_eq!(c.disagreements, 1, "{class} missed: {:?}", c.findings);
            assert!(c.findings[0]
                .detail
                .contains(&format!("call for {class}, the device said clean")));
            // An edited verdict: another class, or a violation the facts do not call for.
            let other = if class == "stale" {
                "write_perm"
            } else {
                "stale"
            };
            let c = check(&[judged(0x1000, write, Some(class)), said(0x1000, other)]);
            assert_eq!(c.disagreements, 1, "{class} edited: {:?}", c.findings);
            let c = check(&[judged(0x1000, write, None), said(0x1000, class)]);
            assert_eq!(c.disagreements, 1, "clean called {class}: {:?}", c.findings);
        }
        // Walk-time classes and a ledger violation in between are not per-access verdicts.
        let c = check(&[
            judged(0x1000, true, Some("stale")),
            said(0x1000, "ledger"),
            said(0x1000, "stale"),
            json!({"kind": "violation", "asid": 1, "result": "table_freed"}),
        ]);
        assert_eq!((c.recomputed, c.disagreements), (1, 0), "{:?}", c.findings);
        // The last access of the trace is judged too.
        let c = check(&[judged(0x1000, false, Some("released"))]);
        assert_eq!(c.disagreements, 1);
    }
}
