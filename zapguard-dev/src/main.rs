//! `zapguard-dev`: the zapguard device as a vfio-user server process.
//!
//! ```text
//! zapguard-dev --socket PATH --trace PATH [--trace-exact-time] [--iotlb-entries N] [--asids N]
//!              [--iotlb-policy lru|fifo|random[:SEED]] [--dma-burst BYTES]
//! ```
//!
//! Serves one QEMU connection (`-device vfio-user-pci,socket=PATH`), writes every device event
//! to the binary trace (`zapguard-trace json PATH` prints it as JSON Lines), and exits 0 when QEMU goes away or on SIGTERM/SIGINT (after flushing
//! the trace and removing the socket), 1 on an error, and [`DIED`] when the guest injected
//! `FAIL_DIE`. A dying device flushes its trace, removes the socket, answers what QEMU had
//! already sent with all ones and refuses the rest ([`zapguard_dev::server::unplug`]), then exits:
//! the guest sees its device vanish, and QEMU is left with no request waiting for a reply.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Weak};

use clap::Parser;
use zapguard_dev::server::Shared;
use zapguard_dev::{serve, TraceWriter, ZapguardBackend};
use zapguard_model::iotlb::Policy;
use zapguard_model::DeviceConfig;

/// The device with its trace. The trace is the device's own sink, reached by the signal thread
/// and the die hook through the device lock: a lock of its own would cost more per event than
/// recording it.
type Device = Shared<TraceWriter<File>>;

/// Exit status when the device died of an injected `FAIL_DIE`.
const DIED: i32 = 3;

/// The zapguard emulated PCI device, served to QEMU over vfio-user.
#[derive(Debug, Parser)]
#[command(name = "zapguard-dev", version)]
struct Args {
    /// Unix socket to listen on (a stale socket there is replaced).
    #[arg(long)]
    socket: PathBuf,
    /// Binary trace file to write (truncated); `zapguard-trace` reads it.
    #[arg(long)]
    trace: PathBuf,
    /// Read the clock for every event: by default the per-page events (`dma_access`,
    /// `iotlb_fill`, `iotlb_evict`) share one read among 8 (a read costs about three records).
    #[arg(long)]
    trace_exact_time: bool,
    /// Number of IOTLB entries the device reports.
    #[arg(long, default_value_t = DeviceConfig::default().iotlb_entries,
          value_parser = clap::value_parser!(u32).range(1..))]
    iotlb_entries: u32,
    /// Number of address-space IDs the device reports.
    #[arg(long, default_value_t = DeviceConfig::default().asid_count,
          value_parser = clap::value_parser!(u32).range(1..))]
    asids: u32,
    /// IOTLB replacement policy: `lru`, `fifo` or `random[:SEED]`.
    #[arg(long, default_value = "lru", value_parser = parse_policy)]
    iotlb_policy: Policy,
    /// Largest DMA step in bytes. Steps also end where a translation or CPU leaf ends (every
    /// page, for 4 KiB entries); commands interleave with a running job between steps.
    #[arg(long, default_value_t = DeviceConfig::default().dma_burst,
          value_parser = clap::value_parser!(u32).range(8..=1 << 20))]
    dma_burst: u32,
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    match s.split_once(':') {
        None if s == "lru" => Ok(Policy::Lru),
        None if s == "fifo" => Ok(Policy::Fifo),
        None if s == "random" => Ok(Policy::Random { seed: 0 }),
        Some(("random", seed)) => seed
            .parse()
            .map(|seed| Policy::Random { seed })
            .map_err(|_| format!("bad random seed {seed:?}")),
        _ => Err(format!("unknown policy {s:?}: lru, fifo or random[:SEED]")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zapguard-dev: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    // Before any thread exists, so that every thread inherits the mask and only the signal
    // thread (sigwait) ever receives SIGINT/SIGTERM.
    let signals = block_termination_signals().map_err(|e| format!("signal mask: {e}"))?;
    let trace = TraceWriter::create(&args.trace, args.trace_exact_time)
        .map_err(|e| format!("cannot create trace {}: {e}", args.trace.display()))?;
    remove_stale_socket(&args.socket)
        .map_err(|e| format!("socket {}: {e}", args.socket.display()))?;
    let listener = UnixListener::bind(&args.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;

    let config = DeviceConfig {
        iotlb_entries: args.iotlb_entries,
        asid_count: args.asids,
        iotlb_policy: args.iotlb_policy,
        dma_burst: args.dma_burst,
    };
    let mut backend = ZapguardBackend::new(config, trace)
        .map_err(|e| format!("cannot start the device worker: {e}"))?;
    spawn_signal_thread(signals, backend.shared(), args.socket.clone())
        .map_err(|e| format!("signal thread: {e}"))?;
    eprintln!(
        "zapguard-dev: listening on {}, trace -> {}",
        args.socket.display(),
        args.trace.display()
    );
    // Weak: the hook is kept in the device's shared state, which must not keep itself alive.
    let (dying, socket) = (Arc::downgrade(&backend.shared()), args.socket.clone());
    backend.on_die(move || {
        // The worker runs the hook without holding the device lock.
        let flushed = Weak::upgrade(&dying).map(|d| d.device().events().flush());
        if let Some(Err(e)) = flushed {
            eprintln!("zapguard-dev: trace flush failed: {e}");
        }
        let _ = std::fs::remove_file(&socket);
        eprintln!(
            "zapguard-dev: FAIL_DIE injected: answering what QEMU sent with all ones, then exiting"
        );
        // The message loop ends once it has answered everything already sent; `run` exits.
        if let Err(e) = zapguard_dev::server::unplug(&socket) {
            eprintln!("zapguard-dev: unplug: {e}; exiting at once");
            std::process::exit(DIED)
        }
    });
    let served = serve(listener, &mut backend);
    if backend.device().die_requested() {
        // Flushed by the hook; only the disconnect is new.
        let _ = backend.device().events().flush();
        std::process::exit(DIED)
    }

    let flushed = {
        let mut dev = backend.device();
        let t = dev.events();
        match t.take_error() {
            Some(e) => Err(e),
            None => t.flush(),
        }
    };
    let _ = std::fs::remove_file(&args.socket);
    served.map_err(|e| e.to_string())?;
    flushed.map_err(|e| format!("trace {}: {e}", args.trace.display()))
}

/// Removes a socket left behind by an earlier run; refuses to delete anything else.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn block_termination_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use, and
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

/// `serve` blocks inside the vfio-user loop, so termination is handled here: take the device
/// lock (waiting for at most a few DMA steps or a register access), flush the trace, remove the
/// socket, exit.
fn spawn_signal_thread(set: libc::sigset_t, dev: Arc<Device>, socket: PathBuf) -> io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialised signal set and `sig` a valid out-pointer.
            while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
            let flushed = dev.device().events().flush();
            let _ = std::fs::remove_file(&socket);
            match flushed {
                Ok(()) => std::process::exit(0),
                Err(e) => {
                    eprintln!("zapguard-dev: signal {sig}: trace flush failed: {e}");
                    std::process::exit(1)
                }
            }
        })
        .map(drop)
}
