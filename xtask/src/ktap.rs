//! Reading what the guest printed on its serial console: KTAP results, the init's markers, and
//! kernel splats (panic, oops, BUG, WARN, lockdep) that must fail a run even if every test passed.

/// Outcome of one test line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `ok N name`
    Pass,
    /// `not ok N name`
    Fail,
    /// `ok N name # SKIP reason`
    Skip,
}

/// One parsed result line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestLine {
    /// Test name.
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
    /// Why it was skipped (the text after `# SKIP`), empty otherwise.
    pub reason: String,
}

/// Parses a KTAP/TAP result line, top-level or nested (indented: a guest test's own suite, such
/// as the kernel's hmm-tests); `None` for anything else (diagnostics, plan, noise).
pub fn parse_result(line: &str) -> Option<TestLine> {
    let line = line.trim_start_matches(' ');
    let (outcome, rest) = if let Some(r) = line.strip_prefix("not ok ") {
        (Outcome::Fail, r)
    } else if let Some(r) = line.strip_prefix("ok ") {
        (Outcome::Pass, r)
    } else {
        return None;
    };
    let (num, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    num.parse::<u32>().ok()?;
    let (name, directive) = match rest.split_once('#') {
        Some((n, d)) => (n.trim(), d.trim()),
        None => (rest.trim(), ""),
    };
    let skipped = outcome == Outcome::Pass && directive.to_ascii_uppercase().starts_with("SKIP");
    let (outcome, reason) = if skipped {
        (Outcome::Skip, directive[4..].trim().to_string())
    } else {
        (outcome, String::new())
    };
    Some(TestLine {
        name: name.to_string(),
        outcome,
        reason,
    })
}

/// The number of tests a top-level KTAP plan line (`1..N`, not indented) announces.
pub fn plan(line: &str) -> Option<usize> {
    line.strip_prefix("1..")?.trim().parse().ok()
}

/// Substrings the kernel prints when something went wrong that no test reports by itself.
const SPLATS: &[&str] = &[
    "Kernel panic",
    "Oops:",
    "BUG:",
    "WARNING:",
    "general protection fault",
    "Call Trace:",
    "UBSAN:",
    "KASAN:",
    "possible circular locking",
    "possible recursive locking",
    "inconsistent lock state",
    "INFO: task",
    "rcu: INFO:",
    "Unable to handle kernel",
    "segfault at",
    // The driver's own leak report at teardown, and its reports of its own inconsistencies.
    "zapguard: leak:",
    "zapguard: bug:",
];

/// Printed by a guest test before it lets the OOM killer end one of its processes, and again
/// (with `end`) once that is over: OOM-killer reports in between are expected, not splats.
pub const OOM_EXPECTED: &str = "ZAPGUARD-OOM-EXPECTED";

/// Which console lines belong to an OOM-killer report the guest announced ([`OOM_EXPECTED`]):
/// from "invoked oom-killer:" to "Out of memory: Killed process", the report's stack dump and
/// memory summary included. Anything else in the window (a KASAN report, a WARN) still counts.
#[derive(Debug, Default)]
pub struct OomWindow {
    announced: bool,
    in_report: bool,
}

impl OomWindow {
    /// Whether `line` is part of an announced OOM-killer report.
    pub fn expected(&mut self, line: &str) -> bool {
        if let Some(at) = line.find(OOM_EXPECTED) {
            self.announced = !line[at + OOM_EXPECTED.len()..].trim().starts_with("end");
            self.in_report = false;
            return false;
        }
        if self.announced && line.contains("invoked oom-killer:") {
            self.in_report = true;
        }
        let part = self.in_report;
        if line.contains("Out of memory: Killed process") {
            self.in_report = false;
        }
        part
    }
}

/// The splat pattern `line` matches, if any.
pub fn splat(line: &str) -> Option<&'static str> {
    SPLATS
        .iter()
        .copied()
        .find(|p| line.contains(p))
        .or_else(|| driver_report(line))
}

/// The driver's own leak and bug reports as `dev_err!` prints them
/// (`zapguard 0000:00:04.0: leak: ...`), under the pattern they count as.
fn driver_report(line: &str) -> Option<&'static str> {
    let (_, after) = line.split_once("zapguard ")?;
    let (_, message) = after.split_once(": ")?;
    if message.starts_with("leak:") {
        Some("zapguard: leak:")
    } else if message.starts_with("bug:") {
        Some("zapguard: bug:")
    } else {
        None
    }
}

/// Markers printed by `images/initramfs/init`.
pub const TESTS_BEGIN: &str = "ZAPGUARD-TESTS-BEGIN";
/// End of the guest test run.
pub const TESTS_END: &str = "ZAPGUARD-TESTS-END";
/// Init is about to power off; `rc=N` follows.
pub const DONE: &str = "ZAPGUARD-DONE";

/// Printed by the guest suite's last mirroring test: the validator violations the injected-bug
/// tests caused (the device trace must hold exactly these).
pub const EXPECTED_VIOLATIONS: &str = "ZAPGUARD-EXPECTED-VIOLATIONS";

/// The number after [`EXPECTED_VIOLATIONS`].
pub fn expected_violations(line: &str) -> Option<u64> {
    let at = line.find(EXPECTED_VIOLATIONS)?;
    line[at + EXPECTED_VIOLATIONS.len()..].trim().parse().ok()
}

/// Printed by a guest test that knows where a page lives: `asid=N va=0x.. pa=0x.. [pa=0x..]..`
/// says the device must have accessed the page at `va` of context `asid` through each `pa`, in
/// this order (the NUMA tests name a page's home before and after its migration).
pub const TRACE_EXPECT: &str = "ZAPGUARD-TRACE-EXPECT";

/// A [`TRACE_EXPECT`] line: the context, the page's VA and the physical addresses in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessExpectation {
    pub asid: u64,
    pub va: u64,
    pub pas: Vec<u64>,
}

/// Parses a [`TRACE_EXPECT`] line; `None` if the marker is absent or a field is malformed.
pub fn trace_expectation(line: &str) -> Option<AccessExpectation> {
    let at = line.find(TRACE_EXPECT)?;
    let (mut asid, mut va, mut pas) = (None, None, Vec::new());
    for field in line[at + TRACE_EXPECT.len()..].split_whitespace() {
        let (key, value) = field.split_once('=')?;
        let value = match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok()?,
            None => value.parse().ok()?,
        };
        match key {
            "asid" => asid = Some(value),
            "va" => va = Some(value),
            "pa" => pas.push(value),
            _ => return None,
        }
    }
    (!pas.is_empty()).then_some(AccessExpectation {
        asid: asid?,
        va: va?,
        pas,
    })
}

/// Printed by an injected-bug test once its bug ran: `id=N asid=A classes=c1,c2` says that the
/// violations between the device-trace markers of window `N` (`SCRATCH` writes of
/// [`WINDOW_MARK`]` | N << 1`, `| 1` for the end) are expected, of these classes, from ASID `A`
/// (0: any ASID, for a test whose context belongs to a child). Any other violation is
/// unexpected, and a window with none is a bug that went uncaught.
pub const WINDOW_EXPECT: &str = "ZAPGUARD-EXPECT-WINDOW";
/// The high bits of a `SCRATCH` value that marks a window (the driver's own probe pattern never
/// has them all set).
pub const WINDOW_MARK: u64 = 0xe000_0000;

/// A [`WINDOW_EXPECT`] line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViolationWindow {
    pub id: u64,
    /// 0: any.
    pub asid: u64,
    pub classes: Vec<String>,
    /// The classes of which the window must catch one to count as caught (`caught=`; empty:
    /// any of `classes`).
    pub caught: Vec<String>,
}

/// Parses a [`WINDOW_EXPECT`] line; `None` if the marker is absent or a field is malformed.
pub fn violation_window(line: &str) -> Option<ViolationWindow> {
    let at = line.find(WINDOW_EXPECT)?;
    let (mut id, mut asid, mut classes, mut caught) = (None, None, Vec::new(), Vec::new());
    for field in line[at + WINDOW_EXPECT.len()..].split_whitespace() {
        match field.split_once('=')? {
            ("id", v) => id = Some(v.parse().ok()?),
            ("asid", v) => asid = Some(v.parse().ok()?),
            ("classes", v) => classes = v.split(',').map(str::to_string).collect(),
            ("caught", v) => caught = v.split(',').map(str::to_string).collect(),
            _ => return None,
        }
    }
    (!classes.is_empty()).then_some(ViolationWindow {
        id: id?,
        asid: asid?,
        classes,
        caught,
    })
}

/// The `rc=N` value of a marker line.
pub fn marker_rc(line: &str, marker: &str) -> Option<i32> {
    let at = line.find(marker)?;
    line[at + marker.len()..]
        .trim()
        .strip_prefix("rc=")?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_violations_line() {
        assert_eq!(
            expected_violations("  | ZAPGUARD-EXPECTED-VIOLATIONS 42"),
            Some(42)
        );
        assert_eq!(expected_violations("ZAPGUARD-EXPECTED-VIOLATIONS x"), None);
        assert_eq!(expected_violations("no marker 3"), None);
    }

    #[test]
    fn trace_expectation_lines() {
        assert_eq!(
            trace_expectation("  | ZAPGUARD-TRACE-EXPECT asid=3 va=0x7f0000 pa=0x1000 pa=0x2000"),
            Some(AccessExpectation {
                asid: 3,
                va: 0x7f_0000,
                pas: vec![0x1000, 0x2000]
            })
        );
        for bad in [
            "ZAPGUARD-TRACE-EXPECT asid=3 va=0x10",
            "ZAPGUARD-TRACE-EXPECT va=0x10 pa=0x1000",
            "ZAPGUARD-TRACE-EXPECT asid=3 va=0x10 pa=0xzz",
            "ZAPGUARD-TRACE-EXPECT asid=3 va=0x10 pa=0x1000 why=x",
            "no marker asid=3 va=0x10 pa=0x1000",
        ] {
            assert_eq!(trace_expectation(bad), None, "{bad}");
        }
    }

    #[test]
    fn result_lines() {
        let cases = [
            (
                "ok 1 dev_node_exists # time=3ms",
                Some(("dev_node_exists", Outcome::Pass)),
            ),
            (
                "not ok 12 get_info_identity # time=0ms",
                Some(("get_info_identity", Outcome::Fail)),
            ),
            ("ok 3 foo # SKIP filtered out", Some(("foo", Outcome::Skip))),
            ("ok 4 bar", Some(("bar", Outcome::Pass))),
            ("not ok 5 baz", Some(("baz", Outcome::Fail))),
            ("# ok 1 inside a diagnostic", None),
            ("ok x notanumber", None),
            (
                "    ok 2 test_hmm.anon_read # time=40ms",
                Some(("test_hmm.anon_read", Outcome::Pass)),
            ),
            (
                "    not ok 3 zapguard.compound # time=1ms",
                Some(("zapguard.compound", Outcome::Fail)),
            ),
            ("    1..15", None),
            ("1..9", None),
            ("KTAP version 1", None),
            ("[    1.2] ok 1 prefixed by the kernel", None),
        ];
        for (line, want) in cases {
            let got = parse_result(line).map(|t| (t.name, t.outcome));
            assert_eq!(got, want.map(|(n, o)| (n.to_string(), o)), "line {line:?}");
        }
    }

    #[test]
    fn oom_reports_are_expected_only_inside_an_announced_window() {
        let report = [
            "[ 20.85] zapguard-guest- invoked oom-killer: gfp_mask=0x140dca, order=0",
            "[ 20.86] Call Trace:",
            "[ 20.87] Mem-Info:",
            "[ 20.88] Out of memory: Killed process 501 (zapguard-guest-) total-vm:1kB",
        ];
        let mut w = OomWindow::default();
        // Not announced: every line is what it is.
        assert!(report.iter().all(|l| !w.expected(l)));
        assert!(!w.expected("ZAPGUARD-OOM-EXPECTED begin"));
        assert!(report.iter().all(|l| w.expected(l)));
        // After the report, inside the window: a stack dump is a splat again.
        assert!(!w.expected("[ 20.90] Call Trace:"));
        assert!(!w.expected("[ 20.91] oom_reaper: reaped process 501"));
        assert!(!w.expected("ZAPGUARD-OOM-EXPECTED end"));
        assert!(report.iter().all(|l| !w.expected(l)), "window closed");
    }

    #[test]
    fn driver_reports_with_the_device_prefix() {
        assert_eq!(
            splat("[ 12.3] zapguard 0000:00:04.0: leak: 3 ASIDs not returned"),
            Some("zapguard: leak:")
        );
        assert_eq!(
            splat("[ 1.0] zapguard 0000:00:04.0: bug: ASID 7 freed twice"),
            Some("zapguard: bug:")
        );
        assert_eq!(
            splat("[ 1.0] zapguard 0000:00:04.0: asid 7: fault at 0x1000"),
            None
        );
    }

    #[test]
    fn splats_and_clean_lines() {
        assert_eq!(
            splat("[    2.0] WARNING: CPU: 0 PID: 1 at mm/foo.c:12"),
            Some("WARNING:")
        );
        assert_eq!(
            splat("[    2.0] BUG: kernel NULL pointer dereference"),
            Some("BUG:")
        );
        assert_eq!(
            splat("[    2.0] Kernel panic - not syncing: Fatal exception"),
            Some("Kernel panic")
        );
        assert_eq!(
            splat("[    0.5] zapguard 0000:00:03.0: zapguard ABI 1.0"),
            None
        );
        assert_eq!(splat("ok 1 dev_node_exists"), None);
    }

    #[test]
    fn markers() {
        assert_eq!(marker_rc("ZAPGUARD-TESTS-END rc=0", TESTS_END), Some(0));
        assert_eq!(marker_rc("ZAPGUARD-DONE rc=3", DONE), Some(3));
        assert_eq!(marker_rc("ZAPGUARD-DONE", DONE), None);
        assert_eq!(marker_rc("nothing", DONE), None);
    }
}
