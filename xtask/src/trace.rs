//! Device-trace helpers for the harness: one pass that summarises and checks a run's trace
//! (through the `zapguard-trace` library), and the trace lines of a failed test's contexts.

use crate::ktap::{AccessExpectation, ViolationWindow, WINDOW_MARK};
use serde_json::Value;
use std::path::Path;
use zapguard_trace::{check::Checker, reader, summary::Summary};

/// A run's trace, summarised and checked in one streaming pass.
pub struct Analysis {
    /// What the device did.
    pub summary: Summary,
    /// The offline invariant check.
    pub check: Checker,
    /// The device accesses the guest expected, and how far the trace went through each.
    pub accesses: ExpectedAccesses,
    /// The injected-bug tests' violations, matched against their windows.
    pub windows: ExpectedViolations,
}

/// Reads the trace at `path` once, looking for the guest's `expected` accesses on the way.
pub fn analyse(
    path: &Path,
    expected: &[AccessExpectation],
    windows: &[ViolationWindow],
) -> std::io::Result<Analysis> {
    let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut summary = Summary::default();
    let mut check = Checker::default();
    let mut accesses = ExpectedAccesses::new(expected);
    let mut violations = ExpectedViolations::new(windows);
    summary.bad_lines = reader::for_each_event(f, |n, v| {
        summary.add(v);
        check.add(n, v);
        accesses.add(v);
        violations.add(n, v);
    })?;
    check.finish();
    Ok(Analysis {
        summary,
        check,
        accesses,
        windows: violations,
    })
}

/// Matches every `violation` in the trace against the injected-bug tests' windows: inside an
/// open window whose ASID and classes it fits, it is expected; anywhere else it is not.
pub struct ExpectedViolations {
    windows: Vec<ViolationWindow>,
    /// Per window: its id is open in the trace now, and the violations matched so far.
    open: Vec<bool>,
    matched: Vec<u64>,
    /// Per window: the violations matched of a class it must catch (see
    /// [`ViolationWindow::caught`]).
    caught: Vec<u64>,
    /// Violations no window expects: how many, and the first few.
    pub unexpected: u64,
    pub first_unexpected: Vec<String>,
}

impl ExpectedViolations {
    pub fn new(windows: &[ViolationWindow]) -> Self {
        Self {
            windows: windows.to_vec(),
            open: vec![false; windows.len()],
            matched: vec![0; windows.len()],
            caught: vec![0; windows.len()],
            unexpected: 0,
            first_unexpected: Vec::new(),
        }
    }

    pub fn add(&mut self, line: u64, v: &Value) {
        let str_of = |k| v.get(k).and_then(Value::as_str);
        let num = |k| v.get(k).and_then(Value::as_u64);
        match str_of("kind") {
            Some("bar_write") if str_of("reg") == Some("SCRATCH") => {
                let value = num("value").unwrap_or(0);
                if value & 0xf000_0000 != WINDOW_MARK {
                    return;
                }
                let (id, end) = ((value & 0x0fff_ffff) >> 1, value & 1 == 1);
                for (w, open) in self.windows.iter().zip(&mut self.open) {
                    if w.id == id {
                        *open = !end;
                    }
                }
            }
            Some("violation") => {
                let (asid, class) = (num("asid").unwrap_or(0), str_of("result").unwrap_or("?"));
                let fits = |w: &ViolationWindow| {
                    (w.asid == 0 || w.asid == asid) && w.classes.iter().any(|c| c == class)
                };
                let hit = (0..self.windows.len()).find(|&i| self.open[i] && fits(&self.windows[i]));
                match hit {
                    Some(i) => {
                        self.matched[i] += 1;
                        let w = &self.windows[i];
                        if w.caught.is_empty() || w.caught.iter().any(|c| c == class) {
                            self.caught[i] += 1;
                        }
                    }
                    None => {
                        self.unexpected += 1;
                        if self.first_unexpected.len() < 3 {
                            self.first_unexpected
                                .push(format!("line {line}: {class} of asid {asid}"));
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// How many windows the guest announced, and how many violations they matched.
    pub fn totals(&self) -> (usize, u64) {
        (self.windows.len(), self.matched.iter().sum())
    }

    /// The windows that caught nothing (of the classes they must catch): bugs that went
    /// uncaught.
    pub fn empty(&self) -> Vec<String> {
        self.windows
            .iter()
            .zip(&self.caught)
            .filter(|(_, &m)| m == 0)
            .map(|(w, _)| {
                let classes = if w.caught.is_empty() {
                    &w.classes
                } else {
                    &w.caught
                };
                format!("window {} (asid {}, {})", w.id, w.asid, classes.join(","))
            })
            .collect()
    }
}

/// Matches `dma_access` events against the guest's expectations: each expectation advances
/// when the device touched its page through the next physical address in its list.
pub struct ExpectedAccesses {
    expected: Vec<AccessExpectation>,
    /// Per expectation, how many of its addresses the trace has shown, in order.
    seen: Vec<usize>,
}

impl ExpectedAccesses {
    pub fn new(expected: &[AccessExpectation]) -> Self {
        Self {
            expected: expected.to_vec(),
            seen: vec![0; expected.len()],
        }
    }

    pub fn add(&mut self, v: &Value) {
        if v.get("kind").and_then(Value::as_str) != Some("dma_access") {
            return;
        }
        let field = |k| v.get(k).and_then(Value::as_u64);
        let (Some(asid), Some(va), Some(pa), Some(len)) =
            (field("asid"), field("va"), field("pa"), field("len"))
        else {
            return;
        };
        for (e, seen) in self.expected.iter().zip(&mut self.seen) {
            let inside = e.asid == asid && (va..va.saturating_add(len)).contains(&e.va);
            if inside && e.pas.get(*seen) == Some(&(pa + (e.va - va))) {
                *seen += 1;
            }
        }
    }

    /// How many expectations there are.
    pub fn len(&self) -> usize {
        self.expected.len()
    }

    /// The expectations the trace did not meet, each with the first address it never reached.
    pub fn unmet(&self) -> Vec<String> {
        self.expected
            .iter()
            .zip(&self.seen)
            .filter(|(e, seen)| **seen < e.pas.len())
            .map(|(e, seen)| {
                format!(
                    "asid {} va {:#x}: no access through pa {:#x} (address {} of {})",
                    e.asid,
                    e.va,
                    e.pas[*seen],
                    seen + 1,
                    e.pas.len()
                )
            })
            .collect()
    }
}

/// The ASIDs a failed test's diagnostics name (`asid N`), from the serial log's `# test: ...`
/// lines.
pub fn failed_test_asids(serial: &str, test: &str) -> Vec<u64> {
    let prefix = format!("# {test}: ");
    let mut out: Vec<u64> = serial
        .lines()
        .filter_map(|l| l.find(&prefix).map(|at| &l[at + prefix.len()..]))
        .flat_map(|msg| {
            msg.match_indices("asid ")
                .filter_map(|(at, m)| {
                    let digits: String = msg[at + m.len()..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    digits.parse().ok()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The last `n` trace lines of `asid` (streamed, so big traces are fine; a binary trace is
/// decoded to its JSON lines).
pub fn last_lines_of_asid(path: &Path, asid: u64, n: usize) -> std::io::Result<Vec<String>> {
    let needle = format!("\"asid\":{asid},");
    let mut ring = std::collections::VecDeque::with_capacity(n);
    let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    reader::for_each_line(f, |_, line| {
        let line = String::from_utf8_lossy(line);
        if line.contains(&needle) {
            if ring.len() == n {
                ring.pop_front();
            }
            ring.push_back(line.into_owned());
        }
    })?;
    Ok(ring.into())
}

#[cfg(test)]
mod asid_tests {
    use super::*;

    #[test]
    fn asids_named_by_a_failed_test() {
        let serial =
            "# t1: DMA op 4: EIO (asid 3)\n# t2: x (asid 9)\n# t1: again asid 12 and asid 3\n";
        assert_eq!(failed_test_asids(serial, "t1"), vec![3, 12]);
        assert!(failed_test_asids(serial, "t3").is_empty());
    }

    #[test]
    fn expected_accesses_must_appear_in_order() {
        let e = AccessExpectation {
            asid: 2,
            va: 0x40_1000,
            pas: vec![0x9000, 0x5000],
        };
        let access = |asid: u64, va: u64, pa: u64, len: u64| serde_json::json!({"kind": "dma_access", "asid": asid, "va": va, "pa": pa, "len": len});
        let run = |events: &[Value]| {
            let mut x = ExpectedAccesses::new(std::slice::from_ref(&e));
            events.iter().for_each(|v| x.add(v));
            x.unmet()
        };
        // A multi-page access covering the page, then a page-sized one at the new home.
        let good = [
            access(2, 0x40_0000, 0x8000, 0x3000),
            access(2, 0x40_1000, 0x5000, 0x1000),
        ];
        assert!(run(&good).is_empty());
        // Wrong order, another context, another page, or a fill instead of an access: unmet.
        let reversed = [good[1].clone(), good[0].clone()];
        assert_eq!(run(&reversed).len(), 1, "{:?}", run(&reversed));
        let other_asid = [access(3, 0x40_1000, 0x9000, 0x1000), good[1].clone()];
        assert!(run(&other_asid)[0].contains("pa 0x9000"));
        let other_page = [access(2, 0x40_2000, 0x9000, 0x1000), good[1].clone()];
        assert_eq!(run(&other_page).len(), 1);
        let fill = serde_json::json!({"kind": "iotlb_fill", "asid": 2, "va": 0x40_1000, "pa": 0x9000, "len": 4096});
        assert!(run(&[fill, good[1].clone()])[0].contains("address 1 of 2"));
    }

    #[test]
    fn last_lines_filter_by_asid() {
        let dir = std::env::temp_dir().join(format!("zg-asid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("t.jsonl");
        let lines: Vec<String> = (0..10)
            .map(|i| format!("{{\"seq\":{i},\"asid\":{},\"kind\":\"x\"}}", i % 2))
            .collect();
        std::fs::write(&p, lines.join("\n")).expect("write");
        let got = last_lines_of_asid(&p, 1, 2).expect("read");
        assert_eq!(got, vec![lines[7].clone(), lines[9].clone()]);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Violations count as expected only inside an open window that names their context and
    /// class; a window that caught nothing is reported too.
    #[test]
    fn violations_are_matched_by_window_context_and_class() {
        use serde_json::json;
        let windows = [
            crate::ktap::violation_window(
                "ZAPGUARD-EXPECT-WINDOW id=1 asid=7 classes=stale,zapped_during_access",
            )
            .expect("line"),
            crate::ktap::violation_window("ZAPGUARD-EXPECT-WINDOW id=2 asid=0 classes=released")
                .expect("line"),
            crate::ktap::violation_window("ZAPGUARD-EXPECT-WINDOW id=3 asid=9 classes=write_perm")
                .expect("line"),
        ];
        let mark = |id: u64, end: u64| json!({"kind": "bar_write", "reg": "SCRATCH", "value": WINDOW_MARK | id << 1 | end});
        let viol =
            |asid: u64, class: &str| json!({"kind": "violation", "asid": asid, "result": class});
        let mut e = ExpectedViolations::new(&windows);
        for (n, v) in [
            viol(7, "stale"), // before its window: unexpected
            mark(1, 0),
            viol(7, "stale"), // expected
            viol(7, "zapped_during_access"),
            viol(8, "stale"),      // another context: unexpected
            viol(7, "write_perm"), // another class: unexpected
            mark(1, 1),
            viol(7, "stale"), // after: unexpected
            mark(2, 0),
            viol(42, "released"), // any context
            mark(2, 1),
            mark(3, 0),
            mark(3, 1), // caught nothing
        ]
        .iter()
        .enumerate()
        {
            e.add(n as u64 + 1, v);
        }
        assert_eq!(e.totals(), (3, 3));
        assert_eq!(e.unexpected, 4, "{:?}", e.first_unexpected);
        assert_eq!(e.empty(), ["window 3 (asid 9, write_perm)"]);
        assert!(
            crate::ktap::violation_window("ZAPGUARD-EXPECT-WINDOW id=x asid=1 classes=a").is_none()
        );
    }

    /// A window that must catch one class (`caught=`) is empty until it does, whatever else of
    /// its classes it matched.
    #[test]
    fn a_window_that_must_catch_a_class_is_empty_without_it() {
        use serde_json::json;
        let w = crate::ktap::violation_window(
            "ZAPGUARD-EXPECT-WINDOW id=4 asid=3 classes=stale,zapped_during_access caught=zapped_during_access",
        )
        .expect("line");
        assert_eq!(w.caught, ["zapped_during_access"]);
        let mark = |end: u64| json!({"kind": "bar_write", "reg": "SCRATCH", "value": WINDOW_MARK | 4 << 1 | end});
        let viol = |class: &str| json!({"kind": "violation", "asid": 3, "result": class});
        let run = |classes: &[&str]| {
            let mut e = ExpectedViolations::new(std::slice::from_ref(&w));
            e.add(1, &mark(0));
            for c in classes {
                e.add(2, &viol(c));
            }
            e.add(3, &mark(1));
            (e.unexpected, e.empty())
        };
        assert_eq!(
            run(&["stale", "stale"]),
            (
                0,
                vec!["window 4 (asid 3, zapped_during_access)".to_string()]
            )
        );
        assert_eq!(run(&["stale", "zapped_during_access"]), (0, vec![]));
    }
}
