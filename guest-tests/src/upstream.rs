//! The kernel's own HMM selftest, `tools/testing/selftests/mm/hmm-tests.c`, built unmodified from
//! the pinned kernel source (`images/hmm-tests/build.sh`) into `/bin/hmm-tests`, run twice in one
//! boot: against test_hmm (the control), then against zapguard's test_hmm-compatible nodes.
//!
//! The binary hard-codes `/dev/hmm_dmirror0` and `1`. For the zapguard run, test_hmm is unloaded
//! and those paths become links to `/dev/zapguard_hmm0` and `1`; afterwards the links go and
//! test_hmm is loaded again, for the tests that compare with it.
//!
//! Each upstream test runs as its own process (`-t NAME`), so that it has a wall time of its own;
//! each result is reported as a nested KTAP result named `DRIVER.NAME`, with the harness's skip
//! reason, and counts in the summary. The side-by-side table of times is printed as diagnostics.

use crate::ktap::{self, Sub};
use crate::run_cmd;
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

const BIN: &str = "/bin/hmm-tests";

/// The mirror-only tests: those that need no device memory (migration, exclusive access and
/// device-private pages need memory on the device, which an IOMMU-style device does not have).
pub const MIRROR_TESTS: [&str; 15] = [
    "open_close",
    "anon_read",
    "anon_read_prot",
    "anon_write",
    "anon_write_prot",
    "anon_write_child_shared",
    "anon_write_huge",
    "anon_write_hugetlbfs",
    "file_read",
    "file_write",
    "anon_read_multiple",
    "anon_teardown",
    "mixedmap",
    "compound",
    "userfaultfd_read",
];

/// Each driver's (test, ms, outcome) from this boot, for the side-by-side table.
static TIMES: Mutex<Vec<(&'static str, &'static str, u128, &'static str)>> = Mutex::new(Vec::new());

/// What one upstream run printed: its TAP result line for `name`, or why there is none.
fn verdict(name: &str, stdout: &str, ok_exit: bool) -> Result<(), String> {
    let line = stdout
        .lines()
        .find(|l| {
            (l.starts_with("ok ") || l.starts_with("not ok "))
                && l.split('#')
                    .next()
                    .is_some_and(|h| h.trim_end().ends_with(&format!(".{name}")))
        })
        .ok_or_else(|| format!("no result line for {name} in:\n{stdout}"))?;
    if let Some(reason) = line.split_once("# SKIP").map(|(_, r)| r.trim()) {
        return Err(ktap::skip(if reason.is_empty() {
            "skipped without a reason"
        } else {
            reason
        }));
    }
    if line.starts_with("not ok") || !ok_exit {
        // The harness's own diagnostics say what failed.
        let diag: Vec<&str> = stdout.lines().filter(|l| l.starts_with('#')).collect();
        return Err(format!("{line}\n{}", diag.join("\n")));
    }
    Ok(())
}

/// Runs the mirror-only tests against whatever `/dev/hmm_dmirror0` is now; each is one nested
/// result `DRIVER.NAME`.
fn run_all(driver: &'static str) -> Result<(), String> {
    for name in MIRROR_TESTS {
        let t = Instant::now();
        let out = Command::new(BIN)
            .args(["-V", "hmm_device_coherent", "-t", name])
            .output()
            .map_err(|e| format!("{BIN}: {e}"))?;
        let ms = t.elapsed().as_millis();
        // The harness prints results on stdout and failed assertions on stderr.
        let stdout = String::from_utf8_lossy(&out.stdout);
        let result = verdict(name, &stdout, out.status.success()).map_err(|e| {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if e.starts_with(ktap::skip("").trim_end()) || stderr.trim().is_empty() {
                e
            } else {
                format!("{e}\n{}", stderr.trim_end())
            }
        });
        let word = match &result {
            Ok(()) => "ok",
            Err(e) if e.starts_with("SKIP") => "skip",
            Err(_) => "FAIL",
        };
        TIMES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((driver, name, ms, word));
        ktap::subtest(Sub {
            name: format!("{driver}.{name}"),
            result,
            ms,
        });
    }
    Ok(())
}

/// The control: the upstream tests against test_hmm.
pub fn upstream_hmm_tests_test_hmm() -> Result<(), String> {
    std::fs::metadata("/dev/hmm_dmirror0").map_err(|e| format!("test_hmm not loaded: {e}"))?;
    run_all("test_hmm")
}

/// The same binary against zapguard, through links in place of test_hmm's nodes.
pub fn upstream_hmm_tests_zapguard() -> Result<(), String> {
    run_cmd("rmmod", &["test_hmm"])?;
    let linked = (|| {
        for unit in 0..2 {
            let link = format!("/dev/hmm_dmirror{unit}");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(format!("/dev/zapguard_hmm{unit}"), &link)
                .map_err(|e| format!("{link}: {e}"))?;
        }
        run_all("zapguard")
    })();
    for unit in 0..2 {
        let _ = std::fs::remove_file(format!("/dev/hmm_dmirror{unit}"));
    }
    let reloaded = run_cmd("insmod", &[&format!("{}/test_hmm.ko", crate::MODULE_DIR)]);
    print_side_by_side();
    linked.and(reloaded)
}

/// zapguard's test_hmm-compatible node on its own: data read back through the device with one
/// fault pass (none the second time), test_hmm's SNAPSHOT encoding, and the documented errors.
pub fn hmm_compat_node_reads_snapshots_and_refuses() -> Result<(), String> {
    use crate::dev::{self, Mapping};
    use crate::dmirror::run as cmd;
    use shared_regs::hmm::*;
    const PG: usize = 4096;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/zapguard_hmm0")
        .map_err(|e| format!("/dev/zapguard_hmm0: {e}"))?;
    let mut a = Mapping::anon(8 * PG).map_err(|e| e.to_string())?;
    for (i, b) in a.bytes_mut().iter_mut().enumerate() {
        *b = (i / 7) as u8;
    }
    let mut out = vec![0u8; 8 * PG];
    for want_faults in [1, 0] {
        let c = cmd(&f, HMM_DMIRROR_READ, a.addr, out.as_mut_ptr(), 8)
            .map_err(|e| format!("READ: {e}"))?;
        ktap::check_eq((c.cpages, c.faults), (8, want_faults), "(cpages, faults)")?;
        if out != a.bytes() {
            return Err("READ through the device returned other bytes".into());
        }
    }
    // SNAPSHOT: written, zero page (read-faulted, never written), untouched, PROT_NONE.
    let z = Mapping::new(
        4 * PG,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    )
    .map_err(|e| e.to_string())?;
    // SAFETY: reads our own mapping: the kernel maps the zero page there.
    let _ = unsafe { std::ptr::read_volatile((z.addr + PG) as *const u8) };
    // SAFETY: writes our own mapping.
    unsafe { std::ptr::write_volatile(z.addr as *mut u8, 1) };
    // SAFETY: changes protection of the last page of our own mapping.
    if unsafe { libc::mprotect((z.addr + 3 * PG) as *mut _, PG, libc::PROT_NONE) } != 0 {
        return Err("mprotect".into());
    }
    let mut snap = [0u8; 4];
    cmd(&f, HMM_DMIRROR_SNAPSHOT, z.addr, snap.as_mut_ptr(), 4)
        .map_err(|e| format!("SNAPSHOT: {e}"))?;
    let want = [
        HMM_DMIRROR_PROT_WRITE,
        HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ,
        HMM_DMIRROR_PROT_NONE,
        HMM_DMIRROR_PROT_ERROR,
    ];
    ktap::check_eq(snap, want, "SNAPSHOT bytes")?;
    // Errors.
    let errno = |op: u32, addr: usize, ptr: *mut u8, npages: usize| {
        cmd(&f, op, addr, ptr, npages).err().map(|e| dev::errno(&e))
    };
    let p = out.as_mut_ptr();
    for (what, got, want) in [
        (
            "unaligned addr",
            errno(HMM_DMIRROR_READ, a.addr + 8, p, 1),
            libc::EINVAL,
        ),
        (
            "zero pages",
            errno(HMM_DMIRROR_READ, a.addr, p, 0),
            libc::EINVAL,
        ),
        (
            "over 64 MiB",
            errno(HMM_DMIRROR_READ, a.addr, p, (64 << 20) / PG + 1),
            libc::EINVAL,
        ),
        (
            "migration",
            errno(HMM_DMIRROR_MIGRATE_TO_DEV, a.addr, p, 1),
            libc::EINVAL,
        ),
        (
            "bad ptr",
            errno(HMM_DMIRROR_READ, a.addr, 8 as *mut u8, 1),
            libc::EFAULT,
        ),
        (
            "PROT_NONE",
            errno(HMM_DMIRROR_READ, z.addr + 3 * PG, p, 1),
            libc::EFAULT,
        ),
        (
            "non-canonical",
            errno(HMM_DMIRROR_READ, 1 << 62, p, 1),
            libc::EFAULT,
        ),
    ] {
        ktap::check_eq(got, Some(want), what)?;
    }
    z.protect(libc::PROT_READ).map_err(|e| e.to_string())?;
    ktap::check_eq(
        errno(HMM_DMIRROR_WRITE, z.addr, p, 1),
        Some(libc::EPERM),
        "WRITE of read-only memory",
    )?;
    Ok(())
}

/// Per-test wall times of both drivers from this boot (context, never asserted).
fn print_side_by_side() {
    let times = TIMES.lock().unwrap_or_else(|p| p.into_inner());
    let of = |driver: &str, name: &str| {
        times
            .iter()
            .find(|t| t.0 == driver && t.1 == name)
            .map_or("-".to_string(), |t| format!("{} ms {}", t.2, t.3))
    };
    println!(
        "# hmm-tests, same boot: {:<24} {:>16} {:>16}",
        "test", "test_hmm", "zapguard"
    );
    for name in MIRROR_TESTS {
        println!(
            "# hmm-tests, same boot: {name:<24} {:>16} {:>16}",
            of("test_hmm", name),
            of("zapguard", name)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "TAP version 13\n1..1\n# Starting 1 tests from 1 test cases.\n\
        #  RUN           hmm.hmm_device_private.anon_read ...\n\
        #            OK  hmm.hmm_device_private.anon_read\n\
        ok 1 hmm.hmm_device_private.anon_read\n# PASSED: 1 / 1 tests passed.\n";

    #[test]
    fn a_pass_skip_and_failure_are_read_from_the_tap() {
        assert_eq!(verdict("anon_read", OUT, true), Ok(()));
        let skip = "ok 1 hmm.hmm_device_private.compound # SKIP Not enough huge pages\n";
        assert_eq!(
            verdict("compound", skip, true),
            Err(ktap::skip("Not enough huge pages"))
        );
        let fail = "# anon_read: Expected 1 (1) == buffer->faults (2)\n\
            not ok 1 hmm.hmm_device_private.anon_read\n";
        let e = verdict("anon_read", fail, false).unwrap_err();
        assert!(e.contains("buffer->faults"), "{e}");
        assert!(verdict("anon_write", OUT, true).is_err(), "no line for it");
        // A test name that is a suffix of another's must not match it.
        assert!(verdict("read", OUT, true).is_err());
    }
}
