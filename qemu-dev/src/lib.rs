//! The zapguard device model, served to QEMU over vfio-user.
//!
//! Everything except [`server`] is pure state and can be driven without QEMU:
//!
//! - [`pci`]: the PCI config space shadow (identity, BAR0, MSI-X capability);
//! - [`device`]: the BAR0 register file ([`device::ZapguardDevice`]);
//! - [`events`]: what the device reports, and sinks for it;
//! - [`trace`]: the trace writers (binary, drained by a background thread; JSON Lines);
//! - [`memory`]: guest RAM received through vfio-user `DMA_MAP`;
//! - [`guest`]: the [`guest::GuestMem`] trait the device model reads guest memory through;
//! - [`inject`]: failure injection, the page-walk lag and the device's clock (test knobs);
//! - [`server`]: the `vfio_user::ServerBackend` and the serve loop.
//!
//! Register offsets, IDs and sizes come from the `shared-regs` crate, the single definition of
//! the device ABI shared with the guest driver.
#![deny(missing_docs)]

pub mod cmdq;
pub mod cpu_walk;
pub mod device;
pub mod dma_engine;
pub mod events;
pub mod fuzzing;
pub mod guest;
pub mod inject;
pub mod iotlb;
pub mod ledger;
pub mod memory;
pub mod pagetable;
pub mod pci;
pub mod phys;
pub mod server;
pub mod testkit;
pub mod trace;
pub mod validator;
pub mod x86pt;

pub use device::{DeviceConfig, ZapguardDevice};
pub use events::{Event, EventLog, Events, Fanout, NoEvents, SharedEvents};
pub use guest::{CopyError, GuestMem, MemError, VecMem};
pub use memory::GuestMemory;
pub use pci::PciConfig;
pub use server::{serve, EventFdTable, ZapguardBackend};
pub use trace::{JsonTraceWriter, TraceWriter};
