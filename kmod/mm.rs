// SPDX-License-Identifier: GPL-2.0

//! Thin, safe wrappers for mirroring a process address space: interval notifiers
//! (`mmu_interval_notifier`), HMM range faults (`hmm_range_fault`) and small `mm_struct` helpers.
//!
//! This module holds the `unsafe` glue only; the policy (what to zap, how long to retry, what to
//! do on `Release`) belongs to the driver.
//!
//! C headers: [`include/linux/mmu_notifier.h`](srctree/include/linux/mmu_notifier.h),
//! [`include/linux/hmm.h`](srctree/include/linux/hmm.h),
//! [`include/linux/hmm-dma.h`](srctree/include/linux/hmm-dma.h).
//!
//! # Locking rules for users
//!
//! The mirror is protected by one driver lock (called "the driver lock" below) that serialises
//! [`IntervalInvalidate::invalidate`] against the commit step of a populate:
//!
//! - `mmap_lock` (and `i_mmap_rwsem`, `anon_vma` locks, page locks, reclaim) can be held by the
//!   kernel when it invalidates, so the order is `mmap_lock -> driver lock`: never take the mmap
//!   lock, call [`IntervalNotifier::hmm_range_fault`] or [`IntervalNotifier::read_begin`] with
//!   the driver lock held.
//! - Reclaim can invalidate (lockdep is primed with `fs_reclaim -> invalidate_range_start`), so
//!   no `GFP_KERNEL` allocation (including DMA-coherent page-table pages) may happen with the
//!   driver lock held: preallocate, or allocate before taking it.
//! - [`IntervalNotifier::set_seq`] (in the callback) and [`IntervalNotifier::read_retry`] (in
//!   the commit) must both be called with the driver lock held.
//!
//! # Populate sequence
//!
//! The building blocks follow `dmirror_range_fault()` in `lib/test_hmm.c`; the retry policy is
//! the caller's:
//!
//! ```ignore
//! let mm = notifier.mm().mmget_not_zero().ok_or(EFAULT)?; // mm_users > 0 for the walk.
//! let mut pfns = [HmmPfn::EMPTY; 512];
//! let pfns = &mut pfns[..(end - start) / PAGE_SIZE];
//! let deadline = jiffies() + msecs_to_jiffies(1000);
//! loop {
//!     if time_after(jiffies(), deadline) {
//!         return Err(ETIMEDOUT);
//!     }
//!     let seq = notifier.read_begin(); // May sleep; no driver lock held here.
//!     match notifier.hmm_range_fault(&mm, start, end, HmmRequest::Write, seq, pfns)? {
//!         FaultOutcome::Busy => continue, // Invalidated meanwhile: fresh `read_begin`.
//!         FaultOutcome::Done => {}
//!     }
//!     let guard = notifier.lock.lock(); // The driver lock, also taken by `invalidate`.
//!     if notifier.read_retry(seq) {
//!         continue; // An invalidation ran after `read_begin`: the pfns are stale.
//!     }
//!     write_device_ptes(&guard, start, pfns); // Commit under the lock.
//!     return Ok(());
//! }
//! ```

use core::ops::Deref;
use core::sync::atomic::{AtomicBool, Ordering};
use kernel::{
    bindings,
    device::{Bound, Device},
    error::to_result,
    io::PhysAddr,
    mm::{Mm, MmWithUser},
    page::{PAGE_MASK, PAGE_SHIFT},
    prelude::*,
    sync::{aref::ARef, Mutex},
    time::Jiffies,
    types::Opaque,
};

/// Why the kernel is invalidating a range (`enum mmu_notifier_event`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifierEvent {
    /// `MMU_NOTIFY_UNMAP`: `munmap()`, or `mremap()` moving the range away.
    Unmap,
    /// `MMU_NOTIFY_CLEAR`: page-table entries cleared (`madvise(DONTNEED)`, COW break, page
    /// replacement, reclaim, migration, ...).
    Clear,
    /// `MMU_NOTIFY_PROTECTION_VMA`: protection change of the whole VMA (`mprotect()`).
    ProtectionVma,
    /// `MMU_NOTIFY_PROTECTION_PAGE`: read/write change of individual pages (write-protect for
    /// COW on `fork()`, KSM, ...).
    ProtectionPage,
    /// `MMU_NOTIFY_SOFT_DIRTY`: soft-dirty tracking reset; same pages, same access.
    SoftDirty,
    /// `MMU_NOTIFY_RELEASE`: the address space is being torn down (`exit_mmap()`); `mm_users`
    /// is zero and the range is `[0, usize::MAX)`.
    Release,
    /// `MMU_NOTIFY_MIGRATE`: `migrate_vma_collect()`; [`NotifierRange::owner`] is the
    /// migrating driver's device-private pgmap owner.
    Migrate,
    /// `MMU_NOTIFY_EXCLUSIVE`: conversion to a device-exclusive entry; [`NotifierRange::owner`]
    /// is the owner passed to `make_device_exclusive()`.
    Exclusive,
    /// A value this module does not know (a newer kernel): treat it like [`Self::Clear`].
    Other(u32),
}

impl NotifierEvent {
    fn from_raw(raw: bindings::mmu_notifier_event) -> Self {
        match raw {
            bindings::mmu_notifier_event_MMU_NOTIFY_UNMAP => Self::Unmap,
            bindings::mmu_notifier_event_MMU_NOTIFY_CLEAR => Self::Clear,
            bindings::mmu_notifier_event_MMU_NOTIFY_PROTECTION_VMA => Self::ProtectionVma,
            bindings::mmu_notifier_event_MMU_NOTIFY_PROTECTION_PAGE => Self::ProtectionPage,
            bindings::mmu_notifier_event_MMU_NOTIFY_SOFT_DIRTY => Self::SoftDirty,
            bindings::mmu_notifier_event_MMU_NOTIFY_RELEASE => Self::Release,
            bindings::mmu_notifier_event_MMU_NOTIFY_MIGRATE => Self::Migrate,
            bindings::mmu_notifier_event_MMU_NOTIFY_EXCLUSIVE => Self::Exclusive,
            other => Self::Other(other),
        }
    }
}

/// The range being invalidated, as passed to [`IntervalInvalidate::invalidate`]
/// (`struct mmu_notifier_range`).
///
/// The range is the kernel's whole invalidation, not its intersection with the notifier's
/// interval; for [`NotifierEvent::Release`] it is `[0, usize::MAX)` (not page aligned), so clamp
/// it to the interval before use.
pub struct NotifierRange<'a> {
    raw: &'a bindings::mmu_notifier_range,
}

impl<'a> NotifierRange<'a> {
    /// First address of the range.
    #[inline]
    pub fn start(&self) -> usize {
        self.raw.start
    }

    /// End of the range (exclusive).
    #[inline]
    pub fn end(&self) -> usize {
        self.raw.end
    }

    /// Why the range is invalidated.
    #[inline]
    pub fn event(&self) -> NotifierEvent {
        NotifierEvent::from_raw(self.raw.event)
    }

    /// Whether the callback may sleep (`mmu_notifier_range_blockable()`).
    ///
    /// When `false` (OOM reaper), the callback must not sleep: it may trylock and return `false`
    /// if it cannot make progress without sleeping. When `true`, it must finish the shootdown and
    /// return `true` (a `false` is a kernel `WARN` and is otherwise ignored).
    #[inline]
    pub fn blockable(&self) -> bool {
        let ptr: *const bindings::mmu_notifier_range = self.raw;
        // SAFETY: `ptr` comes from a reference, so it is valid for reads.
        unsafe { bindings::mmu_notifier_range_blockable(ptr) }
    }

    /// The `owner` cookie of the invalidation (set for [`NotifierEvent::Migrate`] and
    /// [`NotifierEvent::Exclusive`] by whoever started it; null otherwise), to be compared by
    /// address with the driver's own cookie to skip self-inflicted invalidations.
    #[inline]
    pub fn owner(&self) -> *const c_void {
        self.raw.owner.cast_const()
    }

    /// Whether [`Self::owner`] is `owner` (and not null).
    #[inline]
    pub fn is_owned_by(&self, owner: *const c_void) -> bool {
        !owner.is_null() && core::ptr::eq(self.owner(), owner)
    }

    /// The address space being invalidated (the notifier's). `mm_users` may be zero (always so
    /// for [`NotifierEvent::Release`]), so only an [`Mm`] is handed out.
    #[inline]
    pub fn mm(&self) -> &'a Mm {
        // SAFETY: `range->mm` is the notifier's mm: the invalidating thread holds a reference for
        // the duration of the callback, and the subscription holds an `mmgrab` until removed
        // (which waits for this callback), so it outlives `'a`, the callback's duration.
        unsafe { Mm::from_raw(self.raw.mm) }
    }
}

/// A section in which the current task must not sleep (`non_block_start()` to
/// `non_block_end()`): with `CONFIG_DEBUG_ATOMIC_SLEEP`, a `might_sleep()` or a schedule inside
/// it is reported ("sleeping function called from invalid context"); without, it costs nothing.
///
/// # Invariants
///
/// With `CONFIG_DEBUG_ATOMIC_SLEEP`, the current task's `non_block_count` was incremented by
/// [`Self::enter`] and is decremented by drop, on the same task (the type is not `Send`).
struct NonBlockSection(core::marker::PhantomData<*mut ()>);

impl NonBlockSection {
    /// `non_block_start()`.
    fn enter() -> Self {
        #[cfg(CONFIG_DEBUG_ATOMIC_SLEEP)]
        // SAFETY: `current_raw()` is the running task, valid while it runs; only the task itself
        // writes its `non_block_count`, so a plain increment is what the C macro does.
        unsafe {
            (*kernel::task::Task::current_raw()).non_block_count += 1
        };
        // INVARIANT: the count (if any) was incremented on this task.
        Self(core::marker::PhantomData)
    }
}

impl Drop for NonBlockSection {
    /// `non_block_end()`.
    fn drop(&mut self) {
        #[cfg(CONFIG_DEBUG_ATOMIC_SLEEP)]
        // SAFETY: as in `enter`; by the type invariants this task's count was incremented.
        unsafe {
            let task = kernel::task::Task::current_raw();
            kernel::warn_on!((*task).non_block_count == 0);
            (*task).non_block_count -= 1;
        }
    }
}

/// The driver side of an [`IntervalNotifier`]: what to do when the kernel invalidates part of
/// the notifier's interval.
///
/// `Sized + 'static` because the value lives inside the notifier and is reached from the C
/// callback until the notifier is dropped.
pub trait IntervalInvalidate: Sync + Sized + 'static {
    /// Stops the device from using any translation in `range` (`ops->invalidate`).
    ///
    /// Called by the kernel from any thread, possibly in reclaim and with `mmap_lock`,
    /// `i_mmap_rwsem`, `anon_vma` or page locks held: take only the driver lock, do not allocate
    /// with `GFP_KERNEL`, never take this mm's mmap lock. Callbacks for different ranges can run
    /// concurrently.
    ///
    /// Unless skipping the event entirely (self-inflicted, see [`NotifierRange::owner`]), take
    /// the driver lock, call `sub.set_seq(cur_seq)` under it, tear down the device mappings and
    /// wait for the device to have stopped using them before returning `true`. If
    /// [`NotifierRange::blockable`] is `false`, never sleep: trylock the driver lock (`false`
    /// if it is taken), and return `false` if the work cannot be finished without sleeping.
    /// Such a call runs inside `non_block_start()`/`non_block_end()`, so a kernel with
    /// `CONFIG_DEBUG_ATOMIC_SLEEP` reports any sleep in it. A
    /// `false` after [`IntervalNotifier::set_seq`] is fine: the core ends the invalidation
    /// sequence either way, so readers retry, and the caller (the OOM reaper) tries again
    /// later.
    fn invalidate(
        &self,
        sub: &IntervalNotifier<Self>,
        range: &NotifierRange<'_>,
        cur_seq: u64,
    ) -> bool;
}

/// An interval notifier: a `struct mmu_interval_notifier` subscribed to `[start, start + length)`
/// of one address space, with the driver data `T` whose [`IntervalInvalidate::invalidate`] is
/// its callback.
///
/// Created inserted by [`IntervalNotifier::insert`] (a pin-initializer, so it can be embedded in
/// an `Arc`, a `KBox` or a larger pinned struct) and removed by [`IntervalNotifier::remove`] or,
/// at the latest, when dropped. Removing may sleep: `mmu_interval_notifier_remove()` waits for
/// in-progress invalidations, so do not remove or drop it with the driver lock held, in atomic
/// context, or from its own callback. A driver whose notifier may outlive the file that owns it
/// (held by a work item) removes it when the file closes, so that no callback into its module
/// can happen afterwards (`exit_mmap()` would otherwise call it later, from any thread).
///
/// # Invariants
///
/// - `raw` was successfully passed to `mmu_interval_notifier_insert()` with `ops` =
///   [`Self::OPS`]; it is inserted from the end of initialisation until the one call of
///   `mmu_interval_notifier_remove()`, made by [`Self::remove`] under `removal` (which drop
///   calls too). `removed` is set before that call and never cleared.
/// - `mm` is an `mmgrab` reference on the address space `raw` was inserted into, so `raw.mm`
///   stays valid for as long as `self`, removed or not; `raw.mm` is never written after insert.
/// - `start` and `last` are the first and last (inclusive) addresses of the interval.
/// - `raw` is only ever the `raw` field of an `IntervalNotifier<T>` with this `T`, so the callback
///   can recover `Self` with `container_of!`.
#[pin_data(PinnedDrop)]
pub struct IntervalNotifier<T: IntervalInvalidate> {
    #[pin]
    data: T,
    start: usize,
    last: usize,
    mm: ARef<Mm>,
    /// Set once removal starts: from then on no new read side may succeed.
    removed: AtomicBool,
    /// Serialises removal, so that every caller of [`Self::remove`] returns only once the
    /// notifier is gone.
    #[pin]
    removal: Mutex<()>,
    /// Initialised last: callbacks can start as soon as it is inserted.
    #[pin]
    raw: Opaque<bindings::mmu_interval_notifier>,
}

// SAFETY: The subscription may be removed (on drop) from any thread, and `T` is dropped along with
// it, so sending it needs `T: Send`.
unsafe impl<T: IntervalInvalidate + Send> Send for IntervalNotifier<T> {}

// SAFETY: All `&self` methods call C functions that are safe to call concurrently (the sequence
// helpers are single word accesses, `mmu_interval_read_begin()` takes the subscription's spinlock,
// `hmm_range_fault()` runs under the mmap lock), and `T: Sync` (a supertrait of
// `IntervalInvalidate`) is what the concurrent callbacks and `data()` share.
unsafe impl<T: IntervalInvalidate> Sync for IntervalNotifier<T> {}

impl<T: IntervalInvalidate> IntervalNotifier<T> {
    /// The ops table for `T`: only `invalidate` (the two-pass `invalidate_start/finish` variant
    /// is not used).
    const OPS: bindings::mmu_interval_notifier_ops = bindings::mmu_interval_notifier_ops {
        invalidate: Some(Self::invalidate_callback),
        ..pin_init::zeroed()
    };

    /// A `'static` reference to [`Self::OPS`] (constant promotion).
    const fn ops() -> &'static bindings::mmu_interval_notifier_ops {
        &Self::OPS
    }

    /// Subscribes to invalidations of `[start, start + length)` in `mm`
    /// (`mmu_interval_notifier_insert()`), with `data` handling them.
    ///
    /// `data` is initialised first; the notifier is inserted last, after which callbacks can run
    /// (even before the initializer returns). `data` can be a plain value, a `pin_init!` (e.g.
    /// with a `new_mutex!` driver lock inside) or a fallible initializer. Fails with `EOVERFLOW`
    /// if `length` is zero or the interval wraps, `ENOMEM` if the kernel cannot allocate the mm's
    /// subscription list, or with `data`'s error; `data` is dropped on failure.
    ///
    /// Takes an [`MmWithUser`] because insertion requires `mm_users > 0` (e.g. `current!().mm()`
    /// in `open()`); the subscription then holds its own `mmgrab` until it is removed, so the
    /// caller's reference need not outlive this call. May sleep (the first insert on an mm takes
    /// the mmap write lock and allocates), so call it without the mmap lock or the driver lock.
    pub fn insert<'a, E>(
        mm: &'a MmWithUser,
        start: usize,
        length: usize,
        data: impl PinInit<T, E> + 'a,
    ) -> impl PinInit<Self, Error> + 'a
    where
        Error: From<E>,
    {
        pin_init::pin_init_scope(move || {
            // The same check as the C code: the interval's last address must not wrap.
            let last = length
                .checked_sub(1)
                .and_then(|len| start.checked_add(len))
                .ok_or(EOVERFLOW)?;
            // The initializer macro shadows field names with references to the initialised
            // fields, so the insert closure uses its own copies.
            let (first, len) = (start, length);
            Ok(try_pin_init!(Self {
                data <- data,
                start,
                last,
                mm: ARef::from(&**mm),
                removed: AtomicBool::new(false),
                removal <- kernel::new_mutex!((), "mmu_interval_notifier_removal"),
                raw <- Opaque::try_ffi_init(move |slot: *mut bindings::mmu_interval_notifier| {
                    // SAFETY: `slot` is valid for writes and pinned: `raw` is a pinned field being
                    // initialised in place, and `PinnedDrop` removes it before the memory goes
                    // away. `mm` has `mm_users > 0` (an `MmWithUser`) for the whole call. `ops`
                    // is `'static`. On failure nothing was inserted and no reference was taken.
                    // INVARIANT: on success `raw` is inserted with `OPS`; `data`, `start` and
                    // `last` are already initialised for the callbacks that can now run.
                    to_result(unsafe {
                        bindings::mmu_interval_notifier_insert(
                            slot,
                            mm.as_raw(),
                            first,
                            len,
                            Self::ops(),
                        )
                    })
                }),
            }))
        })
    }

    /// The C callback (`ops->invalidate`): recovers `Self` and calls the trait method.
    ///
    /// # Safety
    ///
    /// `interval_sub` must be the `raw` field of a live `IntervalNotifier<T>` (guaranteed when
    /// the kernel calls it through [`Self::OPS`]), and `range` must be valid for reads and not
    /// modified for the duration of the call.
    unsafe extern "C" fn invalidate_callback(
        interval_sub: *mut bindings::mmu_interval_notifier,
        range: *const bindings::mmu_notifier_range,
        cur_seq: c_ulong,
    ) -> bool {
        let field = Opaque::cast_from(interval_sub).cast_mut();
        // SAFETY: By the type invariants, the only `mmu_interval_notifier` inserted with `OPS`
        // for this `T` is the `raw` field of an `IntervalNotifier<T>`, and it is alive: removal
        // (in `PinnedDrop`) waits for in-progress callbacks and stops new ones, and every field
        // was initialised before insertion. Only shared references are created, and the C side
        // only accesses `raw`, which is an `Opaque`.
        let this = unsafe { &*kernel::container_of!(field, Self, raw) };
        // SAFETY: The caller passes a range valid for reads that nobody modifies during the call;
        // the `NotifierRange` does not outlive the call.
        let raw = unsafe { &*range };
        let range = NotifierRange { raw };
        // The core wraps only full notifiers' non-blockable callbacks in `non_block_start()`
        // (`mn_hlist_invalidate_range_start`), not interval notifiers' (`mn_itree_invalidate`):
        // without this, a sleep on the OOM reaper's path would go unreported even where
        // `CONFIG_DEBUG_ATOMIC_SLEEP` is on.
        let _no_sleep = (!range.blockable()).then(NonBlockSection::enter);
        // Lossless: `c_ulong` is at most 64 bits.
        this.data.invalidate(this, &range, cur_seq as u64)
    }

    /// The raw subscription.
    #[inline]
    fn as_raw(&self) -> *mut bindings::mmu_interval_notifier {
        self.raw.get()
    }

    /// The driver data.
    #[inline]
    pub fn data(&self) -> &T {
        &self.data
    }

    /// First address of the interval.
    #[inline]
    pub fn start(&self) -> usize {
        self.start
    }

    /// Last address of the interval (inclusive, so that an interval ending at the top of the
    /// address space is representable).
    #[inline]
    pub fn last(&self) -> usize {
        self.last
    }

    /// Whether `[start, end)` is non-empty and lies inside the interval.
    #[inline]
    pub fn contains(&self, start: usize, end: usize) -> bool {
        start < end && start >= self.start && end - 1 <= self.last
    }

    /// The mirrored address space.
    ///
    /// The notifier holds an `mmgrab` reference, so the `mm_struct` (and its `pgd`, see
    /// `crate::testing::pgd_phys`) stays allocated for as long as the notifier exists, even after the process
    /// exited. Use [`Mm::mmget_not_zero`] to get the [`MmWithUser`] that
    /// [`Self::hmm_range_fault`] needs; it fails once the address space is gone.
    #[inline]
    pub fn mm(&self) -> &Mm {
        &self.mm
    }

    /// Removes the notifier (`mmu_interval_notifier_remove()`): on return no callback runs or
    /// will run, whoever removed it. Idempotent; drop does it if nobody did. Afterwards
    /// [`Self::read_retry`] always reports a collision (nothing read from the CPU page tables
    /// can be trusted without invalidations), and [`Self::hmm_range_fault`] fails with `EINVAL`.
    /// May sleep (see the type documentation).
    pub fn remove(&self) {
        let _guard = self.removal.lock();
        if self.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: By the type invariants `raw` is inserted and this is the only removal (under
        // `removal`, after `removed` was found clear). The call waits for in-progress callbacks
        // (which only hold shared references) and prevents new ones; it drops the
        // subscription's `mmgrab` (ours, `self.mm`, keeps the mm). It may sleep, as
        // documented.
        unsafe { bindings::mmu_interval_notifier_remove(self.as_raw()) };
    }

    /// Whether [`Self::remove`] started.
    #[inline]
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Begins a read-side critical section (`mmu_interval_read_begin()`) and returns its
    /// sequence number, to be checked with [`Self::read_retry`].
    ///
    /// Sleeps while an invalidation of this interval is in progress, so it must not be called
    /// with the driver lock (or the mmap lock) held.
    #[inline]
    pub fn read_begin(&self) -> u64 {
        if self.is_removed() {
            // Any sequence: `read_retry` fails for a removed notifier.
            return 0;
        }
        // SAFETY: By the type invariants `raw` is inserted (its `mm` and subscription list are
        // valid); the function can sleep, which this method documents.
        let seq = unsafe { bindings::mmu_interval_read_begin(self.as_raw()) };
        // Lossless: `c_ulong` is at most 64 bits.
        seq as u64
    }

    /// Ends a read-side critical section (`mmu_interval_read_retry()`): `true` if an invalidation
    /// collided with it since [`Self::read_begin`] returned `seq`, in which case the results must
    /// be discarded and the sequence restarted.
    ///
    /// Authoritative only when called with the driver lock held (the lock the callback holds
    /// when calling [`Self::set_seq`]), and the device mappings must then be written before the
    /// lock is released.
    #[inline]
    pub fn read_retry(&self, seq: u64) -> bool {
        if self.is_removed() {
            return true;
        }
        // SAFETY: `raw` is valid (type invariants); the helper only reads `invalidate_seq`.
        // Truncation is impossible: `seq` came from `read_begin`, a `c_ulong`.
        unsafe { bindings::mmu_interval_read_retry(self.as_raw(), seq as c_ulong) }
    }

    /// Tests for a collision without the driver lock (`mmu_interval_check_retry()`), e.g. to
    /// abandon a long operation early. `true` is reliable; `false` is only a hint, the final word
    /// is [`Self::read_retry`] under the driver lock.
    #[inline]
    pub fn check_retry(&self, seq: u64) -> bool {
        // SAFETY: `raw` is valid (type invariants); the helper only does a `READ_ONCE` of
        // `invalidate_seq`. `seq` came from `read_begin`, a `c_ulong`.
        unsafe { bindings::mmu_interval_check_retry(self.as_raw(), seq as c_ulong) }
    }

    /// Records the invalidation sequence (`mmu_interval_set_seq()`).
    ///
    /// Call it only from [`IntervalInvalidate::invalidate`], with the `cur_seq` it was given, with
    /// the driver lock held (the same lock [`Self::read_retry`] is called under), before tearing
    /// down the device mappings. Any other use breaks the retry protocol (but not memory safety).
    #[inline]
    pub fn set_seq(&self, cur_seq: u64) {
        // SAFETY: `raw` is valid (type invariants); the helper does a `WRITE_ONCE` of
        // `invalidate_seq`. `cur_seq` came from the callback, a `c_ulong`.
        unsafe { bindings::mmu_interval_set_seq(self.as_raw(), cur_seq as c_ulong) }
    }

    /// Checks a fault request and builds the `struct hmm_range` for it.
    fn hmm_range(
        &self,
        mm: &MmWithUser,
        start: usize,
        end: usize,
        request: HmmRequest,
        seq: u64,
        pfns: &mut [HmmPfn],
    ) -> Result<bindings::hmm_range> {
        if self.is_removed()
            || !core::ptr::eq(mm.as_raw(), self.mm().as_raw())
            || start & !PAGE_MASK != 0
            || end & !PAGE_MASK != 0
            || !self.contains(start, end)
            || (end - start) >> PAGE_SHIFT != pfns.len()
        {
            return Err(EINVAL);
        }
        Ok(bindings::hmm_range {
            notifier: self.as_raw(),
            notifier_seq: seq as c_ulong,
            start,
            end,
            // `HmmPfn` is a transparent `c_ulong`.
            hmm_pfns: pfns.as_mut_ptr().cast::<c_ulong>(),
            default_flags: request.default_flags(),
            // Ignore the input contents of `pfns`: `default_flags` applies to every page. (A
            // per-page write request would not make a write fault precise anyway: a walk that
            // must fault one page faults every page from it to the end of the walk with the
            // same flags.)
            pfn_flags_mask: 0,
            // No device-private pages.
            dev_private_owner: core::ptr::null_mut(),
        })
    }

    /// Snapshots or faults in `[start, end)` and stores one entry per page in `pfns`
    /// (`hmm_range_fault()` under the mmap read lock, which this function takes and releases).
    ///
    /// `seq` is from [`Self::read_begin`]. `start` and `end` must be page aligned, inside the
    /// interval, and `pfns` must have exactly `(end - start) / PAGE_SIZE` entries; `mm` must be
    /// this notifier's address space. The [`MmWithUser`] (an `mmget` reference, like test_hmm's
    /// `mmget_not_zero()`) keeps `exit_mmap()` from tearing the page tables down under the walk;
    /// a caller that only has the notifier gets one with `notifier.mm().mmget_not_zero()`, and
    /// `None` means the process is gone.
    ///
    /// Returns [`FaultOutcome::Busy`] when the range was invalidated during the walk (the entries
    /// are then partly stale): start again with a fresh [`Self::read_begin`]. On
    /// [`FaultOutcome::Done`] the entries are valid until an invalidation, i.e. use them only
    /// after [`Self::read_retry`] under the driver lock says no collision happened. Errors:
    /// `EINVAL` for bad arguments or an unsupported VMA, `EFAULT` when a page cannot be made
    /// present (no VMA, `PROT_NONE`, ...), `EPERM` for a write to a read-only VMA, `ENOMEM`, or
    /// other fault errors (`EHWPOISON`, ...).
    ///
    /// May sleep. Never call it with the driver lock held (faulting invalidates, and the callback
    /// takes the driver lock). It holds the mmap lock for the whole range, so keep ranges small
    /// (test_hmm uses 32 pages). VMAs whose fault handler must drop the mmap lock (userfaultfd)
    /// fail; [`Self::hmm_range_fault_unlocked`] supports them.
    pub fn hmm_range_fault(
        &self,
        mm: &MmWithUser,
        start: usize,
        end: usize,
        request: HmmRequest,
        seq: u64,
        pfns: &mut [HmmPfn],
    ) -> Result<FaultOutcome> {
        let mut range = self.hmm_range(mm, start, end, request, seq, pfns)?;
        let _mmap = mm.mmap_read_lock();
        // SAFETY: `range.notifier` is inserted (type invariants) and outlives the call; its mm is
        // `mm`, whose mmap read lock `_mmap` holds and whose `mm_users > 0` (`MmWithUser`).
        // `hmm_pfns` points to `pfns`, exclusively borrowed and exactly `(end - start) >>
        // PAGE_SHIFT` entries long, as `hmm_range_fault()` writes. `start < end` are page
        // aligned. `range` is a local that only lives for the call.
        let ret = unsafe { bindings::hmm_range_fault(&mut range) };
        fault_outcome(ret)
    }

    /// Like [`Self::read_begin`] followed by [`Self::hmm_range_fault`], retried inside the kernel
    /// (`hmm_range_fault_unlocked_timeout()`): takes the mmap read lock itself, lets fault handlers
    /// drop it (userfaultfd), and restarts on invalidation until `timeout` jiffies pass (`0`:
    /// forever). Returns the sequence number to pass to [`Self::read_retry`] under the driver
    /// lock; `EBUSY` means the timeout expired, `EINTR` that a fatal signal is pending.
    ///
    /// Same argument rules, sleeping and locking rules as [`Self::hmm_range_fault`].
    pub fn hmm_range_fault_unlocked(
        &self,
        mm: &MmWithUser,
        start: usize,
        end: usize,
        request: HmmRequest,
        timeout: Jiffies,
        pfns: &mut [HmmPfn],
    ) -> Result<u64> {
        let mut range = self.hmm_range(mm, start, end, request, 0, pfns)?;
        // SAFETY: As in `hmm_range_fault`, except that the function takes the mmap read lock
        // itself (we do not hold it) and sets `notifier_seq` with `mmu_interval_read_begin()`.
        to_result(unsafe { bindings::hmm_range_fault_unlocked_timeout(&mut range, timeout) })?;
        // Lossless: `c_ulong` is at most 64 bits.
        Ok(range.notifier_seq as u64)
    }
}

#[pinned_drop]
impl<T: IntervalInvalidate> PinnedDrop for IntervalNotifier<T> {
    fn drop(self: Pin<&mut Self>) {
        // After this no callback can reach `data`, which is dropped next.
        self.remove();
    }
}

impl<T: IntervalInvalidate> Deref for IntervalNotifier<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.data
    }
}

/// The aging callbacks of a full `mmu_notifier` ([`AgingNotifier`]): reclaim and idle-page
/// tracking asking whether the device used pages (`ops->clear_flush_young`, `clear_young`,
/// `test_young`).
///
/// Called from any thread in atomic context (under page-table locks, the rmap locks or RCU):
/// implementations must not sleep. Trylock the driver lock and answer "not young" when it is
/// busy; post invalidations without waiting for them (or spin a bounded time).
pub trait Aging: Sync + Sized + 'static {
    /// Whether the device used a page of `[start, end)` since the last clear, clearing that, so
    /// that the device marks its next use again. `flush` (`clear_flush_young`): the caller needs
    /// the clear to be in effect on return (the device's cached translations gone).
    fn clear_young(&self, start: usize, end: usize, flush: bool) -> bool;

    /// Whether the device used the page at `address` since the last clear; clears nothing.
    fn test_young(&self, address: usize) -> bool;
}

/// A `struct mmu_notifier` registered on an address space for its aging callbacks only (the
/// invalidations are an [`IntervalNotifier`]'s), answered by the `T` that registered it.
///
/// Created unregistered ([`AgingNotifier::new`]), typically as a pinned field of its owner,
/// then [`AgingNotifier::register`]ed; [`AgingNotifier::unregister`] (or dropping it) may sleep:
/// `mmu_notifier_unregister()` waits for callbacks in progress.
///
/// # Invariants
///
/// - `owner` is null, or `raw` is registered on `mm` (by `mmu_notifier_register()` with `ops` =
///   [`Self::OPS`], and not unregistered since) and `owner` points to a `T` that is alive until
///   `raw` is unregistered.
/// - `raw` is only ever the `raw` field of an `AgingNotifier<T>` with this `T`.
#[pin_data(PinnedDrop)]
pub struct AgingNotifier<T: Aging> {
    #[pin]
    raw: Opaque<bindings::mmu_notifier>,
    owner: core::sync::atomic::AtomicPtr<T>,
    mm: core::sync::atomic::AtomicPtr<bindings::mm_struct>,
    /// Serialises [`Self::register`] and [`Self::unregister`]: two callers may race (a file
    /// closing while its owner is dropped elsewhere), and the registration check and the C call
    /// must be one step, or both would unregister (a double `mmdrop`).
    #[pin]
    registration: Mutex<()>,
}

// SAFETY: The callbacks only share `&T` (`T: Sync`), and `register`/`unregister` are serialised
// by `registration`.
unsafe impl<T: Aging> Sync for AgingNotifier<T> {}
// SAFETY: Unregistering (on drop) may happen on any thread; `owner` is a pointer the owner set.
unsafe impl<T: Aging + Send> Send for AgingNotifier<T> {}

impl<T: Aging> AgingNotifier<T> {
    /// Only the aging callbacks: `release` is not needed (the interval notifier sees the exit).
    const OPS: bindings::mmu_notifier_ops = bindings::mmu_notifier_ops {
        clear_flush_young: Some(Self::clear_flush_young_callback),
        clear_young: Some(Self::clear_young_callback),
        test_young: Some(Self::test_young_callback),
        ..pin_init::zeroed()
    };

    /// An unregistered notifier.
    pub fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            raw <- Opaque::zeroed(),
            owner: core::sync::atomic::AtomicPtr::new(core::ptr::null_mut()),
            mm: core::sync::atomic::AtomicPtr::new(core::ptr::null_mut()),
            registration <- kernel::new_mutex!((), "mmu_notifier_registration"),
        })
    }

    /// Registers on `mm` (`mmu_notifier_register()`), with `owner` answering the callbacks.
    /// May sleep (it takes the mmap write lock). `EBUSY` if already registered.
    ///
    /// # Safety
    ///
    /// `owner` must stay alive until [`Self::unregister`] returns or `self` is dropped (as when
    /// `self` is a field of `owner`), and `self` must not move meanwhile (it is pinned in
    /// practice: a field of a pinned owner).
    pub unsafe fn register(&self, owner: &T, mm: &MmWithUser) -> Result {
        let _guard = self.registration.lock();
        if !self.owner.load(Ordering::Acquire).is_null() {
            return Err(EBUSY);
        }
        let raw = self.raw.get();
        // SAFETY: `raw` is ours and not registered (`owner` is null), so nobody else reads it.
        unsafe { (*raw).ops = &Self::OPS };
        // The callbacks can run as soon as it is registered: publish the owner first.
        self.owner
            .store(core::ptr::from_ref(owner).cast_mut(), Ordering::Release);
        self.mm.store(mm.as_raw(), Ordering::Release);
        // SAFETY: `raw` is zero-initialised apart from `ops`, which is `'static`; it does not move
        // (the caller's promise) and stays registered only as long as `owner` lives (ditto).
        // `mm` has `mm_users > 0` for the call. INVARIANT: on success `raw` is registered with
        // `OPS` and `owner` is set.
        let r = to_result(unsafe { bindings::mmu_notifier_register(raw, mm.as_raw()) });
        if r.is_err() {
            self.owner.store(core::ptr::null_mut(), Ordering::Release);
        }
        r
    }

    /// Unregisters (`mmu_notifier_unregister()`): on return no callback runs or will run. May
    /// sleep; a no-op when not registered. Works after the address space exited.
    pub fn unregister(&self) {
        let _guard = self.registration.lock();
        if self.owner.load(Ordering::Acquire).is_null() {
            return;
        }
        let mm = self.mm.load(Ordering::Acquire);
        // SAFETY: By the invariants `raw` is registered on `mm`; the subscription holds an
        // `mmgrab` on `mm` until this call, so `mm` is valid. The call waits for callbacks in
        // progress (SRCU), after which `owner` is no longer reachable from C.
        unsafe { bindings::mmu_notifier_unregister(self.raw.get(), mm) };
        // INVARIANT: unregistered, so `owner` may go.
        self.owner.store(core::ptr::null_mut(), Ordering::Release);
    }

    /// The owner of the subscription the kernel called back.
    ///
    /// # Safety
    ///
    /// `sub` must be the `raw` field of an `AgingNotifier<T>` registered with [`Self::OPS`] (true
    /// when the kernel calls through `OPS`), for the duration of a callback.
    unsafe fn owner<'a>(sub: *mut bindings::mmu_notifier) -> Option<&'a T> {
        let field = Opaque::cast_from(sub).cast_mut();
        // SAFETY: By the invariants `sub` is the `raw` field of a live `AgingNotifier<T>` (it is
        // unregistered, waiting for callbacks, before it goes).
        let this = unsafe { &*kernel::container_of!(field, Self, raw) };
        let owner = this.owner.load(core::sync::atomic::Ordering::Acquire);
        // SAFETY: While registered, `owner` is alive (invariant); a callback runs only while it
        // is registered.
        (!owner.is_null()).then(|| unsafe { &*owner })
    }

    /// # Safety
    ///
    /// Called by the kernel through [`Self::OPS`] only.
    unsafe extern "C" fn clear_flush_young_callback(
        sub: *mut bindings::mmu_notifier,
        _mm: *mut bindings::mm_struct,
        start: c_ulong,
        end: c_ulong,
    ) -> bool {
        // SAFETY: The kernel calls this through `OPS` with our subscription.
        unsafe { Self::owner(sub) }.is_some_and(|o| o.clear_young(start, end, true))
    }

    /// # Safety
    ///
    /// Called by the kernel through [`Self::OPS`] only.
    unsafe extern "C" fn clear_young_callback(
        sub: *mut bindings::mmu_notifier,
        _mm: *mut bindings::mm_struct,
        start: c_ulong,
        end: c_ulong,
    ) -> bool {
        // SAFETY: The kernel calls this through `OPS` with our subscription.
        unsafe { Self::owner(sub) }.is_some_and(|o| o.clear_young(start, end, false))
    }

    /// # Safety
    ///
    /// Called by the kernel through [`Self::OPS`] only.
    unsafe extern "C" fn test_young_callback(
        sub: *mut bindings::mmu_notifier,
        _mm: *mut bindings::mm_struct,
        address: c_ulong,
    ) -> bool {
        // SAFETY: The kernel calls this through `OPS` with our subscription.
        unsafe { Self::owner(sub) }.is_some_and(|o| o.test_young(address))
    }
}

#[pinned_drop]
impl<T: Aging> PinnedDrop for AgingNotifier<T> {
    fn drop(self: Pin<&mut Self>) {
        self.unregister();
    }
}

/// What [`IntervalNotifier::hmm_range_fault`] asks for, for every page of the range
/// (`default_flags`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HmmRequest {
    /// No faulting: report the current CPU mapping (`0`); absent pages read back as empty.
    Snapshot,
    /// Fault in for read (`HMM_PFN_REQ_FAULT`): every entry ends up valid, and writable only if
    /// the CPU mapping already is (a COW-shared page is not).
    Read,
    /// Fault in for write (`HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE`), breaking COW: every entry
    /// ends up valid and writable, or the call fails with `EPERM`/`EFAULT`.
    Write,
}

impl HmmRequest {
    fn default_flags(self) -> c_ulong {
        match self {
            Self::Snapshot => 0,
            Self::Read => bindings::hmm_pfn_flags_HMM_PFN_REQ_FAULT,
            Self::Write => {
                bindings::hmm_pfn_flags_HMM_PFN_REQ_FAULT
                    | bindings::hmm_pfn_flags_HMM_PFN_REQ_WRITE
            }
        }
    }
}

/// How an [`IntervalNotifier::hmm_range_fault`] that did not fail ended.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// Every entry was written.
    Done,
    /// The range was invalidated meanwhile (`-EBUSY`): call [`IntervalNotifier::read_begin`]
    /// again and retry.
    Busy,
}

/// Maps `hmm_range_fault()`'s return value.
fn fault_outcome(ret: c_int) -> Result<FaultOutcome> {
    if ret == 0 {
        Ok(FaultOutcome::Done)
    } else if ret == EBUSY.to_errno() {
        Ok(FaultOutcome::Busy)
    } else {
        Err(Error::from_errno(ret))
    }
}

/// One page's entry from [`IntervalNotifier::hmm_range_fault`] (an HMM pfn: PFN, flags and
/// mapping order packed in an `unsigned long`).
///
/// Entries are only meaningful after a [`FaultOutcome::Done`] whose sequence then passed
/// [`IntervalNotifier::read_retry`] under the driver lock, and only until the lock is released.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HmmPfn(c_ulong);

impl HmmPfn {
    /// An empty entry, to initialise buffers.
    pub const EMPTY: Self = Self(0);

    /// The raw value.
    #[inline]
    pub fn raw(self) -> c_ulong {
        self.0
    }

    /// `HMM_PFN_VALID`: the page is present and at least readable; [`Self::pfn`],
    /// [`Self::phys`] and [`Self::map_order`] are meaningful.
    #[inline]
    pub fn valid(self) -> bool {
        self.0 & bindings::hmm_pfn_flags_HMM_PFN_VALID != 0
    }

    /// `HMM_PFN_WRITE`: the page may be written (only set together with [`Self::valid`]).
    #[inline]
    pub fn write(self) -> bool {
        self.0 & bindings::hmm_pfn_flags_HMM_PFN_WRITE != 0
    }

    /// `HMM_PFN_ERROR`: the page cannot be accessed (no VMA, poisoned, special mapping, ...);
    /// the device access must fail.
    #[inline]
    pub fn error(self) -> bool {
        self.0 & bindings::hmm_pfn_flags_HMM_PFN_ERROR != 0
    }

    /// The page frame number (valid entries only).
    #[inline]
    pub fn pfn(self) -> usize {
        self.0 & !bindings::hmm_pfn_flags_HMM_PFN_FLAGS
    }

    /// The physical address of the page (`hmm_pfn_to_phys()`; valid entries only).
    #[inline]
    pub fn phys(self) -> PhysAddr {
        // SAFETY: Pure arithmetic on the value.
        unsafe { bindings::hmm_pfn_to_phys(self.0) }
    }

    /// The order of the CPU mapping this page is part of (`hmm_pfn_to_map_order()`; valid
    /// entries only): the page lies in a naturally aligned block of `PAGE_SIZE << order` bytes of
    /// virtual address space, mapped contiguously with the same flags (9 = a 2 MiB PMD on
    /// x86-64). The block may extend beyond the faulted range.
    #[inline]
    pub fn map_order(self) -> u32 {
        // SAFETY: Pure arithmetic on the value.
        unsafe { bindings::hmm_pfn_to_map_order(self.0) }
    }

    /// Whether this is the shared zero page (`is_zero_pfn()`; valid entries only): what a read
    /// fault of never-written private anonymous memory maps.
    #[inline]
    pub fn is_zero_page(self) -> bool {
        extern "C" {
            /// The zero page's PFN (`mm/mm_init.c`, exported; x86 has one zero page, no
            /// colours, so `is_zero_pfn()` is an equality).
            static zero_page_pfn: c_ulong;
        }
        // SAFETY: `zero_page_pfn` is set once during early boot, before any user page exists,
        // and only read afterwards.
        self.valid() && self.pfn() == unsafe { zero_page_pfn }
    }
}

/// Returns an `mmgrab` reference to the current task's address space: the reference to keep for a
/// context's lifetime, as it keeps the `mm_struct` (and its `pgd`) allocated without keeping the
/// process's memory alive (`mm_users`), so `exit_mmap()` and the notifier's
/// [`NotifierEvent::Release`] still happen at exit.
///
/// A context that owns an [`IntervalNotifier`] already has one (see [`IntervalNotifier::mm`]).
/// Inserting a notifier needs `mm_users > 0`: in `open()` pass `current!().mm()`, or call
/// [`Mm::mmget_not_zero`] on the result. Fails with `EINVAL` for a task without an address space
/// (a kernel thread).
pub fn current_mm() -> Result<ARef<Mm>> {
    let task = current!();
    let mm: &Mm = task.mm().ok_or(EINVAL)?;
    Ok(ARef::from(mm))
}

/// Levels of the CPU page tables (4, or 5 with LA57), decided at boot.
///
/// `pgtable_l5_enabled()` is a macro over CPU feature bits with no helper; the exported
/// `ptrs_per_p4d` it configures says the same thing (512 entries with LA57, 1 when the p4d level
/// is folded).
pub fn cpu_pt_levels() -> u32 {
    // SAFETY: `ptrs_per_p4d` is written once during early boot (`__ro_after_init`) and only read
    // afterwards, so this read cannot race with a write.
    let p4d = unsafe { bindings::ptrs_per_p4d };
    if p4d > 1 {
        5
    } else {
        4
    }
}

/// Tells the kernel that a device may have written the page at physical address `phys`
/// (`set_page_dirty()` on its folio), so that reclaim and writeback keep what it wrote: a
/// writable CPU PTE can be clean (after `MADV_FREE`, on a clean swap-cache page), and then
/// nothing else marks the folio dirty. A large folio is marked whole through any of its pages.
///
/// Call it while the page is still mapped by the CPU at the address the device used (from an
/// invalidation callback, before the kernel changes the CPU PTE, as RDMA ODP does when it
/// unmaps): the mapping keeps the folio and its `mapping` alive. Pages that are not online
/// memory (device memory, holes) are ignored.
pub fn mark_dirty(phys: PhysAddr) {
    let pfn = (phys >> PAGE_SHIFT) as c_ulong;
    // SAFETY: `pfn_to_online_page()` accepts any PFN and returns null for one that is not
    // online memory.
    let page = unsafe { bindings::pfn_to_online_page(pfn) };
    if page.is_null() {
        return;
    }
    // SAFETY: `page` is an online page mapped by the CPU (the caller's promise), so its folio
    // is alive and cannot be truncated from its mapping before the CPU mapping goes, which
    // happens only after the invalidation callback returns (the same rule `zap_pte_range()`
    // relies on).
    unsafe { bindings::set_page_dirty(page) };
}

/// The DMA addresses one device uses for a run of user pages (`struct hmm_dma_map`,
/// `include/linux/hmm-dma.h`): entry `i` maps the page [`Self::map`] was last given for it,
/// `PAGE_SIZE` bytes, bidirectional. Through an IOMMU the run shares one IOVA range (entry `i`
/// at offset `i * PAGE_SIZE`); without one the address is the physical one.
///
/// The device may use an address from [`Self::map`] until [`Self::unmap`] (or the drop) of
/// that entry, and the caller must not call either before the device stopped using it (a TLB
/// shootdown completed): unmapping only tells the IOMMU to forget it.
///
/// # Invariants
///
/// `map` was set up by `hmm_dma_map_alloc()` for `dev` with `entries` entries of `PAGE_SIZE`,
/// and is freed (every mapped entry unmapped first) only by the drop. An entry of `pfn_list`
/// with `HMM_PFN_DMA_MAPPED` holds the page it maps.
pub struct HmmDmaMap {
    dev: ARef<Device>,
    map: bindings::hmm_dma_map,
    entries: usize,
}

/// The `struct device` behind `dev`.
fn raw_device(dev: &Device) -> *mut bindings::device {
    // CAST: `Device` is a transparent wrapper of `Opaque<bindings::device>`, itself a
    // transparent wrapper of `struct device` (the same cast the PCI abstraction makes).
    core::ptr::from_ref(dev)
        .cast::<bindings::device>()
        .cast_mut()
}

// SAFETY: The map's lists are owned by the value (allocated for it, freed by its drop) and the
// functions that use them may run on any thread.
unsafe impl Send for HmmDmaMap {}

impl HmmDmaMap {
    /// Flags `hmm_dma_map_pfn()` keeps in an entry between calls.
    const STICKY: c_ulong = bindings::hmm_pfn_flags_HMM_PFN_DMA_MAPPED
        | bindings::hmm_pfn_flags_HMM_PFN_P2PDMA
        | bindings::hmm_pfn_flags_HMM_PFN_P2PDMA_BUS;

    /// A map of `entries` pages for `dev` (may sleep; `ENOMEM`). `EOPNOTSUPP` when the device
    /// cannot DMA to user pages in place: its addressing is limited or its DMA needs bounce
    /// buffers or cache maintenance (SWIOTLB), which HMM's ownership rules cannot follow.
    pub fn new(dev: &Device<Bound>, entries: usize) -> Result<Self> {
        // SAFETY: All-zero is a valid `struct hmm_dma_map` (null lists, no IOVA).
        let mut map: bindings::hmm_dma_map = unsafe { core::mem::zeroed() };
        // SAFETY: `dev` is a bound device, `map` is writable; on success the function
        // allocated the lists and possibly an IOVA range, which the drop frees.
        to_result(unsafe {
            bindings::hmm_dma_map_alloc(raw_device(dev), &mut map, entries, kernel::page::PAGE_SIZE)
        })?;
        let dev: &Device = dev;
        Ok(Self {
            dev: dev.into(),
            map,
            entries,
        })
    }

    /// Entry `idx` of the PFN list (`idx < entries`).
    fn slot(&mut self, idx: usize) -> Result<&mut c_ulong> {
        if idx >= self.entries {
            return Err(EINVAL);
        }
        // SAFETY: `pfn_list` has `entries` elements (type invariant) and `&mut self` makes this
        // the only reference to one of them.
        Ok(unsafe { &mut *self.map.pfn_list.add(idx) })
    }

    /// Whether entry `idx` is mapped.
    pub fn is_mapped(&mut self, idx: usize) -> bool {
        self.slot(idx)
            .is_ok_and(|s| *s & bindings::hmm_pfn_flags_HMM_PFN_DMA_MAPPED != 0)
    }

    /// The physical address of the page entry `idx` maps, if it is mapped.
    pub fn phys(&mut self, idx: usize) -> Option<PhysAddr> {
        let s = *self.slot(idx).ok()?;
        (s & bindings::hmm_pfn_flags_HMM_PFN_DMA_MAPPED != 0).then(|| HmmPfn(s).phys())
    }

    /// Maps the page of `pfn` (a valid entry from a range fault) as entry `idx` and returns its
    /// DMA address. An entry already mapping that page keeps its address; one mapping another
    /// page is `EBUSY` (unmap it first, once the device stopped using it). `ENOMEM` when the
    /// mapping fails.
    pub fn map(&mut self, idx: usize, pfn: HmmPfn) -> Result<u64> {
        if !pfn.valid() || pfn.error() {
            return Err(EINVAL);
        }
        let slot = self.slot(idx)?;
        let mapped = *slot & bindings::hmm_pfn_flags_HMM_PFN_DMA_MAPPED != 0;
        if mapped && HmmPfn(*slot).pfn() != pfn.pfn() {
            return Err(EBUSY);
        }
        *slot = (*slot & Self::STICKY) | (pfn.raw() & !Self::STICKY);
        // SAFETY: `map` was set up for `dev` (type invariant), `idx < entries`, and entry `idx`
        // holds a valid PFN of an ordinary page (no P2P state is needed for those).
        let addr = unsafe {
            bindings::hmm_dma_map_pfn(
                raw_device(&self.dev),
                &mut self.map,
                idx,
                core::ptr::null_mut(),
            )
        };
        if addr == !0 {
            return Err(ENOMEM);
        }
        Ok(addr)
    }

    /// Unmaps entry `idx`; returns whether it was mapped.
    pub fn unmap(&mut self, idx: usize) -> bool {
        if !self.is_mapped(idx) {
            return false;
        }
        // SAFETY: `map` was set up for `dev` (type invariant) and `idx < entries`.
        unsafe { bindings::hmm_dma_unmap_pfn(raw_device(&self.dev), &mut self.map, idx) }
    }

    /// Entries mapped.
    pub fn mapped(&mut self) -> usize {
        (0..self.entries).filter(|&i| self.is_mapped(i)).count()
    }
}

impl Drop for HmmDmaMap {
    fn drop(&mut self) {
        for idx in 0..self.entries {
            self.unmap(idx);
        }
        // SAFETY: `map` was set up for `dev` (type invariant) and nothing is mapped any more.
        unsafe { bindings::hmm_dma_map_free(raw_device(&self.dev), &mut self.map) };
    }
}
