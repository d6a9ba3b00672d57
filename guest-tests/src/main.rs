//! zapguard guest tests: run by the guest's init inside the VM, they drive `/dev/zapguard` and
//! report KTAP on stdout (which is the serial console). The host harness parses the `ok`/`not ok`
//! lines and sums them with the host tests.
//!
//! Usage: `zapguard-guest-tests [FILTER]` — runs the tests whose name contains FILTER;
//! `zapguard-guest-tests --bench [--smoke] [NAME]` — runs the benchmarks (those whose name
//! contains NAME; see `bench.rs`).
//!
//! To add a test: write a `fn name() -> Result<(), String>` below and add `name` to [`TESTS`].
//! Tests run in list order; the module-reload test runs last because it rebinds the device. The
//! uAPI fuzzer (`uapi_fuzz`, `fuzz/`) runs before the injected-bug tests and the device-failure
//! cases: it needs a device nobody has broken, and no violation may appear while it runs.

mod bench;
mod bounds;
mod churn;
mod dev;
mod dmirror;
mod doctests;
mod failsafe;
mod fuzz;
mod hmm;
mod ktap;
mod mirror;
mod numa;
mod patch_doctests;
mod proc;
mod reaper;
mod safety;
mod stability;
mod uffd;
mod upstream;

use bench::bench_smoke;
use bounds::*;
use churn::*;
use doctests::kernel_abstraction_doctests_pass;
use failsafe::*;
use fuzz::uapi_fuzz;
use hmm::*;
use mirror::*;
use numa::*;
use reaper::*;
use safety::*;
use stability::*;
use uffd::*;
use upstream::*;

use ktap::{check_eq, Test};
use shared_regs::{regs, uapi};
use std::path::Path;
use std::process::Command;

const TESTS: &[Test] = ktap::tests![
    dev_node_exists,
    get_info_identity,
    get_info_bad_pointer_efault,
    unknown_ioctl_enotty,
    wrong_size_ioctl_enotty,
    uapi_size_out_of_bounds_is_refused,
    uapi_larger_struct_with_zero_tail_is_accepted,
    uapi_answers_stop_at_the_callers_size_and_pads_are_checked,
    stats_count_the_steps_the_device_judged_per_context,
    test_surface_only_in_the_test_build,
    kernel_abstraction_doctests_pass,
    many_opens,
    pci_driver_bound,
    test_hmm_dmirror_present,
    rmmod_refused_while_open,
    mirror_read_write_copy,
    munmap_shoots_down,
    madvise_dontneed_refaults_new_page,
    mprotect_readonly_refuses_device_writes,
    map_walks_ask_only_for_the_maps_access,
    mprotect_none_takes_device_reads_away,
    fork_cow_keeps_child_private,
    fork_write_protects_instead_of_zapping,
    thp_mirrored_with_huge_entries,
    exit_mid_job_is_safe,
    bad_input_errors,
    foreign_mm_gets_eperm,
    released_context_gets_einval,
    hmm_prot_none_read_efault,
    hmm_write_readonly_eperm_then_rw,
    hmm_shared_fork_parent_sees_child,
    hmm_private_fork_child_writes_parent_unchanged,
    hmm_file_tmpfs_read_write,
    hmm_file_o_tmpfile_read_write,
    hmm_repeated_reads_fault_once,
    hmm_two_contexts_same_memory,
    hmm_snapshot_mixed_range,
    hmm_mremap_moves_the_mirror,
    hmm_mremap_fixed_and_dontunmap,
    side_by_side_anon_read,
    side_by_side_anon_write,
    side_by_side_prot_none_and_readonly,
    hugetlbfs_mirrored,
    ksm_merge_while_mirrored,
    thp_split_by_mprotect_then_collapse,
    sigkill_mid_job_is_safe,
    process_mrelease_mid_job_is_safe,
    race_munmap_during_dma,
    race_madvise_dontneed_during_dma,
    race_madvise_free_during_dma,
    race_mprotect_during_dma_writes,
    race_fork_during_dma_writes,
    race_many_threads_map_unmap_submit,
    processes_are_isolated,
    compaction_while_mirrored,
    numa_migration_follows_pages,
    numa_migration_moves_thp,
    numa_migration_during_dma,
    aging_reports_device_use_to_idle_tracking,
    aging_never_waits_for_the_device,
    pt_pages_bounded_and_reclaimed,
    uffd_device_faults_served_by_handler,
    uffd_held_fault_blocks_only_its_context,
    uffd_unanswered_fault_aborts_only_its_job,
    uffd_held_user_copy_blocks_only_its_context,
    fault_service_retries_are_bounded,
    aborted_fault_service_stops_walking,
    device_writes_survive_madv_free_and_pageout,
    device_writes_survive_swap_cache_reclaim,
    device_writes_reach_an_ext2_file_through_writeback,
    device_writes_to_a_split_thp_survive_reclaim,
    write_fault_breaks_cow_only_on_the_written_page,
    map_private_file_pages_follow_the_file_after_a_device_write,
    stalled_fault_costs_only_its_own_context,
    rmmod_waits_for_a_held_fault,
    user_pages_are_dma_mapped_while_the_device_maps_them,
    unbind_frees_dma_memory_while_files_stay_open,
    hmm_compat_node_reads_snapshots_and_refuses,
    c_example_through_zapguard_h,
    c_example_built_against_uapi_1_0,
    upstream_hmm_tests_test_hmm,
    upstream_hmm_tests_zapguard,
    uapi_fuzz,
    cmd_lag_with_sync_wait_is_clean,
    inject_skip_shootdown_is_caught,
    inject_skip_shootdown_mid_step_is_caught,
    inject_keep_write_is_caught,
    inject_keep_write_after_fork_is_caught,
    inject_skip_sync_wait_is_caught,
    populate_lag_with_invalidation_is_clean,
    inject_ignore_retry_is_caught,
    inject_keep_after_release_is_caught,
    inject_skip_ctx_invalidate_is_caught,
    a_panicking_fork_child_ends_in_the_child,
    killed_readers_bounce_buffer_is_not_reused_early,
    inject_early_bounce_reuse_is_caught,
    walk_lag_with_late_table_free_is_clean,
    inject_early_table_free_is_caught,
    bench_smoke,
    validator_totals_match_injections,
    oom_killer_picks_mirroring_process,
    fail_cmdq_stop_munmap_during_dma,
    fail_cmdq_stop_exit_during_dma,
    fail_cmdq_stop_unbind_during_dma,
    fail_sync_delay_munmap_during_dma,
    fail_sync_delay_exit_during_dma,
    fail_sync_delay_unbind_during_dma,
    fail_cmdq_error_munmap_during_dma,
    fail_cmdq_error_exit_during_dma,
    fail_cmdq_error_unbind_during_dma,
    fail_drop_msi_munmap_during_dma,
    fail_drop_msi_exit_during_dma,
    fail_drop_msi_unbind_during_dma,
    fail_dma_hang_munmap_during_dma,
    fail_dma_hang_exit_during_dma,
    fail_dma_hang_unbind_during_dma,
    device_dies_mid_dma,
    unbind_and_rmmod_under_load,
    unbind_with_open_file_enodev,
    failed_probe_leaves_the_device_quiesced,
    module_reload_rebinds,
];

/// Where init puts the modules (see images/initramfs/init).
const MODULE_DIR: &str = "/lib/modules";

fn dev_node_exists() -> Result<(), String> {
    let meta = std::fs::metadata(dev::DEV_PATH).map_err(|e| format!("{}: {e}", dev::DEV_PATH))?;
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_char_device() {
        return Err(format!("{} is not a character device", dev::DEV_PATH));
    }
    Ok(())
}

fn get_info_identity() -> Result<(), String> {
    let f = dev::open().map_err(|e| format!("open: {e}"))?;
    let info = dev::get_info(&f).map_err(|e| format!("GET_INFO: {e}"))?;
    println!("# get_info: {info:x?}");
    check_eq(info.uapi_version, uapi::UAPI_VERSION, "uapi_version")?;
    check_eq(info.ident, regs::IDENT_MAGIC, "device IDENT register")?;
    check_eq(
        regs::version_major(info.version),
        regs::VERSION_MAJOR,
        "device major version",
    )?;
    check_eq(
        info.caps & regs::CAPS_VALUE,
        regs::CAPS_VALUE,
        "capability bits",
    )?;
    if info.iotlb_entries == 0 || info.asid_count == 0 {
        return Err(format!("device parameters zero: {info:?}"));
    }
    if info.irq_vectors == 0 {
        return Err("driver reports no interrupt vectors".into());
    }
    check_eq(
        info.size as usize,
        std::mem::size_of::<uapi::ZgInfo>(),
        "size in the answer (the caller's)",
    )?;
    // Probe proved the device's queues end to end: a SYNC completed into driver memory by DMA
    // and its MSI-X interrupt reached the driver.
    if info.probe_sync_ns == 0 {
        return Err("probe did not measure a SYNC round trip".into());
    }
    if info.irq_count[0] == 0 {
        return Err(format!(
            "no command-vector interrupt seen: {:?}",
            info.irq_count
        ));
    }
    println!(
        "# probe SYNC round trip: {} us, interrupts per vector {:?}",
        info.probe_sync_ns / 1000,
        info.irq_count
    );
    Ok(())
}

fn get_info_bad_pointer_efault() -> Result<(), String> {
    let f = dev::open().map_err(|e| format!("open: {e}"))?;
    for bad in [0usize, 1, usize::MAX - 8, 0xffff_8000_0000_0000] {
        match dev::ioctl_raw(&f, uapi::ZG_IOC_GET_INFO, bad) {
            Ok(r) => return Err(format!("GET_INFO to {bad:#x} succeeded ({r})")),
            Err(e) => check_eq(
                dev::errno(&e),
                libc::EFAULT,
                &format!("errno for pointer {bad:#x}"),
            )?,
        }
    }
    Ok(())
}

fn unknown_ioctl_enotty() -> Result<(), String> {
    let f = dev::open().map_err(|e| format!("open: {e}"))?;
    let mut buf = [0u8; 64];
    let cmd = uapi::ioc(uapi::IOC_READ, uapi::ZG_IOC_MAGIC, 0xee, buf.len());
    match dev::ioctl_raw(&f, cmd, buf.as_mut_ptr() as usize) {
        Ok(r) => Err(format!("unknown ioctl {cmd:#x} succeeded ({r})")),
        Err(e) => check_eq(dev::errno(&e), libc::ENOTTY, "errno"),
    }
}

/// GET_INFO's number with another size field is another ioctl: the driver must not accept it.
fn wrong_size_ioctl_enotty() -> Result<(), String> {
    let f = dev::open().map_err(|e| format!("open: {e}"))?;
    let mut buf = [0u8; 128];
    let cmd = uapi::ioc(uapi::IOC_READ, uapi::ZG_IOC_MAGIC, 0x00, 32);
    match dev::ioctl_raw(&f, cmd, buf.as_mut_ptr() as usize) {
        Ok(r) => Err(format!("GET_INFO with size 32 succeeded ({r})")),
        Err(e) => check_eq(dev::errno(&e), libc::ENOTTY, "errno"),
    }
}

/// Contexts a process may hold (the driver's `max_contexts` parameter default).
const MAX_CONTEXTS: usize = 4;

/// A process may open up to `max_contexts` contexts; the next open gets `EBUSY` (so that one
/// process cannot take every ASID), and closing one makes room again.
fn many_opens() -> Result<(), String> {
    let mut files: Vec<_> = (0..MAX_CONTEXTS)
        .map(|_| dev::open())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("open: {e}"))?;
    for f in &files {
        let info = dev::get_info(f).map_err(|e| format!("GET_INFO: {e}"))?;
        check_eq(
            info.ident,
            regs::IDENT_MAGIC,
            "IDENT through one of many files",
        )?;
    }
    match dev::open() {
        Ok(_) => return Err(format!("open #{} succeeded", MAX_CONTEXTS + 1)),
        Err(e) => check_eq(dev::errno(&e), libc::EBUSY, "errno of one open too many")?,
    }
    files.pop();
    files.push(dev::open().map_err(|e| format!("open after a close: {e}"))?);
    Ok(())
}

const DRIVER_DIR: &str = "/sys/bus/pci/drivers/zapguard";

/// PCI addresses (`0000:00:01.0`) of the devices bound to the zapguard driver.
/// How much slower than the default kernel this guest kernel runs the suite, from the harness's
/// `zg.flavor=` word: 1 on the default kernel, 2 on the lock-debugging and KASAN kernels (135 s
/// and 154 s against 90 s for the suite), 3 on KCSAN. Fixed time bounds are scaled by it.
pub(crate) fn time_scale() -> u32 {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let flavor = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("zg.flavor="))
        .unwrap_or("default");
    match flavor {
        "debug" | "kasan" => 2,
        "kcsan" => 3,
        _ => 1,
    }
}

/// Why a test skips on the production module (the harness's expected-skip list accepts exactly
/// this reason in the `production` run).
pub(crate) const NEEDS_TEST_BUILD: &str = "needs the test build (ZAPGUARD_TEST=1)";

/// Whether the harness loaded the production module (`zg.build=production` on the kernel
/// command line): no debugfs `inject` files, no knobs, no validator plumbing.
pub(crate) fn production() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .split_whitespace()
        .any(|w| w == "zg.build=production")
}

/// `Ok` on the test build; on the production module, the skip of a test that injects bugs,
/// sets device knobs or counts on the validator. Called first thing by each such test.
pub(crate) fn test_build() -> Result<(), String> {
    if production() {
        return Err(ktap::skip(NEEDS_TEST_BUILD));
    }
    Ok(())
}

/// `d` scaled by [`time_scale`].
pub(crate) fn scaled(d: std::time::Duration) -> std::time::Duration {
    d * time_scale()
}

pub(crate) fn bound_devices() -> Result<Vec<String>, String> {
    Ok(std::fs::read_dir(DRIVER_DIR)
        .map_err(|e| format!("{DRIVER_DIR}: {e}"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(':'))
        .collect())
}

fn pci_driver_bound() -> Result<(), String> {
    let bound = bound_devices()?;
    check_eq(bound.len(), 1, "devices bound to the zapguard driver")?;
    let dev = Path::new(DRIVER_DIR).join(&bound[0]);
    let read = |attr: &str| {
        std::fs::read_to_string(dev.join(attr))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    check_eq(
        read("vendor"),
        format!("{:#06x}", shared_regs::pci::VENDOR_ID),
        "vendor",
    )?;
    check_eq(
        read("device"),
        format!("{:#06x}", shared_regs::pci::DEVICE_ID),
        "device",
    )?;
    // The driver uses MSI-X: the PCI core lists the allocated vectors here.
    let msi = std::fs::read_dir(dev.join("msi_irqs"))
        .map(|d| d.count())
        .unwrap_or(0);
    if msi == 0 {
        return Err("no MSI/MSI-X vectors allocated (msi_irqs empty)".into());
    }
    Ok(())
}

fn test_hmm_dmirror_present() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/hmm_dmirror0")
        .map(drop)
        .map_err(|e| format!("/dev/hmm_dmirror0: {e} (is test_hmm.ko loaded?)"))
}

fn run_cmd(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// The C example (`examples/zg-example.c`, built against the generated `zapguard.h` only) runs a
/// device copy and checksum, a munmap and STATS, and says `ok`.
fn c_example_through_zapguard_h() -> Result<(), String> {
    run_c_example("/bin/zg-example")
}

/// The same example built against the frozen uAPI 1.0 header
/// (`shared-regs/include/frozen/uapi-1.0/zapguard.h`, never edited): what a program built when
/// 1.0 shipped does against this driver.
fn c_example_built_against_uapi_1_0() -> Result<(), String> {
    run_c_example("/bin/zg-example.uapi-1.0")
}

fn run_c_example(bin: &str) -> Result<(), String> {
    let out = Command::new(bin)
        .arg("32")
        .output()
        .map_err(|e| format!("{bin}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        println!("# {line}");
    }
    if !out.status.success() || !stdout.contains("zg-example: ok") {
        return Err(format!(
            "zg-example: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// An open file pins the module: rmmod must fail and leave the file working.
fn rmmod_refused_while_open() -> Result<(), String> {
    let f = dev::open().map_err(|e| format!("open: {e}"))?;
    if run_cmd("rmmod", &["zapguard"]).is_ok() {
        return Err("rmmod succeeded with /dev/zapguard open".into());
    }
    let info = dev::get_info(&f).map_err(|e| format!("GET_INFO after refused rmmod: {e}"))?;
    check_eq(info.ident, regs::IDENT_MAGIC, "IDENT after refused rmmod")
}

/// Unbinding the device under an open file revokes the file's access to the device (ENODEV),
/// never leaves it touching an unmapped BAR; rebinding brings a working device back.
fn unbind_with_open_file_enodev() -> Result<(), String> {
    let bdf = bound_devices()?
        .into_iter()
        .next()
        .ok_or("no bound device")?;
    let f = dev::open().map_err(|e| format!("open: {e}"))?;
    std::fs::write(format!("{DRIVER_DIR}/unbind"), &bdf)
        .map_err(|e| format!("unbind {bdf}: {e}"))?;
    let res = match dev::get_info(&f) {
        Ok(i) => Err(format!("GET_INFO after unbind succeeded: {i:x?}")),
        Err(e) => check_eq(dev::errno(&e), libc::ENODEV, "errno after unbind"),
    };
    let gone = !Path::new(dev::DEV_PATH).exists();
    drop(f);
    std::fs::write(format!("{DRIVER_DIR}/bind"), &bdf).map_err(|e| format!("rebind {bdf}: {e}"))?;
    res?;
    if !gone {
        return Err(format!("{} still present after unbind", dev::DEV_PATH));
    }
    let f = dev::open().map_err(|e| format!("open after rebind: {e}"))?;
    let info = dev::get_info(&f).map_err(|e| format!("GET_INFO after rebind: {e}"))?;
    check_eq(info.ident, regs::IDENT_MAGIC, "IDENT after rebind")
}

/// `CR0ACK` of the device at `bdf`, read through its BAR0 in sysfs (no driver needed).
fn cr0ack_through_sysfs(bdf: &str) -> Result<u32, String> {
    Ok(dev::Bar0::map(bdf)?.read32(regs::CR0ACK))
}

/// A probe that fails once the device is enabled (a second device always does: the misc
/// names are fixed) quiesces the device before its DMA memory is freed: `CR0ACK` reads 0
/// afterwards (it reads the enabled units while the driver is bound). Both places the probe
/// can fail with the device enabled, injected by a test build (`probe_fail_at`); then a normal
/// load works again.
fn failed_probe_leaves_the_device_quiesced() -> Result<(), String> {
    crate::test_build()?;
    let bdf = bound_devices()?
        .into_iter()
        .next()
        .ok_or("no bound device")?;
    let running = cr0ack_through_sysfs(&bdf)?;
    if running == 0 || running == u32::MAX {
        return Err(format!(
            "CR0ACK of the bound device reads {running:#x}: the sysfs read proves nothing"
        ));
    }
    let outcome = (|| {
        for step in [1, 2] {
            failsafe::reload(&[&format!("probe_fail_at={step}")])?;
            let bound = bound_devices()?;
            if !bound.is_empty() {
                return Err(format!(
                    "probe_fail_at={step}: the probe succeeded: {bound:?}"
                ));
            }
            check_eq(
                cr0ack_through_sysfs(&bdf)?,
                0,
                &format!("CR0ACK after a probe failed at step {step} (enabled: {running:#x})"),
            )?;
        }
        Ok(())
    })();
    let restored = failsafe::reload(&[]);
    outcome?;
    restored?;
    let f = dev::open().map_err(|e| format!("open after reload: {e}"))?;
    let info = dev::get_info(&f).map_err(|e| format!("GET_INFO after reload: {e}"))?;
    check_eq(info.ident, regs::IDENT_MAGIC, "IDENT after reload")
}

/// rmmod must unbind cleanly with no file open, and insmod must probe the device again.
fn module_reload_rebinds() -> Result<(), String> {
    run_cmd("rmmod", &["zapguard"])?;
    if Path::new(dev::DEV_PATH).exists() {
        return Err(format!("{} still exists after rmmod", dev::DEV_PATH));
    }
    if Path::new("/sys/bus/pci/drivers/zapguard").exists() {
        return Err("driver still registered after rmmod".into());
    }
    failsafe::reload(&[])?;
    let f = dev::open().map_err(|e| format!("open after reload: {e}"))?;
    let info = dev::get_info(&f).map_err(|e| format!("GET_INFO after reload: {e}"))?;
    check_eq(info.ident, regs::IDENT_MAGIC, "IDENT after reload")
}

/// On a crash of the runner (SIGSEGV, SIGBUS), prints the faulting address and the process's
/// memory map to stderr before dying as the signal would: a vanished mapping, or a device write
/// into the runner's memory, then shows where. Only async-signal-safe calls.
extern "C" fn dump_maps_on_crash(sig: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: `info` is the kernel's siginfo for this signal; the rest are plain syscalls on a
    // stack buffer; then the default action is restored and the signal raised again.
    unsafe {
        let addr = (*info).si_addr() as usize;
        let mut line = [0u8; 64];
        let msg = format_hex(b"# runner crashed, address 0x", addr, &mut line);
        libc::write(2, msg.as_ptr().cast(), msg.len());
        let fd = libc::open(c"/proc/self/maps".as_ptr(), libc::O_RDONLY);
        let mut buf = [0u8; 4096];
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                break;
            }
            libc::write(2, buf.as_ptr().cast(), n as usize);
        }
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// `prefix` and `v` in hex and a newline, in `out` (no allocation: for a signal handler).
fn format_hex<'a>(prefix: &[u8], v: usize, out: &'a mut [u8; 64]) -> &'a [u8] {
    let mut n = prefix.len();
    out[..n].copy_from_slice(prefix);
    for shift in (0..16).rev() {
        out[n] = b"0123456789abcdef"[(v >> (shift * 4)) & 0xf];
        n += 1;
    }
    out[n] = b'\n';
    &out[..=n]
}

fn install_crash_dump() {
    for sig in [libc::SIGSEGV, libc::SIGBUS] {
        // SAFETY: installing a handler that only makes async-signal-safe calls.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = dump_maps_on_crash as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn main() {
    install_crash_dump();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--bench") {
        let smoke = args.iter().any(|a| a == "--smoke");
        let sizes = if smoke {
            bench::Sizes::smoke()
        } else {
            bench::Sizes::full()
        };
        let only = args[1..].iter().find(|a| !a.starts_with("--")).cloned();
        match bench::run(&sizes, only.as_deref()) {
            Ok(_) => std::process::exit(0),
            Err(e) => {
                println!("ZAPGUARD-BENCH-ERROR {e}");
                std::process::exit(1);
            }
        }
    }
    let filter = args.first().cloned();
    let mut out = std::io::stdout().lock();
    let res = ktap::run(TESTS, filter.as_deref(), &mut out);
    // Again at the end (the last one counts): a filtered run of injected-bug tests skips
    // `validator_totals_match_injections`, and the host still checks the trace against it.
    let expected = mirror::INJECTED_VIOLATIONS.load(std::sync::atomic::Ordering::Relaxed);
    println!("ZAPGUARD-EXPECTED-VIOLATIONS {expected}");
    match res {
        Ok(sum) => std::process::exit(if sum.failed == 0 { 0 } else { 1 }),
        Err(e) => {
            eprintln!("zapguard-guest-tests: cannot write results: {e}");
            std::process::exit(2);
        }
    }
}
