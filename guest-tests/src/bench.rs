//! In-guest benchmarks (`zapguard-guest-tests --bench [--smoke]`): the cost of mirroring,
//! shootdowns and device DMA, side by side with the kernel's `test_hmm` and with the bare costs
//! of the emulated hardware, measured in the same boot.
//!
//! Each measurement prints one line `ZAPGUARD-BENCH {json}` with its raw samples (nanoseconds,
//! or another `unit`); the host (`cargo xtask bench`) computes medians, p99s and ratios. Absolute
//! times under TCG are noise; ratios measured in one run are the result.

use crate::dev::{self, Mapping};
use crate::dmirror::{run as hmm_run, HMM_DMIRROR_READ};
use shared_regs::dma::*;
use shared_regs::testing::*;
use shared_regs::uapi::*;
use std::fs::File;
use std::time::Instant;

use crate::dev::PG;
const MIB: usize = 1 << 20;
/// test_hmm READ chunk (its sink buffer must fit next to the benchmark's buffer in 512 MiB).
const CHUNK: usize = 16 * MIB;

/// Problem sizes: full runs for `just bench`, tiny ones for the smoke test in `just test`.
pub struct Sizes {
    /// Buffers mirrored for the populate benchmarks, and read on first touch.
    pub populate: Vec<usize>,
    /// munmap benchmark buffer.
    pub munmap: usize,
    /// Device copy: buffer size (each job copies this much) and jobs.
    pub copy: (usize, usize),
    /// IOTLB working sets, in pages.
    pub iotlb_ws: Vec<usize>,
    /// Range sizes for the scaling benchmark.
    pub scaling: Vec<usize>,
    /// Repetitions of each measurement.
    pub reps: usize,
}

impl Sizes {
    /// The sizes `just bench` uses (the guest has 512 MiB of RAM).
    pub fn full() -> Self {
        Self {
            populate: vec![64 * MIB, 256 * MIB],
            munmap: 64 * MIB,
            copy: (64 * MIB, 4),
            iotlb_ws: vec![16, 32, 64, 128, 256],
            scaling: vec![PG, 64 * 1024, MIB, 16 * MIB, 128 * MIB],
            reps: 5,
        }
    }

    /// Tiny sizes that still go through every code path.
    pub fn smoke() -> Self {
        Self {
            populate: vec![2 * MIB],
            munmap: 2 * MIB,
            copy: (2 * MIB, 2),
            iotlb_ws: vec![16, 128],
            scaling: vec![PG, 2 * MIB],
            reps: 2,
        }
    }
}

/// One measurement's samples.
#[derive(Debug, Clone)]
pub struct Record {
    /// Name, e.g. `populate_thp_64m.zapguard`.
    pub name: String,
    /// Unit of the samples.
    pub unit: &'static str,
    /// Raw samples.
    pub samples: Vec<u64>,
    /// Bytes (or pages) the measurement covers, for rates.
    pub size: u64,
    /// ASID of the context it used, if any (the host reads its IOTLB hit rate from the trace).
    pub asid: Option<u32>,
}

impl Record {
    fn json(&self) -> String {
        let samples: Vec<String> = self.samples.iter().map(u64::to_string).collect();
        format!(
            "{{\"name\":\"{}\",\"unit\":\"{}\",\"size\":{},\"asid\":{},\"samples\":[{}]}}",
            self.name,
            self.unit,
            self.size,
            self.asid.map_or("null".into(), |a| a.to_string()),
            samples.join(",")
        )
    }
}

fn ns(t: Instant) -> u64 {
    t.elapsed().as_nanos() as u64
}

fn err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn open() -> Result<File, String> {
    dev::open().map_err(err("open /dev/zapguard"))
}

/// A touched buffer of `len` bytes, THP-backed or forced to 4 KiB pages.
fn buffer(len: usize, thp: bool) -> Result<Mapping, String> {
    let mut m = if thp {
        Mapping::anon_huge(len)
    } else {
        Mapping::anon(len)
    }
    .map_err(err("mmap"))?;
    if !thp {
        m.madvise(0, len, libc::MADV_NOHUGEPAGE)
            .map_err(err("MADV_NOHUGEPAGE"))?;
    }
    m.bytes_mut().fill(1);
    if thp {
        // The fault path falls back to small pages when it finds no free 2 MiB block; collapse
        // synchronously so that "THP" means THP (best effort: the result is measured anyway).
        let _ = m.madvise(0, len, dev::MADV_COLLAPSE);
    }
    Ok(m)
}

/// Mirrors `m` through test_hmm (`HMM_DMIRROR_READ`, which also copies the pages out), in chunks
/// so that the sink fits next to the buffer in the guest's RAM.
fn hmm_mirror(d: &File, m: &Mapping) -> Result<(), String> {
    let chunk = m.len.min(CHUNK);
    let mut sink = vec![0u8; chunk];
    for off in (0..m.len).step_by(chunk) {
        hmm_run(
            d,
            HMM_DMIRROR_READ,
            m.addr + off,
            sink.as_mut_ptr(),
            chunk / PG,
        )
        .map_err(err("HMM_DMIRROR_READ"))?;
    }
    Ok(())
}

/// Records of one measurement for several drivers: `NAME.WHO`.
fn push_each(out: &mut Vec<Record>, name: &str, size: usize, each: Vec<(&str, Vec<u64>)>) {
    for (who, samples) in each {
        out.push(Record {
            name: format!("{name}.{who}"),
            unit: "ns",
            samples,
            size: size as u64,
            asid: None,
        });
    }
}

fn label(len: usize) -> String {
    if len >= MIB {
        format!("{}m", len / MIB)
    } else {
        format!("{}k", len / 1024)
    }
}

fn populate(sizes: &Sizes, out: &mut Vec<Record>) -> Result<(), String> {
    let d = crate::dmirror::open().map_err(err("/dev/hmm_dmirror0"))?;
    for &len in &sizes.populate {
        for thp in [false, true] {
            let kind = if thp { "thp" } else { "4k" };
            let (mut zg, mut hm) = (Vec::new(), Vec::new());
            for round in 0..sizes.reps {
                progress(
                    &format!("populate_{kind}_{}", label(len)),
                    round,
                    sizes.reps,
                );
                let f = open()?;
                let m = buffer(len, thp)?;
                let t = Instant::now();
                dev::map(&f, m.addr, len, 0).map_err(err("MAP"))?;
                zg.push(ns(t));
                drop(m);
                // test_hmm's READ also copies the pages out: part of its cost.
                let m = buffer(len, thp)?;
                let t = Instant::now();
                hmm_mirror(&d, &m)?;
                hm.push(ns(t));
            }
            let name = format!("populate_{kind}_{}", label(len));
            push_each(out, &name, len, vec![("zapguard", zg), ("test_hmm", hm)]);
        }
    }
    Ok(())
}

/// The device's first touch of a buffer, like for like with test_hmm: both read a touched
/// buffer into a user buffer, neither has mapped it before. zapguard's device takes faults (no
/// MAP; each served fault maps the 2 MiB block around it), test_hmm faults its READ's range.
/// The two sides alternate within each round, so that a ratio compares neighbours.
fn first_touch(sizes: &Sizes, out: &mut Vec<Record>) -> Result<(), String> {
    let d = crate::dmirror::open().map_err(err("/dev/hmm_dmirror0"))?;
    let chunk = ZG_DMA_BOUNCE_MAX as usize;
    let mut sink = vec![0u8; CHUNK];
    for &len in &sizes.populate {
        for thp in [false, true] {
            let kind = if thp { "thp" } else { "4k" };
            let name = format!("first_touch_read_{kind}_{}", label(len));
            let (mut zg, mut hm, mut faults, mut pages) = (vec![], vec![], vec![], vec![]);
            for round in 0..sizes.reps {
                progress(&name, round, sizes.reps);
                let f = open()?;
                let m = buffer(len, thp)?;
                let t = Instant::now();
                for off in (0..len).step_by(chunk) {
                    let job = dev::job(DMA_READ, m.addr + off, 0, chunk, sink.as_mut_ptr() as u64);
                    dev::dma(&f, job).map_err(|(e, _)| format!("READ: {e}"))?;
                }
                zg.push(ns(t));
                let s = dev::stats(&f).map_err(err("STATS"))?;
                faults.push(s.faults_resolved);
                pages.push(s.fault_pages);
                drop(m);
                let m = buffer(len, thp)?;
                let t = Instant::now();
                hmm_mirror(&d, &m)?;
                hm.push(ns(t));
            }
            push_each(out, &name, len, vec![("zapguard", zg), ("test_hmm", hm)]);
            for (what, samples) in [("faults", faults), ("fault_pages", pages)] {
                out.push(Record {
                    name: format!("{name}.{what}"),
                    unit: "count",
                    samples,
                    size: len as u64,
                    asid: None,
                });
            }
        }
    }
    Ok(())
}

/// A device read of a mirrored buffer right after `fork()`, with fork's COW write-protect made a
/// device write-protect (the driver's way) and, interleaved, with it clearing the device PTEs
/// (`ZG_DBG_ZAP_WRITE_PROTECT`, the way before): time and device faults of each read.
fn fork_read(sizes: &Sizes, out: &mut Vec<Record>) -> Result<(), String> {
    let len = sizes.munmap;
    let (mut wp, mut zap, mut wp_faults, mut zap_faults) = (vec![], vec![], vec![], vec![]);
    for round in 0..sizes.reps {
        progress("fork_read", round, sizes.reps);
        for (mode, times, faults) in [
            (0, &mut wp, &mut wp_faults),
            (ZG_DBG_ZAP_WRITE_PROTECT, &mut zap, &mut zap_faults),
        ] {
            let f = open()?;
            dev::inject(&f, mode, 0).map_err(err("inject"))?;
            let m = buffer(len, false)?;
            dev::map(&f, m.addr, len, ZG_MAP_WRITE).map_err(err("MAP"))?;
            // A child sharing the buffer, alive (and looking at nothing) during the job.
            let child = crate::proc::GatedChild::fork(|| 0)?;
            let s0 = dev::stats(&f).map_err(err("STATS"))?;
            let t = Instant::now();
            dev::dma(&f, dev::job(DMA_CHECKSUM, m.addr, 0, len, 0))
                .map_err(|(e, _)| format!("CHECKSUM: {e}"))?;
            times.push(ns(t));
            let s1 = dev::stats(&f).map_err(err("STATS"))?;
            faults.push(s1.faults - s0.faults);
            child.release();
        }
    }
    push_each(
        out,
        "fork_read",
        len,
        vec![("write_protect", wp), ("zap", zap)],
    );
    for (what, samples) in [
        ("write_protect_faults", wp_faults),
        ("zap_faults", zap_faults),
    ] {
        out.push(Record {
            name: format!("fork_read.{what}"),
            unit: "count",
            samples,
            size: len as u64,
            asid: None,
        });
    }
    Ok(())
}

/// A progress line for the host (`just bench` shows the guest's `#` lines as they come).
fn progress(what: &str, round: usize, rounds: usize) {
    println!("# bench: {what} round {}/{rounds}", round + 1);
}

fn munmap(sizes: &Sizes, out: &mut Vec<Record>) -> Result<(), String> {
    let len = sizes.munmap;
    let d = crate::dmirror::open().map_err(err("/dev/hmm_dmirror0"))?;
    let f = open()?;
    let (mut bare, mut zg, mut hm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..sizes.reps {
        for (i, samples) in [&mut bare, &mut zg, &mut hm].into_iter().enumerate() {
            let mut m = buffer(len, false)?;
            match i {
                1 => {
                    dev::map(&f, m.addr, len, 0).map_err(err("MAP"))?;
                }
                2 => hmm_mirror(&d, &m)?,
                _ => {}
            }
            let t = Instant::now();
            m.unmap();
            samples.push(ns(t));
        }
    }
    let name = format!("munmap_{}", label(len));
    push_each(
        out,
        &name,
        len,
        vec![("unmirrored", bare), ("zapguard", zg), ("test_hmm", hm)],
    );
    Ok(())
}

fn shootdown(sizes: &Sizes, out: &mut Vec<Record>) -> Result<(), String> {
    let f = open()?;
    let reps = sizes.reps * 10;
    let (mut total, mut sync, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    // Bare costs, interleaved with the shootdowns: the same madvise of a page nothing mirrors,
    // a syscall that reaches the driver (an unknown ioctl), and GET_INFO, which adds exactly 5
    // MMIO reads.
    let (mut null, mut info) = (Vec::new(), Vec::new());
    for round in 0..reps {
        if round % 10 == 0 {
            progress("shootdown_1page", round / 10, sizes.reps);
        }
        let mut m = buffer(PG, false)?;
        dev::map(&f, m.addr, PG, 0).map_err(err("MAP"))?;
        let s0 = dev::stats(&f).map_err(err("STATS"))?;
        let t = Instant::now();
        m.madvise(0, PG, libc::MADV_DONTNEED)
            .map_err(err("madvise"))?;
        total.push(ns(t));
        let s1 = dev::stats(&f).map_err(err("STATS"))?;
        sync.push(s1.sync_wait_ns - s0.sync_wait_ns);
        m.unmap();
        let m = buffer(PG, false)?;
        let t = Instant::now();
        m.madvise(0, PG, libc::MADV_DONTNEED)
            .map_err(err("madvise"))?;
        bare.push(ns(t));
        drop(m);
        let t = Instant::now();
        let _ = dev::ioctl_raw(&f, 0x7a7f, 0);
        null.push(ns(t));
        let t = Instant::now();
        dev::get_info(&f).map_err(err("GET_INFO"))?;
        info.push(ns(t));
    }
    let mmio: Vec<u64> = info
        .iter()
        .zip(&null)
        .map(|(i, n)| i.saturating_sub(*n) / 5)
        .collect();
    let probe = dev::get_info(&f).map_err(err("GET_INFO"))?.probe_sync_ns;
    let rec = |name: &str, samples: Vec<u64>| Record {
        name: name.into(),
        unit: "ns",
        samples,
        size: PG as u64,
        asid: None,
    };
    out.push(rec("shootdown_1page.total", total));
    out.push(rec("shootdown_1page.sync_wait", sync));
    out.push(rec("shootdown_1page.unmirrored", bare));
    out.push(rec("mmio_read_round_trip", mmio));
    out.push(rec("doorbell_to_completion_probe", vec![u64::from(probe)]));
    Ok(())
}

fn dma_copy(sizes: &Sizes, out: &mut Vec<Record>) -> Result<(), String> {
    let (len, jobs) = sizes.copy;
    let f = open()?;
    let a = buffer(len, true)?;
    let mut b = buffer(len, true)?;
    dev::map(&f, a.addr, len, 0).map_err(err("MAP"))?;
    dev::map(&f, b.addr, len, ZG_MAP_WRITE).map_err(err("MAP"))?;
    // How much of the copy runs through 2 MiB device entries (one IOTLB fill per 512 pages).
    let huge = dev::stats(&f).map_err(err("STATS"))?.huge_mapped;
    let (src, dst) = (a.addr, b.addr);
    let copy = |samples: &mut Vec<u64>| -> Result<(), String> {
        let t = Instant::now();
        for _ in 0..jobs {
            dev::dma(&f, dev::job(DMA_COPY, src, dst, len, 0))
                .map_err(|(e, _)| format!("COPY: {e}"))?;
        }
        samples.push(ns(t));
        Ok(())
    };
    let (mut dev_ns, mut noval_ns, mut cpu_ns) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..sizes.reps {
        copy(&mut dev_ns)?;
        // The same copy with the device's validator off for this context.
        dev::inject(&f, ZG_DBG_NO_VALIDATE, 0).map_err(err("inject"))?;
        copy(&mut noval_ns)?;
        dev::inject(&f, 0, 0).map_err(err("inject"))?;
        let t = Instant::now();
        for _ in 0..jobs {
            b.bytes_mut().copy_from_slice(a.bytes());
            std::hint::black_box(b.bytes());
        }
        cpu_ns.push(ns(t));
    }
    let bytes = (len * jobs) as u64;
    let asid = dev::stats(&f).ok().map(|s| s.asid);
    out.push(Record {
        name: "dma_copy.huge_entries".into(),
        unit: "count",
        samples: vec![huge],
        size: 2 * len as u64,
        asid: None,
    });
    for (name, samples, asid) in [
        ("dma_copy.device", dev_ns, asid),
        ("dma_copy.device_no_validator", noval_ns, None),
        ("dma_copy.guest_memcpy", cpu_ns, None),
    ] {
        out.push(Record {
            name: name.into(),
            unit: "ns",
            samples,
            size: bytes,
            asid,
        });
    }
    Ok(())
}

fn iotlb(sizes: &Sizes, out: &mut Vec<Record>) -> Result<(), String> {
    for &pages in &sizes.iotlb_ws {
        // One context per working set: the host reads its hit rate from the trace by ASID.
        let f = open()?;
        let m = buffer(pages * PG, false)?;
        dev::map(&f, m.addr, m.len, 0).map_err(err("MAP"))?;
        let mut samples = Vec::new();
        for _ in 0..sizes.reps {
            let t = Instant::now();
            for _ in 0..8 {
                dev::dma(&f, dev::job(DMA_CHECKSUM, m.addr, 0, m.len, 0))
                    .map_err(|(e, _)| format!("CHECKSUM: {e}"))?;
            }
            samples.push(ns(t));
        }
        out.push(Record {
            name: format!("iotlb_ws_{pages}"),
            unit: "ns",
            samples,
            size: (pages * PG * 8) as u64,
            asid: dev::stats(&f).ok().map(|s| s.asid),
        });
    }
    Ok(())
}

fn scaling(sizes: &Sizes, out: &mut Vec<Record>) -> Result<(), String> {
    let f = open()?;
    for &len in &sizes.scaling {
        let (mut pop, mut zap) = (Vec::new(), Vec::new());
        for _ in 0..sizes.reps {
            let m = buffer(len, false)?;
            let t = Instant::now();
            dev::map(&f, m.addr, len, 0).map_err(err("MAP"))?;
            pop.push(ns(t));
            let t = Instant::now();
            m.madvise(0, len, libc::MADV_DONTNEED)
                .map_err(err("madvise"))?;
            zap.push(ns(t));
        }
        for (what, samples) in [("populate", pop), ("shootdown", zap)] {
            out.push(Record {
                name: format!("scaling_{what}_{}", label(len)),
                unit: "ns",
                samples,
                size: len as u64,
                asid: None,
            });
        }
    }
    Ok(())
}

/// Runs every benchmark whose name contains `only` (all without it) and returns the records
/// (also printed as `ZAPGUARD-BENCH` lines).
pub fn run(sizes: &Sizes, only: Option<&str>) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    type Bench = fn(&Sizes, &mut Vec<Record>) -> Result<(), String>;
    let benches: [(&str, Bench); 8] = [
        ("first_touch", first_touch),
        ("populate", populate),
        ("munmap", munmap),
        ("fork_read", fork_read),
        ("shootdown", shootdown),
        ("dma_copy", dma_copy),
        ("iotlb", iotlb),
        ("scaling", scaling),
    ];
    for (name, bench) in benches {
        if only.is_some_and(|o| !name.contains(o)) {
            continue;
        }
        println!("# bench: {name}");
        let first = out.len();
        bench(sizes, &mut out).map_err(|e| format!("{name}: {e}"))?;
        for r in &out[first..] {
            println!("ZAPGUARD-BENCH {}", r.json());
        }
    }
    Ok(out)
}

/// The smoke test `just test` runs: every benchmark on tiny sizes, checking only that each
/// produced samples (timings are never asserted).
pub fn bench_smoke() -> Result<(), String> {
    crate::test_build()?;
    let sizes = Sizes::smoke();
    let records = run(&sizes, None)?;
    if let Some(r) = records.iter().find(|r| r.samples.is_empty()) {
        return Err(format!("{} produced no samples", r.name));
    }
    if records.len() < 20 {
        return Err(format!("only {} measurements", records.len()));
    }
    Ok(())
}
