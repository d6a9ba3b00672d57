//! Thin wrappers over `/dev/zapguard` for the tests: every call returns the errno on failure so a
//! test can assert the exact error code the driver gave.

use shared_regs::uapi::{ZgInfo, ZG_IOC_GET_INFO};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

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

/// Issues `cmd` with `arg` as its in/out structure. The bounds say what makes this sound: the
/// kernel reads the structure's bytes (`IntoBytes`: no padding, every byte initialised) and
/// writes any bytes back (`FromBytes`: every bit pattern is a valid `T`); the ioctl number's
/// encoded size must be `T`'s, which the ABI asserts for each one.
pub fn ioctl_rw<T: zerocopy::IntoBytes + zerocopy::FromBytes>(
    f: &File,
    cmd: u32,
    arg: &mut T,
) -> io::Result<i32> {
    ioctl_raw(f, cmd, arg as *mut T as usize)
}

/// `ZG_IOC_GET_INFO`.
pub fn get_info(f: &File) -> io::Result<ZgInfo> {
    let mut info = ZgInfo::default();
    ioctl_rw(f, ZG_IOC_GET_INFO, &mut info)?;
    Ok(info)
}

/// The errno of an `io::Error`, or -1 if it carries none.
pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

use shared_regs::uapi::{
    ZgDma, ZgInject, ZgMap, ZgSnapshot, ZgStats, ZG_IOC_DMA, ZG_IOC_INJECT, ZG_IOC_MAP,
    ZG_IOC_SNAPSHOT, ZG_IOC_STATS,
};

/// `ZG_IOC_MAP` of `[va, va + len)`.
pub fn map(f: &File, va: usize, len: usize, flags: u32) -> io::Result<ZgMap> {
    let mut m = ZgMap {
        va: va as u64,
        len: len as u64,
        flags,
        ..Default::default()
    };
    ioctl_rw(f, ZG_IOC_MAP, &mut m)?;
    Ok(m)
}

/// `ZG_IOC_DMA`; on failure the errno comes with the filled-in job record.
pub fn dma(f: &File, mut d: ZgDma) -> Result<ZgDma, (io::Error, ZgDma)> {
    match ioctl_rw(f, ZG_IOC_DMA, &mut d) {
        Ok(_) => Ok(d),
        Err(e) => Err((e, d)),
    }
}

/// A DMA job description (outputs zeroed).
pub fn job(op: u8, src: usize, dst: usize, len: usize, aux: u64) -> ZgDma {
    ZgDma {
        op: op.into(),
        src: src as u64,
        dst: dst as u64,
        len: len as u64,
        aux,
        ..Default::default()
    }
}

/// `ZG_IOC_SNAPSHOT` of `npages` pages at `va`.
pub fn snapshot(f: &File, va: usize, npages: usize) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; npages];
    let mut s = ZgSnapshot {
        va: va as u64,
        npages: npages as u64,
        out: out.as_mut_ptr() as u64,
    };
    ioctl_rw(f, ZG_IOC_SNAPSHOT, &mut s)?;
    Ok(out)
}

/// Snapshot bytes by flag name, for messages: `[DEV_PRESENT | CPU_VALID, -]`.
pub fn snap_names(snap: &[u8]) -> String {
    let names: Vec<String> = snap
        .iter()
        .map(|&b| shared_regs::flags::names::<shared_regs::flags::Snap>(b).to_string())
        .collect();
    format!("[{}]", names.join(", "))
}

/// `ZG_IOC_STATS`.
pub fn stats(f: &File) -> io::Result<ZgStats> {
    let mut s = ZgStats::default();
    ioctl_rw(f, ZG_IOC_STATS, &mut s)?;
    Ok(s)
}

/// `ZG_IOC_INJECT`.
pub fn inject(f: &File, modes: u32, cmd_lag: u32) -> io::Result<()> {
    inject_all(
        f,
        ZgInject {
            modes,
            cmd_lag,
            ..Default::default()
        },
    )
}

/// `ZG_IOC_INJECT` with every field (device failure modes, walk lag).
pub fn inject_all(f: &File, mut i: ZgInject) -> io::Result<()> {
    ioctl_rw(f, ZG_IOC_INJECT, &mut i).map(|_| ())
}

/// Room for one `SCM_RIGHTS` descriptor, in words so that the `cmsghdr` in it is aligned.
type FdCmsg = [u64; 4];

/// A `msghdr` for one byte in `iov` and one descriptor's control message in `ctl`.
fn fd_msghdr(iov: &mut libc::iovec, ctl: &mut FdCmsg) -> libc::msghdr {
    // SAFETY: a zeroed `msghdr` is valid (null pointers, zero lengths; musl's padding too).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.as_mut_ptr().cast();
    // SAFETY: pure arithmetic on the length.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    assert!(space <= std::mem::size_of::<FdCmsg>());
    msg.msg_controllen = space as _;
    msg
}

/// Sends `fd` over `sock` (`SCM_RIGHTS`): the receiver gets a descriptor of the same open file,
/// which the message in flight keeps open even if the sender exits before it is received.
pub fn send_fd(sock: &UnixStream, fd: RawFd) -> io::Result<()> {
    let mut byte = [0u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut ctl: FdCmsg = [0; 4];
    let msg = fd_msghdr(&mut iov, &mut ctl);
    // SAFETY: `msg` has room for one control message (checked in `fd_msghdr`), so the first
    // header is non-null and inside `ctl`, and its data has room for one descriptor.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
    }
    // SAFETY: `msg` points at `iov`, `byte` and `ctl`, all alive for the call.
    if unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) } != 1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives a descriptor sent with [`send_fd`], without waiting (`EAGAIN` if none is there).
pub fn recv_fd(sock: &UnixStream) -> io::Result<File> {
    let mut byte = [0u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut ctl: FdCmsg = [0; 4];
    let mut msg = fd_msghdr(&mut iov, &mut ctl);
    let flags = libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    // SAFETY: `msg` points at buffers alive for the call, with their true lengths.
    if unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) } != 1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled at most `msg_controllen` bytes of `ctl` and set the length;
    // the header is checked before its data is read.
    let fd = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() || (*c).cmsg_level != libc::SOL_SOCKET || (*c).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "no descriptor"));
        }
        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>())
    };
    // SAFETY: the kernel just installed `fd` in our table for us; nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `MADV_COLLAPSE` (Linux 6.1; not in every libc's headers).
pub const MADV_COLLAPSE: i32 = 25;
/// `MREMAP_DONTUNMAP` (Linux 5.7; not in every libc's headers).
pub const MREMAP_DONTUNMAP: i32 = 4;

/// An anonymous private mapping, unmapped on drop (unless already unmapped by the test).
pub struct Mapping {
    /// First address.
    pub addr: usize,
    /// Length in bytes.
    pub len: usize,
    live: bool,
}

impl Mapping {
    /// `mmap(len, prot, flags)` with `fd` (-1 for anonymous); `align` > 4096 over-allocates and
    /// trims so that the start is aligned (for THP).
    pub fn new(len: usize, prot: i32, flags: i32, fd: i32, align: usize) -> io::Result<Self> {
        let total = len + if align > 4096 { align } else { 0 };
        // SAFETY: a fresh mapping at an address of the kernel's choosing aliases nothing.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), total, prot, flags, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = p as usize;
        let start = if align > 4096 {
            base.next_multiple_of(align)
        } else {
            base
        };
        if align > 4096 {
            // SAFETY: trimming the parts of our own fresh mapping outside [start, start + len).
            unsafe {
                if start > base {
                    libc::munmap(base as *mut _, start - base);
                }
                let end = start + len;
                if base + total > end {
                    libc::munmap(end as *mut _, base + total - end);
                }
            }
        }
        Ok(Self {
            addr: start,
            len,
            live: true,
        })
    }

    /// Takes ownership of an existing mapping (e.g. the result of `mremap`).
    pub fn adopt(addr: usize, len: usize) -> Self {
        Self {
            addr,
            len,
            live: true,
        }
    }

    /// A view of part of another mapping, which stays its owner's to unmap.
    pub fn view(addr: usize, len: usize) -> Self {
        Self {
            addr,
            len,
            live: false,
        }
    }

    /// Private anonymous read-write memory.
    pub fn anon(len: usize) -> io::Result<Self> {
        Self::new(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    }

    /// Private anonymous memory aligned to 2 MiB and backed by transparent huge pages once
    /// touched (the guest kernel's THP mode is `always`).
    pub fn anon_huge(len: usize) -> io::Result<Self> {
        let m = Self::new(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            2 << 20,
        )?;
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(m.addr as *mut _, len, libc::MADV_HUGEPAGE) };
        Ok(m)
    }

    /// The memory as bytes.
    ///
    /// The device may write it behind the compiler's back; tests read it only after the DMA
    /// ioctl returned (a syscall is a compiler barrier for memory reachable from the kernel).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: [addr, addr + len) is a live readable mapping we own.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }

    /// The memory as mutable bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: [addr, addr + len) is a live read-write mapping we own, borrowed exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }

    /// `madvise(advice)` on `[addr + off, addr + off + len)`.
    pub fn madvise(&self, off: usize, len: usize, advice: i32) -> io::Result<()> {
        // SAFETY: advice on part of our own mapping.
        if unsafe { libc::madvise((self.addr + off) as *mut _, len, advice) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `mprotect(prot)` on the whole mapping.
    pub fn protect(&self, prot: i32) -> io::Result<()> {
        // SAFETY: changes protection of our own mapping; `bytes()` is not used while it is
        // inaccessible.
        if unsafe { libc::mprotect(self.addr as *mut _, self.len, prot) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `munmap` now.
    pub fn unmap(&mut self) {
        if self.live {
            // SAFETY: our own mapping, no longer used.
            unsafe { libc::munmap(self.addr as *mut _, self.len) };
            self.live = false;
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.unmap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_descriptor_passes_over_a_socket_and_outlives_its_sender() {
        let (tx, rx) = UnixStream::pair().unwrap();
        assert_eq!(
            recv_fd(&rx).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "nothing sent: no wait"
        );
        let (x, mut y) = UnixStream::pair().unwrap();
        send_fd(&tx, x.as_raw_fd()).unwrap();
        // The sender's descriptor goes before the message is received: the file stays open.
        drop(x);
        drop(tx);
        let mut got = recv_fd(&rx).unwrap();
        got.write_all(b"zg").unwrap();
        let mut buf = [0u8; 2];
        y.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"zg");
    }
}
