//! The binary trace format (`trace.zgt`), shared by the device's writer
//! (`qemu-dev/src/trace.rs`) and this crate's reader.
//!
//! The device writes a record per event instead of a JSON line: formatting JSON on the DMA path
//! cost more than the copy. Every record decodes to exactly the JSON line the JSON Lines writer
//! writes for the same event (same fields, same order, same bytes), so every tool, test and
//! `grep` works on `zapguard-trace json TRACE` as on a JSON trace.
//!
//! All integers are little-endian and unaligned. A file is a [`FileHeader`], then records, each
//! starting with its kind byte; the kind fixes the record's length (an [`EVENT`] record is
//! followed by its JSON).
//!
//! | kind | record | bytes | meaning |
//! |---|---|---|---|
//! | [`CLOCK`] 0x01 | [`Clock`]: `t_ns` u64 | 9 | the time of the events that follow |
//! | [`EVENT`] 0x02 | [`EventHead`]: `len` u32, then `len` bytes | 5 + len | any event, as its JSON object without `t_ns` and `seq` (`{"kind":...}`) |
//! | [`JOB`] 0x03 | [`Job`]: `job` u64, `asid` u32 | 13 | the job and ASID of the `dma_access` records that follow |
//! | [`DMA_READ`] 0x10, [`DMA_WRITE`] 0x11 | [`Dma`]: `va` u64, `pa` u64, `len` u32, `id` u64 | 29 | `dma_access` with `write` false / true |
//! | [`FILL_RO`] 0x12, [`FILL_RW`] 0x13 | [`Fill`]: `asid` u32, `va` u64, `pa` u64, `len` u32, `id` u64 | 33 | `iotlb_fill` with `writable` false / true |
//! | [`EVICT`] 0x14 | [`Evict`]: `asid` u32, `va` u64, `len` u32, `id` u64 | 25 | `iotlb_evict` |
//!
//! An event's `seq` is its number among the event records (every kind but [`CLOCK`] and
//! [`JOB`]), from 0; its `t_ns` is that of the latest [`CLOCK`] (0 before any). The writer
//! reads the clock for every [`EVENT`], but only every few per-page records unless
//! [`FLAG_EXACT_TIME`] is set: a clock read costs as much as the record. A per-page event whose
//! `len` does not fit in 32 bits is written as an [`EVENT`].
//!
//! A record cut short at the end of the file (the device was killed while writing) is reported
//! by the reader as a bad last line, like a torn JSON line.

use std::fmt::Write as _;
use std::io::{self, Read};

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The first 8 bytes of a binary trace. A JSON trace starts with `{`, so the first byte tells.
pub const MAGIC: [u8; 8] = *b"ZGTRACE\n";
/// The format version this crate reads and writes.
pub const VERSION: u32 = 1;
/// [`FileHeader::flags`]: every event carries its own clock read.
pub const FLAG_EXACT_TIME: u32 = 1;

/// Record kinds (the first byte of every record).
pub const CLOCK: u8 = 0x01;
/// See the module table.
pub const EVENT: u8 = 0x02;
/// See the module table.
pub const JOB: u8 = 0x03;
/// See the module table.
pub const DMA_READ: u8 = 0x10;
/// See the module table.
pub const DMA_WRITE: u8 = 0x11;
/// See the module table.
pub const FILL_RO: u8 = 0x12;
/// See the module table.
pub const FILL_RW: u8 = 0x13;
/// See the module table.
pub const EVICT: u8 = 0x14;

/// The file header: [`MAGIC`], [`VERSION`], flags (`FLAG_*`).
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FileHeader {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`VERSION`].
    pub version: U32,
    /// `FLAG_*`.
    pub flags: U32,
}

impl FileHeader {
    /// The header of a file this crate's version writes.
    pub fn new(flags: u32) -> Self {
        Self {
            magic: MAGIC,
            version: VERSION.into(),
            flags: flags.into(),
        }
    }
}

/// [`CLOCK`].
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Clock {
    /// [`CLOCK`].
    pub kind: u8,
    /// Nanoseconds since the trace was opened.
    pub t_ns: U64,
}

/// [`EVENT`]: followed by `len` bytes of JSON.
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct EventHead {
    /// [`EVENT`].
    pub kind: u8,
    /// Bytes of JSON that follow.
    pub len: U32,
}

/// [`JOB`].
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Job {
    /// [`JOB`].
    pub kind: u8,
    /// DMA job id.
    pub job: U64,
    /// ASID.
    pub asid: U32,
}

/// [`DMA_READ`], [`DMA_WRITE`].
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Dma {
    /// [`DMA_READ`] or [`DMA_WRITE`].
    pub kind: u8,
    /// First VA accessed.
    pub va: U64,
    /// Guest-physical address accessed.
    pub pa: U64,
    /// Bytes.
    pub len: U32,
    /// Translation id.
    pub id: U64,
}

/// [`FILL_RO`], [`FILL_RW`].
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Fill {
    /// [`FILL_RO`] or [`FILL_RW`].
    pub kind: u8,
    /// ASID.
    pub asid: U32,
    /// First VA covered.
    pub va: U64,
    /// Guest-physical base.
    pub pa: U64,
    /// Bytes covered.
    pub len: U32,
    /// Translation id.
    pub id: U64,
}

/// [`EVICT`].
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Evict {
    /// [`EVICT`].
    pub kind: u8,
    /// ASID.
    pub asid: U32,
    /// First VA covered.
    pub va: U64,
    /// Bytes covered.
    pub len: U32,
    /// Translation id.
    pub id: U64,
}

/// The length of a record of `kind` (for [`EVENT`], of its head), or `None` for an unknown
/// kind.
pub fn record_len(kind: u8) -> Option<usize> {
    Some(match kind {
        CLOCK => size_of::<Clock>(),
        EVENT => size_of::<EventHead>(),
        JOB => size_of::<Job>(),
        DMA_READ | DMA_WRITE => size_of::<Dma>(),
        FILL_RO | FILL_RW => size_of::<Fill>(),
        EVICT => size_of::<Evict>(),
        _ => return None,
    })
}

/// Why decoding stopped before the end of the input.
#[derive(Debug)]
pub enum DecodeError {
    /// Reading failed.
    Io(io::Error),
    /// Not a trace this version reads, or a record that makes no sense (the rest cannot be
    /// framed).
    Bad(String),
    /// The input ends inside a record.
    Truncated(String),
}

impl From<io::Error> for DecodeError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Reads `buf.len()` bytes; `Ok(false)` if the input ended before the first of them, a
/// [`DecodeError::Truncated`] if it ended after.
fn fill(input: &mut impl Read, buf: &mut [u8], what: &str) -> Result<bool, DecodeError> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(DecodeError::Truncated(format!(
                    "{what} cut short: {got} of {} bytes (the device stopped while writing?)",
                    buf.len()
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// A streaming decoder: turns records back into the JSON lines they stand for.
pub struct Decoder<R> {
    input: R,
    /// Header flags.
    pub flags: u32,
    t_ns: u64,
    seq: u64,
    job: u64,
    asid: u32,
    rec: Vec<u8>,
    line: String,
}

impl<R: Read> Decoder<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<Self, DecodeError> {
        let mut h = [0u8; size_of::<FileHeader>()];
        if !fill(&mut input, &mut h, "file header")? {
            return Err(DecodeError::Truncated("empty file, no header".into()));
        }
        let h = FileHeader::read_from_bytes(&h).map_err(|_| DecodeError::Bad("header".into()))?;
        if h.magic != MAGIC {
            return Err(DecodeError::Bad("not a zapguard binary trace".into()));
        }
        if h.version.get() != VERSION {
            return Err(DecodeError::Bad(format!(
                "binary trace version {}, this tool reads {VERSION}",
                h.version.get()
            )));
        }
        Ok(Self {
            input,
            flags: h.flags.get(),
            t_ns: 0,
            seq: 0,
            job: 0,
            asid: 0,
            rec: Vec::with_capacity(64),
            line: String::with_capacity(320),
        })
    }

    /// Events decoded so far (the next one's `seq`).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The next event's JSON line (without its newline), or `None` at the end of the input.
    pub fn next_line(&mut self) -> Result<Option<&str>, DecodeError> {
        loop {
            let mut kind = [0u8];
            if !fill(&mut self.input, &mut kind, "record")? {
                return Ok(None);
            }
            let kind = kind[0];
            let len = record_len(kind).ok_or_else(|| {
                DecodeError::Bad(format!("unknown record kind {kind:#04x}: cannot go on"))
            })?;
            self.rec.clear();
            self.rec.resize(len, 0);
            self.rec[0] = kind;
            if !fill(&mut self.input, &mut self.rec[1..], "record")? {
                return Err(DecodeError::Truncated(format!(
                    "record of kind {kind:#04x} cut short after its kind byte"
                )));
            }
            let (t, s) = (self.t_ns, self.seq);
            self.line.clear();
            let l = &mut self.line;
            // Writing to a String cannot fail.
            let _ = match kind {
                CLOCK => {
                    let r = Clock::read_from_bytes(&self.rec).map_err(bad_len)?;
                    self.t_ns = r.t_ns.get();
                    continue;
                }
                JOB => {
                    let r = Job::read_from_bytes(&self.rec).map_err(bad_len)?;
                    (self.job, self.asid) = (r.job.get(), r.asid.get());
                    continue;
                }
                EVENT => {
                    let n = EventHead::read_from_bytes(&self.rec)
                        .map_err(bad_len)?
                        .len
                        .get() as usize;
                    let mut json = vec![0u8; n];
                    if !fill(&mut self.input, &mut json, "event JSON")? && n > 0 {
                        return Err(DecodeError::Truncated(
                            "event record cut short before its JSON".into(),
                        ));
                    }
                    let json = String::from_utf8(json)
                        .map_err(|_| DecodeError::Bad(format!("event {s}: JSON not UTF-8")))?;
                    let Some(rest) = json.strip_prefix('{').filter(|r| r.ends_with('}')) else {
                        return Err(DecodeError::Bad(format!("event {s}: not a JSON object")));
                    };
                    write!(l, "{{\"t_ns\":{t},\"seq\":{s},{rest}")
                }
                DMA_READ | DMA_WRITE => {
                    let r = Dma::read_from_bytes(&self.rec).map_err(bad_len)?;
                    write!(
                        l,
                        "{{\"t_ns\":{t},\"seq\":{s},\"kind\":\"dma_access\",\"job\":{},\"asid\":{},\
                         \"va\":{},\"pa\":{},\"len\":{},\"write\":{},\"id\":{}}}",
                        self.job,
                        self.asid,
                        r.va.get(),
                        r.pa.get(),
                        r.len.get(),
                        kind == DMA_WRITE,
                        r.id.get()
                    )
                }
                FILL_RO | FILL_RW => {
                    let r = Fill::read_from_bytes(&self.rec).map_err(bad_len)?;
                    write!(
                        l,
                        "{{\"t_ns\":{t},\"seq\":{s},\"kind\":\"iotlb_fill\",\"asid\":{},\"va\":{},\
                         \"pa\":{},\"len\":{},\"writable\":{},\"id\":{}}}",
                        r.asid.get(),
                        r.va.get(),
                        r.pa.get(),
                        r.len.get(),
                        kind == FILL_RW,
                        r.id.get()
                    )
                }
                EVICT => {
                    let r = Evict::read_from_bytes(&self.rec).map_err(bad_len)?;
                    write!(
                        l,
                        "{{\"t_ns\":{t},\"seq\":{s},\"kind\":\"iotlb_evict\",\"asid\":{},\"va\":{},\
                         \"len\":{},\"id\":{}}}",
                        r.asid.get(),
                        r.va.get(),
                        r.len.get(),
                        r.id.get()
                    )
                }
                _ => unreachable!("record_len knows only the kinds above"),
            };
            self.seq += 1;
            return Ok(Some(&self.line));
        }
    }
}

fn bad_len<E>(_: E) -> DecodeError {
    DecodeError::Bad("record length".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(records: &[&[u8]]) -> Vec<u8> {
        let mut f = FileHeader::new(0).as_bytes().to_vec();
        for r in records {
            f.extend_from_slice(r);
        }
        f
    }

    fn lines(f: &[u8]) -> (Vec<String>, Option<DecodeError>) {
        let mut d = match Decoder::new(f) {
            Ok(d) => d,
            Err(e) => return (vec![], Some(e)),
        };
        let mut out = vec![];
        loop {
            match d.next_line() {
                Ok(Some(l)) => out.push(l.to_string()),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[test]
    fn layouts_are_packed() {
        assert_eq!(size_of::<FileHeader>(), 16);
        assert_eq!(record_len(CLOCK), Some(9));
        assert_eq!(record_len(EVENT), Some(5));
        assert_eq!(record_len(JOB), Some(13));
        assert_eq!(record_len(DMA_WRITE), Some(29));
        assert_eq!(record_len(FILL_RW), Some(33));
        assert_eq!(record_len(EVICT), Some(25));
        assert_eq!(record_len(0), None);
    }

    #[test]
    fn records_decode_to_lines() {
        let clock = Clock {
            kind: CLOCK,
            t_ns: 77.into(),
        };
        let job = Job {
            kind: JOB,
            job: 5.into(),
            asid: 2.into(),
        };
        let dma = Dma {
            kind: DMA_WRITE,
            va: 0x1000.into(),
            pa: 0x2000.into(),
            len: 4096.into(),
            id: 9.into(),
        };
        let json = br#"{"kind":"reset"}"#;
        let head = EventHead {
            kind: EVENT,
            len: (json.len() as u32).into(),
        };
        let f = file(&[
            head.as_bytes(),
            json,
            clock.as_bytes(),
            job.as_bytes(),
            dma.as_bytes(),
        ]);
        let (l, err) = lines(&f);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(
            l,
            [
                r#"{"t_ns":0,"seq":0,"kind":"reset"}"#,
                r#"{"t_ns":77,"seq":1,"kind":"dma_access","job":5,"asid":2,"va":4096,"pa":8192,"len":4096,"write":true,"id":9}"#,
            ]
        );
    }

    #[test]
    fn a_cut_record_is_reported_not_a_panic() {
        let clock = Clock {
            kind: CLOCK,
            t_ns: 1.into(),
        };
        let whole = file(&[clock.as_bytes(), clock.as_bytes()]);
        for cut in 1..size_of::<Clock>() {
            let (l, err) = lines(&whole[..whole.len() - cut]);
            assert!(l.is_empty());
            assert!(matches!(err, Some(DecodeError::Truncated(_))), "{err:?}");
        }
        let (_, err) = lines(&whole[..10]);
        assert!(matches!(err, Some(DecodeError::Truncated(_))), "{err:?}");
        let (_, err) = lines(&file(&[&[0x7f]]));
        assert!(matches!(err, Some(DecodeError::Bad(_))), "{err:?}");
        let mut wrong = whole.clone();
        wrong[8] = 2;
        assert!(matches!(lines(&wrong).1, Some(DecodeError::Bad(_))));
    }
}
