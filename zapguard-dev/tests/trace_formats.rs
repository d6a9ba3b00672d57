//! The binary trace and the JSON Lines trace of the same device run are the same events (up to
//! `t_ns`, which the binary writer reads less often), and `zapguard-trace`'s summary counts and
//! offline `check` (ledger included) say the same of both.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use shared_regs::dma::{DMA_COPY, DMA_FILL, DMA_ST_OK};
use shared_regs::pte::{self, PAGE_SIZE as PG};
use zapguard_dev::{JsonTraceWriter, TraceWriter};
use zapguard_model::testkit::{job, Rig};
use zapguard_model::x86pt::CpuFlags;
use zapguard_model::{DeviceConfig, Fanout};
use zapguard_trace::{check::Checker, reader, summary::Summary};

const SRC: u64 = 0x7f00_0000_0000;
const DST: u64 = 0x7f00_4000_0000;

/// A `Write` whose bytes the test can read while the writer owns it.
#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Read {
    events: Vec<Value>,
    findings: Vec<String>,
    ledger: u64,
    device: u64,
    summary_violations: u64,
}

fn read(file: &[u8]) -> Read {
    let (mut events, mut check, mut summary) = (vec![], Checker::default(), Summary::default());
    let bad = reader::for_each_event(file, |n, v| {
        check.add(n, v);
        summary.add(v);
        let mut v = v.clone();
        v.as_object_mut().expect("object").remove("t_ns");
        events.push(v);
    })
    .expect("read");
    assert!(bad.is_empty(), "{bad:?}");
    check.finish();
    Read {
        events,
        findings: check
            .findings
            .iter()
            .map(|f| without_time(&f.to_string()))
            .collect(),
        ledger: check.ledger_violations,
        device: check.device_violations,
        summary_violations: summary.violations(),
    }
}

/// `text` without its `"t_ns":N,` (the two writers read their own clocks).
fn without_time(text: &str) -> String {
    let Some(at) = text.find("\"t_ns\":") else {
        return text.to_string();
    };
    let rest = &text[at + 7..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let rest = rest[digits..].strip_prefix(',').unwrap_or(&rest[digits..]);
    format!("{}{}", &text[..at], rest)
}

#[test]
fn binary_and_json_traces_agree() {
    let (bin, json) = (Buf::default(), Buf::default());
    let sink = Fanout(
        TraceWriter::new(bin.clone()).expect("trace writer"),
        JsonTraceWriter::new(json.clone()),
    );
    // A small IOTLB, so that jobs fill and evict.
    let config = DeviceConfig {
        iotlb_entries: 8,
        ..DeviceConfig::default()
    };
    let mut r = Rig::new(config, sink);
    r.bind(1, pte::CTX_STALL);
    for p in 0..16 {
        r.map_page(1, SRC + p * PG);
        r.map_page(1, DST + p * PG);
    }
    let copy = job(DMA_COPY, 1, SRC + 8, DST, 16 * PG - 8, 0);
    assert_eq!(r.dma(copy).status, DMA_ST_OK);
    r.shootdown(1, SRC, 4 * PG);
    assert_eq!(r.dma(copy).status, DMA_ST_OK);
    // A driver bug: the CPU's page changed and nobody told the device.
    let new = r.frame();
    r.cpu_map(1, DST, new, CpuFlags::WRITABLE_DIRTY);
    assert_eq!(r.dma(job(DMA_FILL, 1, 0, DST, 8, 2)).status, DMA_ST_OK);

    let f = r.dev.events();
    f.0.flush().expect("binary");
    f.1.flush().expect("json");
    let (bin, json) = (bin.0.lock().expect("lock"), json.0.lock().expect("lock"));
    // Under a third before records carried their length and chunks their head (2 bytes per
    // record, 48 per chunk); 35% here.
    assert!(
        bin.len() * 5 < json.len() * 2,
        "binary {} vs JSON {} bytes",
        bin.len(),
        json.len()
    );
    let (b, j) = (read(&bin), read(&json));
    assert!(b.events.len() > 100, "{} events", b.events.len());
    assert_eq!(b.events, j.events);
    assert_eq!(b.findings, j.findings);
    assert_eq!((b.ledger, b.device), (j.ledger, j.device));
    assert_eq!(b.summary_violations, j.summary_violations);
    assert_eq!(b.device, 1, "the stale write: {:?}", b.findings);
}
