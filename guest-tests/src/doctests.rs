//! The doctests of the kernel abstractions the driver is built on (`images/kernel/patches/`).
//!
//! The guest kernel builds the `kernel` crate's doctests as KUnit tests
//! (`CONFIG_RUST_KERNEL_DOCTESTS`), and the harness's `kunit.filter_glob` runs those of the files
//! the patches add to or change at boot. KUnit keeps each suite's KTAP results in debugfs; this
//! test reads them, reports every selected doctest as a subtest, and checks them against the
//! doctests the patches themselves contain (embedded below at build time), so that a doctest that
//! did not run counts as a failure, not as nothing.

use crate::ktap::{subtest, Sub};
use crate::patch_doctests::{added_doctests, FileDoctests};

/// The patch series, embedded so that the expected doctests come from the patches themselves.
const PATCHES: &[(&str, &str)] = &[
    (
        "0001",
        include_str!(
            "../../images/kernel/patches/0001-rust-bindings-and-helpers-for-mmu_notifier-and-hmm.patch"
        ),
    ),
    (
        "0002",
        include_str!("../../images/kernel/patches/0002-rust-mm-add-mmu_notifier-abstractions.patch"),
    ),
    (
        "0003",
        include_str!("../../images/kernel/patches/0003-rust-add-hmm-abstractions.patch"),
    ),
    (
        "0004",
        include_str!(
            "../../images/kernel/patches/0004-rust-small-abstractions-for-mirroring-drivers.patch"
        ),
    ),
    (
        "0005",
        include_str!(
            "../../images/kernel/patches/0005-rust-workqueue-give-try_spawn-one-lock-class-name.patch"
        ),
    ),
];

/// Where KUnit keeps the results of the `kernel` crate's doctest suite.
const RESULTS: &str = "/sys/kernel/debug/kunit/rust_doctests_kernel/results";

/// The doctests the patch series adds, per file (files without any are left out).
fn expected() -> Vec<FileDoctests> {
    let mut files = Vec::new();
    for (_, patch) in PATCHES {
        added_doctests(patch, &mut files);
    }
    files.retain(|f| f.added > 0);
    files
}

/// One KTAP result line of the suite: (passed, test name).
fn result_line(line: &str) -> Option<(bool, &str)> {
    let line = line.trim_start();
    let (ok, rest) = match line.strip_prefix("not ok ") {
        Some(rest) => (false, rest),
        None => (true, line.strip_prefix("ok ")?),
    };
    let name = rest.split_whitespace().nth(1)?;
    name.starts_with("rust_doctest_kernel_")
        .then_some((ok && !rest.contains("# SKIP"), name))
}

/// Every doctest of the patched files ran at boot and passed, and the new files ran exactly the
/// doctests the patches contain (at least that many for files they only extend).
pub fn kernel_abstraction_doctests_pass() -> Result<(), String> {
    let expected = expected();
    if expected.is_empty() {
        return Err("the patch series adds no runnable doctest (is the parser broken?)".into());
    }
    let results = std::fs::read_to_string(RESULTS).map_err(|e| {
        format!("{RESULTS}: {e} (is CONFIG_KUNIT_DEBUGFS on and kunit.filter_glob set?)")
    })?;
    let mut bad = Vec::new();
    for f in &expected {
        let prefix = format!("rust_doctest_kernel_{}_", f.stem);
        let ran: Vec<(bool, &str)> = results
            .lines()
            .filter_map(result_line)
            .filter(|(_, name)| {
                name.strip_prefix(&prefix)
                    .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
            })
            .collect();
        for (ok, name) in &ran {
            subtest(Sub {
                name: (*name).to_string(),
                result: if *ok {
                    Ok(())
                } else {
                    Err(format!("{name} failed (see the KUnit log in {RESULTS})"))
                },
                ms: 0,
            });
        }
        let passed = ran.iter().filter(|(ok, _)| *ok).count();
        let count_ok = if f.new_file {
            ran.len() == f.added
        } else {
            ran.len() >= f.added
        };
        if !count_ok || passed != ran.len() {
            bad.push(format!(
                "{}: {} ran, {passed} passed, the patches add {}{}",
                f.stem,
                ran.len(),
                f.added,
                if f.new_file { "" } else { " (or more run)" }
            ));
        }
    }
    println!(
        "# doctests of the abstraction patches: {}",
        expected
            .iter()
            .map(|f| format!("{} {}", f.stem, f.added))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_doctests_each_patch_adds() {
        let got = expected();
        let find = |s: &str| got.iter().find(|f| f.stem == s);
        assert_eq!(
            find("hmm_rs").map(|f| (f.added, f.new_file)),
            Some((1, true))
        );
        assert_eq!(
            find("mm_mmu_notifier_rs").map(|f| (f.added, f.new_file)),
            Some((3, true))
        );
        assert_eq!(
            find("mm_rs").map(|f| (f.added, f.new_file)),
            Some((1, false))
        );
        assert_eq!(
            find("workqueue_rs").map(|f| (f.added, f.new_file)),
            Some((1, false))
        );
    }

    #[test]
    fn reads_ktap_result_lines() {
        assert_eq!(
            result_line("    ok 3 rust_doctest_kernel_hmm_rs_0"),
            Some((true, "rust_doctest_kernel_hmm_rs_0"))
        );
        assert_eq!(
            result_line("    not ok 1 rust_doctest_kernel_mm_rs_0"),
            Some((false, "rust_doctest_kernel_mm_rs_0"))
        );
        assert_eq!(
            result_line("ok 1 rust_doctest_kernel_x_rs_0 # SKIP no mm"),
            Some((false, "rust_doctest_kernel_x_rs_0"))
        );
        assert_eq!(result_line("ok 1 rust_doctests_kernel"), None);
    }
}
