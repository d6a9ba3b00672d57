//! Counting the runnable doctests a patch adds, per `kernel` crate file. Dependency-free: the
//! guest test `kernel_abstraction_doctests_pass` uses it, and so does the host test that checks
//! `docs/kernel-abstractions.md` (`xtask/src/doc_numbers.rs`, through `#[path]`).

/// One file's doctests: what the patches add, and what ran.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FileDoctests {
    /// KUnit's name stem for the file (`mm_mmu_notifier_rs` for `rust/kernel/mm/mmu_notifier.rs`).
    pub stem: String,
    /// Doctests the patches add to it.
    pub added: usize,
    /// Whether the patches create the file (then every doctest in it is theirs).
    pub new_file: bool,
}

/// The KUnit name stem of a `kernel` crate source file, as `scripts/rustdoc_test_gen.rs` makes
/// it: the path below `rust/kernel/`, `/` and `.` turned into `_`.
fn stem(path: &str) -> Option<String> {
    let rel = path.strip_prefix("rust/kernel/")?;
    Some(rel.replace(['/', '.'], "_"))
}

/// Counts, per file, the runnable doctests a unified diff adds: fences opened on added lines of
/// `///` or `//!` comments, skipping `ignore`, `no_run` and `compile_fail` blocks.
pub fn added_doctests(patch: &str, files: &mut Vec<FileDoctests>) {
    let mut current: Option<usize> = None;
    let mut open = false;
    for line in patch.lines() {
        if let Some(path) = line.strip_prefix("+++ b/") {
            let path = path.split_whitespace().next().unwrap_or("");
            current = stem(path).map(|s| match files.iter().position(|f| f.stem == s) {
                Some(i) => i,
                None => {
                    files.push(FileDoctests {
                        stem: s,
                        ..Default::default()
                    });
                    files.len() - 1
                }
            });
            open = false;
            continue;
        }
        // A file the patch creates has a single hunk from nothing.
        if line.starts_with("@@ -0,0 ") {
            if let Some(i) = current {
                files[i].new_file = true;
            }
            continue;
        }
        let (Some(i), Some(added)) = (current, line.strip_prefix('+')) else {
            continue;
        };
        let text = added.trim_start();
        let Some(fence) = text
            .strip_prefix("///")
            .or_else(|| text.strip_prefix("//!"))
            .map(str::trim)
            .and_then(|c| c.strip_prefix("```"))
        else {
            continue;
        };
        if open {
            open = false;
        } else {
            open = true;
            let runs = !["ignore", "no_run", "compile_fail", "text"]
                .iter()
                .any(|attr| fence.contains(attr));
            if runs {
                files[i].added += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_and_closing_fences_do_not_count() {
        let patch = "--- a/rust/kernel/x.rs\n+++ b/rust/kernel/x.rs\n@@ -0,0 +1,9 @@\n\
                     +/// ```\n+/// a\n+/// ```\n+//! ```ignore\n+//! b\n+//! ```\n\
                     +    /// ```\n+    /// c\n+    /// ```\n";
        let mut files = Vec::new();
        added_doctests(patch, &mut files);
        assert_eq!(
            files,
            vec![FileDoctests {
                stem: "x_rs".into(),
                added: 2,
                new_file: true
            }]
        );
    }
}
