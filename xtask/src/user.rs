//! Users' own programs in the guest: the C header and examples, and `--exec`/`--add`.
//!
//! `zapguard.h` (generated in `shared-regs/include/`, checked by `cargo test`) is installed in
//! `target/zapguard/include/`; each `examples/*.c` is built from it as a static binary in
//! `target/zapguard/examples/` and goes into the guest image's `/bin`. `--exec PATH [ARGS...]`
//! and `--add FILE` put a user's static binaries and files into `/user` of an extra initramfs
//! archive that the kernel unpacks over the image (cpio archives concatenate), with a `/user/run`
//! script that init runs after loading the driver (`zg.run=user`).

use std::path::{Path, PathBuf};
use std::process::Command;

type Result<T> = std::result::Result<T, String>;

/// A user's program to run in the guest, with its arguments.
#[derive(Clone, Debug, Default)]
pub struct Exec {
    pub path: PathBuf,
    pub args: Vec<String>,
}

/// Installs the header and builds every `examples/*.c` against it (static, `-Werror`); returns
/// the binaries.
pub fn build_examples(root: &Path) -> Result<Vec<PathBuf>> {
    let include = root.join("target/zapguard/include");
    let out_dir = root.join("target/zapguard/examples");
    for d in [&include, &out_dir] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let header = root.join("shared-regs/include/zapguard.h");
    std::fs::copy(&header, include.join("zapguard.h"))
        .map_err(|e| format!("{}: {e}", header.display()))?;
    let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join("examples"))
        .map_err(|e| format!("examples/: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .collect();
    sources.sort();
    // Each example against today's header, and against every frozen one (a program built
    // when that uAPI version shipped): `zg-example`, `zg-example.uapi-1.0`, ...
    let mut headers = vec![(include.clone(), String::new())];
    let frozen = root.join("shared-regs/include/frozen");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(&frozen)
        .map_err(|e| format!("{}: {e}", frozen.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("zapguard.h").is_file())
        .collect();
    versions.sort();
    for v in versions {
        let name = v.file_name().unwrap_or_default().to_string_lossy();
        headers.push((v.clone(), format!(".{name}")));
    }
    let mut bins = Vec::new();
    for src in sources {
        for (dir, suffix) in &headers {
            let stem = src.file_stem().unwrap_or_default().to_string_lossy();
            let bin = out_dir.join(format!("{stem}{suffix}"));
            let out = Command::new("gcc")
                .args([
                    "-static",
                    "-O2",
                    "-std=gnu11",
                    "-Wall",
                    "-Wextra",
                    "-Werror",
                    "-I",
                ])
                .arg(dir)
                .arg(&src)
                .arg("-o")
                .arg(&bin)
                .output()
                .map_err(|e| format!("gcc: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "building {} against {}:\n{}",
                    src.display(),
                    dir.display(),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            bins.push(bin);
        }
    }
    Ok(bins)
}

/// Whether `bytes` are a dynamically linked ELF (it has a `PT_INTERP` program header): such a
/// program cannot run in the guest, which has no C library or loader.
pub fn is_dynamic_elf(bytes: &[u8]) -> bool {
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    // 64-bit little-endian ELF only (the guest is x86-64).
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        u32_at(at) == Some(3) // PT_INTERP
    })
}

/// Single-quotes `s` for the guest's shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The `/user/run` script for `exec`.
fn run_script(exec: Option<&Exec>) -> String {
    let mut s =
        String::from("#!/bin/sh\n# Written by cargo xtask: what --exec asked for.\ncd /user\n");
    match exec {
        Some(e) => {
            let name = e
                .path
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            s.push_str(&format!("exec ./{}", shell_quote(&name)));
            for a in &e.args {
                s.push(' ');
                s.push_str(&shell_quote(a));
            }
            s.push('\n');
        }
        None => s.push_str("echo 'no --exec given: the files are in /user'\n"),
    }
    s
}

/// Writes `run_dir/initramfs.cpio`: `base` followed by an archive of `/user` holding `exec`'s
/// program, the `add` files and the `/user/run` script. Refuses dynamically linked programs.
pub fn user_initramfs(
    base: &Path,
    run_dir: &Path,
    exec: Option<&Exec>,
    add: &[PathBuf],
) -> Result<PathBuf> {
    let stage = run_dir.join("user-stage");
    let user = stage.join("user");
    std::fs::create_dir_all(&user).map_err(|e| format!("{}: {e}", user.display()))?;
    let files = exec
        .map(|e| e.path.clone())
        .into_iter()
        .chain(add.iter().cloned());
    for f in files {
        let bytes = std::fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        if is_dynamic_elf(&bytes) {
            return Err(format!(
                "{} is dynamically linked; the guest has no C library: build it with -static \
                 (C) or for x86_64-unknown-linux-musl (Rust)",
                f.display()
            ));
        }
        let name = f
            .file_name()
            .ok_or_else(|| format!("{}: no file name", f.display()))?;
        let to = user.join(name);
        std::fs::write(&to, &bytes).map_err(|e| format!("{}: {e}", to.display()))?;
        set_mode(&to, 0o755)?;
    }
    let run = user.join("run");
    std::fs::write(&run, run_script(exec)).map_err(|e| format!("{}: {e}", run.display()))?;
    set_mode(&run, 0o755)?;
    // The name init reports the run under (`exec_NAME`).
    let name: String = exec
        .and_then(|e| e.path.file_name())
        .map(|n| {
            n.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
        })
        .unwrap_or_else(|| "user".into());
    std::fs::write(user.join("run.name"), name).map_err(|e| format!("run.name: {e}"))?;
    let archive = run_dir.join("user.cpio");
    let out = Command::new("sh")
        .current_dir(&stage)
        .arg("-c")
        .arg("find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0")
        .output()
        .map_err(|e| format!("cpio: {e}"))?;
    if !out.status.success() {
        return Err(format!("cpio: {}", String::from_utf8_lossy(&out.stderr)));
    }
    std::fs::write(&archive, &out.stdout).map_err(|e| format!("{}: {e}", archive.display()))?;
    let mut joined = std::fs::read(base).map_err(|e| format!("{}: {e}", base.display()))?;
    joined.extend_from_slice(&out.stdout);
    let path = run_dir.join("initramfs.cpio");
    std::fs::write(&path, joined).map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = std::fs::remove_dir_all(&stage);
    Ok(path)
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_elf_is_told_from_static() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // The test binary itself is a dynamically linked glibc program.
        assert!(is_dynamic_elf(&me));
        assert!(!is_dynamic_elf(b"#!/bin/sh\necho hi\n"));
        assert!(!is_dynamic_elf(b"\x7fELF\x02\x01"));
    }

    #[test]
    fn run_script_quotes_arguments() {
        let e = Exec {
            path: "/x/zg-example".into(),
            args: vec!["64".into(), "it's".into()],
        };
        let s = run_script(Some(&e));
        assert!(s.ends_with("exec ./'zg-example' '64' 'it'\\''s'\n"), "{s}");
    }
}
