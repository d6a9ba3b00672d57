//! Command queue descriptors.
//!
//! A command is 32 bytes: four little-endian u64 words.
//!
//! | word | bits | field |
//! |---|---|---|
//! | 0 | 7:0 | opcode (`CMD_*`) |
//! | 0 | 15:8 | flags (`CMD_F_*`, per opcode) |
//! | 0 | 31:16 | reserved, zero |
//! | 0 | 63:32 | ASID |
//! | 1 | 63:0 | `addr` |
//! | 2 | 63:0 | `arg` |
//! | 3 | 63:0 | reserved, zero |
//!
//! | opcode | ASID | addr | arg | effect |
//! |---|---|---|---|---|
//! | [`CMD_NOP`] | 0 | 0 | 0 | nothing |
//! | [`CMD_INV_RANGE`] | yes | VA, 4 KiB aligned | length in bytes, 4 KiB multiple, > 0 | drop IOTLB entries of ASID overlapping the range |
//! | [`CMD_INV_ASID`] | yes | 0 | 0 | drop all IOTLB entries of ASID |
//! | [`CMD_INV_ALL`] | 0 | 0 | 0 | drop every IOTLB entry |
//! | [`CMD_CFGI_CTX`] | yes | 0 | 0 | re-read the context entry of ASID (context cache) |
//! | [`CMD_SYNC`] | 0 | completion address (4-aligned GPA) or 0 | value (low 32 bits) | see below |
//! | [`CMD_RESUME`] | yes | 0 | stall tag | retry the stalled job's translation and continue |
//! | [`CMD_ABORT`] | yes | 0 | stall tag | end the stalled job with [`super::dma::DMA_ST_FAULT`] |
//!
//! **SYNC** completes only after every earlier command has been executed *and* every DMA access
//! that was using a translation those commands invalidated has finished. It then writes `arg` as
//! a u32 to `addr` (if non-zero) and, with [`CMD_F_SYNC_IRQ`], raises the command vector. After a
//! SYNC completes, no translation it covers is used again (the validator's ledger checks this).
//!
//! A malformed command (unknown opcode, reserved bits set, ASID out of range, bad alignment, an
//! address outside guest RAM) stops the queue: `CMDQ_CONS` keeps pointing at it with
//! [`super::regs::CONS_ERR`] and the `CERR_*` code set, [`super::regs::ERR_CMDQ`] is raised. The driver
//! may rewrite the slot, then clears `ERR_CMDQ` in [`super::regs::ERROR`] to resume processing there.
//! The same stop with [`CERR_INJECTED`] is a device failure injected with
//! [`super::regs::FAIL_CMDQ_ERROR`]: the command is fine and runs once `ERR_CMDQ` is cleared.

/// No operation.
pub const CMD_NOP: u8 = 0x00;
/// Invalidate a VA range of one ASID.
pub const CMD_INV_RANGE: u8 = 0x01;
/// Invalidate all translations of one ASID.
pub const CMD_INV_ASID: u8 = 0x02;
/// Invalidate every translation.
pub const CMD_INV_ALL: u8 = 0x03;
/// Invalidate the cached context entry of one ASID.
pub const CMD_CFGI_CTX: u8 = 0x04;
/// Synchronise: wait for earlier commands and the DMA they affect, then signal.
pub const CMD_SYNC: u8 = 0x05;
/// Resume a stalled job.
pub const CMD_RESUME: u8 = 0x06;
/// Abort a stalled job.
pub const CMD_ABORT: u8 = 0x07;

/// SYNC flag: raise the command MSI-X vector on completion.
pub const CMD_F_SYNC_IRQ: u8 = 1 << 0;

/// Command error: none.
pub const CERR_NONE: u8 = 0;
/// Command error: unknown opcode, unknown flag or reserved field not zero.
pub const CERR_ILLEGAL: u8 = 1;
/// Command error: ASID out of range.
pub const CERR_ASID: u8 = 2;
/// Command error: misaligned, empty or overflowing address range.
pub const CERR_RANGE: u8 = 3;
/// Command error: the command or its completion address is outside guest RAM.
pub const CERR_ABORT: u8 = 4;
/// Command error (ABI 1.3): injected by [`super::regs::FAIL_CMDQ_ERROR`]; the command itself
/// may be fine and executes normally once the driver clears `ERR_CMDQ`.
pub const CERR_INJECTED: u8 = 5;

/// Size of a command in bytes.
pub const CMD_SIZE: usize = 32;

/// A command descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// `CMD_*`.
    pub op: u8,
    /// `CMD_F_*`.
    pub flags: u8,
    /// Must be zero.
    pub reserved0: u16,
    /// Address-space ID.
    pub asid: u32,
    /// Address operand.
    pub addr: u64,
    /// Second operand.
    pub arg: u64,
    /// Must be zero.
    pub reserved1: u64,
}

impl Command {
    /// A command with the given opcode and operands.
    pub const fn new(op: u8, flags: u8, asid: u32, addr: u64, arg: u64) -> Self {
        Self {
            op,
            flags,
            reserved0: 0,
            asid,
            addr,
            arg,
            reserved1: 0,
        }
    }

    /// Little-endian encoding as stored in the ring.
    pub fn to_bytes(&self) -> [u8; CMD_SIZE] {
        let w0 = u64::from(self.op)
            | u64::from(self.flags) << 8
            | u64::from(self.reserved0) << 16
            | u64::from(self.asid) << 32;
        super::words_to_bytes([w0, self.addr, self.arg, self.reserved1])
    }

    /// Decodes a command read from the ring.
    pub fn from_bytes(b: &[u8; CMD_SIZE]) -> Self {
        let [w0, addr, arg, reserved1] = super::bytes_to_words(b);
        Self {
            op: w0 as u8,
            flags: (w0 >> 8) as u8,
            reserved0: (w0 >> 16) as u16,
            asid: (w0 >> 32) as u32,
            addr,
            arg,
            reserved1,
        }
    }
}

const _: () = assert!(core::mem::size_of::<Command>() == CMD_SIZE);
const _: () =
    assert!(core::mem::offset_of!(Command, asid) == 4 && core::mem::offset_of!(Command, addr) == 8);
