//! Thin wrappers over `/dev/zapguard` for the tests: every call returns the errno on failure so a
//! test can assert the exact error code the driver gave.

use shared_regs::uapi::{ZgInfo, ZG_IOC_GET_INFO};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

/// Path of the driver's misc device.
pub const DEV_PATH: &str = "/dev/zapguard";

/// Opens `/dev/zapguard` read-write.
pub fn open() -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(DEV_PATH)
}

/// Issues `cmd` with a raw argument; returns the ioctl's non-negative result or the errno.
pub fn ioctl_raw(f: &File, cmd: u32, arg: usize) -> io::Result<i32> {
    // SAFETY: the caller chooses `arg`; the kernel validates user pointers and answers a bad one
    // with EFAULT, it never dereferences it in our address space on our behalf.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), cmd as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `ZG_IOC_GET_INFO`.
pub fn get_info(f: &File) -> io::Result<ZgInfo> {
    let mut info = ZgInfo::default();
    ioctl_raw(f, ZG_IOC_GET_INFO, &mut info as *mut ZgInfo as usize)?;
    Ok(info)
}

/// The errno of an `io::Error`, or -1 if it carries none.
pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}
