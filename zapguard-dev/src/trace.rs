//! The trace of device events: a binary writer for the device ([`TraceWriter`]) and a JSON Lines
//! one ([`JsonTraceWriter`]), which define the same lines.
//!
//! The schema is JSON Lines, one JSON object per event. [`TraceWriter`] records each event as a
//! compact binary record instead (layouts in `shared_regs::trace_format`, shared with the reader),
//! on the device's thread into a buffer that a background thread drains to the file: formatting
//! JSON on the DMA path cost more than the copy. `zapguard-trace` decodes every record to the
//! line [`JsonTraceWriter`] writes for the same event, byte for byte (`zapguard-trace json
//! TRACE`), and reads either format. Every line has:
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
//! Engine activity ([`zapguard_model::events::Activity`]) uses the same envelope. Common field names:
//! `asid`, `va`, `pa`, `len`, `cmd` (command-queue position, index + wrap bit), `job` (DMA job
//! id), `id` (translation id), `result`.
//!
//! | kind | fields |
//! |---|---|
//! | `control` | `cr0ack` (units enabled), `refused` (enables refused for bad configuration) |
//! | `command` | `cmd`, `op` (`inv_range`, `inv_asid`, `inv_all`, `cfgi_ctx`, `sync`, `resume`, `abort`, `nop`), `asid`, `va` (address operand), `len` (second operand), `result` (`ok`, `ignored`, or the `CERR_*` name: the queue stopped) |
//! | `sync_done` | `cmd`, `pa` (completion address), `value`, `waited` (DMA steps it waited for), `lag_us` (the `SYNC_LAG` it waited for at least since it was reached; absent when none) |
//! | `iotlb_fill` | `asid`, `va`, `pa`, `len` (4096 or 2 MiB), `writable`, `id`: a walk's translation, cached (or, with the `IOTLB_KEEP` knob on a full IOTLB, only used) |
//! | `iotlb_evict` | `asid`, `va`, `len`, `id` |
//! | `iotlb_invalidate` | `cmd`, `asid` (absent for INV_ALL), `va`, `len`, `dropped`, `in_flight` (held by a running job; the next SYNC waits for them) |
//! | `job_start` | `job`, `op`, `asid`, `src`, `dst`, `len` |
//! | `job_done` | `job`, `asid`, `result` (`ok`, `fault`, `bad_job`, `buf_error`), `len` (bytes done), `faults` |
//! | `dma_access` | `job`, `asid`, `va`, `pa`, `len`, `write`, `id`: one side of one DMA step (at most a page, never crossing one) through translation `id` |
//! | `fault` | `job`, `asid`, `va`, `write`, `result` (`FAULT_*` name), `stalled`, `tag` |
//! | `violation` | `job`, `asid`, `va`, `pa` (device's), `cpu_pa` (absent: CPU maps nothing), `write`, `result` (`stale`, `write_perm`, `write_clean`, `released`, `ledger`, `table_freed`: then `pa` is the freed table's GPA, `ctx_released`: then `pa` is the walk's root table's GPA, `zapped_during_access`: the CPU walk after the access disagreed, `phys_unlent`: an untranslated access outside the memory the driver lent, `pa` the guest-physical address, `va` the job's VA or 0), `why` |
//! | `queue_error` | `queue` (`cmdq`, `evtq`, `dmaq`), `cmd` (position), `result` |
//! | `interrupt` | `vector` (0 command, 1 event, 2 error) |
//! | `irq_dropped` | `vector`: due while PCI bus mastering was off, never sent |
//! | `bus_master` | `enabled` (PCI bus mastering changed), `job` and `pos` (the job in flight and its bytes done; absent if none) |
//! | `fail_inject` | `mode` (`none`, `cmdq_stop`, `sync_delay`, `cmdq_error`, `drop_cmd_msi`, `dma_hang`, `die`), `what` (`armed`, `disarmed`, or what the injected failure did), `arg` (`FAIL_ARG`), `cmd`, `job` (when one is involved) |
//!
//! Both writers buffer; they flush on `disconnect`, on `flush` and on drop (which ignores
//! errors: check `flush` when it matters). [`TraceWriter::flush`] returns once the background
//! thread has written and flushed everything recorded before it.
//!
//! The kinds the DMA path writes for every page (`dma_access`, `iotlb_fill`, `iotlb_evict`) have
//! fixed binary records; the binary writer reads the clock only every [`CLOCK_EVERY`] of them
//! (a clock read costs as much as the record), so their `t_ns` is that of a read at most
//! `CLOCK_EVERY - 1` per-page events earlier, unless the writer was made with `exact_time`.
//! Every other kind is rare and is recorded as its serde JSON. The JSON writer formats the
//! per-page kinds by hand (`hot_line`), byte for byte what serde would write. Nothing is
//! allocated per event on either path.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;
use shared_regs::trace_format as fmt;
use zapguard_model::device::register_name;
use zapguard_model::events::{Activity, Event, Events};
use zerocopy::IntoBytes;

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

/// Where a writer's timestamps come from.
enum Clock {
    /// Nanoseconds since the writer was made.
    Real(Instant),
    /// 0, 1, 2, ... one per read: tests compare writers that read the clock alike.
    #[cfg(test)]
    Count(u64),
}

impl Clock {
    fn now(&mut self) -> u64 {
        match self {
            Self::Real(start) => u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
            #[cfg(test)]
            Self::Count(n) => {
                *n += 1;
                *n - 1
            }
        }
    }
}

/// Writes events as JSON Lines to `W`.
pub struct JsonTraceWriter<W: Write> {
    out: BufWriter<W>,
    /// Where the per-page kinds are formatted.
    line: Box<Line>,
    clock: Clock,
    seq: u64,
    error: Option<io::Error>,
}

impl JsonTraceWriter<File> {
    /// Creates (truncates) the trace file at `path`.
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self::new(File::create(path)?))
    }
}

impl<W: Write> JsonTraceWriter<W> {
    /// A trace whose clock starts now.
    pub fn new(out: W) -> Self {
        Self::with_clock(out, Clock::Real(Instant::now()))
    }

    fn with_clock(out: W, clock: Clock) -> Self {
        Self {
            out: BufWriter::new(out),
            line: Box::new(Line::new()),
            clock,
            seq: 0,
            error: None,
        }
    }

    /// Writes one event as a line.
    pub fn record(&mut self, ev: &Event) -> io::Result<()> {
        let t_ns = self.clock.now();
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

/// Room for one hot line: the longest (a judged `dma_access`, every number at `u64::MAX`) is
/// about 440 bytes.
const LINE_MAX: usize = 512;

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

    /// Appends `key` and `v` in decimal, or `null`.
    fn opt<const N: usize>(&mut self, key: &[u8; N], v: Option<u64>) {
        match v {
            Some(v) => self.num(key, v),
            None => {
                self.lit(key);
                self.lit(b"null");
            }
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
            judged,
            released,
            cpu_pa,
            cpu_w,
            cpu_d,
            fill_d,
            after,
            after_pa,
            after_w,
        } => {
            l.lit(b",\"kind\":\"dma_access\"");
            l.num(b",\"job\":", job);
            l.num(b",\"asid\":", asid.into());
            l.num(b",\"va\":", va);
            l.num(b",\"pa\":", pa);
            l.num(b",\"len\":", len);
            l.flag(b",\"write\":", write);
            l.num(b",\"id\":", id);
            l.flag(b",\"judged\":", judged);
            l.flag(b",\"released\":", released);
            l.opt(b",\"cpu_pa\":", cpu_pa);
            l.flag(b",\"cpu_w\":", cpu_w);
            l.flag(b",\"cpu_d\":", cpu_d);
            l.flag(b",\"fill_d\":", fill_d);
            l.flag(b",\"after\":", after);
            l.opt(b",\"after_pa\":", after_pa);
            l.flag(b",\"after_w\":", after_w);
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

impl<W: Write> Events for JsonTraceWriter<W> {
    fn event(&mut self, ev: &Event) {
        if let Err(e) = self.record(ev) {
            self.error.get_or_insert(e);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The binary writer

/// Per-page records that share one clock read (see the module doc).
pub const CLOCK_EVERY: u32 = 8;
/// Bytes the device thread buffers before handing them to the background thread.
const CHUNK: usize = 256 << 10;
/// Room past [`CHUNK`] for the record that fills it (per-page records and their CLOCK and JOB
/// records are never more than this): a full chunk is shipped after the record, never grown.
const CHUNK_SLACK: usize = 128;
/// Chunks in flight to the background thread before the device thread waits for it: the trace
/// never drops an event (the ledger check needs them all), so a slow disk slows the device.
const DEPTH: usize = 16;

enum Msg {
    /// The file header.
    Header(Vec<u8>),
    /// A chunk (its head, then records), to seal and write.
    Chunk(Vec<u8>),
    /// Write out everything sent before, flush, and answer with the first error since the last
    /// answer.
    Flush(SyncSender<io::Result<()>>),
}

/// The background thread's ends of the channels.
struct Drain<W> {
    tx: SyncSender<Msg>,
    /// Written chunks coming back, emptied, for reuse: nothing is allocated in steady state.
    spare: Receiver<Vec<u8>>,
    thread: JoinHandle<(W, Option<io::Error>)>,
}

/// Records events in the binary format (`shared_regs::trace_format`) into a buffer that a
/// background thread writes to `W`.
pub struct TraceWriter<W: Write + Send + 'static> {
    chunk: Vec<u8>,
    /// Where rare events are serialised.
    json: Vec<u8>,
    clock: Clock,
    exact_time: bool,
    /// Per-page records that may still reuse the last clock read.
    reuse: u32,
    /// The time of the last CLOCK record.
    last_t: Option<u64>,
    /// The (job, ASID) of the last JOB record (or chunk head).
    job: (u64, u32),
    seq: u64,
    /// Chunks begun (the number of the one being filled, plus one).
    chunks: u64,
    drain: Option<Drain<W>>,
    error: Option<io::Error>,
}

fn gone() -> io::Error {
    io::Error::other("the trace writer thread is gone")
}

impl TraceWriter<File> {
    /// Creates (truncates) the trace file at `path`; see [`TraceWriter::with_exact_time`].
    pub fn create(path: &Path, exact_time: bool) -> io::Result<Self> {
        Self::with_exact_time(File::create(path)?, exact_time)
    }
}

impl<W: Write + Send + 'static> TraceWriter<W> {
    /// A trace whose clock starts now, written by a new background thread.
    pub fn new(out: W) -> io::Result<Self> {
        Self::with_exact_time(out, false)
    }

    /// [`TraceWriter::new`]; with `exact_time`, every event reads the clock (see the module
    /// doc).
    pub fn with_exact_time(out: W, exact_time: bool) -> io::Result<Self> {
        Self::with_clock(out, exact_time, Clock::Real(Instant::now()))
    }

    fn with_clock(out: W, exact_time: bool, clock: Clock) -> io::Result<Self> {
        let (tx, rx) = sync_channel(DEPTH);
        let (spare_tx, spare) = sync_channel(DEPTH + 2);
        let thread = std::thread::Builder::new()
            .name("trace-writer".into())
            .spawn(move || drain(out, rx, spare_tx))?;
        let flags = if exact_time { fmt::FLAG_EXACT_TIME } else { 0 };
        let header = fmt::FileHeader::new(flags).as_bytes().to_vec();
        tx.send(Msg::Header(header)).map_err(|_| gone())?;
        let mut chunk = Vec::with_capacity(CHUNK + CHUNK_SLACK);
        fmt::begin_chunk(&mut chunk, 0, 0, 0, (0, 0));
        Ok(Self {
            chunk,
            json: Vec::with_capacity(256),
            clock,
            exact_time,
            reuse: 0,
            last_t: None,
            job: (0, 0),
            seq: 0,
            chunks: 1,
            drain: Some(Drain { tx, spare, thread }),
            error: None,
        })
    }

    /// Records one event. Inlined: where the caller builds the event, the match folds away
    /// and the fields go to the record in registers, not through the event in memory.
    #[inline(always)]
    pub fn record(&mut self, ev: &Event) {
        match *ev {
            Event::Engine(Activity::DmaAccess {
                job,
                asid,
                va,
                pa,
                len,
                write,
                id,
                judged,
                released,
                cpu_pa,
                cpu_w,
                cpu_d,
                fill_d,
                after,
                after_pa,
                after_w,
            }) if len <= u32::MAX.into() => {
                self.hot_clock();
                if self.job != (job, asid) {
                    self.job = (job, asid);
                    let r = fmt::Job::new(job, asid);
                    self.chunk.extend_from_slice(r.as_bytes());
                }
                if judged {
                    let facts = fmt::DmaFacts {
                        released,
                        cpu_pa,
                        cpu_w,
                        cpu_d,
                        fill_d,
                        after,
                        after_pa,
                        after_w,
                    };
                    let r = fmt::JudgedDma::new(write, va, pa, len as u32, id, &facts);
                    self.chunk.extend_from_slice(r.as_bytes());
                } else {
                    let r = fmt::Dma::new(write, va, pa, len as u32, id);
                    self.chunk.extend_from_slice(r.as_bytes());
                }
            }
            Event::Engine(Activity::IotlbFill {
                asid,
                va,
                pa,
                len,
                writable,
                id,
            }) if len <= u32::MAX.into() => {
                self.hot_clock();
                let r = fmt::Fill::new(writable, asid, va, pa, len as u32, id);
                self.chunk.extend_from_slice(r.as_bytes());
            }
            Event::Engine(Activity::IotlbEvict { asid, va, len, id }) if len <= u32::MAX.into() => {
                self.hot_clock();
                let r = fmt::Evict::new(asid, va, len as u32, id);
                self.chunk.extend_from_slice(r.as_bytes());
            }
            _ => self.record_json(ev),
        }
        self.seq += 1;
        if self.chunk.len() >= CHUNK {
            self.ship();
        }
    }

    /// A rare event: its serde JSON (what the JSON writer writes after `t_ns` and `seq`). Kept
    /// out of line, so that the per-page path inlined into the DMA engine stays small.
    #[cold]
    #[inline(never)]
    fn record_json(&mut self, ev: &Event) {
        self.stamp();
        self.json.clear();
        let written = match (Body::of(ev), ev) {
            (Some(body), _) => serde_json::to_writer(&mut self.json, &body),
            (None, Event::Engine(activity)) => serde_json::to_writer(&mut self.json, activity),
            (None, _) => Ok(()),
        };
        if let Err(e) = written {
            // Serialising these types into memory cannot fail; keep the stream framed if it did.
            self.error.get_or_insert(e.into());
            self.json.clear();
            self.json
                .extend_from_slice(br#"{"kind":"error","what":"unserialisable event"}"#);
        }
        let head = fmt::RecordHead::event(self.json.len()).or_else(|| {
            // No event is this long (a record's length is a u16); keep the event counted.
            self.error
                .get_or_insert_with(|| io::Error::other("an event too long to record"));
            self.json.clear();
            self.json
                .extend_from_slice(br#"{"kind":"error","what":"event too long"}"#);
            fmt::RecordHead::event(self.json.len())
        });
        if let Some(head) = head {
            self.chunk.extend_from_slice(head.as_bytes());
            self.chunk.extend_from_slice(&self.json);
        }
        if matches!(ev, Event::Disconnect) {
            if let Err(e) = self.flush() {
                self.error.get_or_insert(e);
            }
        }
    }

    /// Reads the clock, and records the time if it moved.
    #[inline(never)]
    fn stamp(&mut self) {
        let t = self.clock.now();
        self.reuse = if self.exact_time { 0 } else { CLOCK_EVERY - 1 };
        if self.last_t != Some(t) {
            self.last_t = Some(t);
            let r = fmt::Clock::new(t);
            self.chunk.extend_from_slice(r.as_bytes());
        }
    }

    /// A per-page event reuses the last clock read, up to [`CLOCK_EVERY`] of them.
    fn hot_clock(&mut self) {
        if self.reuse == 0 {
            self.stamp();
        } else {
            self.reuse -= 1;
        }
    }

    /// Hands the chunk to the background thread and begins the next one in an empty buffer.
    #[cold]
    #[inline(never)]
    fn ship(&mut self) {
        let mut next = match &self.drain {
            Some(d) => d
                .spare
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(CHUNK + CHUNK_SLACK)),
            None => Vec::with_capacity(CHUNK + CHUNK_SLACK),
        };
        // The next chunk starts with the state in effect here, so that a reader can decode it
        // even if this one is lost.
        fmt::begin_chunk(
            &mut next,
            self.chunks,
            self.seq,
            self.last_t.unwrap_or(0),
            self.job,
        );
        self.chunks += 1;
        let full = std::mem::replace(&mut self.chunk, next);
        if let Some(d) = &self.drain {
            if d.tx.send(Msg::Chunk(full)).is_err() {
                self.error.get_or_insert_with(gone);
            }
        }
    }

    /// Whether the chunk being filled holds records.
    fn has_records(&self) -> bool {
        self.chunk.len() > fmt::CHUNK_HEAD_LEN
    }

    /// Number of events recorded so far.
    pub fn len(&self) -> u64 {
        self.seq
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.seq == 0
    }

    /// Returns once everything recorded so far is written to `W` and `W` is flushed, with the
    /// first write error since the last flush.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.has_records() {
            self.ship();
        }
        let d = self.drain.as_ref().ok_or_else(gone)?;
        let (ack, done) = sync_channel(1);
        d.tx.send(Msg::Flush(ack)).map_err(|_| gone())?;
        done.recv().map_err(|_| gone())?
    }

    /// The first error met through [`Events::event`], which cannot return it (a write error
    /// shows up at the next flush: `disconnect` flushes).
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    /// Writes out everything, stops the background thread and returns `W`.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.finish()
    }

    fn finish(&mut self) -> io::Result<W> {
        if self.has_records() {
            self.ship();
        }
        let d = self.drain.take().ok_or_else(gone)?;
        drop(d.tx);
        match d.thread.join() {
            Ok((out, None)) => Ok(out),
            Ok((_, Some(e))) => Err(e),
            Err(_) => Err(io::Error::other("the trace writer thread panicked")),
        }
    }
}

impl<W: Write + Send + 'static> Drop for TraceWriter<W> {
    fn drop(&mut self) {
        if self.drain.is_some() {
            let _ = self.finish();
        }
    }
}

impl<W: Write + Send + 'static> Events for TraceWriter<W> {
    #[inline(always)]
    fn event(&mut self, ev: &Event) {
        self.record(ev)
    }
}

/// The background thread: seals (length, checksum) and writes chunks in order, and flushes
/// when asked. A write error is reported once, at the next flush or at the end; later chunks
/// are still written, each whole in itself, so a reader sees the lost ones as a gap.
fn drain<W: Write>(
    mut out: W,
    rx: Receiver<Msg>,
    spare: SyncSender<Vec<u8>>,
) -> (W, Option<io::Error>) {
    let mut error = None;
    for msg in rx {
        match msg {
            Msg::Header(h) => {
                if let Err(e) = out.write_all(&h) {
                    error.get_or_insert(e);
                }
            }
            Msg::Chunk(mut c) => {
                let written = if fmt::seal_chunk(&mut c) {
                    out.write_all(&c)
                } else {
                    Err(io::Error::other("a trace chunk over the format's bound"))
                };
                if let Err(e) = written {
                    error.get_or_insert(e);
                }
                c.clear();
                let _ = spare.try_send(c);
            }
            Msg::Flush(ack) => {
                let r = match error.take() {
                    Some(e) => Err(e),
                    None => out.flush(),
                };
                let _ = ack.send(r);
            }
        }
    }
    if let Err(e) = out.flush() {
        error.get_or_insert(e);
    }
    (out, error)
}

/// A `dma_access` whose facts are those of case `i`: not judged, judged clean, a page mapped
/// elsewhere (then no walk after), released, or zapped while the device used it.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dma_access_case(
    job: u64,
    asid: u32,
    va: u64,
    pa: u64,
    len: u64,
    write: bool,
    id: u64,
    i: usize,
) -> Activity {
    let frame = pa & !0xfff;
    let (judged, released, cpu_pa, after, after_pa) = match i % 5 {
        0 => (false, false, None, false, None),
        1 => (true, false, Some(frame), true, Some(frame)),
        2 => (true, false, Some(frame ^ 0x1000), false, None),
        3 => (true, true, None, false, None),
        _ => (true, false, Some(frame), true, None),
    };
    Activity::DmaAccess {
        job,
        asid,
        va,
        pa,
        len,
        write,
        id,
        judged,
        released,
        cpu_pa,
        cpu_w: cpu_pa.is_some() && i.is_multiple_of(2),
        cpu_d: cpu_pa.is_some() && i.is_multiple_of(3),
        fill_d: judged && i.is_multiple_of(4),
        after,
        after_pa,
        after_w: after_pa.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use zapguard_model::events::IrqIndex;

    fn lines(events: &[Event]) -> Vec<Value> {
        let mut w = JsonTraceWriter::new(Vec::new());
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
                size: 0x30_0000,
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
            json!({"kind": "dma_map", "iova": 0x10_0000, "size": 0x30_0000, "offset": 0x10_0000, "has_fd": true, "flags": 3}),
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
            let mut w = JsonTraceWriter::create(&path).expect("create");
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
        let mut w = JsonTraceWriter::new(Broken);
        w.event(&Event::Connect);
        w.event(&Event::Disconnect);
        assert!(w.take_error().is_some());
        assert!(w.take_error().is_none());
    }

    #[test]
    fn engine_activity_uses_documented_fields() {
        use zapguard_model::events::Activity;
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
            cases.push(dma_access_case(v, asid, w, v ^ w, w, i % 2 == 0, v, i));
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
        use zapguard_model::events::Activity;
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

#[cfg(test)]
mod binary_tests {
    use super::*;
    use zapguard_model::events::IrqIndex;
    use zapguard_trace::reader;

    /// One event of every kind, and per-page ones across jobs, ASIDs and extreme values
    /// (including a `len` too long for a per-page record).
    fn every_kind() -> Vec<Event> {
        let mut v = vec![
            Event::Connect,
            Event::BarRead {
                bar: 0,
                offset: 0,
                size: 4,
                value: 0x4750_415a,
            },
            Event::BarWrite {
                bar: 2,
                offset: 0x14,
                size: 16,
                value: 0,
            },
            Event::ConfigWrite {
                offset: 4,
                size: 2,
                value: 6,
            },
            Event::DmaMap {
                iova: 0x10_0000,
                size: 0x30_0000,
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
                index: IrqIndex::Unknown(9),
                flags: 0x24,
                start: 1,
                count: 1,
                nfds: 1,
            },
            Event::Reset,
            Event::Error {
                what: "bad \"thing\"\n\u{1}é".into(),
            },
        ];
        let a = [
            Activity::Control {
                cr0ack: 7,
                refused: 1,
            },
            Activity::Command {
                cmd: 0x8000_0001,
                op: "inv_range",
                asid: 3,
                va: 0x7000,
                len: 0x2000,
                result: "ok",
            },
            Activity::SyncDone {
                cmd: 2,
                pa: 0x1000,
                value: 9,
                waited: 4,
                lag_us: 0,
            },
            Activity::SyncDone {
                cmd: 3,
                pa: 0,
                value: 0,
                waited: 0,
                lag_us: 300,
            },
            Activity::IotlbInvalidate {
                cmd: 5,
                asid: None,
                va: 0,
                len: u64::MAX,
                dropped: 2,
                in_flight: 1,
            },
            Activity::IotlbInvalidate {
                cmd: 6,
                asid: Some(3),
                va: 0x7000,
                len: 0x1000,
                dropped: 0,
                in_flight: 0,
            },
            Activity::JobStart {
                job: 11,
                op: "copy",
                asid: 3,
                src: 0x7000,
                dst: 0x9000,
                len: 8192,
            },
            Activity::JobDone {
                job: 11,
                asid: 3,
                result: "ok",
                len: 8192,
                faults: 0,
            },
            Activity::Fault {
                job: 11,
                asid: 3,
                va: 0x7000,
                write: true,
                result: "FAULT_NOT_PRESENT",
                stalled: true,
                tag: 5,
            },
            Activity::Violation {
                job: 11,
                asid: 3,
                va: 0x7000,
                pa: 0x1000,
                cpu_pa: Some(0x2000),
                write: false,
                result: "stale",
                why: "CPU maps another page",
            },
            Activity::QueueError {
                queue: "cmdq",
                cmd: 3,
                result: "injected",
            },
            Activity::Interrupt { vector: 1 },
            Activity::IrqDropped { vector: 2 },
            Activity::BusMaster {
                enabled: false,
                job: Some(7),
                pos: Some(512),
            },
            Activity::FailInject {
                mode: "die",
                what: "armed",
                arg: 0,
                cmd: None,
                job: Some(3),
            },
        ];
        v.extend(a.into_iter().map(Event::Engine));
        let ends = [0, 1, 4096, 0x7f00_0000_1000, u64::MAX];
        for (i, &x) in ends.iter().enumerate() {
            let y = ends[(i + 2) % ends.len()];
            let len = [4096, 0x30_0000, u32::MAX.into(), u64::from(u32::MAX) + 1][i % 4];
            let asid = [0, 1, u32::MAX][i % 3];
            for job in [x, x, y] {
                let case = i + usize::from(job == y);
                v.push(Event::Engine(dma_access_case(
                    job,
                    asid,
                    x,
                    y,
                    len,
                    i % 2 == 0,
                    y,
                    case,
                )));
            }
            v.push(Event::Engine(Activity::IotlbFill {
                asid,
                va: y,
                pa: x,
                len,
                writable: i % 2 == 1,
                id: x,
            }));
            v.push(Event::Engine(Activity::IotlbEvict {
                asid,
                va: x,
                len,
                id: y,
            }));
        }
        v.push(Event::Disconnect);
        v
    }

    fn binary(events: &[Event], exact_time: bool) -> Vec<u8> {
        let mut w = TraceWriter::with_clock(Vec::new(), exact_time, Clock::Count(0)).expect("w");
        for ev in events {
            w.event(ev);
        }
        assert!(w.take_error().is_none());
        assert_eq!(w.len(), events.len() as u64);
        w.into_inner().expect("into a Vec")
    }

    fn decoded(file: &[u8]) -> (String, Vec<reader::BadLine>) {
        let mut text = String::new();
        let bad = reader::for_each_line(file, |_, l| {
            text += std::str::from_utf8(l).expect("utf-8");
            text.push('\n');
        })
        .expect("read");
        (text, bad)
    }

    /// Every record decodes to the very bytes the JSON writer writes for its event.
    #[test]
    fn records_decode_to_the_json_writers_lines() {
        let events = every_kind();
        let mut j = JsonTraceWriter::with_clock(Vec::new(), Clock::Count(0));
        for ev in &events {
            j.event(ev);
        }
        let want = String::from_utf8(j.into_inner().expect("json")).expect("utf-8");
        let file = binary(&events, true);
        assert_eq!(&file[..8], b"ZGTRACE\n");
        let (got, bad) = decoded(&file);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(got, want);
    }

    /// Per-page events share a clock read among `CLOCK_EVERY`; rare ones always read it.
    #[test]
    fn per_page_events_share_clock_reads() {
        let dma = |va| Event::Engine(dma_access_case(1, 1, va, va, 4096, false, 1, 1));
        let mut events: Vec<Event> = (0..20).map(dma).collect();
        events.push(Event::Reset);
        events.push(dma(99));
        let (text, _) = decoded(&binary(&events, false));
        let t: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")["t_ns"].as_u64())
            .map(|t| t.expect("t_ns"))
            .collect();
        let e = u64::from(CLOCK_EVERY);
        let mut want: Vec<u64> = (0..20).map(|i| i / e).collect();
        want.extend([3, 3]);
        assert_eq!(t, want);
    }

    /// The device killed mid-write leaves a cut last record: a bad last line, not a panic.
    #[test]
    fn a_cut_last_record_is_reported() {
        let events = every_kind();
        let file = binary(&events, true);
        let n = events.len() as u64;
        for cut in [1, 4, 20] {
            let mut seen = 0;
            let bad =
                reader::for_each_event(&file[..file.len() - cut], |_, _| seen += 1).expect("read");
            assert_eq!(seen, n - 1, "all but the last");
            assert_eq!(bad.len(), 1, "{bad:?}");
            assert_eq!(bad[0].line, n);
            assert!(bad[0].why.contains("cut short"), "{}", bad[0].why);
        }
    }

    #[test]
    fn disconnect_flushes_and_drop_flushes() {
        let path = std::env::temp_dir().join(format!("zg-trace-{}.zgt", std::process::id()));
        let count = |path: &Path| {
            let f = std::fs::read(path).expect("read");
            decoded(&f).0.lines().count()
        };
        {
            let mut w = TraceWriter::create(&path, false).expect("create");
            w.event(&Event::Connect);
            assert_eq!(count(&path), 0, "buffered");
            w.event(&Event::Disconnect);
            assert_eq!(count(&path), 2);
            w.event(&Event::Reset);
            w.flush().expect("flush");
            assert_eq!(count(&path), 3);
            w.event(&Event::Reset);
        }
        assert_eq!(count(&path), 4, "drop wrote the last event");
        let _ = std::fs::remove_file(&path);
    }

    /// A chunk's worth of events goes to the background thread while recording goes on.
    #[test]
    fn long_traces_cross_chunks() {
        let events: Vec<Event> = (0..30_000u64)
            .map(|i| {
                Event::Engine(Activity::IotlbEvict {
                    asid: 1,
                    va: i << 12,
                    len: 4096,
                    id: i,
                })
            })
            .collect();
        let file = binary(&events, false);
        assert!(file.len() > 2 * CHUNK);
        let mut ids = vec![];
        let bad =
            reader::for_each_event(&file[..], |_, v| ids.push(v["id"].as_u64())).expect("read");
        assert!(bad.is_empty());
        assert_eq!(ids, (0..30_000).map(Some).collect::<Vec<_>>());
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
        let mut w = TraceWriter::new(Broken).expect("w");
        w.event(&Event::Connect);
        w.event(&Event::Disconnect);
        assert!(w.take_error().is_some(), "disconnect flushed");
        assert!(w.take_error().is_none());
        w.event(&Event::Reset);
        // The writer keeps trying (a reader sees what was lost as a gap), and every flush
        // after a lost chunk says so.
        assert!(w.flush().is_err(), "the later chunk was lost too");
    }

    /// A chunk lost to a write error is a gap the reader reports, with the events it held;
    /// the chunks after it decode with the device's event numbers.
    #[test]
    fn a_lost_chunk_is_a_reported_gap() {
        struct LoseSecond(Vec<u8>, u32);
        impl Write for LoseSecond {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.1 += 1;
                // Write 1 is the file header, 2 the first chunk, 3 the second.
                if self.1 == 3 {
                    return Err(io::Error::other("disk full, for a moment"));
                }
                self.0.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w =
            TraceWriter::with_clock(LoseSecond(vec![], 0), false, Clock::Count(0)).expect("w");
        for _ in 0..3 {
            w.event(&Event::Reset);
            w.event(&Event::Reset);
            let _ = w.flush();
        }
        let file = w.into_inner().expect("out").0;
        let mut seqs = vec![];
        let bad = reader::for_each_line(&file[..], |n, _| seqs.push(n - 1)).expect("read");
        assert_eq!(seqs, [0, 1, 4, 5]);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(bad[0].line, 3);
        assert!(
            bad[0].why.contains("1 chunk(s) missing, 2 event(s) lost"),
            "{}",
            bad[0].why
        );
    }
}
