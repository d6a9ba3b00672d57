//! Guest memory as the device model sees it: a bounds-checked byte store addressed by
//! guest-physical address. [`crate::memory::GuestMemory`] (the vfio-user DMA regions) implements
//! it for the real device; [`VecMem`] is a flat in-process memory for tests, fuzzing and benches.
//!
//! Every access can fail: the guest controls every address the device follows (queue bases,
//! page-table pointers, status addresses), and none of them may take the device outside RAM.

use crate::memory::MemError;
use std::cell::RefCell;

/// Guest-physical memory.
pub trait GuestMem {
    /// Copies `buf.len()` bytes at `gpa` into `buf`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Copies `buf` to `gpa`.
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError>;
    /// Atomically ORs `bits` into the naturally aligned u64 at `gpa`; returns the old value.
    /// Page-table A/D updates use this so a concurrent driver update is never lost.
    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError>;

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
}

impl GuestMem for crate::memory::GuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        crate::memory::GuestMemory::read(self, gpa, buf)
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        crate::memory::GuestMemory::write(self, gpa, buf)
    }

    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
        crate::memory::GuestMemory::fetch_or_u64(self, gpa, bits)
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
}
