//! `perfetto`: export a Chrome/Perfetto trace-event JSON (open it in ui.perfetto.dev).
//!
//! One process, "zapguard device", with tracks named for what they hold (Perfetto shows a
//! thread id after each name; the ids mean nothing):
//!
//! | track | spans | instants |
//! |---|---|---|
//! | command queue: invalidations, SYNCs | each invalidation until the SYNC that covers it completes; each SYNC from its doorbell to its completion | — |
//! | DMA engine: all jobs | each job, start to done | — |
//! | ASID N: jobs, faults | its jobs; each stalled fault until the RESUME/ABORT that answers it | faults that end a job, validator violations |
//!
//! A timeline with nothing on it (an empty trace or window) gets one global instant saying so,
//! so that the file is still a valid trace that explains itself.
//!
//! Per-burst events (`dma_access`, IOTLB fills) are not exported: a timeline of millions of
//! 512-byte bursts shows nothing, and the summary counts them.

use crate::cmdq::CmdqClock;
use crate::reader::{self, BadLine};
use crate::{field_str, field_u64, kind};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, Write};

const PID: u64 = 1;
const TID_CMDQ: u64 = 1;
const TID_DMA: u64 = 2;
/// Violation instants exported per ASID (the summary has the full counts).
const VIOLATIONS_PER_ASID: u64 = 200;
/// Track names.
pub const CMDQ_TRACK: &str = "command queue: invalidations, SYNCs";
/// See [`CMDQ_TRACK`].
pub const DMA_TRACK: &str = "DMA engine: all jobs";

/// The name of an ASID's track.
pub fn asid_track_name(asid: u64) -> String {
    format!("ASID {asid}: jobs, faults")
}

fn tid_asid(asid: u64) -> u64 {
    // Saturating: `asid` comes from the trace, and a garbage one must not overflow.
    100u64.saturating_add(asid)
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// Streams trace events in, trace-event JSON out.
pub struct Exporter<W: Write> {
    out: W,
    first: bool,
    named: std::collections::HashSet<u64>,
    cmdq: CmdqClock,
    /// Invalidations waiting for a SYNC: (t, name, args).
    pending_inv: Vec<(u64, String, Value)>,
    /// Running jobs: job id -> (t, asid, op).
    jobs: HashMap<u64, (u64, u64, String)>,
    /// Stalled faults: (asid, tag) -> (t, va, write).
    stalls: HashMap<(u64, u64), (u64, u64, bool)>,
    /// Violations exported per ASID (capped: a broken run reports one per burst).
    violations: HashMap<u64, u64>,
    /// Trace-event records written.
    pub written: u64,
    /// Spans and instants written (the rest is track metadata).
    pub shown: u64,
}

impl<W: Write> Exporter<W> {
    /// Starts the JSON document.
    pub fn new(mut out: W) -> std::io::Result<Self> {
        out.write_all(b"{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n")?;
        let mut e = Self {
            out,
            first: true,
            named: Default::default(),
            cmdq: CmdqClock::default(),
            pending_inv: Vec::new(),
            jobs: HashMap::new(),
            stalls: HashMap::new(),
            violations: HashMap::new(),
            written: 0,
            shown: 0,
        };
        e.emit(&json!({"ph": "M", "pid": PID, "name": "process_name", "args": {"name": "zapguard device"}}))?;
        e.thread(TID_CMDQ, CMDQ_TRACK, 0)?;
        e.thread(TID_DMA, DMA_TRACK, 1)?;
        Ok(e)
    }

    fn emit(&mut self, v: &Value) -> std::io::Result<()> {
        if !self.first {
            self.out.write_all(b",\n")?;
        }
        self.first = false;
        self.written += 1;
        serde_json::to_writer(&mut self.out, v).map_err(std::io::Error::other)
    }

    fn thread(&mut self, tid: u64, name: &str, order: u64) -> std::io::Result<()> {
        if !self.named.insert(tid) {
            return Ok(());
        }
        self.emit(&json!({"ph": "M", "pid": PID, "tid": tid, "name": "thread_name", "args": {"name": name}}))?;
        self.emit(&json!({"ph": "M", "pid": PID, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": order}}))
    }

    fn asid_track(&mut self, asid: u64) -> std::io::Result<u64> {
        let tid = tid_asid(asid);
        self.thread(tid, &asid_track_name(asid), tid)?;
        Ok(tid)
    }

    fn span(&mut self, tid: u64, name: &str, t0: u64, t1: u64, args: Value) -> std::io::Result<()> {
        self.shown += 1;
        self.emit(&json!({
            "ph": "X", "pid": PID, "tid": tid, "name": name,
            "ts": us(t0), "dur": us(t1.saturating_sub(t0)), "args": args,
        }))
    }

    fn instant(&mut self, tid: u64, name: &str, t: u64, args: Value) -> std::io::Result<()> {
        self.shown += 1;
        self.emit(&json!({"ph": "i", "s": "t", "pid": PID, "tid": tid, "name": name, "ts": us(t), "args": args}))
    }

    /// Exports one trace event.
    pub fn add(&mut self, v: &Value) -> std::io::Result<()> {
        let t = field_u64(v, "t_ns").unwrap_or(0);
        let u = |k| field_u64(v, k);
        self.cmdq.observe(v);
        match kind(v) {
            "command" => {
                self.cmdq.executed(u("cmd").unwrap_or(0));
                let op = field_str(v, "op").unwrap_or("?");
                let asid = u("asid").unwrap_or(0);
                match op {
                    "inv_range" | "inv_asid" | "inv_all" => {
                        let name = match op {
                            "inv_range" => format!("inv_range asid {asid} → SYNC"),
                            "inv_asid" => format!("inv_asid {asid} → SYNC"),
                            _ => "inv_all → SYNC".into(),
                        };
                        let args = json!({"va": format!("{:#x}", u("va").unwrap_or(0)), "len": u("len"), "cmd": u("cmd")});
                        self.pending_inv.push((t, name, args));
                    }
                    "resume" | "abort" => {
                        let tag = u("len").unwrap_or(0);
                        if let Some((t0, va, write)) = self.stalls.remove(&(asid, tag)) {
                            let tid = self.asid_track(asid)?;
                            let name = format!("fault → {op}");
                            self.span(
                                tid,
                                &name,
                                t0,
                                t,
                                json!({"va": format!("{va:#x}"), "write": write, "tag": tag}),
                            )?;
                        }
                    }
                    _ => {}
                }
            }
            "sync_done" => {
                let idx = self.cmdq.executed(u("cmd").unwrap_or(0));
                for (t0, name, args) in std::mem::take(&mut self.pending_inv) {
                    self.span(TID_CMDQ, &name, t0, t, args)?;
                }
                if let Some(t0) = self.cmdq.published(idx) {
                    self.span(
                        TID_CMDQ,
                        "SYNC",
                        t0,
                        t,
                        json!({"waited_bursts": u("waited"), "lag_us": u("lag_us"), "cmd": u("cmd")}),
                    )?;
                }
            }
            "job_start" => {
                let op = field_str(v, "op").unwrap_or("?").to_string();
                self.jobs
                    .insert(u("job").unwrap_or(0), (t, u("asid").unwrap_or(0), op));
            }
            "job_done" => {
                if let Some((t0, asid, op)) = self.jobs.remove(&u("job").unwrap_or(0)) {
                    let args = json!({"job": u("job"), "result": field_str(v, "result"), "bytes": u("len"), "faults": u("faults")});
                    let name = format!("{op} job");
                    self.span(
                        TID_DMA,
                        &format!("{name} (asid {asid})"),
                        t0,
                        t,
                        args.clone(),
                    )?;
                    let tid = self.asid_track(asid)?;
                    self.span(tid, &name, t0, t, args)?;
                }
            }
            "fault" => {
                let asid = u("asid").unwrap_or(0);
                let va = u("va").unwrap_or(0);
                let write = v.get("write").and_then(Value::as_bool).unwrap_or(false);
                if v.get("stalled").and_then(Value::as_bool).unwrap_or(false) {
                    self.stalls
                        .insert((asid, u("tag").unwrap_or(0)), (t, va, write));
                } else {
                    let tid = self.asid_track(asid)?;
                    let name = format!("fault: {}", field_str(v, "result").unwrap_or("?"));
                    self.instant(
                        tid,
                        &name,
                        t,
                        json!({"va": format!("{va:#x}"), "write": write}),
                    )?;
                }
            }
            "violation" => {
                let asid = u("asid").unwrap_or(0);
                let n = self.violations.entry(asid).or_default();
                *n += 1;
                if *n > VIOLATIONS_PER_ASID {
                    return Ok(());
                }
                let tid = self.asid_track(asid)?;
                let name = format!("VIOLATION: {}", field_str(v, "result").unwrap_or("?"));
                let args = json!({"va": format!("{:#x}", u("va").unwrap_or(0)), "why": field_str(v, "why")});
                self.instant(tid, &name, t, args)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// A global instant at `t_ns` saying `text` (not counted in [`Self::shown`]).
    pub fn note(&mut self, text: &str, t_ns: u64) -> std::io::Result<()> {
        self.emit(&json!({"ph": "i", "s": "g", "pid": PID, "name": text, "ts": us(t_ns)}))
    }

    /// Closes the JSON document.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.write_all(b"\n]}\n")?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// What [`export`] saw and wrote.
#[derive(Debug, Default)]
pub struct Exported {
    /// Trace events in the window.
    pub events: u64,
    /// First and last `t_ns` of those events (`None`: none in the window).
    pub span: Option<(u64, u64)>,
    /// Spans and instants written (0: the timeline is empty but for a note saying so).
    pub shown: u64,
    /// Trace-event records written, metadata included.
    pub written: u64,
    /// Malformed lines of the trace.
    pub bad: Vec<BadLine>,
}

/// The note an empty timeline carries.
pub fn empty_note(window: Option<(u64, u64)>) -> &'static str {
    if window.is_some() {
        "no events in this window"
    } else {
        "no events in this trace"
    }
}

/// Exports the events of `input` whose `t_ns` is in `window` (`[from, to)`; `None`: all) to
/// `out`. An empty window (or one holding only events that are not drawn) still gives a valid
/// document, holding a note that says so.
pub fn export<W: Write>(
    input: impl BufRead,
    out: W,
    window: Option<(u64, u64)>,
) -> std::io::Result<(W, Exported)> {
    let mut ex = Exporter::new(out)?;
    let mut seen = Exported::default();
    let mut err = None;
    seen.bad = reader::for_each_event(input, |_, v| {
        let t = field_u64(v, "t_ns").unwrap_or(0);
        if err.is_some() || window.is_some_and(|(from, to)| t < from || t >= to) {
            return;
        }
        seen.events += 1;
        seen.span = Some(seen.span.map_or((t, t), |(a, b)| (a.min(t), b.max(t))));
        err = ex.add(v).err();
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    if ex.shown == 0 {
        let at = seen.span.map_or(window.map_or(0, |w| w.0), |s| s.0);
        ex.note(empty_note(window), at)?;
    }
    (seen.shown, seen.written) = (ex.shown, ex.written);
    Ok((ex.finish()?, seen))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Invalidation -> SYNC -> fault -> resume, and a job, as spans on the right tracks.
    #[test]
    fn exported_json_has_the_expected_spans() {
        let events = [
            json!({"t_ns": 0, "kind": "bar_write", "reg": "CMDQ_LOG2SIZE", "value": 6}),
            json!({"t_ns": 1000, "kind": "job_start", "job": 5, "op": "copy", "asid": 3}),
            json!({"t_ns": 2000, "kind": "bar_write", "reg": "CMDQ_PROD", "value": 2}),
            json!({"t_ns": 2500, "kind": "command", "cmd": 0, "op": "inv_range", "asid": 3, "va": 4096, "len": 4096}),
            json!({"t_ns": 4000, "kind": "sync_done", "cmd": 1, "waited": 3, "lag_us": 300}),
            json!({"t_ns": 5000, "kind": "fault", "job": 5, "asid": 3, "va": 4096, "write": true, "result": "not_present", "stalled": true, "tag": 9}),
            json!({"t_ns": 6000, "kind": "bar_write", "reg": "CMDQ_PROD", "value": 3}),
            json!({"t_ns": 7000, "kind": "command", "cmd": 2, "op": "resume", "asid": 3, "va": 0, "len": 9}),
            json!({"t_ns": 8000, "kind": "violation", "asid": 3, "va": 4096, "result": "stale", "why": "x"}),
            json!({"t_ns": 9000, "kind": "job_done", "job": 5, "asid": 3, "result": "ok", "len": 8192, "faults": 1}),
        ];
        let mut e = Exporter::new(Vec::new()).expect("start");
        for v in &events {
            e.add(v).expect("add");
        }
        let out = e.finish().expect("finish");
        let doc: Value = serde_json::from_slice(&out).expect("valid JSON");
        let evs = doc["traceEvents"].as_array().expect("array");
        let find = |name: &str| {
            evs.iter()
                .find(|x| x["name"] == name)
                .unwrap_or_else(|| panic!("no {name} in {evs:?}"))
                .clone()
        };
        let inv = find("inv_range asid 3 → SYNC");
        assert_eq!(
            (inv["ph"].clone(), inv["ts"].as_f64(), inv["dur"].as_f64()),
            (json!("X"), Some(2.5), Some(1.5))
        );
        assert_eq!(inv["tid"], TID_CMDQ);
        let sync = find("SYNC");
        assert_eq!(
            (sync["ts"].as_f64(), sync["dur"].as_f64()),
            (Some(2.0), Some(2.0))
        );
        assert_eq!(
            (&sync["args"]["waited_bursts"], &sync["args"]["lag_us"]),
            (&json!(3), &json!(300))
        );
        let fault = find("fault → resume");
        assert_eq!(
            (
                fault["tid"].as_u64(),
                fault["ts"].as_f64(),
                fault["dur"].as_f64()
            ),
            (Some(103), Some(5.0), Some(2.0))
        );
        let job = find("copy job");
        assert_eq!(
            (job["tid"].as_u64(), job["dur"].as_f64()),
            (Some(103), Some(8.0))
        );
        find("copy job (asid 3)");
        assert_eq!(find("VIOLATION: stale")["ph"], "i");
        let names: Vec<_> = evs
            .iter()
            .filter(|x| x["name"] == "thread_name")
            .map(|x| x["args"]["name"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(names, vec![CMDQ_TRACK, DMA_TRACK, "ASID 3: jobs, faults"]);
    }

    fn exported(trace: &str, window: Option<(u64, u64)>) -> (Value, Exported) {
        let (out, seen) = export(trace.as_bytes(), Vec::new(), window).expect("export");
        (serde_json::from_slice(&out).expect("valid JSON"), seen)
    }

    fn notes(doc: &Value) -> Vec<String> {
        let evs = doc["traceEvents"].as_array().expect("array");
        evs.iter()
            .filter(|e| e["s"] == "g")
            .map(|e| e["name"].as_str().unwrap_or("").to_string())
            .collect()
    }

    #[test]
    fn an_empty_trace_or_window_is_a_valid_document_with_a_note() {
        let (doc, seen) = exported("", None);
        assert_eq!((seen.events, seen.shown, seen.span), (0, 0, None));
        assert_eq!(notes(&doc), ["no events in this trace"]);
        let trace = "{\"t_ns\":1000,\"kind\":\"job_start\",\"job\":1,\"op\":\"copy\",\"asid\":2}\n\
                     {\"t_ns\":2000,\"kind\":\"job_done\",\"job\":1,\"asid\":2,\"result\":\"ok\"}\n";
        let (doc, seen) = exported(trace, Some((3_000_000_000, 3_400_000_000)));
        assert_eq!((seen.events, seen.shown), (0, 0));
        assert_eq!(notes(&doc), ["no events in this window"]);
        // Inverted: nothing, not a panic.
        let (_, seen) = exported(trace, Some((5000, 10)));
        assert_eq!(seen.events, 0);
        let (doc, seen) = exported(trace, Some((0, 5000)));
        assert_eq!(
            (seen.events, seen.shown, seen.span),
            (2, 2, Some((1000, 2000)))
        );
        assert!(notes(&doc).is_empty());
    }

    #[test]
    fn a_huge_asid_does_not_overflow() {
        let mut e = Exporter::new(Vec::new()).expect("start");
        let v = json!({"t_ns": 1, "kind": "violation", "asid": u64::MAX, "result": "stale"});
        e.add(&v).expect("add");
        assert_eq!(e.shown, 1);
    }
}
