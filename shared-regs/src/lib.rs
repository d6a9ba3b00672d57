//! The zapguard ABI: one definition of every register, structure and ioctl, shared by the device
//! model and server (`zapguard-model`, `zapguard-dev`), the kernel driver (`kmod`) and the guest
//! tests.
//!
//! Everything under [`abi`] is `no_std` and dependency-free because the kernel module compiles the
//! very same files (`#[path = "../shared-regs/src/abi/mod.rs"] pub mod abi;` in `kmod/zapguard.rs`).
//! Code there must therefore only use `core` and `super::` paths, never `crate::`. Host code can
//! turn on the `host` feature for named flag sets ([`flags`]) and zerocopy's byte-conversion
//! traits on the uAPI structures.
#![no_std]
#![deny(missing_docs)]

#[cfg(feature = "host")]
extern crate std;

pub mod abi;
#[cfg(feature = "host")]
pub mod flags;
#[cfg(feature = "host")]
pub mod trace_format;

pub use abi::{cmd, dma, event, hmm, pci, pte, queue, regs, testing, uapi};
