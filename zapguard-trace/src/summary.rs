//! `summary`: what the device did, per ASID and overall.

use crate::cmdq::CmdqClock;
use crate::reader::BadLine;
use crate::{field_str, field_u64, kind};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// Violations kept with full detail.
const FIRST_VIOLATIONS: usize = 5;

/// Per-ASID counters.
#[derive(Debug, Default)]
pub struct AsidStats {
    /// DMA jobs started.
    pub jobs: u64,
    /// Bytes the jobs processed.
    pub bytes: u64,
    /// DMA bursts.
    pub accesses: u64,
    /// Of those, the ones the validator judged (`"judged":true`).
    pub judged: u64,
    /// And the ones it did not (`"judged":false`: validation off for the context). Traces from
    /// before the field count in neither.
    pub unjudged: u64,
    /// IOTLB fills (misses).
    pub fills: u64,
    /// Distinct 4 KiB pages the device accessed.
    pub pages: HashSet<u64>,
    /// Invalidation-type commands by op (`inv_range`, `inv_asid`, `cfgi_ctx`).
    pub invalidations: BTreeMap<String, u64>,
    /// Faults by cause.
    pub faults: BTreeMap<String, u64>,
    /// Validator violations by class.
    pub violations: BTreeMap<String, u64>,
}

/// ASIDs without violations a summary lists one by one (the busiest by bytes; every ASID with
/// a violation is listed too); the rest count in its `all` row.
pub const TOP_ASIDS: usize = 8;

/// One row of the per-ASID table (`pages` given: a total's are summed, not a set).
fn write_asid_row(
    f: &mut fmt::Formatter<'_>,
    asid: &str,
    s: &AsidStats,
    pages: usize,
) -> fmt::Result {
    writeln!(
        f,
        "{:>5} {:>6} {:>12} {:>8} {:>9} {:>5.1}% {:>6.1}%  inv: {} / faults: {} / violations: {}",
        asid,
        s.jobs,
        s.bytes,
        pages,
        s.accesses,
        100.0 * s.hit_rate(),
        if s.accesses == 0 {
            0.0
        } else {
            100.0 * s.judged as f64 / s.accesses as f64
        },
        join(&s.invalidations),
        join(&s.faults),
        join(&s.violations)
    )
}

impl AsidStats {
    /// A context that only came and went: context and invalidation commands, no DMA.
    fn is_quiet(&self) -> bool {
        self.jobs == 0 && self.accesses == 0 && self.faults.is_empty() && self.violations.is_empty()
    }

    /// Adds `o`'s counters (not its page set) to these.
    fn add(&mut self, o: &AsidStats) {
        self.jobs += o.jobs;
        self.bytes += o.bytes;
        self.accesses += o.accesses;
        self.judged += o.judged;
        self.unjudged += o.unjudged;
        self.fills += o.fills;
        for (mine, theirs) in [
            (&mut self.invalidations, &o.invalidations),
            (&mut self.faults, &o.faults),
            (&mut self.violations, &o.violations),
        ] {
            for (k, v) in theirs {
                *mine.entry(k.clone()).or_default() += v;
            }
        }
    }

    /// Fraction of bursts served by the IOTLB (or a held translation) without a walk.
    pub fn hit_rate(&self) -> f64 {
        if self.accesses == 0 {
            return 0.0;
        }
        self.accesses.saturating_sub(self.fills) as f64 / self.accesses as f64
    }
}

/// Everything `summary` reports.
#[derive(Debug, Default)]
pub struct Summary {
    /// Events read.
    pub events: u64,
    /// First and last `t_ns`.
    pub span: Option<(u64, u64)>,
    /// Events per kind.
    pub by_kind: BTreeMap<String, u64>,
    /// Per-ASID counters.
    pub asids: BTreeMap<u64, AsidStats>,
    /// `inv_all` commands.
    pub inv_all: u64,
    /// SYNC completions.
    pub syncs: u64,
    /// Doorbell-to-completion time of each SYNC whose doorbell is in the trace, in ns.
    pub sync_latency_ns: Vec<u64>,
    /// The first violations, in full.
    pub first_violations: Vec<Value>,
    /// BAR reads per register name.
    pub reg_reads: BTreeMap<String, u64>,
    /// BAR writes per register name.
    pub reg_writes: BTreeMap<String, u64>,
    /// Malformed lines.
    pub bad_lines: Vec<BadLine>,
    cmdq: CmdqClock,
}

impl Summary {
    /// Accounts one event.
    pub fn add(&mut self, v: &Value) {
        let k = kind(v);
        let t = field_u64(v, "t_ns").unwrap_or(0);
        self.events += 1;
        self.span = Some(self.span.map_or((t, t), |(a, b)| (a.min(t), b.max(t))));
        *self.by_kind.entry(k.to_string()).or_default() += 1;
        let asid = field_u64(v, "asid");
        let name = |key| field_str(v, key).unwrap_or("?").to_string();
        if let (true, Some(reg)) = (k.starts_with("bar_"), field_str(v, "reg")) {
            let m = if k == "bar_read" {
                &mut self.reg_reads
            } else {
                &mut self.reg_writes
            };
            *m.entry(reg.to_string()).or_default() += 1;
        }
        self.cmdq.observe(v);
        match k {
            "command" => {
                self.cmdq.executed(field_u64(v, "cmd").unwrap_or(0));
                let op = name("op");
                if op == "inv_all" {
                    self.inv_all += 1;
                } else if matches!(op.as_str(), "inv_range" | "inv_asid" | "cfgi_ctx") {
                    if let Some(a) = asid {
                        *self
                            .asids
                            .entry(a)
                            .or_default()
                            .invalidations
                            .entry(op)
                            .or_default() += 1;
                    }
                }
            }
            "sync_done" => {
                self.syncs += 1;
                let idx = self.cmdq.executed(field_u64(v, "cmd").unwrap_or(0));
                if let Some(t0) = self.cmdq.published(idx) {
                    self.sync_latency_ns.push(t.saturating_sub(t0));
                }
            }
            "job_start" => {
                if let Some(a) = asid {
                    self.asids.entry(a).or_default().jobs += 1;
                }
            }
            "job_done" => {
                if let Some(a) = asid {
                    self.asids.entry(a).or_default().bytes += field_u64(v, "len").unwrap_or(0);
                }
            }
            "dma_access" => {
                if let Some(a) = asid {
                    let s = self.asids.entry(a).or_default();
                    s.accesses += 1;
                    match v.get("judged").and_then(Value::as_bool) {
                        Some(true) => s.judged += 1,
                        Some(false) => s.unjudged += 1,
                        None => {}
                    }
                    // A step over a 2 MiB translation covers several pages.
                    let va = field_u64(v, "va").unwrap_or(0);
                    let len = field_u64(v, "len").unwrap_or(1).clamp(1, 1 << 20);
                    s.pages
                        .extend((va >> 12)..=(va.saturating_add(len - 1) >> 12));
                }
            }
            "iotlb_fill" => {
                if let Some(a) = asid {
                    self.asids.entry(a).or_default().fills += 1;
                }
            }
            "fault" => {
                if let Some(a) = asid {
                    *self
                        .asids
                        .entry(a)
                        .or_default()
                        .faults
                        .entry(name("result"))
                        .or_default() += 1;
                }
            }
            "violation" => {
                if let Some(a) = asid {
                    *self
                        .asids
                        .entry(a)
                        .or_default()
                        .violations
                        .entry(name("result"))
                        .or_default() += 1;
                }
                if self.first_violations.len() < FIRST_VIOLATIONS {
                    self.first_violations.push(v.clone());
                }
            }
            _ => {}
        }
    }

    /// Total violations.
    pub fn violations(&self) -> u64 {
        self.by_kind.get("violation").copied().unwrap_or(0)
    }

    /// (judged, unjudged, all) device accesses.
    pub fn validated(&self) -> (u64, u64, u64) {
        self.asids.values().fold((0, 0, 0), |(j, u, a), s| {
            (j + s.judged, u + s.unjudged, a + s.accesses)
        })
    }
}

/// The `p`-th percentile (0..=100) of sorted `v`.
pub fn percentile(sorted: &[u64], p: u32) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (u64::from(p) * (sorted.len() as u64 - 1)).div_ceil(100) as usize;
    sorted.get(rank).copied()
}

fn join(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn us(ns: u64) -> String {
    format!("{:.1} us", ns as f64 / 1000.0)
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let span = self.span.map_or(0, |(a, b)| b - a);
        writeln!(
            f,
            "{} events over {:.3} s; {} malformed lines",
            self.events,
            span as f64 / 1e9,
            self.bad_lines.len()
        )?;
        writeln!(f, "events: {}", join(&self.by_kind))?;
        let (judged, unjudged, all) = self.validated();
        writeln!(
            f,
            "validated {judged} of {all} device accesses ({:.1}%); {unjudged} not judged (validation off)",
            if all == 0 { 0.0 } else { 100.0 * judged as f64 / all as f64 }
        )?;
        writeln!(f, "register reads:  {}", join(&self.reg_reads))?;
        writeln!(f, "register writes: {}", join(&self.reg_writes))?;
        let mut lat = self.sync_latency_ns.clone();
        lat.sort_unstable();
        let p = |q| percentile(&lat, q).map_or("-".into(), us);
        writeln!(
            f,
            "SYNCs: {} completed; doorbell to completion p50 {}, p99 {}, max {}",
            self.syncs,
            p(50),
            p(99),
            p(100)
        )?;
        if self.inv_all > 0 {
            writeln!(f, "INV_ALL commands: {}", self.inv_all)?;
        }
        writeln!(
            f,
            "{:>5} {:>6} {:>12} {:>8} {:>9} {:>6} {:>7}  invalidations / faults / violations",
            "asid", "jobs", "bytes", "pages", "accesses", "hit%", "judged%"
        )?;
        let quiet = self.asids.values().filter(|s| s.is_quiet()).count();
        let mut active: Vec<(&u64, &AsidStats)> =
            self.asids.iter().filter(|(_, s)| !s.is_quiet()).collect();
        // The busiest first; any ASID with a violation is always shown.
        active
            .sort_by_key(|(asid, s)| (s.violations.is_empty(), std::cmp::Reverse(s.bytes), **asid));
        // Every ASID with a violation (sorted first), then the TOP_ASIDS busiest of the rest.
        let with_violations = active
            .iter()
            .filter(|(_, s)| !s.violations.is_empty())
            .count();
        let shown = &active[..active.len().min(with_violations + TOP_ASIDS)];
        for (asid, s) in shown {
            write_asid_row(f, &asid.to_string(), s, s.pages.len())?;
        }
        let mut total = AsidStats::default();
        let mut pages = 0;
        for (_, s) in &active {
            total.add(s);
            pages += s.pages.len();
        }
        if active.len() > 1 {
            write_asid_row(f, "all", &total, pages)?;
        }
        let hidden = active.len() - shown.len();
        if hidden > 0 || quiet > 0 {
            writeln!(
                f,
                "({hidden} more ASIDs with DMA not shown, in the total; {quiet} had only context and invalidation commands)"
            )?;
        }
        self.write_violations(f, None)
    }
}

impl Summary {
    /// The summary as [`Display`](fmt::Display) writes it, except that violations are split
    /// into the `expected` ones (the run's injected-bug tests announce how many they cause) and
    /// the rest, and shown in full only when some are not expected.
    pub fn report(&self, expected: u64) -> String {
        let mut s = self.to_string();
        if let Some(at) = s.rfind("\nviolations: ") {
            s.truncate(at + 1);
        }
        let mut tail = String::new();
        let _ = self.write_violations(&mut tail, Some(expected));
        s + &tail
    }

    fn write_violations(&self, f: &mut dyn fmt::Write, expected: Option<u64>) -> fmt::Result {
        let total: u64 = self.violations();
        match expected {
            None => writeln!(f, "violations: {total}")?,
            Some(e) => {
                let unexpected = total.saturating_sub(e);
                writeln!(
                    f,
                    "violations: {total} = expected {} (injected-bug tests) + unexpected {unexpected}",
                    total.min(e)
                )?;
            }
        }
        if expected.is_none_or(|e| total != e) {
            if expected.is_some() {
                writeln!(
                    f,
                    "first violations in the trace (not all of them expected):"
                )?;
            }
            for v in &self.first_violations {
                writeln!(f, "  {v}")?;
            }
        }
        for b in self.bad_lines.iter().take(5) {
            writeln!(f, "malformed line {}: {}", b.line, b.why)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn summarize(events: &[Value]) -> Summary {
        let mut s = Summary::default();
        for e in events {
            s.add(e);
        }
        s
    }

    #[test]
    fn the_table_lists_the_busiest_asids_every_violation_and_a_total() {
        let mut s = Summary::default();
        for asid in 1..=12u64 {
            let st = s.asids.entry(asid).or_default();
            st.jobs = 1;
            st.bytes = asid * 1000;
            st.accesses = 10;
        }
        // The least busy, but with a violation: always listed.
        let v = s.asids.entry(20).or_default();
        v.jobs = 1;
        v.bytes = 1;
        v.accesses = 1;
        v.violations.insert("stale".into(), 2);
        // Two that only came and went.
        for asid in [30, 31] {
            s.asids
                .entry(asid)
                .or_default()
                .invalidations
                .insert("cfgi_ctx".into(), 1);
        }
        let text = s.to_string();
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("inv:") && !l.trim_start().starts_with("all"))
            .collect();
        assert_eq!(rows.len(), TOP_ASIDS + 1, "{text}");
        assert!(
            rows[0].trim_start().starts_with("20 "),
            "violations first: {text}"
        );
        assert!(
            rows[1].trim_start().starts_with("12 "),
            "then the busiest: {text}"
        );
        assert!(
            !text.contains("\n    1      1"),
            "ASID 1 is not among the busiest: {text}"
        );
        let all = text
            .lines()
            .find(|l| l.trim_start().starts_with("all"))
            .expect("a total row");
        assert!(
            all.contains(" 13 ") && all.contains(&format!(" {} ", 78_001)),
            "{all}"
        );
        assert!(all.contains("violations: stale 2"), "{all}");
        assert!(
            text.contains("(4 more ASIDs with DMA not shown, in the total; 2 had only context"),
            "{text}"
        );
    }

    #[test]
    fn judged_and_unjudged_accesses_are_counted() {
        let s = summarize(&[
            json!({"t_ns": 1, "kind": "dma_access", "asid": 3, "va": 4096, "judged": true}),
            json!({"t_ns": 2, "kind": "dma_access", "asid": 3, "va": 8192, "judged": true}),
            json!({"t_ns": 3, "kind": "dma_access", "asid": 4, "va": 4096, "judged": false}),
            json!({"t_ns": 4, "kind": "dma_access", "asid": 4, "va": 8192}),
        ]);
        assert_eq!(s.validated(), (2, 1, 4));
        let text = s.to_string();
        assert!(
            text.contains("validated 2 of 4 device accesses (50.0%); 1 not judged"),
            "{text}"
        );
        assert!(
            text.contains("100.0%  inv"),
            "ASID 3 judged in full: {text}"
        );
    }

    #[test]
    fn per_asid_counts_hit_rate_and_classes() {
        let s = summarize(&[
            json!({"t_ns": 100, "kind": "job_start", "job": 1, "asid": 3}),
            json!({"t_ns": 110, "kind": "iotlb_fill", "asid": 3, "va": 4096, "id": 1}),
            json!({"t_ns": 120, "kind": "dma_access", "asid": 3, "va": 4096, "id": 1}),
            json!({"t_ns": 130, "kind": "dma_access", "asid": 3, "va": 4608, "id": 1}),
            json!({"t_ns": 140, "kind": "dma_access", "asid": 3, "va": 8192, "id": 1}),
            json!({"t_ns": 150, "kind": "dma_access", "asid": 3, "va": 8704, "id": 1}),
            json!({"t_ns": 160, "kind": "fault", "asid": 3, "result": "not_present"}),
            json!({"t_ns": 170, "kind": "violation", "asid": 3, "result": "stale"}),
            json!({"t_ns": 180, "kind": "job_done", "asid": 3, "len": 2048}),
            json!({"t_ns": 190, "kind": "command", "cmd": 0, "op": "inv_range", "asid": 3}),
        ]);
        let a = &s.asids[&3];
        assert_eq!(
            (a.jobs, a.bytes, a.accesses, a.fills, a.pages.len()),
            (1, 2048, 4, 1, 2)
        );
        assert!((a.hit_rate() - 0.75).abs() < 1e-9);
        assert_eq!(a.faults["not_present"], 1);
        assert_eq!(a.violations["stale"], 1);
        assert_eq!(a.invalidations["inv_range"], 1);
        assert_eq!(s.span, Some((100, 190)));
        assert_eq!(s.first_violations.len(), 1);
        let text = s.to_string();
        assert!(text.contains("violations: 1"), "{text}");
    }

    #[test]
    fn sync_latency_pairs_completion_with_its_doorbell() {
        let s = summarize(&[
            json!({"t_ns": 0, "kind": "bar_write", "reg": "CMDQ_LOG2SIZE", "value": 2}),
            // Doorbell publishes commands 0 and 1 (INV, SYNC) at t=1000.
            json!({"t_ns": 1000, "kind": "bar_write", "reg": "CMDQ_PROD", "value": 2}),
            json!({"t_ns": 1500, "kind": "command", "cmd": 0, "op": "inv_range", "asid": 1}),
            json!({"t_ns": 3000, "kind": "sync_done", "cmd": 1}),
            // Around the ring (4 entries, wrap bit 4): positions 2, 3, then 4|0 = wrap.
            json!({"t_ns": 5000, "kind": "bar_write", "reg": "CMDQ_PROD", "value": 4}),
            json!({"t_ns": 5400, "kind": "sync_done", "cmd": 3}),
        ]);
        assert_eq!(s.sync_latency_ns, vec![2000, 400]);
        assert_eq!(percentile(&[1, 2, 3, 4], 50), Some(3));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn a_multi_page_access_counts_every_page_it_covers() {
        let s = summarize(&[
            json!({"t_ns": 1, "kind": "dma_access", "asid": 1, "va": 0x2800, "len": 0x4000, "id": 1}),
            json!({"t_ns": 2, "kind": "dma_access", "asid": 1, "va": 0x6800, "len": 0x800, "id": 1}),
        ]);
        let a = &s.asids[&1];
        assert_eq!((a.accesses, a.pages.len()), (2, 5), "pages 2 to 6");
    }

    #[test]
    fn report_splits_expected_violations_and_hides_them_when_all_are() {
        let v = json!({"t_ns": 1, "kind": "violation", "asid": 1, "result": "stale"});
        let s = summarize(&[v.clone(), v]);
        let all = s.report(2);
        assert!(all.contains("violations: 2 = expected 2 (injected-bug tests) + unexpected 0"));
        assert!(!all.contains("\"kind\":\"violation\""), "{all}");
        let some = s.report(1);
        assert!(some.contains("+ unexpected 1"));
        assert!(some.contains("\"kind\":\"violation\""), "{some}");
        assert_eq!(s.to_string().matches("\"kind\":\"violation\"").count(), 2);
    }

    #[test]
    fn walk_check_violations_are_counted_by_class() {
        let s = summarize(&[
            json!({"t_ns": 1, "kind": "violation", "asid": 2, "va": 4096, "pa": 0x20_3000,
                "write": true, "result": "table_freed", "why": "x"}),
            json!({"t_ns": 2, "kind": "violation", "asid": 2, "va": 4096, "pa": 0x20_4000,
                "write": true, "result": "table_freed", "why": "x"}),
            json!({"t_ns": 3, "kind": "violation", "asid": 2, "result": "stale"}),
            json!({"t_ns": 4, "kind": "violation", "asid": 2, "va": 8192, "pa": 0x20_0000,
                "write": false, "result": "ctx_released", "why": "x"}),
        ]);
        let a = &s.asids[&2];
        assert_eq!(a.violations["table_freed"], 2);
        assert_eq!(a.violations["stale"], 1);
        assert_eq!(a.violations["ctx_released"], 1);
        assert_eq!(s.violations(), 4);
        assert!(s.to_string().contains("table_freed 2"), "{s}");
        assert!(s.to_string().contains("ctx_released 1"), "{s}");
    }

    #[test]
    fn empty_trace_summarises_to_zero() {
        let s = summarize(&[]);
        assert_eq!((s.events, s.syncs, s.violations()), (0, 0, 0));
        assert!(s.to_string().contains("0 events"));
    }
}
