//! Guest memory as the VMM shares it through vfio-user `DMA_MAP`.
//!
//! QEMU started with a shared memory backend (`memory-backend-memfd,share=on`) sends each RAM
//! section with the backing file descriptor; the device maps it `MAP_SHARED` and so sees the
//! guest's RAM directly. Sections without a descriptor (BIOS, option ROMs, VGA: about 26 during
//! boot) are recorded but not accessible, since their contents live only inside QEMU.
//!
//! Accesses are bounds-checked against a single region: a DMA that leaves its region fails, even
//! if the next region happens to be adjacent, because two regions may be two different files.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use zapguard_model::guest::{CopyError, GuestMem, MemError};

/// A `MAP_SHARED` mapping, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    /// Start of the mmap (page aligned).
    base: NonNull<u8>,
    /// Length of the mmap.
    len: usize,
    /// Where the region's first byte is inside the mapping (file offsets need not be aligned).
    skew: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; moving the owner to another
// thread does not change what the pointer refers to.
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` only allows copies in and out of the mapping (see `GuestMemory::read` and
// `write`); the guest writes the same memory concurrently anyway, so the device treats it like
// device memory: no references into it are ever handed out.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: &File, offset: u64, size: usize, writable: bool) -> io::Result<Self> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = u64::try_from(page).unwrap_or(4096).max(1);
        let skew = offset % page;
        let too_big = || io::Error::from_raw_os_error(libc::EOVERFLOW);
        let aligned = libc::off_t::try_from(offset - skew).map_err(|_| too_big())?;
        let skew = usize::try_from(skew).map_err(|_| too_big())?;
        let len = size.checked_add(skew).ok_or_else(too_big)?;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) cannot alias any Rust object;
        // the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                aligned,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap at 0"))?;
        Ok(Self { base, len, skew })
    }

    /// Pointer to byte `at` of the region. The caller has checked `at + n <= size`.
    fn at(&self, at: usize) -> *mut u8 {
        // SAFETY: `skew + at` stays inside the `len` bytes mapped (checked by the caller).
        unsafe { self.base.as_ptr().add(self.skew + at) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` describe a mapping this value created and nobody else unmaps;
        // no references into it exist (only copies were made).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// One DMA region as the VMM described it.
#[derive(Debug)]
struct Region {
    size: u64,
    file_offset: u64,
    writable: bool,
    mapping: Option<Mapping>,
}

/// A DMA region, as listed by [`GuestMemory::regions`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Guest physical address.
    pub iova: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset in the shared file.
    pub file_offset: u64,
    /// Whether the device may write it.
    pub writable: bool,
    /// Whether it is backed by shared memory (accessible).
    pub shared: bool,
}

/// All DMA regions, keyed by guest physical address.
#[derive(Debug, Default)]
pub struct GuestMemory {
    regions: BTreeMap<u64, Region>,
}

impl GuestMemory {
    /// No memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the region `[iova, iova + size)`, mapping `size` bytes of `fd` from `file_offset`
    /// when a descriptor came with it. The descriptor can be closed afterwards.
    pub fn map(
        &mut self,
        iova: u64,
        size: u64,
        file_offset: u64,
        fd: Option<&File>,
        writable: bool,
    ) -> Result<(), MemError> {
        let invalid = MemError::InvalidMap {
            iova,
            size,
            offset: file_offset,
        };
        let Some(end) = iova.checked_add(size).filter(|_| size > 0) else {
            return Err(invalid);
        };
        if let Some((&existing, _)) = self.overlapping(iova, end).next() {
            return Err(MemError::Overlap {
                iova,
                size,
                existing,
            });
        }
        let mapping = match fd {
            Some(fd) => {
                let Ok(len) = usize::try_from(size) else {
                    return Err(invalid);
                };
                // Touching a MAP_SHARED page past the end of a file raises SIGBUS; refuse such
                // a map now rather than die on the first DMA into it.
                let meta = fd
                    .metadata()
                    .map_err(|source| MemError::Mmap { iova, size, source })?;
                let past_eof = file_offset
                    .checked_add(size)
                    .is_none_or(|end| end > meta.len());
                if meta.is_file() && past_eof {
                    return Err(MemError::PastEof {
                        iova,
                        size,
                        offset: file_offset,
                        file_size: meta.len(),
                    });
                }
                let m = Mapping::new(fd, file_offset, len, writable)
                    .map_err(|source| MemError::Mmap { iova, size, source })?;
                Some(m)
            }
            None => None,
        };
        self.regions.insert(
            iova,
            Region {
                size,
                file_offset,
                writable,
                mapping,
            },
        );
        Ok(())
    }

    /// Removes (and unmaps) every region that overlaps `[iova, iova + size)`; returns how many.
    pub fn unmap(&mut self, iova: u64, size: u64) -> usize {
        let end = iova.saturating_add(size);
        let doomed: Vec<u64> = self.overlapping(iova, end).map(|(&k, _)| k).collect();
        for k in &doomed {
            self.regions.remove(k);
        }
        doomed.len()
    }

    /// Removes every region; returns how many.
    pub fn unmap_all(&mut self) -> usize {
        let n = self.regions.len();
        self.regions.clear();
        n
    }

    /// The regions, in address order.
    pub fn regions(&self) -> impl Iterator<Item = RegionInfo> + '_ {
        self.regions.iter().map(|(&iova, r)| RegionInfo {
            iova,
            size: r.size,
            file_offset: r.file_offset,
            writable: r.writable,
            shared: r.mapping.is_some(),
        })
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether no region is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let (m, at) = self.locate(gpa, buf.len(), false)?;
        // SAFETY: `locate` checked that `[at, at + len)` lies inside the mapping; `buf` is a
        // distinct Rust allocation, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(m.at(at), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `buf` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        let (m, at) = self.locate(gpa, buf.len(), true)?;
        // SAFETY: as in `read`; `locate` also checked the region is mapped writable.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), m.at(at), buf.len()) };
        Ok(())
    }

    /// Copies `len` bytes from `src` to `dst` in guest memory (the ranges may overlap, as with
    /// `memmove`); on an error nothing was written.
    pub fn copy(&self, src: u64, dst: u64, len: usize) -> Result<(), CopyError> {
        let (from, at) = self.locate(src, len, false).map_err(CopyError::Read)?;
        let (to, to_at) = self.locate(dst, len, true).map_err(CopyError::Write)?;
        // SAFETY: `locate` checked that both ranges lie inside their mappings and that the
        // destination is writable; `ptr::copy` allows them to overlap. No Rust reference points
        // into guest memory (see `Mapping`).
        unsafe { std::ptr::copy(from.at(at), to.at(to_at), len) };
        Ok(())
    }

    /// Loads the 8-aligned u64 at `gpa` atomically (acquire): a page-table entry or context-entry
    /// word the guest's CPUs may be writing at the same time.
    pub fn load_u64(&self, gpa: u64) -> Result<u64, MemError> {
        let ptr = self.aligned_u64(gpa, false)?;
        // SAFETY: `aligned_u64` checked the 8 bytes lie in a shared mapping that lives as long
        // as `self`, and that `ptr` is 8-aligned. The guest writes this memory concurrently,
        // which is why the access is atomic.
        let atomic = unsafe { std::sync::atomic::AtomicU64::from_ptr(ptr) };
        Ok(u64::from_le(
            atomic.load(std::sync::atomic::Ordering::Acquire),
        ))
    }

    /// The 8-aligned u64 at `gpa` (in a writable mapping if `write`).
    fn aligned_u64(&self, gpa: u64, write: bool) -> Result<*mut u64, MemError> {
        if !gpa.is_multiple_of(8) {
            return Err(MemError::Unmapped { gpa, len: 8 });
        }
        let (m, at) = self.locate(gpa, 8, write)?;
        // Mappings are page-aligned, so an 8-aligned GPA is an 8-aligned pointer.
        Ok(m.at(at).cast::<u64>())
    }

    /// Atomically ORs `bits` into the 8-aligned u64 at `gpa` (shared with the guest's CPUs, which
    /// may update the same page-table entry concurrently); returns the old value.
    pub fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
        let ptr = self.aligned_u64(gpa, true)?;
        // SAFETY: `aligned_u64` checked the 8 bytes lie in a writable shared mapping that lives
        // as long as `self`, and that `ptr` is 8-aligned. The guest accesses this memory
        // concurrently, which is why the access is atomic.
        let atomic = unsafe { std::sync::atomic::AtomicU64::from_ptr(ptr) };
        Ok(u64::from_le(atomic.fetch_or(
            bits.to_le(),
            std::sync::atomic::Ordering::SeqCst,
        )))
    }

    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (&u64, &Region)> {
        // The only region starting before `start` that can overlap is the last one.
        let before = self
            .regions
            .range(..start)
            .next_back()
            .filter(move |(&k, r)| start < end && k.saturating_add(r.size) > start);
        before
            .into_iter()
            .chain(self.regions.range(start..end.max(start)))
    }

    /// The mapping holding `[gpa, gpa + len)` and the offset of `gpa` in it.
    fn locate(&self, gpa: u64, len: usize, write: bool) -> Result<(&Mapping, usize), MemError> {
        let (&iova, r) = self
            .regions
            .range(..=gpa)
            .next_back()
            .filter(|(&k, r)| gpa - k < r.size)
            .ok_or(MemError::Unmapped { gpa, len })?;
        let region_end = iova + r.size;
        let fits = gpa
            .checked_add(len as u64)
            .is_some_and(|end| end <= region_end);
        if !fits {
            return Err(MemError::CrossesRegion {
                gpa,
                len,
                end: region_end,
            });
        }
        let m = r.mapping.as_ref().ok_or(MemError::NotShared { gpa, len })?;
        if write && !r.writable {
            return Err(MemError::ReadOnly { gpa, len });
        }
        // Fits in usize: the mapping of `size` bytes exists.
        Ok((m, (gpa - iova) as usize))
    }
}

impl GuestMem for GuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        GuestMemory::read(self, gpa, buf)
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        GuestMemory::write(self, gpa, buf)
    }

    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
        GuestMemory::fetch_or_u64(self, gpa, bits)
    }

    fn load_u64(&self, gpa: u64) -> Result<u64, MemError> {
        GuestMemory::load_u64(self, gpa)
    }

    fn copy(&self, src: u64, dst: u64, len: usize) -> Result<(), CopyError> {
        GuestMemory::copy(self, src, dst, len)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    /// A memfd of `size` bytes.
    pub(crate) fn memfd(size: u64) -> File {
        // SAFETY: the name is a valid NUL-terminated string.
        let fd = unsafe { libc::memfd_create(c"zapguard-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).expect("ftruncate");
        file
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn two_mappings_of_one_file_share_bytes() {
        let f = memfd(4 * MIB);
        let mut mem = GuestMemory::new();
        // Same file, two guest addresses: low RAM and a high alias of its second MiB.
        mem.map(0, 2 * MIB, 0, Some(&f), true).expect("map low");
        mem.map(0x1_0000_0000, MIB, MIB, Some(&f), true)
            .expect("map high");
        drop(f);
        mem.write(MIB + 0x10, b"zapguard").expect("write low");
        let mut buf = [0u8; 8];
        mem.read(0x1_0000_0010, &mut buf).expect("read high");
        assert_eq!(&buf, b"zapguard");
        assert_eq!(mem.len(), 2);
        // A copy from one mapping to the other, then within one, overlapping.
        mem.copy(0x1_0000_0010, 0x40, 8).expect("copy");
        mem.copy(0x40, 0x42, 8).expect("overlapping copy");
        let mut buf = [0u8; 10];
        mem.read(0x40, &mut buf).expect("read");
        assert_eq!(&buf, b"zazapguard");
    }

    #[test]
    fn unaligned_file_offset() {
        let f = memfd(MIB);
        let mut mem = GuestMemory::new();
        mem.map(0x1000, 0x100, 0x10, Some(&f), true).expect("map");
        mem.write(0x1000, &[0xab]).expect("write");
        let mut other = GuestMemory::new();
        other.map(0, 0x1000, 0, Some(&f), false).expect("map");
        let mut b = [0u8; 1];
        other.read(0x10, &mut b).expect("read");
        assert_eq!(b, [0xab]);
        assert!(matches!(
            other.write(0x10, &b),
            Err(MemError::ReadOnly { .. })
        ));
    }

    #[test]
    fn out_of_range_fails_cleanly() {
        let f = memfd(MIB);
        let mut mem = GuestMemory::new();
        mem.map(0x10_0000, 0x1000, 0, Some(&f), true).expect("map");
        mem.map(0x10_1000, 0x1000, 0x1000, Some(&f), true)
            .expect("adjacent map");
        mem.map(0xc_0000, 0x2_0000, 0, None, false)
            .expect("ROM without fd");
        let mut b = [0u8; 16];
        assert!(matches!(
            mem.read(0xf_fff8, &mut b),
            Err(MemError::Unmapped { .. })
        ));
        assert!(matches!(
            mem.read(0x10_0ff8, &mut b),
            Err(MemError::CrossesRegion { end: 0x10_1000, .. })
        ));
        assert!(matches!(
            mem.read(0xc_0000, &mut b),
            Err(MemError::NotShared { .. })
        ));
        assert!(matches!(
            mem.write(0x10_2000, &b),
            Err(MemError::Unmapped { .. })
        ));
        assert!(mem.read(u64::MAX, &mut b).is_err());
        assert!(mem.write(0x10_1ff0, &b).is_ok(), "exactly up to the end");
        assert!(mem.read(0x10_1ff0, &mut []).is_ok());
        // A copy names the side that failed and writes nothing.
        mem.write(0x10_0000, &[0x11; 16]).expect("write");
        assert!(matches!(
            mem.copy(0x10_0ff8, 0x10_0000, 16),
            Err(CopyError::Read(MemError::CrossesRegion { .. }))
        ));
        assert!(matches!(
            mem.copy(0x10_1000, 0xc_0000, 16),
            Err(CopyError::Write(MemError::NotShared { .. }))
        ));
        assert!(mem.copy(0x10_1ff0, 0x10_0000, 16).is_ok());
        let mut c = [0u8; 16];
        mem.read(0x10_0000, &mut c).expect("read");
        assert_eq!(c, b);
    }

    #[test]
    fn bad_maps_are_refused() {
        let f = memfd(MIB);
        let mut mem = GuestMemory::new();
        mem.map(0x1000, 0x2000, 0, Some(&f), true).expect("map");
        let cases: &[(u64, u64)] = &[
            (0x1000, 0),
            (u64::MAX, 2),
            (0x0, 0x1001),
            (0x2fff, 1),
            (0x1800, 0x100),
        ];
        for &(iova, size) in cases {
            assert!(mem.map(iova, size, 0, None, true).is_err(), "{iova:#x}");
        }
        for offset in [MIB, MIB - 0xfff, u64::MAX - 0xfff] {
            let err = mem
                .map(0x10_0000, 0x1000, offset, Some(&f), true)
                .expect_err("past the end of the file");
            assert!(matches!(err, MemError::PastEof { .. }), "{err}");
        }
        // A read-only descriptor cannot be mapped writable.
        let ro = File::open(format!("/proc/self/fd/{}", f.as_raw_fd())).expect("reopen");
        let err = mem
            .map(0x10_0000, 0x1000, 0, Some(&ro), true)
            .expect_err("read-only fd");
        assert!(matches!(err, MemError::Mmap { .. }), "{err}");
        mem.map(0x10_0000, 0x1000, 0, Some(&ro), false)
            .expect("read-only map of a read-only fd");
        assert_eq!(mem.len(), 2);
    }

    #[test]
    fn unmap_removes_overlapping_and_all() {
        let f = memfd(MIB);
        let mut mem = GuestMemory::new();
        for i in 0..4u64 {
            mem.map(i * 0x1_0000, 0x1000, i * 0x1000, Some(&f), true)
                .expect("map");
        }
        mem.map(0x10_0000, 0x1000, 0, None, false).expect("map");
        assert_eq!(
            mem.unmap(0x8000, 0x8001),
            1,
            "overlaps only the region at 0x10000"
        );
        assert_eq!(mem.unmap(0x2_0800, 0), 0, "empty range");
        assert_eq!(mem.unmap(0x2_0800, 1), 1, "middle of a region");
        assert!(mem.read(0x2_0000, &mut [0]).is_err());
        assert_eq!(mem.unmap(0x5_0000, 0x1000), 0);
        let left: Vec<u64> = mem.regions().map(|r| r.iova).collect();
        assert_eq!(left, vec![0, 0x3_0000, 0x10_0000]);
        assert!(!mem.regions().nth(2).expect("ROM").shared);
        assert_eq!(mem.unmap_all(), 3);
        assert!(mem.is_empty());
        assert!(mem.read(0, &mut [0]).is_err());
    }
}
