//! When the device fails: for each injected device failure mode, an mm event (munmap, process
//! exit) or an unbind during DMA must complete within the driver's SYNC timeout plus the fence
//! bound, never free a page the device still uses (the validator and the harness's trace check
//! stay at zero unexpected violations), and leave users with `EIO` (`ENODEV` after unbind) and
//! no hang. Each case reloads the driver with short timeouts first, and again afterwards, which
//! resets the device (and proves rmmod works after a failure, with no leak report).

use crate::dev::{self, Mapping};
use crate::ktap::check_eq;
use crate::mirror::{map, open, stats};
use crate::proc::fork_wait;
use crate::DRIVER_DIR;
use shared_regs::dma::DMA_CHECKSUM;
use shared_regs::regs::*;
use shared_regs::testing::ZgInject;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The driver's SYNC timeout in these tests (`sync_timeout_ms`).
const SYNC_TIMEOUT_MS: u64 = 1000;
/// The longest an mm event may take once the device stopped answering: the SYNC timeout, the
/// fence (~20 ms of CR0ACK polls), and slack for a loaded TCG guest (scaled per kernel flavor).
fn failed_event_bound() -> Duration {
    Duration::from_millis(SYNC_TIMEOUT_MS) + crate::scaled(Duration::from_millis(1500))
}
/// The longest an invalidation may take once the device is fenced (scaled per kernel flavor).
fn fenced_event_bound() -> Duration {
    crate::scaled(Duration::from_millis(300))
}
/// Bytes each job reads: long enough that a failure lands in the middle of one.
const JOB_LEN: usize = 8 << 20;

const MODULE: &str = "/lib/modules/zapguard.ko";

/// What users see once the event is over.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    /// The device failed and was fenced: `EIO`.
    Failed,
    /// The device lost an interrupt and nothing else: it keeps working.
    Live,
}

/// Reloads the driver with `params` and the run's device knobs (the probe resets the device).
pub(crate) fn reload(params: &[&str]) -> Result<(), String> {
    if std::path::Path::new(DRIVER_DIR).exists() {
        crate::run_cmd("rmmod", &["zapguard"])?;
    }
    let knobs = knob_params();
    let mut args = vec![MODULE];
    args.extend_from_slice(params);
    args.extend(knobs.iter().map(String::as_str));
    crate::run_cmd("insmod", &args)
}

/// Runs `test` with the driver reloaded with `params`, then reloads it with the defaults
/// (whatever `test` returned); the test's error comes first.
pub(crate) fn with_params(
    params: &[&str],
    test: impl FnOnce() -> Result<(), String>,
) -> Result<(), String> {
    reload(params)?;
    let r = test();
    let restored = reload(&[]);
    r?;
    restored
}

/// The driver's device-knob parameters the run was started with (`zg.knobs=P=V,...` on the
/// kernel command line, which init passed to the first insmod).
pub(crate) fn knob_params() -> Vec<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("zg.knobs="))
        .flat_map(|k| k.split(','))
        .map(str::to_string)
        .collect()
}

/// The PCI address of the device the driver is bound to.
fn bound_device() -> Result<String, String> {
    crate::bound_devices()?
        .into_iter()
        .next()
        .ok_or_else(|| "no device bound".into())
}

fn arm(f: &File, mode: u32, arg: u32) -> Result<(), String> {
    let i = ZgInject {
        dev_fail: mode,
        dev_fail_arg: arg,
        ..Default::default()
    };
    dev::inject_all(f, i).map_err(|e| format!("inject failure mode {mode}: {e}"))
}

/// A thread that reads a mirrored buffer with device jobs until one fails; it returns that
/// job's errno.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<i32>,
}

impl Traffic {
    /// Mirrors a new buffer and starts reading it; returns the buffer too.
    fn start(f: &File) -> Result<(Mapping, Self), String> {
        let mut buf = Mapping::anon(JOB_LEN).map_err(|e| e.to_string())?;
        buf.bytes_mut().fill(0x5a);
        map(f, &buf, false)?;
        let f2 = f.try_clone().map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (addr, len) = (buf.addr, buf.len);
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if let Err((e, _)) = dev::dma(&f2, dev::job(DMA_CHECKSUM, addr, 0, len, 0)) {
                    return dev::errno(&e);
                }
            }
            0
        });
        // Let the first job start.
        std::thread::sleep(Duration::from_millis(30));
        Ok((buf, Self { stop, thread }))
    }

    /// Stops the jobs; the errno of the job that ended them (0 if none failed).
    fn finish(self) -> Result<i32, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| "job thread panicked".into())
    }

    /// Lets the jobs run until one fails, for at most `bound`; then as [`Self::finish`].
    fn until_failure(self, bound: Duration) -> Result<i32, String> {
        let t = Instant::now();
        while !self.thread.is_finished() && t.elapsed() < bound {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.finish()
    }
}

fn check_bound(what: &str, took: Duration, bound: Duration) -> Result<(), String> {
    println!("# {what} took {} ms", took.as_millis());
    if took > bound {
        return Err(format!(
            "{what} took {} ms, more than {} ms",
            took.as_millis(),
            bound.as_millis()
        ));
    }
    Ok(())
}

/// After a failure: new work gets `EIO`, STATS still answers, and an invalidation of a
/// mirrored range (`spare`) returns at once.
fn check_failed(f: &File, spare: Mapping) -> Result<(), String> {
    let extra = Mapping::anon(4096).map_err(|e| e.to_string())?;
    match dev::map(f, extra.addr, extra.len, 0) {
        Ok(_) => return Err("MAP on a failed device succeeded".into()),
        Err(e) => check_eq(dev::errno(&e), libc::EIO, "errno of MAP on a failed device")?,
    }
    match dev::open() {
        Ok(_) => return Err("open of a failed device succeeded".into()),
        Err(e) => check_eq(
            dev::errno(&e),
            libc::EIO,
            "errno of open on a failed device",
        )?,
    }
    stats(f)?;
    let t = Instant::now();
    drop(spare);
    check_bound(
        "munmap on the fenced device",
        t.elapsed(),
        fenced_event_bound(),
    )
}

/// After a lost interrupt only: the device keeps working, and with its command interrupts still
/// lost the driver notices a small job's completion within its 100 ms poll (plus slack, scaled
/// per kernel flavor).
fn check_live(f: &File) -> Result<(), String> {
    let b = Mapping::anon(4096).map_err(|e| e.to_string())?;
    map(f, &b, true)?;
    let t = Instant::now();
    crate::mirror::run(f, crate::mirror::fill_job(b.addr, b.len, 7))?;
    check_bound(
        "a one-page job with its completion interrupt lost",
        t.elapsed(),
        crate::scaled(LOST_MSI_JOB_BOUND),
    )?;
    check_eq(b.bytes()[100], 7, "byte written by the device")
}

/// A one-page job whose completion interrupt is lost: the driver's 100 ms poll, and slack.
const LOST_MSI_JOB_BOUND: Duration = Duration::from_millis(250);

/// Munmap of a buffer the device is reading while the device fails.
fn munmap_during_dma(mode: u32, arg: u32, outcome: Outcome) -> Result<(), String> {
    let f = open()?;
    let mut spare = Mapping::anon(4096).map_err(|e| e.to_string())?;
    spare.bytes_mut().fill(1);
    map(&f, &spare, false)?;
    let (buf, traffic) = Traffic::start(&f)?;
    arm(&f, mode, arg)?;
    // Let the mode take effect (a hang needs the running job's next burst).
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    drop(buf);
    check_bound("munmap during DMA", t.elapsed(), failed_event_bound())?;
    // A failed device fails the job it ended, or (when the failure fell between two jobs) the
    // next one: wait for that rather than stop the traffic and race the job's end.
    let errno = match outcome {
        Outcome::Failed => traffic.until_failure(failed_event_bound())?,
        Outcome::Live => traffic.finish()?,
    };
    match outcome {
        Outcome::Failed => {
            check_eq(errno, libc::EIO, "errno of the job the failure ended")?;
            check_failed(&f, spare)
        }
        Outcome::Live => {
            // A job running into the unmapped buffer cannot have its fault served; one that
            // finished before the munmap (and was still being waited for) succeeded.
            if errno != 0 && errno != libc::EFAULT {
                return Err(format!(
                    "errno of the job after munmap: {errno}, expected 0 or EFAULT"
                ));
            }
            check_live(&f)
        }
    }
}

/// A process that exits (killing its job thread) while the device fails: exit_mmap's Release
/// must finish; its parent then finds the device failed.
fn exit_during_dma(mode: u32, arg: u32, outcome: Outcome) -> Result<(), String> {
    let t = Instant::now();
    let status = fork_wait(|| {
        let Ok(f) = dev::open() else { return 10 };
        let Ok((buf, traffic)) = Traffic::start(&f) else {
            return 11;
        };
        if arm(&f, mode, arg).is_err() {
            return 12;
        }
        std::thread::sleep(Duration::from_millis(20));
        std::mem::forget((buf, traffic));
        // SAFETY: ends the process without unwinding: the job thread dies in its ioctl, then
        // the mm goes (Release) with the file still open, then the file.
        unsafe { libc::_exit(0) }
    })?;
    check_eq(status, 0, "child exit status")?;
    check_bound(
        "exit during DMA",
        t.elapsed(),
        failed_event_bound() + Duration::from_secs(1),
    )?;
    match (outcome, dev::open()) {
        (Outcome::Failed, Ok(_)) => Err("open after the failure succeeded".into()),
        (Outcome::Failed, Err(e)) => check_eq(dev::errno(&e), libc::EIO, "errno of open"),
        (Outcome::Live, Ok(f)) => check_live(&f),
        (Outcome::Live, Err(e)) => Err(format!("open after a lost interrupt: {e}")),
    }
}

/// Unbind while the device runs DMA and fails: unbind completes within the fence bound (the
/// device is fenced even if it does not answer CR0), the job ends with `ENODEV` (or, for a
/// device that fails, `EIO` when the driver noticed the failure before the unbind: the two race),
/// and the file keeps answering `ENODEV`. A device that only loses an interrupt does not fail:
/// its job must end with `ENODEV`.
fn unbind_during_dma(mode: u32, arg: u32, outcome: Outcome) -> Result<(), String> {
    let bdf = bound_device()?;
    let f = open()?;
    let (_buf, traffic) = Traffic::start(&f)?;
    arm(&f, mode, arg)?;
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    std::fs::write(format!("{DRIVER_DIR}/unbind"), &bdf)
        .map_err(|e| format!("unbind {bdf}: {e}"))?;
    check_bound("unbind during DMA", t.elapsed(), failed_event_bound())?;
    let errno = traffic.until_failure(failed_event_bound())?;
    let allowed: &[i32] = match outcome {
        Outcome::Live => &[libc::ENODEV],
        Outcome::Failed => &[libc::ENODEV, libc::EIO],
    };
    if !allowed.contains(&errno) {
        return Err(format!(
            "job errno after unbind: {errno}, expected one of {allowed:?}"
        ));
    }
    println!("# the job ended with errno {errno}");
    match dev::get_info(&f) {
        Ok(_) => Err("GET_INFO after unbind succeeded".into()),
        Err(e) => check_eq(dev::errno(&e), libc::ENODEV, "errno after unbind"),
    }
}

/// Runs one case on a freshly loaded driver with short timeouts, then reloads the default
/// driver (whatever the case did).
fn case(
    mode: u32,
    arg: u32,
    outcome: Outcome,
    body: fn(u32, u32, Outcome) -> Result<(), String>,
) -> Result<(), String> {
    crate::test_build()?;
    let timeout = format!("sync_timeout_ms={SYNC_TIMEOUT_MS}");
    reload(&[&timeout, "job_timeout_ms=3000"])?;
    let r = body(mode, arg, outcome);
    let restored = reload(&[]);
    r?;
    restored
}

macro_rules! failure_tests {
    ($($name:ident: $mode:expr, $arg:expr, $outcome:expr, $body:ident;)*) => {
        $(pub fn $name() -> Result<(), String> {
            case($mode, $arg, $outcome, $body)
        })*
    };
}

failure_tests! {
    fail_cmdq_stop_munmap_during_dma: FAIL_CMDQ_STOP, 0, Outcome::Failed, munmap_during_dma;
    fail_cmdq_stop_exit_during_dma: FAIL_CMDQ_STOP, 0, Outcome::Failed, exit_during_dma;
    fail_cmdq_stop_unbind_during_dma: FAIL_CMDQ_STOP, 0, Outcome::Failed, unbind_during_dma;
    fail_sync_delay_munmap_during_dma: FAIL_SYNC_DELAY, 3000, Outcome::Failed, munmap_during_dma;
    fail_sync_delay_exit_during_dma: FAIL_SYNC_DELAY, 3000, Outcome::Failed, exit_during_dma;
    fail_sync_delay_unbind_during_dma: FAIL_SYNC_DELAY, 3000, Outcome::Failed, unbind_during_dma;
    fail_cmdq_error_munmap_during_dma: FAIL_CMDQ_ERROR, 0, Outcome::Failed, munmap_during_dma;
    fail_cmdq_error_exit_during_dma: FAIL_CMDQ_ERROR, 0, Outcome::Failed, exit_during_dma;
    fail_cmdq_error_unbind_during_dma: FAIL_CMDQ_ERROR, 0, Outcome::Failed, unbind_during_dma;
    fail_drop_msi_munmap_during_dma: FAIL_DROP_CMD_MSI, 0, Outcome::Live, munmap_during_dma;
    fail_drop_msi_exit_during_dma: FAIL_DROP_CMD_MSI, 0, Outcome::Live, exit_during_dma;
    fail_drop_msi_unbind_during_dma: FAIL_DROP_CMD_MSI, 0, Outcome::Live, unbind_during_dma;
    fail_dma_hang_munmap_during_dma: FAIL_DMA_HANG, 0, Outcome::Failed, munmap_during_dma;
    fail_dma_hang_exit_during_dma: FAIL_DMA_HANG, 0, Outcome::Failed, exit_during_dma;
    fail_dma_hang_unbind_during_dma: FAIL_DMA_HANG, 0, Outcome::Failed, unbind_during_dma;
}

/// The kernel command-line word that marks the harness's device-death boot.
const DEVICE_DIES_BOOT: &str = "zg.device_dies=1";

/// The device process dies while it runs DMA (`FAIL_DIE`); QEMU then answers the BAR with all
/// ones. The driver must notice (the job's wait reads all ones), fence, and answer `EIO`; an
/// mm event must then return at once and the module must unload. Runs only in the harness's
/// device-death boot of `just test` (the device cannot come back in the same boot).
pub fn device_dies_mid_dma() -> Result<(), String> {
    crate::test_build()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(|e| e.to_string())?;
    if !cmdline.split_whitespace().any(|w| w == DEVICE_DIES_BOOT) {
        return Err(crate::ktap::skip(
            "runs in the device-death boot of `just test` (the device does not come back)",
        ));
    }
    let timeout = format!("sync_timeout_ms={SYNC_TIMEOUT_MS}");
    reload(&[&timeout, "job_timeout_ms=3000"])?;
    let f = open()?;
    let mut spare = Mapping::anon(4096).map_err(|e| e.to_string())?;
    spare.bytes_mut().fill(1);
    map(&f, &spare, false)?;
    let (buf, traffic) = Traffic::start(&f)?;
    let t = Instant::now();
    arm(&f, FAIL_DIE, 0)?;
    // The device dies at the running job's next step; the job loop ends with that job.
    let errno = traffic.until_failure(failed_event_bound())?;
    check_bound(
        "the job's end after the device died",
        t.elapsed(),
        failed_event_bound(),
    )?;
    check_eq(errno, libc::EIO, "errno of the job the device died under")?;
    let t = Instant::now();
    drop(buf);
    check_bound(
        "munmap after the device died",
        t.elapsed(),
        fenced_event_bound(),
    )?;
    check_failed(&f, spare)?;
    drop(f);
    crate::run_cmd("rmmod", &["zapguard"])
}
