//! Device events and the sinks that receive them.
//!
//! The device and the vfio-user glue report everything observable (connection, register and
//! config accesses, DMA mappings, interrupt setup, resets, errors) through an injected
//! [`Events`] sink, in the style of vm-superio's `Trigger`/metrics traits: the state machine
//! stays free of I/O, tests collect events in memory ([`EventLog`]), benchmarks drop them
//! ([`NoEvents`]) and the binary writes them to a trace file (`zapguard_dev::trace::TraceWriter`,
//! in the `zapguard-dev` crate).

use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX,
};

/// A VFIO interrupt index, as named in `VFIO_DEVICE_SET_IRQS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqIndex {
    /// Legacy INTx.
    Intx,
    /// MSI.
    Msi,
    /// MSI-X.
    Msix,
    /// AER error notification.
    Err,
    /// Device release request.
    Req,
    /// An index this device does not know.
    Unknown(u32),
}

impl IrqIndex {
    /// Decodes a raw VFIO interrupt index.
    pub fn from_raw(index: u32) -> Self {
        match index {
            VFIO_PCI_INTX_IRQ_INDEX => Self::Intx,
            VFIO_PCI_MSI_IRQ_INDEX => Self::Msi,
            VFIO_PCI_MSIX_IRQ_INDEX => Self::Msix,
            VFIO_PCI_ERR_IRQ_INDEX => Self::Err,
            VFIO_PCI_REQ_IRQ_INDEX => Self::Req,
            other => Self::Unknown(other),
        }
    }

    /// The raw VFIO interrupt index.
    pub fn raw(self) -> u32 {
        match self {
            Self::Intx => VFIO_PCI_INTX_IRQ_INDEX,
            Self::Msi => VFIO_PCI_MSI_IRQ_INDEX,
            Self::Msix => VFIO_PCI_MSIX_IRQ_INDEX,
            Self::Err => VFIO_PCI_ERR_IRQ_INDEX,
            Self::Req => VFIO_PCI_REQ_IRQ_INDEX,
            Self::Unknown(raw) => raw,
        }
    }

    /// Short lowercase name used in traces.
    pub fn name(self) -> &'static str {
        match self {
            Self::Intx => "intx",
            Self::Msi => "msi",
            Self::Msix => "msix",
            Self::Err => "err",
            Self::Req => "req",
            Self::Unknown(_) => "unknown",
        }
    }
}

/// Something the device observed.
///
/// `size` is the access length in bytes; `value` is the accessed bytes as a little-endian
/// integer when `size <= 8` (see [`le_value`]) and 0 for longer accesses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The VMM connected to the device socket.
    Connect,
    /// The VMM went away (or the server loop ended).
    Disconnect,
    /// A BAR read, after the device produced `value`.
    BarRead {
        /// BAR number.
        bar: u32,
        /// Offset in the BAR.
        offset: u64,
        /// Access length in bytes.
        size: usize,
        /// Value returned.
        value: u64,
    },
    /// A BAR write.
    BarWrite {
        /// BAR number.
        bar: u32,
        /// Offset in the BAR.
        offset: u64,
        /// Access length in bytes.
        size: usize,
        /// Value written.
        value: u64,
    },
    /// A config-space write (reads are not reported: QEMU reads config space constantly).
    ConfigWrite {
        /// Offset in config space.
        offset: u64,
        /// Access length in bytes.
        size: usize,
        /// Value written.
        value: u64,
    },
    /// The VMM made guest memory available for DMA.
    DmaMap {
        /// Guest physical (IO virtual) address.
        iova: u64,
        /// Length in bytes.
        size: u64,
        /// Offset in the shared file.
        offset: u64,
        /// Whether a file descriptor came with it (only those are accessible).
        has_fd: bool,
        /// Raw vfio-user DMA map flags.
        flags: u32,
    },
    /// The VMM withdrew guest memory.
    DmaUnmap {
        /// Guest physical (IO virtual) address.
        iova: u64,
        /// Length in bytes.
        size: u64,
        /// Raw vfio-user DMA unmap flags.
        flags: u32,
    },
    /// A `VFIO_DEVICE_SET_IRQS` request.
    IrqSetup {
        /// Interrupt index.
        index: IrqIndex,
        /// Raw `VFIO_IRQ_SET_*` flags.
        flags: u32,
        /// First vector.
        start: u32,
        /// Number of vectors.
        count: u32,
        /// Number of file descriptors that came with the request.
        nfds: usize,
    },
    /// Device reset: registers are back at their reset values.
    Reset,
    /// Something went wrong; the device carried on.
    Error {
        /// Human-readable description.
        what: String,
    },
    /// What the device's engine did: commands, translations, DMA, faults, violations.
    Engine(Activity),
}

/// The engine's activity. Field names are the trace's (see `zapguard_dev::trace`): `asid`, `va`,
/// `pa`, `len`, `cmd` (command-queue index), `job` (DMA job id), `result`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Activity {
    /// `CR0ACK` changed: units enabled or disabled.
    Control {
        /// Units now enabled (`CR0_*`).
        cr0ack: u32,
        /// Units the driver asked for but the device refused (bad configuration).
        refused: u32,
    },
    /// A command was executed, or refused with a `CERR_*` (the queue then stops).
    Command {
        /// Consumer index of the command (with wrap bit).
        cmd: u32,
        /// Opcode name.
        op: &'static str,
        /// ASID operand.
        asid: u32,
        /// Address operand.
        va: u64,
        /// Second operand (length, value or tag).
        len: u64,
        /// `"ok"`, `"ignored"` (RESUME/ABORT of no stalled job) or the error name.
        result: &'static str,
    },
    /// A SYNC completed.
    SyncDone {
        /// Consumer index of the SYNC.
        cmd: u32,
        /// Completion address written (0: none).
        pa: u64,
        /// Value written.
        value: u32,
        /// DMA steps the SYNC waited for (in-flight uses of translations it covers).
        waited: u64,
        /// The `SYNC_LAG` (µs) it waited for at least since it was reached (absent: none).
        #[serde(skip_serializing_if = "is_zero")]
        lag_us: u32,
    },
    /// A translation was cached after a page walk.
    IotlbFill {
        /// ASID.
        asid: u32,
        /// First VA covered.
        va: u64,
        /// Guest-physical base.
        pa: u64,
        /// Bytes covered (4 KiB or 2 MiB).
        len: u64,
        /// Whether it allows writes.
        writable: bool,
        /// Translation id (the ledger's key).
        id: u64,
    },
    /// A cached translation was evicted to make room.
    IotlbEvict {
        /// ASID.
        asid: u32,
        /// First VA covered.
        va: u64,
        /// Bytes covered.
        len: u64,
        /// Translation id.
        id: u64,
    },
    /// An invalidation command dropped cached translations.
    IotlbInvalidate {
        /// Consumer index of the command.
        cmd: u32,
        /// ASID (absent for INV_ALL).
        #[serde(skip_serializing_if = "Option::is_none")]
        asid: Option<u32>,
        /// Range start (0 for ASID/ALL).
        va: u64,
        /// Range length (`u64::MAX` for ASID/ALL).
        len: u64,
        /// Entries dropped from the IOTLB.
        dropped: usize,
        /// Translations an in-flight DMA job still holds (the next SYNC waits for them).
        in_flight: usize,
    },
    /// A DMA job was fetched.
    JobStart {
        /// Job id (cookie).
        job: u64,
        /// Opcode name.
        op: &'static str,
        /// ASID.
        asid: u32,
        /// Source VA.
        src: u64,
        /// Destination VA.
        dst: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A DMA job completed and its status was written.
    JobDone {
        /// Job id.
        job: u64,
        /// ASID.
        asid: u32,
        /// Status name (`"ok"`, `"fault"`, `"bad_job"`, `"buf_error"`).
        result: &'static str,
        /// Bytes processed.
        len: u64,
        /// Faults taken.
        faults: u32,
    },
    /// One side of one DMA step (up to a page) through a translation.
    DmaAccess {
        /// Job id.
        job: u64,
        /// ASID.
        asid: u32,
        /// First VA accessed.
        va: u64,
        /// Guest-physical address accessed.
        pa: u64,
        /// Bytes.
        len: u64,
        /// Write (true) or read.
        write: bool,
        /// Translation id used.
        id: u64,
        /// Whether the validator judged the access (before and after it): false when its
        /// context has validation off, or its entry could not be read. The fields after this
        /// one are the facts the verdict was made from (`validator::Facts`; all false or null
        /// when not judged), so that it can be recomputed offline.
        judged: bool,
        /// The context entry said the address space was released.
        released: bool,
        /// The 4 KiB frame the CPU mapped the page to before the bytes moved (null: nothing
        /// mapped, the table could not be walked, or released).
        cpu_pa: Option<u64>,
        /// That CPU PTE was writable.
        cpu_w: bool,
        /// That CPU PTE was dirty.
        cpu_d: bool,
        /// The translation was cached while the CPU PTE was dirty.
        fill_d: bool,
        /// A CPU walk was made after the bytes moved (the verdict before was clean).
        after: bool,
        /// The frame that walk found (null: nothing mapped).
        after_pa: Option<u64>,
        /// That CPU PTE was writable.
        after_w: bool,
    },
    /// A translation fault.
    Fault {
        /// Job id.
        job: u64,
        /// ASID.
        asid: u32,
        /// Faulting VA.
        va: u64,
        /// Write access.
        write: bool,
        /// `FAULT_*` name.
        result: &'static str,
        /// Whether the job stalled (waits for RESUME/ABORT with `tag`).
        stalled: bool,
        /// Stall tag (0 if not stalled).
        tag: u64,
    },
    /// The validator caught the device using a translation the CPU no longer allows.
    Violation {
        /// Job id.
        job: u64,
        /// ASID.
        asid: u32,
        /// VA accessed.
        va: u64,
        /// Guest-physical address the device used.
        pa: u64,
        /// What the CPU maps there (absent: nothing).
        #[serde(skip_serializing_if = "Option::is_none")]
        cpu_pa: Option<u64>,
        /// Write access.
        write: bool,
        /// `VIOL_*` name.
        result: &'static str,
        /// One sentence of explanation.
        why: &'static str,
    },
    /// A queue stopped or lost something; see the `ERR_*` bit named in `result`.
    QueueError {
        /// `"cmdq"`, `"evtq"` or `"dmaq"`.
        queue: &'static str,
        /// Index involved (consumer or producer, with wrap bit).
        cmd: u32,
        /// What happened.
        result: &'static str,
    },
    /// An MSI-X vector was raised.
    Interrupt {
        /// Vector number.
        vector: u16,
    },
    /// An MSI-X vector was due while bus mastering was off: dropped (an MSI is a memory write).
    IrqDropped {
        /// Vector number.
        vector: u16,
    },
    /// PCI bus mastering changed (config-space command register, reported by the glue).
    BusMaster {
        /// Whether the device may now access memory and raise MSI-X.
        enabled: bool,
        /// The DMA job in flight, which stops (or resumes) at a step boundary.
        #[serde(skip_serializing_if = "Option::is_none")]
        job: Option<u64>,
        /// Bytes of that job done so far.
        #[serde(skip_serializing_if = "Option::is_none")]
        pos: Option<u64>,
    },
    /// A failure mode of `FAIL_INJECT` was armed or disarmed, or fired.
    FailInject {
        /// The mode (`none`, `cmdq_stop`, `sync_delay`, `cmdq_error`, `drop_cmd_msi`,
        /// `dma_hang`, `die`).
        mode: &'static str,
        /// `armed`, `disarmed`, or what the failure did.
        what: &'static str,
        /// `FAIL_ARG` at the time.
        arg: u32,
        /// The command position involved, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        cmd: Option<u32>,
        /// The DMA job involved, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        job: Option<u64>,
    },
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// The little-endian integer value of an access of up to 8 bytes; 0 for longer accesses.
pub fn le_value(data: &[u8]) -> u64 {
    if data.len() > 8 {
        return 0;
    }
    let mut bytes = [0u8; 8];
    bytes[..data.len()].copy_from_slice(data);
    u64::from_le_bytes(bytes)
}

/// A sink for device events.
pub trait Events {
    /// Receives one event. Must not fail: a sink that can fail keeps its error for later.
    fn event(&mut self, ev: &Event);
}

impl<T: Events + ?Sized> Events for &mut T {
    fn event(&mut self, ev: &Event) {
        (**self).event(ev)
    }
}

impl<T: Events + ?Sized> Events for Box<T> {
    fn event(&mut self, ev: &Event) {
        (**self).event(ev)
    }
}

/// Drops every event (benchmarks, or when nobody listens).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoEvents;

impl Events for NoEvents {
    fn event(&mut self, _ev: &Event) {}
}

/// Keeps every event in memory (tests).
#[derive(Clone, Debug, Default)]
pub struct EventLog {
    /// Events in arrival order.
    pub events: Vec<Event>,
}

impl Events for EventLog {
    fn event(&mut self, ev: &Event) {
        self.events.push(ev.clone());
    }
}

/// Sends every event to two sinks, first `.0` then `.1`.
#[derive(Clone, Debug, Default)]
pub struct Fanout<A, B>(pub A, pub B);

impl<A: Events, B: Events> Events for Fanout<A, B> {
    fn event(&mut self, ev: &Event) {
        self.0.event(ev);
        self.1.event(ev);
    }
}

/// A sink shared between threads, e.g. the server loop and a signal handler that must flush
/// the trace before exiting.
#[derive(Debug, Default)]
pub struct SharedEvents<E>(Arc<Mutex<E>>);

impl<E> SharedEvents<E> {
    /// Wraps `inner`.
    pub fn new(inner: E) -> Self {
        Self(Arc::new(Mutex::new(inner)))
    }

    /// Locks the inner sink. A panic in another holder does not make the sink unusable: its
    /// state is still the best record of what happened.
    pub fn lock(&self) -> MutexGuard<'_, E> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<E> Clone for SharedEvents<E> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<E: Events> Events for SharedEvents<E> {
    fn event(&mut self, ev: &Event) {
        self.lock().event(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_index_round_trips() {
        for raw in 0..8 {
            let index = IrqIndex::from_raw(raw);
            assert_eq!(index.raw(), raw);
        }
        assert_eq!(IrqIndex::from_raw(VFIO_PCI_MSIX_IRQ_INDEX).name(), "msix");
        assert_eq!(IrqIndex::from_raw(99).name(), "unknown");
    }

    #[test]
    fn le_value_of_short_and_long_accesses() {
        assert_eq!(le_value(&[]), 0);
        assert_eq!(le_value(&[0x34, 0x12]), 0x1234);
        assert_eq!(
            le_value(&[1, 0, 0, 0, 0, 0, 0, 0x80]),
            0x8000_0000_0000_0001
        );
        assert_eq!(le_value(&[0xff; 9]), 0);
    }

    #[test]
    fn fanout_and_shared_deliver_to_all() {
        let shared = SharedEvents::new(EventLog::default());
        let mut fan = Fanout(shared.clone(), EventLog::default());
        fan.event(&Event::Connect);
        fan.event(&Event::Reset);
        NoEvents.event(&Event::Disconnect);
        assert_eq!(shared.lock().events, vec![Event::Connect, Event::Reset]);
        assert_eq!(fan.1.events, shared.lock().events);
    }
}
