// SPDX-License-Identifier: GPL-2.0

//! The driver's own workqueue, for device-fault service.
//!
//! Work the driver starts must never outlive the module: a fault work item runs module code and
//! holds a context (whose interval notifier's ops live in module text). The system queues are
//! not drained when a module goes, so the driver owns a queue: created before the PCI driver
//! registers, destroyed (which drains it) after the driver unregistered, i.e. after every
//! device unbound and every file closed. `rmmod` therefore waits for a fault work item that is
//! blocked (in a userfaultfd handler, say) instead of unloading under it.

use core::ptr::NonNull;
use kernel::{bindings, prelude::*};

/// An unbound workqueue allocated by `alloc_workqueue()`, destroyed on drop.
///
/// # Invariants
///
/// `raw` is a workqueue returned by `alloc_workqueue()` and not yet destroyed.
pub struct OwnedQueue {
    raw: NonNull<bindings::workqueue_struct>,
}

// SAFETY: A workqueue may be used and destroyed from any thread.
unsafe impl Send for OwnedQueue {}
// SAFETY: Queueing work is thread-safe.
unsafe impl Sync for OwnedQueue {}

impl OwnedQueue {
    /// Allocates an unbound workqueue named `name` (`WQ_UNBOUND`: fault service sleeps in the
    /// mm and needs no particular CPU).
    pub fn new_unbound(name: &'static CStr) -> Result<Self> {
        let flags = bindings::wq_flags_WQ_UNBOUND;
        // SAFETY: `"%s"` with one NUL-terminated string argument is a valid format for the
        // variadic allocator; `name` is `'static`.
        let raw = unsafe {
            bindings::alloc_workqueue_noprof(c"%s".as_char_ptr(), flags, 0, name.as_char_ptr())
        };
        // INVARIANT: a non-null result is a live workqueue.
        Ok(Self {
            raw: NonNull::new(raw).ok_or(ENOMEM)?,
        })
    }

    /// The raw pointer, for `Queue::from_raw` (the module publishes it for the fault work).
    pub fn as_raw(&self) -> *mut bindings::workqueue_struct {
        self.raw.as_ptr()
    }
}

impl Drop for OwnedQueue {
    fn drop(&mut self) {
        // SAFETY: `raw` is live (type invariant) and destroyed only here; `destroy_workqueue()`
        // drains it first, waiting for every work item queued or running, and the owner
        // guarantees nobody queues more (see the module documentation).
        unsafe { bindings::destroy_workqueue(self.raw.as_ptr()) };
    }
}
