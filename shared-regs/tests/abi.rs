//! Table tests for the ring arithmetic and round trips of every descriptor encoding.

use shared_regs::abi::{bytes_to_words, words_to_bytes};
use shared_regs::{cmd, dma, event, pte, queue, regs};

#[test]
fn queue_arithmetic_table() {
    // (prod, cons, log2) -> (empty, full, used, free)
    let cases: &[(u32, u32, u32, bool, bool, u32, u32)] = &[
        (0, 0, 2, true, false, 0, 4),
        (1, 0, 2, false, false, 1, 3),
        (3, 0, 2, false, false, 3, 1),
        (0b100, 0, 2, false, true, 4, 0), // index 0, wrap set: full
        (0b101, 0b001, 2, false, true, 4, 0), // full at index 1
        (0b101, 0b101, 2, true, false, 0, 4), // empty after both wrapped
        (0b000, 0b100, 2, false, true, 4, 0), // prod wrapped back to 0, cons on wrap: full
        (0b001, 0b111, 2, false, false, 2, 2), // across the wrap
        (1, 0, 1, false, false, 1, 1),
        (0b10, 0, 1, false, true, 2, 0),
        (0x8000_0000 | 3, 3, 4, true, false, 0, 16), // bit 31 (error flag) is not position
        (0x8000, 0, 15, false, true, 32768, 0),
    ];
    for &(p, c, l, empty, full, used, free) in cases {
        assert_eq!(
            queue::is_empty(p, c, l),
            empty,
            "empty p={p:#x} c={c:#x} log2={l}"
        );
        assert_eq!(
            queue::is_full(p, c, l),
            full,
            "full p={p:#x} c={c:#x} log2={l}"
        );
        assert_eq!(
            queue::used(p, c, l),
            used,
            "used p={p:#x} c={c:#x} log2={l}"
        );
        assert_eq!(
            queue::free(p, c, l),
            free,
            "free p={p:#x} c={c:#x} log2={l}"
        );
    }
}

#[test]
fn queue_next_wraps_and_flips() {
    // Walking a 4-entry ring twice visits each index twice with alternating wrap bits.
    let mut p = 0;
    let mut seen = vec![];
    for _ in 0..9 {
        seen.push((queue::index(p, 2), queue::wrap(p, 2)));
        p = queue::next(p, 2);
    }
    let want: Vec<(u32, bool)> = (0..9).map(|i| (i % 4, (i / 4) % 2 == 1)).collect();
    assert_eq!(seen, want);
    // Producing 2^log2 entries from empty makes it full; one more would overflow.
    let (mut prod, cons) = (0u32, 0u32);
    for _ in 0..8 {
        assert!(!queue::is_full(prod, cons, 3));
        prod = queue::next(prod, 3);
    }
    assert!(queue::is_full(prod, cons, 3));
    assert_eq!(queue::free(prod, cons, 3), 0);
    assert!(!queue::is_empty(
        queue::next(prod, 3),
        queue::next(cons, 3),
        3
    ));
}

#[test]
fn queue_functions_are_total() {
    // Size registers hold anything until the queue is enabled; nothing may overflow (debug
    // builds and the kernel check arithmetic overflow).
    for log2 in [0, 1, 15, 16, 30, 31, 32, 33, 40, u32::MAX] {
        for reg in [0, 1, 0x7fff_ffff, 0x8000_0000, u32::MAX] {
            let _ = queue::position(reg, log2);
            let _ = queue::index(reg, log2);
            let _ = queue::wrap(reg, log2);
            let _ = queue::next(reg, log2);
            let _ = queue::is_empty(reg, 0, log2);
            let _ = queue::is_full(reg, 0, log2);
            let _ = queue::used(reg, 0, log2);
            let _ = queue::free(reg, 0, log2);
        }
    }
}

#[test]
fn queue_sizes() {
    assert!(!queue::valid_log2(0));
    assert!(queue::valid_log2(queue::MIN_LOG2));
    assert!(queue::valid_log2(queue::MAX_LOG2));
    assert!(!queue::valid_log2(queue::MAX_LOG2 + 1));
    assert!(!queue::valid_log2(u32::MAX));
}

#[test]
fn descriptors_round_trip() {
    let c = cmd::Command::new(
        cmd::CMD_SYNC,
        cmd::CMD_F_SYNC_IRQ,
        7,
        0x1234_5678_9000,
        0xdead_beef,
    );
    let b = c.to_bytes();
    assert_eq!(b[0], cmd::CMD_SYNC);
    assert_eq!(b[1], cmd::CMD_F_SYNC_IRQ);
    assert_eq!(&b[4..8], &7u32.to_le_bytes());
    assert_eq!(cmd::Command::from_bytes(&b), c);

    let j = dma::DmaJob {
        op: dma::DMA_COPY,
        flags: dma::DMA_F_STALL,
        reserved0: 0,
        asid: 3,
        src: 0x1000,
        dst: 0x2000,
        len: 4096,
        aux: 9,
        status: 0x8000,
        id: 42,
        reserved1: 0,
    };
    assert_eq!(dma::DmaJob::from_bytes(&j.to_bytes()), j);
    let s = dma::DmaStatus {
        status: dma::DMA_ST_FAULT,
        fault_reason: event::FAULT_PERMISSION,
        faults: 2,
        bytes_done: 100,
        result: 5,
        id: 42,
    };
    assert_eq!(dma::DmaStatus::from_bytes(&s.to_bytes()), s);
    let e = event::Event {
        ty: event::EVT_VIOLATION,
        flags: event::EVT_F_WRITE,
        reason: event::VIOL_STALE,
        asid: 1,
        va: 0x7000,
        info: 0x1000,
        info2: event::NO_PA,
    };
    assert_eq!(event::Event::from_bytes(&e.to_bytes()), e);
    let x = pte::ContextEntry {
        flags: pte::CTX_VALID | pte::CTX_NO_VALIDATE,
        pt_root: 0x10000,
        cpu_root: 0x20000,
        seq: 6,
    };
    assert_eq!(pte::ContextEntry::from_bytes(&x.to_bytes()), x);
}

#[test]
fn byte_layout_matches_repr_c() {
    // The byte encoding equals the in-memory repr(C) layout on little-endian hosts, so a driver
    // may also write the struct directly.
    let c = cmd::Command::new(cmd::CMD_INV_RANGE, 0, 0xabcd, 0x7000, 0x3000);
    // SAFETY: Command is repr(C) with only integer fields and no padding (size asserted).
    let raw: [u8; cmd::CMD_SIZE] = unsafe { std::mem::transmute(c) };
    assert_eq!(raw, c.to_bytes());
    let w: [u64; 4] = bytes_to_words(&c.to_bytes());
    assert_eq!(words_to_bytes::<32, 4>(w), c.to_bytes());
}

#[test]
fn register_names_and_stats() {
    assert_eq!(regs::name(regs::CMDQ_PROD), Some("CMDQ_PROD"));
    assert_eq!(
        regs::name(regs::stat_lo(regs::STAT_VIOLATIONS)),
        Some("STAT_LO")
    );
    assert_eq!(
        regs::name(regs::stat_hi(regs::STAT_COUNT - 1)),
        Some("STAT_HI")
    );
    assert_eq!(regs::name(regs::stat_lo(regs::STAT_COUNT)), None);
    assert_eq!(regs::name(regs::CMD_LAG), Some("CMD_LAG"));
    assert_eq!(regs::name(regs::FAIL_INJECT), Some("FAIL_INJECT"));
    assert_eq!(regs::name(regs::FAIL_ARG), Some("FAIL_ARG"));
    assert_eq!(regs::name(regs::WALK_LAG), Some("WALK_LAG"));
    assert_eq!(regs::name(regs::RESET), Some("RESET"));
    assert_eq!(regs::name(regs::FAULT_LAG), Some("FAULT_LAG"));
    assert_eq!(regs::name(regs::IOTLB_KEEP), Some("IOTLB_KEEP"));
    assert_eq!(regs::name(regs::PT_FREED_BASE_LO), Some("PT_FREED_BASE_LO"));
    assert_eq!(regs::name(regs::PT_FREED_BASE_HI), Some("PT_FREED_BASE_HI"));
    assert_eq!(regs::name(regs::PT_FREED_PAGES), Some("PT_FREED_PAGES"));
    assert_eq!(regs::name(regs::SYNC_LAG), Some("SYNC_LAG"));
    assert_eq!(regs::name(regs::PHYS_ADDR_LO), Some("PHYS_ADDR_LO"));
    assert_eq!(regs::name(regs::PHYS_CTRL), Some("PHYS_CTRL"));
    assert_eq!(regs::name(regs::PHYS_CTRL + 4), Some("ASID_STAT_SEL"));
    assert_eq!(regs::name(regs::ASID_STAT_SEL + 4), None);
    assert_eq!(
        regs::name(regs::asid_stat_lo(regs::ASID_STAT_JUDGED)),
        Some("ASID_STAT_LO")
    );
    assert_eq!(
        regs::name(regs::asid_stat_hi(regs::ASID_STAT_COUNT - 1)),
        Some("ASID_STAT_HI")
    );
    assert_eq!(regs::name(regs::asid_stat_lo(regs::ASID_STAT_COUNT)), None);
    // The per-ASID block ends before the statistics start.
    const { assert!(regs::asid_stat_hi(regs::ASID_STAT_COUNT - 1) < regs::STATS_BASE) };
    // Every ASID fits the select's field (PHYS_CTRL names ASIDs in 16 bits too).
    const { assert!(regs::ASID_STAT_ASID_MASK == 0xffff && regs::ASID_STAT_CLEAR & 0xffff == 0) };
    assert_eq!(
        regs::name(regs::stat_lo(regs::STAT_IOTLB_NOT_CACHED)),
        Some("STAT_LO")
    );
    assert_eq!(regs::name(0x038), None);
    assert_eq!(
        regs::version_minor(regs::VERSION_VALUE),
        regs::VERSION_MINOR
    );
}

#[test]
fn registers_do_not_overlap() {
    // Every named register sits alone in its 4-byte slot, below the statistics.
    let named: Vec<u32> = (0..regs::STATS_BASE)
        .step_by(4)
        .filter(|&o| regs::name(o).is_some())
        .collect();
    for (o, want) in [
        (regs::FAIL_INJECT, 0x0a0),
        (regs::FAIL_ARG, 0x0a4),
        (regs::WALK_LAG, 0x0a8),
        (regs::RESET, 0x0ac),
        (regs::FAULT_LAG, 0x0b0),
        (regs::IOTLB_KEEP, 0x0b4),
        (regs::PT_FREED_BASE_LO, 0x0b8),
        (regs::PT_FREED_BASE_HI, 0x0bc),
        (regs::PT_FREED_PAGES, 0x0c0),
        (regs::SYNC_LAG, 0x0c4),
        (regs::ASID_STAT_SEL, 0x0d8),
        (regs::asid_stat_lo(0), 0x0e0),
    ] {
        assert_eq!(o, want);
        assert!(named.contains(&o));
    }
    for o in 0..regs::STATS_BASE {
        if o % 4 != 0 {
            assert_eq!(regs::name(o), None, "{o:#x}");
        }
    }
    assert_eq!(regs::VERSION_MINOR, 9);
    // The statistics still end before the registers do.
    const { assert!(regs::stat_hi(regs::STAT_COUNT - 1) < shared_regs::pci::REGS_SIZE as u32) };
    assert_eq!(regs::IOTLB_KEEP_MASK, 1, "IOTLB_KEEP: bit 0 only");
}

#[test]
fn failure_modes_fit_their_field() {
    let modes = [
        regs::FAIL_NONE,
        regs::FAIL_CMDQ_STOP,
        regs::FAIL_SYNC_DELAY,
        regs::FAIL_CMDQ_ERROR,
        regs::FAIL_DROP_CMD_MSI,
        regs::FAIL_DMA_HANG,
        regs::FAIL_DIE,
    ];
    for (i, &m) in modes.iter().enumerate() {
        assert_eq!(m, i as u32, "modes are numbered densely from 0");
        assert_eq!(m & !regs::FAIL_MODE_MASK, 0);
    }
    // The injected command error fits the consumer register's code field and is new.
    const { assert!(cmd::CERR_INJECTED as u32 <= regs::CONS_ERR_CODE_MASK) };
    const { assert!(cmd::CERR_INJECTED > cmd::CERR_ABORT) };
}

#[test]
fn fnv_known_values() {
    assert_eq!(dma::fnv1a64(dma::FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(dma::fnv1a64(dma::FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
    // Streaming in pieces equals hashing at once.
    let whole = dma::fnv1a64(dma::FNV_OFFSET, b"hello world");
    assert_eq!(
        dma::fnv1a64(dma::fnv1a64(dma::FNV_OFFSET, b"hello "), b"world"),
        whole
    );
}

#[test]
fn every_violation_class_has_a_name_and_all_but_the_newest_a_stats_slot() {
    use shared_regs::uapi::ZG_VIOL_CLASSES;
    assert_eq!(event::violation_name(0), "unknown", "index 0 is unused");
    let names: Vec<&str> = (1..=event::VIOL_PHYS_UNLENT)
        .map(event::violation_name)
        .collect();
    assert_eq!(
        names,
        [
            "stale",
            "write_perm",
            "write_clean",
            "released",
            "ledger",
            "table_freed",
            "ctx_released",
            "zapped_during_access",
            "phys_unlent"
        ]
    );
    assert_eq!(event::VIOL_TABLE_FREED, 6);
    assert_eq!(event::VIOL_CTX_RELEASED, 7);
    assert_eq!(
        event::violation_name(event::VIOL_PHYS_UNLENT + 1),
        "unknown"
    );
    // ZgStats cannot grow without a new ioctl number: the per-context array stops before
    // zapped_during_access, which only the device-wide count and the trace carry.
    assert_eq!(ZG_VIOL_CLASSES, event::VIOL_ZAPPED_DURING_ACCESS as usize);
}
