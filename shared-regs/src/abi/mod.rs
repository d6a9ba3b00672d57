//! The zapguard device datasheet and driver uAPI (dependency-free, shared with the kernel module).
//!
//! - [`pci`]: PCI identity and BAR layout.
//! - [`regs`]: BAR0 register map.
//! - [`uapi`]: `/dev/zapguard` ioctls and their structures.

pub mod pci;
pub mod regs;
pub mod uapi;
