//! The counts the README and `docs/` state about the tree itself (guest tests, results per run,
//! mutants, the abstraction patches' doctests) are checked against the tree, so that they cannot
//! drift from it or contradict each other (#26). Counts that come from a run (passed/failed,
//! timings) are dated measurements and name the commit they were taken at.

use std::path::Path;

#[path = "../../guest-tests/src/patch_doctests.rs"]
mod patch_doctests;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The number right before `suffix` in `text`, where `prefix` precedes it: the `N` in
/// `prefix N suffix`.
fn number_between(text: &str, prefix: &str, suffix: &str) -> usize {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let at = flat
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in the text"));
    let rest = &flat[at + prefix.len()..];
    let rest = rest.trim_start();
    let span: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .collect();
    let digits: String = span.chars().filter(char::is_ascii_digit).collect();
    let after = &rest[span.len()..];
    assert!(
        after.trim_start().starts_with(suffix),
        "{prefix:?} is not followed by a number and {suffix:?}: {:?}",
        &rest[..rest.len().min(60)]
    );
    digits.parse().unwrap()
}

/// Tests in the guest suite's list (`TESTS` in guest-tests/src/main.rs).
fn guest_tests() -> usize {
    let main = read("guest-tests/src/main.rs");
    let list = main
        .split("const TESTS: &[Test] = ktap::tests![")
        .nth(1)
        .and_then(|s| s.split("];").next())
        .expect("the TESTS list");
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty() && !s.starts_with("//"))
        .count()
}

/// Runnable doctests the abstraction patches add (see guest-tests' parser).
fn patch_doctests() -> usize {
    let dir = root().join("images/kernel/patches");
    let mut files = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        patch_doctests::added_doctests(&text, &mut files);
    }
    files.iter().map(|f| f.added).sum()
}

#[test]
fn the_readme_counts_the_guest_suite_right() {
    let readme = read("README.md");
    let tests = number_between(&readme, "The guest suite:", "tests");
    assert_eq!(tests, guest_tests(), "README's guest test count");
    let results = number_between(&readme, &format!("{tests} tests ("), "results");
    let upstream = number_between(&readme, "results with the kernel's", "mirror-only");
    assert_eq!(
        results,
        tests + 2 * upstream,
        "each mirror-only hmm-test runs twice (test_hmm, zapguard)"
    );
}

#[test]
fn the_mutation_docs_count_the_mutants_file() {
    let docs = read("docs/mutation-testing.md");
    let listed: serde_json::Value = serde_json::from_str(&read("kmod/mutants.json")).unwrap();
    let now = number_between(&docs, "**", "mutants** in `kmod/mutants.json` now");
    assert_eq!(now, listed.as_array().unwrap().len());
}

#[test]
fn the_abstraction_docs_count_the_patches_doctests() {
    let docs = read("docs/kernel-abstractions.md");
    let ours = number_between(&docs, "doctests,", "of them the series'");
    assert_eq!(ours, patch_doctests());
}

#[test]
fn reads_numbers_across_line_breaks_and_thousands() {
    assert_eq!(number_between("a: 1,234\n  tests", "a:", "tests"), 1234);
}
