// SPDX-License-Identifier: GPL-2.0

//! The driver's coherent DMA memory (rings, context table, page-table pool, bounce buffers),
//! freed when the device unbinds even while open files still hold the driver's state.
//!
//! Open files outlive the binding: a process may keep `/dev/zapguard` open across an unbind and
//! close it much later. A coherent allocation belongs to the binding, not to the files: behind
//! an IOMMU its mapping lives in the device's domain, and the DMA API requires it back before the
//! driver is released from the device (dma-debug: "device driver has pending DMA allocations
//! while released from device"). So each [`DmaMem`] is a [`Devres`]: the driver core revokes it
//! after the driver's unbind callback, which fences the device first, and frees it then.
//!
//! # Rules
//!
//! - Every CPU access goes through [`DmaMem`]'s methods, each inside one RCU read-side section
//!   (the [`Devres`] guard) that never sleeps: a word, an atomic operation on a word, or at most
//!   [`COPY_CHUNK`] bytes of a copy. Nothing borrowed from the memory outlives the call.
//! - After the unbind every method fails with `ENODEV`. The device is fenced by then, so nothing
//!   was lost: callers treat `ENODEV` as "the device is gone", like a revoked BAR.
//! - A copy from or to user space never sleeps inside the section: each step copies with page
//!   faults disabled (`copy_from_user_nofault`), and a step that hit a missing page faults it in
//!   outside the section (which may sleep, even in a userfaultfd handler a user controls) and is
//!   tried again. So no user holds off the unbind, and the fast path copies once.
//! - The bus address and size are kept outside the revocable, so that they can still be
//!   compared and logged after the unbind; the device never gets them again by then.

use crate::task::fatal_signal_pending;
use core::sync::atomic::AtomicU64;
use kernel::uaccess::UserPtr;
use kernel::{
    device::{Bound, Device},
    devres::Devres,
    dma::Coherent,
    prelude::*,
};

/// The most bytes one copy step moves inside one RCU read-side section.
const COPY_CHUNK: usize = 64 * 1024;

/// Coherent DMA memory of `u64` words, revoked (and freed) when the device unbinds.
///
/// # Invariants
///
/// `addr` and `words` are the bus address and length of the allocation in `mem`, for as long as
/// it is not revoked.
pub(crate) struct DmaMem {
    mem: Devres<Coherent<[u64]>>,
    addr: u64,
    words: usize,
}

impl DmaMem {
    /// `words` zeroed words of coherent memory for `dev`. May sleep.
    pub(crate) fn zeroed(dev: &Device<Bound>, words: usize) -> Result<Self> {
        let buf = Coherent::zeroed_slice(dev, words, GFP_KERNEL)?;
        let addr = buf.dma_address();
        // INVARIANT: `addr` and `words` describe `buf`, which `mem` now owns.
        Ok(Self {
            mem: Devres::new(dev, buf)?,
            addr,
            words,
        })
    }

    /// The memory's bus address (the device's view).
    pub(crate) fn dma_address(&self) -> u64 {
        self.addr
    }

    /// The memory's size in bytes.
    pub(crate) fn size(&self) -> usize {
        self.words * 8
    }

    /// Runs `f` on the allocation, unless the device unbound (`ENODEV`). `f` runs inside an RCU
    /// read-side section: it must not sleep.
    fn with<R>(&self, f: impl FnOnce(&Coherent<[u64]>) -> Result<R>) -> Result<R> {
        let mem = self.mem.try_access().ok_or(ENODEV)?;
        f(&mem)
    }

    /// Word `i`.
    pub(crate) fn read(&self, i: usize) -> Result<u64> {
        self.with(|m| Ok(kernel::io::io_read!(m, [try: i])))
    }

    /// Sets word `i`.
    pub(crate) fn write(&self, i: usize, v: u64) -> Result {
        self.with(|m| {
            kernel::io::io_write!(m, [try: i], v);
            Ok(())
        })
    }

    /// Zeroes `count` words from word `first`, in one step.
    pub(crate) fn zero(&self, first: usize, count: usize) -> Result {
        self.with(|m| {
            for i in first..first.checked_add(count).ok_or(EINVAL)? {
                kernel::io::io_write!(m, [try: i], 0u64);
            }
            Ok(())
        })
    }

    /// Runs `f` on word `i` as an atomic word (the device updates some words with atomic
    /// operations, so every read-modify-write of those must be atomic too).
    pub(crate) fn atomic<R>(&self, i: usize, f: impl FnOnce(&AtomicU64) -> R) -> Result<R> {
        if i >= self.words {
            return Err(EINVAL);
        }
        self.with(|m| {
            // SAFETY: `i` indexes a word of the allocation (checked above against `words`, its
            // length by the type invariant), which is coherent memory, 8-byte aligned, and
            // valid while the guard `with` holds keeps it from being revoked. The CPU accesses
            // it only through this type and the device only with 8-byte loads, stores and
            // atomic ORs, so treating the word as an `AtomicU64` for the call races with
            // nothing non-atomic.
            let word = unsafe { AtomicU64::from_ptr(m.as_mut_ptr().cast::<u64>().add(i)) };
            Ok(f(word))
        })
    }

    /// Checks that `len` bytes at byte `offset` lie inside the memory.
    fn check_span(&self, offset: usize, len: usize) -> Result {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(EINVAL),
        }
    }

    /// Copies `src` into the memory at byte `offset`. Only while the device does not use those
    /// bytes (the caller owns them, such as a bounce buffer before its job is queued).
    pub(crate) fn copy_in(&self, offset: usize, src: &[u8]) -> Result {
        self.check_span(offset, src.len())?;
        for (n, chunk) in src.chunks(COPY_CHUNK).enumerate() {
            self.with(|m| {
                // SAFETY: The span is inside the allocation (checked above), valid while the
                // guard is held, and `chunk` is kernel memory that does not overlap it. The
                // caller guarantees nobody else, the device included, uses these bytes now.
                unsafe {
                    let dst = m.as_mut_ptr().cast::<u8>().add(offset + n * COPY_CHUNK);
                    core::ptr::copy_nonoverlapping(chunk.as_ptr(), dst, chunk.len());
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Copies the memory at byte `offset` into `dst`. Only while the device does not write
    /// those bytes (the caller's job that wrote them has finished).
    pub(crate) fn copy_out(&self, offset: usize, dst: &mut [u8]) -> Result {
        self.check_span(offset, dst.len())?;
        for (n, chunk) in dst.chunks_mut(COPY_CHUNK).enumerate() {
            self.with(|m| {
                // SAFETY: As in `copy_in`, with the roles of the two buffers swapped.
                unsafe {
                    let src = m.as_ptr().cast::<u8>().add(offset + n * COPY_CHUNK);
                    core::ptr::copy_nonoverlapping(src, chunk.as_mut_ptr(), chunk.len());
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Copies `len` bytes from user address `src` into the memory at byte `offset`, under the
    /// same rule as [`Self::copy_in`]. `EFAULT` if a page of the user's range cannot be read,
    /// `EINTR` on a fatal signal, `ENODEV` once the device unbound.
    pub(crate) fn copy_from_user(&self, offset: usize, src: usize, len: usize) -> Result {
        self.user_copy(offset, src, len, UserCopy::FromUser)
    }

    /// Copies `len` bytes of the memory at byte `offset` to user address `dst`, under the same
    /// rule as [`Self::copy_out`]. Errors as for [`Self::copy_from_user`].
    pub(crate) fn copy_to_user(&self, offset: usize, dst: usize, len: usize) -> Result {
        self.user_copy(offset, dst, len, UserCopy::ToUser)
    }

    fn user_copy(&self, offset: usize, user: usize, len: usize, dir: UserCopy) -> Result {
        self.check_span(offset, len)?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(COPY_CHUNK);
            let (at, uaddr) = (offset + done, user.wrapping_add(done));
            if self.with(|m| Ok(dir.copy_nofault(m, at, uaddr, n)))? {
                done += n;
                continue;
            }
            // A page is missing: fault it in outside the RCU section, then try again.
            if dir.fault_in(uaddr, n) != 0 {
                return Err(EFAULT);
            }
            if fatal_signal_pending() {
                return Err(EINTR);
            }
        }
        Ok(())
    }
}

/// Which way a user copy goes.
#[derive(Clone, Copy)]
enum UserCopy {
    FromUser,
    ToUser,
}

impl UserCopy {
    /// Copies `n` bytes between user address `uaddr` and byte `at` of `m` with page faults
    /// disabled; whether every byte was copied. The caller checked that the span is inside `m`.
    fn copy_nofault(self, m: &Coherent<[u64]>, at: usize, uaddr: usize, n: usize) -> bool {
        let user = UserPtr::from_addr(uaddr);
        // SAFETY: `at..at + n` is inside the allocation (the caller checked), which is valid for
        // the duration of the call. The user address is checked by the callee (`access_ok`),
        // which never sleeps: a missing page makes it fail instead.
        let copied = unsafe {
            let mem = m.as_mut_ptr().cast::<u8>().add(at);
            match self {
                Self::FromUser => user.copy_from_nofault(mem, n),
                Self::ToUser => user.copy_to_nofault(mem, n),
            }
        };
        copied.is_ok()
    }

    /// Faults in `n` bytes at user address `uaddr` for this copy (may sleep); returns how many
    /// bytes could not be.
    fn fault_in(self, uaddr: usize, n: usize) -> usize {
        let user = UserPtr::from_addr(uaddr);
        match self {
            Self::FromUser => user.fault_in_readable(n),
            Self::ToUser => user.fault_in_writeable(n),
        }
    }
}
