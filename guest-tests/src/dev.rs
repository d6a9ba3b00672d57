//! Thin wrappers over `/dev/zapguard` for the tests: every call returns the errno on failure so a
//! test can assert the exact error code the driver gave.

use shared_regs::uapi::{ZgInfo, ZG_IOC_GET_INFO};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// Path of the driver's misc device.
pub const DEV_PATH: &str = "/dev/zapguard";

/// Opens `/dev/zapguard` read-write.
pub fn open() -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(DEV_PATH)
}

/// Issues `cmd` with a raw argument; returns the ioctl's non-negative result or the errno.
/// The page size of the guest (x86-64), for test buffers.
pub const PG: usize = 4096;

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

use shared_regs::testing::ZgInject;
use shared_regs::uapi::{
    ZgDma, ZgMap, ZgSnapshot, ZgStats, ZG_IOC_DMA, ZG_IOC_MAP, ZG_IOC_SNAPSHOT, ZG_IOC_STATS,
};
use std::io::Write as _;

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
        ..Default::default()
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

/// Writes `modes` and `cmd_lag` to the context's debugfs `inject` file (see [`inject_all`]).
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

/// Writes `i` to the test build's `/sys/kernel/debug/zapguard-<PCI device>/<ASID>/inject` for
/// `f`'s context: its injected bugs and the device's knobs. A test that calls this starts with
/// [`crate::test_build`], which skips it on the production module (no such file there).
pub fn inject_all(f: &File, i: ZgInject) -> io::Result<()> {
    let asid = stats(f)?.asid;
    let path = format!("{}/{asid}/inject", debugfs_dir()?);
    // SAFETY: `ZgInject` is `repr(C)` and made only of `u32`s: its bytes are all initialised.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&i as *const ZgInject).cast::<u8>(),
            std::mem::size_of::<ZgInject>(),
        )
    };
    let mut file = std::fs::OpenOptions::new().write(true).open(&path)?;
    // One write: the driver takes a whole structure or nothing.
    match file.write(bytes)? {
        n if n == bytes.len() => Ok(()),
        n => Err(io::Error::other(format!("{path}: short write ({n} bytes)"))),
    }
}

/// Where debugfs is mounted in the guest (images/initramfs/init).
pub const DEBUGFS: &str = "/sys/kernel/debug";

/// The bound device's test-build debugfs directory, `/sys/kernel/debug/zapguard-<PCI device>`
/// (`ENOENT` on a production module).
pub fn debugfs_dir() -> io::Result<String> {
    let mut dirs = std::fs::read_dir(DEBUGFS)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("zapguard-"));
    match (dirs.next(), dirs.next()) {
        (Some(d), None) => Ok(format!("{DEBUGFS}/{d}")),
        (None, _) => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        (Some(a), Some(b)) => Err(io::Error::other(format!(
            "more than one zapguard device in {DEBUGFS}: {a}, {b}"
        ))),
    }
}

/// Hands one open file from a child to its parent without sockets (the guest kernel has no
/// `CONFIG_UNIX`): the child writes the descriptor's number into a pipe and waits; the parent
/// copies the descriptor out of the child with `pidfd_getfd()` (Linux 5.6; root may) and lets
/// it go on. The parent's copy keeps the file open after the child exits.
pub struct Handoff {
    number: [File; 2],
    done: [File; 2],
}

/// A pipe as (read end, write end).
pub fn pipe() -> io::Result<[File; 2]> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these descriptors; each is owned once.
    Ok(fds.map(|fd| unsafe { File::from_raw_fd(fd) }))
}

/// `syscall(nr, a, b, c)`, for the pidfd calls libc may not wrap; the result or the errno.
pub fn syscall3(
    nr: libc::c_long,
    a: libc::c_long,
    b: libc::c_long,
    c: libc::c_long,
) -> io::Result<i64> {
    // SAFETY: used for syscalls that take integers (and a null pointer as 0) only.
    let r = unsafe { libc::syscall(nr, a, b, c, 0 as libc::c_long) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Handoff {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            number: pipe()?,
            done: pipe()?,
        })
    }

    /// The child's side: offers `fd` and returns once the parent has its copy.
    pub fn give(&self, fd: RawFd) -> io::Result<()> {
        use std::io::{Read, Write};
        (&self.number[1]).write_all(&fd.to_ne_bytes())?;
        (&self.done[0]).read_exact(&mut [0u8])
    }

    /// The parent's side: the file child `pid` offers (an error, not a hang, if the child
    /// exits without offering one: the parent closes its copies of the child's pipe ends).
    pub fn take(self, pid: libc::pid_t) -> io::Result<File> {
        use std::io::{Read, Write};
        let Self {
            number: [mut number, number_w],
            done: [done_r, mut done],
        } = self;
        drop((number_w, done_r));
        let mut n = [0u8; 4];
        number.read_exact(&mut n)?;
        let pidfd = syscall3(libc::SYS_pidfd_open, pid.into(), 0, 0)?;
        // SAFETY: pidfd_open just returned this descriptor; it is owned once.
        let pidfd = unsafe { File::from_raw_fd(pidfd as RawFd) };
        let fd = syscall3(
            libc::SYS_pidfd_getfd,
            pidfd.as_raw_fd().into(),
            RawFd::from_ne_bytes(n).into(),
            0,
        )?;
        done.write_all(&[1])?;
        // SAFETY: pidfd_getfd installed this descriptor in our table for us alone.
        Ok(unsafe { File::from_raw_fd(fd as RawFd) })
    }
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

    /// The mapping as two, `[addr, addr + at)` and the rest, each unmapped on its own. A test
    /// that unmaps part of a mapping must own that part alone: unmapping the whole later would
    /// also take down whatever the allocator has put in the hole meanwhile (the guest runner
    /// once crashed in musl's `free` that way).
    pub fn split_at(self, at: usize) -> (Self, Self) {
        assert!(
            at.is_multiple_of(4096) && at <= self.len,
            "split at {at:#x} of {:#x}",
            self.len
        );
        let this = std::mem::ManuallyDrop::new(self);
        (
            Self {
                addr: this.addr,
                len: at,
                live: this.live,
            },
            Self {
                addr: this.addr + at,
                len: this.len - at,
                live: this.live,
            },
        )
    }

    /// A view of part of another mapping, which stays its owner's to unmap.
    pub fn view(addr: usize, len: usize) -> Self {
        Self {
            addr,
            len,
            live: false,
        }
    }

    /// Shared anonymous read-write memory: what a parent and its forked children both see.
    pub fn shared_anon(len: usize) -> io::Result<Self> {
        Self::new(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
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

/// BAR0 of a zapguard device mapped from sysfs (`/sys/bus/pci/devices/BDF/resource0`), for the
/// few tests that look at the device without its driver: root only, one page, unmapped on drop.
pub struct Bar0 {
    ptr: *mut u8,
}

impl Bar0 {
    /// Maps the first page of the BAR of the device at `bdf` (`0000:00:01.0`).
    pub fn map(bdf: &str) -> Result<Self, String> {
        let path = format!("/sys/bus/pci/devices/{bdf}/resource0");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: a shared mapping of the first page of the BAR, unmapped in `drop`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap {path}: {}", io::Error::last_os_error()));
        }
        Ok(Self { ptr: p.cast() })
    }

    /// Register `offset` (4-byte aligned, in the first page).
    fn reg(&self, offset: u32) -> *mut u32 {
        // SAFETY: callers pass the ABI's register offsets, all 4-aligned and below 4096.
        unsafe { self.ptr.add((offset & 0xffc) as usize).cast() }
    }

    /// Reads a 32-bit register.
    pub fn read32(&self, offset: u32) -> u32 {
        // SAFETY: an aligned register in the mapping; MMIO is read volatile.
        unsafe { std::ptr::read_volatile(self.reg(offset)) }
    }

    /// Writes a 32-bit register.
    pub fn write32(&self, offset: u32, v: u32) {
        // SAFETY: as in `read32`.
        unsafe { std::ptr::write_volatile(self.reg(offset), v) }
    }
}

impl Drop for Bar0 {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), 4096) };
    }
}
