//! The device engine end to end, driven through registers and guest memory exactly as the
//! kernel driver drives it (via `testkit::Rig`): DMA data paths, faults and stalls, SYNC
//! semantics, command errors, event-queue overflow, and the validator's verdicts.

use shared_regs::cmd::{self, Command};
use shared_regs::dma::*;
use shared_regs::event::*;
use shared_regs::pte;
use shared_regs::regs::*;
use zapguard_model::events::{Activity, EventLog};
use zapguard_model::testkit::{job, Rig, AUX, FRAMES, RING_LOG2, SYNC_WORD};
use zapguard_model::x86pt::{CpuFlags, X86_D, X86_RW};
use zapguard_model::{DeviceConfig, GuestMem};

const VA: u64 = 0x7f00_0000_0000;
const PG: u64 = pte::PAGE_SIZE;

fn rig() -> Rig<EventLog> {
    let mut r = Rig::new(DeviceConfig::default(), EventLog::default());
    r.bind(1, pte::CTX_STALL);
    r
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn violations(r: &mut Rig<EventLog>) -> u64 {
    r.stat(STAT_VIOLATIONS)
}

#[test]
fn enable_handshake_and_config_errors() {
    let mut r = rig();
    assert_eq!(r.reg(CR0ACK), CR0_MASK, "all units acknowledged");
    // Reconfiguring an enabled unit is refused.
    r.set(CMDQ_LOG2SIZE, 3);
    assert_eq!(r.reg(CMDQ_LOG2SIZE), RING_LOG2);
    assert_ne!(r.reg(ERROR) & ERR_CONFIG, 0);
    r.set(ERROR, ERR_CONFIG);
    // A bad size is refused at enable: the bit stays clear in CR0ACK.
    r.set(CR0, CR0_MASK & !CR0_DMAQ_EN);
    assert_eq!(r.reg(CR0ACK) & CR0_DMAQ_EN, 0);
    for bad in [0, queue_max() + 1, u32::MAX] {
        r.set(DMAQ_LOG2SIZE, bad);
        r.set(CR0, CR0_MASK);
        assert_eq!(r.reg(CR0ACK) & CR0_DMAQ_EN, 0, "log2 {bad} refused");
        assert_ne!(r.reg(ERROR) & ERR_CONFIG, 0);
        r.set(ERROR, ERR_CONFIG);
        r.set(CR0, CR0_MASK & !CR0_DMAQ_EN);
    }
    // A misaligned base is refused too.
    r.set(DMAQ_LOG2SIZE, 4);
    r.set(DMAQ_BASE_LO, 0x12_0020);
    r.set(CR0, CR0_MASK);
    assert_eq!(r.reg(CR0ACK) & CR0_DMAQ_EN, 0);
}

fn queue_max() -> u32 {
    shared_regs::queue::MAX_LOG2
}

#[test]
fn copy_fill_write_read_checksum_compare() {
    let mut r = rig();
    let src = r.map_page(1, VA);
    let _ = r.map_page(1, VA + PG);
    let dst = r.map_page(1, VA + 0x10_0000);
    let _ = r.map_page(1, VA + 0x10_0000 + PG);
    let data = pattern(2 * PG as usize, 7);
    r.poke(src, &data[..PG as usize]);
    let src2 = r
        .dev_leaf(1, VA + PG)
        .map(|e| e & pte::PTE_ADDR_MASK)
        .unwrap();
    r.poke(src2, &data[PG as usize..]);

    // COPY across a page boundary on both sides, misaligned start.
    let st = r.dma(job(DMA_COPY, 1, VA + 100, VA + 0x10_0000 + 100, 5000, 0));
    assert_eq!((st.status, st.bytes_done, st.faults), (DMA_ST_OK, 5000, 0));
    let dst2 = r
        .dev_leaf(1, VA + 0x10_0000 + PG)
        .map(|e| e & pte::PTE_ADDR_MASK)
        .unwrap();
    let mut got = r.peek(dst + 100, (PG - 100) as usize);
    got.extend(r.peek(dst2, (5000 - (PG - 100)) as usize));
    assert_eq!(got, data[100..5100]);

    // FILL with an 8-byte pattern, starting mid-pattern.
    let st = r.dma(job(
        DMA_FILL,
        1,
        0,
        VA + 0x10_0000 + 3,
        13,
        0x0807_0605_0403_0201,
    ));
    assert_eq!(st.status, DMA_ST_OK);
    assert_eq!(r.peek(dst + 3, 13), [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5]);

    // WRITE from a guest-physical buffer, READ back into another.
    r.poke(AUX, b"hello, device!");
    assert_eq!(
        r.dma(job(DMA_WRITE, 1, 0, VA + 0x10_0000 + 8, 14, AUX))
            .status,
        DMA_ST_OK
    );
    assert_eq!(r.peek(dst + 8, 14), b"hello, device!");
    assert_eq!(
        r.dma(job(DMA_READ, 1, VA + 0x10_0000 + 8, 0, 14, AUX + 0x100))
            .status,
        DMA_ST_OK
    );
    assert_eq!(r.peek(AUX + 0x100, 14), b"hello, device!");

    // CHECKSUM is FNV-1a over the bytes.
    let st = r.dma(job(DMA_CHECKSUM, 1, VA, 0, 6000, 0));
    assert_eq!(st.result, fnv1a64(FNV_OFFSET, &data[..6000]));

    // COMPARE: equal -> u64::MAX, differing -> offset of the first difference.
    let st = r.dma(job(DMA_COMPARE, 1, VA + 3, VA + 0x10_0000 + 3, 8, 0));
    assert_eq!(st.result, 0, "the FILL changed the first byte");
    r.poke(dst + 200, &data[200..300]);
    let st = r.dma(job(DMA_COMPARE, 1, VA + 200, VA + 0x10_0000 + 200, 100, 0));
    assert_eq!((st.status, st.result), (DMA_ST_OK, u64::MAX));
    r.poke(dst + 250, &[!data[250]]);
    let st = r.dma(job(DMA_COMPARE, 1, VA + 200, VA + 0x10_0000 + 200, 100, 0));
    assert_eq!(st.result, 50);

    assert_eq!(
        violations(&mut r),
        0,
        "a correct driver causes no violation"
    );
    assert!(r.stat(STAT_DMA_JOBS) >= 8);
    assert!(r.stat(STAT_IOTLB_HITS) > 0 && r.stat(STAT_IOTLB_MISSES) > 0);
    // The device set A on what it walked and D on what it wrote.
    let leaf = r.dev_leaf(1, VA + 0x10_0000).unwrap();
    assert_eq!(leaf & (pte::PTE_A | pte::PTE_D), pte::PTE_A | pte::PTE_D);
    assert_eq!(
        r.dev_leaf(1, VA).unwrap() & pte::PTE_D,
        0,
        "only read: not dirty"
    );
}

#[test]
fn huge_device_mapping() {
    let mut r = rig();
    let hf = r.huge_frame();
    let va = 0x7e00_0000_0000;
    r.cpu_map_2m(1, va, hf, CpuFlags::WRITABLE_DIRTY);
    r.dev_map_2m(1, va, hf, true);
    let st = r.dma(job(
        DMA_FILL,
        1,
        0,
        va + 0x1f_f000,
        0x1000,
        0xabab_abab_abab_abab,
    ));
    assert_eq!(st.status, DMA_ST_OK);
    assert_eq!(r.peek(hf + 0x1f_f000, 4), [0xab; 4]);
    assert_eq!(
        r.stat(STAT_WALKS),
        1,
        "one walk covers the whole 2 MiB page"
    );
    assert_eq!(violations(&mut r), 0);
}

#[test]
fn fault_fails_job_and_reports_event() {
    let mut r = rig();
    r.map_page(1, VA);
    let st = r.dma(job(DMA_FILL, 1, 0, VA + PG - 16, 64, 1));
    assert_eq!(
        (st.status, st.fault_reason, st.faults, st.bytes_done),
        (DMA_ST_FAULT, FAULT_NOT_PRESENT, 1, 16)
    );
    let evs = r.take_events();
    assert_eq!(evs.len(), 1);
    assert_eq!(
        (evs[0].ty, evs[0].reason, evs[0].va, evs[0].flags),
        (EVT_FAULT, FAULT_NOT_PRESENT, VA + PG, EVT_F_WRITE)
    );
    assert_eq!(evs[0].info, 0, "not stalled: no tag");
    // Unknown ASID / invalid context.
    let st = r.dma(job(DMA_FILL, 7, 0, VA, 8, 1));
    assert_eq!(
        (st.status, st.fault_reason),
        (DMA_ST_FAULT, FAULT_CTX_INVALID)
    );
    // Write through a read-only device mapping.
    let pa = r.frame();
    r.cpu_map(1, VA + 5 * PG, pa, CpuFlags::READ_ONLY);
    r.dev_map(1, VA + 5 * PG, pa, false);
    let st = r.dma(job(DMA_FILL, 1, 0, VA + 5 * PG, 8, 1));
    assert_eq!(
        (st.status, st.fault_reason),
        (DMA_ST_FAULT, FAULT_PERMISSION)
    );
    assert_eq!(
        r.dma(job(DMA_CHECKSUM, 1, VA + 5 * PG, 0, 8, 0)).status,
        DMA_ST_OK,
        "reads are fine"
    );
    // Non-canonical / untranslatable VA.
    let st = r.dma(job(DMA_FILL, 1, 0, pte::VA_LIMIT, 8, 1));
    assert_eq!(st.fault_reason, FAULT_ADDRESS);
}

#[test]
fn stall_resume_and_abort() {
    let mut r = rig();
    r.map_page(1, VA);
    let mut j = job(DMA_FILL, 1, 0, VA, 2 * PG, 0x1111_1111_1111_1111);
    j.flags = DMA_F_STALL;
    let st_addr = r.submit(j);
    r.run();
    assert_eq!(
        r.status(st_addr).status,
        DMA_ST_PENDING,
        "stalled, not failed"
    );
    let ev = r.take_events();
    assert_eq!(ev.len(), 1);
    assert_ne!(ev[0].flags & EVT_F_STALLED, 0);
    let tag = ev[0].info;
    // A RESUME with the wrong tag is ignored; the job stays stalled.
    r.post(Command::new(cmd::CMD_RESUME, 0, 1, 0, tag + 100));
    r.run();
    assert_eq!(r.status(st_addr).status, DMA_ST_PENDING);
    // The driver resolves the fault (maps the page) and resumes.
    let pa2 = r.map_page(1, VA + PG);
    r.post(Command::new(cmd::CMD_RESUME, 0, 1, 0, tag));
    r.run();
    let st = r.status(st_addr);
    assert_eq!(
        (st.status, st.faults, st.bytes_done),
        (DMA_ST_OK, 1, 2 * PG)
    );
    assert_eq!(r.peek(pa2 + PG - 1, 1), [0x11]);

    // Abort.
    let mut j = job(DMA_FILL, 1, 0, VA + 9 * PG, 8, 0);
    j.flags = DMA_F_STALL;
    let st_addr = r.submit(j);
    r.run();
    let tag = r.take_events()[0].info;
    r.post(Command::new(cmd::CMD_ABORT, 0, 1, 0, tag));
    r.run();
    let st = r.status(st_addr);
    assert_eq!((st.status, st.fault_reason), (DMA_ST_FAULT, FAULT_ABORTED));
    // Without CTX_STALL the same job fails instead of stalling.
    r.bind(2, 0);
    r.cfgi(2);
    let mut j = job(DMA_FILL, 2, 0, VA, 8, 0);
    j.flags = DMA_F_STALL;
    assert_eq!(r.dma(j).status, DMA_ST_FAULT);
}

#[test]
fn invalidation_makes_the_device_see_the_new_page() {
    let mut r = rig();
    let old = r.map_page(1, VA);
    assert_eq!(r.dma(job(DMA_FILL, 1, 0, VA, 8, 0x01)).status, DMA_ST_OK);
    assert_eq!(r.peek(old, 1), [1]);
    // Correct driver: shoot down before the CPU changes, then repopulate.
    r.dev_unmap(1, VA);
    r.shootdown(1, VA, PG);
    let new = r.frame();
    r.cpu_map(1, VA, new, CpuFlags::WRITABLE_DIRTY);
    assert_eq!(
        r.dma(job(DMA_FILL, 1, 0, VA, 8, 0x02)).fault_reason,
        FAULT_NOT_PRESENT,
        "zapped: faults"
    );
    r.dev_map(1, VA, new, true);
    assert_eq!(r.dma(job(DMA_FILL, 1, 0, VA, 8, 0x03)).status, DMA_ST_OK);
    assert_eq!((r.peek(old, 1), r.peek(new, 1)), (vec![1], vec![3]));
    assert_eq!(violations(&mut r), 0);
}

#[test]
fn sync_waits_for_in_flight_dma() {
    // Steps of at most 256 bytes (page steps are the default): a 4 KiB page takes 16 of them,
    // so the invalidation lands mid-page. dma_engine's tests cover page steps.
    let cfg = DeviceConfig {
        dma_burst: 256,
        ..DeviceConfig::default()
    };
    let mut r = Rig::new(cfg, EventLog::default());
    r.bind(1, 0);
    r.map_page(1, VA);
    r.map_page(1, VA + PG);
    r.submit(job(DMA_FILL, 1, 0, VA, 2 * PG, 0x5a5a_5a5a_5a5a_5a5a));
    // Let the job run a few steps on the first page.
    for _ in 0..3 {
        r.dev.process(&r.mem, 1);
    }
    r.post(Command::new(cmd::CMD_INV_RANGE, 0, 1, VA, PG));
    let s = r.post_sync();
    r.dev.process(&r.mem, 1);
    assert!(
        !r.sync_done(s),
        "SYNC must wait while the job still uses the invalidated page"
    );
    r.run();
    assert!(r.sync_done(s));
    let acts = r.activity();
    let waited = acts.iter().find_map(|a| match a {
        Activity::SyncDone { waited, .. } => Some(*waited),
        _ => None,
    });
    assert!(
        waited.is_some_and(|w| w > 0),
        "the SYNC records the steps it waited for: {waited:?}"
    );
    let inv = acts.iter().find_map(|a| match a {
        Activity::IotlbInvalidate { in_flight, .. } => Some(*in_flight),
        _ => None,
    });
    assert_eq!(inv, Some(1), "the held translation was doomed, not yanked");
    assert_eq!(
        violations(&mut r),
        0,
        "using a doomed translation before the SYNC is legal"
    );
}

#[test]
fn stalled_job_never_blocks_a_sync() {
    let mut r = rig();
    r.map_page(1, VA);
    let mut j = job(DMA_COPY, 1, VA, VA + PG, 64, 0);
    j.flags = DMA_F_STALL;
    r.submit(j);
    r.run();
    assert_eq!(
        r.take_events().len(),
        1,
        "stalled on the unmapped destination"
    );
    r.post(Command::new(cmd::CMD_INV_ALL, 0, 0, 0, 0));
    let s = r.post_sync();
    r.run();
    assert!(r.sync_done(s), "a stalled job holds no translation");
}

#[test]
fn command_errors_stop_the_queue_until_cleared() {
    let mut r = rig();
    let cases: &[(Command, u8)] = &[
        (Command::new(0x7f, 0, 0, 0, 0), cmd::CERR_ILLEGAL),
        (
            Command::new(cmd::CMD_INV_ALL, 0, 1, 0, 0),
            cmd::CERR_ILLEGAL,
        ),
        (Command::new(cmd::CMD_NOP, 1, 0, 0, 0), cmd::CERR_ILLEGAL),
        (
            Command {
                reserved1: 1,
                ..Command::new(cmd::CMD_NOP, 0, 0, 0, 0)
            },
            cmd::CERR_ILLEGAL,
        ),
        (
            Command::new(cmd::CMD_INV_ASID, 0, 9999, 0, 0),
            cmd::CERR_ASID,
        ),
        (
            Command::new(cmd::CMD_INV_RANGE, 0, 1, VA + 1, PG),
            cmd::CERR_RANGE,
        ),
        (
            Command::new(cmd::CMD_INV_RANGE, 0, 1, VA, 0),
            cmd::CERR_RANGE,
        ),
        (
            Command::new(cmd::CMD_INV_RANGE, 0, 1, !0xfff, 2 * PG),
            cmd::CERR_RANGE,
        ),
        (
            Command::new(cmd::CMD_SYNC, 0, 0, SYNC_WORD + 2, 1),
            cmd::CERR_ILLEGAL,
        ),
        (
            Command::new(cmd::CMD_SYNC, 0, 0, 1 << 40, 1),
            cmd::CERR_ABORT,
        ),
    ];
    for (c, code) in cases {
        let before = r.reg(CMDQ_CONS);
        r.post(*c);
        let s = r.post_sync();
        r.run();
        let cons = r.reg(CMDQ_CONS);
        assert_ne!(cons & CONS_ERR, 0, "{c:?} stops the queue");
        assert_eq!(
            (cons >> CONS_ERR_SHIFT) & CONS_ERR_CODE_MASK,
            u32::from(*code),
            "{c:?}"
        );
        assert_eq!(
            cons & !(CONS_ERR | CONS_ERR_CODE_MASK << CONS_ERR_SHIFT),
            before,
            "points at the bad command"
        );
        assert_ne!(r.reg(ERROR) & ERR_CMDQ, 0);
        assert!(!r.sync_done(s), "nothing after it ran");
        // The driver replaces the bad command with a NOP and clears the error.
        let slot = zapguard_model::testkit::CMDQ
            + u64::from(shared_regs::queue::index(before, RING_LOG2)) * cmd::CMD_SIZE as u64;
        r.poke(slot, &Command::new(cmd::CMD_NOP, 0, 0, 0, 0).to_bytes());
        r.set(ERROR, ERR_CMDQ);
        r.run();
        assert!(r.sync_done(s), "the queue resumed after {c:?}");
        assert_eq!(r.reg(CMDQ_CONS) & CONS_ERR, 0);
    }
    assert_eq!(
        r.dev.take_irqs() & (1 << shared_regs::pci::Vector::Error as u32),
        1 << 2,
        "error vector raised"
    );
}

#[test]
fn event_queue_overflow_is_reported() {
    let mut r = rig();
    let n = (1u64 << RING_LOG2) + 5;
    for i in 0..n {
        r.submit(job(DMA_FILL, 1, 0, VA + i * PG, 8, 0));
        r.run();
    }
    assert_eq!(r.stat(STAT_FAULTS), n);
    assert_eq!(r.stat(STAT_EVENTS_DROPPED), 5);
    assert_ne!(r.reg(EVTQ_PROD) & EVTQ_PROD_OVERFLOW, 0);
    assert_ne!(r.reg(ERROR) & ERR_EVTQ_OVERFLOW, 0);
    assert_eq!(r.take_events().len(), 1 << RING_LOG2);
    r.set(ERROR, ERR_EVTQ_OVERFLOW);
    assert_eq!(r.reg(EVTQ_PROD) & EVTQ_PROD_OVERFLOW, 0);
}

#[test]
fn interrupts_follow_irq_ctrl() {
    let mut r = rig();
    r.dev.take_irqs();
    let s = r.post_sync();
    r.run();
    assert!(r.sync_done(s));
    assert_eq!(
        r.dev.take_irqs(),
        1 << 0,
        "SYNC with the IRQ flag raises the command vector"
    );
    r.dma(job(DMA_FILL, 1, 0, VA, 8, 0));
    assert_eq!(
        r.dev.take_irqs(),
        1 << 1,
        "a fault event raises the event vector"
    );
    r.set(IRQ_CTRL, 0);
    let s = r.post_sync();
    r.run();
    assert!(r.sync_done(s));
    assert_eq!(r.dev.take_irqs(), 0, "masked");
}

#[test]
fn hostile_guest_never_panics_or_escapes_ram() {
    let mut r = rig();
    // Device page-table pointers outside RAM.
    let root = r.ctx(1).pt_root;
    r.mem
        .write_u64(
            root + 8 * pte::pt_index(VA, 4) as u64,
            (1u64 << 45) | pte::PTE_P | pte::PTE_W,
        )
        .unwrap();
    let st = r.dma(job(DMA_FILL, 1, 0, VA, 8, 0));
    assert_eq!(st.fault_reason, FAULT_WALK_ABORT);
    // A table pointing at itself.
    r.mem
        .write_u64(
            root + 8 * pte::pt_index(VA, 4) as u64,
            root | pte::PTE_P | pte::PTE_W,
        )
        .unwrap();
    let st = r.dma(job(DMA_FILL, 1, 0, VA, 8, 0));
    assert_eq!(st.status, DMA_ST_FAULT);
    // Status address outside RAM, descriptors full of garbage, aux outside RAM.
    let mut j = job(DMA_WRITE, 1, 0, VA, 8, 1 << 50);
    j.status = 1 << 50;
    let _ = r.submit(j);
    r.run();
    let garbage = job(0xee, 1, u64::MAX, u64::MAX, u64::MAX, u64::MAX);
    assert_eq!(r.dma(garbage).status, DMA_ST_BAD_JOB);
    // The DMA ring outside RAM: the queue stops with ERR_DMAQ_ABORT.
    r.set(CR0, CR0_MASK & !CR0_DMAQ_EN);
    r.set(DMAQ_BASE_HI, 0x100);
    r.set(CR0, CR0_MASK);
    r.set(DMAQ_PROD, 1);
    r.run();
    assert_ne!(r.reg(ERROR) & ERR_DMAQ_ABORT, 0);
    assert_ne!(r.reg(DMAQ_CONS) & CONS_ERR, 0);
    // Context table garbage.
    r.poke(zapguard_model::testkit::CTX_TABLE + 32 * 3, &[0xff; 32]);
    r.set(CR0, CR0_MASK & !CR0_DMAQ_EN);
    r.set(DMAQ_BASE_HI, 0);
    r.set(CR0, CR0_MASK);
    assert_eq!(
        r.dma(job(DMA_FILL, 3, 0, VA, 8, 0)).fault_reason,
        FAULT_CTX_INVALID
    );
    // Odd MMIO: every offset and width.
    for off in 0..0x200u64 {
        for len in [1usize, 2, 3, 4, 8] {
            let mut b = vec![0u8; len];
            r.dev.read(off, &mut b);
            r.dev.write(off, &b);
        }
    }
}

// --- The validator: each violation class a driver bug produces, and none for correct ones.

#[test]
fn skipped_shootdown_is_stale() {
    let mut r = rig();
    let old = r.map_page(1, VA);
    assert_eq!(r.dma(job(DMA_FILL, 1, 0, VA, 8, 1)).status, DMA_ST_OK);
    // Bug: the kernel replaced the page (munmap + mmap, migration) and the driver did nothing.
    let new = r.frame();
    r.cpu_map(1, VA, new, CpuFlags::WRITABLE_DIRTY);
    assert_eq!(
        r.dma(job(DMA_FILL, 1, 0, VA, 8, 2)).status,
        DMA_ST_OK,
        "hardware writes anyway"
    );
    assert_eq!(r.peek(old, 1), [2], "into the zapped page");
    assert_eq!(violations(&mut r), 1);
    let v: Vec<_> = r
        .take_events()
        .into_iter()
        .filter(|e| e.ty == EVT_VIOLATION)
        .collect();
    assert_eq!(v.len(), 1);
    assert_eq!(
        (v[0].reason, v[0].va, v[0].info, v[0].info2),
        (VIOL_STALE, VA, old, new)
    );
    // Unmapped on the CPU side entirely.
    r.cpu_unmap(1, VA);
    r.dma(job(DMA_CHECKSUM, 1, VA, 0, 8, 0));
    let v: Vec<_> = r
        .take_events()
        .into_iter()
        .filter(|e| e.ty == EVT_VIOLATION)
        .collect();
    assert_eq!((v[0].reason, v[0].info2), (VIOL_STALE, NO_PA));
}

#[test]
fn write_after_write_protect_is_caught() {
    let mut r = rig();
    r.map_page(1, VA);
    assert_eq!(r.dma(job(DMA_FILL, 1, 0, VA, 8, 1)).status, DMA_ST_OK);
    // Bug: fork made the page COW (read-only) and the driver kept device write permission.
    r.cpu_set_flags(1, VA, 0, X86_RW);
    r.dma(job(DMA_FILL, 1, 0, VA, 8, 2));
    let v: Vec<_> = r
        .take_events()
        .into_iter()
        .filter(|e| e.ty == EVT_VIOLATION)
        .collect();
    assert_eq!(v.len(), 1);
    assert_eq!(
        (v[0].reason, v[0].flags & EVT_F_WRITE),
        (VIOL_WRITE_PERM, EVT_F_WRITE)
    );
    // Reads of the now read-only page are fine.
    r.dma(job(DMA_CHECKSUM, 1, VA, 0, 8, 0));
    assert_eq!(violations(&mut r), 1);
}

#[test]
fn write_after_mkclean_is_caught() {
    let mut r = rig();
    r.map_page(1, VA);
    assert_eq!(r.dma(job(DMA_FILL, 1, 0, VA, 8, 1)).status, DMA_ST_OK);
    // Bug: writeback cleaned the page (D cleared, write-protect skipped by the bug model) and the
    // driver did not invalidate, so the device's cached translation writes a "clean" page.
    r.cpu_set_flags(1, VA, 0, X86_D);
    r.dma(job(DMA_FILL, 1, 0, VA, 8, 2));
    let v: Vec<_> = r
        .take_events()
        .into_iter()
        .filter(|e| e.ty == EVT_VIOLATION)
        .collect();
    assert_eq!(
        v.iter().map(|e| e.reason).collect::<Vec<_>>(),
        [VIOL_WRITE_CLEAN]
    );
}

#[test]
fn writable_clean_shmem_page_is_legal() {
    let mut r = rig();
    let pa = r.frame();
    // A shared mapping without write-notify: read fault installs a writable, clean PTE.
    r.cpu_map(1, VA, pa, CpuFlags::WRITABLE_CLEAN);
    r.dev_map(1, VA, pa, true);
    assert_eq!(r.dma(job(DMA_FILL, 1, 0, VA, 8, 1)).status, DMA_ST_OK);
    assert_eq!(violations(&mut r), 0);
}

#[test]
fn access_after_release_is_caught() {
    let mut r = rig();
    r.map_page(1, VA);
    // Bug: the mm was released but the driver kept the context enabled.
    let mut c = r.ctx(1);
    c.flags |= pte::CTX_MM_RELEASED;
    r.write_ctx(1, c);
    r.dma(job(DMA_CHECKSUM, 1, VA, 0, 8, 0));
    let v: Vec<_> = r
        .take_events()
        .into_iter()
        .filter(|e| e.ty == EVT_VIOLATION)
        .collect();
    assert_eq!(
        v.iter().map(|e| e.reason).collect::<Vec<_>>(),
        [VIOL_RELEASED]
    );
    // Correct release: invalidate the context, CFGI + INV_ASID + SYNC: the device refuses.
    c.flags &= !pte::CTX_VALID;
    r.write_ctx(1, c);
    r.post(Command::new(cmd::CMD_CFGI_CTX, 0, 1, 0, 0));
    r.post(Command::new(cmd::CMD_INV_ASID, 0, 1, 0, 0));
    let s = r.post_sync();
    r.run();
    assert!(r.sync_done(s));
    assert_eq!(
        r.dma(job(DMA_CHECKSUM, 1, VA, 0, 8, 0)).fault_reason,
        FAULT_CTX_INVALID
    );
    assert_eq!(
        violations(&mut r),
        1,
        "no new violation once the context is gone"
    );
}

#[test]
fn release_without_context_invalidation_is_caught_at_the_next_walk() {
    let mut r = rig();
    r.map_page(1, VA);
    // The device caches the context with a first job.
    assert_eq!(r.dma(job(DMA_CHECKSUM, 1, VA, 0, 8, 0)).status, DMA_ST_OK);
    // Bug: the release clears the entry and flushes the ASID but posts no CFGI_CTX, then marks
    // the entry released once its SYNC completed.
    let c = r.ctx(1);
    r.write_ctx(1, pte::ContextEntry { flags: 0, ..c });
    r.post(Command::new(cmd::CMD_INV_ASID, 0, 1, 0, 0));
    let s = r.post_sync();
    r.run();
    assert!(r.sync_done(s));
    r.write_ctx(
        1,
        pte::ContextEntry {
            flags: pte::CTX_MM_RELEASED,
            ..Default::default()
        },
    );
    // A job still queued walks through the cached context: `ctx_released` at the walk.
    r.dma(job(DMA_CHECKSUM, 1, VA, 0, 8, 0));
    let v: Vec<_> = r
        .take_events()
        .into_iter()
        .filter(|e| e.ty == EVT_VIOLATION)
        .map(|e| (e.reason, e.va, e.info))
        .collect();
    assert_eq!(v[0], (VIOL_CTX_RELEASED, VA, c.pt_root));
    assert_eq!(violation_name(v[0].0), "ctx_released");
}

#[test]
fn correct_cow_sequence_has_no_violation() {
    let mut r = rig();
    let pa = r.map_page(1, VA);
    assert_eq!(r.dma(job(DMA_FILL, 1, 0, VA, 8, 1)).status, DMA_ST_OK);
    // fork: invalidate_range_start -> driver write-protects + shoots down -> CPU PTE read-only.
    r.dev_set_writable(1, VA, false);
    r.shootdown(1, VA, PG);
    r.cpu_set_flags(1, VA, 0, X86_RW);
    assert_eq!(r.dma(job(DMA_CHECKSUM, 1, VA, 0, 8, 0)).status, DMA_ST_OK);
    assert_eq!(
        r.dma(job(DMA_FILL, 1, 0, VA, 8, 2)).fault_reason,
        FAULT_PERMISSION
    );
    // COW break: new page for the writer; driver populates it.
    let copy = r.frame();
    r.dev_unmap(1, VA);
    r.shootdown(1, VA, PG);
    r.cpu_map(1, VA, copy, CpuFlags::WRITABLE_DIRTY);
    r.dev_map(1, VA, copy, true);
    assert_eq!(r.dma(job(DMA_FILL, 1, 0, VA, 8, 3)).status, DMA_ST_OK);
    assert_eq!((r.peek(pa, 1), r.peek(copy, 1)), (vec![1], vec![3]));
    assert_eq!(violations(&mut r), 0);
}

#[test]
fn five_level_cpu_tables_and_huge_cpu_pages() {
    let mut r = Rig::new(DeviceConfig::default(), EventLog::default());
    r.bind(1, pte::CTX_CPU_LA57);
    let hf = r.huge_frame();
    let va = 0x7d00_0000_0000;
    r.cpu_map_2m(1, va, hf, CpuFlags::WRITABLE_DIRTY);
    // The device maps 4 KiB pages inside the CPU's 2 MiB page.
    r.dev_map(1, va + 0x5000, hf + 0x5000, true);
    assert_eq!(
        r.dma(job(DMA_FILL, 1, 0, va + 0x5000, 8, 1)).status,
        DMA_ST_OK
    );
    assert_eq!(violations(&mut r), 0);
    // Off by one frame inside the huge page is stale.
    r.dev_map(1, va + 0x6000, hf + 0x7000, true);
    r.dma(job(DMA_FILL, 1, 0, va + 0x6000, 8, 1));
    assert_eq!(violations(&mut r), 1);
}

#[test]
fn stats_registers_and_trace_kinds() {
    let mut r = rig();
    r.map_page(1, VA);
    r.dma(job(DMA_FILL, 1, 0, VA, 8, 1));
    r.shootdown(1, VA, PG);
    assert_eq!(r.stat(STAT_DMA_JOBS), 1);
    assert_eq!(r.stat(STAT_DMA_BYTES), 8);
    assert_eq!(r.stat(STAT_SYNCS), 1);
    assert_eq!(r.stat(STAT_COMMANDS), 2);
    assert_eq!(r.stat(STAT_IOTLB_INVALIDATED), 1);
    let kinds: std::collections::BTreeSet<&str> = r
        .activity()
        .iter()
        .map(|a| match a {
            Activity::Control { .. } => "control",
            Activity::Command { .. } => "command",
            Activity::SyncDone { .. } => "sync_done",
            Activity::IotlbFill { .. } => "iotlb_fill",
            Activity::IotlbEvict { .. } => "iotlb_evict",
            Activity::IotlbInvalidate { .. } => "iotlb_invalidate",
            Activity::JobStart { .. } => "job_start",
            Activity::JobDone { .. } => "job_done",
            Activity::DmaAccess { .. } => "dma_access",
            Activity::Fault { .. } => "fault",
            Activity::Violation { .. } => "violation",
            Activity::QueueError { .. } => "queue_error",
            Activity::Interrupt { .. } => "interrupt",
            Activity::IrqDropped { .. } => "irq_dropped",
            Activity::BusMaster { .. } => "bus_master",
            Activity::FailInject { .. } => "fail_inject",
        })
        .collect();
    for k in [
        "control",
        "command",
        "sync_done",
        "iotlb_fill",
        "iotlb_invalidate",
        "job_start",
        "job_done",
        "dma_access",
        "interrupt",
    ] {
        assert!(kinds.contains(k), "{k} traced: {kinds:?}");
    }
    let _ = FRAMES;
}

/// CMD_LAG delays commands while a job runs: a driver that returns from its invalidation
/// without waiting for the SYNC lets the kernel reuse the page while the device still writes it.
#[test]
fn command_lag_exposes_a_missing_sync_wait() {
    // 256-byte steps: the four-page job takes 64 of them, so the lag still holds the
    // invalidation while the job works on its first pages (with page steps it would end first).
    let cfg = DeviceConfig {
        dma_burst: 256,
        ..DeviceConfig::default()
    };
    for wait_for_sync in [true, false] {
        let mut r = Rig::new(cfg, EventLog::default());
        r.set(CMD_LAG, 64);
        assert_eq!(r.reg(CMD_LAG), 64);
        r.bind(1, 0);
        for p in 0..4 {
            r.map_page(1, VA + p * PG);
        }
        // An earlier job leaves all four translations in the IOTLB.
        assert_eq!(r.dma(job(DMA_FILL, 1, 0, VA, 4 * PG, 0)).status, DMA_ST_OK);
        r.submit(job(DMA_FILL, 1, 0, VA, 4 * PG, 0x1111_1111_1111_1111));
        r.dev.process(&r.mem, 2);
        // The driver zaps pages 2..4 (the job has not reached them yet).
        r.dev_unmap(1, VA + 2 * PG);
        r.dev_unmap(1, VA + 3 * PG);
        r.post(Command::new(cmd::CMD_INV_RANGE, 0, 1, VA + 2 * PG, 2 * PG));
        let s = r.post_sync();
        r.dev.process(&r.mem, 8);
        assert!(!r.sync_done(s), "lagged: the SYNC has not run yet");
        if wait_for_sync {
            // A correct driver waits; only then does the kernel free the pages.
            r.run();
            assert!(r.sync_done(s));
            r.cpu_unmap(1, VA + 2 * PG);
            r.cpu_unmap(1, VA + 3 * PG);
            assert_eq!(violations(&mut r), 0);
        } else {
            // Bug: the kernel frees the pages right away while the device still runs.
            r.cpu_unmap(1, VA + 2 * PG);
            r.cpu_unmap(1, VA + 3 * PG);
            r.run();
            assert!(r.sync_done(s), "the SYNC still completes in the end");
            assert!(
                violations(&mut r) > 0,
                "the device wrote pages the CPU had unmapped"
            );
        }
    }
}

#[test]
fn command_lag_does_not_delay_an_idle_device() {
    let mut r = rig();
    r.set(CMD_LAG, 1_000_000);
    let s = r.post_sync();
    r.dev.process(&r.mem, 1);
    assert!(r.sync_done(s), "no job running: commands execute at once");
}
