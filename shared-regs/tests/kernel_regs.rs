//! The driver's typed register layer, `kmod/regs.rs`, is generated from this crate's register
//! definitions: the kernel's `register!` macro takes offsets as literals only, so the file
//! spells them out and asserts at build time that each one equals the constant here. This test
//! renders the file and fails when the committed one differs; `ZAPGUARD_BLESS=1 cargo test -p
//! shared-regs --test kernel_regs` rewrites it.

use shared_regs::regs::*;

/// One register field: its name, its mask in this crate, and how the driver sees it.
struct Field {
    name: &'static str,
    mask: u32,
    doc: &'static str,
}

/// One register, as the driver accesses it.
struct Reg {
    name: &'static str,
    offset: u32,
    doc: &'static str,
    fields: &'static [Field],
}

const fn f(name: &'static str, mask: u32, doc: &'static str) -> Field {
    Field { name, mask, doc }
}

const fn r(name: &'static str, offset: u32, doc: &'static str, fields: &'static [Field]) -> Reg {
    Reg {
        name,
        offset,
        doc,
        fields,
    }
}

/// The position in a producer or consumer register (index and wrap bit; the largest ring's).
const POSITION: u32 = (1 << (shared_regs::queue::MAX_LOG2 + 1)) - 1;
const VALUE: u32 = u32::MAX;
const UNITS: &[Field] = &[
    f("ctx_en", CR0_CTX_EN, "Context table (translation) enabled."),
    f("dmaq_en", CR0_DMAQ_EN, "DMA job queue enabled."),
    f("evtq_en", CR0_EVTQ_EN, "Event queue enabled."),
    f("cmdq_en", CR0_CMDQ_EN, "Command queue enabled."),
];
const WHOLE: &[Field] = &[f("value", VALUE, "The whole register.")];
const PRODUCER: &[Field] = &[f("position", POSITION, "Index and wrap bit.")];
const CONSUMER: &[Field] = &[
    f("err", CONS_ERR, "The queue stopped on an error."),
    f(
        "err_code",
        CONS_ERR_CODE_MASK << CONS_ERR_SHIFT,
        "The error's code (`CERR_*`).",
    ),
    f("position", POSITION, "Index and wrap bit."),
];

/// Every register the driver touches.
const REGS: &[Reg] = &[
    r("IDENT", IDENT, "Identity (`IDENT_MAGIC`).", WHOLE),
    r(
        "VERSION",
        VERSION,
        "ABI version.",
        &[
            f(
                "major",
                0xffff_0000,
                "Major version: the driver refuses another.",
            ),
            f("minor", 0x0000_ffff, "Minor version: additions only."),
        ],
    ),
    r("CAPS", CAPS, "Capability bits (`CAP_*`).", WHOLE),
    r("IOTLB_ENTRIES", IOTLB_ENTRIES, "IOTLB entries.", WHOLE),
    r(
        "ASID_COUNT",
        ASID_COUNT,
        "ASIDs (context-table entries).",
        WHOLE,
    ),
    r(
        "SCRATCH",
        SCRATCH,
        "Free for software (MMIO path probes).",
        WHOLE,
    ),
    r(
        "ERROR",
        ERROR,
        "Global error bits, write 1 to clear.",
        &[
            f(
                "dmaq_abort",
                ERR_DMAQ_ABORT,
                "A DMA job could not be fetched.",
            ),
            f(
                "evtq_abort",
                ERR_EVTQ_ABORT,
                "An event could not be written.",
            ),
            f(
                "config",
                ERR_CONFIG,
                "A unit was refused its configuration.",
            ),
            f("evtq_overflow", ERR_EVTQ_OVERFLOW, "Events were dropped."),
            f("cmdq", ERR_CMDQ, "The command queue stopped on an error."),
            f("bad_access", ERR_BAD_ACCESS, "A bad MMIO access."),
        ],
    ),
    r("ERROR_INFO", ERROR_INFO, "Detail of the last error.", WHOLE),
    r("CR0", CR0, "Unit enables.", UNITS),
    r(
        "CR0ACK",
        CR0ACK,
        "Unit enables as applied by the device.",
        UNITS,
    ),
    r(
        "IRQ_CTRL",
        IRQ_CTRL,
        "MSI-X causes enabled.",
        &[
            f("err_en", IRQ_ERR_EN, "Error vector."),
            f("evt_en", IRQ_EVT_EN, "Event vector."),
            f(
                "cmd_en",
                IRQ_CMD_EN,
                "Command vector (SYNC and job completions).",
            ),
        ],
    ),
    r(
        "CMD_LAG",
        CMD_LAG,
        "Test knob: DMA steps a job may run before new commands execute.",
        WHOLE,
    ),
    r(
        "CTX_BASE_LO",
        CTX_BASE_LO,
        "Context table address, bits 31:0.",
        WHOLE,
    ),
    r(
        "CTX_BASE_HI",
        CTX_BASE_HI,
        "Context table address, bits 63:32.",
        WHOLE,
    ),
    r(
        "CMDQ_BASE_LO",
        CMDQ_BASE_LO,
        "Command ring address, bits 31:0.",
        WHOLE,
    ),
    r(
        "CMDQ_BASE_HI",
        CMDQ_BASE_HI,
        "Command ring address, bits 63:32.",
        WHOLE,
    ),
    r(
        "CMDQ_LOG2SIZE",
        CMDQ_LOG2SIZE,
        "Command ring size, log2 of the entries.",
        WHOLE,
    ),
    r(
        "CMDQ_PROD",
        CMDQ_PROD,
        "Command ring producer (the doorbell).",
        PRODUCER,
    ),
    r("CMDQ_CONS", CMDQ_CONS, "Command ring consumer.", CONSUMER),
    r(
        "EVTQ_BASE_LO",
        EVTQ_BASE_LO,
        "Event ring address, bits 31:0.",
        WHOLE,
    ),
    r(
        "EVTQ_BASE_HI",
        EVTQ_BASE_HI,
        "Event ring address, bits 63:32.",
        WHOLE,
    ),
    r(
        "EVTQ_LOG2SIZE",
        EVTQ_LOG2SIZE,
        "Event ring size, log2 of the entries.",
        WHOLE,
    ),
    r(
        "EVTQ_PROD",
        EVTQ_PROD,
        "Event ring producer (the device's).",
        &[
            f("overflow", EVTQ_PROD_OVERFLOW, "Events were dropped."),
            f("position", POSITION, "Index and wrap bit."),
        ],
    ),
    r(
        "EVTQ_CONS",
        EVTQ_CONS,
        "Event ring consumer (the driver's).",
        PRODUCER,
    ),
    r(
        "DMAQ_BASE_LO",
        DMAQ_BASE_LO,
        "DMA job ring address, bits 31:0.",
        WHOLE,
    ),
    r(
        "DMAQ_BASE_HI",
        DMAQ_BASE_HI,
        "DMA job ring address, bits 63:32.",
        WHOLE,
    ),
    r(
        "DMAQ_LOG2SIZE",
        DMAQ_LOG2SIZE,
        "DMA job ring size, log2 of the entries.",
        WHOLE,
    ),
    r(
        "DMAQ_PROD",
        DMAQ_PROD,
        "DMA job ring producer (the doorbell).",
        PRODUCER,
    ),
    r(
        "DMAQ_CONS",
        DMAQ_CONS,
        "DMA job ring consumer (jobs completed).",
        CONSUMER,
    ),
    r(
        "FAIL_INJECT",
        FAIL_INJECT,
        "Test knob: the device failure mode armed.",
        &[f("mode", FAIL_MODE_MASK, "`FAIL_*`.")],
    ),
    r(
        "FAIL_ARG",
        FAIL_ARG,
        "Test knob: the failure mode's argument.",
        WHOLE,
    ),
    r(
        "WALK_LAG",
        WALK_LAG,
        "Test knob: microseconds before each table read of a walk.",
        WHOLE,
    ),
    r("RESET", RESET, "Device reset: takes `RESET_KEY`.", WHOLE),
    r(
        "FAULT_LAG",
        FAULT_LAG,
        "Test knob: microseconds before a DMA job's fault is reported.",
        WHOLE,
    ),
    r(
        "IOTLB_KEEP",
        IOTLB_KEEP,
        "Test knob: a full IOTLB evicts nothing.",
        &[f(
            "keep",
            IOTLB_KEEP_EN,
            "New translations are used uncached instead of evicting.",
        )],
    ),
    r(
        "PT_FREED_BASE_LO",
        PT_FREED_BASE_LO,
        "Test knob: freed-table bitmap address, bits 31:0 (8-byte aligned).",
        WHOLE,
    ),
    r(
        "PT_FREED_BASE_HI",
        PT_FREED_BASE_HI,
        "Test knob: freed-table bitmap address, bits 63:32.",
        WHOLE,
    ),
    r(
        "PT_FREED_PAGES",
        PT_FREED_PAGES,
        "Test knob: guest pages the freed-table bitmap covers (0: check off).",
        WHOLE,
    ),
    r(
        "SYNC_LAG",
        SYNC_LAG,
        "Test knob: microseconds before a SYNC's completion is written.",
        WHOLE,
    ),
    r(
        "PHYS_ADDR_LO",
        PHYS_ADDR_LO,
        "Start of the region the next PHYS_CTRL write declares, bits 31:0.",
        WHOLE,
    ),
    r(
        "PHYS_ADDR_HI",
        PHYS_ADDR_HI,
        "Start of the region the next PHYS_CTRL write declares, bits 63:32.",
        WHOLE,
    ),
    r(
        "PHYS_LEN",
        PHYS_LEN,
        "Length in bytes of the region the next PHYS_CTRL write declares.",
        WHOLE,
    ),
    r(
        "PHYS_CTRL",
        PHYS_CTRL,
        "Declares, reclaims or forgets memory lent for untranslated DMA; turns its check on.",
        &[
            f("op", PHYS_OP_MASK, "`PHYS_OP_*`."),
            f(
                "asid",
                u32::MAX << PHYS_CTRL_ASID_SHIFT,
                "The ASID the operation names.",
            ),
        ],
    ),
    r(
        "ASID_STAT_SEL",
        ASID_STAT_SEL,
        "Selects the ASID whose per-ASID statistics read back; zeroes them with `clear`.",
        &[
            f(
                "clear",
                ASID_STAT_CLEAR,
                "Zero the selected ASID's counters.",
            ),
            f("asid", ASID_STAT_ASID_MASK, "The ASID."),
        ],
    ),
];

/// `hi:lo` of a contiguous mask.
fn bits(mask: u32) -> (u32, u32) {
    let lo = mask.trailing_zeros();
    let hi = 31 - mask.leading_zeros();
    assert_eq!(
        mask,
        (u32::MAX >> (31 - hi)) & (u32::MAX << lo),
        "mask {mask:#x} is not contiguous"
    );
    (hi, lo)
}

fn render() -> String {
    let mut out = String::from(
        "// SPDX-License-Identifier: GPL-2.0\n\
         // @generated by shared-regs/tests/kernel_regs.rs from shared-regs/src/abi/regs.rs: do not\n\
         // edit. `ZAPGUARD_BLESS=1 cargo test -p shared-regs --test kernel_regs` regenerates it.\n\
         \n\
         //! Typed BAR0 registers (the kernel's `register!`), generated from the one definition in\n\
         //! `shared-regs`. The macro takes literal offsets only, so each one is checked against\n\
         //! the ABI constant at build time.\n\
         \n\
         use kernel::io::{register, register::Register};\n\
         \n\
         register! {\n",
    );
    for (i, reg) in REGS.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out += &format!("    /// {}\n", reg.doc);
        out += &format!(
            "    pub(crate) {}(u32) @ {:#05x} {{\n",
            reg.name, reg.offset
        );
        for field in reg.fields {
            let (hi, lo) = bits(field.mask);
            let conv = if hi == lo { " => bool" } else { "" };
            out += &format!("        /// {}\n", field.doc);
            out += &format!("        {hi}:{lo} {}{conv};\n", field.name);
        }
        out += "    }\n";
    }
    out += "}\n\n// One definition: every offset above is the ABI's.\n";
    for reg in REGS {
        out += &format!(
            "const _: () = assert!(<{0} as Register>::OFFSET == crate::abi::regs::{0} as usize);\n",
            reg.name
        );
    }
    out
}

#[test]
fn kmod_regs_rs_is_generated_from_the_abi() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kmod/regs.rs");
    let want = render();
    if std::env::var_os("ZAPGUARD_BLESS").is_some() {
        std::fs::write(&path, &want).expect("write kmod/regs.rs");
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "kmod/regs.rs is not what shared-regs generates; run \
         `ZAPGUARD_BLESS=1 cargo test -p shared-regs --test kernel_regs` and commit the result"
    );
}

#[test]
fn field_masks_are_contiguous_and_in_their_register() {
    for reg in REGS {
        let mut seen = 0u32;
        for field in reg.fields {
            bits(field.mask);
            assert_eq!(seen & field.mask, 0, "{}.{} overlaps", reg.name, field.name);
            seen |= field.mask;
        }
    }
}
