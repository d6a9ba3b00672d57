// SPDX-License-Identifier: GPL-2.0

//! The DMA addresses a context's device PTEs hold: one [`HmmDmaMap`] per 2 MiB block of user
//! address space that has device leaves, kept in an rbtree under the context lock.
//!
//! A device PTE holds the page's DMA address, as `hmm_dma_map_pfn()` returns it: the physical
//! address without an IOMMU (what the device's validator compares with the CPU's PTE), an IOVA
//! through one. Entry `i` of a block's map is the page at `block + i * 4096`; a 2 MiB device leaf
//! has all 512 entries mapped, contiguously.
//!
//! # Rules
//!
//! - Maps are allocated before the context lock is taken (the lock is taken in invalidation
//!   callbacks, under reclaim): the populate that will need one hands a spare in
//!   ([`DmaBlocks::offer`]), and a block without a map takes it ([`DmaBlocks::block`]).
//! - An entry is unmapped only once the device cannot use its address any more: after the SYNC
//!   that followed the clearing of its leaf (or the fence), by [`DmaBlocks::release`], which
//!   keeps what the device tables still map. An entry whose leaf was cleared without a completed
//!   SYNC stays mapped until the next ASID-wide flush releases everything unmapped.
//! - The page an entry maps is also what dirty tracking marks when the leaf's D bit was set
//!   ([`DmaBlocks::phys`]): the leaf itself holds a DMA address.

use crate::abi::pte;
use kernel::hmm::{DmaMap as HmmDmaMap, Pfn as HmmPfn};
use kernel::{
    device::{Bound, Device},
    io::PhysAddr,
    prelude::*,
    rbtree::{RBTree, RBTreeNodeReservation},
};

const HUGE_SHIFT: u32 = 21;
const ENTRIES: usize = pte::PT_ENTRIES;

/// What the device tables map in one 2 MiB block.
pub(crate) enum DeviceBlock {
    /// Nothing.
    Unmapped,
    /// A 2 MiB leaf: every entry.
    Huge,
    /// 4 KiB leaves: bit `i` set when entry `i` has a present leaf.
    Pages([u64; ENTRIES / 64]),
}

/// A map with its rbtree node, allocated outside the context lock.
pub(crate) struct Spare {
    node: RBTreeNodeReservation<u64, HmmDmaMap>,
    map: HmmDmaMap,
}

impl Spare {
    /// A map for one 2 MiB block of `dev` (may sleep).
    pub(crate) fn new(dev: &Device<Bound>) -> Result<Self> {
        Ok(Self {
            node: RBTreeNodeReservation::new(GFP_KERNEL)?,
            map: HmmDmaMap::new(dev, ENTRIES)?,
        })
    }
}

/// The block index of `va`, and the entry index within the block.
fn split(va: u64) -> (u64, usize) {
    (va >> HUGE_SHIFT, pte::pt_index(va, 1))
}

/// The DMA maps of one context (see the module documentation).
pub(crate) struct DmaBlocks {
    maps: RBTree<u64, HmmDmaMap>,
    spare: Option<Spare>,
}

impl DmaBlocks {
    pub(crate) fn new() -> Self {
        Self {
            maps: RBTree::new(),
            spare: None,
        }
    }

    /// Whether the next block without a map would find no spare.
    pub(crate) fn wants_spare(&self) -> bool {
        self.spare.is_none()
    }

    /// Keeps `spare` for the next block that needs a map; returns it if one is kept already
    /// (drop it after the context lock).
    pub(crate) fn offer(&mut self, spare: Option<Spare>) -> Option<Spare> {
        if self.spare.is_none() {
            self.spare = spare;
            return None;
        }
        spare
    }

    /// The map of the block holding `va`, given the spare if it has none (`EAGAIN` when there
    /// is no spare: allocate one outside the lock and retry).
    pub(crate) fn block(&mut self, va: u64) -> Result<&mut HmmDmaMap> {
        let (block, _) = split(va);
        if self.maps.get(&block).is_none() {
            let spare = self.spare.take().ok_or(EAGAIN)?;
            self.maps.insert(spare.node.into_node(block, spare.map));
        }
        self.maps.get_mut(&block).ok_or(EAGAIN)
    }

    /// Maps the page of `pfn` at `va` and returns its DMA address. An entry that still maps
    /// another page is unmapped first when `unmap_stale` (the device flushed since its leaf was
    /// cleared), else `EBUSY`.
    pub(crate) fn map(&mut self, va: u64, pfn: HmmPfn, unmap_stale: bool) -> Result<u64> {
        let (_, idx) = split(va);
        let map = self.block(va)?;
        match map.map(idx, pfn) {
            Err(e) if e == EBUSY && unmap_stale => {
                map.unmap(idx);
                map.map(idx, pfn)
            }
            r => r,
        }
    }

    /// The page entry `va` maps, if it is mapped (for dirty tracking of the leaf there).
    pub(crate) fn phys(&mut self, va: u64) -> Option<PhysAddr> {
        let (block, idx) = split(va);
        self.maps.get_mut(&block)?.phys(idx)
    }

    /// Unmaps, in the blocks overlapping `[start, end)`, every entry whose page the device
    /// tables no longer map, as `mapped(block_va)` reports them. Call it only once the device
    /// flushed what was cleared there (see the module documentation).
    pub(crate) fn release(
        &mut self,
        start: u64,
        end: u64,
        mapped: &mut dyn FnMut(u64) -> DeviceBlock,
    ) {
        if start >= end {
            return;
        }
        let (first, _) = split(start);
        let (last, _) = split(end - 1);
        let mut cursor = self.maps.cursor_lower_bound_mut(&first);
        while let Some(mut c) = cursor {
            let block = *c.current().0;
            if block > last {
                break;
            }
            let keep = match mapped(block << HUGE_SHIFT) {
                DeviceBlock::Unmapped => false,
                DeviceBlock::Huge => true,
                DeviceBlock::Pages(present) => {
                    let map = c.current_mut().1;
                    for idx in (0..ENTRIES).filter(|&i| present[i / 64] & (1 << (i % 64)) == 0) {
                        map.unmap(idx);
                    }
                    map.mapped() > 0
                }
            };
            if keep {
                cursor = c.move_next();
                continue;
            }
            // The node is freed here, and with it the map (unmapping what is left).
            let (next, _node) = c.remove_current();
            // Without a next node the cursor is on the previous one: done.
            cursor = next.filter(|n| *n.current().0 > block);
        }
    }

    /// Unmaps everything: the device can reach none of it any more.
    pub(crate) fn clear(&mut self) {
        self.maps = RBTree::new();
    }
}
