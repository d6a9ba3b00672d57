//! The zapguard device datasheet and driver uAPI (dependency-free, shared with the kernel module).
//!
//! - [`pci`]: PCI identity and BAR layout.
//! - [`regs`]: BAR0 register map.
//! - [`queue`]: ring index arithmetic (producer/consumer with wrap bit).
//! - [`cmd`]: command queue descriptors.
//! - [`dma`]: DMA job descriptors and status records.
//! - [`event`]: event records (faults and validator violations).
//! - [`pte`]: device page-table entries and context entries.
//! - [`uapi`]: `/dev/zapguard` ioctls and their structures.
//! - [`testing`]: the test build's debugfs interface (injected bugs, knobs), not in production.
//! - [`hmm`]: the kernel's `test_hmm` uAPI, which zapguard also serves (`/dev/zapguard_hmm*`).
//!
//! All multi-byte fields are little-endian. Descriptors convert to and from their byte form with
//! `to_bytes`/`from_bytes`, so neither side needs `unsafe` to read them from shared memory.

pub mod cmd;
pub mod dma;
pub mod event;
pub mod hmm;
pub mod pci;
pub mod pte;
pub mod queue;
pub mod regs;
pub mod testing;
pub mod uapi;

/// `W` little-endian u64 words as `N = 8 * W` bytes.
// Plain index loops: iterator adaptors here leave code objtool flags in the kernel build.
pub const fn words_to_bytes<const N: usize, const W: usize>(words: [u64; W]) -> [u8; N] {
    const { assert!(N == 8 * W) };
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = (words[i / 8] >> (8 * (i % 8))) as u8;
        i += 1;
    }
    out
}

/// `N = 8 * W` bytes as `W` little-endian u64 words.
pub const fn bytes_to_words<const N: usize, const W: usize>(bytes: &[u8; N]) -> [u64; W] {
    const { assert!(N == 8 * W) };
    let mut out = [0u64; W];
    let mut i = 0;
    while i < N {
        out[i / 8] |= (bytes[i] as u64) << (8 * (i % 8));
        i += 1;
    }
    out
}
