// SPDX-License-Identifier: GPL-2.0

//! What the files of both device nodes share (`/dev/zapguard` in [`crate::driver`], the
//! test_hmm-compatible nodes in [`crate::hmm_uapi`]): the misc registration that finds its
//! device's state, opening a context, checking ranges and contexts, and running a job through
//! the context's bounce buffer.

use crate::abi::pte;
use crate::device::{Failure, Shared};
use crate::mirror::{self, Context};
use kernel::{
    miscdevice::{MiscDevice, MiscDeviceOptions, MiscDeviceRegistration},
    prelude::*,
    sync::Arc,
};

/// A misc device registration (`/dev/zapguard`, `/dev/zapguard_hmm*`), paired with the state
/// its files need.
///
/// # Invariants
///
/// Every `MiscDeviceRegistration<T>` of a zapguard file type is the `reg` field of a
/// `MiscReg<T>`: this is the only place one is created, which lets [`open_context`] find
/// `shared` with `container_of!`.
#[pin_data]
pub(crate) struct MiscReg<T: MiscDevice> {
    shared: Arc<Shared>,
    #[pin]
    reg: MiscDeviceRegistration<T>,
}

impl<T: MiscDevice> MiscReg<T> {
    pub(crate) fn new(shared: Arc<Shared>, name: &'static CStr) -> impl PinInit<Self, Error> {
        // `shared` is initialised first: open() can run as soon as `reg` is registered.
        try_pin_init!(Self {
            shared,
            reg <- MiscDeviceRegistration::register(MiscDeviceOptions { name }),
        })
    }
}

/// Opens a context for the calling process on the device behind `misc`.
pub(crate) fn open_context<T: MiscDevice>(
    misc: &MiscDeviceRegistration<T>,
) -> Result<(Arc<Shared>, Arc<Context>)> {
    let reg = core::ptr::from_ref(misc).cast_mut();
    // SAFETY: by `MiscReg`'s invariant `misc` is the `reg` field of a `MiscReg<T>`, which is
    // alive: the misc core calls open() only while the device is registered, and
    // deregistration (in `MiscReg`'s drop) waits for open() under `misc_mtx`.
    let outer = unsafe { &*kernel::container_of!(reg, MiscReg<T>, reg) };
    let shared = outer.shared.clone();
    if shared.bar.try_access().is_none() {
        return Err(ENODEV);
    }
    let ctx = mirror::open(&shared)?;
    Ok((shared, ctx))
}

/// Checks `[va, va + len)`: `EINVAL` if empty or wrapping, `EFAULT` if not device-addressable.
pub(crate) fn check_range(va: u64, len: u64) -> Result {
    let end = va.checked_add(len).ok_or(EINVAL)?;
    if len == 0 {
        return Err(EINVAL);
    }
    if end > pte::VA_LIMIT {
        return Err(EFAULT);
    }
    Ok(())
}

/// The error a user gets for a job the device did not finish: a timeout, a stopped queue or a
/// vanished device fails (and fences) the device first, so that nothing the job used (the
/// bounce buffer, the pages) is released while the device might still touch it.
pub(crate) fn job_error(shared: &Shared, e: Error) -> Error {
    let why = if e == ETIMEDOUT {
        Failure::JobTimeout
    } else if e == ENXIO {
        Failure::Gone
    } else if e == EIO {
        Failure::QueueError
    } else {
        // EINTR (a fatal signal: the job finishes on its own), ENODEV (unbound).
        return e;
    };
    shared.fail(why);
    shared.failure_error()
}

/// Runs one job on `ctx`: submit, wait (killable), account its events.
pub(crate) fn run_job(
    shared: &Shared,
    ctx: &Context,
    job: crate::abi::dma::DmaJob,
    bounce: bool,
) -> Result<crate::hw::JobDone> {
    let jobs = &shared.hw.jobs;
    // A stalled fault of any context (this one's included) is the driver's to serve, not
    // the device's: no timeout blames the device meanwhile.
    let busy = || shared.device_waits_for_driver();
    let seq = jobs
        .submit(&shared.bar, job, bounce, &shared.health, &busy)
        .map_err(|e| job_error(shared, e))?;
    let done = jobs
        .wait(&shared.bar, seq, &shared.health, &busy)
        .map_err(|e| job_error(shared, e))?;
    // The job's events (violations) are in the ring by now: account them before answering.
    shared.on_events();
    ctx.count_job();
    Ok(done)
}

/// A zeroed kernel buffer of `len` bytes (vmalloc'ed when large) for a user's data, charged to
/// the caller's memory cgroup: a user asks for it, so the user's limit bounds it.
pub(crate) fn staging(len: usize) -> Result<KVVec<u8>> {
    let mut v = KVVec::with_capacity(len, GFP_KERNEL_ACCOUNT)?;
    v.resize(len, 0u8, GFP_KERNEL_ACCOUNT)?;
    Ok(v)
}

/// `ctx`'s bounce buffer, at least `len` bytes, once no orphaned job can still write it (under
/// `ZG_INJ_EARLY_BOUNCE_REUSE`, a bug on purpose, at once).
pub(crate) fn bounce<'a>(
    shared: &Shared,
    ctx: &'a Context,
    len: usize,
) -> Result<crate::hw::Bounce<'a>> {
    shared
        .hw
        .jobs
        .bounce(
            &ctx.bounce,
            ctx.asid,
            len,
            (
                &shared.bar,
                &shared.health,
                ctx.injected(crate::abi::testing::ZG_INJ_EARLY_BOUNCE_REUSE),
            ),
            |bytes| shared.coherent(bytes),
        )
        .map_err(|e| job_error(shared, e))
}

/// `ctx`, if the caller may use it: `EIO` once the device failed (`ENODEV` once it is unbound),
/// `EINVAL` once its address space is gone, `EPERM` for a task of another address space (a
/// context mirrors its opener only).
pub(crate) fn usable_context<'a>(shared: &Shared, ctx: &'a Context) -> Result<&'a Context> {
    shared.check_live()?;
    if ctx.released() {
        return Err(EINVAL);
    }
    let task = kernel::current!();
    let mine = task.mm().map(|m| m.as_raw());
    if mine != Some(ctx.mm().as_raw()) {
        return Err(EPERM);
    }
    Ok(ctx)
}
