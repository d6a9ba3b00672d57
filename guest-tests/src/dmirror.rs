//! The kernel's own mirroring test driver, `lib/test_hmm.c` (`/dev/hmm_dmirror0`), for side-by-side
//! runs of the same scenario. Its uAPI is the kernel's (`lib/test_hmm_uapi.h`), defined once in `shared_regs::hmm`.

use std::fs::{File, OpenOptions};
use std::io;

pub use shared_regs::hmm::{HmmDmirrorCmd as DmirrorCmd, HMM_DMIRROR_READ, HMM_DMIRROR_WRITE};

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
    crate::dev::ioctl_rw(f, op, &mut c)?;
    Ok(c)
}
