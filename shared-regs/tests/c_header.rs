//! `include/zapguard.h`, the `/dev/zapguard` uAPI for C programs, is generated from this crate:
//! the structures and constants are read from the sources of `abi/uapi.rs` (and the opcodes,
//! statuses, fault reasons, violation classes and failure modes it refers to), their values and
//! sizes come from the compiled crate, and the header asserts every size, offset and ioctl
//! number with `_Static_assert` against the C compiler's own layout and `_IOC`. This test
//! renders the header, compiles it with `cc` (when there is one) and fails when the committed
//! file differs; `ZAPGUARD_BLESS=1 cargo test -p shared-regs --test c_header` rewrites it.

use shared_regs::{dma, event, uapi};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// A constant's C type suffix and value.
#[derive(Clone, Copy)]
struct Value {
    v: u64,
    wide: bool,
}

macro_rules! values {
    ($module:ident: $($name:ident),* $(,)?) => {
        [$((stringify!($name), Value { v: $module::$name as u64, wide: std::mem::size_of_val(&$module::$name) > 4 })),*]
    };
}

/// Every `pub const` of `uapi.rs` (a new one must be added here: the test says so).
fn uapi_values() -> BTreeMap<&'static str, Value> {
    values!(uapi: ZG_IOC_MAGIC, IOC_WRITE, IOC_READ, UAPI_VERSION, ZG_IOC_GET_INFO, ZG_MAP_WRITE,
        ZG_MAP_FLAGS, ZG_DMA_NO_FAULT, ZG_DMA_FLAGS, ZG_DMA_BOUNCE_MAX, ZG_SNAP_DEV_PRESENT,
        ZG_SNAP_DEV_WRITE, ZG_SNAP_DEV_HUGE, ZG_SNAP_DEV_DIRTY, ZG_SNAP_CPU_VALID,
        ZG_SNAP_CPU_WRITE, ZG_SNAP_CPU_HUGE, ZG_SNAP_CPU_ERROR, ZG_SNAPSHOT_MAX_PAGES,
        ZG_STATS_RELEASED, ZG_VIOL_CLASSES, ZG_IOC_MAP,
        ZG_IOC_DMA, ZG_IOC_SNAPSHOT, ZG_IOC_STATS, ZG_INFO_SIZE_VER0,
        ZG_MAP_SIZE_VER0, ZG_DMA_SIZE_VER0, ZG_SNAPSHOT_SIZE_VER0, ZG_STATS_SIZE_VER0,
        ZG_SIZE_MAX)
    .into_iter()
    .collect()
}

/// The device constants a user of the uAPI needs, from the other ABI files (prefixed `ZG_` in C).
fn device_values() -> Vec<(&'static str, &'static str, Value)> {
    let mut out = Vec::new();
    let mut add = |file: &'static str, vals: &[(&'static str, Value)]| {
        out.extend(vals.iter().map(|&(n, v)| (file, n, v)));
    };
    add(
        "dma.rs",
        &values!(dma: DMA_COPY, DMA_FILL, DMA_WRITE, DMA_READ, DMA_CHECKSUM, DMA_COMPARE,
            DMA_MAX_LEN, DMA_ST_PENDING, DMA_ST_OK, DMA_ST_FAULT, DMA_ST_BAD_JOB,
            DMA_ST_BUF_ERROR, FNV_OFFSET, FNV_PRIME),
    );
    add(
        "event.rs",
        &values!(event: FAULT_NOT_PRESENT, FAULT_PERMISSION, FAULT_CTX_INVALID, FAULT_BAD_PTE,
            FAULT_WALK_ABORT, FAULT_ADDRESS, FAULT_ABORTED, VIOL_STALE, VIOL_WRITE_PERM,
            VIOL_WRITE_CLEAN, VIOL_RELEASED, VIOL_LEDGER, VIOL_TABLE_FREED, VIOL_CTX_RELEASED,
            VIOL_ZAPPED_DURING_ACCESS),
    );
    out
}

/// Sizes of the uAPI structures, by Rust name.
fn sizes() -> BTreeMap<&'static str, usize> {
    use std::mem::size_of;
    [
        ("ZgInfo", size_of::<uapi::ZgInfo>()),
        ("ZgMap", size_of::<uapi::ZgMap>()),
        ("ZgDma", size_of::<uapi::ZgDma>()),
        ("ZgSnapshot", size_of::<uapi::ZgSnapshot>()),
        ("ZgStats", size_of::<uapi::ZgStats>()),
    ]
    .into_iter()
    .collect()
}

/// Each ioctl's `<linux/ioctl.h>` direction and the constant of its structure's 1.0 size (the
/// size every ioctl number keeps: uAPI 1.0's stability rule).
const IOCTLS: [(&str, &str, &str); 5] = [
    (
        "ZG_IOC_GET_INFO",
        "_IOC_READ | _IOC_WRITE",
        "ZG_INFO_SIZE_VER0",
    ),
    ("ZG_IOC_MAP", "_IOC_READ | _IOC_WRITE", "ZG_MAP_SIZE_VER0"),
    ("ZG_IOC_DMA", "_IOC_READ | _IOC_WRITE", "ZG_DMA_SIZE_VER0"),
    ("ZG_IOC_SNAPSHOT", "_IOC_WRITE", "ZG_SNAPSHOT_SIZE_VER0"),
    (
        "ZG_IOC_STATS",
        "_IOC_READ | _IOC_WRITE",
        "ZG_STATS_SIZE_VER0",
    ),
];

fn source(file: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/abi")
        .join(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Rustdoc to plain text: links and code spans lose their markup and paths.
fn plain(doc: &str) -> String {
    let mut s = doc.replace("[`", "").replace("`]", "").replace('`', "");
    for path in [
        "super::dma::",
        "super::regs::",
        "super::pte::",
        "super::",
        "Self::",
    ] {
        s = s.replace(path, "");
    }
    s
}

/// A `pub const` or `pub struct` item of a source file, with its doc comment.
struct Item {
    doc: Vec<String>,
    /// The item's first line after `pub `.
    head: String,
    /// Struct fields: (doc, name, Rust type).
    fields: Vec<(Vec<String>, String, String)>,
}

fn items(src: &str) -> Vec<Item> {
    let mut out = Vec::new();
    let mut doc = Vec::new();
    let mut lines = src.lines();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if let Some(d) = t.strip_prefix("///") {
            doc.push(plain(d.trim()));
            continue;
        }
        if t.starts_with("#[") {
            // An attribute, possibly over several lines (rustfmt splits long `cfg_attr`s).
            let mut depth = t.matches('[').count() as i32 - t.matches(']').count() as i32;
            while depth > 0 {
                let Some(l) = lines.next() else { break };
                depth += l.matches('[').count() as i32 - l.matches(']').count() as i32;
            }
            continue;
        }
        if line.starts_with("pub const ") && !line.starts_with("pub const fn") {
            out.push(Item {
                doc: std::mem::take(&mut doc),
                head: line["pub ".len()..].to_string(),
                fields: Vec::new(),
            });
        } else if line.starts_with("pub struct ") {
            let mut fields = Vec::new();
            let mut fdoc = Vec::new();
            for l in lines.by_ref() {
                let t = l.trim();
                if t == "}" {
                    break;
                }
                if let Some(d) = t.strip_prefix("///") {
                    fdoc.push(plain(d.trim()));
                } else if let Some(f) = t.strip_prefix("pub ") {
                    let (name, ty) = f.trim_end_matches(',').split_once(": ").expect("field");
                    fields.push((std::mem::take(&mut fdoc), name.into(), ty.into()));
                }
            }
            out.push(Item {
                doc: std::mem::take(&mut doc),
                head: line["pub ".len()..].to_string(),
                fields,
            });
        } else {
            doc.clear();
        }
    }
    out
}

fn const_name(head: &str) -> &str {
    head["const ".len()..].split(':').next().unwrap().trim()
}

/// `ZgStats` -> `zg_stats`.
fn c_struct(rust: &str) -> String {
    let mut s = String::new();
    for (i, c) in rust.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            s.push('_');
        }
        s.push(c.to_ascii_lowercase());
    }
    s
}

fn c_const(name: &str) -> String {
    if name.starts_with("ZG_") {
        name.to_string()
    } else {
        format!("ZG_{name}")
    }
}

fn c_value(v: Value) -> String {
    let suffix = if v.wide { "ull" } else { "u" };
    if v.v < 10 {
        format!("{}{suffix}", v.v)
    } else {
        format!("{:#x}{suffix}", v.v)
    }
}

/// (C type, array length, size, alignment) of a field's Rust type.
fn c_type(ty: &str, values: &BTreeMap<&str, Value>) -> (String, Option<u64>, u64) {
    if let Some(inner) = ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        let (elem, n) = inner.split_once("; ").expect("array type");
        let n = n
            .parse()
            .unwrap_or_else(|_| values.get(n).unwrap_or_else(|| panic!("length {n}")).v);
        let (t, _, size) = c_type(elem, values);
        return (t, Some(n), size);
    }
    let (t, size) = match ty {
        "u8" => ("__u8", 1),
        "u16" => ("__u16", 2),
        "u32" => ("__u32", 4),
        "i32" => ("__s32", 4),
        "u64" => ("__u64", 8),
        other => panic!("no C type for {other}"),
    };
    (t.into(), None, size)
}

/// Rust names in a doc line as the header spells them: `ZgMap::flags` -> `struct zg_map.flags`,
/// `DMA_READ` -> `ZG_DMA_READ`.
fn c_names(line: &str) -> String {
    let consts: Vec<&str> = uapi_values()
        .into_keys()
        .chain(device_values().into_iter().map(|(_, n, _)| n))
        .collect();
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.starts_with("Zg") && sizes().contains_key(word.as_str()) {
            out.push_str(&format!("struct {}", c_struct(word)));
        } else if consts.contains(&word.as_str()) {
            out.push_str(&c_const(word));
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else if c == ':' && chars.peek() == Some(&':') && word.starts_with("Zg") {
            chars.next();
            flush(&mut word, &mut out);
            out.push('.');
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn comment(out: &mut String, indent: &str, doc: &[String]) {
    let doc: Vec<String> = doc.iter().map(|l| c_names(l)).collect();
    let text: Vec<&str> = doc
        .iter()
        .map(String::as_str)
        .filter(|l| !l.is_empty())
        .collect();
    if text.is_empty() {
        return;
    }
    if text.len() == 1 {
        let _ = writeln!(out, "{indent}/* {} */", text[0]);
        return;
    }
    let _ = writeln!(out, "{indent}/*");
    for l in text {
        let _ = writeln!(out, "{indent} * {l}");
    }
    let _ = writeln!(out, "{indent} */");
}

fn render() -> String {
    let values = uapi_values();
    let sizes = sizes();
    let uapi_items = items(&source("uapi.rs"));
    let mut out = String::new();
    out.push_str(
        "/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */\n\
         /*\n \
         * zapguard.h: the /dev/zapguard user API (ioctls, their structures and the device\n \
         * constants they carry).\n \
         *\n \
         * GENERATED by shared-regs/tests/c_header.rs from shared-regs/src/abi/ (uapi.rs, dma.rs,\n \
         * event.rs, regs.rs): do not edit. Every size, offset and ioctl number is checked below\n \
         * against this compiler's layout.\n \
         */\n\
         #ifndef ZAPGUARD_H\n#define ZAPGUARD_H\n\n\
         #include <linux/ioctl.h>\n#include <linux/types.h>\n#include <stddef.h>\n\n\
         #ifdef __cplusplus\n#define _Static_assert static_assert\nextern \"C\" {\n#endif\n",
    );
    let mut seen = Vec::new();
    for item in &uapi_items {
        if item.head.starts_with("const ") {
            let name = const_name(&item.head);
            let v = *values
                .get(name)
                .unwrap_or_else(|| panic!("uapi.rs has `{name}`: add it to uapi_values()"));
            seen.push(name.to_string());
            out.push('\n');
            comment(&mut out, "", &item.doc);
            let _ = writeln!(out, "#define {} {}", c_const(name), c_value(v));
        } else {
            let rust = item.head["struct ".len()..].trim_end_matches(" {").trim();
            let size = *sizes
                .get(rust)
                .unwrap_or_else(|| panic!("uapi.rs has `{rust}`: add it to sizes()"));
            let c = c_struct(rust);
            out.push('\n');
            comment(&mut out, "", &item.doc);
            let _ = writeln!(out, "struct {c} {{");
            let mut offset = 0u64;
            let mut asserts = Vec::new();
            for (doc, name, ty) in &item.fields {
                let (t, n, elem) = c_type(ty, &values);
                offset = offset.next_multiple_of(elem);
                comment(&mut out, "\t", doc);
                match n {
                    Some(n) => {
                        let _ = writeln!(out, "\t{t} {name}[{n}];");
                        asserts.push((name.clone(), offset));
                        offset += elem * n;
                    }
                    None => {
                        let _ = writeln!(out, "\t{t} {name};");
                        asserts.push((name.clone(), offset));
                        offset += elem;
                    }
                }
            }
            let _ = writeln!(out, "}};");
            assert_eq!(
                offset, size as u64,
                "{rust}: padding or a field the generator misread"
            );
            let _ = writeln!(
                out,
                "_Static_assert(sizeof(struct {c}) == {size}, \"struct {c}: size as in shared-regs\");"
            );
            for (name, off) in asserts {
                let _ = writeln!(
                    out,
                    "_Static_assert(offsetof(struct {c}, {name}) == {off}, \"struct {c}.{name}: offset\");"
                );
            }
        }
    }
    for name in values.keys() {
        assert!(
            seen.iter().any(|s| s == name),
            "uapi_values() has `{name}`, which uapi.rs no longer defines"
        );
    }
    out.push_str("\n/* The ioctl numbers, as <linux/ioctl.h> encodes them. */\n");
    for (name, dir, ver0) in IOCTLS {
        let v = values[name].v;
        let _ = writeln!(
            out,
            "_Static_assert({name} == _IOC({dir}, 'z', {:#04x}, {ver0}), \"{name}\");",
            v & 0xff,
        );
    }

    let mut file = "";
    for (f, name, v) in device_values() {
        let doc = items(&source(f))
            .into_iter()
            .find(|i| i.head.starts_with("const ") && const_name(&i.head) == name)
            .map(|i| i.doc)
            .unwrap_or_else(|| panic!("{f} has no `{name}`"));
        if f != file {
            file = f;
            let _ = writeln!(out, "\n/* Device constants from {f}. */");
        }
        comment(&mut out, "", &doc);
        let _ = writeln!(out, "#define {} {}", c_const(name), c_value(v));
    }
    out.push_str("\n#ifdef __cplusplus\n}\n#endif\n\n#endif /* ZAPGUARD_H */\n");
    out
}

#[test]
fn c_header_is_current_and_compiles() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/zapguard.h");
    let text = render();
    if std::env::var_os("ZAPGUARD_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "{} is stale: run ZAPGUARD_BLESS=1 cargo test -p shared-regs --test c_header",
        path.display()
    );
    // The compiler checks every _Static_assert: sizes, offsets and ioctl numbers.
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    match std::process::Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Werror", "-fsyntax-only", "-x", "c"])
        .arg(&path)
        .output()
    {
        Ok(o) => assert!(
            o.status.success(),
            "{cc} rejects zapguard.h:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!("no C compiler ({cc}: {e}); the header's asserts were not compiled"),
    }
}
