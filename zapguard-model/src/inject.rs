//! Test knobs that make the device fail or slow down: failure injection ([`FAIL_INJECT`],
//! [`FAIL_ARG`], ABI 1.3), the page-walk lag ([`WALK_LAG`], 1.3), the fault lag ([`FAULT_LAG`],
//! 1.4), the IOTLB keep mode ([`IOTLB_KEEP`], 1.4), the table-lifetime check
//! ([`PT_FREED_BASE_LO`], [`PT_FREED_BASE_HI`], [`PT_FREED_PAGES`], 1.4), the SYNC lag
//! ([`SYNC_LAG`], 1.5), and the [`Clock`] the lags and deadlines run on.
//!
//! The lags sleep on the [`Clock`] inside [`ZapguardDevice::process`], so they hold whatever the
//! caller holds: in the vfio-user server, the device lock (register accesses wait) and the
//! guest-memory read lock. After a lagged walk or a lagged fault, `process` ends its slice so
//! that the accesses that waited get in. [`WALK_LAG`] sleeps in [`crate::dma_engine`] before
//! each table read of a walk; [`FAULT_LAG`] sleeps there once per fault of a DMA job, before
//! anything about the fault is reported (statistic, trace, event, stall or job status).
//! [`IOTLB_KEEP`] is the IOTLB's own mode ([`crate::iotlb::Iotlb::set_keep`]), so it lives
//! with the IOTLB and a reset, which rebuilds the IOTLB, clears it. The table-lifetime check is
//! made by [`crate::dma_engine`]'s walks: before each table read (after the [`WALK_LAG`] sleep)
//! it reads the table's bit in the guest's bitmap (`FreedTables::is_freed`), never caching it,
//! so a bit the driver sets while the walker sleeps is seen at the next table read.
//! [`SYNC_LAG`] does not sleep: like [`FAIL_SYNC_DELAY`] it gives each SYNC reached a deadline
//! on the [`Clock`] ([`crate::cmdq`]), so the device keeps running DMA while the SYNC waits and
//! the idle worker sleeps until the deadline ([`ZapguardDevice::until_deadline`]).
//!
//! The register semantics are in [`shared_regs::regs`]. Here is where each mode bites:
//!
//! | mode | where | effect |
//! |---|---|---|
//! | [`FAIL_CMDQ_STOP`] | [`crate::cmdq`] | no command is fetched; `CR0` still answers |
//! | [`FAIL_SYNC_DELAY`] | [`crate::cmdq`] | a SYNC reached is held until its deadline on the [`Clock`] (the later of this one and [`SYNC_LAG`]'s) |
//! | [`FAIL_CMDQ_ERROR`] | [`crate::cmdq`] | the next command fetched stops the queue with `CERR_INJECTED` |
//! | [`FAIL_DROP_CMD_MSI`] | [`crate::device`] | the command vector is not raised |
//! | [`FAIL_DMA_HANG`] | [`crate::dma_engine`], [`crate::device`] | one more DMA step, then the engine stops; `CR0` clears of DMAQ/CTX are not acknowledged |
//! | [`FAIL_DIE`] | [`crate::dma_engine`] | the next DMA step sets [`ZapguardDevice::die_requested`]; the glue exits the process |
//!
//! Every arming and every firing is traced as [`Activity::FailInject`]; the lags are not
//! failures and are not traced as such (a SYNC's `sync_done` names the [`SYNC_LAG`] it
//! applied). Time is injected (a [`Clock`]) so that tests can watch or replace the walker's
//! sleeps and the SYNC deadlines.

use std::time::{Duration, Instant};

use shared_regs::regs::*;

use crate::device::ZapguardDevice;
use crate::events::{Activity, Events};
use crate::guest::GuestMem;

/// The time the device runs on: deadlines of [`FAIL_SYNC_DELAY`] and [`SYNC_LAG`], and the
/// sleeps of [`WALK_LAG`] and [`FAULT_LAG`].
pub trait Clock: Send {
    /// The current time.
    fn now(&self) -> Instant;
    /// Blocks the calling thread for `d` (the device's worker, holding the device lock: that is
    /// the point of a lag).
    fn sleep(&self, d: Duration);
}

/// Wall-clock time and real sleeps.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// The knobs' state (part of the device state: a reset clears it).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Inject {
    /// [`FAIL_INJECT`]: the armed mode.
    pub(crate) mode: u32,
    /// [`FAIL_ARG`].
    pub(crate) arg: u32,
    /// [`WALK_LAG`], clamped to [`WALK_LAG_MAX`].
    pub(crate) walk_lag: u32,
    /// [`FAULT_LAG`], clamped to [`FAULT_LAG_MAX`].
    pub(crate) fault_lag: u32,
    /// [`SYNC_LAG`], clamped to [`SYNC_LAG_MAX`].
    pub(crate) sync_lag: u32,
    /// [`PT_FREED_BASE_LO`] (bits 2:0 always clear: a misaligned write is refused).
    pub(crate) pt_freed_base_lo: u32,
    /// [`PT_FREED_BASE_HI`].
    pub(crate) pt_freed_base_hi: u32,
    /// [`PT_FREED_PAGES`]: 0 = the table-lifetime check is off.
    pub(crate) pt_freed_pages: u32,
    /// [`shared_regs::event::VIOL_TABLE_FREED`] violations reported (also in
    /// [`STAT_VIOLATIONS`]; the fuzzer tells them from the validator's with it).
    pub(crate) tables_freed: u64,
    /// [`FAIL_DMA_HANG`] fired: the DMA engine does nothing more until a reset.
    pub(crate) hung: bool,
    /// [`FAIL_DIE`] fired: the device does nothing more; the glue ends the process.
    pub(crate) died: bool,
    /// The freeze of the armed [`FAIL_CMDQ_STOP`] was traced (once per arming, not per
    /// doorbell).
    pub(crate) stop_traced: bool,
}

/// The table-lifetime check's bitmap, as the registers name it when a walk starts (the bits
/// themselves are read from guest memory at each table read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FreedTables {
    /// Guest-physical address of the bitmap.
    pub(crate) base: u64,
    /// Pages covered, at least 1.
    pub(crate) pages: u64,
}

impl FreedTables {
    /// Whether the bitmap marks the table page at `table` (a GPA, any offset in the page) as
    /// freed: one byte read of guest memory, now. A table outside the covered pages is not
    /// freed; a bitmap byte that cannot be read (outside RAM, or its address overflows) counts
    /// as a clear bit.
    pub(crate) fn is_freed(&self, mem: &(impl GuestMem + ?Sized), table: u64) -> bool {
        let page = table / shared_regs::pte::PAGE_SIZE;
        if page >= self.pages {
            return false;
        }
        let Some(at) = self.base.checked_add(page / 8) else {
            return false;
        };
        let mut b = [0u8; 1];
        mem.read(at, &mut b).is_ok() && b[0] & (1 << (page % 8)) != 0
    }
}

/// Name of a `FAIL_*` mode, for traces.
pub fn mode_name(mode: u32) -> &'static str {
    match mode {
        FAIL_NONE => "none",
        FAIL_CMDQ_STOP => "cmdq_stop",
        FAIL_SYNC_DELAY => "sync_delay",
        FAIL_CMDQ_ERROR => "cmdq_error",
        FAIL_DROP_CMD_MSI => "drop_cmd_msi",
        FAIL_DMA_HANG => "dma_hang",
        FAIL_DIE => "die",
        _ => "unknown",
    }
}

impl<E: Events> ZapguardDevice<E> {
    /// Replaces the device's clock (tests: to watch the walker's sleeps or run time faster).
    pub fn set_clock(&mut self, clock: impl Clock + 'static) {
        self.clock = Box::new(clock);
    }

    /// Whether [`FAIL_DIE`] fired: the glue must flush the trace and end the process without
    /// answering the VMM. The device itself does nothing more meanwhile.
    pub fn die_requested(&self) -> bool {
        self.s.inject.died
    }

    /// How long until the device has work that only time brings (a SYNC delayed by
    /// [`FAIL_SYNC_DELAY`] or [`SYNC_LAG`] falls due), if such a deadline lies in the future:
    /// the idle worker sleeps that long at most.
    pub fn until_deadline(&self) -> Option<Duration> {
        let now = self.clock.now();
        let sync = self.s.pending_sync.and_then(|p| p.hold.due);
        let step = self.s.job.as_ref().and_then(|j| j.mid_step).map(|m| m.due);
        [sync, step]
            .into_iter()
            .flatten()
            .filter(|&due| due > now)
            .min()
            .map(|due| due - now)
    }

    /// A [`FAIL_INJECT`] write: arms `v`, or refuses it with [`ERR_CONFIG`].
    pub(crate) fn write_fail_inject(&mut self, v: u32) {
        let mode = v & FAIL_MODE_MASK;
        if v != mode || mode > FAIL_DIE {
            self.set_error(ERR_CONFIG, FAIL_INJECT);
            self.report_error(format!(
                "FAIL_INJECT {v:#x}: unknown failure mode or reserved bits set: ignored"
            ));
            return;
        }
        self.s.inject.mode = mode;
        self.s.inject.stop_traced = false;
        let what = if mode == FAIL_NONE {
            "disarmed"
        } else {
            "armed"
        };
        self.fail_event(mode, what, None, None);
        if mode == FAIL_CMDQ_STOP && self.s.cr0ack & CR0_CMDQ_EN != 0 && !self.s.cmdq.is_empty() {
            self.cmdq_frozen();
        }
    }

    /// [`FAIL_CMDQ_STOP`] holds back published commands: traced once per arming.
    pub(crate) fn cmdq_frozen(&mut self) {
        if !self.s.inject.stop_traced {
            self.s.inject.stop_traced = true;
            let cons = self.s.cmdq.cons;
            self.fail_event(FAIL_CMDQ_STOP, "commands not consumed", Some(cons), None);
        }
    }

    /// The walker's lag before each table read, if any.
    pub(crate) fn walk_lag(&self) -> Option<Duration> {
        let us = (self.s.inject.walk_lag & !WALK_LAG_IN_STEP).min(WALK_LAG_MAX);
        (us > 0).then(|| Duration::from_micros(u64::from(us)))
    }

    /// The wait in the middle of each DMA step ([`WALK_LAG_IN_STEP`]), if any.
    pub(crate) fn step_lag(&self) -> Option<Duration> {
        self.walk_lag()
            .filter(|_| self.s.inject.walk_lag & WALK_LAG_IN_STEP != 0)
    }

    /// The wait before a DMA job's fault is reported, if any.
    pub(crate) fn fault_lag(&self) -> Option<Duration> {
        let us = self.s.inject.fault_lag.min(FAULT_LAG_MAX);
        (us > 0).then(|| Duration::from_micros(u64::from(us)))
    }

    /// The least time a SYNC reached now waits before it completes, if any.
    pub(crate) fn sync_lag(&self) -> Option<Duration> {
        let us = self.s.inject.sync_lag.min(SYNC_LAG_MAX);
        (us > 0).then(|| Duration::from_micros(u64::from(us)))
    }

    /// An [`IOTLB_KEEP`] write: bit 0 sets the IOTLB's keep mode, reserved bits are ignored.
    pub(crate) fn write_iotlb_keep(&mut self, v: u32) {
        self.s.iotlb.set_keep(v & IOTLB_KEEP_EN != 0);
    }

    /// [`IOTLB_KEEP`] as it reads.
    pub(crate) fn iotlb_keep(&self) -> u32 {
        if self.s.iotlb.keep() {
            IOTLB_KEEP_EN
        } else {
            0
        }
    }

    /// A [`PT_FREED_BASE_LO`] write: stored if 8-byte aligned, else refused with [`ERR_CONFIG`]
    /// (the register keeps its value).
    pub(crate) fn write_pt_freed_base_lo(&mut self, v: u32) {
        if u64::from(v).is_multiple_of(PT_FREED_BASE_ALIGN) {
            self.s.inject.pt_freed_base_lo = v;
        } else {
            self.set_error(ERR_CONFIG, PT_FREED_BASE_LO);
            self.report_error(format!(
                "PT_FREED_BASE_LO written with {v:#x}, not {PT_FREED_BASE_ALIGN}-byte aligned: \
                 ignored"
            ));
        }
    }

    /// The table-lifetime check's bitmap, if the check is on ([`PT_FREED_PAGES`] not 0).
    pub(crate) fn freed_tables(&self) -> Option<FreedTables> {
        let i = &self.s.inject;
        (i.pt_freed_pages != 0).then(|| FreedTables {
            base: u64::from(i.pt_freed_base_hi) << 32 | u64::from(i.pt_freed_base_lo),
            pages: u64::from(i.pt_freed_pages),
        })
    }

    /// Whether `mode` is armed.
    pub(crate) fn armed(&self, mode: u32) -> bool {
        self.s.inject.mode == mode
    }

    /// Traces an arming or a firing of `mode`.
    pub(crate) fn fail_event(
        &mut self,
        mode: u32,
        what: &'static str,
        cmd: Option<u32>,
        job: Option<u64>,
    ) {
        self.activity(Activity::FailInject {
            mode: mode_name(mode),
            what,
            arg: self.s.inject.arg,
            cmd,
            job,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Event, EventLog};
    use crate::guest::{GuestMem, MemError, VecMem};
    use crate::testkit::{job, Rig, EVTQ, RING_LOG2, STATUS, SYNC_WORD};
    use crate::DeviceConfig;
    use shared_regs::cmd::{self, Command, CERR_INJECTED};
    use shared_regs::dma::{
        DMA_CHECKSUM, DMA_FILL, DMA_F_IRQ, DMA_F_STALL, DMA_ST_FAULT, DMA_ST_OK, DMA_ST_PENDING,
        FNV_OFFSET as FNV,
    };
    use shared_regs::pci::Vector;
    use shared_regs::pte::{self, PAGE_SIZE as PG};
    use shared_regs::queue;
    use std::cell::RefCell;
    use std::sync::{Arc, Mutex};

    const VA: u64 = 0x7f00_0000_0000;
    const CMD_IRQ: u32 = 1 << Vector::Command as u32;
    const EVT_IRQ: u32 = 1 << Vector::Event as u32;
    const ERR_IRQ: u32 = 1 << Vector::Error as u32;

    /// Small steps: a page takes 16 of them.
    fn rig() -> Rig<EventLog> {
        let cfg = DeviceConfig {
            dma_burst: 256,
            ..DeviceConfig::default()
        };
        let mut r = Rig::new(cfg, EventLog::default());
        r.bind(1, pte::CTX_STALL);
        r.map_page(1, VA);
        r.map_page(1, VA + PG);
        r.dev.take_irqs();
        r
    }

    /// `(mode, what)` of every failure-injection trace event.
    fn fail_events(r: &mut Rig<EventLog>) -> Vec<(&'static str, &'static str)> {
        r.activity()
            .into_iter()
            .filter_map(|a| match a {
                Activity::FailInject { mode, what, .. } => Some((mode, what)),
                _ => None,
            })
            .collect()
    }

    fn bursts(r: &mut Rig<EventLog>) -> usize {
        r.activity()
            .iter()
            .filter(|a| matches!(a, Activity::DmaAccess { .. }))
            .count()
    }

    fn fill(len: u64) -> shared_regs::dma::DmaJob {
        job(DMA_FILL, 1, 0, VA, len, 0x5a5a_5a5a_5a5a_5a5a)
    }

    /// A clock that only moves when told to (or when something sleeps on it), and remembers
    /// every sleep.
    #[derive(Clone)]
    struct ManualClock(Arc<Mutex<(Instant, Vec<Duration>)>>);

    impl ManualClock {
        fn new() -> Self {
            Self(Arc::new(Mutex::new((Instant::now(), vec![]))))
        }

        fn advance(&self, d: Duration) {
            self.0.lock().unwrap().0 += d;
        }

        fn sleeps(&self) -> Vec<Duration> {
            self.0.lock().unwrap().1.clone()
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            self.0.lock().unwrap().0
        }

        fn sleep(&self, d: Duration) {
            let mut s = self.0.lock().unwrap();
            s.0 += d;
            s.1.push(d);
        }
    }

    #[test]
    fn arming_is_traced_and_reads_back() {
        let mut r = rig();
        assert_eq!(r.reg(FAIL_INJECT), FAIL_NONE);
        r.set(FAIL_ARG, 7);
        for mode in FAIL_CMDQ_STOP..=FAIL_DIE {
            r.set(FAIL_INJECT, mode);
            assert_eq!(r.reg(FAIL_INJECT), mode);
        }
        r.set(FAIL_INJECT, FAIL_NONE);
        let armed: Vec<_> = fail_events(&mut r);
        assert_eq!(
            armed,
            [
                ("cmdq_stop", "armed"),
                ("sync_delay", "armed"),
                ("cmdq_error", "armed"),
                ("drop_cmd_msi", "armed"),
                ("dma_hang", "armed"),
                ("die", "armed"),
                ("none", "disarmed"),
            ]
        );
        assert!(r
            .activity()
            .iter()
            .all(|a| !matches!(a, Activity::FailInject { arg, .. } if *arg != 7)));
        assert_eq!(r.reg(FAIL_ARG), 7);
        assert_eq!(r.reg(ERROR), 0);
    }

    #[test]
    fn unknown_modes_are_refused_with_err_config() {
        for bad in [FAIL_DIE + 1, 0xff, 0x100 | FAIL_CMDQ_STOP, u32::MAX] {
            let mut r = rig();
            r.set(FAIL_INJECT, FAIL_DROP_CMD_MSI);
            r.dev.take_irqs();
            r.set(FAIL_INJECT, bad);
            assert_eq!(
                r.reg(FAIL_INJECT),
                FAIL_DROP_CMD_MSI,
                "{bad:#x}: nothing stored"
            );
            assert_eq!(r.reg(ERROR), ERR_CONFIG, "{bad:#x}");
            assert_eq!(r.reg(ERROR_INFO), FAIL_INJECT);
            assert_eq!(r.dev.take_irqs(), ERR_IRQ);
            let errors = r
                .dev
                .events()
                .events
                .iter()
                .filter(|e| matches!(e, Event::Error { .. }))
                .count();
            assert_eq!(errors, 1, "{bad:#x}: one error event");
        }
    }

    #[test]
    fn cmdq_stop_freezes_the_queue_but_not_cr0() {
        let mut r = rig();
        let s = r.post_sync();
        r.run();
        assert!(r.sync_done(s));
        r.dev.take_irqs();
        let cons = r.reg(CMDQ_CONS);
        r.set(FAIL_INJECT, FAIL_CMDQ_STOP);
        r.post(Command::new(cmd::CMD_INV_ALL, 0, 0, 0, 0));
        let s = r.post_sync();
        assert!(!r.dev.has_work());
        r.run();
        assert!(!r.sync_done(s), "no SYNC completes");
        assert_eq!(r.reg(CMDQ_CONS), cons, "CMDQ_CONS frozen");
        assert_eq!(r.reg(ERROR), 0, "silently");
        assert_eq!(r.dev.take_irqs(), 0);
        // DMA still runs.
        assert_eq!(r.dma(fill(8)).status, DMA_ST_OK);
        assert_eq!(r.reg(CMDQ_CONS), cons);
        // The control path answers: the command queue can be disabled and enabled again.
        r.set(CR0, CR0_MASK & !CR0_CMDQ_EN);
        assert_eq!(r.reg(CR0ACK), CR0_MASK & !CR0_CMDQ_EN);
        r.set(CR0, CR0_MASK);
        assert_eq!(r.reg(CR0ACK), CR0_MASK);
        // Still frozen on the fresh ring; disarming resumes it where it stopped.
        let s = r.post_sync();
        r.run();
        assert!(!r.sync_done(s));
        r.set(FAIL_INJECT, FAIL_NONE);
        assert!(r.dev.has_work());
        r.run();
        assert!(r.sync_done(s));
        let fired = fail_events(&mut r);
        assert_eq!(
            fired
                .iter()
                .filter(|f| **f == ("cmdq_stop", "commands not consumed"))
                .count(),
            1,
            "the freeze is traced once per arming: {fired:?}"
        );
    }

    #[test]
    fn sync_delay_completes_after_the_delay_and_not_before() {
        const DELAY: Duration = Duration::from_millis(50);
        let mut r = rig();
        r.set(FAIL_ARG, DELAY.as_millis() as u32);
        r.set(FAIL_INJECT, FAIL_SYNC_DELAY);
        let s = r.post_sync();
        r.post(Command::new(cmd::CMD_NOP, 0, 0, 0, 0));
        let cons = r.reg(CMDQ_CONS);
        let t0 = Instant::now();
        assert!(r.dev.process(&r.mem, 1), "fetching the SYNC is progress");
        assert!(r.dev.until_deadline().is_some());
        let mut polls = 0;
        while !r.sync_done(s) {
            assert!(t0.elapsed() < Duration::from_secs(10), "never completed");
            assert_eq!(r.reg(CMDQ_CONS), cons, "the queue behind it waits");
            assert_eq!(r.dev.take_irqs(), 0);
            std::thread::sleep(Duration::from_millis(5));
            r.dev.process(&r.mem, 64);
            polls += 1;
        }
        // The SYNC was reached after `t0`, so it completed no earlier than `t0 + DELAY`.
        assert!(
            t0.elapsed() >= DELAY && polls > 1,
            "done after {:?}",
            t0.elapsed()
        );
        r.run();
        assert_eq!(
            r.reg(CMDQ_CONS),
            queue::next(queue::next(cons, RING_LOG2), RING_LOG2)
        );
        assert_eq!(r.dev.take_irqs(), CMD_IRQ, "the interrupt arrives late too");
        assert_eq!(
            fail_events(&mut r)[1..],
            [
                ("sync_delay", "sync delayed"),
                ("sync_delay", "delayed sync completed")
            ]
        );
    }

    #[test]
    fn delayed_sync_deadline_drives_has_work() {
        let mut r = rig();
        let clock = ManualClock::new();
        r.dev.set_clock(clock.clone());
        r.set(FAIL_ARG, 50);
        r.set(FAIL_INJECT, FAIL_SYNC_DELAY);
        let s = r.post_sync();
        assert!(r.dev.has_work());
        r.run();
        assert!(!r.dev.has_work() && !r.sync_done(s));
        assert_eq!(r.dev.until_deadline(), Some(Duration::from_millis(50)));
        clock.advance(Duration::from_millis(49));
        r.run();
        assert!(!r.dev.has_work() && !r.sync_done(s));
        assert_eq!(r.dev.until_deadline(), Some(Duration::from_millis(1)));
        clock.advance(Duration::from_millis(1));
        assert!(r.dev.has_work());
        assert_eq!(
            r.dev.until_deadline(),
            None,
            "due: no longer a future deadline"
        );
        r.run();
        assert!(r.sync_done(s));
        // Each SYNC reached while armed is delayed; disarmed, none is.
        let s = r.post_sync();
        r.run();
        assert!(!r.sync_done(s));
        r.set(FAIL_INJECT, FAIL_NONE);
        clock.advance(Duration::from_millis(50));
        r.run();
        assert!(r.sync_done(s));
        let s = r.post_sync();
        r.run();
        assert!(r.sync_done(s));
    }

    #[test]
    fn delayed_sync_of_a_disabled_queue_never_completes() {
        let mut r = rig();
        let clock = ManualClock::new();
        r.dev.set_clock(clock.clone());
        r.set(FAIL_ARG, 50);
        r.set(FAIL_INJECT, FAIL_SYNC_DELAY);
        let s = r.post_sync();
        r.run();
        clock.advance(Duration::from_millis(49));
        r.run();
        assert!(!r.sync_done(s));
        // The driver gives up and disables the command queue.
        r.set(CR0, CR0_MASK & !CR0_CMDQ_EN);
        clock.advance(Duration::from_millis(10));
        assert!(!r.dev.has_work());
        r.run();
        assert_eq!(r.mem.read_u32(SYNC_WORD).unwrap(), 0, "no late write");
        assert_eq!(r.dev.take_irqs(), 0, "no late interrupt");
        assert!(fail_events(&mut r).contains(&("sync_delay", "delayed sync dropped")));
    }

    #[test]
    fn delayed_sync_waits_for_bus_mastering() {
        let mut r = rig();
        let clock = ManualClock::new();
        r.dev.set_clock(clock.clone());
        r.set(FAIL_ARG, 10);
        r.set(FAIL_INJECT, FAIL_SYNC_DELAY);
        let s = r.post_sync();
        r.run();
        r.dev.set_bus_master(false);
        clock.advance(Duration::from_millis(20));
        r.run();
        assert!(!r.sync_done(s), "no write without bus mastering");
        r.dev.set_bus_master(true);
        r.run();
        assert!(r.sync_done(s));
        assert_eq!(r.dev.take_irqs(), CMD_IRQ);
    }

    /// `(lag_us, waited)` of every `sync_done`.
    fn syncs_done(r: &mut Rig<EventLog>) -> Vec<(u32, u64)> {
        r.activity()
            .into_iter()
            .filter_map(|a| match a {
                Activity::SyncDone { lag_us, waited, .. } => Some((lag_us, waited)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn sync_lag_completes_only_after_the_lag_and_holds_the_queue() {
        const LAG: Duration = Duration::from_micros(300);
        let mut r = rig();
        let clock = ManualClock::new();
        r.dev.set_clock(clock.clone());
        r.set(SYNC_LAG, LAG.as_micros() as u32);
        assert_eq!(r.reg(SYNC_LAG), 300);
        let s = r.post_sync();
        r.post(Command::new(cmd::CMD_NOP, 0, 0, 0, 0));
        let cons = r.reg(CMDQ_CONS);
        assert!(r.dev.process(&r.mem, 1), "reaching the SYNC is progress");
        assert!(!r.dev.has_work(), "nothing to do before the deadline");
        assert_eq!(r.dev.until_deadline(), Some(LAG));
        // The lag in force when the SYNC was reached applies: rewriting it moves nothing.
        r.set(SYNC_LAG, 0);
        clock.advance(LAG - Duration::from_micros(1));
        r.run();
        assert!(!r.sync_done(s));
        assert_eq!(r.reg(CMDQ_CONS), cons, "the command after it waits");
        assert_eq!(r.dev.take_irqs(), 0, "no interrupt before the completion");
        clock.advance(Duration::from_micros(1));
        assert!(r.dev.has_work());
        r.run();
        assert!(r.sync_done(s));
        assert_eq!(
            r.reg(CMDQ_CONS),
            queue::next(queue::next(cons, RING_LOG2), RING_LOG2)
        );
        assert_eq!(r.dev.take_irqs(), CMD_IRQ);
        // Benign: no failure traced; the completion says what held it.
        assert_eq!(fail_events(&mut r), []);
        assert_eq!(syncs_done(&mut r), [(300, 0)]);
        // Off again: the next SYNC completes at once, with no lag in its trace.
        let s = r.post_sync();
        r.run();
        assert!(r.sync_done(s));
        assert_eq!(syncs_done(&mut r)[1], (0, 0));
    }

    #[test]
    fn sync_lag_is_clamped_and_reset_by_a_device_reset() {
        let mut r = rig();
        let clock = ManualClock::new();
        r.dev.set_clock(clock.clone());
        r.set(SYNC_LAG, u32::MAX);
        assert_eq!(r.reg(SYNC_LAG), SYNC_LAG_MAX, "clamped");
        r.set(SYNC_LAG, SYNC_LAG_MAX + 1);
        assert_eq!(r.reg(SYNC_LAG), SYNC_LAG_MAX, "clamped");
        let max = Duration::from_micros(u64::from(SYNC_LAG_MAX));
        let s = r.post_sync();
        r.run();
        assert_eq!(r.dev.until_deadline(), Some(max), "held for the maximum");
        clock.advance(max);
        r.run();
        assert!(r.sync_done(s));
        assert_eq!(r.reg(ERROR), 0);
        // A reset forgets the lag and the SYNC waiting on it.
        let s = r.post_sync();
        r.run();
        assert!(r.dev.s.pending_sync.is_some());
        r.dev.reset();
        assert_eq!(r.reg(SYNC_LAG), 0);
        assert_eq!(r.dev.until_deadline(), None);
        crate::testkit::program(|reg, v| r.set(reg, v), RING_LOG2);
        let s2 = r.post_sync();
        r.run();
        assert!(r.sync_done(s2.max(s)), "no lag after the reset");
    }

    #[test]
    fn sync_lag_and_sync_delay_the_later_deadline_wins() {
        for (delay_ms, lag_us, due) in [
            (2, 5000, Duration::from_millis(5)),
            (50, 300, Duration::from_millis(50)),
        ] {
            let mut r = rig();
            let clock = ManualClock::new();
            r.dev.set_clock(clock.clone());
            r.set(FAIL_ARG, delay_ms);
            r.set(FAIL_INJECT, FAIL_SYNC_DELAY);
            r.set(SYNC_LAG, lag_us);
            let s = r.post_sync();
            r.run();
            assert_eq!(
                r.dev.until_deadline(),
                Some(due),
                "{delay_ms} ms, {lag_us} us"
            );
            clock.advance(due - Duration::from_micros(1));
            r.run();
            assert!(!r.sync_done(s) && !r.dev.has_work());
            clock.advance(Duration::from_micros(1));
            assert!(r.dev.has_work());
            r.run();
            assert!(r.sync_done(s));
            // The failure mode is traced as ever; the lag is in the completion.
            assert_eq!(
                fail_events(&mut r)[1..],
                [
                    ("sync_delay", "sync delayed"),
                    ("sync_delay", "delayed sync completed")
                ]
            );
            assert_eq!(syncs_done(&mut r), [(lag_us, 0)]);
        }
    }

    #[test]
    fn sync_lag_runs_from_the_sync_reached_alongside_in_flight_dma() {
        // 16 steps per page: the job holds page 0's translation for 16 steps.
        const LAG: Duration = Duration::from_millis(1);
        let run_steps = |r: &mut Rig<EventLog>, n| {
            for _ in 0..n {
                r.dev.process(&r.mem, 1);
            }
        };
        // DMA lets go first: the SYNC still waits out its lag.
        let mut r = rig();
        let clock = ManualClock::new();
        r.dev.set_clock(clock.clone());
        r.set(SYNC_LAG, LAG.as_micros() as u32);
        let st = r.submit(fill(2 * PG));
        run_steps(&mut r, 3);
        r.post(Command::new(cmd::CMD_INV_ALL, 0, 0, 0, 0));
        let s = r.post_sync();
        run_steps(&mut r, 64);
        assert_eq!(r.status(st).status, DMA_ST_OK, "the job finished");
        assert!(!r.sync_done(s), "the lag is not over");
        clock.advance(LAG);
        r.run();
        assert!(r.sync_done(s));
        let (lag, waited) = syncs_done(&mut r)[0];
        assert_eq!(lag, 1000);
        assert!(waited > 0, "it waited for the job too");
        // The lag runs out first: the SYNC completes as soon as the job lets page 0 go.
        let mut r = rig();
        let clock = ManualClock::new();
        r.dev.set_clock(clock.clone());
        r.set(SYNC_LAG, LAG.as_micros() as u32);
        r.submit(fill(2 * PG));
        run_steps(&mut r, 3);
        r.post(Command::new(cmd::CMD_INV_ALL, 0, 0, 0, 0));
        let s = r.post_sync();
        run_steps(&mut r, 1);
        clock.advance(LAG);
        let mut steps = 0;
        while !r.sync_done(s) {
            assert!(r.dev.process(&r.mem, 1));
            steps += 1;
        }
        assert!(
            steps > 1 && steps <= 16,
            "done once page 0 is let go: {steps}"
        );
        assert_eq!(r.dev.s.job.as_ref().map(|j| j.pos() / PG), Some(1));
    }

    #[test]
    fn cmdq_error_is_one_shot_and_clearing_resumes() {
        let mut r = rig();
        r.set(FAIL_INJECT, FAIL_CMDQ_ERROR);
        let before = r.reg(CMDQ_CONS);
        let s = r.post_sync();
        r.run();
        let cons = r.reg(CMDQ_CONS);
        assert_eq!(
            cons,
            before | CONS_ERR | u32::from(CERR_INJECTED) << CONS_ERR_SHIFT,
            "CONS points at the command with the injected code"
        );
        assert_eq!(r.reg(ERROR), ERR_CMDQ);
        assert_eq!(r.reg(ERROR_INFO), before);
        assert_eq!(r.dev.take_irqs(), ERR_IRQ);
        assert!(!r.sync_done(s));
        assert_eq!(r.reg(FAIL_INJECT), FAIL_NONE, "one-shot");
        // The command was fine: clearing the error runs it.
        r.set(ERROR, ERR_CMDQ);
        r.run();
        assert!(r.sync_done(s));
        assert_eq!(r.reg(CMDQ_CONS), queue::next(before, RING_LOG2));
        let s = r.post_sync();
        r.run();
        assert!(r.sync_done(s), "no second error");
        let results: Vec<&str> = r
            .activity()
            .iter()
            .filter_map(|a| match a {
                Activity::Command { result, .. } => Some(*result),
                _ => None,
            })
            .collect();
        assert_eq!(results, ["injected", "ok", "ok"]);
        assert_eq!(
            fail_events(&mut r)[1..],
            [("cmdq_error", "command error injected")]
        );
    }

    #[test]
    fn drop_cmd_msi_writes_completions_without_the_vector() {
        let mut r = rig();
        r.set(FAIL_INJECT, FAIL_DROP_CMD_MSI);
        let s = r.post_sync();
        r.run();
        assert!(r.sync_done(s), "the SYNC word is written");
        let mut j = fill(8);
        j.flags = DMA_F_IRQ;
        assert_eq!(r.dma(j).status, DMA_ST_OK, "the job status is written");
        assert_eq!(r.dev.take_irqs(), 0, "no command vector");
        // Other vectors are not affected.
        r.dma(job(DMA_FILL, 1, 0, VA + 8 * PG, 8, 0));
        assert_eq!(r.dev.take_irqs(), EVT_IRQ);
        assert_eq!(
            fail_events(&mut r)[1..],
            [
                ("drop_cmd_msi", "command vector not raised"),
                ("drop_cmd_msi", "command vector not raised")
            ]
        );
        r.set(FAIL_INJECT, FAIL_NONE);
        let s = r.post_sync();
        r.run();
        assert!(r.sync_done(s));
        assert_eq!(r.dev.take_irqs(), CMD_IRQ);
    }

    #[test]
    fn dma_hang_stops_the_job_and_ignores_cr0() {
        let mut r = rig();
        r.set(FAIL_INJECT, FAIL_DMA_HANG);
        let st = r.submit(fill(2 * PG));
        r.run();
        assert_eq!(bursts(&mut r), 1, "one burst, then the hang");
        assert_eq!(r.status(st).status, DMA_ST_PENDING, "no completion");
        assert!(!r.dev.has_work());
        // A SYNC that must wait for the hung job's doomed translation blocks forever.
        r.post(Command::new(cmd::CMD_INV_RANGE, 0, 1, VA, PG));
        let s = r.post_sync();
        r.run();
        assert!(!r.dev.has_work() && !r.dev.process(&r.mem, 64));
        assert!(!r.sync_done(s));
        // Nor does RESUME/ABORT reach it, nor do further jobs start.
        r.submit(fill(8));
        r.run();
        assert_eq!(bursts(&mut r), 1);
        // The control path does not answer for DMA and contexts.
        r.set(CR0, CR0_MASK & !(CR0_DMAQ_EN | CR0_CTX_EN));
        assert_eq!(r.reg(CR0), CR0_MASK & !(CR0_DMAQ_EN | CR0_CTX_EN));
        assert_eq!(r.reg(CR0ACK), CR0_MASK, "disable not acknowledged");
        assert_eq!(r.reg(FAIL_INJECT), FAIL_DMA_HANG);
        // The fallback: clear bus mastering. Then nothing reaches memory any more.
        r.dev.take_irqs();
        r.dev.set_bus_master(false);
        assert!(
            r.activity().contains(&Activity::BusMaster {
                enabled: false,
                job: Some(1),
                pos: Some(256),
            }),
            "the hung job, one burst in"
        );
        r.set(CR0, CR0_MASK & !(CR0_DMAQ_EN | CR0_CTX_EN | CR0_CMDQ_EN));
        assert_eq!(r.reg(CR0ACK), CR0_EVTQ_EN | CR0_DMAQ_EN | CR0_CTX_EN);
        assert!(!r.dev.has_work() && !r.dev.process(&r.mem, 64));
        assert_eq!(r.dev.take_irqs(), 0);
        assert_eq!(
            fail_events(&mut r)[1..],
            [
                ("dma_hang", "dma engine hung"),
                ("dma_hang", "cr0 disable not acknowledged"),
                ("dma_hang", "cr0 disable not acknowledged")
            ]
        );
        // Only a reset ends it.
        r.dev.reset();
        assert_eq!((r.reg(CR0ACK), r.reg(FAIL_INJECT)), (0, FAIL_NONE));
        assert!(r.dev.s.job.is_none() && !r.dev.s.inject.hung);
    }

    #[test]
    fn dma_hang_withholds_the_completion_of_a_one_burst_job() {
        let mut r = rig();
        r.set(FAIL_INJECT, FAIL_DMA_HANG);
        let st = r.submit(fill(8));
        r.run();
        assert_eq!(bursts(&mut r), 1);
        assert_eq!(
            r.peek(r.dev_leaf(1, VA).unwrap() & pte::PTE_ADDR_MASK, 1),
            [0x5a]
        );
        assert_eq!(r.status(st).status, DMA_ST_PENDING, "hung inside the job");
        assert_eq!(r.reg(DMAQ_CONS), 0);
    }

    #[test]
    fn dma_hang_reports_no_fault_of_its_last_burst() {
        let mut r = rig();
        r.set(FAIL_INJECT, FAIL_DMA_HANG);
        let st = r.submit(job(DMA_FILL, 1, 0, VA + 8 * PG, 8, 0));
        r.run();
        assert_eq!(r.status(st).status, DMA_ST_PENDING);
        assert!(r.take_events().is_empty(), "no fault event");
        assert_eq!(r.stat(STAT_FAULTS), 0);
        assert!(r.dev.s.inject.hung);
    }

    #[test]
    fn dma_hang_catches_the_running_job_at_its_next_burst() {
        let mut r = rig();
        let st = r.submit(fill(2 * PG));
        for _ in 0..4 {
            r.dev.process(&r.mem, 1);
        }
        let before = bursts(&mut r);
        r.set(FAIL_INJECT, FAIL_DMA_HANG);
        r.run();
        assert_eq!(bursts(&mut r), before + 1);
        assert_eq!(r.status(st).status, DMA_ST_PENDING);
    }

    #[test]
    fn die_is_requested_at_the_next_burst() {
        let mut r = rig();
        r.set(FAIL_INJECT, FAIL_DIE);
        // Commands alone do not kill it.
        let s = r.post_sync();
        r.run();
        assert!(r.sync_done(s) && !r.dev.die_requested());
        let st = r.submit(fill(8));
        r.run();
        assert!(r.dev.die_requested());
        assert_eq!(bursts(&mut r), 0, "it died before the burst");
        assert_eq!(r.status(st).status, DMA_ST_PENDING);
        assert!(r.activity().contains(&Activity::FailInject {
            mode: "die",
            what: "device died",
            arg: 0,
            cmd: None,
            job: Some(1),
        }));
        // Dead: nothing more happens.
        let s = r.post_sync();
        assert!(!r.dev.has_work() && !r.dev.process(&r.mem, 64));
        assert!(!r.sync_done(s));
    }

    #[test]
    fn reset_clears_every_knob() {
        let mut r = rig();
        r.set(CMD_LAG, 3);
        r.set(SYNC_LAG, 7);
        r.set(FAIL_ARG, 1234);
        r.set(WALK_LAG, 5);
        r.set(FAULT_LAG, 6);
        r.set(IOTLB_KEEP, IOTLB_KEEP_EN);
        assert_eq!((r.reg(FAULT_LAG), r.reg(IOTLB_KEEP)), (6, IOTLB_KEEP_EN));
        r.set(PT_FREED_BASE_LO, 0x18_0000);
        r.set(PT_FREED_BASE_HI, 1);
        r.set(PT_FREED_PAGES, 9);
        r.set(FAIL_INJECT, FAIL_DMA_HANG);
        r.submit(fill(2 * PG));
        r.run();
        r.post(Command::new(cmd::CMD_INV_ALL, 0, 0, 0, 0));
        r.post_sync();
        r.run();
        assert!(r.dev.s.inject.hung && r.dev.s.pending_sync.is_some());
        r.dev.reset();
        for reg in RESET_KNOBS {
            assert_eq!(r.reg(reg), 0, "{:?}", name(reg));
        }
        assert!(!r.dev.s.iotlb.keep(), "the IOTLB evicts again");
        assert_eq!(r.dev.s.inject.fault_lag, 0);
        assert!(!r.dev.s.inject.hung && r.dev.s.pending_sync.is_none());
        assert_eq!(r.dev.until_deadline(), None);
        // A fresh bring-up works.
        crate::testkit::program(|reg, v| r.set(reg, v), RING_LOG2);
        assert_eq!(r.dma(fill(8)).status, DMA_ST_OK);
        let s = r.post_sync();
        r.run();
        assert!(r.sync_done(s));
    }

    /// WALK_LAG_IN_STEP: the lag also runs once per step, between the judgement before the
    /// access and the copy, and the flag reads back.
    #[test]
    fn walk_lag_in_step_waits_once_in_every_step() {
        let mut r = rig();
        let clock = ManualClock::new();
        r.dev.set_clock(clock.clone());
        // Cache the translation first: the job below walks nothing.
        assert_eq!(r.dma(fill(8)).status, DMA_ST_OK);
        r.set(WALK_LAG, WALK_LAG_IN_STEP | (WALK_LAG_MAX + 1));
        assert_eq!(
            r.reg(WALK_LAG),
            WALK_LAG_IN_STEP | WALK_LAG_MAX,
            "flag kept, lag clamped"
        );
        r.set(WALK_LAG, WALK_LAG_IN_STEP | 300);
        // The step is judged, then waits for its deadline without sleeping (the guest's
        // register accesses get in meanwhile).
        let st = r.submit(fill(8));
        r.run();
        assert_eq!(r.status(st).status, 0, "not done before the deadline");
        assert_eq!(r.dev.until_deadline(), Some(Duration::from_micros(300)));
        clock.advance(Duration::from_micros(299));
        r.run();
        assert_eq!(r.status(st).status, 0, "not done before the deadline");
        clock.advance(Duration::from_micros(1));
        r.run();
        assert_eq!(r.status(st).status, DMA_ST_OK);
        assert!(clock.sleeps().is_empty(), "a deadline, not a sleep");
        r.set(WALK_LAG, 300);
        assert_eq!(
            r.dma(fill(8)).status,
            DMA_ST_OK,
            "without the flag, no wait in a step"
        );
    }

    #[test]
    fn walk_lag_sleeps_before_each_level_and_is_clamped() {
        let mut r = rig();
        let clock = ManualClock::new();
        r.dev.set_clock(clock.clone());
        assert_eq!(r.dma(fill(8)).status, DMA_ST_OK);
        assert!(clock.sleeps().is_empty(), "no lag by default");
        r.set(WALK_LAG, WALK_LAG_MAX + 1);
        assert_eq!(r.reg(WALK_LAG), WALK_LAG_MAX, "clamped");
        r.set(WALK_LAG, 300);
        // One walk (the second page misses the IOTLB).
        assert_eq!(r.dma(job(DMA_FILL, 1, 0, VA + PG, 8, 1)).status, DMA_ST_OK);
        assert_eq!(
            clock.sleeps(),
            vec![Duration::from_micros(300); pte::PT_LEVELS as usize]
        );
        // A lagged walk ends the processing slice: the worker lets register accesses in.
        r.post(Command::new(cmd::CMD_INV_ALL, 0, 0, 0, 0));
        r.run();
        let walks = r.stat(STAT_WALKS);
        let st = r.submit(fill(2 * PG));
        assert!(r.dev.process(&r.mem, 64));
        assert_eq!(r.stat(STAT_WALKS), walks + 1, "one walk per slice");
        assert_eq!(r.status(st).status, DMA_ST_PENDING);
        r.run();
        assert_eq!(r.stat(STAT_WALKS), walks + 2);
        assert_eq!(r.status(st).status, DMA_ST_OK);
    }

    /// Guest memory that timestamps reads of the device page tables and can rewrite a table
    /// right after a given one of those reads (the driver racing the walker).
    struct Racing<'a> {
        mem: &'a VecMem,
        tables: std::ops::Range<u64>,
        reads: RefCell<Vec<(u64, Instant)>>,
        /// After this many table reads, write `.1` at `.0`.
        rewrite: Option<(usize, u64, u64)>,
    }

    impl GuestMem for Racing<'_> {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.mem.read(gpa, buf)?;
            if self.tables.contains(&gpa) {
                let mut reads = self.reads.borrow_mut();
                reads.push((gpa, Instant::now()));
                if let Some((_, at, v)) = self.rewrite.filter(|r| r.0 == reads.len()) {
                    self.mem.write_u64(at, v)?;
                }
            }
            Ok(())
        }

        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
            self.mem.write(gpa, buf)
        }

        fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
            self.mem.fetch_or_u64(gpa, bits)
        }
    }

    /// Entry addresses on the device page-table path of `va`, root first.
    fn path(r: &Rig<EventLog>, asid: u32, va: u64) -> Vec<u64> {
        let mut table = r.ctx(asid).pt_root;
        let mut out = vec![];
        for level in (1..=pte::PT_LEVELS).rev() {
            let gpa = table + 8 * pte::pt_index(va, level) as u64;
            out.push(gpa);
            table = r.mem.read_u64(gpa).unwrap() & pte::PTE_ADDR_MASK;
        }
        out
    }

    #[test]
    fn walk_lag_paces_a_walk_level_by_level() {
        const LAG: Duration = Duration::from_millis(3);
        let mut r = rig();
        r.set(WALK_LAG, LAG.as_micros() as u32);
        r.submit(fill(8));
        let racing = Racing {
            mem: &r.mem,
            tables: crate::testkit::DEV_PT..crate::testkit::CPU_PT,
            reads: RefCell::new(vec![]),
            rewrite: None,
        };
        let t0 = Instant::now();
        while r.dev.process(&racing, 64) {}
        let elapsed = t0.elapsed();
        let reads = racing.reads.into_inner();
        let levels = pte::PT_LEVELS as usize;
        assert!(elapsed >= LAG * levels as u32, "{elapsed:?}");
        let addrs: Vec<u64> = reads.iter().map(|&(a, _)| a).collect();
        assert_eq!(addrs, path(&r, 1, VA), "root to leaf, each level once");
        for w in reads.windows(2) {
            assert!(w[1].1 - w[0].1 >= LAG, "a lag between two levels");
        }
        assert!(reads[0].1 - t0 >= LAG, "and before the root");
    }

    #[test]
    fn walker_reads_a_table_rewritten_between_two_levels() {
        let mut r = rig();
        r.set(WALK_LAG, 1);
        let old = r.dev_leaf(1, VA).unwrap() & pte::PTE_ADDR_MASK;
        let other = r.frame();
        let p = path(&r, 1, VA);
        let st = r.submit(fill(8));
        // Bug model: the driver freed the level-1 table and the page was reused while the walker
        // was between the level-2 entry and the table it points to.
        let racing = Racing {
            mem: &r.mem,
            tables: crate::testkit::DEV_PT..crate::testkit::CPU_PT,
            reads: RefCell::new(vec![]),
            rewrite: Some((3, p[3], other | pte::PTE_P | pte::PTE_W)),
        };
        while r.dev.process(&racing, 64) {}
        assert_eq!(r.status(st).status, DMA_ST_OK);
        assert_eq!(r.peek(other, 1), [0x5a], "the walker used the reused page");
        assert_eq!(r.peek(old, 1), [0], "not the page the table held before");
        assert_eq!(
            r.stat(STAT_VIOLATIONS),
            1,
            "the validator catches the device writing a page the CPU does not map there"
        );
    }
    /// Guest memory that stamps, with `now`, every read of the device page tables (the walker)
    /// and every write of a fault report (an event, a DMA status record).
    struct Stamped<'a> {
        mem: &'a VecMem,
        now: Box<dyn Fn() -> Instant + 'a>,
        table_reads: RefCell<Vec<Instant>>,
        /// (what was written, when): [`EVTQ`] or [`STATUS`].
        reports: RefCell<Vec<(u64, Instant)>>,
    }

    impl<'a> Stamped<'a> {
        fn new(mem: &'a VecMem, now: impl Fn() -> Instant + 'a) -> Self {
            Self {
                mem,
                now: Box::new(now),
                table_reads: RefCell::new(vec![]),
                reports: RefCell::new(vec![]),
            }
        }

        /// The time of the last table read, and every report after it, as offsets from it.
        fn after_last_walk(&self) -> Vec<(u64, Duration)> {
            let walked = *self.table_reads.borrow().last().expect("a walk");
            self.reports
                .borrow()
                .iter()
                .map(|&(what, t)| (what, t - walked))
                .collect()
        }
    }

    impl GuestMem for Stamped<'_> {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            if (crate::testkit::DEV_PT..crate::testkit::CPU_PT).contains(&gpa) {
                self.table_reads.borrow_mut().push((self.now)());
            }
            self.mem.read(gpa, buf)
        }

        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
            let ring = EVTQ..EVTQ + (shared_regs::event::EVT_SIZE << RING_LOG2) as u64;
            let what = if ring.contains(&gpa) {
                Some(EVTQ)
            } else if (STATUS..STATUS + 0x1_0000).contains(&gpa) {
                Some(STATUS)
            } else {
                None
            };
            if let Some(what) = what {
                self.reports.borrow_mut().push((what, (self.now)()));
            }
            self.mem.write(gpa, buf)
        }

        fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
            self.mem.fetch_or_u64(gpa, bits)
        }
    }

    /// A job whose first page is not mapped (a not-present fault at its first step).
    fn faulting(stall: bool) -> shared_regs::dma::DmaJob {
        let mut j = job(DMA_FILL, 1, 0, VA + 8 * PG, 8, 0);
        if stall {
            j.flags = DMA_F_STALL;
        }
        j
    }

    #[test]
    fn fault_lag_reports_the_fault_only_after_the_lag() {
        const LAG: Duration = Duration::from_micros(700);
        for stall in [true, false] {
            let mut r = rig();
            let clock = ManualClock::new();
            r.dev.set_clock(clock.clone());
            r.set(FAULT_LAG, LAG.as_micros() as u32);
            assert_eq!(r.reg(FAULT_LAG), 700);
            let st = r.submit(faulting(stall));
            let c = clock.clone();
            let mem = Stamped::new(&r.mem, move || c.now());
            while r.dev.process(&mem, 64) {}
            // The manual clock moves only when the device sleeps: one sleep, of the lag, and
            // everything the fault reports is written after it.
            assert_eq!(clock.sleeps(), [LAG], "stall {stall}");
            let reports = mem.after_last_walk();
            drop(mem);
            let want: &[(u64, Duration)] = if stall {
                &[(EVTQ, LAG)]
            } else {
                &[(EVTQ, LAG), (STATUS, LAG)]
            };
            assert_eq!(reports, want, "stall {stall}");
            let evs = r.take_events();
            assert_eq!(evs.len(), 1);
            assert_eq!(
                (
                    evs[0].reason,
                    evs[0].flags & shared_regs::event::EVT_F_STALLED != 0
                ),
                (shared_regs::event::FAULT_NOT_PRESENT, stall)
            );
            assert_eq!(r.stat(STAT_FAULTS), 1);
            let job = r.dev.s.job.as_ref();
            if stall {
                assert!(job.is_some_and(|j| j.is_stalled()), "stalled after the lag");
                assert_eq!(r.status(st).status, DMA_ST_PENDING);
            } else {
                assert!(job.is_none());
                assert_eq!(r.status(st).status, DMA_ST_FAULT);
            }
        }
    }

    #[test]
    fn fault_lag_is_clamped_and_zero_does_not_wait() {
        let mut r = rig();
        let clock = ManualClock::new();
        r.dev.set_clock(clock.clone());
        // Zero (the reset value): the fault is reported without a sleep.
        assert_eq!(r.reg(FAULT_LAG), 0);
        assert_eq!(r.dma(faulting(false)).status, DMA_ST_FAULT);
        assert!(clock.sleeps().is_empty(), "no lag by default");
        assert_eq!(r.take_events().len(), 1);
        // Larger than the maximum: stored, read back and slept as the maximum.
        r.set(FAULT_LAG, u32::MAX);
        assert_eq!(r.reg(FAULT_LAG), FAULT_LAG_MAX, "clamped");
        r.set(FAULT_LAG, FAULT_LAG_MAX + 1);
        assert_eq!(r.reg(FAULT_LAG), FAULT_LAG_MAX, "clamped");
        assert_eq!(r.reg(ERROR), 0, "silently");
        assert_eq!(r.dma(faulting(false)).status, DMA_ST_FAULT);
        let max = Duration::from_micros(u64::from(FAULT_LAG_MAX));
        assert_eq!(clock.sleeps(), [max]);
        // A job that does not fault does not wait.
        assert_eq!(r.dma(fill(8)).status, DMA_ST_OK);
        assert_eq!(clock.sleeps(), [max]);
        // Back to zero.
        r.set(FAULT_LAG, 0);
        assert_eq!(r.dma(faulting(false)).status, DMA_ST_FAULT);
        assert_eq!(clock.sleeps(), [max]);
        assert_eq!(r.stat(STAT_FAULTS), 3);
    }

    #[test]
    fn a_lagged_fault_ends_the_processing_slice() {
        for lag in [0, 1] {
            let mut r = rig();
            r.dev.set_clock(ManualClock::new());
            r.set(FAULT_LAG, lag);
            r.submit(faulting(false));
            let second = r.submit(fill(8));
            assert!(r.dev.process(&r.mem, 64));
            // With a lag the worker lets register accesses in right after the fault, before
            // it fetches the next job; without one it goes on.
            let want = if lag == 0 { DMA_ST_OK } else { DMA_ST_PENDING };
            assert_eq!(r.status(second).status, want, "lag {lag}");
            assert_eq!(r.stat(STAT_FAULTS), 1);
            r.run();
            assert_eq!(r.status(second).status, DMA_ST_OK);
        }
    }

    #[test]
    fn fault_lag_waits_on_the_real_clock() {
        const LAG: Duration = Duration::from_millis(3);
        let mut r = rig();
        r.set(FAULT_LAG, LAG.as_micros() as u32);
        r.submit(faulting(true));
        let mem = Stamped::new(&r.mem, Instant::now);
        while r.dev.process(&mem, 64) {}
        let reports = mem.after_last_walk();
        assert_eq!(reports.len(), 1);
        assert!(reports[0].1 >= LAG, "event after {:?}", reports[0].1);
    }

    /// Four IOTLB entries, 4 KiB steps; ASID 1 maps 8 pages at [`VA`] (their frames returned).
    fn small_iotlb() -> (Rig<EventLog>, Vec<u64>) {
        let cfg = DeviceConfig {
            iotlb_entries: 4,
            ..DeviceConfig::default()
        };
        let mut r = Rig::new(cfg, EventLog::default());
        r.bind(1, 0);
        let frames = (0..8).map(|i| r.map_page(1, VA + i * PG)).collect();
        (r, frames)
    }

    fn evicted(r: &mut Rig<EventLog>) -> usize {
        r.activity()
            .iter()
            .filter(|a| matches!(a, Activity::IotlbEvict { .. }))
            .count()
    }

    #[test]
    fn iotlb_keep_reads_back_bit_0_only() {
        let mut r = rig();
        assert_eq!(r.reg(IOTLB_KEEP), 0);
        r.set(IOTLB_KEEP, u32::MAX);
        assert_eq!(r.reg(IOTLB_KEEP), IOTLB_KEEP_EN, "reserved bits read as 0");
        assert!(r.dev.s.iotlb.keep());
        r.set(IOTLB_KEEP, !IOTLB_KEEP_EN);
        assert_eq!(r.reg(IOTLB_KEEP), 0, "reserved bits alone set nothing");
        assert!(!r.dev.s.iotlb.keep());
        r.set(IOTLB_KEEP, IOTLB_KEEP_EN);
        assert_eq!(r.reg(IOTLB_KEEP), IOTLB_KEEP_EN);
        assert_eq!(r.reg(ERROR), 0, "writing reserved bits is no error");
    }

    #[test]
    fn iotlb_keep_evicts_nothing_and_uses_new_translations_uncached() {
        let (mut r, frames) = small_iotlb();
        r.set(IOTLB_KEEP, IOTLB_KEEP_EN);
        // Fill the IOTLB: pages 0-3.
        let st = r.dma(job(DMA_FILL, 1, 0, VA, 4 * PG, 0x1111_1111_1111_1111));
        assert_eq!(st.status, DMA_ST_OK);
        assert_eq!(r.dev.s.iotlb.len(), 4);
        // Pages 4-7 through a full IOTLB: written with the right data, never cached.
        let st = r.dma(job(
            DMA_FILL,
            1,
            0,
            VA + 4 * PG,
            4 * PG,
            0x2222_2222_2222_2222,
        ));
        assert_eq!((st.status, st.bytes_done), (DMA_ST_OK, 4 * PG));
        for &f in &frames[4..] {
            assert!(r.peek(f, PG as usize).iter().all(|&b| b == 0x22));
        }
        assert_eq!(r.stat(STAT_IOTLB_EVICTIONS), 0);
        assert_eq!(evicted(&mut r), 0);
        assert_eq!(r.stat(STAT_IOTLB_NOT_CACHED), 4);
        assert!((4..8).all(|i| r.dev.s.iotlb.peek(1, VA + i * PG).is_none()));
        // The old entries still hit: reading pages 0-3 walks nothing.
        let (hits, walks) = (r.stat(STAT_IOTLB_HITS), r.stat(STAT_WALKS));
        let st = r.dma(job(DMA_CHECKSUM, 1, VA, 0, 4 * PG, 0));
        assert_eq!(st.status, DMA_ST_OK);
        assert_eq!(
            st.result,
            shared_regs::dma::fnv1a64(FNV, &[0x11; 4 * PG as usize])
        );
        assert_eq!(r.stat(STAT_IOTLB_HITS), hits + 4);
        assert_eq!(r.stat(STAT_WALKS), walks);
        // The uncached ones walk again each time.
        let st = r.dma(job(DMA_CHECKSUM, 1, VA + 4 * PG, 0, PG, 0));
        assert_eq!(
            st.result,
            shared_regs::dma::fnv1a64(FNV, &[0x22; PG as usize])
        );
        assert_eq!(r.stat(STAT_WALKS), walks + 1);
        assert_eq!(r.stat(STAT_IOTLB_NOT_CACHED), 5);
        // A range invalidation still drops a cached entry, and the room it leaves is filled.
        r.shootdown(1, VA + PG, PG);
        assert_eq!(r.stat(STAT_IOTLB_INVALIDATED), 1);
        assert!(r.dev.s.iotlb.peek(1, VA + PG).is_none());
        assert_eq!(
            r.dma(job(DMA_FILL, 1, 0, VA + 5 * PG, 8, 3)).status,
            DMA_ST_OK
        );
        assert!(
            r.dev.s.iotlb.peek(1, VA + 5 * PG).is_some(),
            "cached in the hole"
        );
        assert_eq!(r.stat(STAT_IOTLB_NOT_CACHED), 5);
        // Bit clear: a full IOTLB evicts as before.
        r.set(IOTLB_KEEP, 0);
        assert_eq!(
            r.dma(job(DMA_FILL, 1, 0, VA + 6 * PG, 8, 4)).status,
            DMA_ST_OK
        );
        assert_eq!(r.stat(STAT_IOTLB_EVICTIONS), 1);
        assert_eq!(evicted(&mut r), 1);
        assert!(r.dev.s.iotlb.peek(1, VA + 6 * PG).is_some());
        assert_eq!(r.stat(STAT_IOTLB_NOT_CACHED), 5);
        assert_eq!(r.stat(STAT_VIOLATIONS), 0);
    }

    /// The driver bug IOTLB_KEEP is for: a page unmapped (device and CPU PTE cleared) without
    /// an invalidation. Returns the status of a later DMA to it and the violation events.
    fn missed_invalidation(keep: bool) -> (shared_regs::dma::DmaStatus, Vec<(u16, u64, u64)>) {
        let (mut r, frames) = small_iotlb();
        if keep {
            r.set(IOTLB_KEEP, IOTLB_KEEP_EN);
        }
        assert_eq!(r.dma(job(DMA_FILL, 1, 0, VA, 8, 1)).status, DMA_ST_OK);
        // More pages than the IOTLB holds: without the knob they push VA's entry out.
        assert_eq!(
            r.dma(job(DMA_FILL, 1, 0, VA + PG, 7 * PG, 2)).status,
            DMA_ST_OK
        );
        // Bug: munmap cleared both PTEs, the driver sent no INV_RANGE.
        assert!(r.dev_unmap(1, VA));
        r.cpu_unmap(1, VA);
        let st = r.dma(job(DMA_FILL, 1, 0, VA, 8, 3));
        assert_eq!(
            r.peek(frames[0], 1),
            [if st.status == DMA_ST_OK { 3 } else { 1 }]
        );
        let v = r
            .take_events()
            .into_iter()
            .filter(|e| e.ty == shared_regs::event::EVT_VIOLATION)
            .map(|e| (e.reason, e.info, e.info2))
            .collect();
        assert_eq!(r.stat(STAT_VIOLATIONS), if keep { 1 } else { 0 });
        (st, v)
    }

    #[test]
    fn iotlb_keep_turns_a_missed_invalidation_into_a_stale_violation() {
        use shared_regs::event::{FAULT_NOT_PRESENT, NO_PA, VIOL_STALE};
        // Without the knob, eviction hides the bug: the device walks again and faults.
        let (st, v) = missed_invalidation(false);
        assert_eq!(
            (st.status, st.fault_reason),
            (DMA_ST_FAULT, FAULT_NOT_PRESENT)
        );
        assert!(v.is_empty());
        // With it, the stale entry is still cached and used: the validator flags the write to
        // a page the CPU no longer maps.
        let (st, v) = missed_invalidation(true);
        assert_eq!(
            st.status, DMA_ST_OK,
            "hardware writes through the stale entry"
        );
        let frame = crate::testkit::FRAMES;
        assert_eq!(v, [(VIOL_STALE, frame, NO_PA)]);
    }

    /// Where the table-lifetime tests put the freed-table bitmap (between `AUX` and `DEV_PT`).
    const BITMAP: u64 = crate::testkit::AUX + crate::testkit::AUX_SIZE;
    const _: () = assert!(
        BITMAP + crate::testkit::RAM_SIZE / PG / 8 <= crate::testkit::DEV_PT,
        "the bitmap covers all RAM without touching the tables"
    );

    /// Sets or clears the table page `table`'s bit in the bitmap at `base`, as the driver does.
    fn mark(mem: &impl GuestMem, base: u64, table: u64, freed: bool) {
        let page = table / PG;
        let mut b = [0u8; 1];
        mem.read(base + page / 8, &mut b).unwrap();
        let bit = 1u8 << (page % 8);
        b[0] = if freed { b[0] | bit } else { b[0] & !bit };
        mem.write(base + page / 8, &b).unwrap();
    }

    /// The rig with the table-lifetime check on over all RAM, and the four table pages of
    /// `VA`'s walk, root first.
    fn checked_rig() -> (Rig<EventLog>, Vec<u64>) {
        let mut r = rig();
        r.set(PT_FREED_BASE_LO, BITMAP as u32);
        r.set(PT_FREED_BASE_HI, 0);
        r.set(PT_FREED_PAGES, (crate::testkit::RAM_SIZE / PG) as u32);
        let tables = path(&r, 1, VA).iter().map(|&g| g & !(PG - 1)).collect();
        (r, tables)
    }

    /// `(reason, asid, va, info, info2)` of the violation events written so far.
    fn violations(r: &mut Rig<EventLog>) -> Vec<(u16, u32, u64, u64, u64)> {
        r.take_events()
            .into_iter()
            .filter(|e| e.ty == shared_regs::event::EVT_VIOLATION)
            .map(|e| (e.reason, e.asid, e.va, e.info, e.info2))
            .collect()
    }

    #[test]
    fn pt_freed_registers_read_back_and_refuse_a_misaligned_base() {
        let mut r = rig();
        for reg in [PT_FREED_BASE_LO, PT_FREED_BASE_HI, PT_FREED_PAGES] {
            assert_eq!(r.reg(reg), 0, "{:?}", name(reg));
        }
        r.set(PT_FREED_BASE_LO, 0x18_0008);
        r.set(PT_FREED_BASE_HI, 0xdead_beef);
        r.set(PT_FREED_PAGES, u32::MAX);
        assert_eq!(
            (
                r.reg(PT_FREED_BASE_LO),
                r.reg(PT_FREED_BASE_HI),
                r.reg(PT_FREED_PAGES)
            ),
            (0x18_0008, 0xdead_beef, u32::MAX)
        );
        assert_eq!(r.reg(ERROR), 0);
        // Misaligned: refused with ERR_CONFIG, the register keeps its value.
        for bad in [0x18_0001, 0x18_0004, 0xffff_ffff] {
            r.set(PT_FREED_BASE_LO, bad);
            assert_eq!(r.reg(PT_FREED_BASE_LO), 0x18_0008, "{bad:#x}");
            assert_eq!(r.reg(ERROR) & ERR_CONFIG, ERR_CONFIG);
            assert_eq!(r.reg(ERROR_INFO), PT_FREED_BASE_LO);
            r.set(ERROR, ERR_CONFIG);
        }
        // The high half and the page count take any value.
        r.set(PT_FREED_BASE_HI, 7);
        r.set(PT_FREED_PAGES, 1);
        assert_eq!(r.reg(ERROR), 0);
        assert_eq!((r.reg(PT_FREED_BASE_HI), r.reg(PT_FREED_PAGES)), (7, 1));
        // The RESET register (as an FLR) zeroes them.
        r.set(RESET, RESET_KEY);
        for reg in [PT_FREED_BASE_LO, PT_FREED_BASE_HI, PT_FREED_PAGES] {
            assert_eq!(r.reg(reg), 0, "{:?}", name(reg));
        }
    }

    #[test]
    fn a_walk_through_a_freed_table_reports_one_violation_per_table_read() {
        use shared_regs::event::{EVT_F_WRITE, NO_PA, VIOL_TABLE_FREED};
        for level in (1..=pte::PT_LEVELS).rev() {
            let (mut r, tables) = checked_rig();
            let table = tables[(pte::PT_LEVELS - level) as usize];
            mark(&r.mem, BITMAP, table, true);
            let frame = r.dev_leaf(1, VA).unwrap() & pte::PTE_ADDR_MASK;
            // Reported, and the walk goes on: the job completes as it would without the check.
            assert_eq!(r.dma(fill(8)).status, DMA_ST_OK, "level {level}");
            assert_eq!(r.peek(frame, 1), [0x5a]);
            assert_eq!(
                violations(&mut r),
                [(VIOL_TABLE_FREED, 1, VA, table, NO_PA)],
                "level {level}"
            );
            assert_eq!(r.stat(STAT_VIOLATIONS), 1);
            let traced: Vec<_> = r
                .activity()
                .into_iter()
                .filter_map(|a| match a {
                    Activity::Violation {
                        asid,
                        va,
                        pa,
                        cpu_pa,
                        write,
                        result,
                        ..
                    } => Some((asid, va, pa, cpu_pa, write, result)),
                    _ => None,
                })
                .collect();
            assert_eq!(traced, [(1, VA, table, None, true, "table_freed")]);
            // The cached translation is not walked again: no further report.
            assert_eq!(r.dma(fill(8)).status, DMA_ST_OK);
            assert!(violations(&mut r).is_empty());
        }
        // Every table of the path freed: one report per table read, root first; the event
        // carries the access's write flag.
        let (mut r, tables) = checked_rig();
        for &t in &tables {
            mark(&r.mem, BITMAP, t, true);
        }
        assert_eq!(r.dma(fill(8)).status, DMA_ST_OK);
        let evs: Vec<_> = r
            .take_events()
            .into_iter()
            .map(|e| (e.reason, e.flags, e.info))
            .collect();
        let want: Vec<_> = tables
            .iter()
            .map(|&t| (VIOL_TABLE_FREED, EVT_F_WRITE, t))
            .collect();
        assert_eq!(evs, want);
        assert_eq!(r.stat(STAT_VIOLATIONS), 4);
        assert_eq!(r.dev.s.inject.tables_freed, 4);
    }

    #[test]
    fn a_faulting_walk_through_a_freed_table_reports_it_before_the_fault() {
        use shared_regs::event::{EVT_FAULT, FAULT_NOT_PRESENT, VIOL_TABLE_FREED};
        let (mut r, tables) = checked_rig();
        mark(&r.mem, BITMAP, tables[3], true);
        // The leaf is gone: the walk reads the (freed) level-1 table and faults there.
        assert!(r.dev_unmap(1, VA));
        let st = r.submit(job(DMA_FILL, 1, 0, VA, 8, 1));
        r.run();
        let evs: Vec<_> = r
            .take_events()
            .into_iter()
            .map(|e| (e.ty, e.reason, e.va))
            .collect();
        assert_eq!(
            evs,
            [
                (shared_regs::event::EVT_VIOLATION, VIOL_TABLE_FREED, VA),
                (EVT_FAULT, FAULT_NOT_PRESENT, VA)
            ],
            "the fault the walk would take anyway, after the report"
        );
        let st = r.status(st);
        assert_eq!(
            (st.status, st.fault_reason),
            (DMA_ST_FAULT, FAULT_NOT_PRESENT),
            "the job fails as it would without the check"
        );
        assert_eq!(r.stat(STAT_FAULTS), 1);
    }

    #[test]
    fn no_report_for_a_clear_bit_an_uncovered_page_or_the_check_off() {
        use shared_regs::event::VIOL_TABLE_FREED;
        let leaf_page = |tables: &[u64]| (tables[3] / PG) as u32;
        // Bits of the other pages set, the walked tables' clear.
        let (mut r, tables) = checked_rig();
        r.poke(
            BITMAP,
            &vec![0xff; (crate::testkit::RAM_SIZE / PG / 8) as usize],
        );
        for &t in &tables {
            mark(&r.mem, BITMAP, t, false);
        }
        assert_eq!(r.dma(fill(8)).status, DMA_ST_OK);
        assert!(violations(&mut r).is_empty());
        // The check off (PT_FREED_PAGES = 0) with every bit set.
        let (mut r, tables) = checked_rig();
        r.poke(
            BITMAP,
            &vec![0xff; (crate::testkit::RAM_SIZE / PG / 8) as usize],
        );
        r.set(PT_FREED_PAGES, 0);
        assert_eq!(r.dma(fill(8)).status, DMA_ST_OK);
        assert!(violations(&mut r).is_empty());
        // Only the level-1 table marked, and the bitmap ends right before its page; then right
        // after it.
        for (pages, want) in [(leaf_page(&tables), 0), (leaf_page(&tables) + 1, 1)] {
            let (mut r, tables) = checked_rig();
            mark(&r.mem, BITMAP, tables[3], true);
            r.set(PT_FREED_PAGES, pages);
            assert_eq!(r.dma(fill(8)).status, DMA_ST_OK);
            let v = violations(&mut r);
            assert_eq!(v.len(), want, "PT_FREED_PAGES {pages}");
            assert!(v
                .iter()
                .all(|e| e.0 == VIOL_TABLE_FREED && e.3 == tables[3]));
        }
        // A bitmap outside guest RAM reads as "nothing freed": no report, no fault.
        let (mut r, _) = checked_rig();
        r.set(PT_FREED_BASE_LO, (crate::testkit::RAM_SIZE - 8) as u32);
        r.set(PT_FREED_PAGES, u32::MAX);
        assert_eq!(r.dma(fill(8)).status, DMA_ST_OK);
        r.set(PT_FREED_BASE_HI, u32::MAX);
        r.set(PT_FREED_BASE_LO, 0xffff_fff8);
        assert_eq!(r.dma(fill(8)).status, DMA_ST_OK);
        assert!(violations(&mut r).is_empty());
        assert_eq!(r.stat(STAT_VIOLATIONS), 0);
    }

    /// Guest memory where the driver flips a bit of the freed-table bitmap while the walker
    /// sleeps its `n`th `WALK_LAG` (it lands before any access that follows that sleep): the
    /// driver's plain memory write racing the walker, no MMIO, no device lock.
    struct FlipDuringSleep<'a> {
        mem: &'a VecMem,
        clock: ManualClock,
        /// (sleep number, table page, freed).
        flip: (usize, u64, bool),
        done: std::cell::Cell<bool>,
    }

    impl FlipDuringSleep<'_> {
        fn land(&self) {
            let (n, table, freed) = self.flip;
            if !self.done.get() && self.clock.sleeps().len() >= n {
                self.done.set(true);
                mark(self.mem, BITMAP, table, freed);
            }
        }
    }

    impl GuestMem for FlipDuringSleep<'_> {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.land();
            self.mem.read(gpa, buf)
        }

        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
            self.land();
            self.mem.write(gpa, buf)
        }

        fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
            self.land();
            self.mem.fetch_or_u64(gpa, bits)
        }
    }

    #[test]
    fn a_table_freed_mid_walk_is_caught_at_its_read() {
        use shared_regs::event::{NO_PA, VIOL_TABLE_FREED};
        // Sleep 4 is the one before the level-1 table read: the level-2 entry pointing at the
        // table was already read when the driver frees it.
        let run = |n: usize, initially: bool, freed: bool| {
            let (mut r, tables) = checked_rig();
            let clock = ManualClock::new();
            r.dev.set_clock(clock.clone());
            r.set(WALK_LAG, 50);
            mark(&r.mem, BITMAP, tables[3], initially);
            let st = r.submit(fill(8));
            let mem = FlipDuringSleep {
                mem: &r.mem,
                clock: clock.clone(),
                flip: (n, tables[3], freed),
                done: std::cell::Cell::new(false),
            };
            while r.dev.process(&mem, 64) {}
            assert_eq!(
                mem.done.get(),
                n <= pte::PT_LEVELS as usize,
                "the flip landed"
            );
            assert_eq!(
                clock.sleeps(),
                vec![Duration::from_micros(50); pte::PT_LEVELS as usize]
            );
            assert_eq!(r.status(st).status, DMA_ST_OK);
            (violations(&mut r), tables[3])
        };
        // Freed while the walker sleeps before the level-1 read: seen at that read.
        let (v, table) = run(4, false, true);
        assert_eq!(v, [(VIOL_TABLE_FREED, 1, VA, table, NO_PA)]);
        // Freed earlier in the walk (before the level-2 read): still only the level-1 read.
        let (v, _) = run(3, false, true);
        assert_eq!(v.len(), 1);
        // Reallocated (bit cleared) while the walker sleeps before the level-1 read: not
        // reported, so the bit is not read once at the start of the walk and kept.
        let (v, _) = run(4, true, false);
        assert!(v.is_empty(), "{v:?}");
        // Not cleared during the walk (the flip waits for a fifth sleep, which never comes):
        // reported.
        let (v, _) = run(5, true, false);
        assert_eq!(v.len(), 1);
    }
}
