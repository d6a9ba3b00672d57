// SPDX-License-Identifier: GPL-2.0

//! zapguard: a Rust reference driver that mirrors process address spaces into an IOMMU-style PCI
//! device and shoots down the device's TLB from mmu_notifier callbacks.
//!
//! Modules:
//! - [`abi`]: the device ABI and uAPI, compiled from `shared-regs/src/abi/` (the same source the
//!   device model and the guest tests use).
//! - [`context_file`]: what the files of both device nodes share: opening a context, range and
//!   context checks, running a job.
//! - [`device`]: the state a device shares with its open files: health (live, failed, fenced),
//!   ASIDs, event dispatch.
//! - [`dmamem`]: the driver's coherent DMA memory, freed at unbind even while files are open.
//! - [`driver`]: the PCI driver, its interrupts and the `/dev/zapguard` misc device (ioctls).
//! - [`hmm_uapi`]: the kernel's test_hmm uAPI on `/dev/zapguard_hmm0` and `1`, so that the
//!   kernel's own `hmm-tests` run against the device unmodified.
//! - [`hw`]: the device's DMA memory and queues (page-table pool, command queue with SYNC, DMA
//!   job ring, event ring).
//! - [`mirror`]: contexts: populate, shootdown, fault service, release.
//! - [`regs`]: typed BAR0 registers (`register!`), generated from the ABI.
//! - [`task`]: the current task's fatal-signal check.
//! - [`testing`]: the test build's debugfs interface (injected bugs, knobs); not in production.
//! - [`uarg`]: ioctl arguments: the extensible uAPI structures (`copy_struct_from_user()`
//!   rules) and the fixed test_hmm ones.
//!
//! The mm abstractions it builds on (`kernel::mm::mmu_notifier`, `kernel::hmm`) and the few
//! small ones it needs besides are a patch series against the kernel, in
//! `images/kernel/patches/`: the driver itself has no `unsafe` call into C that they do not wrap.

use core::ptr::null_mut;
use core::sync::atomic::{AtomicPtr, Ordering};
use kernel::prelude::*;
use kernel::workqueue::{OwnedQueue, Queue};

#[path = "../shared-regs/src/abi/mod.rs"]
pub mod abi;
pub mod context_file;
pub mod device;
pub mod dmamap;
pub mod dmamem;
pub mod driver;
pub mod hmm_uapi;
pub mod hw;
pub mod mirror;
#[rustfmt::skip] // Generated (see the file): the generator owns its layout.
pub mod regs;
pub mod task;
#[cfg(zapguard_test)]
pub mod testing;
pub mod uarg;

/// The fault workqueue of the loaded module ([`fault_queue`]).
static FAULT_WQ: AtomicPtr<Queue> = AtomicPtr::new(null_mut());

/// The driver's own workqueue, where device faults are served.
///
/// Work the driver starts must never outlive the module: a fault work item runs module code and
/// holds a context (whose interval notifier's ops live in module text). The system queues are
/// not drained when a module goes, so the driver owns a queue: created before the PCI driver
/// registers, destroyed (which drains it) after the driver unregistered, i.e. after every
/// device unbound and every file closed. `rmmod` therefore waits for a fault work item that is
/// blocked (in a userfaultfd handler, say) instead of unloading under it.
///
/// It exists from before the PCI driver registers until after it unregistered, and only code
/// that runs in that window calls this: interrupt threads (freed at unbind), ioctls (an open
/// file pins the module) and the queue's own work items (drained before it goes).
pub(crate) fn fault_queue() -> Option<&'static Queue> {
    let raw = FAULT_WQ.load(Ordering::Acquire);
    // SAFETY: a non-null `FAULT_WQ` is the live queue of `ZapguardModule::faults`, which is
    // destroyed only at module exit, after every caller described above is gone.
    (!raw.is_null()).then(|| unsafe { &*raw })
}

/// The fault workqueue, published in [`FAULT_WQ`] while it lives (held only to be destroyed,
/// after the driver, when the module goes).
struct FaultQueue {
    _queue: OwnedQueue,
}

impl FaultQueue {
    fn new() -> Result<Self> {
        let q = OwnedQueue::new_unbound(c"zapguard_faults")?;
        let queue: &Queue = &q;
        FAULT_WQ.store(core::ptr::from_ref(queue).cast_mut(), Ordering::Release);
        Ok(Self { _queue: q })
    }
}

impl Drop for FaultQueue {
    fn drop(&mut self) {
        FAULT_WQ.store(null_mut(), Ordering::Release);
        // `_queue` drops next: destroying the queue waits for its work items.
    }
}

/// The module: the fault workqueue and the PCI driver. Fields drop in order, so the driver
/// unregisters (every device unbound) before the queue is drained and destroyed.
#[pin_data]
struct ZapguardModule {
    #[pin]
    driver: kernel::driver::Registration<kernel::pci::Adapter<driver::ZapguardDriver>>,
    faults: FaultQueue,
}

impl kernel::InPlaceModule for ZapguardModule {
    fn init(module: &'static kernel::ThisModule) -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            faults: FaultQueue::new()?,
            driver <- kernel::driver::Registration::new(
                <Self as kernel::ModuleMetadata>::NAME,
                module,
            ),
        })
    }
}

/// The module declaration, with `$test` parameters added to the production ones.
macro_rules! zapguard_module {
    ($($test:tt)*) => {
        kernel::prelude::module! {
            type: ZapguardModule,
            name: "zapguard",
            authors: ["zapguard developers"],
            description: "zapguard: mirror process address spaces into an IOMMU-style device",
            license: "GPL v2",
            params: {
                sync_timeout_ms: u32 {
                    default: 5000,
                    description: "Milliseconds a SYNC may take before the device is failed and fenced",
                },
                job_timeout_ms: u32 {
                    default: 30000,
                    description: "Milliseconds a DMA job may make no progress before the device is failed",
                },
                max_pt_pages: u32 {
                    default: 256,
                    description: "Device page-table pages one context may hold (of 2048)",
                },
                max_contexts: u32 {
                    default: 4,
                    description: "Open contexts (files) one process may hold",
                },
                $($test)*
            },
        }
    };
}

// The production module's parameters bound resources and waits; a test build adds the device
// knobs and the probe failure on purpose.
#[cfg(not(zapguard_test))]
zapguard_module!();

#[cfg(zapguard_test)]
zapguard_module! {
    fault_lag_us: u32 {
        default: 0,
        description: "The device's FAULT_LAG knob whenever no context sets it",
    },
    walk_lag_us: u32 {
        default: 0,
        description: "The device's WALK_LAG knob whenever no context sets it",
    },
    cmd_lag: u32 {
        default: 0,
        description: "The device's CMD_LAG knob (DMA steps) whenever no context sets it",
    },
    iotlb_keep: u32 {
        default: 0,
        description: "1 sets the device's IOTLB_KEEP knob whenever no context sets it",
    },
    sync_lag_us: u32 {
        default: 0,
        description: "The device's SYNC_LAG knob (ABI 1.5) whenever no context sets it",
    },
    probe_fail_at: u32 {
        default: 0,
        description: "Fail the probe on purpose once the device is enabled (1: before the misc devices, 2: at their registration)",
    },
}
