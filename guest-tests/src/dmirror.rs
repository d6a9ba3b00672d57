//! The kernel's own mirroring test driver, `lib/test_hmm.c` (`/dev/hmm_dmirror0`), for side-by-side
//! runs of the same scenario. Its uAPI is the kernel's (`lib/test_hmm_uapi.h`), reproduced here.

use shared_regs::uapi::{ioc, IOC_READ, IOC_WRITE};
use std::fs::{File, OpenOptions};
use std::io;

/// `struct hmm_dmirror_cmd`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DmirrorCmd {
    pub addr: u64,
    pub ptr: u64,
    pub npages: u64,
    pub cpages: u64,
    pub faults: u64,
}

const fn cmd(nr: u8) -> u32 {
    ioc(
        IOC_READ | IOC_WRITE,
        b'H',
        nr,
        std::mem::size_of::<DmirrorCmd>(),
    )
}

/// `HMM_DMIRROR_READ`: the mirror copies `npages` from `addr` (faulting them in) to `ptr`.
pub const HMM_DMIRROR_READ: u32 = cmd(0x00);
/// `HMM_DMIRROR_WRITE`: the mirror copies `npages` from `ptr` to `addr` (faulting for write).
pub const HMM_DMIRROR_WRITE: u32 = cmd(0x01);

/// Opens `/dev/hmm_dmirror0`.
pub fn open() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/hmm_dmirror0")
}

/// Issues a test_hmm command on `npages` at `addr`, with the user buffer `ptr`.
pub fn run(f: &File, op: u32, addr: usize, ptr: *mut u8, npages: usize) -> io::Result<DmirrorCmd> {
    let mut c = DmirrorCmd {
        addr: addr as u64,
        ptr: ptr as u64,
        npages: npages as u64,
        ..Default::default()
    };
    crate::dev::ioctl_raw(f, op, &mut c as *mut DmirrorCmd as usize)?;
    Ok(c)
}
