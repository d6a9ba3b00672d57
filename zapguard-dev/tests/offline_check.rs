//! The offline check (`zapguard-trace`'s `Checker`) against the JSON Lines trace of a device
//! run: moved from the device model's `dma_engine` unit tests when the trace writers moved to
//! this crate (the model cannot name them).

use shared_regs::dma::{DMA_CHECKSUM, DMA_ST_OK};
use shared_regs::pte::PAGE_SIZE as PG;
use zapguard_dev::JsonTraceWriter;
use zapguard_model::events::Events;
use zapguard_model::testkit::{job, Rig};
use zapguard_model::x86pt::CpuFlags;

const VA: u64 = 0x7f00_0000_0000;

/// The offline check recomputes every verdict from the facts the trace records: a device
/// whose validator is blind (it records what it saw, concludes nothing) is caught, and the
/// same run with a working validator agrees with it.
#[test]
fn a_blind_validator_is_caught_offline() {
    let run = |blind: bool| {
        let mut r = Rig::with_asid1();
        r.set_validator_blind(blind);
        r.patterned_pages(VA, 2, 3);
        assert_eq!(
            r.dma(job(DMA_CHECKSUM, 1, VA, 0, 2 * PG, 0)).status,
            DMA_ST_OK
        );
        // A driver bug: the CPU's page changes and the device is not told.
        let new = r.frame();
        r.cpu_map(1, VA, new, CpuFlags::WRITABLE_DIRTY);
        assert_eq!(
            r.dma(job(DMA_CHECKSUM, 1, VA, 0, 2 * PG, 0)).status,
            DMA_ST_OK
        );
        let mut w = JsonTraceWriter::new(Vec::new());
        for e in &r.dev.events().events {
            w.event(e);
        }
        let text = String::from_utf8(w.into_inner().expect("trace")).expect("utf-8");
        let mut c = zapguard_trace::check::Checker::default();
        for (i, l) in text.lines().enumerate() {
            c.add(i as u64 + 1, &serde_json::from_str(l).expect("json"));
        }
        c.finish();
        c
    };
    let seeing = run(false);
    assert!(seeing.device_violations > 0, "{:?}", seeing.findings);
    assert_eq!(seeing.disagreements, 0, "{:?}", seeing.findings);
    assert!(seeing.recomputed >= 4, "{} recomputed", seeing.recomputed);
    let blind = run(true);
    assert_eq!(blind.device_violations, 0);
    assert_eq!(
        blind.disagreements, seeing.device_violations,
        "{:?}",
        blind.findings
    );
    assert!(blind.findings[0]
        .detail
        .contains("call for stale, the device said clean"));
}
