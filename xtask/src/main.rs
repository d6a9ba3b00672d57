//! `cargo xtask`: the orchestration behind `just run` and `just test`.
//!
//! ```text
//! cargo xtask run   [--filter F] [--timeout SECS] [--quiet]   build, boot, run the guest tests, show the trace summary
//! cargo xtask shell                                           build, boot to an interactive guest shell
//! cargo xtask test  [--filter F] [--timeout SECS] [--no-host] host tests + the VM run; last line `N passed, N failed`
//! cargo xtask build                                           build every artifact, print their paths
//! cargo xtask trace [TRACE.jsonl]                             summarise a device trace (default: latest run)
//! ```
//!
//! Heavy artifacts (QEMU, kernel, initramfs) are built by the scripts under `images/`, which cache
//! them in `$ZAPGUARD_CACHE` (default `~/.cache/zapguard`) keyed by a hash of their inputs. Each VM
//! run keeps its serial log, device log, QEMU log and device trace in `target/zapguard/runs/<id>/`,
//! with `target/zapguard/runs/latest` pointing at the newest.

mod hosttests;
mod ktap;
mod trace;
mod vm;

use ktap::Outcome;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type Result<T> = std::result::Result<T, String>;

const MUSL: &str = "x86_64-unknown-linux-musl";

struct Options {
    filter: Option<String>,
    timeout: Duration,
    quiet: bool,
    host: bool,
    positional: Vec<String>,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let default_timeout = std::env::var("ZAPGUARD_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut o = Options {
        filter: None,
        timeout: Duration::from_secs(default_timeout),
        quiet: false,
        host: true,
        positional: vec![],
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--filter" => o.filter = Some(it.next().ok_or("--filter needs a value")?.clone()),
            "--timeout" => {
                let v = it.next().ok_or("--timeout needs seconds")?;
                o.timeout = Duration::from_secs(
                    v.parse()
                        .map_err(|_| format!("--timeout: not a number: {v}"))?,
                );
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

struct Artifacts {
    qemu: PathBuf,
    bzimage: PathBuf,
    module: PathBuf,
    device: PathBuf,
    guest_tests: PathBuf,
    initramfs: PathBuf,
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

    let t = step("guest kernel (cached by input hash)");
    let ktree = PathBuf::from(run_capture(
        &mut script(root, "images/kernel/build.sh"),
        "images/kernel/build.sh",
    )?);
    eprintln!(
        "    {} ({:.1}s)",
        ktree.display(),
        t.elapsed().as_secs_f32()
    );

    let t = step("zapguard.ko");
    // One module output directory per kernel tree, so a new kernel never links stale objects.
    let tree_id = ktree
        .parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mo = root.join("target/zapguard").join(format!("kmod-{tree_id}"));
    std::fs::create_dir_all(&mo).map_err(|e| format!("{}: {e}", mo.display()))?;
    run_status(
        Command::new("make")
            .args(["-s", "-C"])
            .arg(&ktree)
            .arg(format!("M={}", root.join("kmod").display()))
            .arg(format!("MO={}", mo.display()))
            .args(["LLVM=-19", "modules"]),
        "module build",
    )?;
    let module = mo.join("zapguard.ko");
    eprintln!(
        "    {} ({:.1}s)",
        module.display(),
        t.elapsed().as_secs_f32()
    );

    let t = step("zapguard-dev (device) and guest tests (static musl)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_status(
        Command::new(&cargo).current_dir(root).args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "qemu-dev",
            "--bin",
            "zapguard-dev",
        ]),
        "cargo build zapguard-dev",
    )?;
    run_status(
        Command::new(&cargo).current_dir(root).args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "guest-tests",
            "--target",
            MUSL,
        ]),
        "cargo build guest-tests",
    )?;
    let device = root.join("target/release/zapguard-dev");
    let guest_tests = root
        .join("target")
        .join(MUSL)
        .join("release/zapguard-guest-tests");
    eprintln!("    {:.1}s", t.elapsed().as_secs_f32());

    let t = step("initramfs");
    let initramfs = PathBuf::from(run_capture(
        script(root, "images/initramfs/build.sh")
            .arg(&ktree)
            .arg(&module)
            .arg(&guest_tests),
        "images/initramfs/build.sh",
    )?);
    eprintln!(
        "    {} ({:.1}s)",
        initramfs.display(),
        t.elapsed().as_secs_f32()
    );

    Ok(Artifacts {
        qemu,
        bzimage: ktree.join("arch/x86/boot/bzImage"),
        module,
        device,
        guest_tests,
        initramfs,
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
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

fn vm_checks(o: &vm::VmOutcome) -> Vec<Check> {
    let trace = trace::summarize_file(&o.trace);
    let ident_reads = trace
        .as_ref()
        .ok()
        .and_then(|t| t.reg_reads.get("IDENT").copied())
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
            name: "no kernel panic, oops, BUG or WARN",
            ok: o.splats.is_empty(),
            detail: o.splats.first().cloned().unwrap_or_default(),
        },
        Check {
            name: "modules unloaded and the guest powered off",
            ok: o.done_rc == Some(0) && o.qemu_status.is_some_and(|s| s.success()),
            detail: format!("init rc {:?}, QEMU {:?}", o.done_rc, o.qemu_status),
        },
        Check {
            name: "device trace records the driver's BAR reads",
            ok: ident_reads > 0 && trace.as_ref().is_ok_and(|t| t.bad_lines == 0),
            detail: match &trace {
                Ok(t) => format!("{ident_reads} IDENT reads, {} malformed lines", t.bad_lines),
                Err(e) => format!("{}: {e}", o.trace.display()),
            },
        },
        Check {
            name: "device exited cleanly when QEMU went away",
            ok: !o.device_died_early && o.device_status.is_some_and(|s| s.success()),
            detail: format!("zapguard-dev {:?}", o.device_status),
        },
    ]
}

/// Builds, boots and reports; returns (passed, failed) over guest tests and run checks.
fn vm_run(root: &Path, opts: &Options, verbose: bool, interactive: bool) -> Result<(usize, usize)> {
    let art = build(root)?;
    let (accel, why) = vm::Accel::detect();
    let run_dir = new_run_dir(root)?;
    let mut init_args = vec![format!(
        "zg.run={}",
        if interactive { "shell" } else { "tests" }
    )];
    if let Some(f) = &opts.filter {
        init_args.push(format!("zg.filter={f}"));
    }
    let t = step(&format!(
        "boot guest ({accel:?}: {why}; timeout {} s)",
        opts.timeout.as_secs()
    ));
    let cfg = vm::VmConfig {
        qemu: art.qemu,
        device: art.device,
        bzimage: art.bzimage,
        initramfs: art.initramfs,
        run_dir: run_dir.clone(),
        accel,
        timeout: opts.timeout,
        init_args,
        verbose,
        interactive,
    };
    let o = vm::run(&cfg).map_err(|e| format!("VM run: {e}"))?;
    eprintln!("    guest finished in {:.1}s", t.elapsed().as_secs_f32());
    if interactive {
        return Ok((0, 0));
    }

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
    println!("\nguest tests: {gp} passed, {gf} failed, {gs} skipped");
    for r in o.results.iter().filter(|r| r.outcome == Outcome::Fail) {
        println!("  FAILED {}", r.name);
    }
    let checks = vm_checks(&o);
    let cp = checks.iter().filter(|c| c.ok).count();
    println!("run checks:  {cp} passed, {} failed", checks.len() - cp);
    for c in &checks {
        let mark = if c.ok { "ok    " } else { "FAILED" };
        let detail = if c.ok || c.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", c.detail)
        };
        println!("  {mark} {}{detail}", c.name);
    }
    println!("serial log:   {}", rel(&o.serial_log).display());
    println!("device log:   {}", rel(&o.device_log).display());
    println!("qemu log:     {}", rel(&o.qemu_log).display());
    println!("device trace: {}", rel(&o.trace).display());
    match trace::summarize_file(&o.trace) {
        Ok(s) => println!("  {s}"),
        Err(e) => println!("  (unreadable: {e})"),
    }
    Ok((gp + cp, gf + checks.len() - cp))
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
            "usage: cargo xtask run|shell|test|build|trace [options] (see xtask/src/main.rs)"
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
        "run" => vm_run(&root, &opts, !opts.quiet, false).map(|(p, f)| finish(p, f)),
        "shell" => vm_run(&root, &opts, true, true).map(|_| ExitCode::SUCCESS),
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
            let (vp, vf) = match vm_run(&root, &opts, false, false) {
                Ok(r) => r,
                Err(e) => {
                    // The VM part could not run at all: that is one failure, not zero tests.
                    eprintln!("xtask: {e}");
                    (0, 1)
                }
            };
            Ok(finish(host.passed + vp, host.failed + vf))
        })(),
        "trace" => {
            let path = opts
                .positional
                .first()
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target/zapguard/runs/latest/trace.jsonl"));
            trace::summarize_file(&path)
                .map_err(|e| format!("{}: {e}", path.display()))
                .map(|s| {
                    println!("{}: {s}", path.display());
                    ExitCode::SUCCESS
                })
        }
        other => Err(format!("unknown command {other}")),
    };
    res.unwrap_or_else(|e| {
        eprintln!("xtask: error: {e}");
        ExitCode::FAILURE
    })
}
