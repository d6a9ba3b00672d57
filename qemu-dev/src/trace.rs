//! JSON Lines trace of device events.
//!
//! One JSON object per line. Every line has:
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `t_ns` | u64 | monotonic nanoseconds since the trace was opened |
//! | `seq` | u64 | event number, from 0, without gaps |
//! | `kind` | string | one of the kinds below |
//!
//! and, depending on `kind`:
//!
//! | kind | fields |
//! |---|---|
//! | `connect` | — (the VMM connected) |
//! | `disconnect` | — (the VMM went away; the trace is flushed) |
//! | `bar_read`, `bar_write` | `bar` (u32), `offset` (u64), `size` (bytes), `value` (u64, little-endian value of the access, 0 if `size` > 8), `reg` (string, only when `bar` is 0 and `offset` is a register, e.g. `"IDENT"`, `"SCRATCH"`) |
//! | `config_write` | `offset`, `size`, `value` as above, in PCI config space |
//! | `dma_map` | `iova`, `size`, `offset` (in the shared file), `has_fd` (bool), `flags` (raw vfio-user DMA map flags) |
//! | `dma_unmap` | `iova`, `size`, `flags` (raw; bit 1 = unmap all) |
//! | `irq_setup` | `index` (`"intx"`, `"msi"`, `"msix"`, `"err"`, `"req"` or `"unknown"`), `index_raw` (u32), `flags` (raw `VFIO_IRQ_SET_*`), `start`, `count`, `nfds` |
//! | `reset` | — (device reset) |
//! | `error` | `what` (string): a misbehaving guest or VMM request the device survived |
//!
//! Engine activity ([`crate::events::Activity`]) uses the same envelope. Common field names:
//! `asid`, `va`, `pa`, `len`, `cmd` (command-queue position, index + wrap bit), `job` (DMA job
//! id), `id` (translation id), `result`.
//!
//! | kind | fields |
//! |---|---|
//! | `control` | `cr0ack` (units enabled), `refused` (enables refused for bad configuration) |
//! | `command` | `cmd`, `op` (`inv_range`, `inv_asid`, `inv_all`, `cfgi_ctx`, `sync`, `resume`, `abort`, `nop`), `asid`, `va` (address operand), `len` (second operand), `result` (`ok`, `ignored`, or the `CERR_*` name: the queue stopped) |
//! | `sync_done` | `cmd`, `pa` (completion address), `value`, `waited` (DMA steps it waited for) |
//! | `iotlb_fill` | `asid`, `va`, `pa`, `len` (4096 or 2 MiB), `writable`, `id` |
//! | `iotlb_evict` | `asid`, `va`, `len`, `id` |
//! | `iotlb_invalidate` | `cmd`, `asid` (absent for INV_ALL), `va`, `len`, `dropped`, `in_flight` (held by a running job; the next SYNC waits for them) |
//! | `job_start` | `job`, `op`, `asid`, `src`, `dst`, `len` |
//! | `job_done` | `job`, `asid`, `result` (`ok`, `fault`, `bad_job`, `buf_error`), `len` (bytes done), `faults` |
//! | `dma_access` | `job`, `asid`, `va`, `pa`, `len`, `write`, `id`: one side of one DMA step (at most a page, never crossing one) through translation `id` |
//! | `fault` | `job`, `asid`, `va`, `write`, `result` (`FAULT_*` name), `stalled`, `tag` |
//! | `violation` | `job`, `asid`, `va`, `pa` (device's), `cpu_pa` (absent: CPU maps nothing), `write`, `result` (`stale`, `write_perm`, `write_clean`, `released`, `ledger`), `why` |
//! | `queue_error` | `queue` (`cmdq`, `evtq`, `dmaq`), `cmd` (position), `result` |
//! | `interrupt` | `vector` (0 command, 1 event, 2 error) |
//! | `irq_dropped` | `vector`: due while PCI bus mastering was off, never sent |
//! | `bus_master` | `enabled` (PCI bus mastering changed), `job` and `pos` (the job in flight and its bytes done; absent if none) |
//! | `fail_inject` | `mode` (`none`, `cmdq_stop`, `sync_delay`, `cmdq_error`, `drop_cmd_msi`, `dma_hang`, `die`), `what` (`armed`, `disarmed`, or what the injected failure did), `arg` (`FAIL_ARG`), `cmd`, `job` (when one is involved) |
//!
//! The writer buffers; it flushes on `disconnect`, on [`TraceWriter::flush`] and on drop (the
//! `BufWriter`'s own drop, which ignores errors: check [`TraceWriter::flush`] when it matters).
//!
//! The kinds the DMA path writes for every page (`dma_access`, `iotlb_fill`, `iotlb_evict`) are
//! formatted by hand into a buffer the writer reuses (`hot_line`), byte for byte what serde
//! would write: the trace is a large part of a traced DMA job's cost, and serde's generic path
//! (a flattened, internally tagged enum) takes about twice as long per line. Nothing is
//! allocated per event on either path.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::device::register_name;
use crate::events::{Activity, Event, Events};

#[derive(Serialize)]
struct Record<'a> {
    t_ns: u64,
    seq: u64,
    #[serde(flatten)]
    body: Body<'a>,
}

/// Engine activity serialises itself (`Activity` carries its own `kind` tag).
#[derive(Serialize)]
struct EngineRecord<'a> {
    t_ns: u64,
    seq: u64,
    #[serde(flatten)]
    activity: &'a Activity,
}

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Body<'a> {
    Connect,
    Disconnect,
    BarRead(BarAccess),
    BarWrite(BarAccess),
    ConfigWrite {
        offset: u64,
        size: usize,
        value: u64,
    },
    DmaMap {
        iova: u64,
        size: u64,
        offset: u64,
        has_fd: bool,
        flags: u32,
    },
    DmaUnmap {
        iova: u64,
        size: u64,
        flags: u32,
    },
    IrqSetup {
        index: &'static str,
        index_raw: u32,
        flags: u32,
        start: u32,
        count: u32,
        nfds: usize,
    },
    Reset,
    Error {
        what: &'a str,
    },
}

#[derive(Serialize)]
struct BarAccess {
    bar: u32,
    offset: u64,
    size: usize,
    value: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reg: Option<&'static str>,
}

impl BarAccess {
    fn new(bar: u32, offset: u64, size: usize, value: u64) -> Self {
        let reg = if bar == 0 {
            register_name(offset)
        } else {
            None
        };
        Self {
            bar,
            offset,
            size,
            value,
            reg,
        }
    }
}

impl<'a> Body<'a> {
    /// The body of an event the device glue reports; `None` for engine activity, which
    /// serialises itself (see [`EngineRecord`]).
    fn of(ev: &'a Event) -> Option<Self> {
        Some(match *ev {
            Event::Connect => Body::Connect,
            Event::Disconnect => Body::Disconnect,
            Event::BarRead {
                bar,
                offset,
                size,
                value,
            } => Body::BarRead(BarAccess::new(bar, offset, size, value)),
            Event::BarWrite {
                bar,
                offset,
                size,
                value,
            } => Body::BarWrite(BarAccess::new(bar, offset, size, value)),
            Event::ConfigWrite {
                offset,
                size,
                value,
            } => Body::ConfigWrite {
                offset,
                size,
                value,
            },
            Event::DmaMap {
                iova,
                size,
                offset,
                has_fd,
                flags,
            } => Body::DmaMap {
                iova,
                size,
                offset,
                has_fd,
                flags,
            },
            Event::DmaUnmap { iova, size, flags } => Body::DmaUnmap { iova, size, flags },
            Event::IrqSetup {
                index,
                flags,
                start,
                count,
                nfds,
            } => Body::IrqSetup {
                index: index.name(),
                index_raw: index.raw(),
                flags,
                start,
                count,
                nfds,
            },
            Event::Reset => Body::Reset,
            Event::Error { ref what } => Body::Error { what },
            Event::Engine(_) => return None,
        })
    }
}

/// Writes events as JSON Lines to `W`.
pub struct TraceWriter<W: Write> {
    out: BufWriter<W>,
    /// Where the per-page kinds are formatted.
    line: Box<Line>,
    start: Instant,
    seq: u64,
    error: Option<io::Error>,
}

impl TraceWriter<File> {
    /// Creates (truncates) the trace file at `path`.
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self::new(File::create(path)?))
    }
}

impl<W: Write> TraceWriter<W> {
    /// A trace whose clock starts now.
    pub fn new(out: W) -> Self {
        Self {
            out: BufWriter::new(out),
            line: Box::new(Line::new()),
            start: Instant::now(),
            seq: 0,
            error: None,
        }
    }

    /// Writes one event as a line.
    pub fn record(&mut self, ev: &Event) -> io::Result<()> {
        let t_ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if hot_line(&mut self.line, t_ns, self.seq, ev) {
            self.out.write_all(self.line.as_bytes())?;
            self.seq += 1;
            return Ok(());
        }
        match (Body::of(ev), ev) {
            (Some(body), _) => {
                let rec = Record {
                    t_ns,
                    seq: self.seq,
                    body,
                };
                serde_json::to_writer(&mut self.out, &rec)?;
            }
            (None, Event::Engine(activity)) => {
                let rec = EngineRecord {
                    t_ns,
                    seq: self.seq,
                    activity,
                };
                serde_json::to_writer(&mut self.out, &rec)?;
            }
            (None, _) => return Ok(()),
        }
        self.seq += 1;
        self.out.write_all(b"\n")?;
        if matches!(ev, Event::Disconnect) {
            self.out.flush()?;
        }
        Ok(())
    }

    /// Number of events written so far.
    pub fn len(&self) -> u64 {
        self.seq
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.seq == 0
    }

    /// Pushes buffered lines to `W`.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// The first write error met through [`Events::event`], which cannot return it.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    /// Flushes and returns the underlying writer.
    pub fn into_inner(self) -> io::Result<W> {
        self.out.into_inner().map_err(|e| e.into_error())
    }
}

/// Room for one hot line: the longest (every number at `u64::MAX`) is about 270 bytes.
const LINE_MAX: usize = 320;

/// Two decimal digits for each value below 100.
const DIGIT_PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

/// A JSON line being built, kept in the writer and reused. Every copy into it has a length
/// known at compile time, so none becomes a call to `memcpy`: for lines of a dozen short
/// pieces, those calls cost more than the formatting.
struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Self {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    /// Appends a literal. Lines are bounded (see [`LINE_MAX`]): never truncated in practice,
    /// and never a panic if one were.
    fn lit<const N: usize>(&mut self, s: &[u8; N]) {
        if let Some(d) = self.buf.get_mut(self.len..self.len + N) {
            d.copy_from_slice(s);
            self.len += N;
        }
    }

    /// Appends `key` (with its comma, quotes and colon) and `v` in decimal.
    fn num<const N: usize>(&mut self, key: &[u8; N], v: u64) {
        self.lit(key);
        let n = v.checked_ilog10().map_or(1, |l| l as usize + 1);
        let Some(out) = self.buf.get_mut(self.len..self.len + n) else {
            return;
        };
        // Right to left, four digits per division while it can (as itoa does); `n` digits is
        // exactly what `v` needs, so `i` never goes below zero.
        let pair = |d: u64| {
            let d = d as usize * 2;
            [DIGIT_PAIRS[d], DIGIT_PAIRS[d + 1]]
        };
        let (mut v, mut i) = (v, n);
        while v >= 10_000 {
            let r = v % 10_000;
            v /= 10_000;
            i -= 4;
            let ([a, b], [c, d]) = (pair(r / 100), pair(r % 100));
            out[i..i + 4].copy_from_slice(&[a, b, c, d]);
        }
        if v >= 100 {
            i -= 2;
            out[i..i + 2].copy_from_slice(&pair(v % 100));
            v /= 100;
        }
        if v >= 10 {
            out[..2].copy_from_slice(&pair(v));
        } else {
            out[0] = b'0' + v as u8;
        }
        self.len += n;
    }

    fn flag<const N: usize>(&mut self, key: &[u8; N], v: bool) {
        self.lit(key);
        if v {
            self.lit(b"true");
        } else {
            self.lit(b"false");
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Builds in `l` the line (with its newline) of an event of a per-page kind; false for any
/// other kind.
fn hot_line(l: &mut Line, t_ns: u64, seq: u64, ev: &Event) -> bool {
    let Event::Engine(
        a @ (Activity::DmaAccess { .. } | Activity::IotlbFill { .. } | Activity::IotlbEvict { .. }),
    ) = ev
    else {
        return false;
    };
    l.len = 0;
    l.num(b"{\"t_ns\":", t_ns);
    l.num(b",\"seq\":", seq);
    match *a {
        Activity::DmaAccess {
            job,
            asid,
            va,
            pa,
            len,
            write,
            id,
        } => {
            l.lit(b",\"kind\":\"dma_access\"");
            l.num(b",\"job\":", job);
            l.num(b",\"asid\":", asid.into());
            l.num(b",\"va\":", va);
            l.num(b",\"pa\":", pa);
            l.num(b",\"len\":", len);
            l.flag(b",\"write\":", write);
            l.num(b",\"id\":", id);
        }
        Activity::IotlbFill {
            asid,
            va,
            pa,
            len,
            writable,
            id,
        } => {
            l.lit(b",\"kind\":\"iotlb_fill\"");
            l.num(b",\"asid\":", asid.into());
            l.num(b",\"va\":", va);
            l.num(b",\"pa\":", pa);
            l.num(b",\"len\":", len);
            l.flag(b",\"writable\":", writable);
            l.num(b",\"id\":", id);
        }
        Activity::IotlbEvict { asid, va, len, id } => {
            l.lit(b",\"kind\":\"iotlb_evict\"");
            l.num(b",\"asid\":", asid.into());
            l.num(b",\"va\":", va);
            l.num(b",\"len\":", len);
            l.num(b",\"id\":", id);
        }
        _ => return false,
    }
    l.lit(b"}\n");
    true
}

impl<W: Write> Events for TraceWriter<W> {
    fn event(&mut self, ev: &Event) {
        if let Err(e) = self.record(ev) {
            self.error.get_or_insert(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::IrqIndex;
    use serde_json::{json, Value};

    fn lines(events: &[Event]) -> Vec<Value> {
        let mut w = TraceWriter::new(Vec::new());
        for ev in events {
            w.event(ev);
        }
        assert!(w.take_error().is_none());
        assert_eq!(w.len(), events.len() as u64);
        let buf = w.into_inner().expect("flush to Vec");
        let text = String::from_utf8(buf).expect("utf-8");
        assert!(text.ends_with('\n'));
        text.lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect()
    }

    #[test]
    fn every_kind_round_trips() {
        let events = vec![
            Event::Connect,
            Event::BarRead {
                bar: 0,
                offset: 0,
                size: 4,
                value: 0x4750_415a,
            },
            Event::BarWrite {
                bar: 0,
                offset: 0x14,
                size: 4,
                value: 7,
            },
            Event::BarRead {
                bar: 0,
                offset: 0x3,
                size: 1,
                value: 0,
            },
            Event::ConfigWrite {
                offset: 4,
                size: 2,
                value: 6,
            },
            Event::DmaMap {
                iova: 0x10_0000,
                size: 0x20_0000,
                offset: 0x10_0000,
                has_fd: true,
                flags: 3,
            },
            Event::DmaUnmap {
                iova: 0,
                size: 0,
                flags: 2,
            },
            Event::IrqSetup {
                index: IrqIndex::Msix,
                flags: 0x24,
                start: 1,
                count: 1,
                nfds: 1,
            },
            Event::Reset,
            Event::Error {
                what: "bad \"thing\"\n".into(),
            },
            Event::Disconnect,
        ];
        let v = lines(&events);
        assert_eq!(v.len(), events.len());
        let kinds: Vec<&str> = v.iter().map(|l| l["kind"].as_str().unwrap_or("")).collect();
        assert_eq!(
            kinds,
            [
                "connect",
                "bar_read",
                "bar_write",
                "bar_read",
                "config_write",
                "dma_map",
                "dma_unmap",
                "irq_setup",
                "reset",
                "error",
                "disconnect"
            ]
        );
        let mut last_t = 0;
        for (i, l) in v.iter().enumerate() {
            assert_eq!(l["seq"], json!(i));
            let t = l["t_ns"].as_u64().expect("t_ns is a number");
            assert!(t >= last_t, "monotonic");
            last_t = t;
        }
        let strip = |mut l: Value| {
            let o = l.as_object_mut().expect("object");
            o.remove("t_ns");
            o.remove("seq");
            l
        };
        let expect = [
            json!({"kind": "connect"}),
            json!({"kind": "bar_read", "bar": 0, "offset": 0, "size": 4, "value": 0x4750_415a_u32, "reg": "IDENT"}),
            json!({"kind": "bar_write", "bar": 0, "offset": 0x14, "size": 4, "value": 7, "reg": "SCRATCH"}),
            json!({"kind": "bar_read", "bar": 0, "offset": 3, "size": 1, "value": 0}),
            json!({"kind": "config_write", "offset": 4, "size": 2, "value": 6}),
            json!({"kind": "dma_map", "iova": 0x10_0000, "size": 0x20_0000, "offset": 0x10_0000, "has_fd": true, "flags": 3}),
            json!({"kind": "dma_unmap", "iova": 0, "size": 0, "flags": 2}),
            json!({"kind": "irq_setup", "index": "msix", "index_raw": 2, "flags": 0x24, "start": 1, "count": 1, "nfds": 1}),
            json!({"kind": "reset"}),
            json!({"kind": "error", "what": "bad \"thing\"\n"}),
            json!({"kind": "disconnect"}),
        ];
        for (got, want) in v.into_iter().zip(expect) {
            assert_eq!(strip(got), want);
        }
    }

    #[test]
    fn disconnect_flushes_and_drop_flushes() {
        let path = std::env::temp_dir().join(format!("zg-trace-{}.jsonl", std::process::id()));
        {
            let mut w = TraceWriter::create(&path).expect("create");
            w.event(&Event::Connect);
            assert_eq!(std::fs::read(&path).expect("read").len(), 0, "buffered");
            w.event(&Event::Disconnect);
            let text = std::fs::read_to_string(&path).expect("read");
            assert_eq!(text.lines().count(), 2);
            w.event(&Event::Reset);
        }
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 3, "drop flushed the last line");
        let _ = std::fs::remove_file(&path);
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk full"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::other("disk full"))
        }
    }

    #[test]
    fn write_errors_are_kept_not_panicked() {
        let mut w = TraceWriter::new(Broken);
        w.event(&Event::Connect);
        w.event(&Event::Disconnect);
        assert!(w.take_error().is_some());
        assert!(w.take_error().is_none());
    }

    #[test]
    fn engine_activity_uses_documented_fields() {
        use crate::events::Activity;
        let v = lines(&[
            Event::Engine(Activity::Violation {
                job: 3,
                asid: 1,
                va: 0x7000,
                pa: 0x1000,
                cpu_pa: None,
                write: true,
                result: "stale",
                why: "CPU maps nothing",
            }),
            Event::Engine(Activity::IotlbInvalidate {
                cmd: 5,
                asid: None,
                va: 0,
                len: u64::MAX,
                dropped: 2,
                in_flight: 1,
            }),
        ]);
        assert_eq!(v[0]["kind"], "violation");
        assert_eq!(v[0]["seq"], 0);
        assert_eq!(v[0]["va"], 0x7000);
        assert_eq!(v[0]["result"], "stale");
        assert!(
            v[0].get("cpu_pa").is_none(),
            "absent when the CPU maps nothing"
        );
        assert_eq!(v[1]["kind"], "iotlb_invalidate");
        assert_eq!(v[1]["seq"], 1);
        assert!(v[1].get("asid").is_none());
        assert_eq!(v[1]["in_flight"], 1);
    }

    /// The hand-written kinds are byte for byte what serde writes.
    #[test]
    fn hot_kinds_match_serde() {
        let ends = [0, 1, 9, 10, 4096, 0x7f00_0000_1000, u64::MAX - 1, u64::MAX];
        let mut cases = vec![];
        for (i, &v) in ends.iter().enumerate() {
            let w = ends[(i + 3) % ends.len()];
            let asid = (v as u32).wrapping_add(i as u32);
            cases.push(Activity::DmaAccess {
                job: v,
                asid,
                va: w,
                pa: v ^ w,
                len: w,
                write: i % 2 == 0,
                id: v,
            });
            cases.push(Activity::IotlbFill {
                asid,
                va: v,
                pa: w,
                len: v,
                writable: i % 2 == 1,
                id: w,
            });
            cases.push(Activity::IotlbEvict {
                asid: u32::MAX - asid,
                va: w,
                len: v,
                id: v,
            });
        }
        for (i, a) in cases.iter().enumerate() {
            let (t_ns, seq) = (ends[i % ends.len()], ends[(i + 5) % ends.len()]);
            let ev = Event::Engine(a.clone());
            let mut hot = Line::new();
            assert!(hot_line(&mut hot, t_ns, seq, &ev), "a hot kind");
            let mut want = serde_json::to_vec(&EngineRecord {
                t_ns,
                seq,
                activity: a,
            })
            .expect("serde");
            want.push(b'\n');
            assert_eq!(
                String::from_utf8_lossy(hot.as_bytes()),
                String::from_utf8_lossy(&want)
            );
        }
        let mut l = Line::new();
        let cold = Event::Engine(Activity::Interrupt { vector: 0 });
        assert!(!hot_line(&mut l, 0, 0, &cold));
        assert!(!hot_line(&mut l, 0, 0, &Event::Reset));
    }

    #[test]
    fn failure_and_bus_master_kinds() {
        use crate::events::Activity;
        let v = lines(&[
            Event::Engine(Activity::FailInject {
                mode: "sync_delay",
                what: "sync delayed",
                arg: 50,
                cmd: Some(3),
                job: None,
            }),
            Event::Engine(Activity::BusMaster {
                enabled: false,
                job: Some(7),
                pos: Some(512),
            }),
            Event::Engine(Activity::BusMaster {
                enabled: true,
                job: None,
                pos: None,
            }),
            Event::Engine(Activity::IrqDropped { vector: 2 }),
        ]);
        let strip = |l: &Value| {
            let mut l = l.clone();
            let o = l.as_object_mut().expect("object");
            o.remove("t_ns");
            o.remove("seq");
            l
        };
        assert_eq!(
            strip(&v[0]),
            json!({"kind": "fail_inject", "mode": "sync_delay", "what": "sync delayed", "arg": 50, "cmd": 3})
        );
        assert_eq!(
            strip(&v[1]),
            json!({"kind": "bus_master", "enabled": false, "job": 7, "pos": 512})
        );
        assert_eq!(strip(&v[2]), json!({"kind": "bus_master", "enabled": true}));
        assert_eq!(strip(&v[3]), json!({"kind": "irq_dropped", "vector": 2}));
    }
}
