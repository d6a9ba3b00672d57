// SPDX-License-Identifier: GPL-2.0

//! The current task's state.

/// Whether the current task has a fatal signal pending: it is dying, and a wait it can end early
/// should end.
pub(crate) fn fatal_signal_pending() -> bool {
    kernel::current!().fatal_signal_pending()
}
