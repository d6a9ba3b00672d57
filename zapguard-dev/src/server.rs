//! vfio-user glue: a [`vfio_user::ServerBackend`] around config space, BAR0 and guest memory.
//!
//! The rust-vmm server loop calls the backend once per message on one thread. Whatever the
//! guest (through QEMU) sends, the backend answers: bad accesses read 0 and become `error`
//! events; they never turn into errors that would make the server tear the connection down.
//! Only host-side failures to honour a DMA map (the VMM's own request) are returned as errors.
//!
//! The message loop only decodes register accesses. The device's work (commands, DMA jobs,
//! faults, the validator) runs on its own worker thread ([`spawn_worker`]), so the guest sees a
//! device that works asynchronously, like hardware: a doorbell write returns at once and the
//! driver learns of completion from memory writes and MSI-X interrupts.
//!
//! The glue owns config space, so it tells the device about PCI bus mastering
//! ([`ZapguardDevice::set_bus_master`]): at creation, on every config write that changes the
//! command register, and on reset. When an injected `FAIL_DIE` fires, the device is dead:
//! registers and config space read all ones and writes go nowhere, and the worker calls the
//! hook set with [`ZapguardBackend::on_die`] (the binary flushes its trace there and [`unplug`]s
//! the connection, so that the loop answers what QEMU already sent and then ends).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shared_regs::pci::{BAR0, BAR0_SIZE, MSIX_VECTORS};
use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_DMA_MAP_FLAG_WRITE, VFIO_DMA_UNMAP_FLAG_ALL, VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};
use zapguard_model::device::{DeviceConfig, ZapguardDevice};
use zapguard_model::events::{le_value, Event, Events, IrqIndex};
use zapguard_model::pci::{PciConfig, CONFIG_SPACE_SIZE};

use crate::memory::GuestMemory;

/// The vfio-user region index of BAR0.
pub const BAR0_REGION: u32 = VFIO_PCI_BAR0_REGION_INDEX + BAR0;

/// Interrupt eventfds of one VFIO interrupt index, shared with whoever raises interrupts (the
/// device's worker threads). Cloning shares the table.
#[derive(Clone, Debug)]
pub struct EventFdTable(Arc<Mutex<Vec<Option<File>>>>);

impl EventFdTable {
    /// A table of `vectors` unassigned vectors.
    pub fn new(vectors: usize) -> Self {
        Self(Arc::new(Mutex::new((0..vectors).map(|_| None).collect())))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Option<File>>> {
        // The table stays consistent whatever a panicking holder did (single assignments).
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the table has no vectors at all.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Assigns (or with `None`, clears) a vector's eventfd; false if there is no such vector.
    pub fn set(&self, vector: usize, fd: Option<File>) -> bool {
        match self.lock().get_mut(vector) {
            Some(slot) => {
                *slot = fd;
                true
            }
            None => false,
        }
    }

    /// Clears every vector.
    pub fn clear(&self) {
        self.lock().iter_mut().for_each(|slot| *slot = None);
    }

    /// Whether `vector` has an eventfd.
    pub fn is_set(&self, vector: usize) -> bool {
        self.lock().get(vector).is_some_and(Option::is_some)
    }

    /// Signals `vector`. Returns false (and does nothing) if it has no eventfd.
    pub fn trigger(&self, vector: usize) -> io::Result<bool> {
        let table = self.lock();
        let Some(Some(fd)) = table.get(vector) else {
            return Ok(false);
        };
        // An eventfd takes a native-endian u64 to add to its counter.
        (&*fd).write_all(&1u64.to_ne_bytes())?;
        Ok(true)
    }
}

/// What the device's death (an injected `FAIL_DIE`) runs: it is not expected to return.
pub type DieHook = Box<dyn FnOnce() + Send>;

/// What the message loop and the worker share.
pub struct Shared<E: Events> {
    device: Mutex<ZapguardDevice<E>>,
    memory: RwLock<GuestMemory>,
    wake: Condvar,
    stop: AtomicBool,
    /// The device died (`FAIL_DIE`): registers and config space read all ones, writes are
    /// dropped, as for a device that fell off the bus.
    dead: AtomicBool,
    on_die: Mutex<Option<DieHook>>,
    /// Register accesses waiting for the device lock, and since when (nanoseconds after
    /// `epoch`, 0 = none): the worker lets them in between two slices once they waited
    /// [`STARVED`] (a lock is not fair, and back-to-back slices slowed by `WALK_LAG` must not
    /// starve the guest's MMIO past QEMU's reply timeout; shorter waits keep the worker's
    /// pacing, which the race tests rely on).
    waiting: AtomicUsize,
    waiting_since: AtomicU64,
    epoch: Instant,
}

/// How long a register access may wait for the device lock before the worker steps aside.
const STARVED: Duration = Duration::from_millis(50);

impl<E: Events> Shared<E> {
    /// Locks the device. A panic elsewhere must not wedge the device: its state is plain data.
    pub fn device(&self) -> MutexGuard<'_, ZapguardDevice<E>> {
        if self.waiting.fetch_add(1, Ordering::AcqRel) == 0 {
            let now = self.epoch.elapsed().as_nanos().max(1) as u64;
            self.waiting_since.store(now, Ordering::Release);
        }
        let guard = self.worker_device();
        if self.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waiting_since.store(0, Ordering::Release);
        }
        guard
    }

    /// Locks the device for the worker, which yields to waiting register accesses instead.
    fn worker_device(&self) -> MutexGuard<'_, ZapguardDevice<E>> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets register accesses that waited [`STARVED`] for the device lock take it first.
    fn yield_to_starved(&self) {
        let starved = || {
            let since = self.waiting_since.load(Ordering::Acquire);
            let now = self.epoch.elapsed().as_nanos() as u64;
            self.waiting.load(Ordering::Acquire) > 0
                && since != 0
                && now.saturating_sub(since) > STARVED.as_nanos() as u64
        };
        while starved() && !self.stop.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
    }

    /// Reads guest memory's region table.
    pub fn memory(&self) -> RwLockReadGuard<'_, GuestMemory> {
        self.memory.read().unwrap_or_else(|p| p.into_inner())
    }

    fn memory_mut(&self) -> std::sync::RwLockWriteGuard<'_, GuestMemory> {
        self.memory.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The device died (`FAIL_DIE`): runs the hook, if any. Without one the device stays
    /// silent: the worker stops and nothing is processed any more.
    fn die(&self) {
        let hook = self.on_die.lock().unwrap_or_else(|p| p.into_inner()).take();
        match hook {
            Some(hook) => hook(),
            None => self.device().report_error(
                "FAIL_DIE fired and nobody ends the process: the worker stops".into(),
            ),
        }
    }
}

/// DMA steps the worker runs per lock hold: short enough that register accesses from the guest
/// never wait long for the device lock (four steps: four pages through 4 KiB entries, 256 KiB
/// through 2 MiB entries, tens of microseconds of copying).
const WORKER_STEPS: usize = 4;
/// How long the idle worker sleeps between checks of the stop flag.
const WORKER_IDLE: Duration = Duration::from_millis(200);

/// Starts the device's worker: it runs [`ZapguardDevice::process`] whenever the device has
/// work (or a deadline of its passed) and raises the MSI-X vectors the device asks for. It stops
/// when [`Shared`]'s stop flag is set (by [`ZapguardBackend`]'s drop), or when the device died,
/// after running the die hook.
pub fn spawn_worker<E: Events + Send + 'static>(
    shared: Arc<Shared<E>>,
    msix: EventFdTable,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("zapguard-worker".into())
        .spawn(move || loop {
            shared.yield_to_starved();
            let (irqs, died) = {
                let mut dev = shared.worker_device();
                while !dev.has_work() && !shared.stop.load(Ordering::Acquire) {
                    // Work comes with a notification from the register write that created it,
                    // or at the device's next deadline; the idle timeout only bounds how late a
                    // stop is noticed.
                    let timeout = dev
                        .until_deadline()
                        .map_or(WORKER_IDLE, |d| d.min(WORKER_IDLE));
                    dev = shared
                        .wake
                        .wait_timeout(dev, timeout)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                let mem = shared.memory();
                dev.process(&*mem, WORKER_STEPS);
                drop(mem);
                (dev.take_irqs(), dev.die_requested())
            };
            if died {
                // A dead device raises nothing and does nothing more.
                shared.dead.store(true, Ordering::Release);
                shared.die();
                return;
            }
            raise(&msix, irqs);
        })
}

/// Signals each vector set in `irqs`.
fn raise(msix: &EventFdTable, irqs: u32) {
    for v in 0..32 {
        if irqs & (1 << v) != 0 {
            // A vector without an eventfd (driver not using it) is simply not signalled.
            let _ = msix.trigger(v);
        }
    }
}

/// The zapguard device as a vfio-user backend.
pub struct ZapguardBackend<E: Events + Send + 'static> {
    shared: Arc<Shared<E>>,
    config: PciConfig,
    intx: EventFdTable,
    msix: EventFdTable,
    worker: Option<JoinHandle<()>>,
}

impl<E: Events + Send + 'static> ZapguardBackend<E> {
    /// A backend around a fresh device, with its worker thread running. Bus mastering starts
    /// as config space's reset value (off).
    pub fn new(config: DeviceConfig, events: E) -> io::Result<Self> {
        let pci = PciConfig::new();
        let mut device = ZapguardDevice::new(config, events);
        // Power-on state, not a change: no trace event before `connect`.
        device.set_power_on_bus_master(pci.bus_master_enabled());
        let shared = Arc::new(Shared {
            device: Mutex::new(device),
            memory: RwLock::new(GuestMemory::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            waiting_since: AtomicU64::new(0),
            epoch: Instant::now(),
            on_die: Mutex::new(None),
        });
        let msix = EventFdTable::new(usize::from(MSIX_VECTORS));
        let worker = spawn_worker(Arc::clone(&shared), msix.clone())?;
        Ok(Self {
            shared,
            config: pci,
            intx: EventFdTable::new(1),
            msix,
            worker: Some(worker),
        })
    }

    /// The device (locked).
    pub fn device(&self) -> MutexGuard<'_, ZapguardDevice<E>> {
        self.shared.device()
    }

    /// The state shared with the worker.
    pub fn shared(&self) -> Arc<Shared<E>> {
        Arc::clone(&self.shared)
    }

    /// Reports an event through the device's sink.
    pub fn event(&self, ev: &Event) {
        self.shared.device().events().event(ev);
    }

    fn report_error(&self, what: String) {
        self.shared.device().report_error(what);
    }

    /// The config-space shadow.
    pub fn config_space(&self) -> &PciConfig {
        &self.config
    }

    /// Sets what the worker runs when the device dies (an injected `FAIL_DIE`): flush what must
    /// survive and end the process. It runs on the worker thread, without the device lock.
    pub fn on_die(&self, hook: impl FnOnce() + Send + 'static) {
        *self.shared.on_die.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(hook));
    }

    /// Tells the device the bus-master bit of the command register, and wakes the worker in
    /// case the device may work again.
    fn report_bus_master(&self) {
        self.shared
            .device()
            .set_bus_master(self.config.bus_master_enabled());
        self.shared.wake.notify_one();
    }

    /// Guest memory received through DMA_MAP.
    pub fn memory(&self) -> RwLockReadGuard<'_, GuestMemory> {
        self.shared.memory()
    }

    /// The MSI-X eventfds (shared with the worker).
    pub fn msix(&self) -> EventFdTable {
        self.msix.clone()
    }

    /// The INTx eventfd.
    pub fn intx(&self) -> EventFdTable {
        self.intx.clone()
    }

    fn set_irqs_checked(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), String> {
        let table = match index {
            VFIO_PCI_INTX_IRQ_INDEX => &self.intx,
            VFIO_PCI_MSIX_IRQ_INDEX => &self.msix,
            // MSI, ERR and REQ have no vectors: disabling them is fine, anything else is not.
            _ if count == 0 => return Ok(()),
            _ => return Err("the device has no vectors there".into()),
        };
        // Masking is emulated by QEMU for MSI-X; INTx unmask/resample needs no device action.
        if flags & VFIO_IRQ_SET_ACTION_TYPE_MASK != VFIO_IRQ_SET_ACTION_TRIGGER {
            return Ok(());
        }
        let end = start
            .checked_add(count)
            .and_then(|end| usize::try_from(end).ok())
            .filter(|&end| end <= table.len())
            .ok_or_else(|| format!("vectors {start}+{count} exceed the {}", table.len()))?;
        let vectors = start as usize..end;
        match flags & VFIO_IRQ_SET_DATA_TYPE_MASK {
            VFIO_IRQ_SET_DATA_NONE if count == 0 => table.clear(),
            // Loopback trigger: raise the vectors now.
            VFIO_IRQ_SET_DATA_NONE => {
                for v in vectors {
                    table.trigger(v).map_err(|e| format!("trigger {v}: {e}"))?;
                }
            }
            // QEMU sends a run of "no eventfd" (-1) entries as a message without descriptors.
            VFIO_IRQ_SET_DATA_EVENTFD if fds.is_empty() => {
                vectors.for_each(|v| {
                    table.set(v, None);
                });
            }
            VFIO_IRQ_SET_DATA_EVENTFD if fds.len() == vectors.len() => {
                for (v, fd) in vectors.zip(fds) {
                    table.set(v, Some(fd));
                }
            }
            VFIO_IRQ_SET_DATA_EVENTFD => {
                return Err(format!("{} eventfds for {count} vectors", fds.len()))
            }
            other => return Err(format!("unsupported data type {other:#x}")),
        }
        Ok(())
    }
}

impl<E: Events + Send + 'static> ZapguardBackend<E> {
    /// Runs a register access on the locked device, then raises the interrupts it caused (an
    /// access can set an error bit), after the lock is released.
    fn bar_access(&self, access: impl FnOnce(&mut ZapguardDevice<E>)) {
        let irqs = {
            let mut dev = self.shared.device();
            access(&mut dev);
            dev.take_irqs()
        };
        raise(&self.msix, irqs);
    }
}

impl<E: Events + Send + 'static> Drop for ZapguardBackend<E> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl<E: Events + Send + 'static> ServerBackend for ZapguardBackend<E> {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        if self.shared.dead.load(Ordering::Acquire) {
            data.fill(0xff);
            return Ok(());
        }
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => {
                if let Err(e) = self.config.read(offset, data) {
                    self.report_error(e.to_string());
                }
            }
            BAR0_REGION => self.bar_access(|dev| dev.read(offset, data)),
            _ => {
                data.fill(0);
                self.report_error(format!(
                    "read of {} bytes at {offset:#x} in empty region {region}",
                    data.len()
                ));
            }
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.shared.dead.load(Ordering::Acquire) {
            return Ok(());
        }
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => {
                self.event(&Event::ConfigWrite {
                    offset,
                    size: data.len(),
                    value: le_value(data),
                });
                let command = self.config.command();
                if let Err(e) = self.config.write(offset, data) {
                    self.report_error(e.to_string());
                }
                if self.config.command() != command {
                    self.report_bus_master();
                }
            }
            BAR0_REGION => {
                self.bar_access(|dev| dev.write(offset, data));
                // A doorbell or enable may have created work.
                self.shared.wake.notify_one();
            }
            _ => self.report_error(format!(
                "write of {} bytes at {offset:#x} in empty region {region}",
                data.len()
            )),
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        self.event(&Event::DmaMap {
            iova: address,
            size,
            offset,
            has_fd: fd.is_some(),
            flags: flags.bits(),
        });
        let writable = flags.bits() & VFIO_DMA_MAP_FLAG_WRITE != 0;
        // The mapping outlives the descriptor, which is closed when `fd` drops.
        let mapped = self
            .shared
            .memory_mut()
            .map(address, size, offset, fd.as_ref(), writable);
        if let Err(e) = mapped {
            let what = e.to_string();
            self.report_error(what.clone());
            return Err(io::Error::other(what));
        }
        Ok(())
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        self.event(&Event::DmaUnmap {
            iova: address,
            size,
            flags: flags.bits(),
        });
        // QEMU sends the kernel's VFIO_DMA_UNMAP_FLAG_ALL (bit 1), which is not the bit the
        // vfio_user crate names UNMAP_ALL, so test the raw value.
        let removed = if flags.bits() & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            self.shared.memory_mut().unmap_all()
        } else {
            self.shared.memory_mut().unmap(address, size)
        };
        if removed == 0 && flags.bits() & VFIO_DMA_UNMAP_FLAG_ALL == 0 {
            self.report_error(format!(
                "DMA unmap {address:#x}+{size:#x} matched no region"
            ));
        }
        Ok(())
    }

    fn reset(&mut self) -> io::Result<()> {
        // DMA maps and interrupt wiring belong to the VMM side and survive a device reset.
        self.config.reset();
        let mut dev = self.shared.device();
        dev.reset();
        dev.set_bus_master(self.config.bus_master_enabled());
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        let irq = IrqIndex::from_raw(index);
        self.event(&Event::IrqSetup {
            index: irq,
            flags,
            start,
            count,
            nfds: fds.len(),
        });
        if let Err(e) = self.set_irqs_checked(index, flags, start, count, fds) {
            self.report_error(format!(
                "set_irqs {} flags {flags:#x} start {start} count {count}: {e}",
                irq.name()
            ));
        }
        Ok(())
    }
}

/// The regions announced to the VMM: BAR0 and config space; every other region is empty.
pub fn regions() -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
            let (flags, size) = match index {
                BAR0_REGION => (rw, BAR0_SIZE),
                VFIO_PCI_CONFIG_REGION_INDEX => (rw, CONFIG_SPACE_SIZE),
                _ => (0, 0),
            };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    flags,
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

/// The interrupts announced to the VMM: one INTx, [`MSIX_VECTORS`] MSI-X vectors, nothing else.
pub fn irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| {
            let count = match index {
                VFIO_PCI_INTX_IRQ_INDEX => 1,
                VFIO_PCI_MSIX_IRQ_INDEX => u32::from(MSIX_VECTORS),
                _ => 0,
            };
            IrqInfo {
                index,
                flags: if count > 0 { VFIO_IRQ_INFO_EVENTFD } else { 0 },
                count,
            }
        })
        .collect()
}

/// Why [`serve`] stopped.
#[derive(Debug, Error)]
pub enum ServeError {
    /// Waiting for the VMM to connect failed.
    #[error("waiting for a connection: {0}")]
    Wait(#[source] io::Error),
    /// The vfio-user server loop failed.
    #[error("vfio-user server: {0}")]
    Server(#[from] vfio_user::Error),
}

/// Serves one VMM connection on `listener` until it goes away.
///
/// Emits [`Event::Connect`] as soon as a connection is pending and [`Event::Disconnect`] when
/// the server loop returns, successfully (the VMM closed the socket) or not.
pub fn serve<E: Events + Send + 'static>(
    listener: UnixListener,
    backend: &mut ZapguardBackend<E>,
) -> Result<(), ServeError> {
    wait_readable(&listener).map_err(ServeError::Wait)?;
    backend.event(&Event::Connect);
    let server = Server::from_owned_fd(OwnedFd::from(listener), true, irqs(), regions());
    let result = server.run(backend).map_err(ServeError::from);
    if let Err(e) = &result {
        backend.report_error(e.to_string());
    }
    backend.event(&Event::Disconnect);
    result
}

/// Ends the device's connection to `socket` as a dead device must: its read side is shut
/// down, so the message loop still answers every request already sent (their registers read
/// all ones once the device died) and then sees the end of the stream, and the client's later
/// requests fail at once (`EPIPE`). Closing the socket instead would leave a request that was
/// read but not answered waiting for QEMU's reply timeout, and one not yet read would turn the
/// close into a connection reset.
///
/// The connection is the accepted stream socket in this process whose local address is
/// `socket` (the vfio-user server accepts it where we cannot see it). `NotFound` if there is
/// none.
pub fn unplug(socket: &std::path::Path) -> io::Result<()> {
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if is_connection_to(fd, socket) {
            // SAFETY: shutdown on a descriptor number; at worst it fails with EBADF/ENOTSOCK.
            if unsafe { libc::shutdown(fd, libc::SHUT_RD) } != 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no connection on {}", socket.display()),
    ))
}

/// Whether `fd` is a connected (not listening) Unix stream socket bound to `path`.
fn is_connection_to(fd: i32, path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let int_opt = |opt| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid out-pointers of the sizes given.
        let rc =
            unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) };
        (rc == 0).then_some(v)
    };
    if int_opt(libc::SO_DOMAIN) != Some(libc::AF_UNIX)
        || int_opt(libc::SO_TYPE) != Some(libc::SOCK_STREAM)
        || int_opt(libc::SO_ACCEPTCONN) != Some(0)
    {
        return false;
    }
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is large enough for a Unix address and `len` says so.
    if unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &mut len) } != 0 {
        return false;
    }
    let name: Vec<u8> = addr
        .sun_path
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    name == path.as_os_str().as_bytes()
}

/// Blocks until a connection is pending on `listener` (the vfio_user server would accept it
/// inside `run`, where we cannot see it).
fn wait_readable(listener: &UnixListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: listener.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid pollfd for the duration of the call; nfds is 1.
        let n = unsafe { libc::poll(&mut pfd, 1, -1) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::memfd;
    use shared_regs::pci::{DEVICE_ID, VENDOR_ID};
    use shared_regs::regs::{ERROR, ERR_BAD_ACCESS, IDENT, IDENT_MAGIC, SCRATCH};
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::path::PathBuf;
    use zapguard_model::events::{EventLog, SharedEvents};
    use zapguard_model::pci::{PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY};

    fn backend() -> ZapguardBackend<EventLog> {
        ZapguardBackend::new(DeviceConfig::default(), EventLog::default()).expect("worker thread")
    }

    fn eventfd() -> File {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: `fd` is fresh and owned by nobody else.
        unsafe { File::from_raw_fd(fd) }
    }

    fn count(efd: &File) -> u64 {
        let mut b = [0u8; 8];
        match (&*efd).read(&mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }

    fn dup(f: &File) -> File {
        f.try_clone().expect("dup")
    }

    /// The driver's `pci_set_master()`/`pci_clear_master()`: a config write of the command
    /// register.
    fn bus_master<E: Events + Send>(b: &mut ZapguardBackend<E>, on: bool) {
        let cmd = PCI_COMMAND_MEMORY | if on { PCI_COMMAND_MASTER } else { 0 };
        b.region_write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            PCI_COMMAND as u64,
            &cmd.to_le_bytes(),
        )
        .expect("config write");
    }

    fn errors(log: &EventLog) -> usize {
        log.events
            .iter()
            .filter(|e| matches!(e, Event::Error { .. }))
            .count()
    }

    #[test]
    fn region_and_irq_tables() {
        let r = regions();
        assert_eq!(r.len(), VFIO_PCI_NUM_REGIONS as usize);
        for (i, region) in r.iter().enumerate() {
            let info = region.region_info;
            assert_eq!(info.index as usize, i);
            match info.index {
                BAR0_REGION => assert_eq!(info.size, BAR0_SIZE),
                VFIO_PCI_CONFIG_REGION_INDEX => assert_eq!(info.size, 4096),
                _ => assert_eq!((info.size, info.flags), (0, 0)),
            }
        }
        let counts: Vec<u32> = irqs().iter().map(|i| i.count).collect();
        assert_eq!(counts, vec![1, 0, u32::from(MSIX_VECTORS), 0, 0]);
    }

    #[test]
    fn config_and_bar_accesses() {
        let mut b = backend();
        let mut id = [0u8; 4];
        b.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
            .expect("read");
        assert_eq!(
            u32::from_le_bytes(id),
            u32::from(VENDOR_ID) | (u32::from(DEVICE_ID) << 16)
        );
        b.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &[0x06, 0x00])
            .expect("write");
        assert!(b.config_space().bus_master_enabled());

        b.region_write(BAR0_REGION, SCRATCH.into(), &0xfeed_u32.to_le_bytes())
            .expect("write");
        let mut v = [0u8; 4];
        b.region_read(BAR0_REGION, SCRATCH.into(), &mut v)
            .expect("read");
        assert_eq!(u32::from_le_bytes(v), 0xfeed);
        b.region_read(BAR0_REGION, IDENT.into(), &mut v)
            .expect("read");
        assert_eq!(u32::from_le_bytes(v), IDENT_MAGIC);
        assert_eq!(errors(b.device().events()), 0);

        // Garbage is answered, never an error.
        let mut big = vec![0xffu8; 8192];
        b.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut big)
            .expect("read");
        b.region_read(3, 0, &mut v).expect("read");
        assert_eq!(v, [0; 4]);
        b.region_write(8, 0, &v).expect("write");
        b.region_write(BAR0_REGION, 2, &[1, 2]).expect("write");
        b.region_write(VFIO_PCI_CONFIG_REGION_INDEX, u64::MAX, &[1])
            .expect("write");
        assert_eq!(errors(b.device().events()), 5);
        assert_eq!(b.device().error_bits(), ERR_BAD_ACCESS);
        let config_writes = b
            .device()
            .events()
            .events
            .iter()
            .filter(|e| matches!(e, Event::ConfigWrite { .. }))
            .count();
        assert_eq!(config_writes, 2);

        b.reset().expect("reset");
        assert!(!b.config_space().bus_master_enabled());
        b.region_read(BAR0_REGION, ERROR.into(), &mut v)
            .expect("read");
        assert_eq!(u32::from_le_bytes(v), 0);
    }

    #[test]
    fn dma_map_gives_device_access_to_guest_memory() {
        const GIB: u64 = 1 << 30;
        let ram = memfd(1 << 20);
        let mut b = backend();
        let rw = DmaMapFlags::READ_WRITE;
        b.dma_map(rw, 0, 0, 0x8_0000, Some(dup(&ram))).expect("low");
        b.dma_map(DmaMapFlags::READ, 0, 0xc_0000, 0x4_0000, None)
            .expect("ROM");
        b.dma_map(rw, 0x8_0000, 4 * GIB, 0x8_0000, Some(dup(&ram)))
            .expect("high");
        assert_eq!(b.memory().len(), 3);
        b.memory().write(4 * GIB + 8, b"hi").expect("write high");
        let mut buf = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(&ram, &mut buf, 0x8_0008).expect("pread");
        assert_eq!(&buf, b"hi");

        // Overlap and past-EOF maps are refused (an error reply, plus an error event).
        assert!(b.dma_map(rw, 0, 0x1000, 0x1000, Some(dup(&ram))).is_err());
        assert!(b
            .dma_map(rw, 1 << 20, 8 * GIB, 0x1000, Some(dup(&ram)))
            .is_err());
        assert_eq!(errors(b.device().events()), 2);

        b.dma_unmap(DmaUnmapFlags::empty(), 0xc_0000, 0x4_0000)
            .expect("unmap");
        assert_eq!(b.memory().len(), 2);
        // QEMU's unmap-all is bit 1.
        let all = DmaUnmapFlags::from_bits_retain(VFIO_DMA_UNMAP_FLAG_ALL);
        b.dma_unmap(all, 0, 0).expect("unmap all");
        assert!(b.memory().is_empty());
        assert!(b.memory().read(0, &mut buf).is_err());
        let maps = b
            .device()
            .events()
            .events
            .iter()
            .filter(|e| matches!(e, Event::DmaMap { has_fd: true, .. }))
            .count();
        assert_eq!(maps, 4);
    }

    /// The worker thread end to end: a doorbell write wakes it, it runs the command queue
    /// against guest RAM received by DMA_MAP, and the SYNC's interrupt reaches the eventfd.
    #[test]
    fn worker_completes_a_sync_and_raises_msix() {
        use shared_regs::cmd::{Command, CMD_F_SYNC_IRQ, CMD_SYNC};
        use shared_regs::regs::*;
        let ram = memfd(1 << 20);
        let mut b = backend();
        b.dma_map(DmaMapFlags::READ_WRITE, 0, 0, 1 << 20, Some(dup(&ram)))
            .expect("map RAM");
        let efd = eventfd();
        let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        b.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, trigger, 0, 1, vec![dup(&efd)])
            .expect("set");
        bus_master(&mut b, true);
        let mut reg = |r: u32, v: u32| {
            b.region_write(BAR0_REGION, r.into(), &v.to_le_bytes())
                .expect("write");
        };
        let (ring, word) = (0x1000u64, 0x8000u64);
        reg(CMDQ_BASE_LO, ring as u32);
        reg(CMDQ_LOG2SIZE, 2);
        reg(IRQ_CTRL, IRQ_CMD_EN);
        reg(CR0, CR0_CMDQ_EN);
        let sync = Command::new(CMD_SYNC, CMD_F_SYNC_IRQ, 0, word, 0xfeed);
        std::os::unix::fs::FileExt::write_all_at(&ram, &sync.to_bytes(), ring).expect("ring");
        reg(CMDQ_PROD, 1);
        // The worker runs on its own thread: wait (bounded) for the completion word.
        let mut done = [0u8; 4];
        for _ in 0..500 {
            std::os::unix::fs::FileExt::read_exact_at(&ram, &mut done, word).expect("pread");
            if u32::from_le_bytes(done) == 0xfeed {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(
            u32::from_le_bytes(done),
            0xfeed,
            "SYNC completed into memory"
        );
        let mut fired = 0;
        for _ in 0..500 {
            fired = count(&efd);
            if fired > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(fired, 1, "command vector signalled once");
        let mut cons = [0u8; 4];
        b.region_read(BAR0_REGION, CMDQ_CONS.into(), &mut cons)
            .expect("read");
        assert_eq!(u32::from_le_bytes(cons), 1);
    }

    /// Polls `cond` every 2 ms for up to `limit`; whether it became true.
    fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < limit {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        cond()
    }

    /// Guest RAM mapped at 0 with the command and DMA rings of `testkit::program` enabled.
    fn machine(b: &mut ZapguardBackend<EventLog>) -> File {
        let ram = memfd(16 << 20);
        b.dma_map(DmaMapFlags::READ_WRITE, 0, 0, 16 << 20, Some(dup(&ram)))
            .expect("map RAM");
        zapguard_model::testkit::program(
            |r, v| {
                b.region_write(BAR0_REGION, r.into(), &v.to_le_bytes())
                    .expect("write")
            },
            2,
        );
        ram
    }

    fn read_u32(ram: &File, at: u64) -> u32 {
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(ram, &mut b, at).expect("pread");
        u32::from_le_bytes(b)
    }

    /// Posts a SYNC writing `value` to `testkit::SYNC_WORD` at command slot `slot`.
    fn post_sync(b: &mut ZapguardBackend<EventLog>, ram: &File, slot: u32, value: u32) {
        use shared_regs::cmd::{Command, CMD_SIZE, CMD_SYNC};
        let c = Command::new(
            CMD_SYNC,
            0,
            0,
            zapguard_model::testkit::SYNC_WORD,
            value.into(),
        );
        let at = zapguard_model::testkit::CMDQ + u64::from(slot) * CMD_SIZE as u64;
        std::os::unix::fs::FileExt::write_all_at(ram, &c.to_bytes(), at).expect("ring");
        b.region_write(
            BAR0_REGION,
            shared_regs::regs::CMDQ_PROD.into(),
            &(slot + 1).to_le_bytes(),
        )
        .expect("doorbell");
    }

    #[test]
    fn bus_master_follows_config_space() {
        let mut b = backend();
        assert!(
            !b.device().bus_master(),
            "off at power-on, like config space"
        );
        let ram = machine(&mut b);
        post_sync(&mut b, &ram, 0, 7);
        assert!(
            !eventually(Duration::from_millis(50), || read_u32(
                &ram,
                zapguard_model::testkit::SYNC_WORD
            ) == 7),
            "no DMA before the driver sets bus mastering"
        );
        bus_master(&mut b, true);
        assert!(b.device().bus_master());
        assert!(
            eventually(Duration::from_secs(5), || read_u32(
                &ram,
                zapguard_model::testkit::SYNC_WORD
            ) == 7),
            "setting it wakes the worker"
        );
        bus_master(&mut b, false);
        assert!(!b.device().bus_master());
        // Other command bits do not report a change.
        b.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 4, &[0x00, 0x04])
            .expect("INTx disable");
        bus_master(&mut b, true);
        b.reset().expect("reset");
        assert!(!b.device().bus_master(), "reset clears it");
        let changes: Vec<bool> = b
            .device()
            .events()
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Engine(zapguard_model::events::Activity::BusMaster { enabled, .. }) => {
                    Some(*enabled)
                }
                _ => None,
            })
            .collect();
        assert_eq!(changes, [true, false, true, false]);
    }

    /// Posts a SYNC after `writes` to the registers and returns how long its completion took:
    /// the worker must wake at a held SYNC's deadline, with no register write to wake it.
    fn held_sync_completion(writes: &[(u32, u32)]) -> Duration {
        let mut b = backend();
        let ram = machine(&mut b);
        bus_master(&mut b, true);
        for &(r, v) in writes {
            b.region_write(BAR0_REGION, r.into(), &v.to_le_bytes())
                .expect("write");
        }
        let t0 = std::time::Instant::now();
        post_sync(&mut b, &ram, 0, 9);
        assert!(eventually(Duration::from_secs(5), || read_u32(
            &ram,
            zapguard_model::testkit::SYNC_WORD
        ) == 9));
        t0.elapsed()
    }

    /// A SYNC delayed by `FAIL_SYNC_DELAY` (40 ms) completes at its deadline, not at the 200 ms
    /// idle tick.
    #[test]
    fn worker_wakes_for_a_delayed_sync() {
        use shared_regs::regs::{FAIL_ARG, FAIL_INJECT, FAIL_SYNC_DELAY};
        let took = held_sync_completion(&[(FAIL_ARG, 40), (FAIL_INJECT, FAIL_SYNC_DELAY)]);
        assert!(
            took >= Duration::from_millis(40) && took < Duration::from_millis(180),
            "completed at the deadline, not at the 200 ms idle tick: {took:?}"
        );
    }

    /// Likewise for a SYNC held by the SYNC_LAG knob (30 ms; a deadline, not a sleep).
    #[test]
    fn worker_wakes_for_a_lagged_sync() {
        let took = held_sync_completion(&[(shared_regs::regs::SYNC_LAG, 30_000)]);
        assert!(
            took >= Duration::from_millis(30) && took < Duration::from_millis(180),
            "completed at the lag's deadline, not at the 200 ms idle tick: {took:?}"
        );
    }

    #[test]
    fn fail_die_runs_the_hook_on_the_worker() {
        use shared_regs::dma::{DmaJob, DMA_FILL, DMA_JOB_SIZE};
        use shared_regs::regs::{DMAQ_PROD, FAIL_DIE, FAIL_INJECT};
        let mut b = backend();
        let ram = machine(&mut b);
        bus_master(&mut b, true);
        let (tx, rx) = std::sync::mpsc::channel();
        b.on_die(move || {
            tx.send(std::thread::current().name().map(str::to_owned))
                .unwrap()
        });
        b.region_write(BAR0_REGION, FAIL_INJECT.into(), &FAIL_DIE.to_le_bytes())
            .expect("arm");
        let j = DmaJob {
            op: DMA_FILL,
            flags: 0,
            reserved0: 0,
            asid: 0,
            src: 0,
            dst: 0x1000,
            len: 8,
            aux: 0,
            status: zapguard_model::testkit::STATUS,
            id: 1,
            reserved1: 0,
        };
        std::os::unix::fs::FileExt::write_all_at(
            &ram,
            &j.to_bytes(),
            zapguard_model::testkit::DMAQ,
        )
        .expect("ring");
        assert_eq!(j.to_bytes().len(), DMA_JOB_SIZE);
        b.region_write(BAR0_REGION, DMAQ_PROD.into(), &1u32.to_le_bytes())
            .expect("doorbell");
        let who = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the hook ran");
        assert_eq!(who.as_deref(), Some("zapguard-worker"));
        assert!(b.device().die_requested());
        // Dead: registers and config space read all ones, writes go nowhere.
        b.region_write(BAR0_REGION, SCRATCH.into(), &5u32.to_le_bytes())
            .expect("write");
        for region in [BAR0_REGION, VFIO_PCI_CONFIG_REGION_INDEX] {
            let mut v = [0u8; 4];
            b.region_read(region, 0, &mut v).expect("read");
            assert_eq!(u32::from_le_bytes(v), u32::MAX, "region {region}");
        }
        let mut v = [0u8; 4];
        b.device().read(SCRATCH.into(), &mut v);
        assert_eq!(u32::from_le_bytes(v), 0, "the write was dropped");
    }

    /// QEMU's vfio-user client fails only the request whose reply it is reading when the
    /// socket closes: a request the device read and never answered waits for QEMU's reply
    /// timeout (5 s, the vCPU stalled), and one left unread makes the close a reset (QEMU
    /// 11.1.3 then aborted once, `error_setv` twice). So a dying device answers everything
    /// it was sent, registers reading all ones, and only then closes; later requests fail at
    /// once (`EPIPE`).
    #[test]
    fn a_dying_device_answers_what_it_was_sent_then_closes() {
        use shared_regs::dma::DMA_FILL;
        use shared_regs::regs::{DMAQ_PROD, FAIL_DIE, FAIL_INJECT};
        let path = socket_path("die");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let mut backend = backend();
        let socket = path.clone();
        backend.on_die(move || unplug(&socket).expect("unplug"));
        let server = std::thread::spawn(move || serve(listener, &mut backend));

        let (tx, rx) = std::sync::mpsc::channel();
        let client_path = path.clone();
        std::thread::spawn(move || {
            let mut c = vfio_user::Client::new(&client_path).expect("connect");
            let ram = memfd(16 << 20);
            c.dma_map(0, 0, 16 << 20, ram.as_raw_fd()).expect("map RAM");
            let mut w = |r: u32, v: u32| {
                c.region_write(BAR0_REGION, r.into(), &v.to_le_bytes())
                    .expect("write")
            };
            zapguard_model::testkit::program(&mut w, 2);
            w(SCRATCH, 7);
            let cmd = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
            c.region_write(
                VFIO_PCI_CONFIG_REGION_INDEX,
                PCI_COMMAND as u64,
                &cmd.to_le_bytes(),
            )
            .expect("bus master");
            c.region_write(BAR0_REGION, FAIL_INJECT.into(), &FAIL_DIE.to_le_bytes())
                .expect("arm");
            let mut j = zapguard_model::testkit::job(DMA_FILL, 0, 0, 0x1000, 8, 0);
            j.status = zapguard_model::testkit::STATUS;
            std::os::unix::fs::FileExt::write_all_at(
                &ram,
                &j.to_bytes(),
                zapguard_model::testkit::DMAQ,
            )
            .expect("ring");
            c.region_write(BAR0_REGION, DMAQ_PROD.into(), &1u32.to_le_bytes())
                .expect("doorbell");
            // Reads until the device is gone: each answered one reads the register or all ones.
            let mut values = Vec::new();
            let end = loop {
                let mut v = [0u8; 4];
                match c.region_read(BAR0_REGION, SCRATCH.into(), &mut v) {
                    Ok(()) => values.push(u32::from_le_bytes(v)),
                    Err(e) => break e,
                }
            };
            tx.send((values, end)).expect("report");
        });
        let (values, end) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the client saw the device go within 10 s");
        assert!(
            matches!(end, vfio_user::Error::StreamWrite(_)),
            "a request was sent and never answered: {end:?}"
        );
        // Usually none: the device dies at the job's first step, before the next read.
        assert!(
            values.iter().all(|&v| v == 7 || v == u32::MAX),
            "{values:x?}"
        );
        server
            .join()
            .expect("no panic")
            .expect("the loop ends cleanly");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn msix_eventfds_follow_set_irqs() {
        let mut b = backend();
        let msix = b.msix();
        let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        let efds: Vec<File> = (0..MSIX_VECTORS).map(|_| eventfd()).collect();
        // One descriptor per message, as QEMU sends them to this server.
        for (v, efd) in efds.iter().enumerate() {
            b.set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                trigger,
                v as u32,
                1,
                vec![dup(efd)],
            )
            .expect("set");
        }
        for v in 0..usize::from(MSIX_VECTORS) {
            assert!(msix.trigger(v).expect("trigger"));
        }
        assert_eq!(count(&efds[1]), 1);
        // A run of "no eventfd" comes without descriptors.
        b.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, trigger, 1, 1, vec![])
            .expect("set");
        assert!(!msix.trigger(1).expect("trigger"));
        assert!(msix.is_set(0) && msix.is_set(2));
        // Loopback trigger.
        let loopback = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
        b.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, loopback, 2, 1, vec![])
            .expect("set");
        assert_eq!(count(&efds[2]), 2);
        // DATA_NONE with count 0 disables the index.
        b.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, loopback, 0, 0, vec![])
            .expect("set");
        assert!((0..usize::from(MSIX_VECTORS)).all(|v| !msix.is_set(v)));
        assert_eq!(errors(b.device().events()), 0);

        // Garbage: out-of-range vectors, fd count mismatch, MSI vectors, bool data.
        let bad: Vec<(u32, u32, u32, u32, usize)> = vec![
            (
                VFIO_PCI_MSIX_IRQ_INDEX,
                trigger,
                u32::from(MSIX_VECTORS),
                1,
                1,
            ),
            (VFIO_PCI_MSIX_IRQ_INDEX, trigger, u32::MAX, 2, 0),
            (VFIO_PCI_MSIX_IRQ_INDEX, trigger, 0, 2, 1),
            (VFIO_PCI_INTX_IRQ_INDEX, trigger, 0, 1, 2),
            (1, trigger, 0, 1, 1),
            (9, trigger, 0, 1, 0),
        ];
        for &(index, flags, start, count, nfds) in &bad {
            let fds = (0..nfds).map(|_| eventfd()).collect();
            b.set_irqs(index, flags, start, count, fds)
                .expect("answered");
        }
        assert_eq!(errors(b.device().events()), bad.len());
        assert!((0..usize::from(MSIX_VECTORS)).all(|v| !msix.is_set(v)));
        let setups = b
            .device()
            .events()
            .events
            .iter()
            .filter(|e| matches!(e, Event::IrqSetup { .. }))
            .count();
        assert_eq!(setups, usize::from(MSIX_VECTORS) + 3 + bad.len());
    }

    fn socket_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("zg-{tag}-{}.sock", std::process::id()))
    }

    #[test]
    fn serves_a_vfio_user_client() {
        let path = socket_path("serve");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let log = SharedEvents::new(EventLog::default());
        let mut backend =
            ZapguardBackend::new(DeviceConfig::default(), log.clone()).expect("worker thread");
        let msix = backend.msix();
        let server = std::thread::spawn(move || serve(listener, &mut backend));

        let mut client = vfio_user::Client::new(&path).expect("connect");
        let mut v = [0u8; 4];
        client
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut v)
            .expect("config read");
        assert_eq!(u16::from_le_bytes([v[0], v[1]]), VENDOR_ID);
        client
            .region_write(BAR0_REGION, SCRATCH.into(), &7u32.to_le_bytes())
            .expect("write");
        client
            .region_read(BAR0_REGION, SCRATCH.into(), &mut v)
            .expect("read");
        assert_eq!(u32::from_le_bytes(v), 7);
        client
            .region_read(BAR0_REGION, 1, &mut v)
            .expect("a bad access is still answered");
        let ram = memfd(1 << 20);
        client
            .dma_map(0, 0x10_0000, 1 << 20, ram.as_raw_fd())
            .expect("dma map");
        let efd = eventfd();
        client
            .set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                1,
                1,
                &[efd.as_raw_fd()],
            )
            .expect("set irqs");
        assert!(msix.trigger(1).expect("trigger"));
        assert_eq!(count(&efd), 1);
        client.reset().expect("reset");
        drop(client);

        server.join().expect("no panic").expect("clean disconnect");
        assert!(!path.exists() || std::fs::remove_file(&path).is_ok());
        let events = log.lock().events.clone();
        assert_eq!(events.first(), Some(&Event::Connect));
        assert_eq!(events.last(), Some(&Event::Disconnect));
        let kinds = [
            events
                .iter()
                .any(|e| matches!(e, Event::DmaMap { has_fd: true, .. })),
            events
                .iter()
                .any(|e| matches!(e, Event::IrqSetup { nfds: 1, .. })),
            events.iter().any(|e| matches!(e, Event::Reset)),
            events
                .iter()
                .filter(|e| matches!(e, Event::Error { .. }))
                .count()
                == 1,
        ];
        assert_eq!(kinds, [true; 4], "{events:#?}");
    }
}
