//! The zapguard device model: pure state that can be driven without QEMU. The `zapguard-dev`
//! crate serves it to QEMU over vfio-user, with the guest RAM QEMU shares and the trace writers.
//!
//! - [`pci`]: the PCI config space shadow (identity, BAR0, MSI-X capability);
//! - [`device`]: the BAR0 register file ([`device::ZapguardDevice`]);
//! - [`cmdq`]: the command queue (invalidations, SYNC, RESUME/ABORT);
//! - [`dma_engine`]: DMA jobs, executed in steps through the IOTLB;
//! - [`iotlb`]: the IOTLB, a bounded cache of device translations tagged by ASID;
//! - [`pagetable`]: the device page table's walker (and a builder for tests);
//! - [`phys`]: physical DMA, without translation, in the memory the driver lent the device;
//! - [`ledger`]: the SYNC ledger of invalidated translations;
//! - [`validator`]: judges every DMA page access against the process's CPU page table, read by
//!   [`cpu_walk`]; [`x86pt`] builds such tables for tests, fuzzing and benches;
//! - [`events`]: what the device reports, and sinks for it;
//! - [`guest`]: the [`guest::GuestMem`] trait the device model reads guest memory through,
//!   its error, and [`guest::VecMem`];
//! - [`inject`]: failure injection, the page-walk lag and the device's clock (test knobs);
//! - `testkit`: a simulated driver for tests and benches; `fuzzing`: the hostile-guest fuzz
//!   harness. Both are test-only code: they exist in the crate's own tests, and for dependents
//!   (tests, benches, the fuzz target) with the `testkit` feature, never in the device binary.
//!
//! Register offsets, IDs and sizes come from the `shared-regs` crate, the single definition of
//! the device ABI shared with the guest driver.
#![deny(missing_docs)]

pub mod cmdq;
pub mod cpu_walk;
pub mod device;
pub mod dma_engine;
pub mod events;
#[cfg(any(test, feature = "testkit"))]
pub mod fuzzing;
pub mod guest;
pub mod inject;
pub mod iotlb;
pub mod ledger;
pub mod pagetable;
pub mod pci;
pub mod phys;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod validator;
pub mod x86pt;

pub use device::{DeviceConfig, ZapguardDevice};
pub use events::{Event, EventLog, Events, Fanout, NoEvents, SharedEvents};
pub use guest::{CopyError, GuestMem, MemError, VecMem};
pub use pci::PciConfig;
