//! Physical DMA: the memory the driver lent the device for accesses without translation.
//!
//! Most device accesses go through the page tables and are judged by the validator. A few are
//! guest-physical: job status records, event records and SYNC completion words (the driver's
//! own memory), and the `aux` buffer of `DMA_READ`/`DMA_WRITE` jobs (a context's bounce
//! buffer). A driver that hands a bounce buffer to its next user while an abandoned job still
//! writes it corrupts that user's data, and nothing translated would show it. So the driver
//! declares these regions through [`shared_regs::regs::PHYS_CTRL`] (ABI 1.8), and once it turns the check on, every
//! such access is checked against them ([`PhysRegions::driver_write_ok`],
//! [`PhysRegions::aux_ok`]); the device reports `phys_unlent` where the answer is no.
//!
//! A bounce buffer belongs to one ASID. [`PHYS_OP_RECLAIM`] is the driver taking it back: every
//! job queued or running at that moment (up to the device's `DMAQ_PROD`) loses it, and the
//! revocation ends when the device's consumer reaches that position, so that jobs queued after
//! the reclaim, which run only then (the engine runs jobs in order), use it legally.
//!
//! Limits: page-table A/D updates (the walker's atomic ORs into the driver's table pages) are
//! not checked here (a table freed too early is the table-lifetime check's business), nor are
//! the device's reads of rings, tables and the context table.

use std::collections::BTreeMap;

use shared_regs::regs::{
    PHYS_CTRL_ASID_SHIFT, PHYS_DRIVER_MAX, PHYS_OP_BOUNCE, PHYS_OP_CHECK, PHYS_OP_DRIVER,
    PHYS_OP_FORGET, PHYS_OP_MASK, PHYS_OP_RECLAIM,
};

/// Why a [`shared_regs::regs::PHYS_CTRL`] write was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PhysError {
    /// An unknown operation, or bits set that the operation does not use.
    #[error("PHYS_CTRL {0:#x}: unknown operation or reserved bits")]
    BadOp(u32),
    /// The staged region is empty or wraps the address space.
    #[error("PHYS_CTRL: region {addr:#x}+{len:#x} is empty or wraps")]
    BadRegion {
        /// Staged start.
        addr: u64,
        /// Staged length.
        len: u32,
    },
    /// The ASID is not one of the device's.
    #[error("PHYS_CTRL: ASID {0} is beyond ASID_COUNT")]
    BadAsid(u32),
    /// [`PHYS_DRIVER_MAX`] driver regions are declared already.
    #[error("PHYS_CTRL: the driver-region table is full ({PHYS_DRIVER_MAX})")]
    Full,
}

/// One ASID's bounce buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bounce {
    base: u64,
    len: u64,
    /// Reclaimed while jobs were queued or running: until the DMA consumer reaches this ring
    /// position, none of those jobs may touch the buffer.
    revoked_until: Option<u32>,
}

impl Bounce {
    fn contains(&self, pa: u64, len: u64) -> bool {
        contains((self.base, self.len), pa, len)
    }
}

/// Whether `[pa, pa + len)` lies inside `region` (start, length).
fn contains((base, size): (u64, u64), pa: u64, len: u64) -> bool {
    pa >= base && pa.checked_add(len).is_some_and(|end| end <= base + size)
}

/// The declared regions and the staging registers.
///
/// # Invariants
///
/// Every region is non-empty and does not wrap; at most [`PHYS_DRIVER_MAX`] driver regions.
#[derive(Debug, Default)]
pub struct PhysRegions {
    /// [`shared_regs::regs::PHYS_ADDR_LO`].
    pub addr_lo: u32,
    /// [`shared_regs::regs::PHYS_ADDR_HI`].
    pub addr_hi: u32,
    /// [`shared_regs::regs::PHYS_LEN`].
    pub len: u32,
    checking: bool,
    driver: Vec<(u64, u64)>,
    bounce: BTreeMap<u32, Bounce>,
}

impl PhysRegions {
    /// Whether untranslated accesses are checked ([`PHYS_OP_CHECK`] was written).
    pub fn checking(&self) -> bool {
        self.checking
    }

    /// Performs the [`shared_regs::regs::PHYS_CTRL`] write `v`. `asids`: the device's ASID count; `dmaq`: the DMA
    /// ring's (consumer, producer) positions now.
    pub fn control(
        &mut self,
        v: u32,
        asids: u32,
        (cons, prod): (u32, u32),
    ) -> Result<(), PhysError> {
        let op = v & PHYS_OP_MASK;
        let asid = v >> PHYS_CTRL_ASID_SHIFT;
        let reserved = v & !(PHYS_OP_MASK | u32::MAX << PHYS_CTRL_ASID_SHIFT);
        let names_asid = matches!(op, PHYS_OP_BOUNCE | PHYS_OP_FORGET | PHYS_OP_RECLAIM);
        if reserved != 0
            || !(PHYS_OP_DRIVER..=PHYS_OP_CHECK).contains(&op)
            || (!names_asid && asid != 0)
        {
            return Err(PhysError::BadOp(v));
        }
        if names_asid && asid >= asids {
            return Err(PhysError::BadAsid(asid));
        }
        match op {
            PHYS_OP_DRIVER => {
                let r = self.staged()?;
                if self.driver.len() >= PHYS_DRIVER_MAX {
                    return Err(PhysError::Full);
                }
                self.driver.push(r);
            }
            PHYS_OP_BOUNCE => {
                let (base, len) = self.staged()?;
                self.bounce.insert(
                    asid,
                    Bounce {
                        base,
                        len,
                        revoked_until: None,
                    },
                );
            }
            PHYS_OP_FORGET => {
                self.bounce.remove(&asid);
            }
            PHYS_OP_RECLAIM => {
                if let Some(b) = self.bounce.get_mut(&asid) {
                    b.revoked_until = (cons != prod).then_some(prod);
                }
            }
            _ => self.checking = true,
        }
        Ok(())
    }

    /// The staged region, if it is one.
    fn staged(&self) -> Result<(u64, u64), PhysError> {
        let addr = u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo);
        let len = self.len;
        if len == 0 || addr.checked_add(u64::from(len)).is_none() {
            return Err(PhysError::BadRegion { addr, len });
        }
        Ok((addr, u64::from(len)))
    }

    /// Whether the device may write `len` bytes of its own bookkeeping (a status record, an
    /// event record, a SYNC word) at `pa`: inside a driver region, or the check is off.
    pub fn driver_write_ok(&self, pa: u64, len: u64) -> bool {
        !self.checking || self.driver.iter().any(|&r| contains(r, pa, len))
    }

    /// Whether the running job of `asid` may access `len` bytes of its `aux` buffer at `pa`:
    /// inside the ASID's bounce buffer and not reclaimed since the job was queued, or the check
    /// is off.
    pub fn aux_ok(&self, asid: u32, pa: u64, len: u64) -> bool {
        !self.checking
            || self
                .bounce
                .get(&asid)
                .is_some_and(|b| b.revoked_until.is_none() && b.contains(pa, len))
    }

    /// The DMA consumer moved to `cons`: reclaims made before the jobs up to it were done end.
    pub fn consumed(&mut self, cons: u32) {
        for b in self.bounce.values_mut() {
            if b.revoked_until == Some(cons) {
                b.revoked_until = None;
            }
        }
    }

    /// The DMA ring was enabled again (positions back at 0): no earlier job can run any more.
    pub fn ring_restarted(&mut self) {
        for b in self.bounce.values_mut() {
            b.revoked_until = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_regs::regs::phys_ctrl;

    fn declared(addr: u64, len: u32, v: u32) -> PhysRegions {
        let mut p = PhysRegions {
            addr_lo: addr as u32,
            addr_hi: (addr >> 32) as u32,
            len,
            ..Default::default()
        };
        p.control(v, 16, (0, 0)).unwrap();
        p.control(PHYS_OP_CHECK, 16, (0, 0)).unwrap();
        p
    }

    #[test]
    fn the_check_is_off_until_turned_on() {
        let p = PhysRegions::default();
        assert!(p.driver_write_ok(0x1000, 8) && p.aux_ok(3, 0x1000, 8));
    }

    #[test]
    fn regions_are_checked_whole() {
        let p = declared(0x1_0000, 0x1000, PHYS_OP_DRIVER);
        assert!(p.driver_write_ok(0x1_0000, 0x1000));
        assert!(!p.driver_write_ok(0x1_0ff8, 16), "crosses the end");
        assert!(!p.driver_write_ok(0xfff8, 16), "starts before");
        assert!(!p.driver_write_ok(u64::MAX - 3, 8), "wraps");
        assert!(
            !p.aux_ok(0, 0x1_0000, 8),
            "driver memory is no bounce buffer"
        );
    }

    #[test]
    fn a_reclaim_revokes_the_jobs_queued_before_it_until_they_are_consumed() {
        let mut p = declared(0x2_0000, 0x4000, phys_ctrl(PHYS_OP_BOUNCE, 5));
        assert!(p.aux_ok(5, 0x2_0000, 0x1000));
        assert!(!p.aux_ok(4, 0x2_0000, 0x1000), "another ASID's");
        // Jobs at positions 3 and 4 are queued or running (cons 3, prod 5).
        p.control(phys_ctrl(PHYS_OP_RECLAIM, 5), 16, (3, 5))
            .unwrap();
        assert!(!p.aux_ok(5, 0x2_0000, 0x1000));
        p.consumed(4);
        assert!(!p.aux_ok(5, 0x2_0000, 0x1000), "position 4 still runs");
        p.consumed(5);
        assert!(p.aux_ok(5, 0x2_0000, 0x1000), "jobs from position 5 on");
        // Nothing queued: nothing to revoke.
        p.control(phys_ctrl(PHYS_OP_RECLAIM, 5), 16, (7, 7))
            .unwrap();
        assert!(p.aux_ok(5, 0x2_0000, 0x1000));
        p.control(phys_ctrl(PHYS_OP_RECLAIM, 5), 16, (7, 9))
            .unwrap();
        p.ring_restarted();
        assert!(p.aux_ok(5, 0x2_0000, 0x1000));
        p.control(phys_ctrl(PHYS_OP_FORGET, 5), 16, (0, 0)).unwrap();
        assert!(!p.aux_ok(5, 0x2_0000, 0x1000));
    }

    #[test]
    fn bad_operations_change_nothing() {
        let mut p = PhysRegions::default();
        for v in [0, 6, PHYS_OP_CHECK | 0x10, phys_ctrl(PHYS_OP_DRIVER, 1)] {
            assert_eq!(p.control(v, 16, (0, 0)), Err(PhysError::BadOp(v)));
        }
        assert_eq!(
            p.control(phys_ctrl(PHYS_OP_BOUNCE, 16), 16, (0, 0)),
            Err(PhysError::BadAsid(16))
        );
        assert!(matches!(
            p.control(PHYS_OP_DRIVER, 16, (0, 0)),
            Err(PhysError::BadRegion { .. })
        ));
        assert!(!p.checking());
    }
}
