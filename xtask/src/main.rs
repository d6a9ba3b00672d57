//! `cargo xtask`: the orchestration behind `just run` and `just test`.
//!
//! ```text
//! cargo xtask run   [--filter F] [--timeout SECS] [--quiet]   build, boot, run the guest tests, show the trace summary
//! cargo xtask run   [--add FILE]... --exec PROG [ARGS...]     the same, running your static PROG instead of the tests
//! cargo xtask shell [--add FILE]... [--exec PROG [ARGS...]]   build, boot to an interactive guest shell (files in /user)
//! cargo xtask test  [--filter F] [--timeout SECS] [--no-host] host tests + the VM run; last line `N passed, N failed`
//! cargo xtask build                                           build every artifact, print their paths
//! cargo xtask selftests                                       the harness self-tests alone (each breaks a run on purpose)
//! cargo xtask cycles                                         the import graphs of kmod/, zapguard-model/src/, zapguard-dev/src/: no new cycle; kmod/ has no bindings:: of its own
//! cargo xtask production [--filter F]                         the production module alone: no test surface, and its run
//! cargo xtask device-death                                    the device-death boot alone
//! cargo xtask mutants [--filter ID]                          break the driver one mutant at a time (kmod/mutants.json), print what killed each
//! cargo xtask image                                           the guest image as one reproducible archive (target/zapguard/zapguard-image-*.tar.gz)
//! cargo xtask bench [--filter F]                              the guest benchmarks (table + target/zapguard/bench.json;
//!                                                             with F only those whose name contains it, -> bench-partial.json)
//! cargo xtask fuzz-guest [N] [--seed S] [--timeout SECS]      the guest's uAPI fuzzer alone (N calls, default 100000; S replays
//!                                                             a run's call sequences), the run checks and the fuzzer's summary
//! ```
//!
//! Heavy artifacts (QEMU, kernel, initramfs) are built by the scripts under `images/`, which cache
//! them in `$ZAPGUARD_CACHE` (default `~/.cache/zapguard`) keyed by a hash of their inputs. Each VM
//! run keeps its serial log, device log, QEMU log and device trace in `target/zapguard/runs/<id>/`,
//! with `target/zapguard/runs/latest` pointing at the newest.

mod bench;
mod cycles;
#[cfg(test)]
mod doc_numbers;
mod hosttests;
mod image;
mod ktap;
mod layering;
mod mutants;
mod skips;
mod trace;
mod user;
mod vm;

use ktap::Outcome;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type Result<T> = std::result::Result<T, String>;

const MUSL: &str = "x86_64-unknown-linux-musl";

#[derive(Clone)]
struct Options {
    filter: Option<String>,
    /// `--knobs P=V,...`: the driver's knob module parameters for the whole run (`zg.knobs=`).
    knobs: Option<String>,
    /// `--exec PATH [ARGS...]`: a user's program to run in the guest instead of the tests.
    exec: Option<user::Exec>,
    /// `--add FILE`: more files for `/user` (repeatable, before `--exec`).
    add: Vec<PathBuf>,
    timeout: Duration,
    quiet: bool,
    host: bool,
    /// `--flavor F`: the guest kernel flavor to boot (images/kernel/build.sh; default: default).
    flavor: Option<String>,
    positional: Vec<String>,
    /// `--seed S` (decimal or 0x hex): the uAPI fuzzer's master seed (`fuzz-guest`).
    seed: Option<u64>,
    /// More kernel command-line words for init (not a command-line option).
    init_extra: Vec<String>,
}

/// The guest kernel flavors images/kernel/build.sh builds.
const FLAVORS: [&str; 4] = ["default", "debug", "kasan", "kcsan"];

/// The device knobs a whole run can turn on, as the driver's module parameters: the clean
/// suite must stay clean with each (`just test` runs it once per entry; an entry may turn on
/// several knobs, so that a new knob costs no extra run).
const KNOB_RUNS: [&str; 2] = [
    "iotlb_keep=1,sync_lag_us=300,cmd_lag=2",
    "fault_lag_us=200,walk_lag_us=20",
];

/// Calls of the guest's uAPI fuzzer in each knob run (the flavor runs make the default 100k).
const KNOB_RUN_FUZZ_CALLS: u32 = 20_000;

/// The driver's knob module parameters (`--knobs`, `zg.knobs=`).
const KNOB_PARAMS: [&str; 5] = [
    "iotlb_keep",
    "fault_lag_us",
    "sync_lag_us",
    "walk_lag_us",
    "cmd_lag",
];

/// `--knobs`: comma-separated `param=number` of the driver's knob parameters.
fn check_knobs(spec: &str) -> Result<()> {
    for kv in spec.split(',') {
        match kv.split_once('=') {
            Some((p, v)) if KNOB_PARAMS.contains(&p) && v.parse::<u32>().is_ok() => {}
            _ => {
                return Err(format!(
                    "--knobs: `{kv}` is not P=N with P one of {}",
                    KNOB_PARAMS.join(", ")
                ))
            }
        }
    }
    Ok(())
}

fn parse_options(args: &[String]) -> Result<Options> {
    let default_timeout = std::env::var("ZAPGUARD_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut o = Options {
        filter: None,
        knobs: None,
        exec: None,
        add: vec![],
        timeout: Duration::from_secs(default_timeout),
        quiet: false,
        host: true,
        flavor: None,
        positional: vec![],
        seed: None,
        init_extra: vec![],
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--filter" => o.filter = Some(it.next().ok_or("--filter needs a value")?.clone()),
            "--knobs" => {
                let v = it.next().ok_or("--knobs needs P=V[,P=V]")?;
                check_knobs(v)?;
                o.knobs = Some(v.clone());
            }
            "--timeout" => {
                let v = it.next().ok_or("--timeout needs seconds")?;
                o.timeout = Duration::from_secs(
                    v.parse()
                        .map_err(|_| format!("--timeout: not a number: {v}"))?,
                );
            }
            "--add" => o
                .add
                .push(PathBuf::from(it.next().ok_or("--add needs a file")?)),
            "--exec" => {
                // Everything after the program is its arguments.
                let path = PathBuf::from(it.next().ok_or("--exec needs a program")?);
                let args = it.by_ref().cloned().collect();
                o.exec = Some(user::Exec { path, args });
            }
            "--flavor" => {
                let v = it.next().ok_or("--flavor needs a name")?;
                if !FLAVORS.contains(&v.as_str()) {
                    return Err(format!("--flavor: `{v}` is not one of {FLAVORS:?}"));
                }
                // The default flavor is what no option boots.
                o.flavor = Some(v.clone()).filter(|f| f != "default");
            }
            "--seed" => {
                let v = it.next().ok_or("--seed needs a number")?;
                let n = match v.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => v.parse(),
                };
                o.seed = Some(n.map_err(|_| format!("--seed: not a number: {v}"))?);
            }
            "--quiet" => o.quiet = true,
            "--no-host" => o.host = false,
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            s => o.positional.push(s.to_string()),
        }
    }
    Ok(o)
}

fn repo_root() -> PathBuf {
    // xtask/ lives directly under the repository root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| ".".into())
}

fn step(name: &str) -> Instant {
    eprintln!("==> {name}");
    Instant::now()
}

/// Runs a command with inherited stderr; returns the last line of its stdout.
fn run_capture(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what} failed ({})", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string())
}

fn run_status(cmd: &mut Command, what: &str) -> Result<()> {
    let st = cmd
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({st})"))
    }
}

fn script(root: &Path, rel: &str) -> Command {
    let mut c = Command::new("bash");
    c.arg(root.join(rel));
    c
}

#[derive(Clone)]
struct Artifacts {
    ktree: PathBuf,
    qemu: PathBuf,
    bzimage: PathBuf,
    module: PathBuf,
    device: PathBuf,
    guest_tests: PathBuf,
    /// The C examples, built against `zapguard.h` (in the image's `/bin`).
    examples: Vec<PathBuf>,
    initramfs: PathBuf,
    /// The guest kernel flavor (`default`, `debug`, ...).
    flavor: String,
    /// The module is the production build (no `ZAPGUARD_TEST=1`): no test surface at all.
    production: bool,
}

impl Artifacts {
    /// The run's names in the expected-skip list: its flavor, and `production` for the
    /// production module's run.
    fn run_names(&self) -> Vec<&str> {
        let mut names = vec![self.flavor.as_str()];
        if self.production {
            names.push("production");
        }
        names
    }
}

fn build(root: &Path) -> Result<Artifacts> {
    let t = step("provision host tools (apt, rustup components, bindgen)");
    run_status(
        &mut script(root, "images/provision-host.sh"),
        "images/provision-host.sh",
    )?;
    eprintln!("    {:.1}s", t.elapsed().as_secs_f32());

    let t = step("QEMU with vfio-user-pci");
    let qemu = PathBuf::from(run_capture(
        &mut script(root, "images/qemu/provision.sh"),
        "images/qemu/provision.sh",
    )?);
    eprintln!("    {} ({:.1}s)", qemu.display(), t.elapsed().as_secs_f32());

    let t = step("zapguard-dev (device) and guest tests (static musl)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for (what, extra) in [
        (
            "zapguard-dev",
            ["-p", "zapguard-dev", "--bin", "zapguard-dev"],
        ),
        ("guest-tests", ["-p", "guest-tests", "--target", MUSL]),
    ] {
        run_status(
            Command::new(&cargo)
                .current_dir(root)
                .args(["build", "--quiet", "--release"])
                .args(extra),
            &format!("cargo build {what}"),
        )?;
    }
    let device = root.join("target/release/zapguard-dev");
    let guest_tests = root
        .join("target")
        .join(MUSL)
        .join("release/zapguard-guest-tests");
    eprintln!("    {:.1}s", t.elapsed().as_secs_f32());

    let t =
        step("zapguard.h and the C examples (target/zapguard/include, target/zapguard/examples)");
    let examples = user::build_examples(root)?;
    eprintln!(
        "    {} built ({:.1}s)",
        examples.len(),
        t.elapsed().as_secs_f32()
    );

    let (ktree, module, initramfs) = kernel_artifacts(root, "default", &guest_tests, &examples)?;
    Ok(Artifacts {
        ktree: ktree.clone(),
        qemu,
        bzimage: ktree.join("arch/x86/boot/bzImage"),
        module,
        device,
        guest_tests,
        examples,
        initramfs,
        flavor: "default".into(),
        production: false,
    })
}

/// The guest kernel of `flavor` (see images/kernel/build.sh), zapguard.ko built against it, and
/// the initramfs holding both with the guest tests.
fn kernel_artifacts(
    root: &Path,
    flavor: &str,
    guest_tests: &Path,
    examples: &[PathBuf],
) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let t = step(&format!(
        "guest kernel, {flavor} flavor (cached by input hash)"
    ));
    let ktree = PathBuf::from(run_capture(
        script(root, "images/kernel/build.sh").arg(flavor),
        "images/kernel/build.sh",
    )?);
    eprintln!(
        "    {} ({:.1}s)",
        ktree.display(),
        t.elapsed().as_secs_f32()
    );

    let module = build_module(root, &ktree, ModuleBuild::Test)?;

    let initramfs = build_initramfs(root, &ktree, &module, guest_tests, examples)?;
    Ok((ktree, module, initramfs))
}

/// Which zapguard.ko to build.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ModuleBuild {
    /// `ZAPGUARD_TEST=1`: injected bugs, knobs, validator plumbing (what `just run` loads).
    Test,
    /// The production module: none of that.
    Production,
}

/// zapguard.ko for kernel tree `ktree`.
fn build_module(root: &Path, ktree: &Path, build: ModuleBuild) -> Result<PathBuf> {
    let (what, suffix, flag) = match build {
        ModuleBuild::Test => ("zapguard.ko", "", Some("ZAPGUARD_TEST=1")),
        ModuleBuild::Production => ("zapguard.ko, production build", "-production", None),
    };
    let t = step(what);
    // One module output directory per kernel tree and build, so a new kernel never links stale
    // objects and the two builds never share them.
    let tree_id = ktree
        .parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mo = root
        .join("target/zapguard")
        .join(format!("kmod-{tree_id}{suffix}"));
    std::fs::create_dir_all(&mo).map_err(|e| format!("{}: {e}", mo.display()))?;
    run_status(
        Command::new("make")
            .args(["-s", "-C"])
            .arg(ktree)
            .arg(format!("M={}", root.join("kmod").display()))
            .arg(format!("MO={}", mo.display()))
            .arg("LLVM=-19")
            .args(flag)
            .arg("modules"),
        "module build",
    )?;
    let module = mo.join("zapguard.ko");
    eprintln!(
        "    {} ({:.1}s)",
        module.display(),
        t.elapsed().as_secs_f32()
    );
    Ok(module)
}

/// The kernel's hmm-tests for `ktree` and the initramfs holding `module` with the guest tests.
fn build_initramfs(
    root: &Path,
    ktree: &Path,
    module: &Path,
    guest_tests: &Path,
    examples: &[PathBuf],
) -> Result<PathBuf> {
    let t = step("hmm-tests, the kernel's own HMM selftest (static, cached by input hash)");
    let hmm_tests = PathBuf::from(run_capture(
        script(root, "images/hmm-tests/build.sh").arg(ktree),
        "images/hmm-tests/build.sh",
    )?);
    eprintln!(
        "    {} ({:.1}s)",
        hmm_tests.display(),
        t.elapsed().as_secs_f32()
    );

    let t = step("initramfs");
    let initramfs = PathBuf::from(run_capture(
        script(root, "images/initramfs/build.sh")
            .arg(ktree)
            .arg(module)
            .arg(guest_tests)
            .arg(&hmm_tests)
            .args(examples),
        "images/initramfs/build.sh",
    )?);
    eprintln!(
        "    {} ({:.1}s)",
        initramfs.display(),
        t.elapsed().as_secs_f32()
    );

    Ok(initramfs)
}

/// `art` with the production module (built without `ZAPGUARD_TEST=1`) in its initramfs.
fn production_artifacts(root: &Path, art: &Artifacts) -> Result<Artifacts> {
    let module = build_module(root, &art.ktree, ModuleBuild::Production)?;
    let initramfs = build_initramfs(root, &art.ktree, &module, &art.guest_tests, &art.examples)?;
    Ok(Artifacts {
        module,
        initramfs,
        production: true,
        ..art.clone()
    })
}

/// Builds the production module, shows that it carries no test surface (and that the same
/// checks see the test build's), then runs the guest suite on it: the tests that need the test
/// build skip, everything else must pass.
fn production_run(root: &Path, art: &Artifacts, opts: &Options) -> Result<(usize, usize)> {
    let prod = production_artifacts(root, art)?;
    let mut checks = test_surface_checks(&prod.module, false)?;
    checks.extend(test_surface_checks(&art.module, true)?);
    let (cp, cf) = print_checks("production module checks:", &checks);
    let (vp, vf) = vm_run(root, &prod, opts, vm::Echo::Results)?;
    Ok((cp + vp, cf + vf))
}

/// Marks of the test surface in a module file: symbols of the debugfs interface and the knobs,
/// the knob parameters in `.modinfo`, and the injection log line.
const TEST_SURFACE_SYMBOLS: [&str; 4] = ["testing", "set_knobs", "pgd_phys", "debugfs"];
const TEST_SURFACE_STRINGS: [&str; 4] = [
    "parm=fault_lag_us:",
    "parm=probe_fail_at:",
    "injecting driver bugs",
    "zapguard-",
];

/// Whether `module` has the test surface's marks: none in the production build (`want`
/// false), all of them in the test build (`want` true, which proves the checks can see them).
fn test_surface_checks(module: &Path, want: bool) -> Result<Vec<Check>> {
    let out = Command::new("llvm-nm-19")
        .arg("-a")
        .arg(module)
        .output()
        .map_err(|e| format!("llvm-nm-19: {e}"))?;
    if !out.status.success() {
        return Err(format!("llvm-nm-19 {}: {}", module.display(), out.status));
    }
    let nm = String::from_utf8_lossy(&out.stdout);
    let symbols: Vec<&str> = nm
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|sym| TEST_SURFACE_SYMBOLS.iter().any(|m| sym.contains(m)))
        .collect();
    let bytes = std::fs::read(module).map_err(|e| format!("{}: {e}", module.display()))?;
    let has = |m: &str| bytes.windows(m.len()).any(|w| w == m.as_bytes());
    let strings: Vec<&str> = TEST_SURFACE_STRINGS
        .into_iter()
        .filter(|m| has(m))
        .collect();
    let build = if want {
        "test build"
    } else {
        "production build"
    };
    let name = |n: &'static str, t: &'static str| if want { t } else { n };
    Ok(vec![
        Check {
            name: name(
                "the production module has no test-surface symbol (debugfs, inject, knobs, CPU page-table root)",
                "the test build has the symbols that check looks for",
            ),
            ok: if want {
                TEST_SURFACE_SYMBOLS
                    .iter()
                    .all(|m| symbols.iter().any(|s| s.contains(m)))
            } else {
                symbols.is_empty()
            },
            detail: format!("{build}: {} matching symbol(s), first {:?}", symbols.len(), symbols.first()),
        },
        Check {
            name: name(
                "the production module has no knob parameter, injection message or debugfs name",
                "the test build has the strings that check looks for",
            ),
            ok: if want {
                strings.len() == TEST_SURFACE_STRINGS.len()
            } else {
                strings.is_empty()
            },
            detail: format!("{build}: found {strings:?}"),
        },
    ])
}

/// `art`, or with `--flavor`, the same with that flavor's kernel, module and initramfs.
fn with_flavor(root: &Path, art: Artifacts, opts: &Options) -> Result<Artifacts> {
    match &opts.flavor {
        Some(f) => flavor_artifacts(root, &art, f),
        None => Ok(art),
    }
}

/// `art` with the kernel, module and initramfs of another kernel flavor.
fn flavor_artifacts(root: &Path, art: &Artifacts, flavor: &str) -> Result<Artifacts> {
    let (ktree, module, initramfs) =
        kernel_artifacts(root, flavor, &art.guest_tests, &art.examples)?;
    Ok(Artifacts {
        bzimage: ktree.join("arch/x86/boot/bzImage"),
        ktree,
        qemu: art.qemu.clone(),
        module,
        device: art.device.clone(),
        guest_tests: art.guest_tests.clone(),
        examples: art.examples.clone(),
        initramfs,
        flavor: flavor.to_string(),
        production: false,
    })
}

/// A fresh directory for this run's logs; `runs/latest` points at it and old runs are pruned.
fn new_run_dir(root: &Path) -> Result<PathBuf> {
    let runs = root.join("target/zapguard/runs");
    let id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let dir = runs.join(format!("run-{id}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let latest = runs.join("latest");
    let _ = std::fs::remove_file(&latest);
    let _ = std::os::unix::fs::symlink(dir.file_name().unwrap_or_default(), &latest);
    let mut old: Vec<PathBuf> = std::fs::read_dir(&runs)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir() && !p.is_symlink())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("run-"))
                })
                .collect()
        })
        .unwrap_or_default();
    old.sort();
    for p in old.iter().rev().skip(10) {
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(dir)
}

/// A pass/fail check of the run as a whole (as opposed to one guest test).
/// The check that every module unloaded (init's `rmmod` loop) and the guest powered off.
const UNLOAD_CHECK: &str = "modules unloaded and the guest powered off";

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

fn vm_checks(
    o: &vm::VmOutcome,
    analysis: &std::io::Result<trace::Analysis>,
    production: bool,
) -> Vec<Check> {
    let ident_reads = analysis
        .as_ref()
        .ok()
        .and_then(|a| a.summary.reg_reads.get("IDENT").copied())
        .unwrap_or(0);
    vec![
        Check {
            name: "guest ran its tests to completion",
            ok: o.tests_end_rc.is_some() && !o.timed_out,
            detail: if o.timed_out {
                "timed out".into()
            } else if o.tests_end_rc.is_none() {
                "no ZAPGUARD-TESTS-END marker (guest crashed or hung)".into()
            } else {
                String::new()
            },
        },
        Check {
            name: "the guest reported a result for every planned test",
            ok: o.plan.is_some_and(|n| n == o.top_level_results),
            detail: format!("plan {:?}, {} results", o.plan, o.top_level_results),
        },
        Check {
            name: "no kernel panic, oops, BUG or WARN",
            ok: o.splats.is_empty(),
            detail: o.splats.first().cloned().unwrap_or_default(),
        },
        Check {
            name: UNLOAD_CHECK,
            ok: o.done_rc == Some(0) && o.qemu_status.is_some_and(|s| s.success()),
            detail: format!("init rc {:?}, QEMU {:?}", o.done_rc, o.qemu_status),
        },
        Check {
            name: "device trace records the driver's BAR reads",
            ok: ident_reads > 0
                && analysis
                    .as_ref()
                    .is_ok_and(|a| a.summary.bad_lines.is_empty()),
            detail: match analysis {
                Ok(a) => format!(
                    "{ident_reads} IDENT reads, {} malformed lines",
                    a.summary.bad_lines.len()
                ),
                Err(e) => format!("{}: {e}", o.trace.display()),
            },
        },
        {
            // Only the injected-bug tests may cause violations, and the guest says how many;
            // the offline check must find nothing else (ledger, stuck SYNCs, queue errors).
            let expected = o.expected_violations.unwrap_or(0);
            let (ok, detail) = match analysis {
                Ok(a) => {
                    let c = &a.check;
                    let other = c.findings.len() as u64 - c.device_violations;
                    (
                        c.device_violations == expected && other == 0,
                        format!(
                            "{} violations in the trace, the guest expected {expected}; {other} other offline finding(s){}",
                            c.device_violations,
                            c.findings
                                .iter()
                                .find(|f| f.what != "device validator violation")
                                .map_or(String::new(), |f| format!(", first: {f}"))
                        ),
                    )
                }
                Err(e) => (false, format!("{}: {e}", o.trace.display())),
            };
            Check {
                name: "trace check: violations are exactly the injected bugs', nothing else",
                ok,
                detail,
            }
        },
        {
            // Tests that move pages (NUMA) name each page's homes; the device must have used
            // them, in order. A malformed expectation line fails rather than weakening the check.
            let (ok, detail) = match analysis {
                Ok(a) => {
                    let unmet = a.accesses.unmet();
                    let bad = &o.bad_trace_expectations;
                    (
                        unmet.is_empty() && bad.is_empty(),
                        match (unmet.first(), bad.first()) {
                            (_, Some(b)) => format!("malformed expectation: {b}"),
                            (Some(u), None) => {
                                format!("{} of {} unmet, first: {u}", unmet.len(), a.accesses.len())
                            }
                            (None, None) => String::new(),
                        },
                    )
                }
                Err(e) => (false, format!("{}: {e}", o.trace.display())),
            };
            Check {
                name: "trace check: the device used each page where the guest saw it",
                ok,
                detail,
            }
        },
        {
            // Each injected-bug test's violations must come from its own window, context and
            // classes: a count that merely adds up is not enough.
            let (ok, detail) = match analysis {
                Ok(a) => {
                    let w = &a.windows;
                    let empty = w.empty();
                    let (windows, matched) = w.totals();
                    let mut d = format!(
                        "{matched} violation(s) in {windows} test window(s), {} outside",
                        w.unexpected
                    );
                    if let Some(u) = w.first_unexpected.first() {
                        d += &format!(", first: {u}");
                    }
                    if let Some(e) = empty.first() {
                        d += &format!("; {} window(s) caught nothing, first: {e}", empty.len());
                    }
                    (w.unexpected == 0 && empty.is_empty(), d)
                }
                Err(e) => (false, format!("{}: {e}", o.trace.display())),
            };
            Check {
                name: "trace check: each violation is in the window of a test that expects its context and class",
                ok,
                detail,
            }
        },
        validation_check(analysis, &o.trace, production),
        Check {
            name: "device exited cleanly when QEMU went away",
            ok: !o.device_died_early && o.device_status.is_some_and(|s| s.success()),
            detail: format!("zapguard-dev {:?}", o.device_status),
        },
    ]
}

/// A test build's run whose device did DMA that the validator never judged is not a clean run
/// (every step says in the trace whether it was judged). The production module gives the
/// device no CPU page table to judge against: there, nothing may have been judged.
fn validation_check(
    analysis: &std::io::Result<trace::Analysis>,
    trace: &Path,
    production: bool,
) -> Check {
    let (ok, detail) = match analysis {
        Ok(a) => {
            let (judged, unjudged, all) = a.summary.validated();
            let ok = if production {
                all > 0 && judged == 0
            } else {
                all == 0 || judged > 0
            };
            (
                ok,
                format!("validated {judged} of {all} device accesses; {unjudged} not judged"),
            )
        }
        Err(e) => (false, format!("{}: {e}", trace.display())),
    };
    Check {
        name: if production {
            "trace check: the production module gave the validator nothing to judge"
        } else {
            "trace check: the validator judged the device's accesses"
        },
        ok,
        detail,
    }
}

fn print_checks(title: &str, checks: &[Check]) -> (usize, usize) {
    let passed = checks.iter().filter(|c| c.ok).count();
    println!("{title} {passed} passed, {} failed", checks.len() - passed);
    for c in checks {
        let mark = if c.ok { "ok    " } else { "FAILED" };
        let detail = if c.ok || c.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", c.detail)
        };
        println!("  {mark} {}{detail}", c.name);
    }
    (passed, checks.len() - passed)
}

fn vm_config(
    art: &Artifacts,
    run_dir: PathBuf,
    init_args: Vec<String>,
    timeout: Duration,
    echo: vm::Echo,
) -> vm::VmConfig {
    vm::VmConfig {
        qemu: art.qemu.clone(),
        device: art.device.clone(),
        bzimage: art.bzimage.clone(),
        initramfs: art.initramfs.clone(),
        run_dir,
        accel: vm::Accel::detect().0,
        timeout,
        init_args,
        echo,
        interactive: false,
        kill_device_on: None,
        device_may_die: false,
    }
}

/// Boots the guest, runs the guest tests and reports; returns (passed, failed) over guest tests
/// and run checks.
fn vm_run(root: &Path, art: &Artifacts, opts: &Options, echo: vm::Echo) -> Result<(usize, usize)> {
    let (accel, why) = vm::Accel::detect();
    let run_dir = new_run_dir(root)?;
    // The guest scales its fixed time bounds by the kernel's slowness (guest-tests time_scale).
    let mut init_args = vec![
        "zg.run=tests".to_string(),
        format!("zg.flavor={}", art.flavor),
    ];
    if art.production {
        init_args.push("zg.build=production".to_string());
    }
    if let Some(f) = &opts.filter {
        init_args.push(format!("zg.filter={f}"));
    }
    if let Some(k) = &opts.knobs {
        init_args.push(format!("zg.knobs={k}"));
    }
    init_args.extend(opts.init_extra.iter().cloned());
    let mut cfg = vm_config(art, run_dir.clone(), vec![], opts.timeout, echo);
    if opts.exec.is_some() {
        // The user's program instead of the guest tests, with the same run checks.
        init_args = vec!["zg.run=user".to_string()];
        cfg.initramfs =
            user::user_initramfs(&art.initramfs, &run_dir, opts.exec.as_ref(), &opts.add)?;
    }
    cfg.init_args = init_args;
    let t = step(&format!(
        "boot guest ({accel:?}: {why}; timeout {} s)",
        opts.timeout.as_secs()
    ));
    let mut o = vm::run(&cfg).map_err(|e| format!("VM run: {e}"))?;
    if o.only_boot_splats() {
        // Not the driver's (it is not loaded yet), and rare: boot once more, keeping the
        // first boot's console log. A second one fails the run as any splat does.
        eprintln!(
            "xtask: kernel splat before the guest's init ran, zapguard not loaded: {}; booting again once (first console log: {})",
            o.splats[0],
            run_dir.join("serial-first-boot.log").display()
        );
        let _ = std::fs::rename(&o.serial_log, run_dir.join("serial-first-boot.log"));
        o = vm::run(&cfg).map_err(|e| format!("VM run: {e}"))?;
    }
    eprintln!("    guest finished in {:.1}s", t.elapsed().as_secs_f32());

    let rel = |p: &Path| {
        p.strip_prefix(root)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| p.to_path_buf())
    };
    let gp = o
        .results
        .iter()
        .filter(|r| r.outcome == Outcome::Pass)
        .count();
    let gf = o
        .results
        .iter()
        .filter(|r| r.outcome == Outcome::Fail)
        .count();
    let gs = o
        .results
        .iter()
        .filter(|r| r.outcome == Outcome::Skip)
        .count();
    let unexpected_skips = skips::ExpectedSkips::load(root)?.unexpected(
        &art.run_names(),
        opts.filter.is_some(),
        &o.results,
    );
    let skip_note = match unexpected_skips.len() {
        0 => "all expected".to_string(),
        n => format!("{n} unexpected"),
    };
    println!("\nguest tests: {gp} passed, {gf} failed, {gs} skipped ({skip_note})");
    for t in &unexpected_skips {
        println!(
            "  UNEXPECTED SKIP {} ({}), not in {}",
            t.name,
            t.reason,
            skips::PATH
        );
    }
    let serial = std::fs::read_to_string(&o.serial_log).unwrap_or_default();
    for r in o.results.iter().filter(|r| r.outcome == Outcome::Fail) {
        println!("  FAILED {}", r.name);
        // What the device did for the contexts the failure names.
        for asid in trace::failed_test_asids(&serial, &r.name) {
            match trace::last_lines_of_asid(&o.trace, asid, 12) {
                Ok(lines) => {
                    println!("    last device trace lines of asid {asid}:");
                    for l in lines {
                        println!("      {l}");
                    }
                }
                Err(e) => println!("    (trace unreadable: {e})"),
            }
        }
    }
    let analysis = trace::analyse(&o.trace, &o.trace_expectations, &o.violation_windows);
    let mut checks = vm_checks(&o, &analysis, art.production);
    checks.push(Check {
        name: "every skipped test is an expected skip",
        ok: unexpected_skips.is_empty(),
        detail: format!("{gs} skipped, {skip_note} (see {})", skips::PATH),
    });
    let (cp, cf) = print_checks("run checks: ", &checks);
    println!("serial log:   {}", rel(&o.serial_log).display());
    println!("device log:   {}", rel(&o.device_log).display());
    println!("qemu log:     {}", rel(&o.qemu_log).display());
    println!("device trace: {}", rel(&o.trace).display());
    match &analysis {
        Ok(a) => {
            println!("device trace summary (zapguard-trace summary):");
            for l in a.summary.report(o.expected_violations.unwrap_or(0)).lines() {
                println!("  {l}");
            }
        }
        Err(e) => println!("  (unreadable: {e})"),
    }
    Ok((gp + cp, gf + cf))
}

/// `fuzz-guest [N] [--seed S]`: a boot that runs only the guest's uAPI fuzzer (`uapi_fuzz`,
/// guest-tests/src/fuzz/) with N calls, under the normal run checks (kernel splats, the
/// device trace's violations), then prints the fuzzer's `ZAPGUARD-FUZZ` summary lines.
fn fuzz_guest(root: &Path, art: &Artifacts, opts: &Options) -> Result<(usize, usize)> {
    let calls: u64 = match opts.positional.as_slice() {
        [] => 100_000,
        [n] => n
            .parse()
            .map_err(|_| format!("fuzz-guest: not a number of calls: {n}"))?,
        more => return Err(format!("fuzz-guest: one number of calls, got {more:?}")),
    };
    let mut init_extra = vec![format!("zg.fuzz_calls={calls}")];
    init_extra.extend(opts.seed.map(|s| format!("zg.fuzz_seed={s}")));
    let o = Options {
        filter: Some("uapi_fuzz".into()),
        init_extra,
        // The boot and the checks, and a generous millisecond per call under TCG.
        timeout: opts.timeout.max(Duration::from_secs(300 + calls / 1000)),
        ..opts.clone()
    };
    let counts = vm_run(root, art, &o, vm::Echo::Results)?;
    let serial = root.join("target/zapguard/runs/latest/serial.log");
    let text =
        std::fs::read_to_string(&serial).map_err(|e| format!("{}: {e}", serial.display()))?;
    println!("uAPI fuzzer (guest-tests/src/fuzz/):");
    for line in text.lines().filter(|l| l.contains("ZAPGUARD-FUZZ")) {
        println!("  {}", line.trim());
    }
    Ok(counts)
}

/// The kernel's Rust bindings are generated with `--no-layout-tests`: regenerate them with layout
/// tests and type-check them, and prove the check catches the `sched_statistics` bug it exists for.
fn bindings_checks(root: &Path, art: &Artifacts) -> (usize, usize) {
    let t = step("kernel bindings layout check (images/kernel/check-bindings.sh --self-test)");
    let out = script(root, "images/kernel/check-bindings.sh")
        .arg("--self-test")
        .arg(&art.ktree)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output();
    let (ok, text) = match out {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ),
        Err(e) => (false, format!("cannot run: {e}")),
    };
    for line in text.lines() {
        eprintln!("    {line}");
    }
    eprintln!("    {:.1}s", t.elapsed().as_secs_f32());
    let real_ok = text
        .lines()
        .any(|l| l.starts_with("bindings layout check:") && l.contains(", 0 failures"));
    let checks = [
        Check {
            name: "kernel Rust bindings match clang's struct layouts",
            ok: real_ok,
            detail: "see the layout mismatches above".into(),
        },
        Check {
            name: "the layout check catches the sched_statistics bug when the fix is removed",
            ok: ok && real_ok && text.contains("bindings layout self-test: OK"),
            detail: "see images/kernel/check-bindings.sh output above".into(),
        },
    ];
    print_checks("bindings checks:  ", &checks)
}

/// A static (musl) `zapguard-dev`, for the image: it must run on any x86-64 Linux box.
fn static_device(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_status(
        Command::new(&cargo)
            .current_dir(root)
            .args(["build", "--quiet", "--release", "-p", "zapguard-dev"])
            .args(["--bin", "zapguard-dev", "--target", MUSL]),
        "cargo build zapguard-dev (musl)",
    )?;
    Ok(root.join("target").join(MUSL).join("release/zapguard-dev"))
}

/// Builds the image archive from `art`.
fn build_image(root: &Path, art: &Artifacts) -> Result<(PathBuf, String)> {
    let device = static_device(root)?;
    let header = root.join("target/zapguard/include/zapguard.h");
    image::build(
        root,
        &image::Parts {
            bzimage: &art.bzimage,
            initramfs: &art.initramfs,
            device: &device,
            header: &header,
        },
    )
}

/// `just image` from a test: two builds give the same bytes, and the archive boots through its
/// own run script (one quick guest test) with the QEMU this machine uses.
fn image_checks(root: &Path, art: &Artifacts) -> Result<(usize, usize)> {
    let t = step("guest image: reproducible, and boots through its own run.sh");
    let (first, sha1) = build_image(root, art)?;
    let (_, sha2) = build_image(root, art)?;
    let (booted, text) = image::boot_check(root, &first, &art.qemu, "get_info_identity")?;
    eprintln!("    {:.1}s", t.elapsed().as_secs_f32());
    let checks = [
        Check {
            name: "just image twice gives the same sha256",
            ok: sha1 == sha2 && !sha1.is_empty(),
            detail: format!("{sha1} then {sha2}"),
        },
        Check {
            name: "the image boots through its own run.sh and its guest test passes",
            ok: booted && text.contains("ok 2 get_info_identity"),
            detail: text.lines().rev().take(12).collect::<Vec<_>>().join(" | "),
        },
    ];
    Ok(print_checks("image checks:      ", &checks))
}

/// The harness must fail runs that go wrong. Each scenario breaks the guest or the device on
/// purpose and passes only if the harness reports exactly that failure. Logs of each scenario
/// stay in `target/zapguard/runs/selftest-<name>/`.
fn harness_selftests(root: &Path, art: &Artifacts) -> Result<(usize, usize)> {
    let t = step("harness self-tests (each breaks a run on purpose)");
    let scenario = |name: &str,
                    run: &str,
                    timeout: u64,
                    kill: Option<&'static str>|
     -> Result<vm::VmOutcome> {
        let dir = root
            .join("target/zapguard/runs")
            .join(format!("selftest-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = vm_config(
            art,
            dir,
            vec![format!("zg.run={run}")],
            Duration::from_secs(timeout),
            vm::Echo::Silent,
        );
        cfg.kill_device_on = kill;
        vm::run(&cfg).map_err(|e| format!("self-test {name}: {e}"))
    };
    let panic = scenario("panic", "panic", 120, None)?;
    let hang = scenario("hang", "hang", 20, None)?;
    let dead = scenario("device-dies", "tests", 120, Some(ktap::TESTS_BEGIN))?;
    let leak = scenario("leak", "leak", 120, None)?;
    let failed_checks = |o: &vm::VmOutcome| {
        vm_checks(
            o,
            &trace::analyse(&o.trace, &o.trace_expectations, &o.violation_windows),
            false,
        )
        .iter()
        .filter(|c| !c.ok)
        .count()
    };
    let checks = [
        Check {
            name: "a guest kernel panic fails the run",
            ok: panic.splats.iter().any(|l| l.contains("Kernel panic"))
                && failed_checks(&panic) > 0
                && !panic.timed_out,
            detail: format!(
                "splats {:?}, timed out {}",
                panic.splats.first(),
                panic.timed_out
            ),
        },
        Check {
            name: "a hung guest is killed at the deadline and fails the run",
            ok: hang.timed_out && hang.qemu_status.is_some() && failed_checks(&hang) > 0,
            detail: format!("timed out {}, QEMU {:?}", hang.timed_out, hang.qemu_status),
        },
        Check {
            name: "a process still holding the driver fails the unload check",
            ok: unload_check_failed(&leak) && leak.qemu_status.is_some() && !leak.timed_out,
            detail: format!("init rc {:?}, timed out {}", leak.done_rc, leak.timed_out),
        },
        Check {
            name: "a dying device stops QEMU and fails the run",
            ok: dead.device_died_early && !dead.timed_out && failed_checks(&dead) > 0,
            detail: format!(
                "device died early {}, timed out {}",
                dead.device_died_early, dead.timed_out
            ),
        },
    ];
    eprintln!("    {:.1}s", t.elapsed().as_secs_f32());
    Ok(print_checks("harness self-tests:", &checks))
}

/// Whether the run's "modules unloaded" check failed because `rmmod` did (init's status 3).
fn unload_check_failed(o: &vm::VmOutcome) -> bool {
    let analysis = trace::analyse(&o.trace, &o.trace_expectations, &o.violation_windows);
    o.done_rc == Some(3)
        && vm_checks(o, &analysis, false)
            .iter()
            .any(|c| c.name == UNLOAD_CHECK && !c.ok)
}

/// The device-death boot: the device process dies mid-DMA (`FAIL_DIE`, which exits it with
/// status 3) and the guest must carry on: the driver fences it, users get `EIO`, nothing hangs,
/// the module unloads. Only `device_dies_mid_dma` runs (it skips in every other boot).
fn device_death_run(root: &Path, art: &Artifacts) -> Result<(usize, usize)> {
    let t = step("device-death boot (the device process dies mid-DMA, the guest carries on)");
    let dir = root.join("target/zapguard/runs/device-dies-mid-dma");
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = vm_config(
        art,
        dir,
        vec![
            "zg.run=tests".into(),
            "zg.filter=device_dies_mid_dma".into(),
            "zg.device_dies=1".into(),
        ],
        Duration::from_secs(180),
        vm::Echo::Results,
    );
    cfg.device_may_die = true;
    let o = vm::run(&cfg).map_err(|e| format!("device-death boot: {e}"))?;
    let analysis = trace::analyse(&o.trace, &o.trace_expectations, &o.violation_windows);
    let ran = o
        .results
        .iter()
        .any(|r| r.name == "device_dies_mid_dma" && r.outcome == ktap::Outcome::Pass);
    let (trace_ok, trace_detail) = match &analysis {
        // The device died with commands in its queue: only that finding is expected.
        Ok(a) => {
            let unexpected: Vec<_> = a.check.findings.iter().filter(|f| f.line != 0).collect();
            (
                unexpected.is_empty(),
                unexpected.first().map_or(String::new(), |f| f.to_string()),
            )
        }
        Err(e) => (false, format!("{}: {e}", o.trace.display())),
    };
    let checks = [
        Check {
            name: "the device died mid-DMA and the guest test passed",
            ok: ran && o.device_died_early && o.tests_end_rc == Some(0) && !o.timed_out,
            detail: format!(
                "test passed {ran}, device died {}, tests rc {:?}, timed out {}",
                o.device_died_early, o.tests_end_rc, o.timed_out
            ),
        },
        Check {
            name: "the device exited with FAIL_DIE's status (3)",
            ok: o.device_status.and_then(|s| s.code()) == Some(3),
            detail: format!("zapguard-dev {:?}", o.device_status),
        },
        Check {
            name: "no kernel panic, oops, BUG or WARN after the device died",
            ok: o.splats.is_empty(),
            detail: o.splats.first().cloned().unwrap_or_default(),
        },
        Check {
            name: "modules unloaded and the guest powered off",
            ok: o.done_rc == Some(0) && o.qemu_status.is_some(),
            detail: format!("init rc {:?}, QEMU {:?}", o.done_rc, o.qemu_status),
        },
        Check {
            name: "trace check: no violation, nothing touched after a SYNC",
            ok: trace_ok,
            detail: trace_detail,
        },
    ];
    eprintln!("    {:.1}s", t.elapsed().as_secs_f32());
    Ok(print_checks("device-death boot:", &checks))
}

fn finish(passed: usize, failed: usize) -> ExitCode {
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!(
            "usage: cargo xtask run|shell|test|build|image|mutants|bench|fuzz-guest|device-death [options] (see xtask/src/main.rs)"
        );
        return ExitCode::from(2);
    };
    let opts = match parse_options(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("xtask: {e}");
            return ExitCode::from(2);
        }
    };
    let root = repo_root();
    let res = match cmd.as_str() {
        "run" => build(&root)
            .and_then(|art| with_flavor(&root, art, &opts))
            .and_then(|art| {
                vm_run(
                    &root,
                    &art,
                    &opts,
                    if opts.quiet {
                        vm::Echo::Results
                    } else {
                        vm::Echo::Console
                    },
                )
            })
            .map(|(p, f)| finish(p, f)),
        "shell" => build(&root)
            .and_then(|art| with_flavor(&root, art, &opts))
            .and_then(|art| {
                let run_dir = new_run_dir(&root)?;
                let mut cfg = vm_config(
                    &art,
                    run_dir.clone(),
                    vec!["zg.run=shell".into()],
                    Duration::MAX,
                    vm::Echo::Console,
                );
                if opts.exec.is_some() || !opts.add.is_empty() {
                    // The files are in /user; /user/run runs the --exec program.
                    cfg.initramfs = user::user_initramfs(
                        &art.initramfs,
                        &run_dir,
                        opts.exec.as_ref(),
                        &opts.add,
                    )?;
                }
                cfg.interactive = true;
                vm::run(&cfg)
                    .map(|_| ExitCode::SUCCESS)
                    .map_err(|e| format!("VM run: {e}"))
            }),
        // The harness self-tests of `just test` alone.
        "selftests" => build(&root)
            .and_then(|art| harness_selftests(&root, &art))
            .map(|(p, f)| finish(p, f)),
        // The module import graphs: no cycle beyond the known ones (`just check`).
        "cycles" => match cycles::check(&root).and_then(|c| Ok(layering::check(&root)? && c)) {
            Ok(true) => Ok(ExitCode::SUCCESS),
            Ok(false) => Ok(ExitCode::FAILURE),
            Err(e) => Err(e),
        },
        // The production module's checks and run of `just test` alone.
        "production" => build(&root)
            .and_then(|art| production_run(&root, &art, &opts))
            .map(|(p, f)| finish(p, f)),
        // The device-death boot of `just test` alone (to reproduce its failures).
        "device-death" => build(&root)
            .and_then(|art| device_death_run(&root, &art))
            .map(|(p, f)| finish(p, f)),
        "build" => build(&root).map(|a| {
            for (k, v) in [
                ("qemu", &a.qemu),
                ("bzImage", &a.bzimage),
                ("module", &a.module),
                ("device", &a.device),
                ("guest tests", &a.guest_tests),
                ("initramfs", &a.initramfs),
            ] {
                println!("{k:12} {}", v.display());
            }
            ExitCode::SUCCESS
        }),
        "test" => (|| {
            let mut host = hosttests::Counts::default();
            if opts.host {
                step("host tests (cargo test --workspace)");
                host = hosttests::run(&root).map_err(|e| format!("cargo test: {e}"))?;
                println!("host tests: {} passed, {} failed", host.passed, host.failed);
            }
            // A VM part that cannot run at all is one failure, not zero tests.
            let (vp, vf) = build(&root)
                .and_then(|art| {
                    let (mut p, mut f) = with_flavor(&root, art.clone(), &opts)
                        .and_then(|a| vm_run(&root, &a, &opts, vm::Echo::Results))?;
                    // A filtered run is for iterating on some guest tests, `--flavor` for one
                    // kernel: both skip the whole-setup checks and the other flavors.
                    if opts.filter.is_none() && opts.flavor.is_none() {
                        // The clean suite again with each device knob on for the whole run
                        // (first: the mutation smoke's initramfs builds may prune this one's).
                        for knobs in KNOB_RUNS {
                            println!("\n== device knob {knobs} for the whole suite ==");
                            // The full 100k-call fuzz runs on each kernel flavor; a knob run
                            // fuzzes a fifth of it, which keeps `just test` within its budget.
                            let o = Options {
                                knobs: Some(knobs.to_string()),
                                init_extra: vec![format!("zg.fuzz_calls={KNOB_RUN_FUZZ_CALLS}")],
                                ..opts.clone()
                            };
                            let (kp, kf) = vm_run(&root, &art, &o, vm::Echo::Results)
                                .unwrap_or_else(|e| {
                                    eprintln!("xtask: knob run {knobs}: {e}");
                                    (0, 1)
                                });
                            p += kp;
                            f += kf;
                        }
                        println!(
                            "\n== production module (built without ZAPGUARD_TEST=1): the suite's non-injecting part =="
                        );
                        let (pp, pf) = production_run(&root, &art, &opts).unwrap_or_else(|e| {
                            eprintln!("xtask: production run: {e}");
                            (0, 1)
                        });
                        p += pp;
                        f += pf;
                        let (bp, bf) = bindings_checks(&root, &art);
                        let (sp, sf) = harness_selftests(&root, &art)?;
                        let (dp, df) = device_death_run(&root, &art)?;
                        let (ip, iff) = image_checks(&root, &art)?;
                        let (mp, mf) = mutants::smoke(&root, &art)?;
                        p += bp + sp + dp + ip + mp;
                        f += bf + sf + df + iff + mf;
                        // The same suite on the lock-debugging kernel: any lockdep, might_sleep
                        // or DEBUG_VM report fails its run checks.
                        println!(
                            "\n== lock-debugging guest kernel (images/kernel/debug.config) =="
                        );
                        // The instrumented kernels run the suite 1.5-2x slower (135 s and 154 s
                        // against 90 s here): twice the timeout.
                        let slow = Options {
                            timeout: opts.timeout * 2,
                            ..opts.clone()
                        };
                        // dma-debug is on for the whole run (the kernel's default): a
                        // DMA mapping or coherent allocation still held when the device unbinds,
                        // or when the module goes, is a WARN.
                        let (dp, df) = flavor_artifacts(&root, &art, "debug")
                            .and_then(|dbg| vm_run(&root, &dbg, &slow, vm::Echo::Results))
                            .unwrap_or_else(|e| {
                                eprintln!("xtask: debug flavor: {e}");
                                (0, 1)
                            });
                        p += dp;
                        f += df;
                        // And on the KASAN kernel: any out-of-bounds or use-after-free access, in
                        // C or in the module's Rust, is a "BUG: KASAN:" splat.
                        println!("\n== KASAN guest kernel (images/kernel/kasan.config) ==");
                        let (kp, kf) = flavor_artifacts(&root, &art, "kasan")
                            .and_then(|k| vm_run(&root, &k, &slow, vm::Echo::Results))
                            .unwrap_or_else(|e| {
                                eprintln!("xtask: kasan flavor: {e}");
                                (0, 1)
                            });
                        p += kp;
                        f += kf;
                    }
                    Ok((p, f))
                })
                .unwrap_or_else(|e| {
                    eprintln!("xtask: {e}");
                    (0, 1)
                });
            Ok(finish(host.passed + vp, host.failed + vf))
        })(),
        "mutants" => build(&root).and_then(|art| {
            mutants::run(&root, &art, opts.filter.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }),
        "image" => build(&root).and_then(|art| {
            let (path, sha) = build_image(&root, &art)?;
            println!("{}\nsha256 {sha}", path.display());
            Ok(ExitCode::SUCCESS)
        }),
        "bench" => build(&root).and_then(|art| {
            let (accel, why) = vm::Accel::detect();
            let t = step(&format!("boot guest for the benchmarks ({accel:?}: {why})"));
            let mut args = vec!["zg.run=bench".to_string()];
            args.extend(opts.filter.iter().map(|f| format!("zg.filter={f}")));
            let mut cfg = vm_config(
                &art,
                new_run_dir(&root)?,
                args,
                opts.timeout.max(Duration::from_secs(900)),
                vm::Echo::Results,
            );
            cfg.interactive = false;
            let o = vm::run(&cfg).map_err(|e| format!("VM run: {e}"))?;
            eprintln!("    guest finished in {:.1}s", t.elapsed().as_secs_f32());
            if o.tests_end_rc != Some(0) {
                return Err(format!(
                    "the guest benchmarks did not complete (rc {:?}); see {}",
                    o.tests_end_rc,
                    o.serial_log.display()
                ));
            }
            let analysis = trace::analyse(&o.trace, &o.trace_expectations, &o.violation_windows)
                .map_err(|e| format!("trace: {e}"))?;
            let hit = |asid: u64| analysis.summary.asids.get(&asid).map(|s| s.hit_rate());
            // A partial run must not replace the full run's results.
            let out = root.join(if opts.filter.is_some() {
                "target/zapguard/bench-partial.json"
            } else {
                "target/zapguard/bench.json"
            });
            bench::report(&o.bench, &format!("{accel:?}"), hit, &out)?;
            Ok(ExitCode::SUCCESS)
        }),
        "fuzz-guest" => build(&root)
            .and_then(|art| fuzz_guest(&root, &art, &opts))
            .map(|(p, f)| finish(p, f)),
        other => Err(format!("unknown command {other}")),
    };
    res.unwrap_or_else(|e| {
        eprintln!("xtask: error: {e}");
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knob_runs_name_the_drivers_knob_parameters() {
        for k in KNOB_RUNS {
            check_knobs(k).unwrap();
        }
        assert!(KNOB_RUNS.iter().any(|k| k.contains("sync_lag_us=")));
        for bad in ["walk_lag=5", "iotlb_keep=x", "iotlb_keep=1,", "sync_lag_us"] {
            assert!(check_knobs(bad).is_err(), "{bad}");
        }
        // Each is a module parameter of the driver (init passes them to insmod as they are).
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let module = std::fs::read_to_string(root.join("kmod/zapguard.rs")).unwrap();
        for p in KNOB_PARAMS {
            assert!(module.contains(&format!("{p}: u32 {{")), "{p}");
        }
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fuzz_guest_options() {
        let o = parse_options(&args(&["1000000", "--seed", "42"])).unwrap();
        assert_eq!(o.positional, ["1000000"]);
        assert_eq!(o.seed, Some(42));
        let o = parse_options(&args(&["--seed", "0xff"])).unwrap();
        assert_eq!(o.seed, Some(255));
        assert!(parse_options(&args(&["--seed", "x"])).is_err());
        assert!(parse_options(&args(&["--seed"])).is_err());
        assert!(o.init_extra.is_empty());
    }

    /// A run whose every part went right: a plan and its results, both markers, a clean exit,
    /// and a trace (JSON Lines, `events`) in `dir`.
    fn healthy(dir: &Path, events: &[serde_json::Value]) -> vm::VmOutcome {
        use std::os::unix::process::ExitStatusExt;
        std::fs::create_dir_all(dir).unwrap();
        let trace = dir.join("trace.jsonl");
        let lines: Vec<String> = events.iter().map(|e| e.to_string()).collect();
        std::fs::write(&trace, lines.join("\n") + "\n").unwrap();
        let mut o = vm::VmOutcome {
            trace,
            ..Default::default()
        };
        let mut in_tests = false;
        for l in [
            "ZAPGUARD-TESTS-BEGIN",
            "KTAP version 1",
            "1..2",
            "ok 1 a",
            "ok 2 b",
        ] {
            vm::feed_line(l, &mut in_tests, &mut o);
        }
        for l in ["ZAPGUARD-TESTS-END rc=0", "ZAPGUARD-DONE rc=0"] {
            vm::feed_line(l, &mut in_tests, &mut o);
        }
        o.qemu_status = Some(std::process::ExitStatus::from_raw(0));
        o.device_status = Some(std::process::ExitStatus::from_raw(0));
        o
    }

    /// The failed checks of `o`.
    fn failed(o: &vm::VmOutcome) -> Vec<&'static str> {
        let a = trace::analyse(&o.trace, &o.trace_expectations, &o.violation_windows);
        vm_checks(o, &a, false)
            .into_iter()
            .filter(|c| !c.ok)
            .map(|c| c.name)
            .collect()
    }

    fn ident_read() -> serde_json::Value {
        serde_json::json!({"seq": 0, "t_ns": 0, "kind": "bar_read", "bar": 0, "offset": 0,
            "size": 4, "value": 0x4750_415a_u32, "reg": "IDENT"})
    }

    fn violation(seq: u64, asid: u64, class: &str) -> serde_json::Value {
        serde_json::json!({"seq": seq, "t_ns": seq, "kind": "violation", "job": 1, "asid": asid,
            "va": 4096, "pa": 8192, "write": false, "result": class, "why": "x"})
    }

    fn window_mark(seq: u64, id: u64, end: u64) -> serde_json::Value {
        serde_json::json!({"seq": seq, "t_ns": seq, "kind": "bar_write", "bar": 0,
            "offset": 0x14, "size": 4, "reg": "SCRATCH", "value": ktap::WINDOW_MARK | id << 1 | end})
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("zg-vm-checks-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_healthy_run_passes_every_check() {
        let d = scratch_dir("healthy");
        assert_eq!(failed(&healthy(&d, &[ident_read()])), Vec::<&str>::new());
    }

    #[test]
    fn violations_without_the_guests_count_fail() {
        // The suite never printed ZAPGUARD-EXPECTED-VIOLATIONS: none are expected.
        let d = scratch_dir("no-count");
        let o = healthy(&d, &[ident_read(), violation(1, 3, "stale")]);
        assert_eq!(o.expected_violations, None);
        let f = failed(&o);
        assert!(
            f.contains(&"trace check: violations are exactly the injected bugs', nothing else"),
            "{f:?}"
        );
    }

    #[test]
    fn a_violation_of_another_class_inside_a_window_fails() {
        let d = scratch_dir("window");
        let mut o = healthy(
            &d,
            &[
                ident_read(),
                window_mark(1, 1, 0),
                violation(2, 3, "stale"),
                violation(3, 3, "write_perm"),
                window_mark(4, 1, 1),
            ],
        );
        let mut in_tests = true;
        vm::feed_line("ZAPGUARD-EXPECTED-VIOLATIONS 2", &mut in_tests, &mut o);
        vm::feed_line(
            "[ 1.0] ZAPGUARD-EXPECT-WINDOW id=1 asid=3 classes=stale",
            &mut in_tests,
            &mut o,
        );
        assert_eq!(
            failed(&o),
            ["trace check: each violation is in the window of a test that expects its context and class"]
        );
    }

    #[test]
    fn a_crashed_test_binary_fails() {
        // It printed its plan and one result, then died: no end marker, rc from init.
        let d = scratch_dir("crash");
        let mut o = healthy(&d, &[ident_read()]);
        o.top_level_results = 1;
        o.tests_end_rc = None;
        o.done_rc = Some(139);
        let f = failed(&o);
        for want in [
            "guest ran its tests to completion",
            "the guest reported a result for every planned test",
            "modules unloaded and the guest powered off",
        ] {
            assert!(f.contains(&want), "{want}: {f:?}");
        }
    }

    #[test]
    fn a_short_plan_fails_and_nested_results_do_not_count() {
        let d = scratch_dir("plan");
        let mut o = healthy(&d, &[ident_read()]);
        let mut in_tests = true;
        // A nested suite's plan and results are its own.
        for l in ["    1..1", "    ok 1 nested"] {
            vm::feed_line(l, &mut in_tests, &mut o);
        }
        assert_eq!((o.plan, o.top_level_results), (Some(2), 2));
        assert_eq!(failed(&o), Vec::<&str>::new());
        vm::feed_line("ok 3 extra", &mut in_tests, &mut o);
        assert_eq!(
            failed(&o),
            ["the guest reported a result for every planned test"]
        );
        let mut o = healthy(&d, &[ident_read()]);
        o.plan = None;
        assert_eq!(
            failed(&o),
            ["the guest reported a result for every planned test"]
        );
    }

    #[test]
    fn only_splats_before_init_count_as_boot_splats() {
        let boot = "[    0.003693] BUG: KASAN: wild-memory-access in _raw_spin_lock+0x29/0x60";
        let later = "[   12.000000] BUG: KASAN: slab-use-after-free in zapguard::x";
        let init = "zapguard-init: kernel 7.3.4, running 'tests'";
        let run = |lines: &[&str]| {
            let mut o = vm::VmOutcome::default();
            let mut in_tests = false;
            for l in lines {
                vm::feed_line(l, &mut in_tests, &mut o);
            }
            o
        };
        assert!(run(&[boot, init]).only_boot_splats());
        assert!(!run(&[init]).only_boot_splats());
        assert!(!run(&[init, later]).only_boot_splats());
        let both = run(&[boot, init, later]);
        assert!(!both.only_boot_splats());
        assert_eq!((both.splats.len(), both.splats_before_init), (2, 1));
    }
}
