//! The driver's layering rule (#26): `kmod/` calls C only through the kernel's Rust API and the
//! abstraction patches (`images/kernel/patches/`), so no `bindings::` of its own, and those
//! patches carry no driver-specific C helper. `cargo xtask cycles` (in `just check`) runs it.

use std::path::Path;

/// The `.rs` files of `dir` and its subdirectories.
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<(), String> {
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let p = e.map_err(|e| e.to_string())?.path();
        if p.is_dir() {
            rust_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// The `kmod/**/*.rs` lines that name `bindings` (outside comments), as `file:line: text`.
fn bindings_uses(root: &Path) -> Result<Vec<String>, String> {
    let dir = root.join("kmod");
    let mut found = Vec::new();
    let mut files = Vec::new();
    rust_files(&dir, &mut files)?;
    files.sort();
    for path in files {
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains("bindings::") || code.trim() == "bindings," {
                let name = path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                found.push(format!("{name}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    Ok(found)
}

/// C helpers the patches add that name the driver (`rust_helper_zapguard_*` and the like).
fn driver_specific_helpers(root: &Path) -> Result<Vec<String>, String> {
    let dir = root.join("images/kernel/patches");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut in_helper = false;
        for line in text.lines() {
            if let Some(file) = line.strip_prefix("+++ b/") {
                in_helper = file.starts_with("rust/helpers/");
            } else if in_helper && line.starts_with('+') && line.contains("zapguard") {
                found.push(format!("{}: {line}", path.display()));
            }
        }
    }
    Ok(found)
}

/// Prints what breaks the rule; `Ok(true)` when nothing does.
pub fn check(root: &Path) -> Result<bool, String> {
    let uses = bindings_uses(root)?;
    let helpers = driver_specific_helpers(root)?;
    for u in &uses {
        println!("kmod: bindings:: outside the abstraction patches: {u}");
    }
    for h in &helpers {
        println!("kernel patches: a driver-specific C helper: {h}");
    }
    if uses.is_empty() && helpers.is_empty() {
        println!("kmod: no bindings:: of its own, no driver-specific C helper in the patches");
    }
    Ok(uses.is_empty() && helpers.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_driver_uses_only_the_abstractions() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        assert_eq!(bindings_uses(&root).unwrap(), Vec::<String>::new());
        assert_eq!(
            driver_specific_helpers(&root).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn sees_a_bindings_use_and_a_driver_helper() {
        let dir = std::env::temp_dir().join(format!("zg-layering-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kmod")).unwrap();
        std::fs::create_dir_all(dir.join("images/kernel/patches")).unwrap();
        std::fs::write(
            dir.join("kmod/a.rs"),
            "// bindings:: in a comment\nunsafe { bindings::foo() };\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("images/kernel/patches/0001-x.patch"),
            "+++ b/rust/kernel/x.rs\n+// zapguard\n+++ b/rust/helpers/x.c\n+void rust_helper_zapguard_x(void);\n",
        )
        .unwrap();
        assert_eq!(bindings_uses(&dir).unwrap().len(), 1);
        assert_eq!(driver_specific_helpers(&dir).unwrap().len(), 1);
        assert!(!check(&dir).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
