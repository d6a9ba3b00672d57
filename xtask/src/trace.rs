//! A first look at the device trace (JSON Lines written by `zapguard-dev`): event counts by kind
//! and the registers the driver touched. The schema is documented in `qemu-dev/src/trace.rs`.

use std::collections::BTreeMap;
use std::path::Path;

/// What a trace contains.
#[derive(Debug, Default)]
pub struct Summary {
    /// Total events.
    pub events: usize,
    /// Events per `kind`.
    pub by_kind: BTreeMap<String, usize>,
    /// BAR reads per register name (`reg`).
    pub reg_reads: BTreeMap<String, usize>,
    /// BAR writes per register name.
    pub reg_writes: BTreeMap<String, usize>,
    /// Lines that were not JSON objects with a `kind` (a corrupt or truncated trace).
    pub bad_lines: usize,
}

/// Summarises trace text.
pub fn summarize(text: &str) -> Summary {
    let mut s = Summary::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            s.bad_lines += 1;
            continue;
        };
        let Some(kind) = v.get("kind").and_then(|k| k.as_str()) else {
            s.bad_lines += 1;
            continue;
        };
        s.events += 1;
        *s.by_kind.entry(kind.to_string()).or_default() += 1;
        let reg = v
            .get("reg")
            .and_then(|r| r.as_str())
            .unwrap_or("?")
            .to_string();
        match kind {
            "bar_read" => *s.reg_reads.entry(reg).or_default() += 1,
            "bar_write" => *s.reg_writes.entry(reg).or_default() += 1,
            _ => {}
        }
    }
    s
}

/// Summarises the trace file at `path`.
pub fn summarize_file(path: &Path) -> std::io::Result<Summary> {
    Ok(summarize(&std::fs::read_to_string(path)?))
}

fn join(m: &BTreeMap<String, usize>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} events: {}", self.events, join(&self.by_kind))?;
        writeln!(f, "  register reads:  {}", join(&self.reg_reads))?;
        write!(f, "  register writes: {}", join(&self.reg_writes))?;
        if self.bad_lines > 0 {
            write!(f, "\n  {} malformed lines", self.bad_lines)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_kinds_and_registers() {
        let text = r#"{"t_ns":1,"seq":0,"kind":"connect"}
{"t_ns":2,"seq":1,"kind":"bar_read","offset":0,"size":4,"value":1196441946,"reg":"IDENT"}
{"t_ns":3,"seq":2,"kind":"bar_read","offset":4,"size":4,"value":65536,"reg":"VERSION"}
{"t_ns":4,"seq":3,"kind":"bar_read","offset":0,"size":4,"value":1196441946,"reg":"IDENT"}
{"t_ns":5,"seq":4,"kind":"bar_write","offset":20,"size":4,"value":7,"reg":"SCRATCH"}
not json
{"no_kind":1}
"#;
        let s = summarize(text);
        assert_eq!(s.events, 5);
        assert_eq!(s.bad_lines, 2);
        assert_eq!(s.by_kind["bar_read"], 3);
        assert_eq!(s.reg_reads["IDENT"], 2);
        assert_eq!(s.reg_writes["SCRATCH"], 1);
    }
}

/// The ASIDs a failed test's diagnostics name (`asid N`), from the serial log's `# test: ...`
/// lines.
pub fn failed_test_asids(serial: &str, test: &str) -> Vec<u64> {
    let prefix = format!("# {test}: ");
    let mut out: Vec<u64> = serial
        .lines()
        .filter_map(|l| l.find(&prefix).map(|at| &l[at + prefix.len()..]))
        .flat_map(|msg| {
            msg.match_indices("asid ")
                .filter_map(|(at, m)| {
                    let digits: String = msg[at + m.len()..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    digits.parse().ok()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The last `n` trace lines of `asid` (streamed, so big traces are fine).
pub fn last_lines_of_asid(path: &Path, asid: u64, n: usize) -> std::io::Result<Vec<String>> {
    use std::io::BufRead;
    let needle = format!("\"asid\":{asid},");
    let mut ring = std::collections::VecDeque::with_capacity(n);
    for line in std::io::BufReader::new(std::fs::File::open(path)?).lines() {
        let line = line?;
        if line.contains(&needle) {
            if ring.len() == n {
                ring.pop_front();
            }
            ring.push_back(line);
        }
    }
    Ok(ring.into())
}

#[cfg(test)]
mod asid_tests {
    use super::*;

    #[test]
    fn asids_named_by_a_failed_test() {
        let serial =
            "# t1: DMA op 4: EIO (asid 3)\n# t2: x (asid 9)\n# t1: again asid 12 and asid 3\n";
        assert_eq!(failed_test_asids(serial, "t1"), vec![3, 12]);
        assert!(failed_test_asids(serial, "t3").is_empty());
    }

    #[test]
    fn last_lines_filter_by_asid() {
        let dir = std::env::temp_dir().join(format!("zg-asid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("t.jsonl");
        let lines: Vec<String> = (0..10)
            .map(|i| format!("{{\"seq\":{i},\"asid\":{},\"kind\":\"x\"}}", i % 2))
            .collect();
        std::fs::write(&p, lines.join("\n")).expect("write");
        let got = last_lines_of_asid(&p, 1, 2).expect("read");
        assert_eq!(got, vec![lines[7].clone(), lines[9].clone()]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
