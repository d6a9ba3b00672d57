//! The test build's interface (`ZAPGUARD_TEST=1`): injected driver bugs, device knobs and
//! validator switches, for the validator's self-tests and the benchmarks.
//!
//! A production module has none of it. A test build creates, for every open context,
//! `/sys/kernel/debug/zapguard-<PCI device>/<ASID>/inject` (root only, as debugfs is): writing a
//! [`ZgInject`] there sets the context's injected bugs and the device's knobs. This is not a
//! stable interface: the guest tests are built from the same tree as the module.

/// [`ZgInject::modes`]: the invalidation callback only bumps the sequence (no PTE clear, no
/// commands): the device keeps using zapped pages (`VIOL_STALE`).
pub const ZG_INJ_SKIP_SHOOTDOWN: u32 = 1 << 0;
/// The callback posts its invalidation and SYNC but returns without waiting for the SYNC; with a
/// [`ZgInject::cmd_lag`] the device writes pages the kernel already freed (`VIOL_STALE`).
pub const ZG_INJ_SKIP_SYNC_WAIT: u32 = 1 << 1;
/// Populate ignores `mmu_interval_read_retry()` and commits PTEs from a walk an invalidation
/// overtook: `VIOL_STALE` (tests widen the window with [`ZgInject::populate_lag`]).
pub const ZG_INJ_IGNORE_RETRY: u32 = 1 << 2;
/// Write-protect invalidations (`mprotect()`, COW write-protect on `fork()`) are ignored: the
/// device keeps write access (`VIOL_WRITE_PERM`).
pub const ZG_INJ_KEEP_WRITE: u32 = 1 << 3;
/// Release (`exit_mmap()`) leaves the device context enabled with its mappings (it is only
/// marked released for the validator): a job still running keeps going (`VIOL_RELEASED`, and
/// `VIOL_CTX_RELEASED` at each of its walks: the device was never told of the new entry).
pub const ZG_INJ_KEEP_AFTER_RELEASE: u32 = 1 << 4;
/// Device page-table pages detached by an invalidation go back to the pool before its SYNC
/// completes, while a page walk may still be reading them; another context can then reuse the
/// page and the walk translates through its entries. Observable with a
/// [`ZgInject::walk_lag`]: `VIOL_STALE`.
pub const ZG_INJ_EARLY_TABLE_FREE: u32 = 1 << 5;
/// Disabling the context (release, close) leaves `CMD_CFGI_CTX` out of its commands: the entry
/// is cleared in memory and the ASID's translations are flushed, but the device keeps the
/// context entry it cached. Once the release marks the entry released, a job still queued or
/// running for the ASID walks through the stale cached context: `VIOL_CTX_RELEASED`.
pub const ZG_INJ_SKIP_CTX_INVALIDATE: u32 = 1 << 6;
/// Injected bug (uAPI 8): a READ/WRITE takes its context's bounce buffer without waiting for
/// the jobs abandoned by a killed waiter to retire, so one of them may still write it while
/// the next user fills it. Caught as `phys_unlent` (device ABI 1.8: the driver reclaims the
/// buffer from the device when it takes it).
pub const ZG_INJ_EARLY_BOUNCE_REUSE: u32 = 1 << 7;
/// Every injection mode.
pub const ZG_INJ_ALL: u32 = ZG_INJ_SKIP_SHOOTDOWN
    | ZG_INJ_SKIP_SYNC_WAIT
    | ZG_INJ_IGNORE_RETRY
    | ZG_INJ_KEEP_WRITE
    | ZG_INJ_KEEP_AFTER_RELEASE
    | ZG_INJ_EARLY_TABLE_FREE
    | ZG_INJ_SKIP_CTX_INVALIDATE
    | ZG_INJ_EARLY_BOUNCE_REUSE;

/// [`ZgInject::modes`], not a bug: turn the device's validator off for this context (it
/// sets [`super::pte::CTX_NO_VALIDATE`]), so that benchmarks can measure what validation costs.
/// Test builds only: the production driver has no way to switch the validator off.
pub const ZG_DBG_NO_VALIDATE: u32 = 1 << 16;
/// Debug switch (not a bug): clear the device PTEs on write-protects that keep pages mapped
/// (fork's COW, mkclean, soft-dirty), as the driver did before it made them read-only; for
/// `just bench`'s before/after comparison.
pub const ZG_DBG_ZAP_WRITE_PROTECT: u32 = 1 << 17;
/// Every [`ZgInject::modes`] bit the driver accepts.
pub const ZG_INJ_MODES: u32 = ZG_INJ_ALL | ZG_DBG_NO_VALIDATE | ZG_DBG_ZAP_WRITE_PROTECT;

/// Largest [`ZgInject::populate_lag`] (100 ms; `EINVAL` beyond).
pub const ZG_POPULATE_LAG_MAX_US: u32 = 100_000;

/// What one write to a context's `inject` file sets (exactly `size_of::<ZgInject>()` bytes;
/// other lengths get `EINVAL`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "host",
    derive(zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable)
)]
pub struct ZgInject {
    /// `ZG_INJ_*` bugs to enable on this context (0 turns them off).
    pub modes: u32,
    /// Value for the device's [`super::regs::CMD_LAG`] register (device-wide, reset to 0 when
    /// the context that set it closes).
    pub cmd_lag: u32,
    /// Device failure mode for [`super::regs::FAIL_INJECT`] (`FAIL_*`, 0 = none; device-wide).
    /// The device fails for good: recover it by reloading the driver (see docs/failure-model.md).
    pub dev_fail: u32,
    /// Argument of the failure mode, [`super::regs::FAIL_ARG`] (milliseconds for
    /// `FAIL_SYNC_DELAY`).
    pub dev_fail_arg: u32,
    /// Value for the device's [`super::regs::WALK_LAG`] register, in microseconds (device-wide,
    /// reset to 0 when the context that set it closes); with
    /// [`super::regs::WALK_LAG_IN_STEP`] (bit 31, device ABI 1.8) the device waits inside every
    /// DMA step too.
    pub walk_lag: u32,
    /// Microseconds the driver sleeps in each populate of this context between its
    /// `hmm_range_fault()` and taking the lock to commit the PTEs (0 = none), so that tests can
    /// land an invalidation in that window: a correct driver then retries the walk. At most
    /// [`ZG_POPULATE_LAG_MAX_US`].
    pub populate_lag: u32,
    /// Value for the device's [`super::regs::FAULT_LAG`] register, in microseconds
    /// (device-wide, reset when the context that set it closes); 0 leaves the driver's
    /// `fault_lag_us` module parameter in force.
    pub fault_lag: u32,
    /// 1 sets the device's [`super::regs::IOTLB_KEEP`] (a full IOTLB evicts nothing;
    /// device-wide, reset when the context that set it closes); 0 leaves the driver's
    /// `iotlb_keep` module parameter in force. Other values: `EINVAL`.
    pub iotlb_keep: u32,
    /// Value for the device's [`super::regs::SYNC_LAG`] register, in microseconds
    /// (device-wide, reset when the context that set it closes); 0 leaves the driver's
    /// `sync_lag_us` module parameter in force. Above [`super::regs::SYNC_LAG_MAX`]: `EINVAL`.
    /// A lag beyond the driver's non-blockable spin (20 ms) makes every non-blockable
    /// invalidation give up, which the OOM-reaper tests use.
    pub sync_lag: u32,
}
