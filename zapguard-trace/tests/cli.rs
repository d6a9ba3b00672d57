//! Every subcommand of the `zapguard-trace` binary on an empty trace, a tiny one and a window
//! without events: an answer and an exit status, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;
use zapguard_trace::format::{begin_chunk, seal_chunk, Clock, FileHeader, RecordHead};
use zerocopy::IntoBytes;

/// A binary trace: a header, then each `(t_ns, JSON without t_ns and seq)` as a clock record
/// and an event record, as the device writes them, `per_chunk` events to a chunk.
fn chunked(events: &[(u64, &str)], per_chunk: usize) -> Vec<u8> {
    let mut f = FileHeader::new(0).as_bytes().to_vec();
    for (n, part) in events.chunks(per_chunk.max(1)).enumerate() {
        let mut c = Vec::new();
        let first = (n * per_chunk) as u64;
        begin_chunk(&mut c, n as u64, first, 0, (0, 0));
        for (t, json) in part {
            c.extend_from_slice(Clock::new(*t).as_bytes());
            c.extend_from_slice(RecordHead::event(json.len()).expect("short").as_bytes());
            c.extend_from_slice(json.as_bytes());
        }
        assert!(seal_chunk(&mut c));
        f.extend_from_slice(&c);
    }
    f
}

/// [`chunked`], one chunk.
fn binary(events: &[(u64, &str)]) -> Vec<u8> {
    chunked(events, events.len())
}

/// A handful of events: a doorbell, an invalidation and its SYNC, a job with a fault.
const TINY: [(u64, &str); 7] = [
    (
        1000,
        r#"{"kind":"bar_write","reg":"CMDQ_LOG2SIZE","value":6}"#,
    ),
    (2000, r#"{"kind":"job_start","job":5,"op":"copy","asid":3}"#),
    (3000, r#"{"kind":"bar_write","reg":"CMDQ_PROD","value":2}"#),
    (
        3500,
        r#"{"kind":"command","cmd":0,"op":"inv_range","asid":3,"va":4096,"len":4096}"#,
    ),
    (5000, r#"{"kind":"sync_done","cmd":1,"waited":0}"#),
    (
        6000,
        r#"{"kind":"fault","job":5,"asid":3,"va":8192,"write":false,"result":"not_present","stalled":false}"#,
    ),
    (
        9000,
        r#"{"kind":"job_done","job":5,"asid":3,"result":"fault","len":4096,"faults":1}"#,
    ),
];

/// A window after the tiny trace's last event (the issue's).
const LATE: [&str; 4] = ["--from", "3000000000", "--to", "3400000000"];

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn dir(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{test}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn run(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_zapguard-trace"))
        .args(args)
        .output()
        .expect("run zapguard-trace");
    let r = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !r.stderr.contains("panicked"),
        "{args:?} panicked: {}",
        r.stderr
    );
    r
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Starts with `<svg`, ends with `</svg>`, has one root and the legend, and every element
/// opened is closed.
fn assert_svg(file: &Path) -> String {
    let svg = std::fs::read_to_string(file).expect("SVG written");
    assert!(svg.starts_with("<svg "), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
    assert_eq!(svg.matches("<svg").count(), 1);
    assert!(svg.contains(r#"<g id="legend">"#), "no legend: {svg}");
    assert!(svg.contains("DMA job") && svg.contains("validator violation"));
    for tag in ["text", "title", "g"] {
        let opened =
            svg.matches(&format!("<{tag}>")).count() + svg.matches(&format!("<{tag} ")).count();
        assert_eq!(opened, svg.matches(&format!("</{tag}>")).count(), "<{tag}>");
    }
    svg
}

fn perfetto_doc(file: &Path) -> serde_json::Value {
    let text = std::fs::read(file).expect("Perfetto file written");
    let doc: serde_json::Value = serde_json::from_slice(&text).expect("valid JSON");
    assert!(doc["traceEvents"].is_array(), "{doc}");
    doc
}

/// The global instants (the note an empty timeline carries).
fn notes(doc: &serde_json::Value) -> Vec<&str> {
    doc["traceEvents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["s"] == "g")
        .filter_map(|e| e["name"].as_str())
        .collect()
}

/// An empty file (JSON Lines with no line) and a binary trace of only its header.
#[test]
fn empty_traces() {
    let d = dir("empty");
    for (name, bytes) in [("empty.jsonl", Vec::new()), ("header.zgt", binary(&[]))] {
        let t = d.join(name);
        std::fs::write(&t, bytes).expect("write trace");
        let t = path(&t);

        let r = run(&["summary", t]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert!(
            r.stdout.starts_with("0 events over 0.000 s"),
            "{}",
            r.stdout
        );
        assert!(r.stderr.contains("no events in this trace"), "{}", r.stderr);

        let r = run(&["check", t]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert!(r.stdout.contains("check: 0 finding(s)"), "{}", r.stdout);
        assert!(r.stderr.contains("nothing to check"), "{}", r.stderr);

        let r = run(&["json", t]);
        assert_eq!((r.code, r.stdout.as_str()), (Some(0), ""));
        assert!(r.stderr.contains("no events in this trace"), "{}", r.stderr);

        let r = run(&["filter", t]);
        assert_eq!((r.code, r.stdout.as_str()), (Some(0), ""));
        assert!(r.stderr.contains("no events match"), "{}", r.stderr);

        let out = d.join(format!("{name}.perfetto.json"));
        let r = run(&["perfetto", t, "-o", path(&out)]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert!(r.stdout.contains("open it in"), "{}", r.stdout);
        assert!(r.stderr.contains("no events in this trace"), "{}", r.stderr);
        assert_eq!(notes(&perfetto_doc(&out)), ["no events in this trace"]);

        let out = d.join(format!("{name}.svg"));
        let r = run(&["svg", t, "-o", path(&out)]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert_eq!(r.stdout.trim(), path(&out));
        assert!(
            r.stderr.contains("wrote an SVG that says so"),
            "{}",
            r.stderr
        );
        let svg = assert_svg(&out);
        assert!(svg.contains("no events in this window"), "{svg}");
        assert!(svg.len() < 4000, "small: {} bytes", svg.len());
    }
}

#[test]
fn tiny_trace() {
    let d = dir("tiny");
    let t = d.join("tiny.zgt");
    std::fs::write(&t, binary(&TINY)).expect("write trace");
    let t = path(&t);

    let r = run(&["summary", t]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.starts_with("7 events over"), "{}", r.stdout);
    assert_eq!(r.stderr, "");

    let r = run(&["check", t]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("check: 0 finding(s)"), "{}", r.stdout);

    let r = run(&["json", t]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), TINY.len());
    assert!(
        lines[0].starts_with(r#"{"t_ns":1000,"seq":0,"kind":"bar_write""#),
        "{}",
        lines[0]
    );

    let r = run(&["filter", t, "--kind", "fault", "--table"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout.lines().count(), 1, "{}", r.stdout);
    assert!(r.stdout.contains("result=not_present"), "{}", r.stdout);

    let out = d.join("tiny.perfetto.json");
    let r = run(&["perfetto", t, "-o", path(&out)]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stderr, "");
    let doc = perfetto_doc(&out);
    assert!(notes(&doc).is_empty());
    let names: Vec<&str> = doc["traceEvents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["args"]["name"].as_str().or(e["name"].as_str()))
        .collect();
    for name in [
        "command queue: invalidations, SYNCs",
        "ASID 3: jobs, faults",
        "inv_range asid 3 → SYNC",
        "SYNC",
        "fault: not_present",
        "copy job",
    ] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }

    let out = d.join("tiny.svg");
    let r = run(&["svg", t, "-o", path(&out)]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stderr, "");
    let svg = assert_svg(&out);
    assert!(!svg.contains("no events in this window"));
    assert!(svg.contains("t_ns 1000..9000"), "{svg}");
    assert!(svg.contains("<title>copy job</title>"));
}

#[test]
fn window_without_events() {
    let d = dir("window");
    let t = d.join("tiny.zgt");
    std::fs::write(&t, binary(&TINY)).expect("write trace");
    let t = path(&t);

    let r = run(&[&["filter", t][..], &LATE].concat());
    assert_eq!((r.code, r.stdout.as_str()), (Some(0), ""));
    assert!(
        r.stderr.contains("no events match in this window"),
        "{}",
        r.stderr
    );

    let out = d.join("late.perfetto.json");
    let r = run(&[&["perfetto", t, "-o", path(&out)][..], &LATE].concat());
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("no events in this window"),
        "{}",
        r.stderr
    );
    assert_eq!(notes(&perfetto_doc(&out)), ["no events in this window"]);

    // The issue's command.
    let out = d.join("late.svg");
    let r = run(&[&["svg", t, "-o", path(&out)][..], &LATE].concat());
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("no events in this window"),
        "{}",
        r.stderr
    );
    let svg = assert_svg(&out);
    assert!(svg.contains("no events in this window"));
    assert!(svg.contains("t_ns 3000000000..3400000000"), "{svg}");

    // Events in the window, none of them drawn (a doorbell): still the empty picture.
    let out = d.join("undrawn.svg");
    let r = run(&["svg", t, "--from", "3000", "--to", "3001", "-o", path(&out)]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(assert_svg(&out).contains("no events in this window"));

    // An inverted or empty window is a usage error, before any file is written.
    for cmd in ["filter", "perfetto", "svg"] {
        let out = d.join(format!("inverted.{cmd}"));
        for (from, to) in [("5000", "3000"), ("3000", "3000")] {
            let mut args = vec![cmd, t, "--from", from, "--to", to];
            if cmd != "filter" {
                args.extend(["-o", path(&out)]);
            }
            let r = run(&args);
            assert_eq!(r.code, Some(2), "{cmd}: {}", r.stderr);
            let msg = format!("empty window: --from {from} is not before --to {to}");
            assert!(r.stderr.contains(&msg), "{cmd}: {}", r.stderr);
        }
        assert!(!out.exists(), "{cmd} wrote {}", out.display());
    }

    // summary, check and json take the whole trace: a window is a usage error.
    for cmd in ["summary", "check", "json"] {
        let r = run(&[&[cmd, t][..], &LATE].concat());
        assert_eq!(r.code, Some(2), "{cmd}");
        assert!(r.stderr.contains("--from"), "{cmd}: {}", r.stderr);
    }
}

/// A trace with a chunk missing and one corrupt: every subcommand reports where, decodes the
/// rest, and exits 2 unless told to accept the damage.
#[test]
fn damaged_trace_is_an_error_unless_allowed() {
    let d = dir("damaged");
    let whole = chunked(&TINY, 2);
    let chunk = |n: usize| {
        // The chunks of `chunked(&TINY, 2)` have 2, 2, 2, 1 events of known size.
        let sizes: Vec<usize> = TINY
            .chunks(2)
            .map(|p| 48 + p.iter().map(|(_, j)| 11 + 3 + j.len()).sum::<usize>())
            .collect();
        let start = 16 + sizes[..n].iter().sum::<usize>();
        start..start + sizes[n]
    };
    let mut f = whole[..chunk(1).start].to_vec();
    f.extend_from_slice(&whole[chunk(2)]);
    let mut corrupt = whole[chunk(3)].to_vec();
    let last = corrupt.len() - 2;
    corrupt[last] ^= 1;
    f.extend_from_slice(&corrupt);
    let t = d.join("damaged.zgt");
    std::fs::write(&t, f).expect("write trace");
    let t = path(&t);

    let r = run(&["json", t]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    let seqs: Vec<u64> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")["seq"].as_u64())
        .map(|s| s.expect("seq"))
        .collect();
    assert_eq!(seqs, [0, 1, 4, 5], "the device's numbers, across the gap");
    assert!(
        r.stderr
            .contains("gap: 1 chunk(s) missing, 2 event(s) lost"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("checksum mismatch"), "{}", r.stderr);
    assert!(r.stderr.contains("--allow-damage"), "{}", r.stderr);

    for cmd in ["summary", "check", "filter"] {
        let r = run(&[cmd, t]);
        assert_eq!(r.code, Some(2), "{cmd}: {}", r.stderr);
        let r = run(&[cmd, t, "--allow-damage"]);
        assert_eq!(r.code, Some(0), "{cmd}: {}", r.stderr);
        assert!(r.stderr.contains("gap:"), "{cmd}: {}", r.stderr);
    }
}
