//! Expected data: what the device's jobs must leave, and the patterns of the guard pages, the
//! read-only canary, the fuzzer's buffers and the canary child.

use super::rng::Rng;
use super::{CANARY_MAGIC, GUARD_MAGIC, RO_MAGIC};

/// `DMA_FILL`'s bytes: the 8-byte little-endian pattern repeated from the job's first byte.
pub(crate) fn fill_bytes(pattern: u64, len: usize) -> Vec<u8> {
    let p = pattern.to_le_bytes();
    (0..len).map(|i| p[i % 8]).collect()
}

/// `DMA_COMPARE`'s result: the offset of the first difference, or `u64::MAX`.
pub(crate) fn first_diff(a: &[u8], b: &[u8]) -> u64 {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .map_or(u64::MAX, |i| i as u64)
}

/// Bytes from `seed`.
pub(super) fn seeded(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The pattern word of a guard page, the read-only canary and the canary child, at `addr`.
pub(super) fn guard_word(addr: u64) -> u64 {
    addr ^ GUARD_MAGIC
}
pub(super) fn ro_word(addr: u64) -> u64 {
    (addr ^ RO_MAGIC) | 0x8080_8080_8080_8080
}
pub(super) fn data_word(addr: u64) -> u64 {
    addr.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}
pub(super) fn canary_word(addr: u64) -> u64 {
    addr.rotate_left(17) ^ CANARY_MAGIC
}

/// The first word of `[addr, addr + len)` that differs from `word(address)`, if any.
pub(super) fn first_bad_word(addr: u64, len: u64, word: fn(u64) -> u64) -> Option<(u64, u64)> {
    (addr..addr + len).step_by(8).find_map(|a| {
        // SAFETY: the caller passes a range it mapped readable.
        let v = unsafe { std::ptr::read_volatile(a as *const u64) };
        (v != word(a)).then_some((a, v))
    })
}

pub(super) fn write_words(addr: u64, len: u64, word: fn(u64) -> u64) {
    for a in (addr..addr + len).step_by(8) {
        // SAFETY: the caller passes a range it mapped writable and owns.
        unsafe { std::ptr::write_volatile(a as *mut u64, word(a)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::arena::{region_base, RO_REGION};
    use crate::fuzz::{PG, RO_W, WIN_A};
    use shared_regs::dma::DMA_COMPARE;

    /// The read-only pattern is no valid structure: an argument pointer to it must fail.
    #[test]
    fn read_only_pattern_is_no_valid_argument() {
        for a in (0..RO_W)
            .step_by(8)
            .map(|o| region_base(RO_REGION) + WIN_A + o)
        {
            let w = ro_word(a);
            assert!(w as u32 > u32::from(DMA_COMPARE), "a DMA op");
            assert_ne!(w % PG, 0, "an aligned MAP/SNAPSHOT address");
        }
    }

    #[test]
    fn expected_data() {
        assert_eq!(
            fill_bytes(0x0807_0605_0403_0201, 10),
            vec![1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
        );
        assert_eq!(first_diff(b"abcd", b"abXd"), 2);
        assert_eq!(first_diff(b"abcd", b"abcd"), u64::MAX);
        assert_eq!(seeded(5, 13), seeded(5, 13));
        assert_eq!(seeded(5, 13).len(), 13);
    }
}
