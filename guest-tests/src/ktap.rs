//! A minimal KTAP v1 producer: each test is a named function returning `Result<(), String>`; the
//! runner prints `ok`/`not ok` lines, diagnostics as `#` lines, and the closing `N passed, N failed`
//! line that the host harness sums with its own results.
//!
//! A test that runs a suite of its own (the kernel's hmm-tests) reports each of its results with
//! [`subtest`]; the runner prints them as a nested KTAP block (indented four spaces) before the
//! test's own line, which fails if any of them failed. The host counts nested results too.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

/// One result of a test's own suite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sub {
    /// Name (no spaces).
    pub name: String,
    /// `Ok`, or `Err` as a test's (a [`skip`] reason skips).
    pub result: Result<(), String>,
    /// Wall time in milliseconds.
    pub ms: u128,
}

/// Results reported by the running test, printed (and cleared) when it returns.
static SUBS: Mutex<Vec<Sub>> = Mutex::new(Vec::new());

/// Reports one result of the running test's own suite.
pub fn subtest(sub: Sub) {
    SUBS.lock().unwrap_or_else(|p| p.into_inner()).push(sub);
}

/// The outcome word and directive of a result line, counting it into `sum`.
fn outcome(res: &Result<(), String>, ms: u128, sum: &mut Summary) -> (&'static str, String) {
    match res {
        Err(why) if why.starts_with(SKIP) => {
            sum.skipped += 1;
            ("ok", format!(" # SKIP {}", why[SKIP.len()..].trim()))
        }
        Ok(()) => {
            sum.passed += 1;
            ("ok", format!(" # time={ms}ms"))
        }
        Err(_) => {
            sum.failed += 1;
            ("not ok", format!(" # time={ms}ms"))
        }
    }
}

/// Prints the running test's nested results; returns their failures.
fn print_subs(out: &mut dyn Write, sum: &mut Summary) -> std::io::Result<usize> {
    let subs = std::mem::take(&mut *SUBS.lock().unwrap_or_else(|p| p.into_inner()));
    if subs.is_empty() {
        return Ok(0);
    }
    writeln!(out, "    KTAP version 1")?;
    writeln!(out, "    1..{}", subs.len())?;
    let failed_before = sum.failed;
    for (i, s) in subs.iter().enumerate() {
        if let Err(why) = &s.result {
            if !why.starts_with(SKIP) {
                for line in why.lines() {
                    writeln!(out, "    # {}: {line}", s.name)?;
                }
            }
        }
        let (word, directive) = outcome(&s.result, s.ms, sum);
        writeln!(out, "    {word} {} {}{directive}", i + 1, s.name)?;
    }
    Ok(sum.failed - failed_before)
}

/// One test: a name (`snake_case`, no spaces, it ends up in the KTAP line) and its body.
pub struct Test {
    /// Name printed after `ok N`.
    pub name: &'static str,
    /// The body: `Err(reason)` fails the test.
    pub run: fn() -> Result<(), String>,
}

/// Builds a `[Test]` list from test functions, named after the functions.
macro_rules! tests {
    ($($f:ident),* $(,)?) => {
        &[$($crate::ktap::Test { name: stringify!($f), run: $f }),*]
    };
}
pub(crate) use tests;

/// Totals of a run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Tests that returned `Ok`.
    pub passed: usize,
    /// Tests that returned `Err` or panicked.
    pub failed: usize,
    /// Tests filtered out.
    pub skipped: usize,
}

/// Whether `filter` selects the test `name`: all if `None`; `a|b` selects names containing `a`
/// or `b`; `=a|b` selects exactly the tests named `a` or `b`.
pub fn selects(filter: Option<&str>, name: &str) -> bool {
    match filter {
        None => true,
        Some(f) => match f.strip_prefix('=') {
            Some(exact) => exact.split('|').any(|n| n == name),
            None => f.split('|').any(|alt| name.contains(alt)),
        },
    }
}

/// Runs the tests `filter` selects ([`selects`]), in order, writing KTAP to `out`.
pub fn run(tests: &[Test], filter: Option<&str>, out: &mut dyn Write) -> std::io::Result<Summary> {
    let mut sum = Summary::default();
    writeln!(out, "KTAP version 1")?;
    writeln!(out, "1..{}", tests.len())?;
    for (i, t) in tests.iter().enumerate() {
        let n = i + 1;
        if !selects(filter, t.name) {
            sum.skipped += 1;
            writeln!(out, "ok {n} {} # SKIP filtered out", t.name)?;
            continue;
        }
        out.flush()?;
        let start = Instant::now();
        // A panicking test is a failed test, not a dead runner: the rest still run and report.
        let res = std::panic::catch_unwind(t.run).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            Err(format!("panicked: {msg}"))
        });
        let ms = start.elapsed().as_millis();
        let failed_subs = print_subs(out, &mut sum)?;
        let res = match res {
            Ok(()) if failed_subs > 0 => Err(format!("{failed_subs} of its own tests failed")),
            r => r,
        };
        if let Err(why) = &res {
            if !why.starts_with(SKIP) {
                for line in why.lines() {
                    writeln!(out, "# {}: {line}", t.name)?;
                }
            }
        }
        let (word, directive) = outcome(&res, ms, &mut sum);
        writeln!(out, "{word} {n} {}{directive}", t.name)?;
    }
    writeln!(
        out,
        "# guest: {} passed, {} failed, {} skipped",
        sum.passed, sum.failed, sum.skipped
    )?;
    out.flush()?;
    Ok(sum)
}

/// Prefix of an `Err` that means "skipped" rather than "failed" (see [`skip`]).
const SKIP: &str = "SKIP:";

/// The error a test returns to be reported as skipped, with `reason`.
pub fn skip(reason: &str) -> String {
    format!("{SKIP} {reason}")
}

/// Fails with `msg` and both values when `a != b`.
pub fn check_eq<T: PartialEq + std::fmt::Debug>(a: T, b: T, msg: &str) -> Result<(), String> {
    if a == b {
        Ok(())
    } else {
        Err(format!("{msg}: got {a:?}, expected {b:?}"))
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn pass() -> Result<(), String> {
        Ok(())
    }
    fn fail() -> Result<(), String> {
        Err("two\nlines".into())
    }
    fn boom() -> Result<(), String> {
        panic!("kaboom")
    }

    const TESTS: &[Test] = &[
        Test {
            name: "alpha_pass",
            run: pass,
        },
        Test {
            name: "beta_fail",
            run: fail,
        },
        Test {
            name: "gamma_panic",
            run: boom,
        },
    ];

    #[test]
    fn counts_and_ktap_lines() {
        let mut out = Vec::new();
        let sum = run(TESTS, None, &mut out).unwrap();
        assert_eq!(
            sum,
            Summary {
                passed: 1,
                failed: 2,
                skipped: 0
            }
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "KTAP version 1");
        assert_eq!(lines[1], "1..3");
        assert!(lines[2].starts_with("ok 1 alpha_pass # time="));
        assert_eq!(lines[3], "# beta_fail: two");
        assert_eq!(lines[4], "# beta_fail: lines");
        assert!(lines[5].starts_with("not ok 2 beta_fail"));
        assert_eq!(lines[6], "# gamma_panic: panicked: kaboom");
        assert!(lines[7].starts_with("not ok 3 gamma_panic"));
        assert_eq!(
            *lines.last().unwrap(),
            "# guest: 1 passed, 2 failed, 0 skipped"
        );
    }

    fn suite() -> Result<(), String> {
        for (name, result) in [
            ("a.one", Ok(())),
            ("a.two", Err(skip("no hugetlb pages"))),
            ("a.three", Err("wrong".to_string())),
        ] {
            subtest(Sub {
                name: name.into(),
                result,
                ms: 5,
            });
        }
        Ok(())
    }

    #[test]
    fn nested_results_print_before_their_test_which_fails_with_them() {
        let mut out = Vec::new();
        let tests = [Test {
            name: "suite",
            run: suite,
        }];
        let sum = run(&tests, None, &mut out).unwrap();
        assert_eq!(
            sum,
            Summary {
                passed: 1,
                failed: 2,
                skipped: 1
            }
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[2], "    KTAP version 1");
        assert_eq!(lines[3], "    1..3");
        assert_eq!(lines[4], "    ok 1 a.one # time=5ms");
        assert_eq!(lines[5], "    ok 2 a.two # SKIP no hugetlb pages");
        assert_eq!(lines[6], "    # a.three: wrong");
        assert_eq!(lines[7], "    not ok 3 a.three # time=5ms");
        assert_eq!(lines[8], "# suite: 1 of its own tests failed");
        assert!(lines[9].starts_with("not ok 1 suite # time="));
    }

    #[test]
    fn filter_skips_others() {
        let mut out = Vec::new();
        let sum = run(TESTS, Some("alpha"), &mut out).unwrap();
        assert_eq!(
            sum,
            Summary {
                passed: 1,
                failed: 0,
                skipped: 2
            }
        );
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("ok 2 beta_fail # SKIP filtered out"));
    }

    #[test]
    fn filter_alternatives() {
        let mut out = Vec::new();
        let sum = run(TESTS, Some("alpha|beta"), &mut out).unwrap();
        assert_eq!(sum.passed + sum.failed, 2);
        assert_eq!(sum.skipped, 1);
    }

    #[test]
    fn an_exact_filter_selects_whole_names_only() {
        assert!(selects(Some("=alpha|beta_fail"), "alpha"));
        assert!(!selects(Some("=alph"), "alpha"), "no substring match");
        assert!(selects(Some("alph"), "alpha"));
        assert!(selects(None, "anything"));
    }

    #[test]
    fn skip_is_counted_with_its_reason() {
        fn skipper() -> Result<(), String> {
            Err(skip("no hugetlbfs"))
        }
        let tests = tests![skipper];
        let mut out = Vec::new();
        let sum = run(tests, None, &mut out).expect("run");
        assert_eq!((sum.passed, sum.failed, sum.skipped), (0, 0, 1));
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("ok 1 skipper # SKIP no hugetlbfs"), "{text}");
    }

    #[test]
    fn check_eq_reports_both_values() {
        assert!(check_eq(1, 1, "x").is_ok());
        assert_eq!(check_eq(1, 2, "x").unwrap_err(), "x: got 1, expected 2");
    }
}
