//! A hostile-guest fuzz harness for the device model, shared by the cargo-fuzz target
//! (`zapguard-model/fuzz`) and a plain `#[test]` that feeds it pseudo-random inputs.
//!
//! [`run`] reads its input as a program for a malicious guest driving a fresh
//! [`ZapguardDevice`]`<`[`NoEvents`]`>` over a [`VecMem`] of [`MEM_SIZE`] bytes (all zero at
//! the start of every input; the memory is kept per thread and only the pages the previous
//! input wrote are cleared, which is most of the speed of the fuzzer). The first bytes choose
//! the model parameters (IOTLB size and policy, ASID count, largest DMA step) and a head start
//! (nothing, the enable sequence, or that plus a bound and mapped ASID 0). Each operation is one
//! of:
//!
//! - an MMIO write or read of any offset and width (registers, the MSI-X table and PBA, holes,
//!   offsets past BAR0), with arbitrary values;
//! - a write of arbitrary bytes or of a forged page-table word anywhere in guest memory (rings,
//!   context table, device and CPU page tables, data frames, or outside RAM);
//! - `process(mem, n)` with a small `n`, or processing until idle (bounded);
//! - structured driver steps that reach deep states quickly: the enable sequence of
//!   [`crate::testkit::Rig::new`] with the [`crate::testkit`] ring bases, binding a context with
//!   real device and CPU page tables, mapping/unmapping/write-protecting pages on either side,
//!   posting well-formed (or slightly broken) commands and DMA jobs, consuming events and
//!   answering stalls;
//! - hostile structure: a ring or the context table moved to the end of RAM or outside it, an
//!   entry on a live device or CPU page-table path overwritten (frame outside RAM, reserved
//!   bits, PS, a loop to the root, not present), and rarely a device reset;
//! - PCI bus mastering switched off and on (the glue's config-space report).
//!
//! The test knobs (the [`RESET_KNOBS`]: [`CMD_LAG`], [`FAIL_INJECT`], [`FAIL_ARG`],
//! [`WALK_LAG`], [`FAULT_LAG`], [`IOTLB_KEEP`], the table-lifetime check's
//! [`PT_FREED_BASE_LO`], [`PT_FREED_BASE_HI`], [`PT_FREED_PAGES`], and [`SYNC_LAG`]) are
//! registers like any other here (a structured step also points the freed-table bitmap into
//! RAM and marks device page-table pages in it, and one arms a failure mode with a SYNC lag of
//! a few milliseconds), but they cannot make an input slow or end the process: the device runs
//! on a [`VirtualClock`] whose sleeps (`WALK_LAG`, `FAULT_LAG`) cost nothing and whose time
//! only moves when the harness says (one millisecond per operation), so the `FAIL_SYNC_DELAY`
//! and `SYNC_LAG` deadlines are virtual too and `has_work()` stays a function of the device's
//! state. `FAIL_DIE` only sets a flag in the library (exiting is the vfio-user glue's
//! business, which the fuzzer never runs); the device then stays dead for the rest of the
//! input.
//!
//! After every operation it checks invariants and panics if one is broken (that is how a fuzzer
//! reports a finding): register values stay in their fields (ring positions within their
//! masks, error codes consistent with `ERROR`), `CR0ACK` ⊆ `CR0` (except the DMA and context
//! units a hung engine does not let go of), identity registers are
//! constant, interrupts stay within the three vectors and their enabled causes, statistics
//! never decrease (between resets), `has_work()` predicts exactly whether `process()` makes
//! progress (the server's worker sleeps on it), a running job implies an enabled DMA queue, the
//! IOTLB stays within capacity with well-formed entries and evicts nothing while
//! [`IOTLB_KEEP`] is on, the knobs read back within their bounds (the freed-table base
//! 8-byte aligned), and the SYNC ledger never fires (a [`shared_regs::event::VIOL_LEDGER`]
//! violation is a device bug whatever the guest does; every violation counted is the
//! validator's, a table-lifetime one or a released-context one). At the end it reads every
//! register, the MSI-X area and some holes.
//!
//! Work per input is bounded: at most [`MAX_OPS`] operations, at most 16 steps per
//! `process` (1024 for "until idle"), and the input stops once the device has executed
//! [`COMMAND_BUDGET`] commands.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shared_regs::cmd::{self, Command, CMD_SIZE};
use shared_regs::dma::{self, DmaJob, DMA_JOB_SIZE, DMA_STATUS_SIZE};
use shared_regs::event::{self as ev, EVT_SIZE};
use shared_regs::pci::{MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, MSIX_VECTORS, REGS_SIZE};
use shared_regs::pte::{self, ContextEntry};
use shared_regs::queue;
use shared_regs::regs::*;

use crate::device::{DeviceConfig, ZapguardDevice};
use crate::events::NoEvents;
use crate::guest::{GuestMem, MemError, VecMem};
use crate::inject::Clock;
use crate::iotlb::Policy;
use crate::pagetable::PageTableBuilder;
use crate::testkit::{
    AUX, AUX_SIZE, CMDQ, CPU_PT, CTX_TABLE, DEV_PT, DMAQ, EVTQ, STATUS, SYNC_WORD,
};
use crate::x86pt::{CpuFlags, X86PageTable, X86_D, X86_P, X86_RW};

/// Bytes of guest RAM (at guest-physical 0) the harness gives the device.
pub const MEM_SIZE: usize = 8 << 20;
/// Most operations executed per input.
pub const MAX_OPS: usize = 256;
/// An input stops once the device has executed this many commands (a hostile guest can make
/// every `process` call run a whole 32768-entry ring of NOPs).
pub const COMMAND_BUDGET: u64 = 100_000;

/// Room for one address space's device (or CPU) page tables.
const PT_SLOT: u64 = 0x1_0000;
/// Page-table slots, reused round-robin (so a rebind may scribble over live tables).
const PT_SLOTS: u64 = 16;
/// 4 KiB data frames: `[0x30_0000, 0x40_0000)` and `[0x70_0000, 0x80_0000)`.
const FRAMES_LO: u64 = 0x30_0000;
const FRAMES_HI: u64 = 0x70_0000;
/// A clean 2 MiB frame.
const HUGE_FRAME: u64 = 0x40_0000;
/// VAs the structured steps use: [`VA_PAGES`] small pages and 4 huge pages.
const VA_BASE: u64 = 0x7f00_0000_0000;
const VA_PAGES: u64 = 16;
const HUGE_VA: u64 = 0x7f00_4000_0000;
const PAGE: u64 = pte::PAGE_SIZE;
const HUGE: u64 = pte::HUGE_PAGE_SIZE;

const _: () = assert!(CPU_PT + PT_SLOTS * PT_SLOT <= FRAMES_HI);
const _: () = assert!(DEV_PT + PT_SLOTS * PT_SLOT <= FRAMES_LO);
const _: () = assert!(FRAMES_HI + 0x10_0000 <= MEM_SIZE as u64);

/// The units' registers.
const UNIT_REGISTERS: [u32; 28] = [
    IDENT,
    VERSION,
    CAPS,
    IOTLB_ENTRIES,
    ASID_COUNT,
    SCRATCH,
    ERROR,
    ERROR_INFO,
    CR0,
    CR0ACK,
    IRQ_CTRL,
    CTX_BASE_LO,
    CTX_BASE_HI,
    CMDQ_BASE_LO,
    CMDQ_BASE_HI,
    CMDQ_LOG2SIZE,
    CMDQ_PROD,
    CMDQ_CONS,
    EVTQ_BASE_LO,
    EVTQ_BASE_HI,
    EVTQ_LOG2SIZE,
    EVTQ_PROD,
    EVTQ_CONS,
    DMAQ_BASE_LO,
    DMAQ_BASE_HI,
    DMAQ_LOG2SIZE,
    DMAQ_PROD,
    DMAQ_CONS,
];

/// Every defined register (statistics apart): the units' and the test knobs.
const REGISTERS: [u32; UNIT_REGISTERS.len() + RESET_KNOBS.len()] = {
    let mut all = [0; UNIT_REGISTERS.len() + RESET_KNOBS.len()];
    let mut i = 0;
    while i < all.len() {
        all[i] = if i < UNIT_REGISTERS.len() {
            UNIT_REGISTERS[i]
        } else {
            RESET_KNOBS[i - UNIT_REGISTERS.len()]
        };
        i += 1;
    }
    all
};

/// Interrupt vectors the device has.
const IRQ_VECTORS_MASK: u32 = (1 << MSIX_VECTORS) - 1;
const IRQ_CTRL_MASK: u32 = IRQ_CMD_EN | IRQ_EVT_EN | IRQ_ERR_EN;
const CONS_CODE_BITS: u32 = CONS_ERR_CODE_MASK << CONS_ERR_SHIFT;

/// Runs `data` as a hostile guest program against a fresh device; panics if the device panics
/// or breaks an invariant. Never loops unboundedly (see the module documentation).
pub fn run(data: &[u8]) {
    thread_local! {
        static RAM: Ram = Ram::new();
    }
    RAM.with(|ram| {
        ram.clean();
        execute(data, ram);
    });
}

/// [`run`] over `ram` (all zeroes), returning the harness for tests to inspect.
fn execute<'m>(data: &[u8], ram: &'m Ram) -> Harness<'m> {
    let mut input = Input(data);
    let config = config_from(&mut input);
    let mut h = Harness::new(config, ram);
    let mut snap = h.check(&Snapshot::initial(), 0);
    h.prologue(input.byte() % 4);
    snap = h.check(&snap, IRQ_CTRL_MASK);
    for _ in 0..MAX_OPS {
        if input.is_empty() || h.dev.stat(STAT_COMMANDS) > COMMAND_BUDGET {
            break;
        }
        let irq_ctrl = h.reg(IRQ_CTRL);
        h.step(&mut input);
        snap = h.check(&snap, irq_ctrl);
    }
    // Let whatever was queued finish (bounded), then read every register.
    let irq_ctrl = h.reg(IRQ_CTRL);
    h.process_until_idle();
    snap = h.check(&snap, irq_ctrl);
    h.sweep_reads();
    let irq_ctrl_after = h.reg(IRQ_CTRL);
    h.check(&snap, irq_ctrl | irq_ctrl_after);
    h
}

/// Feeds `iterations` pseudo-random inputs (16 to 2048 bytes, from an xorshift generator
/// seeded with `seed`) to [`run`]; the same seed replays the same inputs.
pub fn run_random(iterations: usize, seed: u64) {
    let mut state = seed;
    let mut buf = Vec::with_capacity(2048);
    for _ in 0..iterations {
        let len = 16 + (splitmix64(&mut state) % 2033) as usize;
        buf.clear();
        let mut x = splitmix64(&mut state) | 1;
        while buf.len() < len {
            // xorshift64: cheap bytes; splitmix64 above decorrelates successive inputs.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.extend_from_slice(&x.to_le_bytes());
        }
        buf.truncate(len);
        run(&buf);
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ z >> 30).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ z >> 27).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ z >> 31
}

/// The model parameters, from the first two input bytes (host configuration, not guest
/// controlled, but every value must work).
fn config_from(input: &mut Input) -> DeviceConfig {
    let b = input.byte();
    let iotlb_entries = [64, 1, 2, 4, 16, 8][usize::from(b & 7) % 6];
    let iotlb_policy = match b >> 3 & 3 {
        0 | 1 => Policy::Lru,
        2 => Policy::Fifo,
        _ => Policy::Random { seed: u64::from(b) },
    };
    let asid_count = [256, 1, 4, 16][usize::from(b >> 5 & 3)];
    let dma_burst = [512, 8, 64, 4096, 100, 0, 1 << 20, 4095][usize::from(input.byte() & 7)];
    DeviceConfig {
        iotlb_entries,
        asid_count,
        iotlb_policy,
        dma_burst,
    }
}

/// A cursor over the input; reads past the end give zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    /// A u32 biased towards edge values.
    fn value32(&mut self) -> u32 {
        match self.byte() % 8 {
            0 => 0,
            1 => u32::MAX,
            2 => u32::from(self.byte()),
            3 => 1 << (self.byte() % 32),
            4 => u32::MAX - u32::from(self.byte()),
            _ => self.u32(),
        }
    }

    /// A u64 biased towards edge values.
    fn value64(&mut self) -> u64 {
        match self.byte() % 8 {
            0 => 0,
            1 => u64::MAX,
            2 => u64::from(self.byte()),
            3 => 1 << (self.byte() % 64),
            4 => u64::MAX - u64::from(self.u16()),
            _ => self.u64(),
        }
    }

    /// An ASID: mostly small, sometimes anything.
    fn asid(&mut self) -> u32 {
        match self.byte() {
            0..=191 => 0,
            b @ 192..=239 => u32::from(b % 4),
            240..=251 => u32::from(self.byte()),
            _ => self.value32(),
        }
    }

    /// A VA in the structured window (small pages, huge pages, their edges), or anything.
    fn va(&mut self) -> u64 {
        match self.byte() % 8 {
            0..=3 => VA_BASE + u64::from(self.u16()) % (VA_PAGES * PAGE / 16) * 16,
            4 => {
                let page = u64::from(self.byte()) % VA_PAGES;
                VA_BASE + page * PAGE + PAGE - u64::from(self.byte() % 16)
            }
            5 => HUGE_VA + u64::from(self.u32()) % (4 * HUGE),
            6 => pte::VA_LIMIT - u64::from(self.u16()),
            _ => self.value64(),
        }
    }
}

/// The harness's guest RAM: a [`VecMem`] of [`MEM_SIZE`] bytes at guest-physical 0 that
/// remembers which pages were written (by the device or the harness), so that the next input
/// starts from all-zero memory by clearing only those, instead of allocating and zeroing
/// megabytes per input. Every write goes through [`GuestMem::write`] or
/// [`GuestMem::fetch_or_u64`] (the other writers are default methods over `write`).
struct Ram {
    mem: VecMem,
    /// Bitmap of written 4 KiB pages.
    dirty: RefCell<Vec<u64>>,
}

impl Ram {
    fn new() -> Self {
        let pages = MEM_SIZE / PAGE as usize;
        Self {
            mem: VecMem::new(0, MEM_SIZE),
            dirty: RefCell::new(vec![0; pages.div_ceil(64)]),
        }
    }

    /// Records a successful write of `len` bytes at `gpa` (inside the memory).
    fn mark(&self, gpa: u64, len: usize) {
        if len == 0 {
            return;
        }
        let mut dirty = self.dirty.borrow_mut();
        for page in gpa / PAGE..=(gpa + len as u64 - 1) / PAGE {
            if let Some(w) = dirty.get_mut((page / 64) as usize) {
                *w |= 1 << (page % 64);
            }
        }
    }

    /// Zeroes every page written since the last call.
    fn clean(&self) {
        const ZERO: [u8; PAGE as usize] = [0; PAGE as usize];
        let mut dirty = self.dirty.borrow_mut();
        for (i, w) in dirty.iter_mut().enumerate() {
            while *w != 0 {
                let page = i as u64 * 64 + u64::from(w.trailing_zeros());
                let _ = self.mem.write(page * PAGE, &ZERO);
                *w &= *w - 1;
            }
        }
    }
}

impl GuestMem for Ram {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.mem.read(gpa, buf)
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        self.mem.write(gpa, buf)?;
        self.mark(gpa, buf.len());
        Ok(())
    }

    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
        let old = self.mem.fetch_or_u64(gpa, bits)?;
        self.mark(gpa, 8);
        Ok(old)
    }
}

/// Time that passes only when told to: sleeps advance it for free, the harness advances it
/// between operations. Shared with the device (a [`Clock`] must be `Send`).
#[derive(Clone, Debug)]
pub struct VirtualClock {
    base: Instant,
    ns: Arc<AtomicU64>,
}

impl VirtualClock {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            ns: Arc::new(AtomicU64::new(0)),
        }
    }

    fn advance(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.ns.load(Ordering::Relaxed))
    }

    fn sleep(&self, d: Duration) {
        self.advance(d);
    }
}

/// Which side(s) of a mapping the "driver" writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sides {
    /// Device and CPU, same frame: the correct populate.
    Both,
    /// Device only.
    Device,
    /// CPU only.
    Cpu,
    /// Both, the device on a neighbouring frame: a stale device mapping.
    Stale,
}

/// A device and a CPU page table for one ASID, built by the harness's "driver".
struct Space {
    dev: PageTableBuilder,
    cpu: X86PageTable,
}

/// What the invariant checks carry from one step to the next.
struct Snapshot {
    stats: [u64; STAT_COUNT as usize],
    /// Device resets so far (a reset zeroes the statistics).
    resets: u32,
    /// `IOTLB_KEEP` was on.
    iotlb_keep: bool,
}

impl Snapshot {
    fn initial() -> Self {
        Self {
            stats: [0; STAT_COUNT as usize],
            resets: 0,
            iotlb_keep: false,
        }
    }
}

struct Harness<'m> {
    mem: &'m Ram,
    dev: ZapguardDevice<NoEvents>,
    clock: VirtualClock,
    spaces: BTreeMap<u32, Space>,
    next_slot: u64,
    resets: u32,
    sync_seq: u32,
    job_seq: u64,
}

impl<'m> Harness<'m> {
    /// A fresh device over `mem`, which must be all zeroes ([`Ram::clean`]).
    fn new(config: DeviceConfig, mem: &'m Ram) -> Self {
        let clock = VirtualClock::new();
        let mut dev = ZapguardDevice::new(config, NoEvents);
        dev.set_clock(clock.clone());
        Self {
            mem,
            dev,
            clock,
            spaces: BTreeMap::new(),
            next_slot: 0,
            resets: 0,
            sync_seq: 0,
            job_seq: 0,
        }
    }

    fn reg(&mut self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(reg.into(), &mut b);
        u32::from_le_bytes(b)
    }

    fn set(&mut self, reg: u32, v: u32) {
        self.dev.write(reg.into(), &v.to_le_bytes());
    }

    /// One operation (a millisecond of virtual time).
    fn step(&mut self, input: &mut Input) {
        self.clock.advance(Duration::from_millis(1));
        match input.byte() % 37 {
            0..=2 => {
                // A defined register, an edge value.
                let reg = REGISTERS[usize::from(input.byte()) % REGISTERS.len()];
                let v = input.value32();
                self.set(reg, v);
            }
            3 => {
                // Any offset, any width.
                let offset = bar_offset(input);
                let len = [4, 4, 1, 2, 8, 0, 3, 16][usize::from(input.byte() & 7)];
                let data = input.bytes(len).to_vec();
                self.dev.write(offset, &data);
            }
            4 => {
                let offset = bar_offset(input);
                let len = [4, 4, 1, 2, 8, 0, 3, 4096][usize::from(input.byte() & 7)];
                let mut buf = vec![0xa5u8; len];
                self.dev.read(offset, &mut buf);
                // Only aligned 4-byte accesses reach a register; everything else reads 0.
                assert!(len == 4 || buf.iter().all(|&b| b == 0), "{offset:#x}/{len}");
            }
            5 | 6 => self.poke_bytes(input),
            7 | 8 => self.poke_word(input),
            9..=12 => {
                let n = 1 + usize::from(input.byte() % 16);
                self.process(n);
            }
            13 => self.process_until_idle(),
            14 => self.setup(input),
            15 => self.bind(input),
            16..=18 => self.map(input),
            19 => self.unmap_or_protect(input),
            20..=22 => self.post_command(input),
            23..=27 => self.submit_job(input),
            28 | 29 => self.consume_events(input),
            30 | 31 => self.corrupt_table(input),
            32 if input.byte() == 0 => {
                // A device reset (VFIO reset / FLR), rarely.
                self.dev.reset();
                self.resets += 1;
            }
            35 => {
                // The driver's pci_clear_master()/pci_set_master(), as the glue reports them;
                // mostly back on, or the rest of the input would do nothing.
                let on = !input.byte().is_multiple_of(4);
                self.dev.set_bus_master(on);
            }
            34 => self.freed_bitmap(input),
            36 => {
                // Arm a failure mode (raw register values rarely hit one): mostly those that
                // leave the device working in some way, rarely death or an unknown mode.
                let b = input.byte();
                let mode = [
                    FAIL_NONE,
                    FAIL_CMDQ_STOP,
                    FAIL_SYNC_DELAY,
                    FAIL_CMDQ_ERROR,
                    FAIL_DROP_CMD_MSI,
                    FAIL_DMA_HANG,
                    FAIL_CMDQ_ERROR,
                    FAIL_SYNC_DELAY,
                ][usize::from(b % 8)];
                let mode = match b >> 3 {
                    0 => FAIL_DIE,
                    1 => 0x100 | FAIL_CMDQ_STOP,
                    _ => mode,
                };
                self.set(FAIL_ARG, u32::from(input.byte() % 16));
                self.set(FAIL_INJECT, mode);
                // A SYNC lag of a few operations' time (raw values mostly clamp to 100 ms).
                self.set(SYNC_LAG, u32::from(input.byte() % 4) * 1500);
            }
            _ => {
                // CR0 toggles and error clears, the driver's recovery paths.
                let v = input.byte();
                if v & 0xc0 != 0 {
                    self.set(ERROR, u32::from(v) | ERR_MASK);
                } else {
                    self.set(CR0, u32::from(v) & 0x1f);
                }
            }
        }
    }

    /// `process(mem, n)`, checking that [`ZapguardDevice::has_work`] predicted its outcome: the
    /// server's worker sleeps when it says no (work it missed would hang the device until
    /// the next doorbell) and loops when it says yes (no progress would be a busy spin).
    fn process(&mut self, n: usize) -> bool {
        let predicted = self.dev.has_work();
        let progress = self.dev.process(self.mem, n);
        assert!(
            progress || !predicted,
            "has_work() said yes but process() made no progress"
        );
        assert!(
            predicted || !progress,
            "process() made progress although has_work() said no"
        );
        progress
    }

    fn process_until_idle(&mut self) {
        for _ in 0..64 {
            if !self.process(16) {
                break;
            }
        }
    }

    /// The table-lifetime check: a bitmap somewhere in (or just outside) RAM, covering some or
    /// all of it, and some device page-table pages marked freed (or cleared) in it; rarely the
    /// check turned off.
    fn freed_bitmap(&mut self, input: &mut Input) {
        let base = mem_addr(input) & !7;
        self.set(PT_FREED_BASE_HI, (base >> 32) as u32);
        self.set(PT_FREED_BASE_LO, base as u32);
        let pages = match input.byte() % 4 {
            0 => 0,
            1 => u32::from(input.u16()),
            _ => (MEM_SIZE as u64 / PAGE) as u32,
        };
        self.set(PT_FREED_PAGES, pages);
        // Mark (or unmark) a byte's worth of device page-table pages: eight neighbours.
        let table = DEV_PT + u64::from(input.u16()) % (PT_SLOTS * PT_SLOT / PAGE) * PAGE;
        let at = base + table / PAGE / 8;
        let _ = self.mem.write(at, &[input.byte()]);
    }

    /// Arbitrary bytes somewhere in (or just outside) guest memory.
    fn poke_bytes(&mut self, input: &mut Input) {
        let addr = mem_addr(input);
        let len = usize::from(input.byte() % 72);
        let data = input.bytes(len).to_vec();
        let _ = self.mem.write(addr, &data);
    }

    /// A forged u64 (page-table entry, context word, descriptor word) at an aligned address.
    fn poke_word(&mut self, input: &mut Input) {
        let addr = mem_addr(input) & !7;
        let target = match input.byte() % 8 {
            0 => FRAMES_LO + u64::from(input.byte()) * PAGE,
            1 => FRAMES_HI + u64::from(input.byte()) * PAGE,
            2 => HUGE_FRAME,
            3 => DEV_PT + u64::from(input.u16()) % (PT_SLOTS * PT_SLOT / PAGE) * PAGE,
            4 => CPU_PT + u64::from(input.u16()) % (PT_SLOTS * PT_SLOT / PAGE) * PAGE,
            5 => CTX_TABLE,
            _ => input.value64(),
        };
        let flags = match input.byte() % 4 {
            0 => pte::PTE_P | pte::PTE_W,
            1 => pte::PTE_P | pte::PTE_W | pte::PTE_PS,
            2 => u64::from(input.byte()),
            _ => input.value64() & !pte::PTE_ADDR_MASK,
        };
        let _ = self.mem.write_u64(addr, target | flags);
    }

    /// The enable sequence of `Rig::new`, with a chosen ring size.
    fn setup(&mut self, input: &mut Input) {
        let b = input.byte();
        let log2 = match b % 4 {
            0 => crate::testkit::RING_LOG2,
            1 => 1,
            2 => 2,
            _ => 1 + u32::from(b >> 2) % queue::MAX_LOG2,
        };
        self.setup_with(log2);
        if b & 0x80 != 0 {
            self.hostile_base(input);
        }
    }

    /// Re-enables with one ring (or the context table) at an address that is misaligned,
    /// straddles the end of RAM, or lies outside it.
    fn hostile_base(&mut self, input: &mut Input) {
        let which = input.byte();
        let ram_end = MEM_SIZE as u64;
        let base = match which >> 2 & 7 {
            0 => ram_end - 64,
            1 => ram_end - PAGE,
            2 => ram_end,
            3 => ram_end - 0x20,
            4 => CMDQ,
            _ => input.value64() & !63,
        };
        let (lo, hi, unit) = match which & 3 {
            0 => (CMDQ_BASE_LO, CMDQ_BASE_HI, CR0_CMDQ_EN),
            1 => (EVTQ_BASE_LO, EVTQ_BASE_HI, CR0_EVTQ_EN),
            2 => (DMAQ_BASE_LO, DMAQ_BASE_HI, CR0_DMAQ_EN),
            _ => (CTX_BASE_LO, CTX_BASE_HI, CR0_CTX_EN),
        };
        self.set(CR0, CR0_MASK & !unit);
        self.set(lo, base as u32);
        self.set(hi, (base >> 32) as u32);
        self.set(CR0, CR0_MASK);
    }

    fn setup_with(&mut self, log2: u32) {
        // Rings of up to 2^8 entries fit their testkit areas; larger ones run into the next
        // area, which a hostile driver may do too.
        crate::testkit::program(|reg, v| self.set(reg, v), log2);
    }

    /// Builds page tables for an ASID and writes its context entry, then CFGI_CTX + SYNC.
    fn bind(&mut self, input: &mut Input) {
        let asid = input.asid();
        let b = input.byte();
        let la57 = b & 1 != 0;
        let mut flags = pte::CTX_VALID;
        if b & 2 != 0 {
            flags |= pte::CTX_NO_VALIDATE;
        }
        if b & 4 != 0 {
            flags |= pte::CTX_STALL;
        }
        if b & 0x78 == 0x78 {
            flags |= pte::CTX_MM_RELEASED;
        }
        if la57 {
            flags |= pte::CTX_CPU_LA57;
        }
        if b & 0x80 != 0 && b & 0x18 == 0x18 {
            // A hostile entry: any flags.
            flags = input.value64();
        }
        self.bind_with(asid, flags, la57);
    }

    fn bind_with(&mut self, asid: u32, flags: u64, la57: bool) {
        let slot = self.next_slot % PT_SLOTS;
        self.next_slot += 1;
        let dev_base = DEV_PT + slot * PT_SLOT;
        let cpu_base = CPU_PT + slot * PT_SLOT;
        let (Ok(dev), Ok(cpu)) = (
            PageTableBuilder::new(self.mem, dev_base, dev_base + PT_SLOT),
            X86PageTable::new(self.mem, cpu_base, cpu_base + PT_SLOT, la57),
        ) else {
            return;
        };
        let entry = ContextEntry {
            flags,
            pt_root: dev.root(),
            cpu_root: cpu.root(),
            seq: 0,
        };
        let ctx_addr = CTX_TABLE.wrapping_add(u64::from(asid) * pte::CTX_ENTRY_SIZE as u64);
        let _ = self.mem.write(ctx_addr, &entry.to_bytes());
        self.spaces.insert(asid, Space { dev, cpu });
        self.post(&Command::new(cmd::CMD_CFGI_CTX, 0, asid, 0, 0));
        self.post_sync();
    }

    /// Maps a page for the device, the CPU, or both (consistently or not).
    fn map(&mut self, input: &mut Input) {
        let asid = input.asid();
        let b = input.byte();
        let huge = b & 1 != 0;
        let (va, pa) = if huge {
            let va = HUGE_VA + u64::from(input.byte() % 4) * HUGE;
            (va, if b & 0x40 != 0 { 0 } else { HUGE_FRAME })
        } else {
            let va = VA_BASE + u64::from(input.byte()) % VA_PAGES * PAGE;
            let area = if b & 0x40 != 0 { FRAMES_HI } else { FRAMES_LO };
            (va, area + u64::from(input.byte()) * PAGE)
        };
        let writable = b & 2 == 0;
        let cpu_flags = match b >> 2 & 3 {
            0 | 1 => CpuFlags::WRITABLE_DIRTY,
            2 => CpuFlags::WRITABLE_CLEAN,
            _ => CpuFlags::READ_ONLY,
        };
        let sides = match b >> 4 & 3 {
            0 => Sides::Both,
            1 => Sides::Device,
            2 => Sides::Cpu,
            _ => Sides::Stale,
        };
        self.map_with(asid, va, pa, huge, writable, cpu_flags, sides);
    }

    #[allow(clippy::too_many_arguments)]
    fn map_with(
        &mut self,
        asid: u32,
        va: u64,
        pa: u64,
        huge: bool,
        writable: bool,
        cpu_flags: CpuFlags,
        sides: Sides,
    ) {
        let Some(space) = self.spaces.get_mut(&asid) else {
            return;
        };
        let mem = self.mem;
        if sides != Sides::Cpu {
            let dev_pa = if sides == Sides::Stale { pa ^ PAGE } else { pa };
            let _ = if huge {
                space.dev.map_2m(mem, va, dev_pa & !(HUGE - 1), writable)
            } else {
                space.dev.map_4k(mem, va, dev_pa, writable)
            };
        }
        if sides != Sides::Device {
            let _ = if huge {
                space.cpu.map_2m(mem, va, pa, cpu_flags)
            } else {
                space.cpu.map_4k(mem, va, pa, cpu_flags)
            };
        }
    }

    /// A head start chosen by the input: nothing, the enable sequence, or that plus ASID 0
    /// bound (validating; stalling for `3`) with the structured window mapped on both sides
    /// (small pages, and one huge page).
    fn prologue(&mut self, kind: u8) {
        if kind == 0 {
            return;
        }
        self.setup_with(crate::testkit::RING_LOG2);
        if kind == 1 {
            return;
        }
        let stall = if kind == 3 { pte::CTX_STALL } else { 0 };
        self.bind_with(0, pte::CTX_VALID | stall, false);
        for i in 0..VA_PAGES {
            let (va, pa) = (VA_BASE + i * PAGE, FRAMES_LO + i * PAGE);
            self.map_with(
                0,
                va,
                pa,
                false,
                true,
                CpuFlags::WRITABLE_DIRTY,
                Sides::Both,
            );
        }
        let flags = CpuFlags::WRITABLE_DIRTY;
        self.map_with(0, HUGE_VA, HUGE_FRAME, true, true, flags, Sides::Both);
        self.process_until_idle();
    }

    /// Unmaps or changes permissions on either side, optionally with the invalidation a
    /// correct driver sends.
    fn unmap_or_protect(&mut self, input: &mut Input) {
        let asid = input.asid();
        let b = input.byte();
        let va = if b & 1 != 0 {
            HUGE_VA + u64::from(input.byte() % 4) * HUGE
        } else {
            VA_BASE + u64::from(input.byte()) % VA_PAGES * PAGE
        };
        let Some(space) = self.spaces.get_mut(&asid) else {
            return;
        };
        let mem = self.mem;
        match b >> 1 & 7 {
            0 => {
                space.dev.unmap(mem, va);
            }
            1 => {
                space.dev.set_writable(mem, va, false);
            }
            2 => {
                space.dev.set_writable(mem, va, true);
            }
            3 => {
                let _ = space.cpu.unmap(mem, va);
            }
            4 => {
                let _ = space.cpu.set_flags(mem, va, 0, X86_RW);
            }
            5 => {
                let _ = space.cpu.set_flags(mem, va, 0, X86_D);
            }
            6 => {
                let _ = space.cpu.set_flags(mem, va, 0, X86_P);
            }
            _ => {
                let _ = space.cpu.set_flags(mem, va, X86_RW | X86_D, 0);
            }
        }
        if b & 0x10 != 0 {
            let len = if b & 1 != 0 { HUGE } else { PAGE };
            self.post(&Command::new(cmd::CMD_INV_RANGE, 0, asid, va, len));
            if b & 0x20 != 0 {
                self.post_sync();
            }
        }
    }

    /// A command: mostly well-formed, sometimes with one field wrong, sometimes raw.
    fn post_command(&mut self, input: &mut Input) {
        let b = input.byte();
        let asid = input.asid();
        let c = match b % 12 {
            0 => Command::new(cmd::CMD_NOP, 0, 0, 0, 0),
            1 | 2 => {
                let va = input.va() & !(PAGE - 1);
                let len = match input.byte() % 4 {
                    0 => PAGE,
                    1 => HUGE,
                    2 => u64::from(input.u16()) * PAGE,
                    _ => input.value64(),
                };
                Command::new(cmd::CMD_INV_RANGE, 0, asid, va, len)
            }
            3 => Command::new(cmd::CMD_INV_ASID, 0, asid, 0, 0),
            4 => Command::new(cmd::CMD_INV_ALL, 0, 0, 0, 0),
            5 => Command::new(cmd::CMD_CFGI_CTX, 0, asid, 0, 0),
            6 | 7 => {
                self.post_sync();
                return;
            }
            8 => Command::new(cmd::CMD_RESUME, 0, asid, 0, u64::from(input.byte() % 8)),
            9 => Command::new(cmd::CMD_ABORT, 0, asid, 0, u64::from(input.byte() % 8)),
            10 => {
                // A SYNC whose completion address is anywhere.
                let addr = input.value64();
                Command::new(cmd::CMD_SYNC, input.byte(), 0, addr, input.value64())
            }
            _ => {
                let raw: [u8; CMD_SIZE] = std::array::from_fn(|_| input.byte());
                Command::from_bytes(&raw)
            }
        };
        self.post(&c);
    }

    /// Overwrites one entry on the path of a mapped VA, in the device or the CPU page table,
    /// with a hostile value: a frame or table outside RAM, reserved bits, PS where it is
    /// illegal or turns a table into a leaf, a loop back to the root, not present, or anything.
    fn corrupt_table(&mut self, input: &mut Input) {
        let asid = input.asid();
        let b = input.byte();
        let va = if b & 1 != 0 {
            HUGE_VA + u64::from(input.byte() % 4) * HUGE
        } else {
            VA_BASE + u64::from(input.byte()) % VA_PAGES * PAGE
        };
        let cpu = b & 2 != 0;
        let level = 1 + u32::from(b >> 2 & 3);
        let Some(space) = self.spaces.get(&asid) else {
            return;
        };
        let (gpa, root) = if cpu {
            (
                space.cpu.entry_gpa(self.mem, va, level).ok(),
                space.cpu.root(),
            )
        } else {
            let root = space.dev.root();
            (dev_entry_gpa(self.mem, root, va, level), root)
        };
        let Some(gpa) = gpa else {
            return;
        };
        let Ok(old) = self.mem.read_u64(gpa) else {
            return;
        };
        let present = pte::PTE_P | pte::PTE_W;
        let new = match b >> 4 {
            0..=2 => 0x000f_ffff_ffff_f000 | present,
            3 => (MEM_SIZE as u64 - PAGE) | present,
            4 | 5 => old | 1 << (52 + u32::from(input.byte() % 12)),
            6 | 7 => old | pte::PTE_PS,
            8 => (old & !pte::PTE_PS & !(HUGE - 1)) | pte::PTE_PS | present,
            9 | 10 => root | present,
            11 | 12 => old & !pte::PTE_P,
            13 => old & !pte::PTE_W,
            _ => input.value64(),
        };
        let _ = self.mem.write_u64(gpa, new);
        if b & 0x80 != 0 && !cpu {
            self.post(&Command::new(cmd::CMD_INV_ASID, 0, asid, 0, 0));
        }
    }

    /// Queues a command at the producer index and rings the doorbell, as the driver does (if
    /// the ring size is not one a driver could have programmed, there is nothing to post to).
    fn post(&mut self, c: &Command) {
        let log2 = self.reg(CMDQ_LOG2SIZE);
        if !queue::valid_log2(log2) {
            return;
        }
        let base = u64::from(self.reg(CMDQ_BASE_HI)) << 32 | u64::from(self.reg(CMDQ_BASE_LO));
        let prod = self.reg(CMDQ_PROD);
        let slot = base.wrapping_add(u64::from(queue::index(prod, log2)) * CMD_SIZE as u64);
        let _ = self.mem.write(slot, &c.to_bytes());
        self.set(CMDQ_PROD, queue::next(prod, log2));
    }

    fn post_sync(&mut self) {
        self.sync_seq = self.sync_seq.wrapping_add(1);
        let c = Command::new(
            cmd::CMD_SYNC,
            cmd::CMD_F_SYNC_IRQ,
            0,
            SYNC_WORD,
            u64::from(self.sync_seq),
        );
        self.post(&c);
    }

    /// A DMA job: mostly well-formed on the structured VAs, sometimes raw.
    fn submit_job(&mut self, input: &mut Input) {
        let b = input.byte();
        let log2 = self.reg(DMAQ_LOG2SIZE);
        if !queue::valid_log2(log2) {
            return;
        }
        let prod = self.reg(DMAQ_PROD);
        let idx = u64::from(queue::index(prod, log2));
        let mut j = if b & 0xe0 == 0xe0 {
            let raw: [u8; DMA_JOB_SIZE] = std::array::from_fn(|_| input.byte());
            DmaJob::from_bytes(&raw)
        } else {
            let op = match b % 8 {
                0 | 7 => dma::DMA_COPY,
                n => n,
            };
            let len = match input.byte() % 32 {
                0..=5 => u64::from(input.byte()) + 1,
                6..=9 => PAGE,
                10..=13 => 3 * PAGE + 5,
                14 => dma::DMA_MAX_LEN,
                15 => input.value64(),
                _ => u64::from(input.u16() % 0x3000) + 1,
            };
            let aux = match op {
                dma::DMA_WRITE | dma::DMA_READ => match input.byte() % 4 {
                    0 => input.value64(),
                    _ => AUX + u64::from(input.u32()) % AUX_SIZE,
                },
                _ => input.u64(),
            };
            DmaJob {
                op,
                flags: if b & 0x10 != 0 {
                    input.byte()
                } else {
                    b >> 3 & 3
                },
                reserved0: 0,
                asid: input.asid(),
                src: input.va(),
                dst: input.va(),
                len,
                aux,
                status: STATUS + idx * DMA_STATUS_SIZE as u64,
                id: 0,
                reserved1: 0,
            }
        };
        if b & 0xe0 != 0xe0 {
            self.job_seq += 1;
            j.id = self.job_seq;
            let _ = self.mem.write(j.status, &[0u8; DMA_STATUS_SIZE]);
        }
        let base = u64::from(self.reg(DMAQ_BASE_HI)) << 32 | u64::from(self.reg(DMAQ_BASE_LO));
        let slot = base.wrapping_add(idx * DMA_JOB_SIZE as u64);
        let _ = self.mem.write(slot, &j.to_bytes());
        self.set(DMAQ_PROD, queue::next(prod, log2));
    }

    /// The driver's event handler: reads up to 64 events, answers stalls (RESUME or ABORT,
    /// with the tag the event carries), and advances the consumer.
    fn consume_events(&mut self, input: &mut Input) {
        let how = input.byte();
        let log2 = self.reg(EVTQ_LOG2SIZE);
        if !queue::valid_log2(log2) {
            return;
        }
        let base = u64::from(self.reg(EVTQ_BASE_HI)) << 32 | u64::from(self.reg(EVTQ_BASE_LO));
        let prod = self.reg(EVTQ_PROD);
        let mut cons = self.reg(EVTQ_CONS);
        for _ in 0..64 {
            if queue::is_empty(prod, cons, log2) {
                break;
            }
            let mut raw = [0u8; EVT_SIZE];
            let addr = base.wrapping_add(u64::from(queue::index(cons, log2)) * EVT_SIZE as u64);
            if self.mem.read(addr, &mut raw).is_ok() {
                let e = ev::Event::from_bytes(&raw);
                if e.ty == ev::EVT_FAULT && e.flags & ev::EVT_F_STALLED != 0 && how & 1 == 0 {
                    let op = if how & 2 == 0 {
                        cmd::CMD_RESUME
                    } else {
                        cmd::CMD_ABORT
                    };
                    self.post(&Command::new(op, 0, e.asid, 0, e.info));
                }
            }
            cons = queue::next(cons, log2);
        }
        self.set(EVTQ_CONS, cons);
        if how & 4 != 0 {
            self.set(ERROR, ERR_MASK);
        }
    }

    /// Reads every register (statistics included), the MSI-X table and PBA, and a sample of
    /// undefined offsets. (Undefined offsets are cheap to reach from op 4; reading all 1024
    /// of them per input would cost more than most inputs.)
    fn sweep_reads(&mut self) {
        let stats = (STATS_BASE..STATS_BASE + 8 * STAT_COUNT).step_by(4);
        let registers = REGISTERS.iter().copied().chain(stats).map(u64::from);
        let msix = (u64::from(MSIX_TABLE_OFFSET)..u64::from(MSIX_TABLE_OFFSET) + 48)
            .chain(u64::from(MSIX_PBA_OFFSET)..u64::from(MSIX_PBA_OFFSET) + 8)
            .step_by(4);
        let holes = [
            0x038,
            u64::from(SYNC_LAG + 4),
            0x0fc,
            u64::from(STATS_BASE + 8 * STAT_COUNT),
            REGS_SIZE - 4,
        ];
        for offset in registers.chain(msix).chain(holes) {
            let mut b = [0u8; 4];
            self.dev.read(offset, &mut b);
        }
    }

    /// Checks every invariant; `irq_ctrl_before` is `IRQ_CTRL` before the step (an interrupt
    /// may only be raised for a cause enabled before or after it).
    fn check(&mut self, before: &Snapshot, irq_ctrl_before: u32) -> Snapshot {
        let config = self.dev.config();
        let irqs = self.dev.take_irqs();
        let r: BTreeMap<u32, u32> = REGISTERS.iter().map(|&o| (o, self.reg(o))).collect();
        let irq_ctrl = r[&IRQ_CTRL];
        assert_eq!(irqs & !IRQ_VECTORS_MASK, 0, "interrupt mask {irqs:#x}");
        assert_eq!(
            irqs & !(irq_ctrl | irq_ctrl_before),
            0,
            "interrupt {irqs:#x} for a cause not enabled ({irq_ctrl_before:#x} -> {irq_ctrl:#x})"
        );

        assert_eq!(r[&IDENT], IDENT_MAGIC);
        assert_eq!(r[&VERSION], VERSION_VALUE);
        assert_eq!(r[&CAPS], CAPS_VALUE);
        assert_eq!(r[&IOTLB_ENTRIES], config.iotlb_entries);
        assert_eq!(r[&ASID_COUNT], config.asid_count);
        let error = r[&ERROR];
        assert_eq!(error & !ERR_MASK, 0, "ERROR {error:#x}");
        assert_eq!(irq_ctrl & !IRQ_CTRL_MASK, 0, "IRQ_CTRL {irq_ctrl:#x}");
        let (cr0, ack) = (r[&CR0], r[&CR0ACK]);
        assert_eq!(cr0 & !CR0_MASK, 0, "CR0 {cr0:#x}");
        // A hung DMA engine (FAIL_DMA_HANG) does not acknowledge disabling DMA or contexts.
        let hung = self.dev.s.inject.hung;
        let unacked = if hung { CR0_DMAQ_EN | CR0_CTX_EN } else { 0 };
        assert_eq!(
            ack & !cr0 & !unacked,
            0,
            "CR0ACK {ack:#x} not within CR0 {cr0:#x}"
        );
        let mode = r[&FAIL_INJECT];
        assert!(mode <= FAIL_DIE, "FAIL_INJECT {mode:#x}");
        let walk_lag = r[&WALK_LAG] & !WALK_LAG_IN_STEP;
        assert!(walk_lag <= WALK_LAG_MAX, "WALK_LAG {:#x}", r[&WALK_LAG]);
        assert!(
            r[&FAULT_LAG] <= FAULT_LAG_MAX,
            "FAULT_LAG {:#x}",
            r[&FAULT_LAG]
        );
        assert!(r[&SYNC_LAG] <= SYNC_LAG_MAX, "SYNC_LAG {:#x}", r[&SYNC_LAG]);
        let freed_base = r[&PT_FREED_BASE_LO];
        assert_eq!(freed_base & 7, 0, "PT_FREED_BASE_LO {freed_base:#x}");
        let keep = r[&IOTLB_KEEP];
        assert_eq!(keep & !IOTLB_KEEP_MASK, 0, "IOTLB_KEEP {keep:#x}");
        let iotlb_keep = keep & IOTLB_KEEP_EN != 0;
        assert_eq!(
            iotlb_keep,
            self.dev.s.iotlb.keep(),
            "IOTLB_KEEP vs the IOTLB"
        );

        // Ring positions: index + wrap bit of the size the unit was enabled with (frozen while
        // enabled), plus each register's flag bits.
        let rings = [
            (
                CR0_CMDQ_EN,
                CMDQ_LOG2SIZE,
                CMDQ_PROD,
                0,
                CMDQ_CONS,
                CONS_ERR | CONS_CODE_BITS,
            ),
            (
                CR0_EVTQ_EN,
                EVTQ_LOG2SIZE,
                EVTQ_PROD,
                EVTQ_PROD_OVERFLOW,
                EVTQ_CONS,
                0,
            ),
            (
                CR0_DMAQ_EN,
                DMAQ_LOG2SIZE,
                DMAQ_PROD,
                0,
                DMAQ_CONS,
                CONS_ERR,
            ),
        ];
        for (unit, size, prod, prod_flags, cons, cons_flags) in rings {
            if ack & unit == 0 {
                continue;
            }
            let log2 = r[&size];
            assert!(queue::valid_log2(log2), "enabled ring of log2 {log2}");
            let mask = (2u32 << log2) - 1;
            let (p, c) = (r[&prod], r[&cons]);
            assert_eq!(p & !prod_flags & !mask, 0, "producer {prod:#x} = {p:#x}");
            assert_eq!(c & !cons_flags & !mask, 0, "consumer {cons:#x} = {c:#x}");
        }
        let cmdq_cons = r[&CMDQ_CONS];
        if cmdq_cons & CONS_ERR != 0 {
            let code = (cmdq_cons & CONS_CODE_BITS) >> CONS_ERR_SHIFT;
            assert!(
                (cmd::CERR_ILLEGAL..=cmd::CERR_INJECTED).contains(&(code as u8)),
                "CMDQ_CONS {cmdq_cons:#x}: unknown error code"
            );
            assert_ne!(error & ERR_CMDQ, 0, "CMDQ_CONS error without ERR_CMDQ");
            assert_ne!(ack & CR0_CMDQ_EN, 0, "CMDQ_CONS error on a disabled queue");
        } else {
            assert_eq!(cmdq_cons & CONS_CODE_BITS, 0, "CMDQ_CONS {cmdq_cons:#x}");
        }
        if r[&DMAQ_CONS] & CONS_ERR != 0 {
            assert_ne!(
                error & ERR_DMAQ_ABORT,
                0,
                "DMAQ_CONS error without ERR_DMAQ_ABORT"
            );
            assert_ne!(ack & CR0_DMAQ_EN, 0, "DMAQ_CONS error on a disabled queue");
        }
        if r[&EVTQ_PROD] & EVTQ_PROD_OVERFLOW != 0 {
            assert_ne!(
                error & ERR_EVTQ_OVERFLOW,
                0,
                "overflow flag without ERR_EVTQ_OVERFLOW"
            );
        }

        // Statistics: counters only go up, and the registers show them.
        let mut stats = [0u64; STAT_COUNT as usize];
        for (i, s) in stats.iter_mut().enumerate() {
            let idx = i as u32;
            *s = self.dev.stat(idx);
            if before.resets == self.resets {
                assert!(*s >= before.stats[i], "statistic {i} went back");
            }
            let reg = u64::from(self.reg(stat_hi(idx))) << 32 | u64::from(self.reg(stat_lo(idx)));
            assert_eq!(reg, *s, "statistic {i} register");
        }
        // A step changes IOTLB_KEEP at most once (one register write, or a reset, which the
        // reset count shows): on before and after, it was on throughout.
        if before.iotlb_keep && iotlb_keep && before.resets == self.resets {
            let i = STAT_IOTLB_EVICTIONS as usize;
            assert_eq!(stats[i], before.stats[i], "IOTLB evicted under IOTLB_KEEP");
        }

        // Internal state a guest must not be able to corrupt.
        let iotlb = &self.dev.s.iotlb;
        assert!(iotlb.len() <= iotlb.capacity(), "IOTLB over capacity");
        for e in iotlb.iter() {
            assert!(
                (e.size == PAGE || e.size == HUGE)
                    && e.va_base.is_multiple_of(e.size)
                    && e.va_base < pte::VA_LIMIT
                    && e.asid < config.asid_count
                    && e.pa_base & !pte::PTE_ADDR_MASK == 0,
                "malformed IOTLB entry {e:?}"
            );
        }
        assert!(
            self.dev.s.job.is_none() || ack & CR0_DMAQ_EN != 0,
            "a job runs on a disabled DMA queue"
        );
        let validator = self.dev.s.validator.counts().violations()
            + self.dev.s.inject.tables_freed
            + self.dev.s.ctx_released;
        assert_eq!(
            stats[STAT_VIOLATIONS as usize], validator,
            "SYNC ledger violation: a translation was used after the SYNC covering its \
             invalidation completed"
        );
        Snapshot {
            stats,
            resets: self.resets,
            iotlb_keep,
        }
    }
}

/// The address of the device page-table entry at `level` on `va`'s path, if the entries above
/// it are present tables (the harness's own walk, so it can aim corruption at a live path).
fn dev_entry_gpa(mem: &Ram, root: u64, va: u64, level: u32) -> Option<u64> {
    let mut table = root & pte::PTE_ADDR_MASK;
    for l in (level + 1..=pte::PT_LEVELS).rev() {
        let e = mem.read_u64(table + 8 * pte::pt_index(va, l) as u64).ok()?;
        if e & pte::PTE_P == 0 || e & pte::PTE_PS != 0 {
            return None;
        }
        table = e & pte::PTE_ADDR_MASK;
    }
    Some(table + 8 * pte::pt_index(va, level) as u64)
}

/// A BAR0 offset: a register, a statistic, the MSI-X area, or anything.
fn bar_offset(input: &mut Input) -> u64 {
    match input.byte() % 8 {
        0..=3 => u64::from(REGISTERS[usize::from(input.byte()) % REGISTERS.len()]),
        4 => u64::from(STATS_BASE) + u64::from(input.byte()),
        5 => u64::from(MSIX_TABLE_OFFSET) + u64::from(input.byte() % 64),
        6 => u64::from(MSIX_PBA_OFFSET) + u64::from(input.byte() % 16),
        _ => input.value64() >> (input.byte() % 64),
    }
}

/// A guest-physical address in one of the interesting areas, or anywhere.
fn mem_addr(input: &mut Input) -> u64 {
    let (base, size) = match input.byte() % 12 {
        0 => (CTX_TABLE, 0x2000),
        1 => (CMDQ, 0x8000),
        2 => (EVTQ, 0x8000),
        3 => (DMAQ, 0x1_0000),
        4 => (STATUS, 0x1_0000),
        5 => (SYNC_WORD, 8),
        6 => (AUX, AUX_SIZE),
        7 => (DEV_PT, PT_SLOTS * PT_SLOT),
        8 => (CPU_PT, PT_SLOTS * PT_SLOT),
        9 => (FRAMES_LO, 0x10_0000),
        10 => (HUGE_FRAME, HUGE),
        _ => return input.value64() % (MEM_SIZE as u64 + 0x100),
    };
    base + u64::from(input.u32()) % size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_tiny_inputs() {
        run(&[]);
        run(&[0]);
        run(&[0xff; 3]);
    }

    /// Findings, kept as regressions.
    #[test]
    fn findings() {
        // CMDQ_LOG2SIZE = 0xffff_ffff on the disabled queue, then a CMDQ_PROD write:
        // `queue::position` shifted by the size register (overflow panic; total since b9fa6e2).
        run(&[0, 0, 0, 0, 15, 1, 0, 16, 0]);
    }

    #[test]
    fn structured_program_reaches_dma() {
        // Setup; bind ASID 0 with validation; map page 0 on both sides; COPY 17 bytes within
        // it (src = dst); run until idle.
        let program = [
            0, 0, // config: 64 entries LRU, 256 ASIDs; steps of at most 512 bytes
            0, // no prologue
            14, 0, // setup with the testkit ring size
            15, 0, 0, // bind ASID 0: validate, no stall, 4-level
            16, 0, 0, 0, 0, // map VA_BASE -> FRAMES_LO, both sides, writable dirty
            23, 0, 0, 16, // COPY, length 16 + 1
            0, 0, 0, 0, 0, 0, 0, 0, // aux
            0, 0, 0, 0, 0, 0, 0, // ASID 0, src = dst = VA_BASE
        ];
        let ram = Ram::new();
        let mut h = execute(&program, &ram);
        assert_eq!(h.reg(CR0ACK), CR0_MASK);
        assert_eq!(h.dev.stat(STAT_DMA_JOBS), 1);
        assert_eq!(h.dev.stat(STAT_DMA_BYTES), 17);
        assert_eq!(h.dev.stat(STAT_VIOLATIONS), 0);
        assert_eq!(h.dev.stat(STAT_SYNCS), 1);
    }

    #[test]
    fn prologue_maps_the_window() {
        // Prologue 2, then a COPY of 3 pages + 5 bytes from VA_BASE to VA_BASE + 0x4000.
        let program = [
            0, 0, 2, // default config, prologue with ASID 0 bound and mapped
            23, 0, 10, // COPY, length 3 pages + 5
            0, 0, 0, 0, 0, 0, 0, 0, // aux
            0, 0, 0, 0, // ASID 0, src = VA_BASE
            0, 0, 4, // dst = VA_BASE + 0x400 * 16
        ];
        let ram = Ram::new();
        let h = execute(&program, &ram);
        assert_eq!(h.dev.stat(STAT_DMA_JOBS), 1);
        assert_eq!(h.dev.stat(STAT_DMA_BYTES), 3 * PAGE + 5);
        assert_eq!(h.dev.stat(STAT_FAULTS), 0);
        assert_eq!(h.dev.stat(STAT_VIOLATIONS), 0);
    }

    #[test]
    fn freed_bitmap_step_reaches_the_table_lifetime_check() {
        // Prologue 2, then the bitmap at AUX over all RAM with the first 8 pages of the device
        // tables (ASID 0's slot) marked freed, then the COPY of `prologue_maps_the_window`.
        let program = [
            0, 0, 2, // default config, prologue with ASID 0 bound and mapped
            34, 6, 0, 0, 0, 0, // bitmap at AUX + 0
            2, // covering all RAM
            0, 0, 0xff, // DEV_PT's first 8 pages freed
            23, 0, 10, // COPY, length 3 pages + 5
            0, 0, 0, 0, 0, 0, 0, 0, // aux
            0, 0, 0, 0, // ASID 0, src = VA_BASE
            0, 0, 4, // dst = VA_BASE + 0x400 * 16
        ];
        let ram = Ram::new();
        let h = execute(&program, &ram);
        assert_eq!(h.dev.s.inject.pt_freed_base_lo, AUX as u32);
        assert_eq!(h.dev.stat(STAT_DMA_JOBS), 1);
        assert_eq!(h.dev.stat(STAT_DMA_BYTES), 3 * PAGE + 5, "the walks go on");
        assert_eq!(h.dev.stat(STAT_FAULTS), 0);
        // 8 walks (4 source pages, 4 destination pages) of 4 freed tables each.
        assert_eq!(h.dev.s.inject.tables_freed, 32);
        assert_eq!(h.dev.stat(STAT_VIOLATIONS), 32);
    }

    #[test]
    fn clean_restores_zeroed_memory() {
        let ram = Ram::new();
        let mut state = 7;
        let noise = (0..4000).map(|_| splitmix64(&mut state) as u8);
        let program: Vec<u8> = [0, 0, 3].into_iter().chain(noise).collect();
        drop(execute(&program, &ram));
        assert!(ram.dirty.borrow().iter().any(|&w| w != 0));
        ram.clean();
        let mut all = vec![0xffu8; MEM_SIZE];
        ram.read(0, &mut all).unwrap();
        assert!(
            all.iter().all(|&b| b == 0),
            "a write escaped the dirty tracking"
        );
        assert!(ram.dirty.borrow().iter().all(|&w| w == 0));
    }

    /// The CI stand-in for the fuzzer: a few seconds of pseudo-random programs.
    #[test]
    fn random_programs() {
        run_random(3000, 0x5eed_2a9c_0ffe_e001);
    }
}
