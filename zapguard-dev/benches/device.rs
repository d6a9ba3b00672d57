//! Device model benchmarks (criterion):
//!
//! - `iotlb`: a hit on a present entry (IOTLB of 64 and 4096 entries, cycling through all of
//!   them so LRU refreshes move real entries), and a miss followed by the insert that evicts
//!   the least recently used entry;
//! - `walk`: a device page-table walk ending at a 4 KiB and at a 2 MiB leaf (A already set, as
//!   in steady state);
//! - `dma_copy_1MiB`: a 1 MiB `DMA_COPY` job submitted through the DMA ring and run to
//!   completion by `testkit::Rig` with the default model (64-entry LRU IOTLB, so every page of
//!   the 256 + 256 misses and is walked each time): validator on and off (context with
//!   `CTX_NO_VALIDATE`), both without a trace (`NoEvents`), and validator on with the binary
//!   trace written to a byte counter (`TraceWriter`, whose background thread writes to it: no
//!   disk); against a plain `copy_from_slice` of 1 MiB;
//! - `trace`: one `dma_access` recorded by `TraceWriter` (binary), and one line written by
//!   `JsonTraceWriter`, each into a byte counter.
//!
//! Then, in the same process, timed loops measure the same operations again to print the
//! ratios (device vs memcpy, validator on vs off, trace on vs off, the latter also on one rig
//! with its trace switched: rigs differ by memory layout, which moves a job's time by up to
//! 20% from one process to the next), since criterion's results are not available
//! programmatically: [`ROUNDS`] rounds, each timing every variant once in turn (so a
//! disturbance hits all sides of a ratio alike), reported as the median ratio over the rounds
//! with its range. They also report the trace bytes one 1 MiB job writes, binary and as JSON
//! Lines, in page steps and in 512-byte steps (what the engine did before it moved pages), with
//! a thrashing and with a warm IOTLB. All of it is written as JSON to `<target dir>/zapguard/bench-device.json`.
//! The loops only run in bench mode (`cargo bench`), not when `cargo test --benches` runs each
//! benchmark once.
//!
//! `cargo bench -p zapguard-dev --bench device` (about a minute), or with `-- --quick`.

use std::hint::black_box;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use shared_regs::dma::{DMA_COPY, DMA_ST_OK};
use shared_regs::pte::{self, HUGE_PAGE_SIZE, PAGE_SIZE};
use shared_regs::regs::{
    STAT_COUNT, STAT_IOTLB_HITS, STAT_IOTLB_MISSES, STAT_VIOLATIONS, STAT_WALKS,
};
use zapguard_dev::{JsonTraceWriter, TraceWriter};
use zapguard_model::events::Activity;
use zapguard_model::iotlb::{Iotlb, IotlbEntry, Policy};
use zapguard_model::pagetable::{walk, PageTableBuilder, Translation};
use zapguard_model::testkit::{job, Rig, RING_LOG2};
use zapguard_model::{DeviceConfig, Event, Events, Fanout, NoEvents, VecMem};

/// Bytes per DMA job.
const DMA_LEN: u64 = 1 << 20;
/// The job's source and destination VAs (ASID 1).
const SRC_VA: u64 = 0x7f00_0000_0000;
const DST_VA: u64 = 0x7f00_4000_0000;
const ASID: u32 = 1;
/// IOTLB sizes benchmarked.
const IOTLB_SIZES: [usize; 2] = [64, 4096];
/// Time per measurement of the ratio loops.
const RATIO_BUDGET: Duration = Duration::from_millis(60);
/// Rounds of the ratio loops (odd: the median is one of them).
const ROUNDS: usize = 9;

// ---------------------------------------------------------------------------------------------
// Fixtures

fn entry(va: u64, id: u64) -> IotlbEntry {
    IotlbEntry {
        asid: ASID,
        va_base: va,
        size: PAGE_SIZE,
        pa_base: 0x100_0000 + (id % 4096) * PAGE_SIZE,
        writable: true,
        dirty: true,
        id,
        cpu_dirty_at_fill: false,
    }
}

/// A full LRU IOTLB of `cap` 4 KiB entries, and the VAs it holds (spread out, not contiguous).
fn full_iotlb(cap: usize) -> (Iotlb, Vec<u64>) {
    let mut t = Iotlb::new(cap, Policy::Lru);
    let vas: Vec<u64> = (0..cap as u64)
        .map(|i| SRC_VA + i * 3 * PAGE_SIZE)
        .collect();
    for (i, &va) in vas.iter().enumerate() {
        t.insert(entry(va, i as u64));
    }
    assert_eq!(t.len(), cap);
    (t, vas)
}

/// Cycles through every present entry: one hit per call.
struct Hits {
    t: Iotlb,
    vas: Vec<u64>,
    i: usize,
}

impl Hits {
    fn new(cap: usize) -> Self {
        let (t, vas) = full_iotlb(cap);
        Self { t, vas, i: 0 }
    }

    fn step(&mut self) -> Option<IotlbEntry> {
        self.i = (self.i + 1) % self.vas.len();
        let e = self.t.lookup(ASID, black_box(self.vas[self.i] + 0x123));
        debug_assert!(e.is_some());
        e
    }
}

/// A miss on a new page, then its insert evicting the least recently used entry.
struct Misses {
    t: Iotlb,
    next: u64,
}

impl Misses {
    fn new(cap: usize) -> Self {
        Self {
            t: full_iotlb(cap).0,
            next: 0x1000_0000,
        }
    }

    fn step(&mut self) -> Option<IotlbEntry> {
        self.next += PAGE_SIZE;
        let va = black_box(self.next);
        let hit = self.t.lookup(ASID, va);
        debug_assert!(hit.is_none());
        self.t.insert(entry(va, self.next / PAGE_SIZE))
    }
}

/// Device page tables with one 4 KiB and one 2 MiB mapping, walked once so A is set.
struct Walks {
    mem: VecMem,
    root: u64,
}

const WALK_VA_4K: u64 = 0x7f12_3456_7000;
const WALK_VA_2M: u64 = 0x7f12_3480_0000;

impl Walks {
    fn new() -> Self {
        let mem = VecMem::new(0, 16 << 20);
        let mut b = PageTableBuilder::new(&mem, 0x10_0000, 0x20_0000).expect("table region");
        b.map_4k(&mem, WALK_VA_4K, 0x40_0000, true).expect("4K map");
        b.map_2m(&mem, WALK_VA_2M, 0x80_0000, true).expect("2M map");
        let root = b.root();
        for va in [WALK_VA_4K, WALK_VA_2M] {
            walk(&mem, root, va, false).expect("walk");
        }
        Self { mem, root }
    }

    fn walk(&self, va: u64) -> Translation {
        walk(&self.mem, self.root, black_box(va), false).expect("walk")
    }
}

/// A `Write` that only counts bytes (shared with the bench; the trace writer's background
/// thread writes to it): the trace's CPU cost without a disk, and its size.
#[derive(Clone, Default)]
struct ByteCount(Arc<AtomicU64>);

impl ByteCount {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The trace writer behind a switch: the same rig (same memory layout, which moves a job's
/// time by more than the trace costs from one process to the next) timed with the trace on
/// and off.
struct Traced {
    on: bool,
    w: TraceWriter<ByteCount>,
}

impl Events for Traced {
    #[inline(always)]
    fn event(&mut self, ev: &Event) {
        if self.on {
            self.w.event(ev)
        }
    }
}

/// A rig tracing into a byte counter, and the counter.
fn traced_rig() -> (Rig<Traced>, ByteCount) {
    let bytes = ByteCount::default();
    let w = TraceWriter::new(bytes.clone()).expect("trace writer");
    (dma_rig(true, Traced { on: true, w }), bytes)
}

/// A rig with ASID 1 bound (validating or not) and `DMA_LEN` bytes mapped at both VAs.
fn dma_rig<E: Events>(validate: bool, events: E) -> Rig<E> {
    dma_rig_with(DeviceConfig::default(), validate, events)
}

/// [`dma_rig`] with another model configuration.
fn dma_rig_with<E: Events>(config: DeviceConfig, validate: bool, events: E) -> Rig<E> {
    let mut r = Rig::new(config, events);
    r.bind(ASID, 0);
    if !validate {
        let mut c = r.ctx(ASID);
        c.flags |= pte::CTX_NO_VALIDATE;
        r.write_ctx(ASID, c);
        r.cfgi(ASID);
    }
    for i in 0..DMA_LEN / PAGE_SIZE {
        let src = r.map_page(ASID, SRC_VA + i * PAGE_SIZE);
        r.map_page(ASID, DST_VA + i * PAGE_SIZE);
        let fill: Vec<u8> = (0..PAGE_SIZE).map(|b| (b ^ i) as u8).collect();
        r.poke(src, &fill);
    }
    // One job outside any measurement: checks the copy, and leaves A/D set as in steady state.
    dma_copy(&mut r);
    let first = |r: &Rig<E>, va: u64| {
        let pa = r.dev_leaf(ASID, va).expect("mapped") & pte::PTE_ADDR_MASK;
        r.peek(pa, 64)
    };
    let last = DMA_LEN - PAGE_SIZE;
    assert_eq!(first(&r, SRC_VA), first(&r, DST_VA));
    assert_eq!(first(&r, SRC_VA + last), first(&r, DST_VA + last));
    assert_eq!(r.stat(STAT_VIOLATIONS), 0);
    r
}

fn dma_copy<E: Events>(r: &mut Rig<E>) {
    let st = r.dma(job(DMA_COPY, ASID, SRC_VA, DST_VA, DMA_LEN, 0));
    assert_eq!((st.status, st.bytes_done), (DMA_ST_OK, DMA_LEN));
}

struct Memcpy {
    src: Vec<u8>,
    dst: Vec<u8>,
}

impl Memcpy {
    fn new() -> Self {
        Self {
            src: (0..DMA_LEN).map(|i| i as u8).collect(),
            dst: vec![0; DMA_LEN as usize],
        }
    }

    fn copy(&mut self) {
        self.dst.copy_from_slice(black_box(&self.src));
        black_box(&mut self.dst);
    }
}

// ---------------------------------------------------------------------------------------------
// Criterion groups

fn bench_iotlb(c: &mut Criterion) {
    let mut g = c.benchmark_group("iotlb");
    for cap in IOTLB_SIZES {
        let mut h = Hits::new(cap);
        g.bench_function(format!("hit/{cap}"), |b| b.iter(|| h.step()));
        let mut m = Misses::new(cap);
        g.bench_function(format!("miss_insert_evict/{cap}"), |b| b.iter(|| m.step()));
    }
    g.finish();
}

fn bench_walk(c: &mut Criterion) {
    let w = Walks::new();
    let mut g = c.benchmark_group("walk");
    g.bench_function("4k_leaf", |b| b.iter(|| w.walk(WALK_VA_4K + 0x123)));
    g.bench_function("2m_leaf", |b| b.iter(|| w.walk(WALK_VA_2M + 0x12_3456)));
    g.finish();
}

/// One `dma_access` (the kind written per page and side): a binary record, with the clock shared
/// as by default and read for each, and a JSON line.
fn bench_trace(c: &mut Criterion) {
    fn one<E: Events>(w: &mut E, va: &mut u64) {
        *va += PAGE_SIZE;
        w.event(&Event::Engine(Activity::DmaAccess {
            job: 17,
            asid: ASID,
            va: black_box(*va),
            pa: 0x1234_5000,
            len: PAGE_SIZE,
            write: true,
            id: 4711,
            // A clean judged step: every fact present, as in a validated run.
            judged: true,
            released: false,
            cpu_pa: Some(0x1234_5000),
            cpu_w: true,
            cpu_d: true,
            fill_d: true,
            after: true,
            after_pa: Some(0x1234_5000),
            after_w: true,
        }));
    }
    let mut va = SRC_VA;
    let mut g = c.benchmark_group("trace");
    let mut w = TraceWriter::new(ByteCount::default()).expect("trace writer");
    g.bench_function("dma_access_record", |b| b.iter(|| one(&mut w, &mut va)));
    let mut w = TraceWriter::with_exact_time(ByteCount::default(), true).expect("trace writer");
    g.bench_function("dma_access_record_exact_time", |b| {
        b.iter(|| one(&mut w, &mut va))
    });
    let mut w = JsonTraceWriter::new(ByteCount::default());
    g.bench_function("dma_access_json_line", |b| b.iter(|| one(&mut w, &mut va)));
    g.finish();
}

fn bench_dma(c: &mut Criterion) {
    let mut g = c.benchmark_group("dma_copy_1MiB");
    g.throughput(Throughput::Bytes(DMA_LEN));
    g.sample_size(10);
    let mut on = dma_rig(true, NoEvents);
    g.bench_function("device_validator_on", |b| b.iter(|| dma_copy(&mut on)));
    let mut off = dma_rig(false, NoEvents);
    g.bench_function("device_validator_off", |b| b.iter(|| dma_copy(&mut off)));
    let (mut traced, _) = traced_rig();
    g.bench_function("device_validator_on_trace", |b| {
        b.iter(|| dma_copy(&mut traced))
    });
    let mut m = Memcpy::new();
    g.bench_function("memcpy", |b| b.iter(|| m.copy()));
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// Ratios, measured again with plain timed loops in this process

/// Mean time of one call of `f`, over at least `RATIO_BUDGET` (after one warm-up call).
fn mean_time(mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut n = 0u32;
    while n < 3 || start.elapsed() < RATIO_BUDGET {
        f();
        n += 1;
    }
    start.elapsed() / n
}

/// [`mean_time`] of a cheap operation in nanoseconds, timed in batches of 1000 to keep the
/// clock out.
fn mean_op_ns<T>(mut f: impl FnMut() -> T) -> f64 {
    let batch = mean_time(|| {
        for _ in 0..1000 {
            black_box(f());
        }
    });
    ns(batch) / 1000.0
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn rate(bps: f64) -> String {
    const MIB: f64 = (1 << 20) as f64;
    if bps >= 1024.0 * MIB {
        format!("{:.1} GiB/s", bps / (1024.0 * MIB))
    } else {
        format!("{:.0} MiB/s", bps / MIB)
    }
}

/// The median and range of per-round values.
#[derive(Clone, Copy, Debug)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        Self {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "median": self.median, "min": self.min, "max": self.max })
    }

    /// `median [min-max]` with `digits` decimals.
    fn show(&self, digits: usize) -> String {
        format!(
            "{:.digits$} [{:.digits$}-{:.digits$}]",
            self.median, self.min, self.max
        )
    }

    /// A share as `median% [min-max%]`.
    fn percent(&self) -> String {
        format!(
            "{:.0}% [{:.0}-{:.0}%]",
            self.median * 100.0,
            self.min * 100.0,
            self.max * 100.0
        )
    }
}

/// Where the JSON goes: `$CARGO_TARGET_DIR`, else the workspace's `target/`.
fn target_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.parent().unwrap_or(manifest).join("target"))
}

/// What one job costs the device, from its statistics.
fn per_job<E: Events>(r: &mut Rig<E>) -> serde_json::Value {
    let before: Vec<u64> = (0..STAT_COUNT).map(|i| r.stat(i)).collect();
    dma_copy(r);
    let after: Vec<u64> = (0..STAT_COUNT).map(|i| r.stat(i)).collect();
    let d = |i: u32| after[i as usize] - before[i as usize];
    serde_json::json!({
        "iotlb_hits": d(STAT_IOTLB_HITS),
        "iotlb_misses": d(STAT_IOTLB_MISSES),
        "walks": d(STAT_WALKS),
    })
}

/// Trace bytes and lines one job writes.
fn trace_per_job(r: &mut Rig<Traced>, bytes: &ByteCount) -> (u64, u64) {
    let w = &mut r.dev.events().w;
    w.flush().expect("flush to a counter");
    let (b0, l0) = (bytes.get(), w.len());
    dma_copy(r);
    let w = &mut r.dev.events().w;
    w.flush().expect("flush to a counter");
    (bytes.get() - b0, w.len() - l0)
}

/// Trace bytes per MiB copied, binary and as JSON Lines, and events per MiB, with steps of at
/// most `step` bytes (512: the old engine's bursts, one `dma_access` per side per 512 bytes)
/// and an IOTLB of `entries` (64: every page misses, so each step also traces a fill and an
/// eviction; 4096: after the warm-up job every page hits).
fn trace_volume(step: u32, entries: u32) -> (u64, u64, u64) {
    let config = DeviceConfig {
        dma_burst: step,
        iotlb_entries: entries,
        ..DeviceConfig::default()
    };
    let (bin, json) = (ByteCount::default(), ByteCount::default());
    let w = TraceWriter::new(bin.clone()).expect("trace writer");
    let mut r = dma_rig_with(config, true, Fanout(w, JsonTraceWriter::new(json.clone())));
    let flush = |r: &mut Rig<Fanout<TraceWriter<ByteCount>, JsonTraceWriter<ByteCount>>>| {
        let f = r.dev.events();
        f.0.flush()
            .and_then(|()| f.1.flush())
            .expect("flush to counters");
        (bin.get(), json.get(), f.0.len())
    };
    let (b0, j0, l0) = flush(&mut r);
    dma_copy(&mut r);
    let (b1, j1, l1) = flush(&mut r);
    let per_mib = |v: u64| v * (1 << 20) / DMA_LEN;
    (per_mib(b1 - b0), per_mib(j1 - j0), per_mib(l1 - l0))
}

fn ratios() {
    let config = DeviceConfig::default();
    let mut on = dma_rig(true, NoEvents);
    let mut off = dma_rig(false, NoEvents);
    let (mut traced, bytes) = traced_rig();
    let mut m = Memcpy::new();

    // Every round times each variant once, in turn.
    let mut t = [vec![], vec![], vec![], vec![], vec![]];
    for _ in 0..ROUNDS {
        t[0].push(mean_time(|| m.copy()).as_secs_f64());
        t[1].push(mean_time(|| dma_copy(&mut on)).as_secs_f64());
        t[2].push(mean_time(|| dma_copy(&mut off)).as_secs_f64());
        traced.dev.events().on = true;
        t[3].push(mean_time(|| dma_copy(&mut traced)).as_secs_f64());
        traced.dev.events().on = false;
        t[4].push(mean_time(|| dma_copy(&mut traced)).as_secs_f64());
    }
    traced.dev.events().on = true;
    let [t_memcpy, t_on, t_off, t_trace, t_untraced] = &t;
    let per_round = |f: &dyn Fn(usize) -> f64| Spread::of((0..ROUNDS).map(f).collect());
    let bps = |ts: &[f64]| per_round(&|i| DMA_LEN as f64 / ts[i]);
    let (memcpy_bps, on_bps, off_bps, trace_bps) =
        (bps(t_memcpy), bps(t_on), bps(t_off), bps(t_trace));
    // Device throughput as a share of memcpy's (the target: >= 50%).
    let on_share = per_round(&|i| t_memcpy[i] / t_on[i]);
    let off_share = per_round(&|i| t_memcpy[i] / t_off[i]);
    let trace_share = per_round(&|i| t_memcpy[i] / t_trace[i]);
    let on_over_off = per_round(&|i| t_on[i] / t_off[i]);
    let trace_over_on = per_round(&|i| t_trace[i] / t_on[i]);
    // The same rig with its trace switched off: no layout difference in the ratio.
    let trace_over_untraced = per_round(&|i| t_trace[i] / t_untraced[i]);
    let validator_part = per_round(&|i| 1.0 - t_off[i] / t_on[i]);
    let trace_part = per_round(&|i| 1.0 - t_on[i] / t_trace[i]);

    let on_job = per_job(&mut on);
    let (trace_bytes, trace_lines) = trace_per_job(&mut traced, &bytes);
    let trace_bytes_per_mib = trace_bytes as f64 * (1u64 << 20) as f64 / DMA_LEN as f64;

    let mut hit_ns = serde_json::Map::new();
    let mut miss_ns = serde_json::Map::new();
    let mut hit_text = vec![];
    let mut miss_text = vec![];
    for cap in IOTLB_SIZES {
        let mut h = Hits::new(cap);
        let mut mi = Misses::new(cap);
        let hit = mean_op_ns(|| h.step());
        let miss = mean_op_ns(|| mi.step());
        hit_ns.insert(cap.to_string(), hit.into());
        miss_ns.insert(cap.to_string(), miss.into());
        hit_text.push(format!("{hit:.1} ns ({cap})"));
        miss_text.push(format!("{miss:.1} ns ({cap})"));
    }
    let w = Walks::new();
    let walk_4k = mean_op_ns(|| w.walk(WALK_VA_4K));
    let walk_2m = mean_op_ns(|| w.walk(WALK_VA_2M));

    println!();
    println!(
        "zapguard ratios (this run; {} MiB DMA_COPY, steps of at most {} bytes, {}-entry {:?} \
         IOTLB; median [range] of {ROUNDS} interleaved rounds of {} ms per variant):",
        DMA_LEN >> 20,
        config.dma_burst,
        config.iotlb_entries,
        config.iotlb_policy,
        RATIO_BUDGET.as_millis()
    );
    println!(
        "  device / memcpy throughput, validator on       = {} (device {}, memcpy {})",
        on_share.percent(),
        rate(on_bps.median),
        rate(memcpy_bps.median)
    );
    println!(
        "  device / memcpy throughput, validator off      = {} (device {})",
        off_share.percent(),
        rate(off_bps.median)
    );
    println!(
        "  device / memcpy throughput, validator + trace  = {} (device {})",
        trace_share.percent(),
        rate(trace_bps.median)
    );
    println!(
        "  validator on / off time = {}x (validator {} of a job)",
        on_over_off.show(2),
        validator_part.percent()
    );
    println!(
        "  trace on / off time     = {}x (trace {} of a job; {trace_lines} events, {} bytes per \
         MiB copied); on / off on the same rig = {}x",
        trace_over_on.show(2),
        trace_part.percent(),
        trace_bytes_per_mib as u64,
        trace_over_untraced.show(2)
    );
    println!(
        "  iotlb hit {}; miss+insert+evict {}",
        hit_text.join(", "),
        miss_text.join(", ")
    );
    println!("  page walk {walk_4k:.1} ns (4 KiB leaf), {walk_2m:.1} ns (2 MiB leaf)");
    println!("  per 1 MiB job (validator on): {on_job}");
    let mut volume = serde_json::Map::new();
    for entries in [64, 4096] {
        let (old_b, old_j, old_l) = trace_volume(512, entries);
        let (new_b, new_j, new_l) = trace_volume(PAGE_SIZE as u32, entries);
        println!(
            "  trace per MiB copied, {entries}-entry IOTLB: page steps {new_b} bytes binary, \
             {new_j} as JSON ({new_l} events); 512-byte steps {old_b} binary, {old_j} as JSON \
             ({old_l} events): binary in page steps {:.1}x smaller than JSON in 512-byte steps",
            old_j as f64 / new_b as f64
        );
        volume.insert(
            format!("iotlb_{entries}"),
            serde_json::json!({
                "page_steps": { "bytes": new_b, "json_bytes": new_j, "lines": new_l },
                "steps_512": { "bytes": old_b, "json_bytes": old_j, "lines": old_l },
            }),
        );
    }

    let json = serde_json::json!({
        "config": {
            "dma_len": DMA_LEN,
            "dma_burst": config.dma_burst,
            "iotlb_entries": config.iotlb_entries,
            "iotlb_policy": format!("{:?}", config.iotlb_policy),
            "asid_count": config.asid_count,
            "page_size": PAGE_SIZE,
            "huge_page_size": HUGE_PAGE_SIZE,
            "ring_log2": RING_LOG2,
            "iotlb_sizes_benchmarked": IOTLB_SIZES,
            "ratio_loop_ms": RATIO_BUDGET.as_millis() as u64,
            "rounds": ROUNDS,
        },
        "dma_copy": {
            "per_job": on_job,
            "validator_on": { "bytes_per_sec": on_bps.json() },
            "validator_off": { "bytes_per_sec": off_bps.json() },
            "validator_on_trace": { "bytes_per_sec": trace_bps.json() },
            "memcpy": { "bytes_per_sec": memcpy_bps.json() },
            "trace": {
                "bytes_per_job": trace_bytes,
                "lines_per_job": trace_lines,
                "bytes_per_mib": trace_bytes_per_mib,
                "per_mib_by_config": volume,
            },
        },
        "ratios": {
            "dma_copy_over_memcpy": per_round(&|i| t_on[i] / t_memcpy[i]).json(),
            "dma_copy_no_validator_over_memcpy": per_round(&|i| t_off[i] / t_memcpy[i]).json(),
            "dma_copy_trace_over_memcpy": per_round(&|i| t_trace[i] / t_memcpy[i]).json(),
            "validator_on_over_off": on_over_off.json(),
            "trace_on_over_off": trace_over_on.json(),
            "trace_on_over_off_same_rig": trace_over_untraced.json(),
        },
        "iotlb_ns": { "hit": hit_ns, "miss_insert_evict": miss_ns },
        "walk_ns": { "4k_leaf": walk_4k, "2m_leaf": walk_2m },
        "generated_unix_s": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    let dir = target_dir().join("zapguard");
    let path = dir.join("bench-device.json");
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&json).unwrap_or_default() + "\n",
        )
    });
    match written {
        Ok(()) => println!("  -> {}", path.display()),
        Err(e) => eprintln!("  could not write {}: {e}", path.display()),
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench_iotlb(&mut c);
    bench_walk(&mut c);
    bench_trace(&mut c);
    bench_dma(&mut c);
    c.final_summary();
    // `cargo bench` passes --bench; `cargo test --benches` does not (criterion then runs every
    // benchmark once as a smoke test, and so should we: no timed loops).
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list") {
        ratios();
    }
}
