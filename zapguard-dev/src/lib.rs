//! The zapguard device served to QEMU over vfio-user: the I/O around the pure device model of
//! the `zapguard-model` crate.
//!
//! - [`server`]: the `vfio_user::ServerBackend` and the serve loop;
//! - [`memory`]: guest RAM received through vfio-user `DMA_MAP` (a `zapguard_model::GuestMem`);
//! - [`trace`]: the trace writers (binary, drained by a background thread; JSON Lines).
//!
//! The `zapguard-dev` binary (`src/main.rs`) runs the server.
#![deny(missing_docs)]

pub mod memory;
pub mod server;
pub mod trace;

pub use memory::GuestMemory;
pub use server::{serve, EventFdTable, ZapguardBackend};
pub use trace::{JsonTraceWriter, TraceWriter};
