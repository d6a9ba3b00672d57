//! `just image`: the guest image as one archive to hand over, reproducibly.
//!
//! `target/zapguard/zapguard-image-<version>.tar.gz` holds the kernel, the initramfs (driver,
//! test_hmm, guest tests, hmm-tests, the C examples), a static `zapguard-dev`, `zapguard.h`, a
//! `run.sh` and a README. It boots on any x86-64 Linux box with QEMU >= 10.1 (with
//! `vfio-user-pci`) and nothing built. The archive is reproducible: entries sorted, owners 0,
//! every mtime `SOURCE_DATE_EPOCH` (default: the last commit's time), gzip without a name or
//! time; the kernel's build identity is fixed (`images/kernel/build.sh`) and the initramfs's
//! entries have fixed times (`images/initramfs/build.sh`).

use crate::vm;
use std::path::{Path, PathBuf};
use std::process::Command;

type Result<T> = std::result::Result<T, String>;

/// What goes into the image besides the run script and README.
pub struct Parts<'a> {
    pub bzimage: &'a Path,
    pub initramfs: &'a Path,
    /// A static `zapguard-dev`.
    pub device: &'a Path,
    pub header: &'a Path,
}

/// The archive's version: the commit, `-dirty` when the tree has changes.
fn version(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{rev}-dirty")
    } else {
        rev
    }
}

fn source_date_epoch(root: &Path) -> String {
    std::env::var("SOURCE_DATE_EPOCH").ok().unwrap_or_else(|| {
        Command::new("git")
            .current_dir(root)
            .args(["log", "-1", "--format=%ct"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "0".into())
    })
}

/// Double-quotes `s` for `sh`, leaving `$NAME` expansions of the run script's own variables.
fn sh_arg(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        if matches!(c, '"' | '\\' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `run.sh`: starts the device, boots QEMU with the same arguments `just run` uses, and prints
/// the verdict.
fn run_script() -> String {
    let args = vm::machine_args(
        "$DIR/bzImage",
        "$DIR/initramfs.cpio",
        &["zg.run=$RUN".to_string(), "$FILTER".to_string()],
        "$WORK/dev.sock",
    );
    let qemu_args: Vec<String> = args.iter().map(|a| sh_arg(a)).collect();
    format!(
        r#"#!/bin/sh
# Boots the zapguard guest with the zapguard device (see README).
# usage: ./run.sh [tests [FILTER] | shell | bench]
# env:   QEMU=qemu-system-x86_64 (>= 10.1, with vfio-user-pci)   ZAPGUARD_ACCEL=tcg|kvm
set -eu
DIR=$(cd "$(dirname "$0")" && pwd)
RUN=${{1:-tests}}
FILTER=${{2:+zg.filter=$2}}
QEMU=${{QEMU:-qemu-system-x86_64}}
if ! "$QEMU" -device help 2>/dev/null | grep -q '"vfio-user-pci"'; then
    echo "run.sh: $QEMU has no vfio-user-pci device: QEMU >= 10.1 is needed (set QEMU=...)" >&2
    exit 2
fi
case "${{ZAPGUARD_ACCEL:-tcg}}" in
    kvm) set -- -accel kvm -cpu host ;;
    *) set -- -accel tcg,thread=multi -cpu max ;;
esac
WORK=$(mktemp -d "${{TMPDIR:-/tmp}}/zapguard-run.XXXXXX")
"$DIR/zapguard-dev" --socket "$WORK/dev.sock" --trace "$WORK/trace.zgt" > "$WORK/device.log" 2>&1 &
DEV=$!
trap 'kill $DEV 2>/dev/null || true; wait $DEV 2>/dev/null || true; echo "run.sh: serial log, device log and device trace in $WORK"' EXIT
i=0
while [ ! -S "$WORK/dev.sock" ]; do
    i=$((i + 1))
    if [ "$i" -gt 100 ]; then echo "run.sh: zapguard-dev did not start; see $WORK/device.log" >&2; exit 1; fi
    sleep 0.1
done
"$QEMU" "$@" \
    {} \
    | tee "$WORK/serial.log"
if [ "$RUN" = shell ]; then exit 0; fi
passed=$(grep -Ec '^ *ok [0-9]+ [^#]*$|^ *ok [0-9]+ .*# time=' "$WORK/serial.log" || true)
failed=$(grep -Ec '^ *not ok [0-9]+ ' "$WORK/serial.log" || true)
echo "$passed passed, $failed failed"
grep -q 'ZAPGUARD-DONE rc=0' "$WORK/serial.log" && [ "$failed" -eq 0 ]
"#,
        qemu_args.join(" \\\n    ")
    )
}

fn readme(version: &str) -> String {
    format!(
        "zapguard guest image {version}\n\
         \n\
         A Linux 7.3 guest whose Rust driver (zapguard.ko) mirrors process address spaces into an\n\
         emulated IOMMU-style PCI device, and the device itself (zapguard-dev, a vfio-user server\n\
         that QEMU attaches), which checks that it never touches a page after the kernel zapped it.\n\
         \n\
         Needs: an x86-64 Linux machine with QEMU >= 10.1 (vfio-user-pci). Nothing to build.\n\
         \n\
         ./run.sh                  the guest test suite (about 5 minutes under TCG); the last line\n\
                                   is \"N passed, N failed\", the exit status 0 when all passed\n\
         ./run.sh tests NAME       only the tests whose name contains NAME\n\
         ./run.sh shell            a shell in the guest, driver loaded ('poweroff -f' to leave)\n\
         QEMU=/path/to/qemu-system-x86_64 ./run.sh    another QEMU; ZAPGUARD_ACCEL=kvm to use KVM\n\
         \n\
         Files: bzImage (kernel), initramfs.cpio (driver, test_hmm, the guest tests, the kernel's\n\
         hmm-tests, the C example zg-example), zapguard-dev (static), zapguard.h (the uAPI for C),\n\
         SHA256SUMS. The device writes a binary trace (trace.zgt); read it with zapguard-trace from\n\
         the zapguard repository.\n"
    )
}

/// Builds the archive; returns its path and sha256.
pub fn build(root: &Path, parts: &Parts) -> Result<(PathBuf, String)> {
    let version = version(root);
    let name = format!("zapguard-image-{version}");
    let out_dir = root.join("target/zapguard");
    let stage = out_dir.join("image-stage");
    let _ = std::fs::remove_dir_all(&stage);
    let dir = stage.join(&name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let copy = |from: &Path, to: &str| {
        std::fs::copy(from, dir.join(to))
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", from.display()))
    };
    copy(parts.bzimage, "bzImage")?;
    copy(parts.initramfs, "initramfs.cpio")?;
    copy(parts.device, "zapguard-dev")?;
    copy(parts.header, "zapguard.h")?;
    let write = |to: &str, text: String| {
        std::fs::write(dir.join(to), text).map_err(|e| format!("{to}: {e}"))
    };
    write("run.sh", run_script())?;
    write("README", readme(&version))?;
    let sums = Command::new("sh")
        .current_dir(&dir)
        .arg("-c")
        .arg("sha256sum bzImage initramfs.cpio zapguard-dev zapguard.h run.sh README")
        .output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    write(
        "SHA256SUMS",
        String::from_utf8_lossy(&sums.stdout).into_owned(),
    )?;
    let archive = out_dir.join(format!("{name}.tar.gz"));
    let epoch = source_date_epoch(root);
    let status = Command::new("sh")
        .current_dir(&stage)
        .arg("-c")
        .arg(format!(
            "chmod 0755 '{name}' '{name}/run.sh' '{name}/zapguard-dev' && \
             chmod 0644 '{name}'/bzImage '{name}'/initramfs.cpio '{name}'/zapguard.h \
             '{name}'/README '{name}'/SHA256SUMS && \
             tar --sort=name --mtime=@{epoch} --owner=0 --group=0 --numeric-owner \
             --format=gnu -cf - '{name}' | gzip -9n > '{}'",
            archive.display()
        ))
        .status()
        .map_err(|e| format!("tar: {e}"))?;
    if !status.success() {
        return Err(format!("building {} failed", archive.display()));
    }
    let _ = std::fs::remove_dir_all(&stage);
    Ok((archive.clone(), sha256(&archive)?))
}

pub fn sha256(p: &Path) -> Result<String> {
    let o = Command::new("sha256sum")
        .arg(p)
        .output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    Ok(String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Seconds the handed-over image's boot check may take (its one guest test takes about 20 s
/// under TCG).
const IMAGE_BOOT_TIMEOUT_S: u64 = 300;

/// Unpacks `archive` into a fresh directory and boots it through its own `run.sh` with `qemu`,
/// running the guest tests whose name contains `filter`; returns the script's output and
/// whether it succeeded.
pub fn boot_check(
    root: &Path,
    archive: &Path,
    qemu: &Path,
    filter: &str,
) -> Result<(bool, String)> {
    let dir = root.join("target/zapguard/image-check");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ok = Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(&dir)
        .status()
        .map_err(|e| format!("tar: {e}"))?
        .success();
    if !ok {
        return Err(format!("cannot unpack {}", archive.display()));
    }
    let top = std::fs::read_dir(&dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .ok_or("the archive has no directory")?;
    // Like every boot, this one has a deadline: `timeout` signals run.sh's whole process group
    // (QEMU and the device too) after it, and the run fails with status 124.
    let out = Command::new("timeout")
        .args(["--kill-after=10", &IMAGE_BOOT_TIMEOUT_S.to_string()])
        .arg(top.join("run.sh"))
        .args(["tests", filter])
        .env("QEMU", qemu)
        .env(
            "ZAPGUARD_ACCEL",
            format!("{:?}", vm::Accel::detect().0).to_lowercase(),
        )
        .output()
        .map_err(|e| format!("run.sh: {e}"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_script_keeps_its_variables_and_quotes_the_device_json() {
        let s = run_script();
        assert!(s.contains("\"-kernel\" \\\n    \"$DIR/bzImage\""), "{s}");
        assert!(s.contains(r#"\"driver\":\"vfio-user-pci\""#), "{s}");
        assert!(s.contains("zg.run=$RUN $FILTER"), "{s}");
    }
}
