// SPDX-License-Identifier: GPL-2.0

//! The kernel's `test_hmm` uAPI (`lib/test_hmm_uapi.h`, defined once in [`crate::abi::hmm`]) on
//! `/dev/zapguard_hmm0` and `/dev/zapguard_hmm1`, so that the kernel's own `hmm-tests` run
//! against zapguard unmodified (the guest harness links `/dev/hmm_dmirror0` and `1` to them).
//!
//! Each open file is a context, as one of `/dev/zapguard` is: it mirrors the opener's address
//! space through its own ASID, the device's validator judges every access, and only the opener's
//! address space may use it (`EPERM` otherwise: test_hmm would act on the opener's memory for
//! whoever holds the file; hmm-tests' children open files of their own).
//!
//! - READ (and READ_UNLOCKED) run `DMA_READ` jobs from the mirrored range into the device's
//!   bounce buffer, a megabyte at a time; WRITE runs `DMA_WRITE` jobs the other way. The jobs do
//!   not stall on a translation fault: where one stops, the driver faults the rest of the
//!   command's range in with one populate pass, as test_hmm's `dmirror_fault()` does, and the
//!   next job starts there; `faults` counts these passes (a fresh range: 1). The user buffer is
//!   copied in before the first job and out after the last one, so a failed READ leaves it
//!   untouched, as test_hmm's does; on error the command is not written back.
//! - SNAPSHOT reports what `hmm_range_fault()` sees without faulting, in test_hmm's encoding.
//! - `mmap` maps zeroed driver pages into a `VM_MIXEDMAP` VMA (test_hmm's `mixedmap`).
//! - The commands that need device memory (migration, exclusive access, release, flags) and
//!   unknown ones get `EINVAL`, as test_hmm answers a command it does not know.
//!
//! Errors: `EINVAL` for an unaligned `addr`, zero or overflowing `npages`, more than
//! [`MAX_BYTES`] of data or [`MAX_SNAPSHOT_PAGES`] pages, or once the address space is gone;
//! `EFAULT` for a range the device cannot address, an unmapped or `PROT_NONE` page, or a bad
//! user buffer; `EPERM` for a WRITE of read-only memory or a task of another address space;
//! `EBUSY` when invalidations keep overtaking the faults; `EIO`/`ENODEV` for a failed or unbound
//! device, as on `/dev/zapguard`.

use crate::abi::{dma, event as ev, hmm, pte, uapi};
use crate::context_file::{bounce, check_range, open_context, run_job, staging, usable_context};
use crate::device::Shared;
use crate::mirror::{self, Access, Context, ContextShutdown, MapOut, Walk};
use crate::uarg::{read_arg, write_arg};
use kernel::hmm::Pfn as HmmPfn;
use kernel::{
    fs::File,
    miscdevice::{MiscDevice, MiscDeviceRegistration},
    mm::virt::VmaNew,
    page::Page,
    prelude::*,
    sync::Arc,
    transmute::{AsBytes, FromBytes},
    uaccess::{UserPtr, UserSlice},
};

// SAFETY: `repr(C)`, five `u64` without padding (its size is asserted in the ABI): every byte is
// initialised and any bytes are a valid value.
unsafe impl AsBytes for hmm::HmmDmirrorCmd {}
// SAFETY: See above.
unsafe impl FromBytes for hmm::HmmDmirrorCmd {}

const PAGE: u64 = pte::PAGE_SIZE;
/// The most one READ or WRITE moves: the user's data is staged in a kernel buffer this big.
pub(crate) const MAX_BYTES: u64 = 64 << 20;
/// The most pages one SNAPSHOT reports (one byte each).
pub(crate) const MAX_SNAPSHOT_PAGES: u64 = 1 << 20;
/// Fault passes in a row after which the device still stops at the same page: the command
/// fails with `EBUSY` (invalidations keep undoing what the passes map).
const MAX_FRUITLESS_PASSES: u32 = 16;

/// Which way a data command moves data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Device reads the mirrored range (READ).
    Read,
    /// Device writes the mirrored range (WRITE).
    Write,
}

/// An open `/dev/zapguard_hmm*`: one context.
pub(crate) struct HmmFile {
    shared: Arc<Shared>,
    ctx: Arc<Context>,
}

impl Drop for HmmFile {
    fn drop(&mut self) {
        self.ctx.shutdown();
    }
}

/// A command's range in bytes: page-aligned `addr`, `1..=max` pages, device-addressable.
fn command_bytes(c: &hmm::HmmDmirrorCmd, max_pages: u64) -> Result<u64> {
    if c.addr % PAGE != 0 || c.npages == 0 || c.npages > max_pages {
        return Err(EINVAL);
    }
    let bytes = c.npages * PAGE;
    check_range(c.addr, bytes)?;
    Ok(bytes)
}

/// test_hmm's SNAPSHOT byte for one HMM entry (`dmirror_mkentry()` without device pages).
fn dmirror_prot(p: HmmPfn) -> u8 {
    if p.error() {
        return hmm::HMM_DMIRROR_PROT_ERROR;
    }
    if !p.valid() {
        return hmm::HMM_DMIRROR_PROT_NONE;
    }
    let mut b = if p.is_zero_page() {
        hmm::HMM_DMIRROR_PROT_ZERO
    } else {
        hmm::HMM_DMIRROR_PROT_NONE
    };
    b |= if p.write() {
        hmm::HMM_DMIRROR_PROT_WRITE
    } else {
        hmm::HMM_DMIRROR_PROT_READ
    };
    // PMD_SHIFT and PUD_SHIFT over PAGE_SHIFT on x86-64.
    match p.map_order() {
        9 => b | hmm::HMM_DMIRROR_PROT_PMD,
        18 => b | hmm::HMM_DMIRROR_PROT_PUD,
        _ => b,
    }
}

impl HmmFile {
    fn ctx(&self) -> Result<&Context> {
        usable_context(&self.shared, &self.ctx)
    }

    /// READ, READ_UNLOCKED (`walk`: how the fault passes fault) and WRITE.
    fn data(&self, arg: usize, dir: Dir, walk: Walk) -> Result {
        let mut c: hmm::HmmDmirrorCmd = read_arg(arg)?;
        let len = command_bytes(&c, MAX_BYTES / PAGE)? as usize;
        let ctx = self.ctx()?;
        let mut buf = staging(len)?;
        let user = UserSlice::new(UserPtr::from_addr(c.ptr as usize), len);
        if dir == Dir::Write {
            user.reader().read_slice(&mut buf)?;
        }
        let (pages, faults) = self.move_range(ctx, c.addr, &mut buf, dir, walk)?;
        if dir == Dir::Read {
            UserSlice::new(UserPtr::from_addr(c.ptr as usize), len)
                .writer()
                .write_slice(&buf)?;
        }
        c.cpages = pages;
        c.faults = faults;
        write_arg(arg, &c)
    }

    /// Moves `buf` between the device and `[addr, addr + buf.len())`, a bounce buffer at a
    /// time; where a job stops on a translation fault, faults the rest of the range in with one
    /// populate pass and goes on from there. Returns (pages moved, fault passes).
    fn move_range(
        &self,
        ctx: &Context,
        addr: u64,
        buf: &mut [u8],
        dir: Dir,
        walk: Walk,
    ) -> Result<(u64, u64)> {
        let end = addr + buf.len() as u64;
        let (mut done, mut faults, mut fruitless) = (0usize, 0u64, 0u32);
        let mut last_pass_at = None;
        while done < buf.len() {
            let n = (buf.len() - done).min(uapi::ZG_DMA_BOUNCE_MAX as usize);
            let va = addr + done as u64;
            let st = self.job(ctx, va, &mut buf[done..done + n], dir)?;
            let moved = (st.bytes_done as usize).min(n);
            done += moved;
            match st.status {
                dma::DMA_ST_OK => continue,
                dma::DMA_ST_FAULT
                    if matches!(
                        st.fault_reason,
                        ev::FAULT_NOT_PRESENT | ev::FAULT_PERMISSION
                    ) => {}
                dma::DMA_ST_FAULT => return Err(EFAULT),
                dma::DMA_ST_BAD_JOB => return Err(EINVAL),
                _ => return Err(EIO),
            }
            if moved == 0 && last_pass_at == Some(done) {
                fruitless += 1;
                if fruitless >= MAX_FRUITLESS_PASSES {
                    return Err(EBUSY);
                }
            } else {
                fruitless = 0;
            }
            let access = match dir {
                Dir::Read => Access::Read,
                Dir::Write => Access::Write,
            };
            // Page aligned even if a device with sub-page steps stopped inside a page.
            let from = (addr + done as u64) & !(PAGE - 1);
            mirror::populate(ctx, from, end, access, walk, &mut MapOut::default())?;
            faults += 1;
            last_pass_at = Some(done);
        }
        Ok((buf.len() as u64 / PAGE, faults))
    }

    /// One non-stalling job moving `chunk` (at most the bounce buffer) between the bounce
    /// buffer and `va`; the bytes it moved are in `chunk` (READ) or at `va` (WRITE).
    fn job(&self, ctx: &Context, va: u64, chunk: &mut [u8], dir: Dir) -> Result<dma::DmaStatus> {
        let shared = &self.shared;
        let mut b = bounce(shared, ctx, chunk.len())?;
        let (op, src, dst) = match dir {
            Dir::Read => (dma::DMA_READ, va, 0),
            Dir::Write => {
                b.fill(chunk)?;
                (dma::DMA_WRITE, 0, va)
            }
        };
        let job = dma::DmaJob {
            op,
            flags: dma::DMA_F_IRQ,
            asid: ctx.asid,
            src,
            dst,
            len: chunk.len() as u64,
            aux: b.addr()?,
            ..Default::default()
        };
        let st = run_job(shared, ctx, job, true)?.status;
        if dir == Dir::Read {
            let got = (st.bytes_done as usize).min(chunk.len());
            b.drain(&mut chunk[..got])?;
        }
        Ok(st)
    }

    fn snapshot(&self, arg: usize) -> Result {
        let mut c: hmm::HmmDmirrorCmd = read_arg(arg)?;
        command_bytes(&c, MAX_SNAPSHOT_PAGES)?;
        let ctx = self.ctx()?;
        let n = c.npages as usize;
        let mut out = staging(n)?;
        mirror::cpu_snapshot_with(ctx, c.addr, &mut out, dmirror_prot)?;
        UserSlice::new(UserPtr::from_addr(c.ptr as usize), n)
            .writer()
            .write_slice(&out)?;
        c.cpages = c.npages;
        c.faults = 0;
        write_arg(arg, &c)
    }
}

#[vtable]
impl MiscDevice for HmmFile {
    type Ptr = KBox<Self>;

    fn open(_file: &File, misc: &MiscDeviceRegistration<Self>) -> Result<KBox<Self>> {
        let (shared, ctx) = open_context(misc)?;
        KBox::new(
            Self {
                shared,
                ctx: ctx.clone(),
            },
            GFP_KERNEL,
        )
        .map_err(|e| {
            ctx.shutdown();
            e.into()
        })
    }

    fn ioctl(me: &HmmFile, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        match cmd {
            hmm::HMM_DMIRROR_READ => me.data(arg, Dir::Read, Walk::Locked)?,
            hmm::HMM_DMIRROR_READ_UNLOCKED => me.data(arg, Dir::Read, Walk::Unlocked)?,
            hmm::HMM_DMIRROR_WRITE => me.data(arg, Dir::Write, Walk::Locked)?,
            hmm::HMM_DMIRROR_SNAPSHOT => me.snapshot(arg)?,
            _ => return Err(EINVAL),
        }
        Ok(0)
    }

    /// Zeroed pages of our own, as test_hmm's `dmirror_fops_mmap()` inserts: at most
    /// [`MAX_BYTES`] per mapping (`ENOMEM` beyond), charged to the caller's memory cgroup, and
    /// given up (`EINTR`) when the caller is killed meanwhile.
    fn mmap(_me: &HmmFile, _file: &File, vma: &VmaNew) -> Result {
        if (vma.end() - vma.start()) as u64 > MAX_BYTES {
            return Err(ENOMEM);
        }
        let mixed = vma.set_mixedmap();
        for addr in (vma.start()..vma.end()).step_by(PAGE as usize) {
            if crate::task::fatal_signal_pending() {
                return Err(EINTR);
            }
            let page = Page::alloc_page(GFP_KERNEL_ACCOUNT | __GFP_ZERO)?;
            // The VMA takes its own reference; ours goes when `page` drops.
            mixed.vm_insert_page(addr, &page)?;
        }
        Ok(())
    }
}
