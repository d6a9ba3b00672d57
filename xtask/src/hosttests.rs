//! Running the host test suites and counting their results from cargo's `test result:` lines.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Pass/fail counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Passed tests.
    pub passed: usize,
    /// Failed tests.
    pub failed: usize,
}

/// Adds the counts of one `test result: ok. 5 passed; 1 failed; 0 ignored; ...` line.
pub fn add_result_line(c: &mut Counts, line: &str) -> bool {
    let Some(rest) = line.trim().strip_prefix("test result: ") else {
        return false;
    };
    for part in rest.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        let n = |i: usize| words.get(i).and_then(|w| w.parse::<usize>().ok());
        // "ok. 5 passed" or "FAILED. 5 passed" or "1 failed".
        match words.as_slice() {
            [_, _, "passed"] => c.passed += n(1).unwrap_or(0),
            [_, "passed"] => c.passed += n(0).unwrap_or(0),
            [_, "failed"] => c.failed += n(0).unwrap_or(0),
            _ => {}
        }
    }
    true
}

/// Runs `cargo test --workspace`, echoing its output, and returns the summed counts. A cargo
/// failure without any result line (a compile error) counts as one failure.
pub fn run(root: &std::path::Path) -> std::io::Result<Counts> {
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["test", "--workspace", "--color", "never"])
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut c = Counts::default();
    let mut saw_result = false;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            saw_result |= add_result_line(&mut c, &line);
        }
    }
    let status = child.wait()?;
    if !status.success() && c.failed == 0 {
        c.failed += 1;
        if !saw_result {
            eprintln!("xtask: cargo test failed before running any test ({status})");
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_sum() {
        let mut c = Counts::default();
        assert!(add_result_line(&mut c, "test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"));
        assert!(add_result_line(
            &mut c,
            "test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out"
        ));
        assert!(!add_result_line(&mut c, "running 5 tests"));
        assert_eq!(
            c,
            Counts {
                passed: 7,
                failed: 3
            }
        );
    }
}
