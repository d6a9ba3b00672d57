//! Ring arithmetic shared by the device and the driver (SMMUv3 style).
//!
//! A queue has `2^log2` entries. Its producer and consumer registers hold an index in bits
//! `log2-1:0` and a wrap bit at bit `log2` that flips each time the index wraps to 0:
//! - empty: `prod == cons` (same index, same wrap);
//! - full: same index, different wrap.
//!
//! Bits above the wrap bit are not part of the position (the consumer registers use bit 31 for
//! an error flag); [`position`] masks them off.

/// Smallest legal `log2` queue size (2 entries).
pub const MIN_LOG2: u32 = 1;
/// Largest legal `log2` queue size (32768 entries).
pub const MAX_LOG2: u32 = 15;

/// Whether `log2` is a legal queue size.
pub const fn valid_log2(log2: u32) -> bool {
    log2 >= MIN_LOG2 && log2 <= MAX_LOG2
}

// Every function below is total: the size register is guest- or driver-written and may hold
// any value until the queue is enabled, and the kernel builds with overflow checks.

/// Mask of index + wrap bit (`log2 + 1` bits, saturating at 32).
const fn position_mask(log2: u32) -> u32 {
    let l = if log2 > 31 { 31 } else { log2 };
    u32::MAX >> (31 - l)
}

/// Mask of the index bits (`log2` bits, saturating at 32).
const fn index_mask(log2: u32) -> u32 {
    if log2 == 0 {
        0
    } else if log2 >= 32 {
        u32::MAX
    } else {
        u32::MAX >> (32 - log2)
    }
}

/// Index + wrap bit of a register value.
pub const fn position(reg: u32, log2: u32) -> u32 {
    reg & position_mask(log2)
}

/// Slot index (without the wrap bit).
pub const fn index(reg: u32, log2: u32) -> u32 {
    reg & index_mask(log2)
}

/// The wrap bit.
pub const fn wrap(reg: u32, log2: u32) -> bool {
    match 1u32.checked_shl(log2) {
        Some(bit) => reg & bit != 0,
        None => false,
    }
}

/// The position after `reg`: index + 1, flipping the wrap bit when the index wraps.
pub const fn next(reg: u32, log2: u32) -> u32 {
    position(position(reg, log2).wrapping_add(1), log2)
}

/// Whether the queue holds no entries.
pub const fn is_empty(prod: u32, cons: u32, log2: u32) -> bool {
    position(prod, log2) == position(cons, log2)
}

/// Whether the queue holds `2^log2` entries.
pub const fn is_full(prod: u32, cons: u32, log2: u32) -> bool {
    index(prod, log2) == index(cons, log2) && wrap(prod, log2) != wrap(cons, log2)
}

/// Number of entries between `cons` and `prod`.
pub const fn used(prod: u32, cons: u32, log2: u32) -> u32 {
    position(
        position(prod, log2).wrapping_sub(position(cons, log2)),
        log2,
    )
}

/// Free slots a producer can still fill.
pub const fn free(prod: u32, cons: u32, log2: u32) -> u32 {
    index_mask(log2)
        .wrapping_add(1)
        .wrapping_sub(used(prod, cons, log2))
}
