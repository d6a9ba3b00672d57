//! The kernel's `test_hmm` user API (`lib/test_hmm_uapi.h`), which zapguard also serves on its
//! `/dev/zapguard_hmm*` nodes so that the kernel's own `hmm-tests` run against it unmodified.
//!
//! Only the mirroring commands are implemented by zapguard ([`HMM_DMIRROR_READ`],
//! [`HMM_DMIRROR_WRITE`], [`HMM_DMIRROR_SNAPSHOT`], [`HMM_DMIRROR_READ_UNLOCKED`]); the commands
//! that need device memory (migration, exclusive access, device-private pages) get `EINVAL`,
//! which is what `test_hmm` answers for a command it does not know.
//!
//! | ioctl | meaning |
//! |---|---|
//! | [`HMM_DMIRROR_READ`] | the device reads `npages` from `addr` (faulting them in) into the user buffer `ptr` |
//! | [`HMM_DMIRROR_WRITE`] | the device writes `npages` from the user buffer `ptr` to `addr` (faulting for write) |
//! | [`HMM_DMIRROR_SNAPSHOT`] | one `HMM_DMIRROR_PROT_*` byte per page into `ptr`: what `hmm_range_fault()` sees, without faulting |
//! | [`HMM_DMIRROR_READ_UNLOCKED`] | [`HMM_DMIRROR_READ`], faulting with the variant that may drop the mmap lock (userfaultfd) |
//!
//! `faults` counts fault *passes*: a read of a fresh range faults the rest of the range in one
//! pass (`faults == 1`); `cpages` counts the pages done, also on error.

use super::uapi::{ioc, IOC_READ, IOC_WRITE};

/// `struct hmm_dmirror_cmd`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "host",
    derive(zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable)
)]
pub struct HmmDmirrorCmd {
    /// (in) The address the device reads or writes.
    pub addr: u64,
    /// (in) The user buffer data is copied to or from (SNAPSHOT: the output bytes).
    pub ptr: u64,
    /// (in) Pages to read, write or snapshot.
    pub npages: u64,
    /// (out) Pages done.
    pub cpages: u64,
    /// (out) Device fault passes.
    pub faults: u64,
}

const _: () = assert!(core::mem::size_of::<HmmDmirrorCmd>() == 40);

/// `test_hmm`'s ioctl type byte.
pub const HMM_IOC_MAGIC: u8 = b'H';

const fn cmd(nr: u8) -> u32 {
    ioc(
        IOC_READ | IOC_WRITE,
        HMM_IOC_MAGIC,
        nr,
        core::mem::size_of::<HmmDmirrorCmd>(),
    )
}

/// Device read of `npages` at `addr` into `ptr`.
pub const HMM_DMIRROR_READ: u32 = cmd(0x00);
/// Device write of `npages` from `ptr` to `addr`.
pub const HMM_DMIRROR_WRITE: u32 = cmd(0x01);
/// Migration to device-private memory (not served by zapguard: `EINVAL`).
pub const HMM_DMIRROR_MIGRATE_TO_DEV: u32 = cmd(0x02);
/// Migration back to system memory (not served by zapguard: `EINVAL`).
pub const HMM_DMIRROR_MIGRATE_TO_SYS: u32 = cmd(0x03);
/// Per-page protection snapshot of the CPU page table as HMM sees it.
pub const HMM_DMIRROR_SNAPSHOT: u32 = cmd(0x04);
/// Exclusive device access (not served by zapguard: `EINVAL`).
pub const HMM_DMIRROR_EXCLUSIVE: u32 = cmd(0x05);
/// Check of exclusive access (not served by zapguard: `EINVAL`).
pub const HMM_DMIRROR_CHECK_EXCLUSIVE: u32 = cmd(0x06);
/// Release of device memory (not served by zapguard: `EINVAL`).
pub const HMM_DMIRROR_RELEASE: u32 = cmd(0x07);
/// Driver flags (not served by zapguard: `EINVAL`).
pub const HMM_DMIRROR_FLAGS: u32 = cmd(0x08);
/// [`HMM_DMIRROR_READ`] with the fault variant that may drop the mmap lock.
pub const HMM_DMIRROR_READ_UNLOCKED: u32 = cmd(0x09);

/// SNAPSHOT: `hmm_range_fault()` reported an error (no VMA, or no access).
pub const HMM_DMIRROR_PROT_ERROR: u8 = 0xff;
/// SNAPSHOT: nothing mapped.
pub const HMM_DMIRROR_PROT_NONE: u8 = 0x00;
/// SNAPSHOT: mapped read-only.
pub const HMM_DMIRROR_PROT_READ: u8 = 0x01;
/// SNAPSHOT: mapped writable.
pub const HMM_DMIRROR_PROT_WRITE: u8 = 0x02;
/// SNAPSHOT: mapped by a PMD-sized CPU entry.
pub const HMM_DMIRROR_PROT_PMD: u8 = 0x04;
/// SNAPSHOT: mapped by a PUD-sized CPU entry.
pub const HMM_DMIRROR_PROT_PUD: u8 = 0x08;
/// SNAPSHOT: the shared zero page.
pub const HMM_DMIRROR_PROT_ZERO: u8 = 0x10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // _IOWR('H', nr, struct hmm_dmirror_cmd) as the C preprocessor computes them.
        assert_eq!(HMM_DMIRROR_READ, 0xc028_4800);
        assert_eq!(HMM_DMIRROR_WRITE, 0xc028_4801);
        assert_eq!(HMM_DMIRROR_SNAPSHOT, 0xc028_4804);
        assert_eq!(HMM_DMIRROR_READ_UNLOCKED, 0xc028_4809);
    }
}
