//! The zapguard device state machine: the BAR0 register file of [`shared_regs::regs`] and the
//! engine behind it.
//!
//! The device does no I/O of its own and owns no threads. The glue feeds it:
//! - BAR accesses ([`ZapguardDevice::read`], [`ZapguardDevice::write`]), which only touch
//!   registers and never guest memory, so they are cheap on the vfio-user message loop;
//! - processing time ([`ZapguardDevice::process`]), given the guest memory, on the device's
//!   worker: command queue, DMA jobs, faults and the validator (in [`crate::cmdq`] and
//!   [`crate::dma_engine`]).
//!
//! It reports everything observable to the injected [`Events`] sink, and the MSI-X vectors to
//! raise through [`ZapguardDevice::take_irqs`]. Time (the failure-injection and SYNC-lag
//! deadlines and the page-walk and fault lags of [`crate::inject`]) comes from an injected
//! [`Clock`].
//!
//! PCI bus mastering lives in config space, which the glue owns: it reports the command
//! register's bit with [`ZapguardDevice::set_bus_master`]. While it is clear the device touches
//! no guest memory and raises no interrupt. A new device starts with bus mastering *on*, so the
//! library can be driven without a config space (tests, fuzzing, benchmarks); the vfio-user glue
//! sets the real bit before the guest can do anything.

use std::collections::HashMap;

use shared_regs::pci::{BAR0, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, MSIX_VECTORS, REGS_SIZE};
use shared_regs::pte::ContextEntry;
use shared_regs::queue;
use shared_regs::regs::*;

use crate::cmdq::PendingSync;
use crate::dma_engine::ActiveJob;
use crate::events::{le_value, Activity, Event, Events};
use crate::inject::{Clock, Inject, SystemClock};
use crate::iotlb::{Iotlb, Policy};
use crate::ledger::Ledger;
use crate::phys::PhysRegions;
use crate::validator::Validator;

/// Model parameters, fixed for the life of the device; the first two are visible in read-only
/// registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Number of IOTLB entries ([`IOTLB_ENTRIES`]).
    pub iotlb_entries: u32,
    /// Number of address-space IDs ([`ASID_COUNT`]).
    pub asid_count: u32,
    /// IOTLB replacement policy.
    pub iotlb_policy: Policy,
    /// Largest DMA step in bytes (clamped to 8..=1 MiB). A step also ends where either side's
    /// translation or CPU leaf ends (a page, for 4 KiB entries), and, for the opcodes that
    /// stage data (FILL, CHECKSUM, COMPARE), at every page boundary. The default, 64 KiB, gives
    /// page steps on 4 KiB entries and moves 2 MiB entries 16 pages at a time. Commands run
    /// between steps: a value below a page lets an invalidation land inside a page a job is
    /// working on (tests that watch that interleaving set it).
    pub dma_burst: u32,
}

/// [`DeviceConfig::dma_burst`]'s default: sixteen pages (64 KiB).
pub const DEFAULT_DMA_BURST: u32 = 16 * shared_regs::pte::PAGE_SIZE as u32;

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            iotlb_entries: 64,
            asid_count: 256,
            iotlb_policy: Policy::Lru,
            dma_burst: DEFAULT_DMA_BURST,
        }
    }
}

/// The name of the BAR0 register at `offset`, if one starts there.
pub fn register_name(offset: u64) -> Option<&'static str> {
    u32::try_from(offset).ok().and_then(shared_regs::regs::name)
}

/// Bytes of the MSI-X table and PBA in BAR0, as QEMU sizes the regions it overlays there.
const MSIX_TABLE_SIZE: u64 = 16 * MSIX_VECTORS as u64;
const MSIX_PBA_SIZE: u64 = (MSIX_VECTORS as u64).div_ceil(64) * 8;

/// What a BAR0 access hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// An aligned 32-bit access to this register.
    Register(u32),
    /// Inside the MSI-X table or PBA, which QEMU normally intercepts.
    Msix,
    /// Anything else: wrong width, misaligned, undefined or out of range.
    Bad,
}

fn classify(offset: u64, len: usize) -> Target {
    let Some(end) = offset.checked_add(len as u64) else {
        return Target::Bad;
    };
    let inside = |start: u32, size: u64| {
        len > 0 && offset >= u64::from(start) && end <= u64::from(start) + size
    };
    if len == 4 && offset.is_multiple_of(4) && end <= REGS_SIZE && register_name(offset).is_some() {
        return Target::Register(offset as u32);
    }
    if inside(MSIX_TABLE_OFFSET, MSIX_TABLE_SIZE) || inside(MSIX_PBA_OFFSET, MSIX_PBA_SIZE) {
        return Target::Msix;
    }
    Target::Bad
}

/// One ring: its registers and the base latched when it was enabled.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Ring {
    pub(crate) base_lo: u32,
    pub(crate) base_hi: u32,
    pub(crate) log2: u32,
    /// Latched at enable.
    pub(crate) base: u64,
    pub(crate) prod: u32,
    pub(crate) cons: u32,
}

impl Ring {
    fn programmed_base(&self) -> u64 {
        u64::from(self.base_hi) << 32 | u64::from(self.base_lo)
    }

    fn config_ok(&self) -> bool {
        queue::valid_log2(self.log2) && self.programmed_base().is_multiple_of(QUEUE_BASE_ALIGN)
    }

    fn enable(&mut self) {
        self.base = self.programmed_base();
        self.prod = 0;
        self.cons = 0;
    }

    /// Guest-physical address of slot `pos` (index + wrap) for entries of `size` bytes.
    pub(crate) fn slot(&self, pos: u32, size: usize) -> Option<u64> {
        let off = u64::from(queue::index(pos, self.log2)) * size as u64;
        self.base.checked_add(off)
    }

    pub(crate) fn is_empty(&self) -> bool {
        queue::is_empty(self.prod, self.cons, self.log2)
    }
}

/// Everything a reset returns to its initial value.
pub(crate) struct State {
    pub(crate) scratch: u32,
    pub(crate) error: u32,
    pub(crate) error_info: u32,
    pub(crate) cr0: u32,
    pub(crate) cr0ack: u32,
    pub(crate) irq_ctrl: u32,
    pub(crate) ctx_base_lo: u32,
    pub(crate) ctx_base_hi: u32,
    pub(crate) ctx_base: u64,
    pub(crate) cmdq: Ring,
    pub(crate) evtq: Ring,
    pub(crate) dmaq: Ring,
    /// `CMDQ_CONS` error code (`CERR_*`), 0 while the queue runs.
    pub(crate) cmdq_err: u8,
    pub(crate) evtq_overflow: bool,
    /// Set on a DMA job fetch abort; cleared with `ERR_DMAQ_ABORT`.
    pub(crate) dmaq_stopped: bool,
    pub(crate) iotlb: Iotlb,
    /// Context cache, filled on first use, dropped by CFGI_CTX or CR0_CTX_EN changes.
    pub(crate) ctx_cache: HashMap<u32, ContextEntry>,
    pub(crate) job: Option<ActiveJob>,
    pub(crate) ledger: Ledger,
    pub(crate) validator: Validator,
    pub(crate) stats: [u64; STAT_COUNT as usize],
    pub(crate) next_translation_id: u64,
    pub(crate) next_stall_tag: u64,
    /// DMA steps executed while the SYNC at the head of the command queue waited.
    pub(crate) sync_waited: u64,
    pub(crate) irq_pending: u32,
    /// [`CMD_LAG`]: steps a running job may do after a doorbell before commands execute.
    pub(crate) cmd_lag: u32,
    /// Steps left before the commands published by the last doorbell may execute.
    pub(crate) lag_left: u32,
    /// The SYNC at the head of the command queue, fetched and waiting (for in-flight DMA or a
    /// [`FAIL_SYNC_DELAY`] or [`SYNC_LAG`] deadline); it is not fetched again, as on hardware.
    pub(crate) pending_sync: Option<PendingSync>,
    /// Failure injection and the walk, fault and SYNC lags ([`IOTLB_KEEP`] is the IOTLB's
    /// mode).
    pub(crate) inject: Inject,
    /// [`shared_regs::event::VIOL_CTX_RELEASED`] violations reported (also in
    /// [`STAT_VIOLATIONS`]; the fuzzer tells them from the validator's with it).
    pub(crate) ctx_released: u64,
    /// The regions the driver lent for untranslated DMA (ABI 1.8).
    pub(crate) phys: PhysRegions,
    /// [`ASID_STAT_SEL`]: the ASID whose statistics the per-ASID registers show (ABI 1.9).
    pub(crate) asid_stat_sel: u32,
}

impl State {
    fn new(config: &DeviceConfig) -> Self {
        Self {
            scratch: 0,
            error: 0,
            error_info: 0,
            cr0: 0,
            cr0ack: 0,
            irq_ctrl: 0,
            ctx_base_lo: 0,
            ctx_base_hi: 0,
            ctx_base: 0,
            cmdq: Ring::default(),
            evtq: Ring::default(),
            dmaq: Ring::default(),
            cmdq_err: 0,
            evtq_overflow: false,
            dmaq_stopped: false,
            iotlb: Iotlb::new(config.iotlb_entries as usize, config.iotlb_policy),
            ctx_cache: HashMap::new(),
            job: None,
            ledger: Ledger::default(),
            validator: Validator::new(),
            stats: [0; STAT_COUNT as usize],
            next_translation_id: 1,
            next_stall_tag: 1,
            sync_waited: 0,
            irq_pending: 0,
            cmd_lag: 0,
            lag_left: 0,
            pending_sync: None,
            inject: Inject::default(),
            ctx_released: 0,
            phys: PhysRegions::default(),
            asid_stat_sel: 0,
        }
    }
}

/// The zapguard device.
pub struct ZapguardDevice<E: Events> {
    pub(crate) config: DeviceConfig,
    pub(crate) events: E,
    pub(crate) s: State,
    /// Where DMA steps that do not copy guest-to-guest stage their bytes (FILL, CHECKSUM,
    /// COMPARE): no state, so a reset keeps it, and no allocation per step.
    pub(crate) staging: Box<[u8]>,
    /// PCI bus-master enable, as the glue last reported it (not reset by [`Self::reset`]: it is
    /// config-space state).
    pub(crate) bus_master: bool,
    pub(crate) clock: Box<dyn Clock>,
}

impl<E: Events> ZapguardDevice<E> {
    /// A device in its reset state.
    pub fn new(config: DeviceConfig, events: E) -> Self {
        let config = DeviceConfig {
            iotlb_entries: config.iotlb_entries.max(1),
            asid_count: config.asid_count.max(1),
            dma_burst: config.dma_burst.clamp(8, 1 << 20),
            ..config
        };
        Self {
            s: State::new(&config),
            config,
            events,
            staging: vec![0; crate::dma_engine::STAGING_SIZE].into_boxed_slice(),
            bus_master: true,
            clock: Box::new(SystemClock),
        }
    }

    /// The model parameters.
    pub fn config(&self) -> DeviceConfig {
        self.config
    }

    /// The current [`ERROR`] register.
    pub fn error_bits(&self) -> u32 {
        self.s.error
    }

    /// Statistic `STAT_*` `i` (0 for an unknown index).
    pub fn stat(&self, i: u32) -> u64 {
        let iotlb = self.s.iotlb.stats();
        match i {
            STAT_IOTLB_HITS => iotlb.hits,
            STAT_IOTLB_MISSES => iotlb.misses,
            STAT_IOTLB_EVICTIONS => iotlb.evictions,
            STAT_IOTLB_INVALIDATED => iotlb.invalidated,
            STAT_IOTLB_NOT_CACHED => iotlb.not_cached,
            STAT_ACCESSES_JUDGED => self.s.validator.counts().checks,
            STAT_ACCESSES_UNJUDGED => self.s.validator.counts().skipped,
            _ => self.s.stats.get(i as usize).copied().unwrap_or(0),
        }
    }

    /// The event sink, for the glue to report what only it sees (DMA maps, interrupts, ...).
    pub fn events(&mut self) -> &mut E {
        &mut self.events
    }

    /// Reports an error event.
    pub fn report_error(&mut self, what: String) {
        self.events.event(&Event::Error { what });
    }

    pub(crate) fn activity(&mut self, a: Activity) {
        self.events.event(&Event::Engine(a));
    }

    /// MSI-X vectors raised since the last call, as a bit mask (bit n = vector n).
    pub fn take_irqs(&mut self) -> u32 {
        std::mem::take(&mut self.s.irq_pending)
    }

    /// The PCI bus-master enable (config-space command register bit 2), as the glue reports it.
    /// While it is clear the device makes no memory access and raises no MSI-X: commands and
    /// jobs are not fetched, a job in flight stops at a step boundary (and continues from there
    /// when the bit is set again), and vectors due meanwhile are dropped, as are those raised
    /// but not yet taken. The glue must wake the worker when it sets the bit.
    pub fn set_bus_master(&mut self, enabled: bool) {
        if enabled == self.bus_master {
            return;
        }
        self.bus_master = enabled;
        if !enabled {
            // An MSI is a memory write: one not yet sent is lost.
            self.s.irq_pending = 0;
        }
        let (job, pos) = self.s.job.as_ref().map(|j| (j.id(), j.pos())).unzip();
        self.activity(Activity::BusMaster { enabled, job, pos });
    }

    /// Sets the bus-master enable as the glue's power-on state (its config space's reset value),
    /// before the device runs: not a change, so unlike [`Self::set_bus_master`] no event.
    pub fn set_power_on_bus_master(&mut self, enabled: bool) {
        self.bus_master = enabled;
    }

    /// Whether bus mastering is enabled.
    pub fn bus_master(&self) -> bool {
        self.bus_master
    }

    /// Raises `vector` if its cause is enabled in [`IRQ_CTRL`] (and it can be sent).
    pub(crate) fn raise(&mut self, vector: shared_regs::pci::Vector) {
        let enable = match vector {
            shared_regs::pci::Vector::Command => IRQ_CMD_EN,
            shared_regs::pci::Vector::Event => IRQ_EVT_EN,
            shared_regs::pci::Vector::Error => IRQ_ERR_EN,
        };
        if self.s.irq_ctrl & enable == 0 {
            return;
        }
        if !self.bus_master {
            self.activity(Activity::IrqDropped {
                vector: vector as u16,
            });
            return;
        }
        if vector == shared_regs::pci::Vector::Command && self.armed(FAIL_DROP_CMD_MSI) {
            self.fail_event(FAIL_DROP_CMD_MSI, "command vector not raised", None, None);
            return;
        }
        self.s.irq_pending |= 1 << vector as u32;
        self.activity(Activity::Interrupt {
            vector: vector as u16,
        });
    }

    /// Sets error bits; a newly set bit raises the error vector.
    pub(crate) fn set_error(&mut self, bits: u32, info: u32) {
        let new = bits & !self.s.error;
        self.s.error |= bits;
        self.s.error_info = info;
        if new != 0 {
            self.raise(shared_regs::pci::Vector::Error);
        }
    }

    /// A BAR0 read of `data.len()` bytes at `offset`. Never fails: a bad access reads 0 and
    /// sets [`ERR_BAD_ACCESS`].
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let target = classify(offset, data.len());
        data.fill(0);
        if let Target::Register(reg) = target {
            let v = self.register(reg);
            data.copy_from_slice(&v.to_le_bytes());
        }
        self.events.event(&Event::BarRead {
            bar: BAR0,
            offset,
            size: data.len(),
            value: le_value(data),
        });
        if target == Target::Bad {
            self.bad_access("read", offset, data.len());
        }
    }

    /// A BAR0 write of `data` at `offset`. Never fails: a bad access is ignored and sets
    /// [`ERR_BAD_ACCESS`]; writes to read-only registers are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let target = classify(offset, data.len());
        self.events.event(&Event::BarWrite {
            bar: BAR0,
            offset,
            size: data.len(),
            value: le_value(data),
        });
        match target {
            Target::Register(reg) => self.write_register(reg, le_value(data) as u32),
            Target::Msix => {}
            Target::Bad => self.bad_access("write", offset, data.len()),
        }
    }

    /// Whether [`Self::process`] has something to do (the worker sleeps otherwise, at most
    /// for [`Self::until_deadline`]).
    pub fn has_work(&self) -> bool {
        if !self.bus_master || self.s.inject.died {
            return false;
        }
        let cmdq = self.s.cr0ack & CR0_CMDQ_EN != 0
            && self.s.cmdq_err == 0
            && !self.s.cmdq.is_empty()
            && !self.armed(FAIL_CMDQ_STOP)
            && !self.sync_waits();
        let dmaq = self.s.cr0ack & CR0_DMAQ_EN != 0
            && !self.s.dmaq_stopped
            && self.s.job.is_none()
            && !self.s.inject.hung
            && !self.s.dmaq.is_empty();
        cmdq || self.job_runs() || dmaq
    }

    /// Whether a job is in flight and can make progress (not stalled, not waiting out a
    /// `WALK_LAG_IN_STEP` deadline, engine not hung).
    pub(crate) fn job_runs(&self) -> bool {
        let waits = |j: &ActiveJob| j.mid_step.is_some_and(|m| self.clock.now() < m.due);
        !self.s.inject.hung
            && self
                .s
                .job
                .as_ref()
                .is_some_and(|j| !j.is_stalled() && !waits(j))
    }

    /// Whether the SYNC at the head of the queue must still wait (for DMA or its deadline).
    fn sync_waits(&self) -> bool {
        self.s.pending_sync.is_some_and(|p| {
            p.hold.due.is_some_and(|due| self.clock.now() < due)
                || self.s.job.as_ref().is_some_and(|j| j.holds_doomed())
        })
    }

    /// Device reset: every register back to its reset value, caches and the job dropped,
    /// failure injection disarmed (a hang ends). Bus mastering is config space: the glue
    /// reports it again after a reset.
    pub fn reset(&mut self) {
        self.s = State::new(&self.config);
        self.events.event(&Event::Reset);
    }

    fn register(&self, reg: u32) -> u32 {
        match reg {
            IDENT => IDENT_MAGIC,
            VERSION => VERSION_VALUE,
            CAPS => CAPS_VALUE,
            IOTLB_ENTRIES => self.config.iotlb_entries,
            ASID_COUNT => self.config.asid_count,
            SCRATCH => self.s.scratch,
            ERROR => self.s.error,
            ERROR_INFO => self.s.error_info,
            CR0 => self.s.cr0,
            CR0ACK => self.s.cr0ack,
            IRQ_CTRL => self.s.irq_ctrl,
            CMD_LAG => self.s.cmd_lag,
            CTX_BASE_LO => self.s.ctx_base_lo,
            CTX_BASE_HI => self.s.ctx_base_hi,
            CMDQ_BASE_LO => self.s.cmdq.base_lo,
            CMDQ_BASE_HI => self.s.cmdq.base_hi,
            CMDQ_LOG2SIZE => self.s.cmdq.log2,
            CMDQ_PROD => self.s.cmdq.prod,
            CMDQ_CONS => {
                let err = if self.s.cmdq_err != 0 {
                    CONS_ERR | (u32::from(self.s.cmdq_err) & CONS_ERR_CODE_MASK) << CONS_ERR_SHIFT
                } else {
                    0
                };
                self.s.cmdq.cons | err
            }
            EVTQ_BASE_LO => self.s.evtq.base_lo,
            EVTQ_BASE_HI => self.s.evtq.base_hi,
            EVTQ_LOG2SIZE => self.s.evtq.log2,
            EVTQ_PROD => {
                self.s.evtq.prod
                    | if self.s.evtq_overflow {
                        EVTQ_PROD_OVERFLOW
                    } else {
                        0
                    }
            }
            EVTQ_CONS => self.s.evtq.cons,
            DMAQ_BASE_LO => self.s.dmaq.base_lo,
            DMAQ_BASE_HI => self.s.dmaq.base_hi,
            DMAQ_LOG2SIZE => self.s.dmaq.log2,
            DMAQ_PROD => self.s.dmaq.prod,
            DMAQ_CONS => self.s.dmaq.cons | if self.s.dmaq_stopped { CONS_ERR } else { 0 },
            FAIL_INJECT => self.s.inject.mode,
            FAIL_ARG => self.s.inject.arg,
            WALK_LAG => self.s.inject.walk_lag,
            FAULT_LAG => self.s.inject.fault_lag,
            SYNC_LAG => self.s.inject.sync_lag,
            IOTLB_KEEP => self.iotlb_keep(),
            PT_FREED_BASE_LO => self.s.inject.pt_freed_base_lo,
            PT_FREED_BASE_HI => self.s.inject.pt_freed_base_hi,
            PT_FREED_PAGES => self.s.inject.pt_freed_pages,
            PHYS_ADDR_LO => self.s.phys.addr_lo,
            PHYS_ADDR_HI => self.s.phys.addr_hi,
            PHYS_LEN => self.s.phys.len,
            PHYS_CTRL => u32::from(self.s.phys.checking()),
            ASID_STAT_SEL => self.s.asid_stat_sel,
            o if (ASID_STATS_BASE..ASID_STATS_BASE + 8 * ASID_STAT_COUNT).contains(&o) => {
                let v = self.asid_stat(self.s.asid_stat_sel, (o - ASID_STATS_BASE) / 8);
                if o % 8 == 0 {
                    v as u32
                } else {
                    (v >> 32) as u32
                }
            }
            o if (STATS_BASE..STATS_BASE + 8 * STAT_COUNT).contains(&o) => {
                let v = self.stat((o - STATS_BASE) / 8);
                if o % 8 == 0 {
                    v as u32
                } else {
                    (v >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    /// Per-ASID statistic `ASID_STAT_*` `i` of `asid` (0 for an unknown index).
    pub fn asid_stat(&self, asid: u32, i: u32) -> u64 {
        let c = self.s.validator.asid_counts(asid);
        match i {
            ASID_STAT_JUDGED => c.judged,
            ASID_STAT_UNJUDGED => c.unjudged,
            _ => 0,
        }
    }

    /// An [`ASID_STAT_SEL`] write: selects an ASID's statistics, and zeroes them with
    /// [`ASID_STAT_CLEAR`].
    fn write_asid_stat_sel(&mut self, v: u32) {
        let asid = v & ASID_STAT_ASID_MASK;
        if v & !(ASID_STAT_ASID_MASK | ASID_STAT_CLEAR) != 0 || asid >= self.config.asid_count {
            self.set_error(ERR_CONFIG, ASID_STAT_SEL);
            self.report_error(format!("ASID_STAT_SEL written with {v:#x}: refused"));
            return;
        }
        self.s.asid_stat_sel = asid;
        if v & ASID_STAT_CLEAR != 0 {
            self.s.validator.clear_asid(asid);
        }
    }

    /// A [`PHYS_CTRL`] write: declares, reclaims or forgets a region, or turns the check on.
    fn write_phys_ctrl(&mut self, v: u32) {
        let dmaq = (self.s.dmaq.cons, self.s.dmaq.prod);
        if let Err(e) = self.s.phys.control(v, self.config.asid_count, dmaq) {
            self.set_error(ERR_CONFIG, PHYS_CTRL);
            self.report_error(e.to_string());
        }
    }

    fn write_register(&mut self, reg: u32, v: u32) {
        // Base and size registers of an enabled unit are frozen (the device latched them).
        let cr0ack = self.s.cr0ack;
        let frozen = |unit: u32| cr0ack & unit != 0;
        let mut refuse = false;
        match reg {
            SCRATCH => self.s.scratch = v,
            ERROR => self.clear_errors(v),
            CR0 => self.write_cr0(v),
            IRQ_CTRL => self.s.irq_ctrl = v & (IRQ_CMD_EN | IRQ_EVT_EN | IRQ_ERR_EN),
            CTX_BASE_LO | CTX_BASE_HI if frozen(CR0_CTX_EN) => refuse = true,
            CTX_BASE_LO => self.s.ctx_base_lo = v,
            CTX_BASE_HI => self.s.ctx_base_hi = v,
            CMDQ_BASE_LO | CMDQ_BASE_HI | CMDQ_LOG2SIZE if frozen(CR0_CMDQ_EN) => refuse = true,
            EVTQ_BASE_LO | EVTQ_BASE_HI | EVTQ_LOG2SIZE if frozen(CR0_EVTQ_EN) => refuse = true,
            DMAQ_BASE_LO | DMAQ_BASE_HI | DMAQ_LOG2SIZE if frozen(CR0_DMAQ_EN) => refuse = true,
            CMDQ_BASE_LO => self.s.cmdq.base_lo = v,
            CMDQ_BASE_HI => self.s.cmdq.base_hi = v,
            CMDQ_LOG2SIZE => self.s.cmdq.log2 = v,
            EVTQ_BASE_LO => self.s.evtq.base_lo = v,
            EVTQ_BASE_HI => self.s.evtq.base_hi = v,
            EVTQ_LOG2SIZE => self.s.evtq.log2 = v,
            DMAQ_BASE_LO => self.s.dmaq.base_lo = v,
            DMAQ_BASE_HI => self.s.dmaq.base_hi = v,
            DMAQ_LOG2SIZE => self.s.dmaq.log2 = v,
            // Producer/consumer positions keep only index + wrap bit.
            CMDQ_PROD => {
                self.s.cmdq.prod = queue::position(v, self.s.cmdq.log2);
                // A lag window already running is not restarted, so doorbells cannot starve
                // the queue.
                if self.s.lag_left == 0 {
                    self.s.lag_left = self.s.cmd_lag;
                }
                if self.armed(FAIL_CMDQ_STOP) && self.s.cr0ack & CR0_CMDQ_EN != 0 {
                    self.cmdq_frozen();
                }
            }
            CMD_LAG => self.s.cmd_lag = v,
            FAIL_INJECT => self.write_fail_inject(v),
            FAIL_ARG => self.s.inject.arg = v,
            WALK_LAG => {
                self.s.inject.walk_lag =
                    (v & WALK_LAG_IN_STEP) | (v & !WALK_LAG_IN_STEP).min(WALK_LAG_MAX)
            }
            FAULT_LAG => self.s.inject.fault_lag = v.min(FAULT_LAG_MAX),
            SYNC_LAG => self.s.inject.sync_lag = v.min(SYNC_LAG_MAX),
            IOTLB_KEEP => self.write_iotlb_keep(v),
            PT_FREED_BASE_LO => self.write_pt_freed_base_lo(v),
            PT_FREED_BASE_HI => self.s.inject.pt_freed_base_hi = v,
            PT_FREED_PAGES => self.s.inject.pt_freed_pages = v,
            PHYS_ADDR_LO => self.s.phys.addr_lo = v,
            PHYS_ADDR_HI => self.s.phys.addr_hi = v,
            PHYS_LEN => self.s.phys.len = v,
            PHYS_CTRL => self.write_phys_ctrl(v),
            ASID_STAT_SEL => self.write_asid_stat_sel(v),
            RESET if v == RESET_KEY => self.reset(),
            RESET => {
                self.set_error(ERR_CONFIG, RESET);
                self.report_error(format!("RESET written with {v:#x}: ignored"));
            }
            EVTQ_CONS => self.s.evtq.cons = queue::position(v, self.s.evtq.log2),
            DMAQ_PROD => self.s.dmaq.prod = queue::position(v, self.s.dmaq.log2),
            _ => {}
        }
        if refuse {
            self.set_error(ERR_CONFIG, reg);
            self.report_error(format!(
                "{} written while its unit is enabled: ignored",
                register_name(reg.into()).unwrap_or("?")
            ));
        }
    }

    fn clear_errors(&mut self, v: u32) {
        self.s.error &= !v;
        // Clearing a queue's error bit restarts it where it stopped (SMMUv3's GERRORN).
        if v & ERR_CMDQ != 0 {
            self.s.cmdq_err = 0;
        }
        if v & ERR_DMAQ_ABORT != 0 {
            self.s.dmaq_stopped = false;
        }
        if v & ERR_EVTQ_OVERFLOW != 0 {
            self.s.evtq_overflow = false;
        }
    }

    fn write_cr0(&mut self, v: u32) {
        self.s.cr0 = v & CR0_MASK;
        let mut ack = self.s.cr0ack;
        let mut refused = 0;
        let mut unanswered = false;
        for unit in [CR0_CMDQ_EN, CR0_EVTQ_EN, CR0_DMAQ_EN, CR0_CTX_EN] {
            let want = self.s.cr0 & unit != 0;
            let have = ack & unit != 0;
            if want == have {
                continue;
            }
            if !want && self.s.inject.hung && unit & (CR0_DMAQ_EN | CR0_CTX_EN) != 0 {
                // FAIL_DMA_HANG: the engine these units stop does not answer.
                unanswered = true;
                continue;
            }
            if !want {
                ack &= !unit;
                match unit {
                    CR0_CMDQ_EN => {
                        self.s.cmdq_err = 0;
                        self.drop_pending_sync();
                    }
                    // A disabled DMA queue drops its job without a status: the driver is
                    // tearing the queue down and owns its memory again.
                    CR0_DMAQ_EN => {
                        self.s.job = None;
                        self.s.dmaq_stopped = false;
                    }
                    CR0_CTX_EN => self.s.ctx_cache.clear(),
                    _ => {}
                }
                continue;
            }
            let ok = match unit {
                CR0_CMDQ_EN => self.s.cmdq.config_ok(),
                CR0_EVTQ_EN => self.s.evtq.config_ok(),
                CR0_DMAQ_EN => self.s.dmaq.config_ok(),
                _ => {
                    let base = u64::from(self.s.ctx_base_hi) << 32 | u64::from(self.s.ctx_base_lo);
                    base.is_multiple_of(CTX_BASE_ALIGN)
                }
            };
            if !ok {
                refused |= unit;
                continue;
            }
            ack |= unit;
            match unit {
                CR0_CMDQ_EN => {
                    self.s.cmdq.enable();
                    self.s.cmdq_err = 0;
                    self.drop_pending_sync();
                }
                CR0_EVTQ_EN => {
                    self.s.evtq.enable();
                    self.s.evtq_overflow = false;
                }
                CR0_DMAQ_EN => {
                    self.s.dmaq.enable();
                    self.s.dmaq_stopped = false;
                    self.s.phys.ring_restarted();
                }
                _ => {
                    self.s.ctx_base =
                        u64::from(self.s.ctx_base_hi) << 32 | u64::from(self.s.ctx_base_lo);
                    self.s.ctx_cache.clear();
                }
            }
        }
        self.s.cr0ack = ack;
        self.activity(Activity::Control {
            cr0ack: ack,
            refused,
        });
        if unanswered {
            let job = self.s.job.as_ref().map(|j| j.id());
            self.fail_event(FAIL_DMA_HANG, "cr0 disable not acknowledged", None, job);
        }
        if refused != 0 {
            self.set_error(ERR_CONFIG, CR0);
            self.report_error(format!(
                "CR0 enable refused for {refused:#x}: queue size out of range or base misaligned"
            ));
        }
    }

    /// Forgets the SYNC waiting at the head of the queue (the queue was disabled or reset): it
    /// never completes.
    fn drop_pending_sync(&mut self) {
        if let Some(p) = self.s.pending_sync.take() {
            if p.hold.delayed {
                self.fail_event(FAIL_SYNC_DELAY, "delayed sync dropped", Some(p.pos), None);
            }
        }
    }

    fn bad_access(&mut self, dir: &str, offset: u64, len: usize) {
        self.set_error(ERR_BAD_ACCESS, offset.min(u64::from(u32::MAX)) as u32);
        self.report_error(format!(
            "bad BAR0 {dir} at {offset:#x} of {len} bytes: registers take aligned 4-byte accesses"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventLog;
    use shared_regs::pci::{Vector, BAR0_SIZE};
    use shared_regs::regs::{version_major, VERSION_MAJOR};

    fn device() -> ZapguardDevice<EventLog> {
        ZapguardDevice::new(DeviceConfig::default(), EventLog::default())
    }

    fn rd(d: &mut ZapguardDevice<EventLog>, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        d.read(reg.into(), &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(d: &mut ZapguardDevice<EventLog>, reg: u32, v: u32) {
        d.write(reg.into(), &v.to_le_bytes());
    }

    #[test]
    fn identity_registers() {
        let cfg = DeviceConfig {
            iotlb_entries: 32,
            asid_count: 16,
            ..DeviceConfig::default()
        };
        let mut d = ZapguardDevice::new(cfg, EventLog::default());
        let cases = [
            (IDENT, IDENT_MAGIC),
            (VERSION, VERSION_VALUE),
            (CAPS, CAPS_VALUE),
            (IOTLB_ENTRIES, 32),
            (ASID_COUNT, 16),
            (SCRATCH, 0),
            (ERROR, 0),
        ];
        for (reg, want) in cases {
            let mut b = [0u8; 4];
            d.read(reg.into(), &mut b);
            assert_eq!(
                u32::from_le_bytes(b),
                want,
                "{:?}",
                register_name(reg.into())
            );
            // Read-only registers ignore writes, without error.
            if reg != SCRATCH && reg != ERROR {
                d.write(reg.into(), &(!want).to_le_bytes());
                d.read(reg.into(), &mut b);
                assert_eq!(u32::from_le_bytes(b), want);
            }
        }
        assert_eq!(version_major(rd(&mut d, VERSION)), VERSION_MAJOR);
        assert_eq!(d.error_bits(), 0);
        assert!(!d
            .events()
            .events
            .iter()
            .any(|e| matches!(e, Event::Error { .. })));
    }

    #[test]
    fn defaults() {
        let mut d = device();
        assert_eq!(rd(&mut d, IOTLB_ENTRIES), 64);
        assert_eq!(rd(&mut d, ASID_COUNT), 256);
    }

    #[test]
    fn scratch_round_trip_and_events() {
        let mut d = device();
        for v in [0, 1, 0xdead_beef, u32::MAX] {
            wr(&mut d, SCRATCH, v);
            assert_eq!(rd(&mut d, SCRATCH), v);
        }
        let ev = &d.events().events;
        assert_eq!(ev.len(), 8);
        assert_eq!(
            ev[4],
            Event::BarWrite {
                bar: BAR0,
                offset: SCRATCH.into(),
                size: 4,
                value: 0xdead_beef
            }
        );
        assert_eq!(
            ev[5],
            Event::BarRead {
                bar: BAR0,
                offset: SCRATCH.into(),
                size: 4,
                value: 0xdead_beef
            }
        );
    }

    #[test]
    fn error_is_write_one_to_clear() {
        let mut d = device();
        d.read(1, &mut [0u8; 4]);
        assert_eq!(rd(&mut d, ERROR), ERR_BAD_ACCESS);
        wr(&mut d, ERROR, 0);
        assert_eq!(
            rd(&mut d, ERROR),
            ERR_BAD_ACCESS,
            "writing 0 clears nothing"
        );
        wr(&mut d, ERROR, !ERR_BAD_ACCESS);
        assert_eq!(
            rd(&mut d, ERROR),
            ERR_BAD_ACCESS,
            "other bits leave it alone"
        );
        wr(&mut d, ERROR, ERR_BAD_ACCESS);
        assert_eq!(rd(&mut d, ERROR), 0);
    }

    #[test]
    fn bad_accesses_set_error_and_read_zero() {
        // (offset, len): wrong width, misaligned, undefined, past the registers, past the BAR.
        let cases: &[(u64, usize)] = &[
            (u64::from(IDENT), 1),
            (u64::from(IDENT), 2),
            (u64::from(IDENT), 8),
            (u64::from(SCRATCH) + 2, 4),
            (1, 4),
            (0x038, 4),
            (0x0fc, 4),
            (REGS_SIZE - 4, 4),
            (REGS_SIZE, 4),
            (u64::from(MSIX_TABLE_OFFSET) - 4, 8),
            (BAR0_SIZE, 4),
            (u64::MAX - 1, 4),
            (0, 0),
        ];
        for &(offset, len) in cases {
            let mut d = device();
            wr(&mut d, SCRATCH, 0x1234_5678);
            let mut buf = vec![0xaau8; len];
            d.read(offset, &mut buf);
            assert!(buf.iter().all(|&b| b == 0), "{offset:#x}/{len} reads 0");
            assert_eq!(d.error_bits(), ERR_BAD_ACCESS, "{offset:#x}/{len}");
            wr(&mut d, ERROR, ERR_BAD_ACCESS);
            d.write(offset, &vec![0xffu8; len]);
            assert_eq!(d.error_bits(), ERR_BAD_ACCESS, "{offset:#x}/{len}");
            assert_eq!(
                rd(&mut d, SCRATCH),
                0x1234_5678,
                "bad writes change nothing"
            );
            let errors = d
                .events()
                .events
                .iter()
                .filter(|e| matches!(e, Event::Error { .. }))
                .count();
            assert_eq!(errors, 2);
        }
    }

    #[test]
    fn msix_area_is_benign() {
        let cases: &[(u64, usize)] = &[
            (MSIX_TABLE_OFFSET.into(), 4),
            (u64::from(MSIX_TABLE_OFFSET) + 12, 4),
            (u64::from(MSIX_TABLE_OFFSET) + MSIX_TABLE_SIZE - 8, 8),
            (MSIX_PBA_OFFSET.into(), 8),
            (u64::from(MSIX_PBA_OFFSET) + 1, 1),
        ];
        let mut d = device();
        for &(offset, len) in cases {
            let mut buf = vec![0xaau8; len];
            d.read(offset, &mut buf);
            assert!(buf.iter().all(|&b| b == 0));
            d.write(offset, &buf);
        }
        assert_eq!(d.error_bits(), 0);
        // One past the table is not benign.
        d.read(
            u64::from(MSIX_TABLE_OFFSET) + MSIX_TABLE_SIZE,
            &mut [0u8; 4],
        );
        assert_eq!(d.error_bits(), ERR_BAD_ACCESS);
    }

    #[test]
    fn odd_accesses_never_panic() {
        let mut d = device();
        let offsets = (0..0x40)
            .chain(REGS_SIZE - 8..REGS_SIZE + 8)
            .chain(u64::from(MSIX_TABLE_OFFSET) - 4..u64::from(MSIX_TABLE_OFFSET) + 4)
            .chain(BAR0_SIZE - 8..BAR0_SIZE + 8)
            .chain(u64::MAX - 16..=u64::MAX);
        for offset in offsets {
            for len in [0usize, 1, 2, 3, 4, 5, 7, 8, 9, 16, 4096] {
                let mut buf = vec![0x5au8; len];
                d.read(offset, &mut buf);
                d.write(offset, &buf);
                let good = len == 4 && offset.is_multiple_of(4) && register_name(offset).is_some();
                if !good && classify(offset, len) != Target::Msix {
                    assert_eq!(d.error_bits(), ERR_BAD_ACCESS, "{offset:#x}/{len}");
                    wr(&mut d, ERROR, ERR_BAD_ACCESS);
                }
            }
        }
    }

    #[test]
    fn reset_restores_reset_values() {
        let mut d = device();
        wr(&mut d, SCRATCH, 7);
        d.read(3, &mut [0u8; 1]);
        d.reset();
        assert_eq!(d.events().events.last(), Some(&Event::Reset));
        assert_eq!(rd(&mut d, SCRATCH), 0);
        assert_eq!(rd(&mut d, ERROR), 0);
        assert_eq!(rd(&mut d, IDENT), IDENT_MAGIC);
        assert_eq!(rd(&mut d, IOTLB_ENTRIES), 64);
    }

    #[test]
    fn reset_register_takes_only_its_key() {
        let mut d = device();
        wr(&mut d, SCRATCH, 7);
        wr(&mut d, FAIL_INJECT, FAIL_CMDQ_STOP);
        wr(&mut d, RESET, 1);
        assert_eq!(rd(&mut d, SCRATCH), 7, "a wrong value resets nothing");
        assert_eq!(d.error_bits(), ERR_CONFIG);
        wr(&mut d, RESET, RESET_KEY);
        assert_eq!(d.events().events.last(), Some(&Event::Reset));
        assert_eq!(rd(&mut d, SCRATCH), 0);
        assert_eq!(rd(&mut d, ERROR), 0);
        assert_eq!(rd(&mut d, FAIL_INJECT), FAIL_NONE);
        assert_eq!(rd(&mut d, RESET), 0);
    }

    /// Bus mastering off: no memory access, no interrupt; a job stops between steps and
    /// resumes where it stopped. (256-byte steps, so that it stops inside a page.)
    #[test]
    fn bus_master_gates_every_memory_access() {
        use crate::testkit::{job, Rig, SYNC_WORD};
        use shared_regs::dma::{DMA_FILL, DMA_ST_OK};
        use shared_regs::pte::PAGE_SIZE as PG;
        const VA: u64 = 0x7f00_0000_0000;
        let cfg = DeviceConfig {
            dma_burst: 256,
            ..DeviceConfig::default()
        };
        let mut r = Rig::new(cfg, EventLog::default());
        r.bind(1, 0);
        let frames = [r.map_page(1, VA), r.map_page(1, VA + PG)];
        assert!(r.dev.bus_master(), "on for a library device");
        let st = r.submit(job(DMA_FILL, 1, 0, VA, 2 * PG, 0x1111_1111_1111_1111));
        for _ in 0..4 {
            r.dev.process(&r.mem, 1);
        }
        r.dev.take_irqs();
        let ram = |r: &Rig<EventLog>| {
            let mut v = r.peek(frames[0], PG as usize);
            v.extend(r.peek(frames[1], PG as usize));
            v.extend(r.peek(SYNC_WORD, 4));
            v.extend(r.peek(st, 32));
            v
        };
        let before = ram(&r);

        r.dev.set_bus_master(false);
        r.dev.set_bus_master(false);
        let cons = r.reg(CMDQ_CONS);
        let s = r.post_sync();
        r.submit(job(DMA_FILL, 1, 0, VA, 8, 0));
        r.dev.read(3, &mut [0u8; 1]); // an error: its vector is due
        assert!(!r.dev.has_work());
        assert!(!r.dev.process(&r.mem, 64));
        assert_eq!(ram(&r), before, "no memory access");
        assert_eq!(r.reg(CMDQ_CONS), cons, "no command fetch");
        assert_eq!(r.reg(ERROR), ERR_BAD_ACCESS, "registers still work");
        assert_eq!(r.dev.take_irqs(), 0, "no MSI-X");

        r.dev.set_bus_master(true);
        r.run();
        assert!(r.sync_done(s));
        let done = r.status(st);
        assert_eq!((done.status, done.bytes_done), (DMA_ST_OK, 2 * PG));
        assert!(r.peek(frames[1], PG as usize).iter().all(|&b| b == 0x11));
        assert_eq!(
            r.dev.take_irqs(),
            1 << Vector::Command as u32,
            "the error vector due while off is not delivered later"
        );

        let acts = r.activity();
        let changes: Vec<&Activity> = acts
            .iter()
            .filter(|a| matches!(a, Activity::BusMaster { .. }))
            .collect();
        let stopped_at = 3 * 256;
        assert_eq!(
            changes,
            [
                &Activity::BusMaster {
                    enabled: false,
                    job: Some(1),
                    pos: Some(stopped_at)
                },
                &Activity::BusMaster {
                    enabled: true,
                    job: Some(1),
                    pos: Some(stopped_at)
                },
            ],
            "each change once, with the job in flight"
        );
        assert!(acts.contains(&Activity::IrqDropped {
            vector: Vector::Error as u16
        }));
        // The job resumed at the step where it stopped.
        let resumed = acts
            .iter()
            .skip_while(|a| !matches!(a, Activity::BusMaster { enabled: true, .. }))
            .find_map(|a| match a {
                Activity::DmaAccess { va, .. } => Some(*va),
                _ => None,
            });
        assert_eq!(resumed, Some(VA + stopped_at));
    }

    #[test]
    fn bus_master_survives_reset_and_drops_pending_irqs() {
        let mut d = device();
        wr(&mut d, IRQ_CTRL, IRQ_ERR_EN);
        d.read(1, &mut [0u8; 4]);
        d.set_bus_master(false);
        assert_eq!(d.take_irqs(), 0, "raised but not sent: lost");
        d.reset();
        assert!(!d.bus_master(), "config space, not a register");
    }

    #[test]
    fn register_names() {
        assert_eq!(register_name(IDENT.into()), Some("IDENT"));
        assert_eq!(register_name(SCRATCH.into()), Some("SCRATCH"));
        assert_eq!(register_name(FAIL_INJECT.into()), Some("FAIL_INJECT"));
        assert_eq!(register_name(2), None);
    }
}
