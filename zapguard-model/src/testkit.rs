//! A simulated driver for exercising the device without QEMU or a kernel: guest memory
//! ([`VecMem`]), the rings and context table laid out in it, a device page table and an x86-64
//! CPU page table per ASID, and helpers that do what the real driver does through registers.
//!
//! Integration tests, property tests, the fuzz target and the benchmarks share it, so they all
//! drive the device through its ABI exactly as the kernel module does.
//!
//! Guest-physical layout (all inside one [`VecMem`] starting at 0):
//!
//! | range | use |
//! |---|---|
//! | `CTX_TABLE` | context table |
//! | `CMDQ`, `EVTQ`, `DMAQ` | rings |
//! | `STATUS` | one DMA status record per DMA ring slot |
//! | `SYNC_WORD` | SYNC completion word |
//! | `AUX` | DMA_WRITE/READ buffers |
//! | `DEV_PT`, `CPU_PT` | page-table pages (bump-allocated) |
//! | `FRAMES` | data pages ("physical memory" of the simulated processes) |

use std::collections::BTreeMap;

use shared_regs::cmd::{self, Command};
use shared_regs::dma::{DmaJob, DmaStatus, DMA_JOB_SIZE, DMA_STATUS_SIZE};
use shared_regs::event::{Event as EvtRecord, EVT_SIZE};
use shared_regs::pte::{self, ContextEntry};
use shared_regs::queue;
use shared_regs::regs::*;

use crate::device::{DeviceConfig, ZapguardDevice};
use crate::events::Events;
use crate::guest::{GuestMem, VecMem};
use crate::pagetable::PageTableBuilder;
use crate::x86pt::{CpuFlags, X86PageTable};

/// Context table.
pub const CTX_TABLE: u64 = 0x10_0000;
/// Command ring.
pub const CMDQ: u64 = 0x11_0000;
/// Event ring.
pub const EVTQ: u64 = 0x11_8000;
/// DMA ring.
pub const DMAQ: u64 = 0x12_0000;
/// Status records.
pub const STATUS: u64 = 0x13_0000;
/// SYNC completion word.
pub const SYNC_WORD: u64 = 0x13_f000;
/// DMA_WRITE/DMA_READ buffers.
pub const AUX: u64 = 0x14_0000;
/// Size of the AUX area.
pub const AUX_SIZE: u64 = 0x4_0000;
/// Device page tables.
pub const DEV_PT: u64 = 0x20_0000;
/// CPU page tables.
pub const CPU_PT: u64 = 0x60_0000;
/// Data frames.
pub const FRAMES: u64 = 0xa0_0000;
/// Total simulated RAM.
pub const RAM_SIZE: u64 = 0x400_0000;
/// log2 of every ring's size in the rig.
pub const RING_LOG2: u32 = 8;
/// Room for each ASID's page tables.
const PT_SPAN: u64 = 0x4_0000;

/// The simulated driver and its device.
pub struct Rig<E: Events> {
    /// Guest memory.
    pub mem: VecMem,
    /// The device.
    pub dev: ZapguardDevice<E>,
    dev_pt: BTreeMap<u32, PageTableBuilder>,
    cpu_pt: BTreeMap<u32, X86PageTable>,
    next_frame: u64,
    next_huge: u64,
    sync_seq: u32,
    job_seq: u64,
}

impl Rig<crate::events::EventLog> {
    /// A rig with page steps (the default configuration) and ASID 1 bound, validating.
    pub fn with_asid1() -> Self {
        let mut r = Self::new(DeviceConfig::default(), crate::events::EventLog::default());
        r.bind(1, 0);
        r
    }

    /// What the engine reported so far (the `Engine` events of the log), in order.
    pub fn activity(&mut self) -> Vec<crate::events::Activity> {
        self.dev
            .events()
            .events
            .iter()
            .filter_map(|e| match e {
                crate::events::Event::Engine(a) => Some(a.clone()),
                _ => None,
            })
            .collect()
    }
}

impl<E: Events> Rig<E> {
    /// A device with every unit enabled and all interrupt causes on.
    pub fn new(config: DeviceConfig, events: E) -> Self {
        let mut r = Self {
            mem: VecMem::new(0, RAM_SIZE as usize),
            dev: ZapguardDevice::new(config, events),
            dev_pt: BTreeMap::new(),
            cpu_pt: BTreeMap::new(),
            next_frame: FRAMES,
            // 2 MiB frames come from the top of RAM downwards.
            next_huge: RAM_SIZE,
            sync_seq: 0,
            job_seq: 0,
        };
        program(|reg, v| r.set(reg, v), RING_LOG2);
        r
    }

    /// Reads a register through MMIO.
    pub fn reg(&mut self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(reg.into(), &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a register through MMIO.
    pub fn set(&mut self, reg: u32, v: u32) {
        self.dev.write(reg.into(), &v.to_le_bytes());
    }

    /// A 64-bit statistic, read HI, LO, HI as a driver must.
    pub fn stat(&mut self, i: u32) -> u64 {
        loop {
            let hi = self.reg(stat_hi(i));
            let lo = self.reg(stat_lo(i));
            if self.reg(stat_hi(i)) == hi {
                return u64::from(hi) << 32 | u64::from(lo);
            }
        }
    }

    /// Makes the device's validator blind (it records what it saw and concludes nothing), or
    /// seeing again: the device the offline check must catch (`zapguard-dev`'s
    /// `tests/offline_check.rs`, which cannot reach the validator itself).
    #[cfg(any(test, feature = "testkit"))]
    pub fn set_validator_blind(&mut self, blind: bool) {
        self.dev.s.validator.blind = blind;
    }

    /// Lets the device work until it has nothing left to do (bounded).
    pub fn run(&mut self) {
        for _ in 0..100_000 {
            if !self.dev.process(&self.mem, 64) {
                return;
            }
        }
    }

    /// Creates page tables for `asid` and writes a valid context entry with `extra` flags
    /// (`CTX_VALID` is always set).
    pub fn bind(&mut self, asid: u32, extra: u64) {
        let dev_base = DEV_PT + u64::from(asid % 16) * PT_SPAN;
        let cpu_base = CPU_PT + u64::from(asid % 16) * PT_SPAN;
        let dev = PageTableBuilder::new(&self.mem, dev_base, dev_base + PT_SPAN)
            .expect("device page-table region");
        let la57 = extra & pte::CTX_CPU_LA57 != 0;
        let cpu = X86PageTable::new(&self.mem, cpu_base, cpu_base + PT_SPAN, la57)
            .expect("CPU page-table region");
        self.write_ctx(
            asid,
            ContextEntry {
                flags: pte::CTX_VALID | extra,
                pt_root: dev.root(),
                cpu_root: cpu.root(),
                seq: 0,
            },
        );
        self.dev_pt.insert(asid, dev);
        self.cpu_pt.insert(asid, cpu);
    }

    /// Writes context entry `asid` (the device sees it after [`Self::cfgi`]).
    pub fn write_ctx(&mut self, asid: u32, c: ContextEntry) {
        self.mem
            .write(
                CTX_TABLE + u64::from(asid) * pte::CTX_ENTRY_SIZE as u64,
                &c.to_bytes(),
            )
            .expect("context table");
    }

    /// Reads context entry `asid`.
    pub fn ctx(&self, asid: u32) -> ContextEntry {
        let mut b = [0u8; pte::CTX_ENTRY_SIZE];
        self.mem
            .read(
                CTX_TABLE + u64::from(asid) * pte::CTX_ENTRY_SIZE as u64,
                &mut b,
            )
            .expect("context table");
        ContextEntry::from_bytes(&b)
    }

    /// A fresh zeroed 4 KiB frame.
    pub fn frame(&mut self) -> u64 {
        let f = self.next_frame;
        assert!(f + pte::PAGE_SIZE <= self.next_huge, "rig out of frames");
        self.next_frame += pte::PAGE_SIZE;
        f
    }

    /// A fresh zeroed 2 MiB frame.
    pub fn huge_frame(&mut self) -> u64 {
        let f = self.next_huge - pte::HUGE_PAGE_SIZE;
        assert!(f >= self.next_frame, "rig out of huge frames");
        self.next_huge = f;
        f
    }

    /// The CPU side of a process: map `va` to `pa` in its x86 page table.
    pub fn cpu_map(&mut self, asid: u32, va: u64, pa: u64, flags: CpuFlags) {
        let mem = &self.mem;
        self.cpu_pt
            .get_mut(&asid)
            .expect("bound asid")
            .map_4k(mem, va, pa, flags)
            .expect("cpu map");
    }

    /// The CPU side: a 2 MiB mapping.
    pub fn cpu_map_2m(&mut self, asid: u32, va: u64, pa: u64, flags: CpuFlags) {
        let mem = &self.mem;
        self.cpu_pt
            .get_mut(&asid)
            .expect("bound asid")
            .map_2m(mem, va, pa, flags)
            .expect("cpu map 2m");
    }

    /// The CPU side: change leaf bits (`crate::x86pt::X86_*`) of the mapping of `va`.
    pub fn cpu_set_flags(&mut self, asid: u32, va: u64, set: u64, clear: u64) {
        self.cpu_pt[&asid]
            .set_flags(&self.mem, va, set, clear)
            .expect("cpu set flags");
    }

    /// The CPU side: the guest-physical address of the 4 KiB leaf entry that maps `va`.
    pub fn cpu_leaf_gpa(&self, asid: u32, va: u64) -> u64 {
        self.cpu_pt[&asid]
            .entry_gpa(&self.mem, va, 1)
            .expect("cpu leaf")
    }

    /// The CPU side: unmap `va`.
    pub fn cpu_unmap(&mut self, asid: u32, va: u64) {
        self.cpu_pt[&asid].unmap(&self.mem, va).expect("cpu unmap");
    }

    /// The driver side: a device PTE for `va`.
    pub fn dev_map(&mut self, asid: u32, va: u64, pa: u64, writable: bool) {
        let mem = &self.mem;
        self.dev_pt
            .get_mut(&asid)
            .expect("bound asid")
            .map_4k(mem, va, pa, writable)
            .expect("device map");
    }

    /// The driver side: a 2 MiB device PTE.
    pub fn dev_map_2m(&mut self, asid: u32, va: u64, pa: u64, writable: bool) {
        let mem = &self.mem;
        self.dev_pt
            .get_mut(&asid)
            .expect("bound asid")
            .map_2m(mem, va, pa, writable)
            .expect("device map 2m");
    }

    /// The driver side: clear the device PTE for `va`.
    pub fn dev_unmap(&mut self, asid: u32, va: u64) -> bool {
        let mem = &self.mem;
        self.dev_pt
            .get_mut(&asid)
            .expect("bound asid")
            .unmap(mem, va)
    }

    /// The driver side: change the device PTE's write permission.
    pub fn dev_set_writable(&mut self, asid: u32, va: u64, writable: bool) -> bool {
        let mem = &self.mem;
        self.dev_pt
            .get_mut(&asid)
            .expect("bound asid")
            .set_writable(mem, va, writable)
    }

    /// The device leaf entry for `va`, as the device left it (A/D bits).
    pub fn dev_leaf(&self, asid: u32, va: u64) -> Option<u64> {
        self.dev_pt[&asid].read_leaf(&self.mem, va)
    }

    /// Maps `pages` pages of ASID 1 from `va` ([`Self::map_page`]) and writes a distinct byte
    /// pattern into each; returns the frames.
    pub fn patterned_pages(&mut self, va: u64, pages: u64, seed: u8) -> Vec<u64> {
        let pg = shared_regs::pte::PAGE_SIZE;
        (0..pages)
            .map(|p| {
                let f = self.map_page(1, va + p * pg);
                let bytes: Vec<u8> = (0..pg)
                    .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed + p as u8))
                    .collect();
                self.poke(f, &bytes);
                f
            })
            .collect()
    }

    /// A correct populate: a fresh frame mapped at `va` for the CPU (writable, dirty) and the
    /// device. Returns the frame.
    pub fn map_page(&mut self, asid: u32, va: u64) -> u64 {
        let pa = self.frame();
        self.cpu_map(asid, va, pa, CpuFlags::WRITABLE_DIRTY);
        self.dev_map(asid, va, pa, true);
        pa
    }

    /// Queues a command and rings the doorbell (does not run the device).
    pub fn post(&mut self, c: Command) {
        let prod = self.reg(CMDQ_PROD);
        let slot = CMDQ + u64::from(queue::index(prod, RING_LOG2)) * cmd::CMD_SIZE as u64;
        self.mem.write(slot, &c.to_bytes()).expect("command ring");
        self.set(CMDQ_PROD, queue::next(prod, RING_LOG2));
    }

    /// Queues a SYNC that writes a new sequence number to [`SYNC_WORD`]; returns that number.
    pub fn post_sync(&mut self) -> u32 {
        self.sync_seq += 1;
        self.post(Command::new(
            cmd::CMD_SYNC,
            cmd::CMD_F_SYNC_IRQ,
            0,
            SYNC_WORD,
            u64::from(self.sync_seq),
        ));
        self.sync_seq
    }

    /// Whether the SYNC that wrote `seq` completed.
    pub fn sync_done(&self, seq: u32) -> bool {
        self.mem.read_u32(SYNC_WORD).is_ok_and(|v| v >= seq)
    }

    /// A driver's shootdown: invalidate `[va, va+len)` of `asid`, SYNC, run until done.
    pub fn shootdown(&mut self, asid: u32, va: u64, len: u64) {
        self.post(Command::new(cmd::CMD_INV_RANGE, 0, asid, va, len));
        let s = self.post_sync();
        self.run();
        assert!(self.sync_done(s), "SYNC did not complete");
    }

    /// Reloads the device's cached context of `asid` (CFGI_CTX + SYNC).
    pub fn cfgi(&mut self, asid: u32) {
        self.post(Command::new(cmd::CMD_CFGI_CTX, 0, asid, 0, 0));
        let s = self.post_sync();
        self.run();
        assert!(self.sync_done(s), "SYNC did not complete");
    }

    /// Queues a job (its `status` and `id` are filled in); returns the status address.
    pub fn submit(&mut self, mut j: DmaJob) -> u64 {
        let prod = self.reg(DMAQ_PROD);
        let idx = u64::from(queue::index(prod, RING_LOG2));
        j.status = STATUS + idx * DMA_STATUS_SIZE as u64;
        self.job_seq += 1;
        j.id = self.job_seq;
        self.mem
            .write(j.status, &[0u8; DMA_STATUS_SIZE])
            .expect("status");
        self.mem
            .write(DMAQ + idx * DMA_JOB_SIZE as u64, &j.to_bytes())
            .expect("DMA ring");
        self.set(DMAQ_PROD, queue::next(prod, RING_LOG2));
        j.status
    }

    /// Submits a job, runs the device, returns the job's status record.
    pub fn dma(&mut self, j: DmaJob) -> DmaStatus {
        let st = self.submit(j);
        self.run();
        self.status(st)
    }

    /// The status record at `addr`.
    pub fn status(&self, addr: u64) -> DmaStatus {
        let mut b = [0u8; DMA_STATUS_SIZE];
        self.mem.read(addr, &mut b).expect("status");
        DmaStatus::from_bytes(&b)
    }

    /// Consumes every event the device wrote.
    pub fn take_events(&mut self) -> Vec<EvtRecord> {
        let mut out = vec![];
        let prod = self.reg(EVTQ_PROD);
        let mut cons = self.reg(EVTQ_CONS);
        while !queue::is_empty(prod, cons, RING_LOG2) {
            let mut b = [0u8; EVT_SIZE];
            self.mem
                .read(
                    EVTQ + u64::from(queue::index(cons, RING_LOG2)) * EVT_SIZE as u64,
                    &mut b,
                )
                .expect("event ring");
            out.push(EvtRecord::from_bytes(&b));
            cons = queue::next(cons, RING_LOG2);
        }
        self.set(EVTQ_CONS, cons);
        out
    }

    /// Bytes at guest-physical `pa`.
    pub fn peek(&self, pa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read(pa, &mut b).expect("peek");
        b
    }

    /// Writes bytes at guest-physical `pa`.
    pub fn poke(&self, pa: u64, bytes: &[u8]) {
        self.mem.write(pa, bytes).expect("poke");
    }
}

/// The driver's bring-up in this layout: every ring at its testkit address with `2^log2`
/// entries, the context table, all interrupt causes, then every unit enabled. `write` performs
/// one register write.
pub fn program(mut write: impl FnMut(u32, u32), log2: u32) {
    write(CR0, 0);
    for (lo, hi, size, base) in [
        (CMDQ_BASE_LO, CMDQ_BASE_HI, CMDQ_LOG2SIZE, CMDQ),
        (EVTQ_BASE_LO, EVTQ_BASE_HI, EVTQ_LOG2SIZE, EVTQ),
        (DMAQ_BASE_LO, DMAQ_BASE_HI, DMAQ_LOG2SIZE, DMAQ),
    ] {
        write(lo, base as u32);
        write(hi, (base >> 32) as u32);
        write(size, log2);
    }
    write(CTX_BASE_LO, CTX_TABLE as u32);
    write(CTX_BASE_HI, (CTX_TABLE >> 32) as u32);
    write(IRQ_CTRL, IRQ_CMD_EN | IRQ_EVT_EN | IRQ_ERR_EN);
    write(CR0, CR0_MASK);
}

/// A job with the given opcode and operands (flags 0).
pub fn job(op: u8, asid: u32, src: u64, dst: u64, len: u64, aux: u64) -> DmaJob {
    DmaJob {
        op,
        flags: 0,
        reserved0: 0,
        asid,
        src,
        dst,
        len,
        aux,
        status: 0,
        id: 0,
        reserved1: 0,
    }
}
