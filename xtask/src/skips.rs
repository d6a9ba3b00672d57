//! The guest tests that skip on purpose (`guest-tests/expected-skips.txt`): every other skip
//! fails the run, so a test that quietly stopped running (a missing kernel option, a node that
//! did not appear, a zapguard skip in the kernel's hmm-tests where test_hmm passed) is seen.

use crate::ktap::{Outcome, TestLine};

/// Where the list lives, from the repository root.
pub const PATH: &str = "guest-tests/expected-skips.txt";

/// What a filtered run's runner prints for the tests the filter left out.
const FILTERED_OUT: &str = "filtered out";

/// One expected skip: in which runs, of which test, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Expected {
    /// A kernel flavor (`default` covers the knob runs and the production run too),
    /// `production` (the production module's run), or `*` for every run.
    run: String,
    /// A test's name, or `*`: every test that skips with exactly `why` as its reason.
    test: String,
    why: String,
}

/// The list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpectedSkips(Vec<Expected>);

impl ExpectedSkips {
    /// Parses the list: one `RUN TEST WHY...` per line; `#` starts a comment.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.splitn(3, char::is_whitespace);
            let (Some(run), Some(test), Some(why)) = (words.next(), words.next(), words.next())
            else {
                return Err(format!("{PATH}:{}: want RUN TEST WHY, got {line:?}", n + 1));
            };
            out.push(Expected {
                run: run.to_string(),
                test: test.to_string(),
                why: why.trim().to_string(),
            });
        }
        Ok(Self(out))
    }

    /// Reads the committed list.
    pub fn load(root: &std::path::Path) -> Result<Self, String> {
        let p = root.join(PATH);
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Self::parse(&text)
    }

    /// The skips in `results` that the list does not expect of a run named by any of `runs`
    /// (its kernel flavor, and `production` for the production module's); in a `filtered`
    /// run, the tests the filter left out are expected too.
    pub fn unexpected<'a>(
        &self,
        runs: &[&str],
        filtered: bool,
        results: &'a [TestLine],
    ) -> Vec<&'a TestLine> {
        let listed = |t: &TestLine| {
            self.0.iter().any(|e| {
                (e.run == "*" || runs.contains(&e.run.as_str()))
                    && (e.test == t.name || e.test == "*" && e.why == t.reason)
            })
        };
        results
            .iter()
            .filter(|t| t.outcome == Outcome::Skip)
            .filter(|t| !(listed(t) || filtered && t.reason == FILTERED_OUT))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip(name: &str, reason: &str) -> TestLine {
        TestLine {
            name: name.into(),
            outcome: Outcome::Skip,
            reason: reason.into(),
        }
    }

    #[test]
    fn only_listed_skips_of_the_run_are_expected() {
        let list = ExpectedSkips::parse(
            "# comment\n\ndefault a dma-debug is off\n* b its own boot  # trailing\n",
        )
        .unwrap();
        let results = [
            skip("a", "dma-debug is off"),
            skip("b", "its own boot"),
            skip("c", "no second node"),
            TestLine {
                name: "d".into(),
                outcome: Outcome::Pass,
                reason: String::new(),
            },
        ];
        let names = |v: Vec<&TestLine>| v.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(list.unexpected(&["default"], false, &results)), ["c"]);
        assert_eq!(
            names(list.unexpected(&["debug"], false, &results)),
            ["a", "c"]
        );
        // A filter's skips are expected only in a filtered run.
        let filtered = [skip("e", "filtered out")];
        assert_eq!(
            names(list.unexpected(&["default"], false, &filtered)),
            ["e"]
        );
        assert!(list.unexpected(&["default"], true, &filtered).is_empty());
    }

    #[test]
    fn a_wildcard_line_expects_only_its_reason_in_its_run() {
        let list = ExpectedSkips::parse("production * needs the test build\n").unwrap();
        let results = [skip("a", "needs the test build"), skip("b", "no hugetlbfs")];
        let names = |v: Vec<&TestLine>| v.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(list.unexpected(&["production", "default"], false, &results)),
            ["b"]
        );
        assert_eq!(
            names(list.unexpected(&["default"], false, &results)),
            ["a", "b"]
        );
    }

    #[test]
    fn a_line_without_a_reason_is_refused() {
        assert!(ExpectedSkips::parse("default a\n").is_err());
    }

    #[test]
    fn the_committed_list_parses() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let list = ExpectedSkips::load(&root).unwrap();
        assert!(!list.0.is_empty());
    }
}
