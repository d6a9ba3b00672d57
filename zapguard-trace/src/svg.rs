//! `svg`: draw the exported timeline (see [`crate::perfetto`]) of a time window as an SVG, for
//! a quick look without a browser session (and for rendering a PNG headless).

use crate::perfetto::{self, Exported};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::io::BufRead;

const WIDTH: f64 = 1400.0;
const LABEL: f64 = 220.0;
const ROW: f64 = 26.0;
const TOP: f64 = 40.0;
/// Rough width of a character at font-size 11, to decide whether a label fits.
const CHAR: f64 = 6.5;

const JOB: &str = "#3a6fd0";
const INV: &str = "#f09a22";
const SYNC: &str = "#2a9d4a";
const FAULT: &str = "#e0402a";
const VIOLATION: &str = "#d0108a";

/// What every colour means, in the legend's order.
const COLOURS: [(&str, &str); 5] = [
    (JOB, "DMA job"),
    (INV, "invalidation, until the SYNC that covers it"),
    (SYNC, "SYNC, doorbell to completion"),
    (FAULT, "fault (a bar: stalled until RESUME/ABORT)"),
    (VIOLATION, "validator violation"),
];

fn color(name: &str) -> &'static str {
    if name.starts_with("VIOLATION") {
        VIOLATION
    } else if name.starts_with("fault") {
        FAULT
    } else if name == "SYNC" {
        SYNC
    } else if name.starts_with("inv_") {
        INV
    } else {
        JOB
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The `svg` subcommand: the timeline of the events of `input` in `window` (`[from, to)` in
/// `t_ns`; `None`: the whole trace), titled after `name`. The picture spans the first to the
/// last event in the window; an empty window gives a small SVG saying so.
pub fn from_trace(
    input: impl BufRead,
    window: Option<(u64, u64)>,
    name: &str,
) -> std::io::Result<(String, Exported)> {
    let (json, seen) = perfetto::export(input, Vec::new(), window)?;
    let doc: Value = serde_json::from_slice(&json).map_err(std::io::Error::other)?;
    let events = doc["traceEvents"].as_array().map_or(&[][..], Vec::as_slice);
    let (lo, hi) = match (seen.span, window) {
        (Some(s), _) => s,
        (None, Some((from, to))) => (from, to),
        (None, None) => (0, 0),
    };
    let title = format!("{name}: t_ns {lo}..{hi}");
    let svg = render(events, lo as f64 / 1000.0, hi as f64 / 1000.0, &title);
    Ok((svg, seen))
}

/// Renders trace events (`ph` X, i and thread-name metadata) between `from_us` and `to_us`,
/// with a legend. An empty or inverted window draws "no events in this window".
pub fn render(events: &[Value], from_us: f64, to_us: f64, title: &str) -> String {
    // `clamp` panics on an inverted or NaN range: such a window shows nothing.
    let valid = from_us.is_finite() && to_us.is_finite() && from_us <= to_us;
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    for e in events {
        if e["ph"] == "M" && e["name"] == "thread_name" {
            if let (Some(tid), Some(n)) = (e["tid"].as_u64(), e["args"]["name"].as_str()) {
                names.insert(tid, n.to_string());
            }
        }
    }
    let visible = |e: &Value| {
        let ts = e["ts"].as_f64().unwrap_or(0.0);
        let end = ts + e["dur"].as_f64().unwrap_or(0.0);
        valid && e["ph"] != "M" && e["tid"].is_u64() && end >= from_us && ts <= to_us
    };
    // Only tracks with something in the window.
    let mut rows: BTreeMap<u64, usize> = BTreeMap::new();
    for e in events.iter().filter(|e| visible(e)) {
        if let Some(tid) = e["tid"].as_u64() {
            rows.insert(tid, 0);
        }
    }
    for (i, r) in rows.values_mut().enumerate() {
        *r = i;
    }
    let (from_us, to_us) = if valid { (from_us, to_us) } else { (0.0, 0.0) };
    let span = (to_us - from_us).max(1e-3);
    let x = |t: f64| LABEL + (t.clamp(from_us, to_us) - from_us) / span * (WIDTH - LABEL - 10.0);
    // The body: one row per track, or one saying the window is empty.
    let body = ROW * rows.len().max(1) as f64;
    let axis = TOP + body + 14.0;
    let legend = axis + 22.0;
    let height = legend + 3.0 * 18.0 + 6.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="8" y="18" font-size="14">{}</text>"#,
        esc(title)
    );
    if rows.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" font-size="14" fill="#555" text-anchor="middle">no events in this window</text>"##,
            WIDTH / 2.0,
            TOP + 17.0
        );
    }
    for (tid, row) in &rows {
        let y = TOP + ROW * *row as f64;
        let fill = if row % 2 == 0 { "#f4f4f4" } else { "#ffffff" };
        let name = names
            .get(tid)
            .cloned()
            .unwrap_or_else(|| format!("track {tid}"));
        let _ = writeln!(
            s,
            r#"<rect x="0" y="{y}" width="{WIDTH}" height="{ROW}" fill="{fill}"/>"#
        );
        let _ = writeln!(s, r#"<text x="8" y="{}">{}</text>"#, y + 17.0, esc(&name));
    }
    // Long spans first, so that short ones (faults inside a job) are drawn on top.
    let mut shown: Vec<&Value> = events.iter().filter(|e| visible(e)).collect();
    shown.sort_by(|a, b| {
        let d = |e: &Value| e["dur"].as_f64().unwrap_or(0.0);
        d(b).total_cmp(&d(a))
    });
    // Labels go on after every shape, so that no span covers one; each is dark on a white
    // halo (readable on every colour) and only where it fits in its span without overlapping
    // a label already placed in that row (longer spans win).
    let mut labels: Vec<(f64, f64, &str)> = Vec::new();
    let mut taken: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
    for e in shown {
        let Some(&row) = e["tid"].as_u64().and_then(|t| rows.get(&t)) else {
            continue;
        };
        let y = TOP + ROW * row as f64;
        let name = e["name"].as_str().unwrap_or("");
        let ts = e["ts"].as_f64().unwrap_or(0.0);
        if e["ph"] == "X" {
            let (x0, x1) = (x(ts), x(ts + e["dur"].as_f64().unwrap_or(0.0)));
            let w = (x1 - x0).max(1.0);
            let _ = writeln!(
                s,
                r#"<rect x="{x0:.1}" y="{:.1}" width="{w:.1}" height="{:.1}" fill="{}" opacity="0.85"><title>{}</title></rect>"#,
                y + 4.0,
                ROW - 8.0,
                color(name),
                esc(name)
            );
            let (l0, l1) = (x0 + 3.0, x0 + 3.0 + CHAR * name.chars().count() as f64);
            let row_taken = taken.entry(row).or_default();
            if l1 + 3.0 <= x0 + w && !row_taken.iter().any(|&(a, b)| l0 < b && a < l1) {
                row_taken.push((l0, l1));
                labels.push((l0, y + 17.0, name));
            }
        } else {
            let xi = x(ts);
            let _ = writeln!(
                s,
                r#"<path d="M{xi:.1},{:.1} l-4,-8 h8 z" fill="{}"><title>{}</title></path>"#,
                y + ROW - 4.0,
                color(name),
                esc(name)
            );
        }
    }
    for (lx, ly, name) in labels {
        let _ = writeln!(
            s,
            r##"<text x="{lx:.1}" y="{ly:.1}" fill="#111" stroke="white" stroke-width="3" stroke-linejoin="round" paint-order="stroke">{}</text>"##,
            esc(name)
        );
    }
    if !rows.is_empty() {
        for i in 0..=8 {
            let t = from_us + span * f64::from(i) / 8.0;
            let anchor = if i == 8 { "end" } else { "middle" };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{axis}" text-anchor="{anchor}">{:.3} ms</text>"#,
                x(t),
                t / 1000.0
            );
        }
    }
    write_legend(&mut s, legend);
    s.push_str("</svg>\n");
    s
}

/// The legend at `y`: colours, marker kinds, lanes.
fn write_legend(s: &mut String, y: f64) {
    let _ = writeln!(s, r#"<g id="legend">"#);
    let _ = writeln!(
        s,
        r#"<text x="8" y="{}" font-weight="bold">legend</text>"#,
        y + 10.0
    );
    let mut lx = 70.0;
    for (fill, what) in COLOURS {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{y}" width="14" height="12" fill="{fill}" opacity="0.85"/><text x="{:.1}" y="{}">{}</text>"#,
            lx + 18.0,
            y + 10.0,
            esc(what)
        );
        lx += 18.0 + CHAR * what.len() as f64 + 16.0;
    }
    let y = y + 18.0;
    let _ = writeln!(
        s,
        r##"<rect x="70" y="{y}" width="24" height="12" fill="#888"/><text x="100" y="{}">bar: a span, start to end</text>"##,
        y + 10.0
    );
    let _ = writeln!(
        s,
        r##"<path d="M{:.1},{} l-4,-8 h8 z" fill="#888"/><text x="{:.1}" y="{}">triangle: an instant (a fault that ends a job, a violation)</text>"##,
        290.0,
        y + 11.0,
        300.0,
        y + 10.0
    );
    let y = y + 18.0;
    let _ = writeln!(
        s,
        r#"<text x="70" y="{}">lanes: command queue = invalidations and SYNCs; DMA engine = every job; ASID N = that context's jobs, faults and violations. Hover a shape for its name.</text>"#,
        y + 10.0
    );
    let _ = writeln!(s, "</g>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn draws_tracks_spans_and_instants_in_the_window() {
        let ev = [
            json!({"ph": "M", "tid": 1, "name": "thread_name", "args": {"name": "command queue"}}),
            json!({"ph": "M", "tid": 103, "name": "thread_name", "args": {"name": "asid 3"}}),
            json!({"ph": "X", "tid": 1, "name": "SYNC", "ts": 10.0, "dur": 5.0}),
            json!({"ph": "i", "tid": 103, "name": "VIOLATION: stale", "ts": 12.0}),
            json!({"ph": "X", "tid": 103, "name": "copy job", "ts": 500.0, "dur": 5.0}),
        ];
        let svg = render(&ev, 0.0, 100.0, "t");
        assert!(svg.contains("command queue") && svg.contains("asid 3"));
        assert!(svg.contains("<title>SYNC</title>"));
        assert!(svg.contains("<title>VIOLATION: stale</title>"));
        assert!(!svg.contains("copy job"), "outside the window");
        assert!(!svg.contains("no events in this window"));
    }

    /// Well-formed enough: one root, every element closed (the shapes written here are either
    /// self-closing or closed on the same line).
    fn assert_svg(svg: &str) {
        assert!(
            svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"),
            "{svg}"
        );
        assert_eq!(svg.matches("<svg").count(), 1);
        for tag in ["text", "title", "g", "rect", "path"] {
            let open =
                svg.matches(&format!("<{tag}>")).count() + svg.matches(&format!("<{tag} ")).count();
            let closed = svg.matches(&format!("</{tag}>")).count();
            let selfclosed = svg
                .split(&format!("<{tag} "))
                .skip(1)
                .filter(|rest| rest.split('>').next().is_some_and(|t| t.ends_with('/')))
                .count();
            assert_eq!(open, closed + selfclosed, "<{tag}> in {svg}");
        }
        assert!(svg.contains(r#"<g id="legend">"#), "legend");
        for (fill, _) in COLOURS {
            assert!(
                svg.contains(&format!(r#"fill="{fill}" opacity="0.85"/>"#)),
                "{fill}"
            );
        }
    }

    #[test]
    fn an_empty_or_inverted_or_nan_window_draws_a_note_not_a_panic() {
        let ev = [json!({"ph": "X", "tid": 1, "name": "SYNC", "ts": 10.0, "dur": 5.0})];
        for (from, to) in [
            (3_000_000.0, 3_400_000.0),
            (100.0, 0.0),
            (f64::NAN, 1.0),
            (0.0, f64::INFINITY),
        ] {
            let svg = render(&ev, from, to, "t");
            assert_svg(&svg);
            assert!(svg.contains("no events in this window"), "{from}..{to}");
            assert!(!svg.contains("<title>SYNC"), "{from}..{to}");
        }
        let svg = render(&[], 0.0, 0.0, "t");
        assert_svg(&svg);
        assert!(svg.len() < 4000, "small: {} bytes", svg.len());
    }

    #[test]
    fn a_single_instant_is_drawn() {
        let ev = [json!({"ph": "i", "tid": 103, "name": "fault: not_present", "ts": 5.0})];
        let svg = render(&ev, 5.0, 5.0, "t");
        assert_svg(&svg);
        assert!(svg.contains("<title>fault: not_present</title>"));
    }

    #[test]
    fn labels_are_drawn_after_every_span_dark_on_a_halo_and_never_overlap() {
        let ev = [
            json!({"ph": "X", "tid": 103, "name": "copy job", "ts": 0.0, "dur": 100.0}),
            // Inside the job, starting where its label would be.
            json!({"ph": "X", "tid": 103, "name": "fault → resume", "ts": 0.0, "dur": 60.0}),
            json!({"ph": "X", "tid": 1, "name": "SYNC", "ts": 0.0, "dur": 100.0}),
        ];
        let svg = render(&ev, 0.0, 100.0, "t");
        assert_svg(&svg);
        let last_shape = svg.rfind("</rect>").expect("spans");
        let first_label = svg.find("paint-order").expect("labels");
        assert!(first_label > last_shape, "labels after the shapes");
        for line in svg.lines().filter(|l| l.contains("paint-order")) {
            assert!(line.contains(r##"fill="#111" stroke="white""##), "{line}");
            assert!(!line.contains(r#"fill="white""#), "{line}");
        }
        let labelled = |name: &str| {
            svg.lines()
                .any(|l| l.contains("paint-order") && l.contains(&format!(">{}<", esc(name))))
        };
        assert!(labelled("copy job") && labelled("SYNC"));
        assert!(!labelled("fault → resume"), "would overlap the job's label");
    }

    #[test]
    fn from_trace_draws_a_window_or_says_it_is_empty() {
        let trace = concat!(
            "{\"t_ns\":1000,\"kind\":\"job_start\",\"job\":1,\"op\":\"copy\",\"asid\":2}\n",
            "{\"t_ns\":2000,\"kind\":\"violation\",\"asid\":2,\"result\":\"stale\"}\n",
            "{\"t_ns\":9000,\"kind\":\"job_done\",\"job\":1,\"asid\":2,\"result\":\"ok\"}\n",
        );
        let (svg, seen) = from_trace(trace.as_bytes(), None, "x").expect("render");
        assert_svg(&svg);
        assert_eq!((seen.events, seen.shown), (3, 3));
        assert!(svg.contains("x: t_ns 1000..9000") && svg.contains("ASID 2: jobs, faults"));
        let window = Some((3_000_000_000, 3_400_000_000));
        let (svg, seen) = from_trace(trace.as_bytes(), window, "x").expect("render");
        assert_svg(&svg);
        assert_eq!(seen.events, 0);
        assert!(svg.contains("no events in this window"));
        assert!(svg.contains("x: t_ns 3000000000..3400000000"));
        let (svg, seen) = from_trace("".as_bytes(), None, "x").expect("render");
        assert_svg(&svg);
        assert_eq!((seen.events, seen.span), (0, None));
        assert!(svg.contains("no events in this window"));
    }
}
