//! One VM run: start `zapguard-dev`, wait for its socket, boot QEMU with the device attached,
//! read the serial console until the guest powers off, and bound every step in time.
//!
//! Failure modes handled here rather than hung on: a guest that never finishes (killed at the
//! deadline), a device that dies (QEMU would otherwise log one line per guest access forever, so
//! QEMU is stopped), and QEMU that ignores poweroff.

use crate::ktap::{self, Outcome, TestLine};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Everything a run needs.
pub struct VmConfig {
    pub qemu: PathBuf,
    pub device: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
    pub run_dir: PathBuf,
    pub accel: Accel,
    pub timeout: Duration,
    /// Kernel command-line words for init (`zg.run=...`, `zg.filter=...`).
    pub init_args: Vec<String>,
    /// How much of the serial console to show while the guest runs.
    pub echo: Echo,
    /// Connect QEMU's serial to this terminal instead of parsing it (interactive shell).
    pub interactive: bool,
    /// Harness self-test: SIGKILL the device when a serial line contains this text.
    pub kill_device_on: Option<&'static str>,
    /// The device is meant to die during the run (the device-death boot): keep the guest
    /// running when it does, so that the driver's handling of a vanished device is tested.
    pub device_may_die: bool,
}

/// How much of the guest console reaches the terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// Every line (a person watching `just run`).
    Console,
    /// Test results, their diagnostics and kernel splats (`just test`).
    Results,
    /// Nothing (harness self-tests, which fail on purpose).
    Silent,
}

/// How QEMU executes the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` is usable for normal guests; TCG otherwise. `kvm_pvm` (a PVM nested
    /// hypervisor) accepts normal guests and then hangs them in the decompressor, so it counts as
    /// unusable. `ZAPGUARD_ACCEL=kvm|tcg` overrides the detection.
    pub fn detect() -> (Accel, &'static str) {
        match std::env::var("ZAPGUARD_ACCEL").as_deref() {
            Ok("kvm") => return (Accel::Kvm, "ZAPGUARD_ACCEL=kvm"),
            Ok("tcg") => return (Accel::Tcg, "ZAPGUARD_ACCEL=tcg"),
            _ => {}
        }
        if Path::new("/sys/module/kvm_pvm").exists() {
            return (
                Accel::Tcg,
                "/dev/kvm is PVM (kvm_pvm), which hangs normal guests",
            );
        }
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Ok(_) => (Accel::Kvm, "/dev/kvm usable"),
            Err(_) => (Accel::Tcg, "no usable /dev/kvm"),
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => &["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }
}

/// What came out of a run.
#[derive(Debug, Default)]
pub struct VmOutcome {
    pub results: Vec<TestLine>,
    /// The guest suite's top-level KTAP plan (`1..N`), and how many top-level results it printed
    /// (nested suites, such as the kernel's hmm-tests, have their own).
    pub plan: Option<usize>,
    pub top_level_results: usize,
    pub splats: Vec<String>,
    pub tests_end_rc: Option<i32>,
    pub done_rc: Option<i32>,
    /// `ZAPGUARD-BENCH` records (JSON) printed by the guest benchmarks.
    pub bench: Vec<String>,
    /// Violations the guest's injected-bug tests caused, if the suite reported them.
    pub expected_violations: Option<u64>,
    /// Device accesses the guest expects in the trace (`ZAPGUARD-TRACE-EXPECT` lines), and the
    /// malformed such lines (a failed check, not a silently weaker one).
    pub trace_expectations: Vec<ktap::AccessExpectation>,
    pub bad_trace_expectations: Vec<String>,
    /// The injected-bug tests' expectation windows (`ZAPGUARD-EXPECT-WINDOW` lines; malformed
    /// ones go with the malformed trace expectations).
    pub violation_windows: Vec<ktap::ViolationWindow>,
    pub timed_out: bool,
    pub qemu_status: Option<ExitStatus>,
    pub device_died_early: bool,
    pub device_status: Option<ExitStatus>,
    pub serial_log: PathBuf,
    pub trace: PathBuf,
    pub device_log: PathBuf,
    pub qemu_log: PathBuf,
    /// Lines of announced OOM-killer reports are not splats.
    pub oom: ktap::OomWindow,
    /// The guest's init has started (its first line was seen): zapguard can be loaded only
    /// from then on.
    pub init_started: bool,
    /// Of [`Self::splats`], those printed before init started.
    pub splats_before_init: usize,
}

/// The guest init's first line.
const INIT_STARTS: &str = "zapguard-init: kernel ";

impl VmOutcome {
    /// Every splat came before init started: the kernel's own boot, with zapguard not loaded
    /// (CI once saw KASAN flag an interrupt taken during `identify_cpu`, 4 ms into boot).
    pub fn only_boot_splats(&self) -> bool {
        !self.splats.is_empty() && self.splats_before_init == self.splats.len()
    }
}

/// Guest RAM: node 0 (both CPUs) and node 1 (memory only), the sum.
const NODE0_RAM: &str = "512M";
const NODE1_RAM: &str = "256M";
const GUEST_RAM: &str = "768M";
/// Prefix of a benchmark record on the console (see guest-tests/src/bench.rs).
const BENCH_MARK: &str = "ZAPGUARD-BENCH ";
const LOG_CAP: u64 = 4 << 20;

/// Copies `from` into `to`, stopping (but still draining) after [`LOG_CAP`] bytes.
fn capped_copy(mut from: impl Read + Send + 'static, path: PathBuf) {
    std::thread::spawn(move || {
        let Ok(mut to) = File::create(&path) else {
            return;
        };
        let mut buf = [0u8; 8192];
        let mut written = 0u64;
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            if written < LOG_CAP {
                let _ = to.write_all(&buf[..n]);
                written += n as u64;
                if written >= LOG_CAP {
                    let _ = writeln!(to, "\n[xtask: log capped at {LOG_CAP} bytes]");
                }
            }
        }
    });
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill(child: &mut Child) -> Option<ExitStatus> {
    let _ = child.kill();
    child.wait().ok()
}

fn start_device(cfg: &VmConfig, socket: &Path, out: &mut VmOutcome) -> std::io::Result<Child> {
    let _ = std::fs::remove_file(socket);
    let log = File::create(&out.device_log)?;
    let mut dev = Command::new(&cfg.device)
        .arg("--socket")
        .arg(socket)
        .arg("--trace")
        .arg(&out.trace)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let end = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(s)) = dev.try_wait() {
            return Err(std::io::Error::other(format!(
                "zapguard-dev exited ({s}) before listening; see {}",
                out.device_log.display()
            )));
        }
        if Instant::now() > end {
            kill(&mut dev);
            return Err(std::io::Error::other(
                "zapguard-dev did not create its socket within 10 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(dev)
}

fn qemu_command(cfg: &VmConfig, socket: &Path) -> Command {
    let mut c = Command::new(&cfg.qemu);
    c.args(cfg.accel.args()).args(machine_args(
        &cfg.bzimage.to_string_lossy(),
        &cfg.initramfs.to_string_lossy(),
        &cfg.init_args,
        &socket.to_string_lossy(),
    ));
    c
}

/// QEMU's arguments after the accelerator's: the machine, its memory, the console, the kernel
/// and its command line (`init_args` for init), and the device at `socket`. `just image`'s run
/// script is rendered from the same list.
pub fn machine_args(
    bzimage: &str,
    initramfs: &str,
    init_args: &[String],
    socket: &str,
) -> Vec<String> {
    // hugepages=: 2 MiB hugetlbfs pages reserved at boot, before memory fragments (hmm-tests'
    // hugetlbfs tests and the guest suite's need one or two at a time).
    // kunit.filter_glob=: the doctests KUnit runs at boot, those of the files the abstraction
    // patches add to or change (hmm, mm, mm/mmu_notifier, workqueue; see guest-tests'
    // doctests.rs), not the whole `kernel` crate's.
    let mut append = String::from(
        "console=ttyS0 panic=-1 oops=panic hugepages=8 \
         kunit.filter_glob=rust_doctests_kernel.rust_doctest_kernel_[hmw][mo]*",
    );
    for a in init_args {
        append.push(' ');
        append.push_str(a);
    }
    let device =
        format!(r#"{{"driver":"vfio-user-pci","socket":{{"path":"{socket}","type":"unix"}}}}"#);
    [
        // The device maps guest RAM from the memfds QEMU passes in DMA_MAP: they must be
        // shared, or the device's view silently diverges from the guest's. Two NUMA nodes, each
        // its own memfd: node 1 has memory and no CPU, so nothing lands there unless a test
        // moves it (the NUMA migration tests).
        "-object",
        &format!("memory-backend-memfd,id=mem0,size={NODE0_RAM},share=on"),
        "-object",
        &format!("memory-backend-memfd,id=mem1,size={NODE1_RAM},share=on"),
        "-numa",
        "node,nodeid=0,cpus=0-1,memdev=mem0",
        "-numa",
        "node,nodeid=1,memdev=mem1",
        "-machine",
        "q35",
        "-m",
        GUEST_RAM,
        "-smp",
        "2",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-nodefaults",
        "-chardev",
        "stdio,id=con,signal=off",
        "-serial",
        "chardev:con",
        "-kernel",
        bzimage,
        "-initrd",
        initramfs,
        "-append",
        &append,
        "-device",
        &device,
    ]
    .map(String::from)
    .to_vec()
}

/// Boots the guest and collects everything; `Err` only for failures to even start.
pub fn run(cfg: &VmConfig) -> std::io::Result<VmOutcome> {
    std::fs::create_dir_all(&cfg.run_dir)?;
    let mut out = VmOutcome {
        serial_log: cfg.run_dir.join("serial.log"),
        trace: cfg.run_dir.join("trace.zgt"),
        device_log: cfg.run_dir.join("device.log"),
        qemu_log: cfg.run_dir.join("qemu.log"),
        ..Default::default()
    };
    // Unix socket paths are limited to 108 bytes: keep it short and private to this run.
    let sock_dir = std::env::temp_dir().join(format!("zapguard-{}", std::process::id()));
    std::fs::create_dir_all(&sock_dir)?;
    let socket = sock_dir.join("dev.sock");

    let mut dev = start_device(cfg, &socket, &mut out)?;
    let mut cmd = qemu_command(cfg, &socket);
    let mut qemu = if cfg.interactive {
        cmd.stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
    } else {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    }
    .inspect_err(|_| {
        kill(&mut dev);
    })?;

    if cfg.interactive {
        out.qemu_status = qemu.wait().ok();
    } else {
        collect(cfg, &mut qemu, &mut dev, &mut out)?;
    }
    // QEMU is gone: the device sees the disconnect and must exit on its own.
    out.device_status = wait_timeout(&mut dev, Duration::from_secs(5));
    if out.device_status.is_none() {
        kill(&mut dev);
    }
    let _ = std::fs::remove_dir_all(&sock_dir);
    Ok(out)
}

fn collect(
    cfg: &VmConfig,
    qemu: &mut Child,
    dev: &mut Child,
    out: &mut VmOutcome,
) -> std::io::Result<()> {
    if let Some(err) = qemu.stderr.take() {
        capped_copy(err, out.qemu_log.clone());
    }
    let (tx, rx) = mpsc::channel::<String>();
    if let Some(stdout) = qemu.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let mut serial = File::create(&out.serial_log)?;
    let mut serial_bytes = 0u64;
    let deadline = Instant::now() + cfg.timeout;
    let mut in_tests = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if serial_bytes < LOG_CAP {
                    serial_bytes += line.len() as u64 + 1;
                    writeln!(serial, "{line}")?;
                }
                handle_line(&line, cfg.echo, &mut in_tests, out);
                if cfg.kill_device_on.is_some_and(|k| line.contains(k)) {
                    let _ = dev.kill();
                }
            }
            // QEMU closed its stdout: it exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if !out.device_died_early {
            if let Ok(Some(s)) = dev.try_wait() {
                out.device_died_early = true;
                out.device_status = Some(s);
                // A dead server makes QEMU log every guest access: stop the guest now, unless
                // this run is about the guest surviving it.
                if !cfg.device_may_die {
                    if cfg.echo != Echo::Silent {
                        eprintln!(
                            "xtask: zapguard-dev exited ({s}) while the guest ran; stopping QEMU"
                        );
                    }
                    kill(qemu);
                }
            }
        }
        if Instant::now() >= deadline {
            out.timed_out = true;
            if cfg.echo != Echo::Silent {
                let secs = cfg.timeout.as_secs();
                eprintln!("xtask: guest did not finish within {secs} s; killing QEMU");
            }
            kill(qemu);
            // Keep draining what was already printed; the reader ends when the pipe closes.
        }
    }
    out.qemu_status = wait_timeout(qemu, Duration::from_secs(10)).or_else(|| kill(qemu));
    Ok(())
}

/// [`handle_line`] without echo: what a run records of one console line (for tests).
#[cfg(test)]
pub fn feed_line(line: &str, in_tests: &mut bool, out: &mut VmOutcome) {
    handle_line(line, Echo::Silent, in_tests, out);
}

fn handle_line(line: &str, echo: Echo, in_tests: &mut bool, out: &mut VmOutcome) {
    let announced_oom = out.oom.expected(line);
    if line.contains(INIT_STARTS) {
        out.init_started = true;
    }
    if let Some(p) = ktap::splat(line).filter(|_| !announced_oom) {
        out.splats.push(line.to_string());
        if !out.init_started {
            out.splats_before_init += 1;
        }
        if echo == Echo::Results {
            eprintln!("xtask: kernel splat ({p}): {line}");
        }
    }
    if line.contains(ktap::TESTS_BEGIN) {
        *in_tests = true;
    } else if let Some(rc) = ktap::marker_rc(line, ktap::TESTS_END) {
        *in_tests = false;
        out.tests_end_rc = Some(rc);
    } else if let Some(rc) = ktap::marker_rc(line, ktap::DONE) {
        out.done_rc = Some(rc);
    } else if let Some(n) = ktap::expected_violations(line) {
        out.expected_violations = Some(n);
    } else if line.contains(ktap::WINDOW_EXPECT) {
        match ktap::violation_window(line) {
            Some(w) => out.violation_windows.push(w),
            None => out.bad_trace_expectations.push(line.to_string()),
        }
    } else if line.contains(ktap::TRACE_EXPECT) {
        match ktap::trace_expectation(line) {
            Some(e) => out.trace_expectations.push(e),
            None => out.bad_trace_expectations.push(line.to_string()),
        }
    } else if let Some(at) = line.find(BENCH_MARK) {
        out.bench
            .push(line[at + BENCH_MARK.len()..].trim().to_string());
    }
    let result = if *in_tests {
        ktap::parse_result(line)
    } else {
        None
    };
    if *in_tests {
        if let Some(n) = ktap::plan(line) {
            out.plan = Some(n);
        }
        if result.is_some() && !line.starts_with(' ') {
            out.top_level_results += 1;
        }
    }
    match echo {
        Echo::Console => println!("  | {line}"),
        Echo::Results => {
            if let Some(r) = &result {
                let tag = match r.outcome {
                    Outcome::Pass => "ok     ",
                    Outcome::Fail => "FAILED ",
                    Outcome::Skip => "skipped",
                };
                println!("  guest {tag} {}", r.name);
            } else if *in_tests
                && line.trim_start().starts_with("# ")
                && !line.starts_with("# guest:")
            {
                println!("        {line}");
            }
        }
        Echo::Silent => {}
    }
    if let Some(r) = result {
        out.results.push(r);
    }
}
