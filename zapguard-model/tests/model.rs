//! Model-based property tests of the device.
//!
//! Random interleavings of driver and kernel operations are applied twice: to the device,
//! through `testkit::Rig` (registers, rings and page tables in guest memory, exactly as the
//! kernel module drives it), and to [`Model`], a small reference written here from the ABI
//! documentation (`shared_regs::{cmd, dma, event, pte}`) and DESIGN.md's validator rules.
//!
//! The operations: a correct populate, a correct shootdown (device PTE first, INV_RANGE + SYNC,
//! then the CPU PTE), the same CPU change with the shootdown missing (the driver bug the
//! validator exists for), DMA jobs run to completion, INV_ALL + SYNC, and jobs interrupted after
//! a few bursts by a shootdown, a missed shootdown, an invalidation or a bare SYNC.
//!
//! After every operation the test compares, exactly: every job's status record (status, fault
//! reason, faults, bytes done, checksum), the event queue (faults and violations, in order, with
//! reason, VA, device PA and CPU PA), the statistics (violations, faults, SYNCs, commands, jobs,
//! walks, IOTLB hits/misses; no eviction), the contents of every data frame (so each byte lands
//! in, or is read from, the frame the model predicts), the device leaves (frame, W, and the D bit
//! the device sets), and the SYNC completion word after every single-burst step while a SYNC is
//! pending. No event may ever be a ledger violation. A second property restricted to a correct
//! driver requires zero violations.
//!
//! `PROPTEST_CASES` overrides the case count (default 256, about a second in a debug build);
//! `PROPTEST_RNG_SEED` fixes the seed.
//! A failure prints the shrunk operation list.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use shared_regs::cmd::{self, Command};
use shared_regs::dma::*;
use shared_regs::event::{self as ev, Event as Evt};
use shared_regs::pte;
use shared_regs::regs::*;
use zapguard_model::testkit::{job, Rig, SYNC_WORD};
use zapguard_model::x86pt::{CpuFlags, X86_D, X86_RW};
use zapguard_model::{DeviceConfig, NoEvents};

/// Base of the VA window; page `p` of the window is `VA_BASE + p * PG`, in either ASID.
const VA_BASE: u64 = 0x7f00_0000_0000;
const PG: u64 = pte::PAGE_SIZE;
/// Pages of the window ops pick from. Jobs may run up to three pages past it (never mapped).
const WINDOW: u64 = 8;
/// Pages the DMA engine may touch (window plus overrun), for the device-leaf comparison.
const REACH: u64 = WINDOW + 3;
/// Pages mapped for both CPU and device before the first op.
const PREPOPULATED: u64 = 6;
const ASIDS: [u32; 2] = [1, 2];
/// Large enough that nothing is ever evicted: the model has no replacement policy.
const IOTLB_ENTRIES: u32 = 4096;

fn va_of(page: u64) -> u64 {
    VA_BASE + page * PG
}

fn other(asid: u32) -> u32 {
    if asid == ASIDS[0] {
        ASIDS[1]
    } else {
        ASIDS[0]
    }
}

/// `VA+page:offset` for messages.
fn show_va(va: u64) -> String {
    match va.checked_sub(VA_BASE) {
        Some(d) => format!("VA+{}:{:#x}", d / PG, d % PG),
        None => format!("{va:#x}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// A kernel-side change of one CPU PTE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// munmap / zap: the PTE goes away.
    Unmap,
    /// migration / munmap+mmap: another frame, same flags (contents copied).
    Replace,
    /// fork's COW or mprotect: RW cleared.
    WriteProtect,
    /// writeback / MADV_FREE: D cleared, RW kept.
    MkClean,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DmaOp {
    /// Write the 8-byte pattern at `dst`.
    Fill(u64),
    /// Read `src`.
    Checksum,
    /// Read `src` (window page and offset given here), write `dst`.
    Copy { src_page: u64, src_off: u64 },
}

/// One job. `page`/`off` is its `dst` (FILL, COPY) or its `src` (CHECKSUM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dma {
    asid: u32,
    op: DmaOp,
    page: u64,
    off: u64,
    len: u64,
}

impl Dma {
    fn desc(&self) -> DmaJob {
        let at = va_of(self.page) + self.off;
        match self.op {
            DmaOp::Fill(pat) => job(DMA_FILL, self.asid, 0, at, self.len, pat),
            DmaOp::Checksum => job(DMA_CHECKSUM, self.asid, at, 0, self.len, 0),
            DmaOp::Copy { src_page, src_off } => job(
                DMA_COPY,
                self.asid,
                va_of(src_page) + src_off,
                at,
                self.len,
                0,
            ),
        }
    }
}

/// Which page a mid-job action hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The page the running job holds a translation for right now (write side first), in the
    /// job's ASID; the job's first page if it holds none.
    Held,
    /// A window page; `other_asid` picks the ASID the job does not use.
    Page { page: u64, other_asid: bool },
}

/// What happens after the first bursts of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mid {
    /// A shootdown, correct (`buggy == false`: device side, INV_RANGE + SYNC stepped one burst
    /// at a time until it completes, then the CPU change) or missed (CPU change at once).
    Change {
        target: Target,
        kind: Kind,
        buggy: bool,
    },
    /// INV_RANGE of one page + SYNC, no page-table change.
    InvRange(Target),
    /// INV_ALL + SYNC.
    InvAll,
    /// A SYNC alone.
    Sync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// A correct populate (hmm_range_fault + device PTE). `write` is a write fault; a read
    /// fault on an unmapped page maps it read-only, or writable-clean when `shared` (shmem).
    Populate {
        asid: u32,
        page: u64,
        write: bool,
        shared: bool,
    },
    /// A correct invalidation followed by the CPU change.
    Shootdown { asid: u32, page: u64, kind: Kind },
    /// The CPU change without the device-side shootdown.
    Buggy { asid: u32, page: u64, kind: Kind },
    /// A job, run to completion.
    Dma(Dma),
    /// INV_ALL + SYNC, run to completion.
    InvAll,
    /// A job run for `process(k)`, then `mid`, then to completion.
    Partial { dma: Dma, k: usize, mid: Mid },
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn asid() -> impl Strategy<Value = u32> + Clone {
    prop_oneof![Just(ASIDS[0]), Just(ASIDS[1])]
}

fn page() -> impl Strategy<Value = u64> + Clone {
    0..WINDOW
}

fn kind() -> impl Strategy<Value = Kind> + Clone {
    prop_oneof![
        Just(Kind::Unmap),
        Just(Kind::Replace),
        Just(Kind::WriteProtect),
        Just(Kind::MkClean),
    ]
}

fn dma(lens: impl Strategy<Value = u64> + Clone) -> impl Strategy<Value = Dma> + Clone {
    let op = prop_oneof![
        3 => any::<u64>().prop_map(DmaOp::Fill),
        2 => Just(DmaOp::Checksum),
        2 => (page(), 0..PG).prop_map(|(src_page, src_off)| DmaOp::Copy { src_page, src_off }),
    ];
    (asid(), op, page(), 0..PG, lens).prop_map(|(asid, op, page, off, len)| Dma {
        asid,
        op,
        page,
        off,
        len,
    })
}

fn target() -> impl Strategy<Value = Target> + Clone {
    prop_oneof![
        3 => Just(Target::Held),
        2 => (page(), prop::bool::weighted(0.25))
            .prop_map(|(page, other_asid)| Target::Page { page, other_asid }),
    ]
}

fn mid(allow_bugs: bool) -> BoxedStrategy<Mid> {
    let change = (
        target(),
        kind(),
        prop::bool::weighted(if allow_bugs { 0.5 } else { 0.0 }),
    )
        .prop_map(|(target, kind, buggy)| Mid::Change {
            target,
            kind,
            buggy,
        });
    prop_oneof![
        5 => change,
        2 => target().prop_map(Mid::InvRange),
        1 => Just(Mid::InvAll),
        1 => Just(Mid::Sync),
    ]
    .boxed()
}

fn op(allow_bugs: bool) -> BoxedStrategy<Op> {
    let populate = (asid(), page(), any::<bool>(), prop::bool::weighted(0.3)).prop_map(
        |(asid, page, write, shared)| Op::Populate {
            asid,
            page,
            write,
            shared,
        },
    );
    let shootdown =
        (asid(), page(), kind()).prop_map(|(asid, page, kind)| Op::Shootdown { asid, page, kind });
    let buggy =
        (asid(), page(), kind()).prop_map(|(asid, page, kind)| Op::Buggy { asid, page, kind });
    let short_lens = prop_oneof![1..=64u64, 1..=PG, 1..=3 * PG];
    let partial = (dma(PG..=3 * PG), 1..=12usize, mid(allow_bugs))
        .prop_map(|(dma, k, mid)| Op::Partial { dma, k, mid });
    if allow_bugs {
        prop_oneof![
            5 => populate,
            2 => shootdown,
            3 => buggy,
            5 => dma(short_lens).prop_map(Op::Dma),
            1 => Just(Op::InvAll),
            3 => partial,
        ]
        .boxed()
    } else {
        prop_oneof![
            5 => populate,
            3 => shootdown,
            5 => dma(short_lens).prop_map(Op::Dma),
            1 => Just(Op::InvAll),
            4 => partial,
        ]
        .boxed()
    }
}

/// A case: the device's burst size and the operations.
fn case(allow_bugs: bool) -> impl Strategy<Value = (u32, Vec<Op>)> {
    (
        prop_oneof![Just(256u32), Just(512), Just(1024), Just(4096)],
        prop::collection::vec(op(allow_bugs), 1..=40),
    )
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

/// (ASID, VA page number).
type Key = (u32, u64);

fn key(asid: u32, va: u64) -> Key {
    (asid, va / PG)
}

/// What the CPU page table says about one page (what the test wrote into the x86 table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CpuPte {
    frame: u64,
    writable: bool,
    dirty: bool,
}

impl CpuPte {
    fn flags(&self) -> CpuFlags {
        CpuFlags {
            writable: self.writable,
            dirty: self.dirty,
            ..CpuFlags::READ_ONLY
        }
    }
}

/// What the device page table says about one page. `dirty` is the D bit, written by the
/// driver as clear and set by the device's first write walk (pte.rs); it decides whether a
/// write through a cached translation must walk again (and so re-snapshot the CPU PTE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DevPte {
    frame: u64,
    writable: bool,
    dirty: bool,
}

/// A cached translation: the device leaf as walked, plus the validator's snapshot of the CPU
/// PTE's D bit at fill time (the "dirty when cached" half of the write_clean rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tlb {
    key: Key,
    frame: u64,
    writable: bool,
    dirty: bool,
    cpu_dirty_at_fill: bool,
}

/// A translation held by the running job for one side (read, write) across the bursts of a
/// page. An invalidation covering it dooms it: still usable (the CPU cannot have changed, the
/// SYNC has not completed), but a SYNC waits until the job lets go of it.
#[derive(Clone, Copy)]
struct Held {
    tlb: Tlb,
    doomed: bool,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = &self.tlb;
        write!(
            f,
            "asid {} {} -> {:#x} {}{}{}{}",
            t.key.0,
            show_va(t.key.1 * PG),
            t.frame,
            if t.writable { "W" } else { "RO" },
            if t.dirty { " D" } else { "" },
            if t.cpu_dirty_at_fill {
                " cpu-dirty-at-fill"
            } else {
                ""
            },
            if self.doomed { " DOOMED" } else { "" }
        )
    }
}

#[derive(Clone, Copy, Debug)]
enum MCmd {
    InvPage(Key),
    InvAll,
    Sync(u32),
}

#[derive(Clone, Copy)]
struct Active {
    desc: DmaJob,
    pos: u64,
    faults: u32,
    result: u64,
    held: [Option<Held>; 2],
}

impl std::fmt::Debug for Active {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = &self.desc;
        write!(
            f,
            "job {} op {} asid {} src {} dst {} len {:#x}, at {:#x}; held: read {:?}, write {:?}",
            d.id,
            d.op,
            d.asid,
            show_va(d.src),
            show_va(d.dst),
            d.len,
            self.pos,
            self.held[READ],
            self.held[WRITE]
        )
    }
}

const READ: usize = 0;
const WRITE: usize = 1;

/// Statistics the model predicts, by `STAT_*` index.
const CHECKED_STATS: [(u32, &str); 9] = [
    (STAT_VIOLATIONS, "violations"),
    (STAT_FAULTS, "faults"),
    (STAT_SYNCS, "syncs"),
    (STAT_COMMANDS, "commands"),
    (STAT_DMA_JOBS, "dma_jobs"),
    (STAT_DMA_BYTES, "dma_bytes"),
    (STAT_WALKS, "walks"),
    (STAT_IOTLB_HITS, "iotlb_hits"),
    (STAT_IOTLB_MISSES, "iotlb_misses"),
];

/// The reference model: page tables, IOTLB, queues, the running job, data frames, and what the
/// device should have reported. It executes commands and DMA at the same granularity as
/// `ZapguardDevice::process` (rounds of "commands, then one DMA step"), so that single-burst
/// interleavings can be compared step by step.
#[derive(Debug)]
struct Model {
    burst: u64,
    cpu: BTreeMap<Key, CpuPte>,
    dev: BTreeMap<Key, DevPte>,
    iotlb: BTreeMap<Key, Tlb>,
    /// Contents of every data frame handed out.
    mem: BTreeMap<u64, Vec<u8>>,
    cmdq: VecDeque<MCmd>,
    dmaq: VecDeque<DmaJob>,
    job: Option<Active>,
    /// Value of the SYNC word: the last SYNC completed.
    synced: u32,
    /// Events the device should have queued since they were last taken.
    events: Vec<Evt>,
    /// Status records by job id.
    statuses: BTreeMap<u64, DmaStatus>,
    stats: BTreeMap<u32, u64>,
}

impl Model {
    fn new(burst: u64) -> Self {
        Self {
            burst,
            cpu: BTreeMap::new(),
            dev: BTreeMap::new(),
            iotlb: BTreeMap::new(),
            mem: BTreeMap::new(),
            cmdq: VecDeque::new(),
            dmaq: VecDeque::new(),
            job: None,
            synced: 0,
            events: vec![],
            statuses: BTreeMap::new(),
            stats: CHECKED_STATS.iter().map(|&(i, _)| (i, 0)).collect(),
        }
    }

    fn count(&mut self, stat: u32, n: u64) {
        *self.stats.entry(stat).or_default() += n;
    }

    fn stat(&self, stat: u32) -> u64 {
        self.stats.get(&stat).copied().unwrap_or(0)
    }

    /// `ZapguardDevice::process(mem, max)`: up to `max` rounds of "every command that can run,
    /// then one DMA step (fetch a job, or one burst)", stopping at the first idle round.
    fn process(&mut self, max: usize) -> bool {
        let mut progress = false;
        for _ in 0..max.max(1) {
            let c = self.run_commands();
            let d = self.dma_step();
            progress |= c || d;
            if !c && !d {
                break;
            }
        }
        progress
    }

    /// `Rig::run`.
    fn run(&mut self) {
        for _ in 0..100_000 {
            if !self.process(64) {
                return;
            }
        }
    }

    fn holds_doomed(&self) -> bool {
        self.job
            .as_ref()
            .is_some_and(|j| j.held.iter().flatten().any(|h| h.doomed))
    }

    /// Commands in order. An invalidation drops IOTLB entries and dooms the job's held
    /// translations it covers; a SYNC blocks the queue while the job holds a doomed one (cmd.rs:
    /// "every DMA access that was using a translation those commands invalidated has finished").
    fn run_commands(&mut self) -> bool {
        let mut progress = false;
        while let Some(&c) = self.cmdq.front() {
            match c {
                MCmd::InvPage(k) => {
                    self.iotlb.remove(&k);
                    self.doom(|t| t.key == k);
                }
                MCmd::InvAll => {
                    self.iotlb.clear();
                    self.doom(|_| true);
                }
                MCmd::Sync(seq) => {
                    if self.holds_doomed() {
                        break;
                    }
                    self.synced = seq;
                    self.count(STAT_SYNCS, 1);
                }
            }
            self.cmdq.pop_front();
            self.count(STAT_COMMANDS, 1);
            progress = true;
        }
        progress
    }

    fn doom(&mut self, covers: impl Fn(&Tlb) -> bool) {
        if let Some(j) = self.job.as_mut() {
            for h in j.held.iter_mut().flatten() {
                if covers(&h.tlb) {
                    h.doomed = true;
                }
            }
        }
    }

    fn dma_step(&mut self) -> bool {
        if self.job.is_none() {
            let Some(desc) = self.dmaq.pop_front() else {
                return false;
            };
            let result = if desc.op == DMA_CHECKSUM {
                FNV_OFFSET
            } else {
                0
            };
            self.job = Some(Active {
                desc,
                pos: 0,
                faults: 0,
                result,
                held: [None, None],
            });
            return true;
        }
        self.burst();
        true
    }

    fn active(&self) -> &Active {
        self.job.as_ref().expect("a running job")
    }

    fn active_mut(&mut self) -> &mut Active {
        self.job.as_mut().expect("a running job")
    }

    /// One burst: at most `burst` bytes, never crossing a page on either side (dma.rs: jobs are
    /// translated page by page). Both sides are translated before anything is accessed, so a
    /// fault leaves no half-done burst; then each access is judged by the validator.
    fn burst(&mut self) {
        let Active { desc: d, pos, .. } = *self.active();
        let (src, dst) = (d.src + pos, d.dst + pos);
        let reads = matches!(d.op, DMA_COPY | DMA_CHECKSUM);
        let writes = matches!(d.op, DMA_COPY | DMA_FILL);
        let mut n = (d.len - pos).min(self.burst);
        if reads {
            n = n.min(PG - src % PG);
        }
        if writes {
            n = n.min(PG - dst % PG);
        }
        let src_pa = if reads {
            match self.translate(READ, d.asid, src, false) {
                Ok(pa) => Some(pa),
                Err(reason) => return self.fault(reason, src, false),
            }
        } else {
            None
        };
        let dst_pa = if writes {
            match self.translate(WRITE, d.asid, dst, true) {
                Ok(pa) => Some(pa),
                Err(reason) => return self.fault(reason, dst, true),
            }
        } else {
            None
        };
        let mut buf = vec![0u8; n as usize];
        if let Some(pa) = src_pa {
            self.judge(READ, src, pa, false);
            buf.copy_from_slice(&self.frame(pa)[(pa % PG) as usize..][..n as usize]);
        }
        if d.op == DMA_FILL {
            let pat = d.aux.to_le_bytes();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = pat[(pos as usize + i) % 8];
            }
        }
        if let Some(pa) = dst_pa {
            self.judge(WRITE, dst, pa, true);
            let off = (pa % PG) as usize;
            self.frame_mut(pa)[off..off + n as usize].copy_from_slice(&buf);
        }
        let j = self.active_mut();
        if d.op == DMA_CHECKSUM {
            j.result = fnv1a64(j.result, &buf);
        }
        j.pos += n;
        if j.pos >= d.len {
            self.complete(DMA_ST_OK, 0);
        }
    }

    fn frame(&self, pa: u64) -> &[u8] {
        self.mem
            .get(&(pa - pa % PG))
            .unwrap_or_else(|| panic!("model: device used unknown frame {pa:#x}"))
    }

    fn frame_mut(&mut self, pa: u64) -> &mut [u8] {
        self.mem
            .get_mut(&(pa - pa % PG))
            .unwrap_or_else(|| panic!("model: device used unknown frame {pa:#x}"))
    }

    /// The guest-physical address for `va` on one side, or a fault reason. The held translation
    /// is reused while it covers the page (and, for a write, is writable and was filled with D
    /// set); otherwise it is released, and the IOTLB entry is used under the same condition;
    /// otherwise the device table is walked: not present / not writable fault, else D is set
    /// for a write and a new entry snapshots the CPU PTE's D bit.
    fn translate(&mut self, side: usize, asid: u32, va: u64, write: bool) -> Result<u64, u16> {
        let k = key(asid, va);
        let usable = |t: &Tlb| t.key == k && (!write || (t.writable && t.dirty));
        let job = self.active_mut();
        if let Some(h) = job.held[side].filter(|h| usable(&h.tlb)) {
            return Ok(h.tlb.frame + va % PG);
        }
        job.held[side] = None;
        let cached = self.iotlb.get(&k).copied();
        self.count(
            if cached.is_some() {
                STAT_IOTLB_HITS
            } else {
                STAT_IOTLB_MISSES
            },
            1,
        );
        let tlb = match cached {
            Some(t) if usable(&t) => t,
            _ => {
                self.count(STAT_WALKS, 1);
                let p = self.dev.get_mut(&k).ok_or(ev::FAULT_NOT_PRESENT)?;
                if write && !p.writable {
                    return Err(ev::FAULT_PERMISSION);
                }
                p.dirty |= write;
                let p = *p;
                let t = Tlb {
                    key: k,
                    frame: p.frame,
                    writable: p.writable,
                    dirty: p.dirty,
                    // A re-walk of a page still cached (never invalidated) keeps what the
                    // device knew when it first cached it, so a missed mkclean is not forgotten.
                    cpu_dirty_at_fill: self.cpu.get(&k).is_some_and(|c| c.dirty)
                        || cached.is_some_and(|old| old.cpu_dirty_at_fill),
                };
                self.iotlb.insert(k, t);
                t
            }
        };
        self.active_mut().held[side] = Some(Held { tlb, doomed: false });
        Ok(tlb.frame + va % PG)
    }

    /// The validator's verdict on one access (validator.rs, DESIGN.md): stale if the CPU maps
    /// nothing or another frame; write_perm for a write the CPU PTE forbids; write_clean for a
    /// write through a translation cached while the CPU PTE was dirty, onto a clean PTE now.
    fn verdict(&self, side: usize, va: u64, pa: u64, write: bool) -> Option<(u16, u64)> {
        let j = self.active();
        let dirty_at_fill = j.held[side].is_some_and(|h| h.tlb.cpu_dirty_at_fill);
        let Some(c) = self.cpu.get(&key(j.desc.asid, va)) else {
            return Some((ev::VIOL_STALE, ev::NO_PA));
        };
        let cpu_pa = c.frame + va % PG;
        if c.frame != pa - pa % PG {
            Some((ev::VIOL_STALE, cpu_pa))
        } else if write && !c.writable {
            Some((ev::VIOL_WRITE_PERM, cpu_pa))
        } else if write && !c.dirty && dirty_at_fill {
            Some((ev::VIOL_WRITE_CLEAN, cpu_pa))
        } else {
            None
        }
    }

    fn judge(&mut self, side: usize, va: u64, pa: u64, write: bool) {
        if let Some((reason, info2)) = self.verdict(side, va, pa, write) {
            let asid = self.active().desc.asid;
            self.count(STAT_VIOLATIONS, 1);
            self.events.push(Evt {
                ty: ev::EVT_VIOLATION,
                flags: if write { ev::EVT_F_WRITE } else { 0 },
                reason,
                asid,
                va,
                info: pa,
                info2,
            });
        }
    }

    /// A translation fault of a job without DMA_F_STALL: event, then the job ends.
    fn fault(&mut self, reason: u16, va: u64, write: bool) {
        let j = self.active_mut();
        j.faults += 1;
        let d = j.desc;
        self.count(STAT_FAULTS, 1);
        self.events.push(Evt {
            ty: ev::EVT_FAULT,
            flags: if write { ev::EVT_F_WRITE } else { 0 },
            reason,
            asid: d.asid,
            va,
            info: 0,
            info2: d.id,
        });
        self.complete(DMA_ST_FAULT, reason);
    }

    fn complete(&mut self, status: u16, fault_reason: u16) {
        let j = self.job.take().expect("a running job");
        self.count(STAT_DMA_JOBS, 1);
        self.count(STAT_DMA_BYTES, j.pos);
        self.statuses.insert(
            j.desc.id,
            DmaStatus {
                status,
                fault_reason,
                faults: j.faults,
                bytes_done: j.pos,
                result: if status == DMA_ST_OK { j.result } else { 0 },
                id: j.desc.id,
            },
        );
    }

    /// The page of a translation the running job holds (write side first).
    fn held_page(&self) -> Option<Key> {
        let j = self.job.as_ref()?;
        j.held[WRITE].or(j.held[READ]).map(|h| h.tlb.key)
    }
}

// ---------------------------------------------------------------------------------------------
// The harness: every driver/kernel action applied to the rig and to the model
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default)]
struct Coverage {
    cases: u64,
    ops: u64,
    jobs: u64,
    faults: u64,
    stale: u64,
    write_perm: u64,
    write_clean: u64,
    syncs: u64,
    /// SYNCs that did not complete in the first single-burst step (a job held a translation).
    syncs_waited: u64,
    longest_wait: u64,
    buggy_changes: u64,
}

impl Coverage {
    fn add(&mut self, o: &Coverage) {
        self.cases += o.cases;
        self.ops += o.ops;
        self.jobs += o.jobs;
        self.faults += o.faults;
        self.stale += o.stale;
        self.write_perm += o.write_perm;
        self.write_clean += o.write_clean;
        self.syncs += o.syncs;
        self.syncs_waited += o.syncs_waited;
        self.longest_wait = self.longest_wait.max(o.longest_wait);
        self.buggy_changes += o.buggy_changes;
    }
}

struct Harness {
    rig: Rig<NoEvents>,
    m: Model,
    cov: Coverage,
}

type Check = Result<(), String>;

fn describe(e: &Evt) -> String {
    let w = if e.flags & ev::EVT_F_WRITE != 0 {
        "W"
    } else {
        "R"
    };
    match e.ty {
        ev::EVT_FAULT => format!(
            "fault {} {w} asid {} {} job {} (flags {:#x} info {:#x})",
            ev::fault_name(e.reason),
            e.asid,
            show_va(e.va),
            e.info2,
            e.flags,
            e.info
        ),
        ev::EVT_VIOLATION => format!(
            "violation {} {w} asid {} {} dev_pa {:#x} cpu_pa {}",
            ev::violation_name(e.reason),
            e.asid,
            show_va(e.va),
            e.info,
            if e.info2 == ev::NO_PA {
                "none".to_string()
            } else {
                format!("{:#x}", e.info2)
            }
        ),
        _ => format!("{e:?}"),
    }
}

fn describe_all(evs: &[Evt]) -> String {
    evs.iter().fold(String::new(), |mut s, e| {
        let _ = write!(s, "\n    {}", describe(e));
        s
    })
}

impl Harness {
    fn new(burst: u32) -> Self {
        let config = DeviceConfig {
            iotlb_entries: IOTLB_ENTRIES,
            dma_burst: burst,
            ..DeviceConfig::default()
        };
        let mut rig = Rig::new(config, NoEvents);
        for a in ASIDS {
            rig.bind(a, 0);
        }
        Self {
            rig,
            m: Model::new(u64::from(burst)),
            cov: Coverage::default(),
        }
    }

    // Primitive page-table edits, mirrored.

    fn fresh_frame(&mut self) -> u64 {
        let f = self.rig.frame();
        self.m.mem.insert(f, vec![0; PG as usize]);
        f
    }

    fn cpu_map(&mut self, asid: u32, va: u64, p: CpuPte) {
        self.rig.cpu_map(asid, va, p.frame, p.flags());
        self.m.cpu.insert(key(asid, va), p);
    }

    fn dev_map(&mut self, asid: u32, va: u64, frame: u64, writable: bool) {
        self.rig.dev_map(asid, va, frame, writable);
        let p = DevPte {
            frame,
            writable,
            dirty: false,
        };
        self.m.dev.insert(key(asid, va), p);
    }

    // Commands, mirrored.

    fn post(&mut self, c: MCmd) -> Option<u32> {
        match c {
            MCmd::InvPage((asid, vpn)) => {
                self.rig
                    .post(Command::new(cmd::CMD_INV_RANGE, 0, asid, vpn * PG, PG));
                self.m.cmdq.push_back(c);
                None
            }
            MCmd::InvAll => {
                self.rig.post(Command::new(cmd::CMD_INV_ALL, 0, 0, 0, 0));
                self.m.cmdq.push_back(c);
                None
            }
            MCmd::Sync(_) => {
                let s = self.rig.post_sync();
                self.m.cmdq.push_back(MCmd::Sync(s));
                Some(s)
            }
        }
    }

    /// Lets the device (and the model) run `process(k)` and compares the progress flag.
    fn process(&mut self, k: usize) -> Check {
        let dev = self.rig.dev.process(&self.rig.mem, k);
        let model = self.m.process(k);
        if dev != model {
            return Err(format!(
                "process({k}) reported progress {dev}, model {model} (model job {:?})",
                self.m.job
            ));
        }
        Ok(())
    }

    fn run(&mut self) {
        self.rig.run();
        self.m.run();
    }

    /// Posts `inv` (if any) and a SYNC, then processes one burst at a time until the SYNC
    /// completes, checking after every step that the device completed it exactly when the
    /// model says (it must wait while the running job holds a translation the invalidation
    /// covers, and must not wait longer).
    fn inv_sync_stepwise(&mut self, inv: Option<MCmd>) -> Check {
        if let Some(c) = inv {
            self.post(c);
        }
        let s = self.post(MCmd::Sync(0)).expect("a SYNC sequence number");
        self.cov.syncs += 1;
        for steps in 0..10_000u64 {
            let (dev, model) = (self.rig.sync_done(s), self.m.synced >= s);
            if dev != model {
                return Err(format!(
                    "SYNC {s} after {steps} single-burst steps: device completed={dev}, model \
                     completed={model}; model job {:?}",
                    self.m.job
                ));
            }
            if dev {
                if steps > 1 {
                    self.cov.syncs_waited += 1;
                    self.cov.longest_wait = self.cov.longest_wait.max(steps);
                }
                return Ok(());
            }
            self.process(1)?;
        }
        Err(format!("SYNC {s} never completed"))
    }

    // Driver/kernel actions.

    /// The driver's side of an invalidation: clear (or, for a write-protect, downgrade) the
    /// device PTE, without commands.
    fn device_side(&mut self, asid: u32, va: u64, kind: Kind) {
        let k = key(asid, va);
        let Some(p) = self.m.dev.get(&k).copied() else {
            return;
        };
        match kind {
            Kind::WriteProtect => {
                if p.writable {
                    assert!(self.rig.dev_set_writable(asid, va, false));
                    self.m.dev.insert(
                        k,
                        DevPte {
                            writable: false,
                            ..p
                        },
                    );
                }
            }
            Kind::Unmap | Kind::Replace | Kind::MkClean => {
                assert!(self.rig.dev_unmap(asid, va));
                self.m.dev.remove(&k);
            }
        }
    }

    /// The kernel's change of the CPU PTE (nothing if the CPU maps nothing there).
    fn cpu_side(&mut self, asid: u32, va: u64, kind: Kind, replace_flags: Option<(bool, bool)>) {
        let k = key(asid, va);
        let Some(c) = self.m.cpu.get(&k).copied() else {
            return;
        };
        match kind {
            Kind::Unmap => {
                self.rig.cpu_unmap(asid, va);
                self.m.cpu.remove(&k);
            }
            Kind::Replace => {
                // Migration: copy the contents, same flags (or, for a COW break, writable+dirty).
                let new = self.fresh_frame();
                let data = self.rig.peek(c.frame, PG as usize);
                self.rig.poke(new, &data);
                let old = self.m.mem[&c.frame].clone();
                self.m.mem.insert(new, old);
                let (writable, dirty) = replace_flags.unwrap_or((c.writable, c.dirty));
                self.cpu_map(
                    asid,
                    va,
                    CpuPte {
                        frame: new,
                        writable,
                        dirty,
                    },
                );
            }
            Kind::WriteProtect => {
                self.rig.cpu_set_flags(asid, va, 0, X86_RW);
                self.m.cpu.insert(
                    k,
                    CpuPte {
                        writable: false,
                        ..c
                    },
                );
            }
            Kind::MkClean => {
                self.rig.cpu_set_flags(asid, va, 0, X86_D);
                self.m.cpu.insert(k, CpuPte { dirty: false, ..c });
            }
        }
    }

    /// invalidate_range_start done right: device side, INV_RANGE + SYNC (waited for), and only
    /// then the CPU change.
    fn correct_change(
        &mut self,
        asid: u32,
        va: u64,
        kind: Kind,
        replace_flags: Option<(bool, bool)>,
    ) -> Check {
        self.device_side(asid, va, kind);
        self.inv_sync_stepwise(Some(MCmd::InvPage(key(asid, va))))?;
        self.cpu_side(asid, va, kind, replace_flags);
        Ok(())
    }

    fn buggy_change(&mut self, asid: u32, va: u64, kind: Kind) {
        self.cov.buggy_changes += 1;
        self.cpu_side(asid, va, kind, None);
    }

    /// hmm_range_fault + device PTE update, as a correct driver does it.
    fn populate(&mut self, asid: u32, va: u64, write: bool, shared: bool) -> Check {
        let k = key(asid, va);
        match self.m.cpu.get(&k).copied() {
            None => {
                let frame = self.fresh_frame();
                let writable = write || shared;
                self.cpu_map(
                    asid,
                    va,
                    CpuPte {
                        frame,
                        writable,
                        dirty: write,
                    },
                );
            }
            // A write fault on a read-only page: COW break, a new frame (an invalidation).
            Some(c) if write && !c.writable => {
                self.correct_change(asid, va, Kind::Replace, Some((true, true)))?
            }
            // A write fault on a writable clean page only sets D (no invalidation needed).
            Some(c) if write && !c.dirty => {
                self.rig.cpu_set_flags(asid, va, X86_D, 0);
                self.m.cpu.insert(k, CpuPte { dirty: true, ..c });
            }
            Some(_) => {}
        }
        let c = self.m.cpu[&k];
        match self.m.dev.get(&k).copied() {
            None => self.dev_map(asid, va, c.frame, c.writable),
            Some(d) if d.frame == c.frame => {
                if d.writable != c.writable {
                    assert!(self.rig.dev_set_writable(asid, va, c.writable));
                    self.m.dev.insert(
                        k,
                        DevPte {
                            writable: c.writable,
                            ..d
                        },
                    );
                    // An upgrade needs no invalidation (a write re-walks a read-only entry);
                    // a downgrade of a live entry does.
                    if !c.writable {
                        self.inv_sync_stepwise(Some(MCmd::InvPage(k)))?;
                    }
                }
            }
            // The device PTE names a frame the CPU no longer uses (after a missed shootdown):
            // replacing a live entry needs an invalidation.
            Some(_) => {
                self.dev_map(asid, va, c.frame, c.writable);
                self.inv_sync_stepwise(Some(MCmd::InvPage(k)))?;
            }
        }
        Ok(())
    }

    fn submit(&mut self, d: &Dma) -> (u64, u64) {
        let mut desc = d.desc();
        let status = self.rig.submit(desc);
        desc.status = status;
        // The rig numbers jobs 1, 2, ... in submission order; the model does the same.
        desc.id = self.cov.jobs + 1;
        self.cov.jobs += 1;
        self.m.dmaq.push_back(desc);
        (status, desc.id)
    }

    fn check_status(&mut self, status: u64, id: u64) -> Check {
        let dev = self.rig.status(status);
        let Some(&model) = self.m.statuses.get(&id) else {
            return Err(format!("model: job {id} did not complete"));
        };
        if dev != model {
            return Err(format!(
                "job {id} status: device {dev:?}\n              model  {model:?}"
            ));
        }
        if dev.status == DMA_ST_FAULT {
            self.cov.faults += 1;
        }
        Ok(())
    }

    fn resolve(&self, d: &Dma, t: Target) -> (u32, u64) {
        match t {
            Target::Held => {
                let k = self.m.held_page().unwrap_or(key(d.asid, va_of(d.page)));
                (k.0, k.1 * PG)
            }
            Target::Page { page, other_asid } => {
                let a = if other_asid { other(d.asid) } else { d.asid };
                (a, va_of(page))
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Check {
        self.cov.ops += 1;
        match *op {
            Op::Populate {
                asid,
                page,
                write,
                shared,
            } => self.populate(asid, va_of(page), write, shared)?,
            Op::Shootdown { asid, page, kind } => {
                self.correct_change(asid, va_of(page), kind, None)?
            }
            Op::Buggy { asid, page, kind } => self.buggy_change(asid, va_of(page), kind),
            Op::Dma(d) => {
                let (st, id) = self.submit(&d);
                self.run();
                self.check_status(st, id)?;
            }
            Op::InvAll => self.inv_sync_stepwise(Some(MCmd::InvAll))?,
            Op::Partial { dma: d, k, mid } => {
                let (st, id) = self.submit(&d);
                self.process(k)?;
                match mid {
                    Mid::Change {
                        target,
                        kind,
                        buggy,
                    } => {
                        let (asid, va) = self.resolve(&d, target);
                        if buggy {
                            self.buggy_change(asid, va, kind);
                        } else {
                            self.correct_change(asid, va, kind, None)?;
                        }
                    }
                    Mid::InvRange(target) => {
                        let (asid, va) = self.resolve(&d, target);
                        self.inv_sync_stepwise(Some(MCmd::InvPage(key(asid, va))))?;
                    }
                    Mid::InvAll => self.inv_sync_stepwise(Some(MCmd::InvAll))?,
                    Mid::Sync => self.inv_sync_stepwise(None)?,
                }
                self.run();
                self.check_status(st, id)?;
            }
        }
        Ok(())
    }

    /// Everything observable, compared with the model after an op (the device is idle).
    fn check(&mut self) -> Check {
        if self.m.job.is_some() || !self.m.cmdq.is_empty() || !self.m.dmaq.is_empty() {
            return Err(format!(
                "model not idle after run: job {:?} cmdq {:?}",
                self.m.job, self.m.cmdq
            ));
        }
        if self.rig.dev.has_work() {
            return Err("device still has work after run".into());
        }
        // Events: every fault and violation, in order.
        let dev = self.rig.take_events();
        let model = std::mem::take(&mut self.m.events);
        if let Some(l) = dev
            .iter()
            .find(|e| e.ty == ev::EVT_VIOLATION && e.reason == ev::VIOL_LEDGER)
        {
            return Err(format!(
                "ledger violation (translation used after its SYNC completed): {}",
                describe(l)
            ));
        }
        if dev != model {
            return Err(format!(
                "events differ\n  device:{}\n  model:{}",
                describe_all(&dev),
                describe_all(&model)
            ));
        }
        for e in &dev {
            match (e.ty, e.reason) {
                (ev::EVT_VIOLATION, ev::VIOL_STALE) => self.cov.stale += 1,
                (ev::EVT_VIOLATION, ev::VIOL_WRITE_PERM) => self.cov.write_perm += 1,
                (ev::EVT_VIOLATION, ev::VIOL_WRITE_CLEAN) => self.cov.write_clean += 1,
                _ => {}
            }
        }
        // Statistics.
        for (i, name) in CHECKED_STATS {
            let (d, m) = (self.rig.stat(i), self.m.stat(i));
            if d != m {
                return Err(format!("STAT {name}: device {d}, model {m}"));
            }
        }
        if self.rig.stat(STAT_IOTLB_EVICTIONS) != 0 {
            return Err("IOTLB evicted: the model assumes it never does".into());
        }
        if self.rig.stat(STAT_EVENTS_DROPPED) != 0 {
            return Err("events dropped".into());
        }
        let err = self.rig.reg(ERROR);
        if err != 0 {
            return Err(format!("ERROR register {err:#x}"));
        }
        // Every SYNC posted has completed.
        let word = sync_word(&self.rig);
        if word != self.m.synced {
            return Err(format!("SYNC word {word}, model {}", self.m.synced));
        }
        // Data: every frame holds what the model says.
        for (&f, want) in &self.m.mem {
            let got = self.rig.peek(f, PG as usize);
            if &got != want {
                let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                return Err(format!(
                    "frame {f:#x} differs at offset {at:#x}: device {:#04x}, model {:#04x}",
                    got[at], want[at]
                ));
            }
        }
        // Device leaves: frame, W, and D as the device left it.
        for asid in ASIDS {
            for p in 0..REACH {
                let va = va_of(p);
                let mask = pte::PTE_ADDR_MASK | pte::PTE_P | pte::PTE_W | pte::PTE_D;
                let got = self.rig.dev_leaf(asid, va).map(|e| e & mask);
                let want = self.m.dev.get(&key(asid, va)).map(|d| {
                    d.frame
                        | pte::PTE_P
                        | if d.writable { pte::PTE_W } else { 0 }
                        | if d.dirty { pte::PTE_D } else { 0 }
                });
                if got != want {
                    return Err(format!(
                        "device leaf asid {asid} {}: device {got:x?}, model {want:x?}",
                        show_va(va)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The SYNC completion word, read from guest memory.
fn sync_word(rig: &Rig<NoEvents>) -> u32 {
    let b = rig.peek(SYNC_WORD, 4);
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

// ---------------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------------

fn run_case(burst: u32, ops: &[Op], allow_bugs: bool) -> Result<Coverage, String> {
    let mut h = Harness::new(burst);
    for asid in ASIDS {
        for p in 0..PREPOPULATED {
            h.populate(asid, va_of(p), true, false)
                .map_err(|e| format!("setup: {e}"))?;
        }
    }
    h.check().map_err(|e| format!("setup: {e}"))?;
    for (i, op) in ops.iter().enumerate() {
        h.apply(op).map_err(|e| format!("op #{i} {op:?}:\n  {e}"))?;
        h.check()
            .map_err(|e| format!("after op #{i} {op:?}:\n  {e}"))?;
        if !allow_bugs && h.rig.stat(STAT_VIOLATIONS) != 0 {
            return Err(format!(
                "after op #{i} {op:?}: a correct driver caused {} violation(s)",
                h.rig.stat(STAT_VIOLATIONS)
            ));
        }
    }
    h.cov.cases = 1;
    Ok(h.cov)
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn property(allow_bugs: bool) -> Coverage {
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let total = RefCell::new(Coverage::default());
    let result = runner.run(&case(allow_bugs), |(burst, ops)| {
        let cov = run_case(burst, &ops, allow_bugs).map_err(TestCaseError::fail)?;
        total.borrow_mut().add(&cov);
        Ok(())
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, (burst, ops))) => {
            let list = ops
                .iter()
                .enumerate()
                .fold(String::new(), |mut s, (i, op)| {
                    let _ = writeln!(s, "  #{i}: {op:?}");
                    s
                });
            panic!(
                "{why}\n\nminimal failing case: dma_burst {burst}, {} prepopulated pages \
                 (write) in asids {ASIDS:?}, then {} ops:\n{list}",
                PREPOPULATED,
                ops.len()
            );
        }
        Err(e) => panic!("{e}"),
    }
    let cov = total.into_inner();
    eprintln!("coverage: {cov:?}");
    cov
}

/// Random interleavings including missed shootdowns: the device's translations, data, job
/// statuses and every violation verdict match the model.
#[test]
fn device_matches_model() {
    let cov = property(true);
    // With the default case count these are all but certain; a small PROPTEST_CASES may not
    // reach them.
    if cases() >= 256 {
        assert!(cov.stale > 0 && cov.write_perm > 0, "{cov:?}");
        assert!(cov.syncs_waited > 0, "{cov:?}");
    }
}

/// A correct driver (populate, shootdowns with SYNC, including mid-job ones) never causes a
/// violation, and SYNCs wait for the job holding the invalidated page.
#[test]
fn correct_driver_has_no_violations() {
    let cov = property(false);
    if cases() >= 256 {
        assert!(cov.syncs_waited > 0 && cov.faults > 0, "{cov:?}");
    }
}
