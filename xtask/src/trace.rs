//! Device-trace helpers for the harness: one pass that summarises and checks a run's trace
//! (through the `zapguard-trace` library), and the trace lines of a failed test's contexts.

use std::path::Path;
use zapguard_trace::{check::Checker, reader, summary::Summary};

/// A run's trace, summarised and checked in one streaming pass.
pub struct Analysis {
    /// What the device did.
    pub summary: Summary,
    /// The offline invariant check.
    pub check: Checker,
}

/// Reads the trace at `path` once.
pub fn analyse(path: &Path) -> std::io::Result<Analysis> {
    let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut summary = Summary::default();
    let mut check = Checker::default();
    summary.bad_lines = reader::for_each_event(f, |n, v| {
        summary.add(v);
        check.add(n, v);
    })?;
    check.finish();
    Ok(Analysis { summary, check })
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

/// The last `n` trace lines of `asid` (streamed, so big traces are fine; a binary trace is
/// decoded to its JSON lines).
pub fn last_lines_of_asid(path: &Path, asid: u64, n: usize) -> std::io::Result<Vec<String>> {
    let needle = format!("\"asid\":{asid},");
    let mut ring = std::collections::VecDeque::with_capacity(n);
    let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    reader::for_each_line(f, |_, line| {
        let line = String::from_utf8_lossy(line);
        if line.contains(&needle) {
            if ring.len() == n {
                ring.pop_front();
            }
            ring.push_back(line.into_owned());
        }
    })?;
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
