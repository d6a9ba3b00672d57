//! `svg`: draw the exported timeline (see [`crate::perfetto`]) of a time window as an SVG, for
//! a quick look without a browser session (and for rendering a PNG headless).

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;

const WIDTH: f64 = 1400.0;
const LABEL: f64 = 150.0;
const ROW: f64 = 26.0;
const TOP: f64 = 40.0;

fn color(name: &str) -> &'static str {
    if name.starts_with("VIOLATION") {
        "#d0108a"
    } else if name.starts_with("fault") {
        "#e0402a"
    } else if name == "SYNC" {
        "#2a9d4a"
    } else if name.starts_with("inv_") {
        "#f09a22"
    } else {
        "#3a6fd0"
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders trace events (`ph` X, i and thread-name metadata) between `from_us` and `to_us`.
pub fn render(events: &[Value], from_us: f64, to_us: f64, title: &str) -> String {
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
        end >= from_us && ts <= to_us
    };
    // Only tracks with something in the window.
    let mut rows: BTreeMap<u64, usize> = BTreeMap::new();
    for e in events.iter().filter(|e| e["ph"] != "M" && visible(e)) {
        if let Some(tid) = e["tid"].as_u64() {
            rows.insert(tid, 0);
        }
    }
    for (i, r) in rows.values_mut().enumerate() {
        *r = i;
    }
    let span = (to_us - from_us).max(1e-3);
    let x = |t: f64| LABEL + (t.clamp(from_us, to_us) - from_us) / span * (WIDTH - LABEL - 10.0);
    let height = TOP + ROW * rows.len() as f64 + 30.0;
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
    let mut shown: Vec<&Value> = events
        .iter()
        .filter(|e| e["ph"] != "M" && visible(e))
        .collect();
    shown.sort_by(|a, b| {
        let d = |e: &Value| e["dur"].as_f64().unwrap_or(0.0);
        d(b).total_cmp(&d(a))
    });
    for e in shown {
        let Some(row) = e["tid"].as_u64().and_then(|t| rows.get(&t)) else {
            continue;
        };
        let y = TOP + ROW * *row as f64;
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
            if w > 7.0 * name.len() as f64 {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" fill="white">{}</text>"#,
                    x0 + 3.0,
                    y + 17.0,
                    esc(name)
                );
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
    let axis = TOP + ROW * rows.len() as f64 + 14.0;
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
    s.push_str("</svg>\n");
    s
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
    }
}
