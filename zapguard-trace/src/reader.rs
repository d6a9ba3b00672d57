//! Streaming, line-numbered access to a trace, JSON Lines or binary (told apart by the first
//! byte; see [`crate::format`]).

use crate::format;
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

/// Whether `input` holds a binary trace (it starts with [`format::MAGIC`]; a JSON trace starts
/// with `{`). Looks without consuming.
pub fn is_binary(input: &mut impl BufRead) -> std::io::Result<bool> {
    Ok(input.fill_buf()?.first() == Some(&format::MAGIC[0]))
}

/// Calls `each(n, line)` for every event of a trace as its JSON line (without the newline),
/// numbered from 1: the lines of a JSON Lines trace (blank ones skipped), or the records of a
/// binary trace decoded to the lines the JSON writer would have written (`n` is then `seq + 1`).
/// Damage in a binary trace (a gap, a corrupt chunk skipped, a chunk cut short by a crash; see
/// [`format::Damage`]) yields a [`BadLine`] numbered after the last event before it, and
/// decoding goes on; a file that is not a trace yields one numbered 1. Reports progress on stderr every 64 MiB
/// when stderr is a terminal.
pub fn for_each_line(
    mut input: impl BufRead,
    mut each: impl FnMut(u64, &[u8]),
) -> std::io::Result<Vec<BadLine>> {
    let progress = std::io::stderr().is_terminal();
    let mut bytes = 0u64;
    let mut next_report = 64u64 << 20;
    let mut report = |n: u64, bytes: u64| {
        if progress && bytes >= next_report {
            eprint!("\r{} MiB, {n} lines", bytes >> 20);
            let _ = std::io::stderr().flush();
            next_report += 64 << 20;
        }
    };
    if is_binary(&mut input)? {
        let mut d = match format::Decoder::new(input) {
            Ok(d) => d,
            Err(format::DecodeError::Io(e)) => return Err(e),
            Err(format::DecodeError::Bad(why) | format::DecodeError::Truncated(why)) => {
                return Ok(vec![BadLine { line: 1, why }])
            }
        };
        let mut bad = Vec::new();
        let mut damaged = |d: &mut format::Decoder<_>| {
            bad.extend(d.take_damage().into_iter().map(|(seq, damage)| BadLine {
                line: seq + 1,
                why: damage.to_string(),
            }))
        };
        while let Some((seq, line)) = d.next_line()? {
            let n = seq + 1;
            // About a fifth of a JSON line's size: count what the JSON would be.
            bytes += line.len() as u64 + 1;
            report(n, bytes);
            each(n, line.as_bytes());
            damaged(&mut d);
        }
        damaged(&mut d);
        if progress && bytes >= 64 << 20 {
            eprintln!();
        }
        return Ok(bad);
    }
    for (i, line) in input.split(b'\n').enumerate() {
        let line = line?;
        let n = i as u64 + 1;
        bytes += line.len() as u64 + 1;
        report(n, bytes);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        each(n, &line);
    }
    if progress && bytes >= 64 << 20 {
        eprintln!();
    }
    Ok(Vec::new())
}

/// Reads events from `input` (JSON Lines or binary, see [`for_each_line`]), calling
/// `each(line_number, event)` for every valid one and collecting the malformed ones. A line cut
/// short by a crash is just a malformed last line.
pub fn for_each_event(
    input: impl BufRead,
    mut each: impl FnMut(u64, &Value),
) -> std::io::Result<Vec<BadLine>> {
    let mut bad = Vec::new();
    let tail = for_each_line(input, |n, line| {
        match serde_json::from_slice::<Value>(line) {
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
    })?;
    bad.extend(tail);
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
