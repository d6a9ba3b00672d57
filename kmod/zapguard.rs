// SPDX-License-Identifier: GPL-2.0

//! zapguard: a Rust reference driver that mirrors process address spaces into an IOMMU-style PCI
//! device and shoots down the device's TLB from mmu_notifier callbacks.
//!
//! Modules:
//! - [`abi`]: the device ABI and uAPI, compiled from `shared-regs/src/abi/` (the same source the
//!   device model and the guest tests use).
//! - [`driver`]: the PCI driver, its interrupts and the `/dev/zapguard` misc device (ioctls).
//! - [`hw`]: the device's DMA memory and queues (page-table pool, command queue with SYNC, DMA
//!   job ring, event ring).
//! - [`mirror`]: contexts: populate, shootdown, fault service, release.
//! - [`mm`]: safe abstractions over mmu_interval_notifier and hmm_range_fault.

#[path = "../shared-regs/src/abi/mod.rs"]
pub mod abi;
pub mod driver;
pub mod hw;
pub mod mirror;
pub mod mm;

kernel::module_pci_driver! {
    type: driver::ZapguardDriver,
    name: "zapguard",
    authors: ["zapguard developers"],
    description: "zapguard: mirror process address spaces into an IOMMU-style device",
    license: "GPL v2",
}
