//! Streaming, line-numbered access to a trace.

use serde_json::Value;
use std::io::{BufRead, IsTerminal, Write};

/// A line that is not a trace event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number.
    pub line: u64,
    /// Why it was rejected.
    pub why: String,
}

/// Reads events from `input`, calling `each(line_number, event)` for every valid one and
/// collecting the malformed ones (empty lines are ignored). A line cut short by a crash is just a
/// malformed last line. Reports progress on stderr every 64 MiB when stderr is a terminal.
pub fn for_each_event(
    input: impl BufRead,
    mut each: impl FnMut(u64, &Value),
) -> std::io::Result<Vec<BadLine>> {
    let progress = std::io::stderr().is_terminal();
    let mut bad = Vec::new();
    let mut bytes = 0u64;
    let mut next_report = 64u64 << 20;
    for (i, line) in input.split(b'\n').enumerate() {
        let line = line?;
        let n = i as u64 + 1;
        bytes += line.len() as u64 + 1;
        if progress && bytes >= next_report {
            eprint!("\r{} MiB, {n} lines", bytes >> 20);
            let _ = std::io::stderr().flush();
            next_report += 64 << 20;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Value>(&line) {
            Ok(v) if v.get("kind").and_then(Value::as_str).is_some() => each(n, &v),
            Ok(_) => bad.push(BadLine {
                line: n,
                why: "not an event object with a \"kind\"".into(),
            }),
            Err(e) => bad.push(BadLine {
                line: n,
                why: e.to_string(),
            }),
        }
    }
    if progress && bytes >= 64 << 20 {
        eprintln!();
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_lines_are_numbered_and_skipped() {
        let text = "{\"kind\":\"a\",\"seq\":0}\n\nnot json\n{\"seq\":2}\n{\"kind\":\"b\",\"se";
        let mut seen = Vec::new();
        let bad = for_each_event(text.as_bytes(), |n, v| {
            seen.push((n, crate::kind(v).to_string()));
        })
        .expect("read");
        assert_eq!(seen, vec![(1, "a".to_string())]);
        assert_eq!(
            bad.iter().map(|b| b.line).collect::<Vec<_>>(),
            vec![3, 4, 5],
            "{bad:?}"
        );
    }

    #[test]
    fn empty_trace_has_nothing() {
        let bad = for_each_event("".as_bytes(), |_, _| panic!("no events")).expect("read");
        assert!(bad.is_empty());
    }
}
