// SPDX-License-Identifier: GPL-2.0

//! The current task's state the kernel's Rust API does not offer yet.

use kernel::bindings;

/// Whether the current task has a fatal signal pending (`fatal_signal_pending()`, a static
/// inline with no Rust helper: `SIGKILL` is queued in `pending` once the task is dying).
pub(crate) fn fatal_signal_pending() -> bool {
    let task = kernel::current!();
    if !task.signal_pending() {
        return false;
    }
    let raw = task.as_ptr();
    // SAFETY: `raw` is the current task, valid for the whole call. `pending.signal` is a
    // plain bitmap the C helper also reads without the siglock; a racy read only delays the
    // answer to the next wake-up. SIGKILL is signal 9, bit 8 of the first word.
    let word = unsafe { core::ptr::read_volatile(&raw const (*raw).pending.signal.sig[0]) };
    word & (1 << (bindings::SIGKILL - 1)) != 0
}
