//! Guest memory as the device model sees it: a bounds-checked byte store addressed by
//! guest-physical address. `zapguard_dev::memory::GuestMemory` (the vfio-user DMA regions, in
//! the `zapguard-dev` crate) implements it for the real device; [`VecMem`] is a flat in-process
//! memory for tests, fuzzing and benches. [`MemError`] is the error of both, including the
//! vfio-user memory's `DMA_MAP` refusals, so that the model never names the vfio-user side.
//!
//! Every access can fail: the guest controls every address the device follows (queue bases,
//! page-table pointers, status addresses), and none of them may take the device outside RAM.

use std::cell::RefCell;
use std::io;

use thiserror::Error;

/// Largest copy [`GuestMem::copy`]'s default makes all or nothing (it stages through a stack
/// buffer this big); the DMA engine never copies more at once.
pub const COPY_CHUNK: usize = 4096;

/// A failed guest-memory operation.
#[derive(Debug, Error)]
pub enum MemError {
    /// Nothing is mapped at the start of the range.
    #[error("guest range {gpa:#x}+{len:#x} is not mapped")]
    Unmapped {
        /// Guest physical address.
        gpa: u64,
        /// Length in bytes.
        len: usize,
    },
    /// The range is in a region the VMM shared without a file descriptor.
    #[error("guest range {gpa:#x}+{len:#x} is not backed by shared memory")]
    NotShared {
        /// Guest physical address.
        gpa: u64,
        /// Length in bytes.
        len: usize,
    },
    /// The range runs past the end of its region.
    #[error("guest range {gpa:#x}+{len:#x} crosses the end of its region at {end:#x}")]
    CrossesRegion {
        /// Guest physical address.
        gpa: u64,
        /// Length in bytes.
        len: usize,
        /// End of the region that holds `gpa`.
        end: u64,
    },
    /// A write to a region mapped read-only.
    #[error("guest range {gpa:#x}+{len:#x} is read-only")]
    ReadOnly {
        /// Guest physical address.
        gpa: u64,
        /// Length in bytes.
        len: usize,
    },
    /// A map request that is empty, wraps around, or does not fit this host's address space.
    #[error("invalid DMA map {iova:#x}+{size:#x} at file offset {offset:#x}")]
    InvalidMap {
        /// Guest physical address.
        iova: u64,
        /// Length in bytes.
        size: u64,
        /// Offset in the file.
        offset: u64,
    },
    /// A map request overlapping an existing region (VFIO forbids this: unmap first).
    #[error("DMA map {iova:#x}+{size:#x} overlaps the region at {existing:#x}")]
    Overlap {
        /// Guest physical address.
        iova: u64,
        /// Length in bytes.
        size: u64,
        /// Start of the region it overlaps.
        existing: u64,
    },
    /// A map request for bytes past the end of the shared file.
    #[error("DMA map {iova:#x}+{size:#x} at file offset {offset:#x} ends past the end of the file ({file_size:#x} bytes)")]
    PastEof {
        /// Guest physical address.
        iova: u64,
        /// Length in bytes.
        size: u64,
        /// Offset in the file.
        offset: u64,
        /// Size of the file.
        file_size: u64,
    },
    /// `mmap` refused the file.
    #[error("mmap of DMA region {iova:#x}+{size:#x} failed: {source}")]
    Mmap {
        /// Guest physical address.
        iova: u64,
        /// Length in bytes.
        size: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Which side of a [`GuestMem::copy`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The source cannot be read.
    #[error("copy source: {0}")]
    Read(MemError),
    /// The destination cannot be written.
    #[error("copy destination: {0}")]
    Write(MemError),
}

/// Guest-physical memory.
pub trait GuestMem {
    /// Copies `buf.len()` bytes at `gpa` into `buf`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Copies `buf` to `gpa`.
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError>;
    /// Atomically ORs `bits` into the naturally aligned u64 at `gpa`; returns the old value.
    /// Page-table A/D updates use this so a concurrent driver update is never lost.
    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError>;

    /// Copies `len` bytes from `src` to `dst` inside guest memory, as `memmove` would (the
    /// ranges may overlap). Up to [`COPY_CHUNK`] bytes it is all or nothing: on an error no
    /// byte was written. The default stages through a stack buffer with [`Self::read`] and
    /// [`Self::write`]; memories that can address both ranges directly copy once instead.
    fn copy(&self, src: u64, dst: u64, len: usize) -> Result<(), CopyError> {
        let mut buf = [0u8; COPY_CHUNK];
        // Chunks go backwards when the destination overlaps the source from above, so no chunk
        // reads bytes an earlier one already overwrote.
        let backwards = dst > src;
        let chunks = len.div_ceil(COPY_CHUNK);
        for c in 0..chunks {
            let i = if backwards { chunks - 1 - c } else { c };
            let off = i * COPY_CHUNK;
            let n = COPY_CHUNK.min(len - off);
            let (s, d) = (src.wrapping_add(off as u64), dst.wrapping_add(off as u64));
            self.read(s, &mut buf[..n]).map_err(CopyError::Read)?;
            self.write(d, &buf[..n]).map_err(CopyError::Write)?;
        }
        Ok(())
    }

    /// Loads the naturally aligned little-endian u64 at `gpa` in one atomic access: how the
    /// device reads page-table entries and context-entry words, which the guest's CPUs write
    /// concurrently (a plain copy of them is a data race, and may tear). The default reads
    /// through [`Self::read`], for memories no other thread writes.
    fn load_u64(&self, gpa: u64) -> Result<u64, MemError> {
        self.read_u64(gpa)
    }

    /// Reads a little-endian u64.
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian u64.
    fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Reads a little-endian u32.
    fn read_u32(&self, gpa: u64) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a little-endian u32.
    fn write_u32(&self, gpa: u64, v: u32) -> Result<(), MemError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

/// Flat memory covering `[base, base + size)`, for tests, fuzzing and benchmarks.
#[derive(Debug)]
pub struct VecMem {
    base: u64,
    bytes: RefCell<Vec<u8>>,
}

impl VecMem {
    /// `size` zeroed bytes starting at guest-physical `base`.
    pub fn new(base: u64, size: usize) -> Self {
        Self {
            base,
            bytes: RefCell::new(vec![0; size]),
        }
    }

    /// First address past the memory.
    pub fn end(&self) -> u64 {
        self.base + self.bytes.borrow().len() as u64
    }

    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, MemError> {
        let size = self.bytes.borrow().len() as u64;
        let off = gpa.checked_sub(self.base).filter(|&o| o <= size);
        match off.and_then(|o| {
            o.checked_add(len as u64)
                .filter(|&e| e <= size)
                .map(|e| (o, e))
        }) {
            Some((o, e)) => Ok(o as usize..e as usize),
            None => Err(MemError::Unmapped { gpa, len }),
        }
    }
}

impl GuestMem for VecMem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.bytes.borrow()[r]);
        Ok(())
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        let r = self.range(gpa, buf.len())?;
        self.bytes.borrow_mut()[r].copy_from_slice(buf);
        Ok(())
    }

    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
        if !gpa.is_multiple_of(8) {
            return Err(MemError::Unmapped { gpa, len: 8 });
        }
        let old = self.read_u64(gpa)?;
        self.write_u64(gpa, old | bits)?;
        Ok(old)
    }

    fn copy(&self, src: u64, dst: u64, len: usize) -> Result<(), CopyError> {
        let from = self.range(src, len).map_err(CopyError::Read)?;
        let to = self.range(dst, len).map_err(CopyError::Write)?;
        self.bytes.borrow_mut().copy_within(from, to.start);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vecmem_bounds() {
        let m = VecMem::new(0x1000, 0x100);
        assert!(m.write_u64(0x1000, 7).is_ok());
        assert_eq!(m.read_u64(0x1000).unwrap(), 7);
        assert!(m.write_u64(0x10f8, 1).is_ok());
        assert!(m.write_u64(0x10f9, 1).is_err(), "crosses the end");
        assert!(m.read_u64(0xff8).is_err(), "below base");
        assert!(m.read_u64(u64::MAX - 3).is_err(), "wraps");
        assert!(m.read(0x1100, &mut []).is_ok(), "empty access at the end");
        assert_eq!(m.fetch_or_u64(0x1000, 0x30).unwrap(), 7);
        assert_eq!(m.read_u64(0x1000).unwrap(), 0x37);
        assert!(m.fetch_or_u64(0x1004, 1).is_err(), "unaligned atomic");
    }

    /// Memory that only has `read` and `write`: [`GuestMem::copy`]'s default.
    struct Plain(VecMem);

    impl GuestMem for Plain {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.0.read(gpa, buf)
        }
        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
            self.0.write(gpa, buf)
        }
        fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
            self.0.fetch_or_u64(gpa, bits)
        }
    }

    /// Both implementations behave like `memmove` and fail without writing anything.
    #[test]
    fn copy_is_memmove_and_all_or_nothing() {
        const SIZE: usize = 5 * COPY_CHUNK;
        let image: Vec<u8> = (0..SIZE).map(|i| (i * 7 + i / 251) as u8).collect();
        let fresh = || {
            let m = VecMem::new(0x1000, SIZE);
            m.write(0x1000, &image).unwrap();
            m
        };
        let cases: &[(u64, u64, usize)] = &[
            (0, 0x100, 64),
            (0x100, 0, 64),
            (0x10, 0x20, COPY_CHUNK),
            (0x20, 0x10, COPY_CHUNK),
            (0, 3 * COPY_CHUNK as u64, COPY_CHUNK),
            (0x80, 0x80, 300),
            // Longer than a chunk, overlapping either way (the default goes chunk by chunk).
            (0x10, 0x1010, 3 * COPY_CHUNK + 5),
            (0x1010, 0x10, 3 * COPY_CHUNK + 5),
            (0, 0, 0),
        ];
        for &(src, dst, len) in cases {
            let mut want = image.clone();
            want.copy_within(src as usize..src as usize + len, dst as usize);
            let (vec, plain) = (fresh(), Plain(fresh()));
            vec.copy(0x1000 + src, 0x1000 + dst, len).unwrap();
            plain.copy(0x1000 + src, 0x1000 + dst, len).unwrap();
            let mut got = vec![0u8; SIZE];
            for m in [&vec, &plain.0] {
                m.read(0x1000, &mut got).unwrap();
                assert!(got == want, "{src:#x} -> {dst:#x} len {len:#x}");
            }
        }
        let end = 0x1000 + SIZE as u64;
        for (src, dst, read_fails) in [(end - 8, 0x1000, true), (0x1000, end - 8, false)] {
            let (vec, plain) = (fresh(), Plain(fresh()));
            for r in [vec.copy(src, dst, 16), plain.copy(src, dst, 16)] {
                assert_eq!(matches!(r, Err(CopyError::Read(_))), read_fails);
                assert_eq!(matches!(r, Err(CopyError::Write(_))), !read_fails);
            }
            let mut got = vec![0u8; SIZE];
            for m in [&vec, &plain.0] {
                m.read(0x1000, &mut got).unwrap();
                assert!(got == image, "nothing written");
            }
        }
    }
}
