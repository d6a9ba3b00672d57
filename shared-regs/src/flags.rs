//! Named flag sets over the ABI's flag constants, for host code that people read: test messages,
//! trace tables, summaries. `Pte::P | Pte::W` prints as `P | W` rather than `0x3`. Each flag is
//! the ABI constant itself (one definition); the kernel module never compiles this file.

// Each flag is the ABI constant of the same name, documented there.
#![allow(missing_docs)]

use crate::abi::{dma, pte, regs, testing, uapi};
use bitflags::bitflags;

bitflags! {
    /// A device page-table entry's flag bits (`PTE_*`; the address bits are not flags).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Pte: u64 {
        const P = pte::PTE_P;
        const W = pte::PTE_W;
        const A = pte::PTE_A;
        const D = pte::PTE_D;
        const PS = pte::PTE_PS;
    }

    /// A context entry's flags (`CTX_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Ctx: u64 {
        const VALID = pte::CTX_VALID;
        const STALL = pte::CTX_STALL;
        const MM_RELEASED = pte::CTX_MM_RELEASED;
        const CPU_LA57 = pte::CTX_CPU_LA57;
        const VALIDATE = pte::CTX_VALIDATE;
        const NO_VALIDATE = pte::CTX_NO_VALIDATE;
    }

    /// `CR0` and `CR0ACK`: the device's units.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Cr0: u32 {
        const CMDQ_EN = regs::CR0_CMDQ_EN;
        const EVTQ_EN = regs::CR0_EVTQ_EN;
        const DMAQ_EN = regs::CR0_DMAQ_EN;
        const CTX_EN = regs::CR0_CTX_EN;
    }

    /// `IRQ_CTRL`: the interrupt causes enabled.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct IrqCtrl: u32 {
        const CMD_EN = regs::IRQ_CMD_EN;
        const EVT_EN = regs::IRQ_EVT_EN;
        const ERR_EN = regs::IRQ_ERR_EN;
    }

    /// `CAPS`: what the device can do.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Caps: u32 {
        const MSIX = regs::CAP_MSIX;
        const QUEUES = regs::CAP_QUEUES;
        const HUGE_2M = regs::CAP_HUGE_2M;
        const STALL = regs::CAP_STALL;
        const VALIDATOR = regs::CAP_VALIDATOR;
    }

    /// A DMA job descriptor's flags (`DMA_F_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct DmaJob: u8 {
        const STALL = dma::DMA_F_STALL;
        const IRQ = dma::DMA_F_IRQ;
    }

    /// A `SNAPSHOT` byte (`ZG_SNAP_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Snap: u8 {
        const DEV_PRESENT = uapi::ZG_SNAP_DEV_PRESENT;
        const DEV_WRITE = uapi::ZG_SNAP_DEV_WRITE;
        const DEV_HUGE = uapi::ZG_SNAP_DEV_HUGE;
        const DEV_DIRTY = uapi::ZG_SNAP_DEV_DIRTY;
        const CPU_VALID = uapi::ZG_SNAP_CPU_VALID;
        const CPU_WRITE = uapi::ZG_SNAP_CPU_WRITE;
        const CPU_HUGE = uapi::ZG_SNAP_CPU_HUGE;
        const CPU_ERROR = uapi::ZG_SNAP_CPU_ERROR;
    }

    /// The debugfs `inject` file's `modes`: driver bugs and debug switches (`ZG_INJ_*`, `ZG_DBG_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Inject: u32 {
        const SKIP_SHOOTDOWN = testing::ZG_INJ_SKIP_SHOOTDOWN;
        const SKIP_SYNC_WAIT = testing::ZG_INJ_SKIP_SYNC_WAIT;
        const IGNORE_RETRY = testing::ZG_INJ_IGNORE_RETRY;
        const KEEP_WRITE = testing::ZG_INJ_KEEP_WRITE;
        const KEEP_AFTER_RELEASE = testing::ZG_INJ_KEEP_AFTER_RELEASE;
        const EARLY_TABLE_FREE = testing::ZG_INJ_EARLY_TABLE_FREE;
        const SKIP_CTX_INVALIDATE = testing::ZG_INJ_SKIP_CTX_INVALIDATE;
        const EARLY_BOUNCE_REUSE = testing::ZG_INJ_EARLY_BOUNCE_REUSE;
        const DBG_NO_VALIDATE = testing::ZG_DBG_NO_VALIDATE;
        const DBG_ZAP_WRITE_PROTECT = testing::ZG_DBG_ZAP_WRITE_PROTECT;
    }
}

/// The flags set in `bits`, displayed by name (`P | W`), unknown bits as hex, `-` for none.
pub fn names<F: bitflags::Flags>(bits: F::Bits) -> Names<F> {
    Names(F::from_bits_retain(bits))
}

/// A flag set displayed by name (see [`names`]); no allocation (the crate is `no_std`).
pub struct Names<F>(pub F);

impl<F: bitflags::Flags> core::fmt::Display for Names<F>
where
    F::Bits: bitflags::parser::WriteHex,
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("-");
        }
        bitflags::parser::to_writer(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::ToString;

    #[test]
    fn flags_print_by_name() {
        assert_eq!(names::<Pte>(pte::PTE_P | pte::PTE_W).to_string(), "P | W");
        assert_eq!(
            names::<Cr0>(0xf).to_string(),
            "CMDQ_EN | EVTQ_EN | DMAQ_EN | CTX_EN"
        );
        assert_eq!(names::<Snap>(0).to_string(), "-");
        assert_eq!(names::<IrqCtrl>(0x11).to_string(), "CMD_EN | 0x10");
        assert_eq!(
            names::<Inject>(testing::ZG_INJ_MODES).to_string(),
            "SKIP_SHOOTDOWN | SKIP_SYNC_WAIT | IGNORE_RETRY | KEEP_WRITE | KEEP_AFTER_RELEASE | \
             EARLY_TABLE_FREE | SKIP_CTX_INVALIDATE | EARLY_BOUNCE_REUSE | DBG_NO_VALIDATE | \
             DBG_ZAP_WRITE_PROTECT",
            "every mode has a name"
        );
    }
}
