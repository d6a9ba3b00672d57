//! `cargo xtask bench` (`just bench`): boots the guest with `zg.run=bench`, collects the
//! `ZAPGUARD-BENCH` records, measures the host's memcpy for the same bytes, takes IOTLB hit rates
//! from the device trace, prints a table of ratios and writes `target/zapguard/bench.json`.
//!
//! Benchmarks are not tests: targets missed are reported, never a failure.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// One measurement from the guest.
#[derive(Debug, Clone)]
pub struct Record {
    pub name: String,
    pub size: u64,
    pub asid: Option<u64>,
    pub samples: Vec<u64>,
}

impl Record {
    fn parse(line: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(line).ok()?;
        Some(Self {
            name: v["name"].as_str()?.to_string(),
            size: v["size"].as_u64()?,
            asid: v["asid"].as_u64(),
            samples: v["samples"]
                .as_array()?
                .iter()
                .filter_map(Value::as_u64)
                .collect(),
        })
    }

    /// Median sample.
    pub fn median(&self) -> f64 {
        pct(&self.samples, 50)
    }
}

/// The `p`-th percentile of `v` (nearest rank).
pub fn pct(v: &[u64], p: u32) -> f64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = (u64::from(p) * (s.len() as u64 - 1)).div_ceil(100) as usize;
    s[rank] as f64
}

/// Host memcpy of `len` bytes, `times` times, `reps` samples (ns each).
fn host_memcpy(len: usize, times: usize, reps: usize) -> Vec<u64> {
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..times {
                dst.copy_from_slice(&src);
                std::hint::black_box(&mut dst);
            }
            t.elapsed().as_nanos() as u64
        })
        .collect()
}

/// Ratios of neighbouring samples (`num[i] / den[i]`, the two sides of one round): their
/// median, minimum and maximum. Pairing the rounds keeps a slow phase of the machine out of the
/// ratio; the spread shows what remains.
pub fn paired(num: &[u64], den: &[u64]) -> (f64, f64, f64) {
    let mut r: Vec<f64> = num
        .iter()
        .zip(den)
        .filter(|(_, &d)| d > 0)
        .map(|(&n, &d)| n as f64 / d as f64)
        .collect();
    if r.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    r.sort_by(f64::total_cmp);
    (r[(r.len() - 1) / 2], r[0], r[r.len() - 1])
}

fn gib_s(bytes: u64, ns: f64) -> f64 {
    bytes as f64 / ns / 1.073_741_824
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// Prints the report and writes the JSON; `hit_rate` gives an ASID's IOTLB hit rate from the
/// trace.
pub fn report(
    lines: &[String],
    accel: &str,
    hit_rate: impl Fn(u64) -> Option<f64>,
    out: &Path,
) -> Result<(), String> {
    let recs: Vec<Record> = lines.iter().filter_map(|l| Record::parse(l)).collect();
    if recs.is_empty() {
        return Err("the guest printed no benchmark records".into());
    }
    let by: BTreeMap<&str, &Record> = recs.iter().map(|r| (r.name.as_str(), r)).collect();
    let med = |n: &str| by.get(n).map_or(f64::NAN, |r| r.median());
    let mut json_out = Vec::new();
    for r in &recs {
        json_out.push(json!({
            "name": r.name, "size": r.size, "asid": r.asid, "samples": r.samples,
            "median_ns": r.median(), "p99_ns": pct(&r.samples, 99),
        }));
    }
    println!(
        "\nzapguard benchmarks ({accel}; ratios from this one run; absolute times are TCG noise)\n"
    );

    let samples = |n: &str| by.get(n).map_or(&[][..], |r| r.samples.as_slice());
    println!("first-touch device READ into a user buffer (device faults, no MAP) vs test_hmm READ (like for like)");
    println!(
        "  {:<12} {:>14} {:>14} {:>22} {:>10}  target >= 1.0x",
        "buffer", "zapguard pg/s", "test_hmm pg/s", "ratio (min..max)", "pg/fault"
    );
    for r in recs
        .iter()
        .filter(|r| r.name.starts_with("first_touch_read_") && r.name.ends_with(".zapguard"))
    {
        let base = r.name.trim_end_matches(".zapguard");
        let pages = r.size as f64 / 4096.0;
        let hm = format!("{base}.test_hmm");
        let (ratio, lo, hi) = paired(samples(&hm), &r.samples);
        let per_fault = med(&format!("{base}.fault_pages")) / med(&format!("{base}.faults"));
        println!(
            "  {:<12} {:>14.0} {:>14.0} {:>9.2}x ({lo:.2}..{hi:.2}) {:>10.0}  {}",
            base.trim_start_matches("first_touch_read_"),
            pages / r.median() * 1e9,
            pages / med(&hm) * 1e9,
            ratio,
            per_fault,
            verdict(ratio >= 1.0)
        );
    }

    println!(
        "\npopulate (MAP a touched buffer; test_hmm READ also copies it out, so context only)"
    );
    println!(
        "  {:<16} {:>14} {:>14} {:>10}  target >= 1.0x",
        "buffer", "zapguard pg/s", "test_hmm pg/s", "ratio"
    );
    for r in recs
        .iter()
        .filter(|r| r.name.starts_with("populate_") && r.name.ends_with(".zapguard"))
    {
        let base = r.name.trim_end_matches(".zapguard");
        let pages = r.size as f64 / 4096.0;
        let (zg, hm) = (
            med(&format!("{base}.zapguard")),
            med(&format!("{base}.test_hmm")),
        );
        let ratio = hm / zg;
        println!(
            "  {:<16} {:>14.0} {:>14.0} {:>9.2}x  {}",
            base.trim_start_matches("populate_"),
            pages / zg * 1e9,
            pages / hm * 1e9,
            ratio,
            verdict(ratio >= 1.0)
        );
    }

    if let Some(r) = recs.iter().find(|r| r.name.ends_with(".unmirrored")) {
        let base = r.name.trim_end_matches(".unmirrored");
        let bare = med(&r.name);
        let (zg, hm) = (
            med(&format!("{base}.zapguard")) / bare,
            med(&format!("{base}.test_hmm")) / bare,
        );
        let (zr, zlo, zhi) = paired(samples(&format!("{base}.zapguard")), &r.samples);
        let _ = zg;
        println!("\nmunmap of {} MiB: zapguard-mirrored {zr:.2}x unmirrored ({zlo:.2}..{zhi:.2}; target <= 1.2x: {}), test_hmm-mirrored {hm:.2}x", r.size >> 20, verdict(zr <= 1.2));
    }

    if let Some(r) = by.get("fork_read.write_protect") {
        let mib = r.size as f64 / f64::from(1 << 20);
        let (ratio, lo, hi) = paired(samples("fork_read.zap"), &r.samples);
        println!(
            "\ndevice read of {} MiB right after fork: {:.1} faults/MiB, {:.1} ms with the COW write-protect made read-only device PTEs; {:.1} faults/MiB, {:.1} ms when it cleared them (before): {ratio:.2}x faster ({lo:.2}..{hi:.2})",
            mib as u64,
            med("fork_read.write_protect_faults") / mib,
            r.median() / 1e6,
            med("fork_read.zap_faults") / mib,
            med("fork_read.zap") / 1e6,
        );
    }

    if by.contains_key("shootdown_1page.total") {
        let (total, sync, mmio, bare) = (
            med("shootdown_1page.total"),
            med("shootdown_1page.sync_wait"),
            med("mmio_read_round_trip"),
            med("shootdown_1page.unmirrored"),
        );
        let doorbell = med("doorbell_to_completion_probe");
        println!(
            "\none-page shootdown (MADV_DONTNEED of a mirrored page): {:.1} us = driver+kernel {:.1} us + SYNC wait {:.1} us; the same madvise unmirrored {:.1} us, so mirroring adds {:.1} us",
            total / 1e3,
            (total - sync) / 1e3,
            sync / 1e3,
            bare / 1e3,
            (total - bare) / 1e3
        );
        let (sr, slo, shi) = paired(
            samples("shootdown_1page.total"),
            samples("mmio_read_round_trip"),
        );
        println!(
            "  vs one MMIO read round trip {:.1} us: {sr:.1}x ({slo:.1}..{shi:.1}; target <= 1.0x: {}); a posted doorbell + memory completion (probe SYNC) {:.1} us",
            mmio / 1e3,
            verdict(sr <= 1.0),
            doorbell / 1e3
        );
    }

    if let Some(dev) = by.get("dma_copy.device") {
        let bytes = dev.size;
        let jobs = 4.min(bytes.div_ceil(64 << 20).max(1)) as usize;
        let per = (bytes / jobs as u64) as usize;
        // The host side runs after the guest (pairing with the guest's rounds is impossible):
        // as many samples as the device side, so the spread of the ratio shows the machine's.
        let host = host_memcpy(per, jobs, dev.samples.len().max(5));
        let host_med = pct(&host, 50);
        json_out.push(json!({"name": "dma_copy.host_memcpy", "size": bytes, "samples": host, "median_ns": host_med, "p99_ns": pct(&host, 99)}));
        let (d, g) = (
            gib_s(bytes, dev.median()),
            gib_s(bytes, med("dma_copy.guest_memcpy")),
        );
        let h = gib_s(bytes, host_med);
        let nv = gib_s(bytes, med("dma_copy.device_no_validator"));
        let (_, lo, hi) = paired(&host, &dev.samples);
        println!(
            "\ndevice copy of {} MiB: {d:.2} GiB/s = {:.0}% ({:.0}..{:.0}%) of a host memcpy ({h:.2} GiB/s; target >= 50%: {}); guest memcpy under the same accelerator {g:.2} GiB/s (context only){}",
            bytes >> 20,
            100.0 * d / h,
            100.0 * lo,
            100.0 * hi,
            verdict(d / h >= 0.5),
            dev.asid.and_then(&hit_rate).map_or(String::new(), |r| format!("; IOTLB hit rate {:.1}%", 100.0 * r))
        );
        if let Some(h) = by.get("dma_copy.huge_entries") {
            println!(
                "  buffers: {} of {} MiB in 2 MiB device entries",
                h.median() as u64 * 2,
                h.size >> 20
            );
        }
        println!(
            "  validator off: {nv:.2} GiB/s ({:.2}x the validated copy)",
            nv / d
        );
    }

    println!("\nIOTLB working sets (8 CHECKSUM jobs over the set, 4 KiB pages)");
    for r in recs.iter().filter(|r| r.name.starts_with("iotlb_ws_")) {
        let rate = r.asid.and_then(&hit_rate);
        println!(
            "  {:>4} pages: {:>6.2} GiB/s, hit rate {}",
            r.name.trim_start_matches("iotlb_ws_"),
            gib_s(r.size, r.median()),
            rate.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x))
        );
    }

    println!("\nscaling (cost per 4 KiB page)");
    for r in recs
        .iter()
        .filter(|r| r.name.starts_with("scaling_populate_"))
    {
        let sz = r.name.trim_start_matches("scaling_populate_");
        let pages = (r.size / 4096).max(1) as f64;
        println!(
            "  {:>6}: populate {:>8.0} ns/page, shootdown {:>8.0} ns/page",
            sz,
            r.median() / pages,
            med(&format!("scaling_shootdown_{sz}")) / pages
        );
    }
    let doc = json!({"accelerator": accel, "records": json_out});
    std::fs::write(
        out,
        serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", out.display()))?;
    println!("\nraw samples, medians and p99s: {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_and_percentiles() {
        let r = Record::parse(
            r#"{"name":"x.zapguard","unit":"ns","size":4096,"asid":3,"samples":[5,1,3]}"#,
        )
        .expect("parse");
        assert_eq!(
            (r.name.as_str(), r.size, r.asid),
            ("x.zapguard", 4096, Some(3))
        );
        assert_eq!(r.median(), 3.0);
        assert_eq!(pct(&[1, 2, 3, 4, 100], 99), 100.0);
        assert!(Record::parse("nope").is_none());
    }

    #[test]
    fn paired_ratios_take_the_median_of_rounds() {
        let (m, lo, hi) = paired(&[10, 40, 30], &[10, 10, 10]);
        assert_eq!((m, lo, hi), (3.0, 1.0, 4.0));
        assert!(paired(&[], &[]).0.is_nan());
        // A zero denominator (no sample) is skipped, not a division by zero.
        assert_eq!(paired(&[5, 6], &[0, 2]).0, 3.0);
    }

    #[test]
    fn report_writes_json_with_every_record() {
        let lines = vec![
            r#"{"name":"populate_4k_2m.zapguard","unit":"ns","size":2097152,"asid":null,"samples":[100]}"#.to_string(),
            r#"{"name":"populate_4k_2m.test_hmm","unit":"ns","size":2097152,"asid":null,"samples":[200]}"#.to_string(),
        ];
        let out = std::env::temp_dir().join(format!("zg-bench-{}.json", std::process::id()));
        report(&lines, "test", |_| None, &out).expect("report");
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(&out).expect("read")).expect("json");
        assert_eq!(doc["records"].as_array().map(Vec::len), Some(2));
        std::fs::remove_file(&out).ok();
        assert!(report(&[], "test", |_| None, &out).is_err());
    }
}
