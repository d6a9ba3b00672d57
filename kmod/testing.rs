// SPDX-License-Identifier: GPL-2.0

//! The test build's interface (`ZAPGUARD_TEST=1` only; a production module has none of it).
//!
//! Each device gets `/sys/kernel/debug/zapguard-<PCI device>/`, and each open context a
//! directory named after its ASID there, with one write-only file, `inject`: writing a
//! [`ZgInject`] to it turns on the context's injected bugs and sets the device's knobs (see
//! [`crate::abi::testing`]). debugfs is root-only, so only root can weaken the driver, and only
//! a module built for testing can be weakened at all.
//!
//! Lifetimes: the context's file holds the [`Context`] it writes to; the open `/dev/zapguard`
//! file owns the debugfs file ([`ContextKnobs`]) and drops it before the context shuts down.
//! Removing a debugfs file waits for the writes in progress, so none outlives the open file.
//! The device directory lives as long as its [`crate::device::Shared`] or a context file in it.

use crate::abi::{regs as abi_regs, testing::*};
use crate::mirror::{self, Context};
use kernel::{
    debugfs::{Dir, File, Reader},
    prelude::*,
    str::CString,
    sync::Arc,
    transmute::{AsBytes, FromBytes},
    uaccess::UserSliceReader,
};

// SAFETY: `ZgInject` is `repr(C)` and made only of `u32`s (its size is asserted in the ABI), so
// every byte is initialised and any bytes are a valid value.
unsafe impl AsBytes for ZgInject {}
// SAFETY: See above.
unsafe impl FromBytes for ZgInject {}

/// A device's debugfs directory.
pub(crate) fn device_dir(pdev: &kernel::pci::Device) -> Result<Dir> {
    let name = CString::try_from_fmt(fmt!("zapguard-{}", pdev.as_ref().name()))?;
    Ok(Dir::new(&name))
}

/// A context's `inject` file, removed when this is dropped.
pub(crate) struct ContextKnobs {
    _file: Pin<KBox<File<InjectTarget>>>,
}

impl ContextKnobs {
    /// Creates `<device dir>/<ASID>/inject` for `ctx`.
    pub(crate) fn new(device: &Dir, ctx: Arc<Context>) -> Result<Self> {
        let name = CString::try_from_fmt(fmt!("{}", ctx.asid))?;
        // The file holds the directory: it goes with the file.
        let dir = device.subdir(&name);
        let file = KBox::pin_init(
            dir.write_only_file(c"inject", InjectTarget { ctx }),
            GFP_KERNEL,
        )?;
        Ok(Self { _file: file })
    }
}

/// What an `inject` file writes to.
struct InjectTarget {
    ctx: Arc<Context>,
}

impl Reader for InjectTarget {
    fn read_from_slice(&self, reader: &mut UserSliceReader) -> Result {
        if reader.len() != core::mem::size_of::<ZgInject>() {
            return Err(EINVAL);
        }
        let i: ZgInject = reader.read()?;
        check(&i)?;
        log(self.ctx.asid, &i);
        mirror::set_inject(&self.ctx, &i)
    }
}

/// `EINVAL` for unknown modes or failure modes and out-of-range knobs.
fn check(i: &ZgInject) -> Result {
    if i.modes & !ZG_INJ_MODES != 0
        || i.dev_fail & !abi_regs::FAIL_MODE_MASK != 0
        || i.populate_lag > ZG_POPULATE_LAG_MAX_US
        || i.iotlb_keep > 1
        || i.sync_lag > abi_regs::SYNC_LAG_MAX
    {
        return Err(EINVAL);
    }
    Ok(())
}

/// Says in the kernel log what a context now injects.
fn log(asid: u32, i: &ZgInject) {
    pr_info!(
        "asid {}: injecting driver bugs {:#x}, device command lag {}, walk lag {} us, fault lag {} us, IOTLB keep {}, SYNC lag {} us, populate lag {} us, device failure {} ({})\n",
        asid,
        i.modes,
        i.cmd_lag,
        i.walk_lag,
        i.fault_lag,
        i.iotlb_keep,
        i.sync_lag,
        i.populate_lag,
        i.dev_fail,
        i.dev_fail_arg
    );
}
