//! uAPI 1.0's stability rules, seen from a program: every argument structure carries its
//! `size`; the driver zero-extends an older (smaller) one, accepts a newer (larger) one whose
//! unknown tail is zero, refuses one with a non-zero tail (`E2BIG`, telling its own size), and
//! writes answers back only up to the caller's size. Programs built against the frozen 1.0
//! header (`shared-regs/include/frozen/`) keep working: see `c_example_built_against_uapi_1_0`.

use crate::dev::{self, Mapping};
use crate::ktap::check_eq;
use shared_regs::uapi::{self, *};
use std::fs::File;

/// A byte buffer holding an argument structure of `T`, `extra` bytes longer than `T` (the
/// structure of a newer program), with `size` set to `size`.
struct Arg {
    bytes: Vec<u8>,
}

impl Arg {
    fn new<T: zerocopy::IntoBytes + zerocopy::Immutable>(v: &T, extra: usize, size: usize) -> Self {
        let mut bytes = v.as_bytes().to_vec();
        bytes.resize(bytes.len() + extra, 0);
        bytes[..4].copy_from_slice(&(size as u32).to_ne_bytes());
        Self { bytes }
    }

    fn size_field(&self) -> u32 {
        u32::from_ne_bytes(self.bytes[..4].try_into().unwrap_or_default())
    }

    fn ioctl(&mut self, f: &File, cmd: u32) -> Result<(), i32> {
        dev::ioctl_raw(f, cmd, self.bytes.as_mut_ptr() as usize)
            .map(drop)
            .map_err(|e| dev::errno(&e))
    }
}

fn open() -> Result<File, String> {
    dev::open().map_err(|e| format!("open: {e}"))
}

/// `size` below the 1.0 size gets `EINVAL`, above 4096 `E2BIG`, for every ioctl.
pub fn uapi_size_out_of_bounds_is_refused() -> Result<(), String> {
    let f = open()?;
    let cases: [(u32, usize, usize, &str); 5] = [
        (
            ZG_IOC_GET_INFO,
            ZG_INFO_SIZE_VER0,
            size_of::<ZgInfo>(),
            "GET_INFO",
        ),
        (ZG_IOC_MAP, ZG_MAP_SIZE_VER0, size_of::<ZgMap>(), "MAP"),
        (ZG_IOC_DMA, ZG_DMA_SIZE_VER0, size_of::<ZgDma>(), "DMA"),
        (
            ZG_IOC_SNAPSHOT,
            ZG_SNAPSHOT_SIZE_VER0,
            size_of::<ZgSnapshot>(),
            "SNAPSHOT",
        ),
        (
            ZG_IOC_STATS,
            ZG_STATS_SIZE_VER0,
            size_of::<ZgStats>(),
            "STATS",
        ),
    ];
    for (cmd, ver0, ours, what) in cases {
        for (size, want) in [
            (0, libc::EINVAL),
            (4, libc::EINVAL),
            (ver0 - 1, libc::EINVAL),
            (ZG_SIZE_MAX + 1, libc::E2BIG),
            (u32::MAX as usize, libc::E2BIG),
        ] {
            let mut a = Arg {
                bytes: vec![0; ours.max(8)],
            };
            a.bytes[..4].copy_from_slice(&(size as u32).to_ne_bytes());
            check_eq(
                a.ioctl(&f, cmd),
                Err(want),
                &format!("{what} with size {size}"),
            )?;
        }
    }
    Ok(())
}

/// A newer program's larger structure works when the bytes this driver does not know are
/// zero, and gets `E2BIG` with the driver's own size in `size` when they are not.
pub fn uapi_larger_struct_with_zero_tail_is_accepted() -> Result<(), String> {
    let f = open()?;
    let ours = size_of::<ZgInfo>();
    // GET_INFO answers up to the caller's size: the tail stays the caller's.
    let mut a = Arg::new(&ZgInfo::default(), 64, ours + 64);
    a.ioctl(&f, ZG_IOC_GET_INFO)
        .map_err(|e| format!("GET_INFO with a zero tail: errno {e}"))?;
    let ident = u32::from_ne_bytes(a.bytes[8..12].try_into().unwrap_or_default());
    check_eq(ident, shared_regs::regs::IDENT_MAGIC, "ident in the answer")?;
    check_eq(a.size_field() as usize, ours + 64, "size after the answer")?;
    check_eq(
        a.bytes[ours..].iter().all(|&b| b == 0),
        true,
        "the tail the driver does not know is left alone",
    )?;
    let mut bad = Arg::new(&ZgInfo::default(), 64, ours + 64);
    bad.bytes[ours + 63] = 1;
    check_eq(
        bad.ioctl(&f, ZG_IOC_GET_INFO),
        Err(libc::E2BIG),
        "GET_INFO with a non-zero unknown byte",
    )?;
    check_eq(
        bad.size_field() as usize,
        ours,
        "size the driver wrote back with E2BIG",
    )?;
    // The same for an input structure: a MAP of a real buffer with a zero tail works.
    let mut m = Mapping::anon(4096).map_err(|e| e.to_string())?;
    m.bytes_mut().fill(7);
    let map = ZgMap {
        va: m.addr as u64,
        len: 4096,
        ..Default::default()
    };
    let mut a = Arg::new(&map, 16, size_of::<ZgMap>() + 16);
    a.ioctl(&f, ZG_IOC_MAP)
        .map_err(|e| format!("MAP with a zero tail: errno {e}"))?;
    let mut bad = Arg::new(&map, 16, size_of::<ZgMap>() + 16);
    bad.bytes[size_of::<ZgMap>()] = 0x80;
    check_eq(
        bad.ioctl(&f, ZG_IOC_MAP),
        Err(libc::E2BIG),
        "MAP with a non-zero unknown byte",
    )?;
    Ok(())
}

/// Answers go no further than the caller's `size`, and `pad` fields must be zero: a canary
/// past the driver's own structure, and a program built against 1.0 whose `zg_stats` is
/// shorter than 1.1's.
pub fn uapi_answers_stop_at_the_callers_size_and_pads_are_checked() -> Result<(), String> {
    let f = open()?;
    let ours = size_of::<ZgStats>();
    // The caller's buffer is longer than its size says: the bytes past `size` are not its
    // structure's and must stay as they were.
    let mut a = Arg::new(&ZgStats::default(), 32, ours);
    a.bytes[ours..].fill(0xa5);
    a.ioctl(&f, ZG_IOC_STATS)
        .map_err(|e| format!("STATS: errno {e}"))?;
    check_eq(
        a.bytes[ours..].iter().all(|&b| b == 0xa5),
        true,
        "bytes past the caller's size untouched",
    )?;
    // A program built against uAPI 1.0 passes the 1.0 size: it gets the 1.0 fields, and the
    // fields 1.1 added (which its structure does not have) are not written over its memory.
    let mut old = Arg::new(&ZgStats::default(), 0, ZG_STATS_SIZE_VER0);
    old.bytes[ZG_STATS_SIZE_VER0..].fill(0xa5);
    old.ioctl(&f, ZG_IOC_STATS)
        .map_err(|e| format!("STATS at the 1.0 size: errno {e}"))?;
    let asid = u32::from_ne_bytes(old.bytes[4..8].try_into().unwrap_or_default());
    check_eq(
        asid,
        dev::stats(&f).map_err(|e| format!("STATS: {e}"))?.asid,
        "the 1.0 caller's asid",
    )?;
    check_eq(
        old.bytes[ZG_STATS_SIZE_VER0..].iter().all(|&b| b == 0xa5),
        true,
        "bytes past a 1.0 caller's structure untouched",
    )?;
    let m = Mapping::anon(4096).map_err(|e| e.to_string())?;
    let map = ZgMap {
        va: m.addr as u64,
        len: 4096,
        pad: 1,
        ..Default::default()
    };
    let mut map = map;
    check_eq(
        dev::ioctl_rw(&f, ZG_IOC_MAP, &mut map).map_err(|e| dev::errno(&e)),
        Err(libc::EINVAL),
        "MAP with a non-zero pad",
    )?;
    let mut d = dev::job(shared_regs::dma::DMA_CHECKSUM, m.addr, 0, 4096, 0);
    d.pad = 1;
    check_eq(
        dev::ioctl_rw(&f, ZG_IOC_DMA, &mut d).map_err(|e| dev::errno(&e)),
        Err(libc::EINVAL),
        "DMA with a non-zero pad",
    )?;
    let mut out = [0u8; 1];
    let mut s = ZgSnapshot {
        flags: 1,
        va: m.addr as u64,
        npages: 1,
        out: out.as_mut_ptr() as u64,
        ..Default::default()
    };
    check_eq(
        dev::ioctl_rw(&f, ZG_IOC_SNAPSHOT, &mut s).map_err(|e| dev::errno(&e)),
        Err(libc::EINVAL),
        "SNAPSHOT with an unknown flag",
    )?;
    // The numbers before 1.0 are gone (they encoded other sizes): uAPI 8's GET_INFO.
    let old_get_info = uapi::ioc(uapi::IOC_READ, ZG_IOC_MAGIC, 0x00, 64);
    let mut info = ZgInfo::default();
    check_eq(
        dev::ioctl_rw(&f, old_get_info, &mut info).map_err(|e| dev::errno(&e)),
        Err(libc::ENOTTY),
        "GET_INFO by its pre-1.0 number",
    )
}

/// STATS (uAPI 1.1) tells each context how many of its DMA steps the device's validator
/// judged: on the test build every step of a job is judged, on the production module none is
/// (it gives the device no CPU page table to judge against). Another context's job never
/// shows in them, and a context starts at zero even on an ASID an earlier context used.
pub fn stats_count_the_steps_the_device_judged_per_context() -> Result<(), String> {
    const PAGES: usize = 16;
    let counts = |f: &File| -> Result<(u32, u64, u64), String> {
        let s = dev::stats(f).map_err(|e| format!("STATS: {e}"))?;
        Ok((s.asid, s.accesses_judged, s.accesses_unjudged))
    };
    let checksum = |f: &File, m: &Mapping, pages: usize| -> Result<(), String> {
        let job = dev::job(
            shared_regs::dma::DMA_CHECKSUM,
            m.addr,
            0,
            pages * dev::PG,
            0,
        );
        dev::dma(f, job)
            .map(drop)
            .map_err(|(e, _)| format!("CHECKSUM: {e}"))
    };
    let mut m = Mapping::anon(PAGES * dev::PG).map_err(|e| e.to_string())?;
    m.bytes_mut().fill(3);
    let a = open()?;
    let b = open()?;
    let (asid, ..) = counts(&a)?;
    check_eq(counts(&a)?, (asid, 0, 0), "a new context's counts")?;
    checksum(&a, &m, PAGES)?;
    let (_, judged, unjudged) = counts(&a)?;
    // A step ends at a page boundary: at least one step per page, all of one kind.
    let (seen, unseen, kind) = if crate::production() {
        (unjudged, judged, "unjudged (production)")
    } else {
        (judged, unjudged, "judged (test build)")
    };
    if seen < PAGES as u64 || unseen != 0 {
        return Err(format!(
            "a {PAGES}-page job: {judged} steps judged, {unjudged} unjudged; expected every \
             step {kind}"
        ));
    }
    let (b_asid, ..) = counts(&b)?;
    check_eq(counts(&b)?, (b_asid, 0, 0), "B's counts after A's job")?;
    checksum(&b, &m, 1)?;
    check_eq(
        counts(&a)?,
        (asid, judged, unjudged),
        "A's counts after B's job",
    )?;
    let (_, bj, bu) = counts(&b)?;
    check_eq(bj + bu > 0, true, "B's own job counted")?;
    // ASIDs are handed out round robin: open and close until A's comes back.
    drop(a);
    let n = dev::get_info(&b)
        .map_err(|e| format!("GET_INFO: {e}"))?
        .asid_count;
    for _ in 0..n {
        let c = open()?;
        let now = counts(&c)?;
        if now.0 == asid {
            return check_eq(now, (asid, 0, 0), "a new context on A's old ASID");
        }
    }
    Err(format!("ASID {asid} never came back in {n} opens"))
}

/// The test surface exists exactly in the test build: a debugfs `inject` file per open context
/// there, none on the production module (whose file the harness also checks for knob
/// parameters and injection symbols). On both, the retired number 0x05 (the test build's
/// `INJECT` before 1.0) is an unknown ioctl.
pub fn test_surface_only_in_the_test_build() -> Result<(), String> {
    let f = open()?;
    let production = crate::production();
    let asid = dev::stats(&f).map_err(|e| format!("STATS: {e}"))?.asid;
    let inject = dev::debugfs_dir().map(|d| format!("{d}/{asid}/inject"));
    match (&inject, production) {
        (Ok(p), false) if std::path::Path::new(p).exists() => {}
        (Err(e), true) if dev::errno(e) == libc::ENOENT => {}
        (r, _) => {
            return Err(format!(
                "this context's debugfs inject file on the {} build: {r:?}",
                if production { "production" } else { "test" }
            ))
        }
    }
    let mut buf = [0u8; 40];
    let retired = uapi::ioc(uapi::IOC_WRITE, uapi::ZG_IOC_MAGIC, 0x05, buf.len());
    check_eq(
        dev::ioctl_raw(&f, retired, buf.as_mut_ptr() as usize).map_err(|e| dev::errno(&e)),
        Err(libc::ENOTTY),
        "the retired INJECT number",
    )?;
    Ok(())
}
