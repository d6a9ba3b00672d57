//! The binary trace format (`trace.zgt`), shared by the device's writer
//! (`zapguard-dev/src/trace.rs`) and the trace tool's reader (`zapguard-trace/src/reader.rs`).
//!
//! The device writes a record per event instead of a JSON line: formatting JSON on the DMA path
//! cost more than the copy. Every record decodes to exactly the JSON line the JSON Lines writer
//! writes for the same event (same fields, same order, same bytes), so every tool, test and
//! `grep` works on `zapguard-trace json TRACE` as on a JSON trace.
//!
//! All integers are little-endian and unaligned. A file is a [`FileHeader`] (magic, version,
//! feature flags), then chunks. A chunk is a [`ChunkHead`] and up to [`MAX_CHUNK_PAYLOAD`] bytes
//! of records; the head carries the chunk's number, the number of its first event, the clock
//! and the (job, ASID) in effect where it starts, its length and a CRC-32 of it all. So a
//! reader can check each chunk, report a missing one as a gap (with the number of events
//! lost), skip a corrupt one and resynchronise at the next chunk magic, counting what it
//! skipped, and still number every event after the damage as the device did.
//!
//! A record is a [`RecordHead`] (kind, body length) and its body, so a reader skips kinds it
//! does not know (a newer writer's) by their length. Kinds `0x01`-`0x0f` are state records
//! (not events: [`CLOCK`], [`JOB`], and future ones), every other kind is an event.
//!
//! | kind | record | body bytes | meaning |
//! |---|---|---|---|
//! | [`CLOCK`] 0x01 | [`Clock`]: `t_ns` u64 | 8 | the time of the events that follow |
//! | [`EVENT`] 0x02 | [`RecordHead`], then the JSON | len | any event, as its JSON object without `t_ns` and `seq` (`{"kind":...}`) |
//! | [`JOB`] 0x03 | [`Job`]: `job` u64, `asid` u32 | 12 | the job and ASID of the `dma_access` records that follow |
//! | [`DMA_READ`] 0x10, [`DMA_WRITE`] 0x11 | [`JudgedDma`]: `va` u64, `pa` u64, `len` u32, `id` u64, `facts` u8 (`FACT_*`), `cpu_pa` u64, `after_pa` u64 | 45 | `dma_access` with `write` false / true, judged, and the facts its verdict was made from |
//! | [`DMA_READ_UNJUDGED`] 0x15, [`DMA_WRITE_UNJUDGED`] 0x16 | [`Dma`]: `va` u64, `pa` u64, `len` u32, `id` u64 | 28 | the same, not judged (`judged` false, no facts) |
//! | [`FILL_RO`] 0x12, [`FILL_RW`] 0x13 | [`Fill`]: `asid` u32, `va` u64, `pa` u64, `len` u32, `id` u64 | 32 | `iotlb_fill` with `writable` false / true |
//! | [`EVICT`] 0x14 | [`Evict`]: `asid` u32, `va` u64, `len` u32, `id` u64 | 24 | `iotlb_evict` |
//!
//! An event's `seq` is its number among the events, from 0; its `t_ns` is that of the latest
//! [`CLOCK`] (or of its chunk's head). The writer reads the clock for every [`EVENT`], but only
//! every few per-page records unless [`FLAG_EXACT_TIME`] is set: a clock read costs as much as
//! the record. A per-page event whose `len` does not fit in 32 bits is written as an [`EVENT`].
//!
//! A chunk cut short at the end of the file (the device was killed while writing) is decoded
//! up to its last whole record and reported, like a torn JSON line.

use std::format;
use std::{string::String, vec::Vec};

use std::fmt::Write as _;
use std::io::{self, Read};

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The first 8 bytes of a binary trace. A JSON trace starts with `{`, so the first byte tells.
pub const MAGIC: [u8; 8] = *b"ZGTRACE\n";
/// The format version this crate reads and writes (version 1 had neither chunks nor record
/// lengths).
pub const VERSION: u32 = 2;
/// [`FileHeader::flags`]: every event carries its own clock read. Flags describe the trace;
/// none changes how it is framed (a change that does bumps [`VERSION`]).
pub const FLAG_EXACT_TIME: u32 = 1;
/// The first 4 bytes of every chunk, where a reader resynchronises after damage.
pub const CHUNK_MAGIC: [u8; 4] = *b"ZGCK";
/// The most record bytes one chunk may hold; a longer one is corrupt.
pub const MAX_CHUNK_PAYLOAD: usize = 4 << 20;
/// The most bytes a record's body may have (its length is a `u16`).
pub const MAX_RECORD_BODY: usize = u16::MAX as usize;

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
/// See the module table.
pub const DMA_READ_UNJUDGED: u8 = 0x15;
/// See the module table.
pub const DMA_WRITE_UNJUDGED: u8 = 0x16;

/// Whether records of `kind` are events (numbered), not state ([`CLOCK`], [`JOB`]).
pub fn is_event(kind: u8) -> bool {
    kind == EVENT || !(0x01..=0x0f).contains(&kind)
}

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

/// The head of a chunk of records.
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChunkHead {
    /// [`CHUNK_MAGIC`].
    pub magic: [u8; 4],
    /// The chunk's number, from 0.
    pub seq: U64,
    /// The `seq` of the chunk's first event (the number of events before it).
    pub first_event: U64,
    /// The time in effect where the chunk starts (that of the latest [`CLOCK`] before it).
    pub t_ns: U64,
    /// The job in effect where the chunk starts (that of the latest [`JOB`] before it).
    pub job: U64,
    /// Its ASID.
    pub asid: U32,
    /// Bytes of records that follow.
    pub len: U32,
    /// CRC-32 (IEEE) of the head before this field, then of the records.
    pub sum: U32,
}

/// Bytes of a [`ChunkHead`].
pub const CHUNK_HEAD_LEN: usize = size_of::<ChunkHead>();

/// Appends the head of chunk `seq` to `buf` (its length and checksum are set by
/// [`seal_chunk`]); the records follow it in `buf`.
pub fn begin_chunk(buf: &mut Vec<u8>, seq: u64, first_event: u64, t_ns: u64, job: (u64, u32)) {
    let head = ChunkHead {
        magic: CHUNK_MAGIC,
        seq: seq.into(),
        first_event: first_event.into(),
        t_ns: t_ns.into(),
        job: job.0.into(),
        asid: job.1.into(),
        len: 0.into(),
        sum: 0.into(),
    };
    buf.extend_from_slice(head.as_bytes());
}

/// Sets the length and checksum of the chunk `chunk` holds (its head, then its records).
/// `false` (and the chunk left as it is) if it is not one or too long.
pub fn seal_chunk(chunk: &mut [u8]) -> bool {
    let (head, records) = chunk.split_at_mut(CHUNK_HEAD_LEN.min(chunk.len()));
    let Ok(head) = ChunkHead::mut_from_bytes(head) else {
        return false;
    };
    if head.magic != CHUNK_MAGIC || records.len() > MAX_CHUNK_PAYLOAD {
        return false;
    }
    head.len = (records.len() as u32).into();
    head.sum = chunk_sum(head, records).into();
    true
}

/// The checksum of a chunk: its head up to `sum`, then its records.
fn chunk_sum(head: &ChunkHead, records: &[u8]) -> u32 {
    let covered = &head.as_bytes()[..CHUNK_HEAD_LEN - size_of::<U32>()];
    crc32_finish(crc32_update(crc32_update(!0, covered), records))
}

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`).
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32_finish(crc32_update(!0, bytes))
}

fn crc32_finish(state: u32) -> u32 {
    !state
}

/// Slicing-by-8 tables: `CRC_TABLES[0]` is the byte-at-a-time table, `CRC_TABLES[k]` advances
/// a byte through `k` more zero bytes.
const CRC_TABLES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
};

/// Feeds `bytes` to a CRC-32 whose state is `state` (`!0` to start), eight bytes a step (the
/// device's trace thread checksums every chunk: byte at a time it cost 68 ns per DMA record).
fn crc32_update(state: u32, bytes: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut words = bytes.chunks_exact(8);
    let mut c = state;
    for w in &mut words {
        let lo = u32::from_le_bytes([w[0], w[1], w[2], w[3]]) ^ c;
        let hi = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    words.remainder().iter().fold(c, |c, &b| {
        t[0][((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// The head of every record: its kind and the length of its body.
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RecordHead {
    /// The record's kind.
    pub kind: u8,
    /// Bytes of body that follow.
    pub len: U16,
}

impl RecordHead {
    /// The head of a fixed-size record `R` of `kind` (`R` starts with its head).
    const fn of<R>(kind: u8) -> Self {
        Self {
            kind,
            len: U16::new((size_of::<R>() - size_of::<RecordHead>()) as u16),
        }
    }

    /// The head of an [`EVENT`] record whose JSON is `len` bytes, if that fits.
    pub fn event(len: usize) -> Option<Self> {
        let len = u16::try_from(len).ok()?;
        Some(Self {
            kind: EVENT,
            len: len.into(),
        })
    }
}

/// [`CLOCK`].
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Clock {
    /// Kind and length.
    pub head: RecordHead,
    /// Nanoseconds since the trace was opened.
    pub t_ns: U64,
}

impl Clock {
    /// The record.
    pub fn new(t_ns: u64) -> Self {
        Self {
            head: RecordHead::of::<Self>(CLOCK),
            t_ns: t_ns.into(),
        }
    }
}

/// [`JOB`].
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Job {
    /// Kind and length.
    pub head: RecordHead,
    /// DMA job id.
    pub job: U64,
    /// ASID.
    pub asid: U32,
}

impl Job {
    /// The record.
    pub fn new(job: u64, asid: u32) -> Self {
        Self {
            head: RecordHead::of::<Self>(JOB),
            job: job.into(),
            asid: asid.into(),
        }
    }
}

/// [`DMA_READ`], [`DMA_WRITE`].
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Dma {
    /// Kind ([`DMA_READ`] or [`DMA_WRITE`]) and length.
    pub head: RecordHead,
    /// First VA accessed.
    pub va: U64,
    /// Guest-physical address accessed.
    pub pa: U64,
    /// Bytes.
    pub len: U32,
    /// Translation id.
    pub id: U64,
}

impl Dma {
    /// The record of an access the validator did not judge.
    pub fn new(write: bool, va: u64, pa: u64, len: u32, id: u64) -> Self {
        let kind = if write {
            DMA_WRITE_UNJUDGED
        } else {
            DMA_READ_UNJUDGED
        };
        Self {
            head: RecordHead::of::<Self>(kind),
            va: va.into(),
            pa: pa.into(),
            len: len.into(),
            id: id.into(),
        }
    }
}

/// What the validator saw of a judged access (the `dma_access` fields after `judged`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DmaFacts {
    /// The context entry said the address space was released.
    pub released: bool,
    /// The frame the CPU mapped before the bytes moved.
    pub cpu_pa: Option<u64>,
    /// That PTE was writable.
    pub cpu_w: bool,
    /// That PTE was dirty.
    pub cpu_d: bool,
    /// The translation was cached while the CPU PTE was dirty.
    pub fill_d: bool,
    /// A walk was made after the bytes moved.
    pub after: bool,
    /// The frame it found.
    pub after_pa: Option<u64>,
    /// That PTE was writable.
    pub after_w: bool,
}

/// [`JudgedDma::facts`] bits.
pub const FACT_RELEASED: u8 = 1 << 0;
/// `cpu_pa` holds a frame.
pub const FACT_CPU: u8 = 1 << 1;
/// See [`DmaFacts::cpu_w`].
pub const FACT_CPU_W: u8 = 1 << 2;
/// See [`DmaFacts::cpu_d`].
pub const FACT_CPU_D: u8 = 1 << 3;
/// See [`DmaFacts::fill_d`].
pub const FACT_FILL_D: u8 = 1 << 4;
/// See [`DmaFacts::after`].
pub const FACT_AFTER: u8 = 1 << 5;
/// `after_pa` holds a frame.
pub const FACT_AFTER_PA: u8 = 1 << 6;
/// See [`DmaFacts::after_w`].
pub const FACT_AFTER_W: u8 = 1 << 7;

/// [`DMA_READ`], [`DMA_WRITE`]: a judged access and the facts of its verdict.
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct JudgedDma {
    /// Kind ([`DMA_READ`] or [`DMA_WRITE`]) and length.
    pub head: RecordHead,
    /// First VA accessed.
    pub va: U64,
    /// Guest-physical address accessed.
    pub pa: U64,
    /// Bytes.
    pub len: U32,
    /// Translation id.
    pub id: U64,
    /// `FACT_*`.
    pub facts: u8,
    /// [`DmaFacts::cpu_pa`] (0 without [`FACT_CPU`]).
    pub cpu_pa: U64,
    /// [`DmaFacts::after_pa`] (0 without [`FACT_AFTER_PA`]).
    pub after_pa: U64,
}

impl JudgedDma {
    /// The record.
    pub fn new(write: bool, va: u64, pa: u64, len: u32, id: u64, f: &DmaFacts) -> Self {
        let bit = |on: bool, b: u8| if on { b } else { 0 };
        let facts = bit(f.released, FACT_RELEASED)
            | bit(f.cpu_pa.is_some(), FACT_CPU)
            | bit(f.cpu_w, FACT_CPU_W)
            | bit(f.cpu_d, FACT_CPU_D)
            | bit(f.fill_d, FACT_FILL_D)
            | bit(f.after, FACT_AFTER)
            | bit(f.after_pa.is_some(), FACT_AFTER_PA)
            | bit(f.after_w, FACT_AFTER_W);
        Self {
            head: RecordHead::of::<Self>(if write { DMA_WRITE } else { DMA_READ }),
            va: va.into(),
            pa: pa.into(),
            len: len.into(),
            id: id.into(),
            facts,
            cpu_pa: f.cpu_pa.unwrap_or(0).into(),
            after_pa: f.after_pa.unwrap_or(0).into(),
        }
    }

    /// The facts again.
    pub fn facts(&self) -> DmaFacts {
        let on = |b: u8| self.facts & b != 0;
        DmaFacts {
            released: on(FACT_RELEASED),
            cpu_pa: on(FACT_CPU).then(|| self.cpu_pa.get()),
            cpu_w: on(FACT_CPU_W),
            cpu_d: on(FACT_CPU_D),
            fill_d: on(FACT_FILL_D),
            after: on(FACT_AFTER),
            after_pa: on(FACT_AFTER_PA).then(|| self.after_pa.get()),
            after_w: on(FACT_AFTER_W),
        }
    }
}

/// [`FILL_RO`], [`FILL_RW`].
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Fill {
    /// Kind ([`FILL_RO`] or [`FILL_RW`]) and length.
    pub head: RecordHead,
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

impl Fill {
    /// The record.
    pub fn new(writable: bool, asid: u32, va: u64, pa: u64, len: u32, id: u64) -> Self {
        let kind = if writable { FILL_RW } else { FILL_RO };
        Self {
            head: RecordHead::of::<Self>(kind),
            asid: asid.into(),
            va: va.into(),
            pa: pa.into(),
            len: len.into(),
            id: id.into(),
        }
    }
}

/// [`EVICT`].
#[derive(Debug, Clone, Copy, IntoBytes, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Evict {
    /// Kind and length.
    pub head: RecordHead,
    /// ASID.
    pub asid: U32,
    /// First VA covered.
    pub va: U64,
    /// Bytes covered.
    pub len: U32,
    /// Translation id.
    pub id: U64,
}

impl Evict {
    /// The record.
    pub fn new(asid: u32, va: u64, len: u32, id: u64) -> Self {
        Self {
            head: RecordHead::of::<Self>(EVICT),
            asid: asid.into(),
            va: va.into(),
            len: len.into(),
            id: id.into(),
        }
    }
}

/// The length of a whole record of a fixed-size `kind` (head included), or `None` for
/// [`EVENT`] and for kinds this version does not know.
pub fn record_len(kind: u8) -> Option<usize> {
    Some(match kind {
        CLOCK => size_of::<Clock>(),
        JOB => size_of::<Job>(),
        DMA_READ | DMA_WRITE => size_of::<JudgedDma>(),
        DMA_READ_UNJUDGED | DMA_WRITE_UNJUDGED => size_of::<Dma>(),
        FILL_RO | FILL_RW => size_of::<Fill>(),
        EVICT => size_of::<Evict>(),
        _ => return None,
    })
}

/// Why a trace cannot be decoded at all (damage inside it is a [`Damage`]).
#[derive(Debug)]
pub enum DecodeError {
    /// Reading failed.
    Io(io::Error),
    /// Not a trace this version reads.
    Bad(String),
    /// The input ends inside the file header.
    Truncated(String),
}

impl From<io::Error> for DecodeError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Damage found inside a trace. Decoding goes on after each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// Chunks missing before the next good one, and the events they held.
    Gap {
        /// Chunks missing.
        chunks: u64,
        /// Events missing.
        events: u64,
    },
    /// Bytes skipped to resynchronise at the next good chunk, and why the first was bad.
    Corrupt {
        /// Bytes skipped.
        skipped: u64,
        /// What was wrong.
        why: String,
    },
    /// A record that makes no sense inside a good chunk (skipped by its length).
    BadRecord(String),
    /// The input ends inside a chunk (the device stopped while writing?).
    Truncated(String),
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gap { chunks, events } => {
                write!(f, "gap: {chunks} chunk(s) missing, {events} event(s) lost")
            }
            Self::Corrupt { skipped, why } => {
                write!(
                    f,
                    "corrupt: {why}; skipped {skipped} byte(s) to the next good chunk"
                )
            }
            Self::BadRecord(why) => write!(f, "bad record: {why}"),
            Self::Truncated(why) => write!(f, "{why}"),
        }
    }
}

/// Buffered input that can look ahead and give bytes back (to resynchronise).
struct Input<R> {
    r: R,
    buf: Vec<u8>,
    start: usize,
    eof: bool,
}

impl<R: Read> Input<R> {
    /// Makes at least `n` bytes available if the input has them; returns how many are.
    fn ensure(&mut self, n: usize) -> io::Result<usize> {
        if self.buf.len() - self.start < n && self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        while self.buf.len() - self.start < n && !self.eof {
            let have = self.buf.len();
            let want = (n - (have - self.start)).max(64 << 10);
            self.buf.resize(have + want, 0);
            match self.r.read(&mut self.buf[have..]) {
                Ok(0) => {
                    self.buf.truncate(have);
                    self.eof = true;
                }
                Ok(got) => self.buf.truncate(have + got),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.buf.truncate(have),
                Err(e) => {
                    self.buf.truncate(have);
                    return Err(e);
                }
            }
        }
        Ok(self.buf.len() - self.start)
    }

    fn peek(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
    }
}

/// A streaming decoder: turns records back into the JSON lines they stand for, checking every
/// chunk and collecting the [`Damage`] it finds (see [`Decoder::take_damage`]).
pub struct Decoder<R> {
    input: Input<R>,
    /// Header flags.
    pub flags: u32,
    t_ns: u64,
    seq: u64,
    job: u64,
    asid: u32,
    /// The current chunk's records, and how far they are decoded.
    records: Vec<u8>,
    at: usize,
    /// The current chunk was cut short by the end of the input: (bytes there, bytes announced).
    cut: Option<(usize, usize)>,
    /// The number the next chunk should have.
    next_chunk: u64,
    /// Bytes skipped since the last good chunk, and why the first was bad.
    skipping: Option<(u64, String)>,
    damage: Vec<(u64, Damage)>,
    /// Records of kinds this version does not know, skipped by their length.
    pub unknown_records: u64,
    /// Good chunks read.
    pub chunks: u64,
    line: String,
}

impl<R: Read> Decoder<R> {
    /// Reads and checks the header.
    pub fn new(r: R) -> Result<Self, DecodeError> {
        let mut input = Input {
            r,
            buf: Vec::new(),
            start: 0,
            eof: false,
        };
        let got = input.ensure(size_of::<FileHeader>())?;
        if got == 0 {
            return Err(DecodeError::Truncated("empty file, no header".into()));
        }
        let Ok((h, _)) = FileHeader::read_from_prefix(input.peek()) else {
            return Err(DecodeError::Truncated(format!(
                "file header cut short: {got} of {} bytes",
                size_of::<FileHeader>()
            )));
        };
        if h.magic != MAGIC {
            return Err(DecodeError::Bad("not a zapguard binary trace".into()));
        }
        if h.version.get() != VERSION {
            return Err(DecodeError::Bad(format!(
                "binary trace version {}, this tool reads {VERSION}",
                h.version.get()
            )));
        }
        input.consume(size_of::<FileHeader>());
        Ok(Self {
            input,
            flags: h.flags.get(),
            t_ns: 0,
            seq: 0,
            job: 0,
            asid: 0,
            records: Vec::new(),
            at: 0,
            cut: None,
            next_chunk: 0,
            skipping: None,
            damage: Vec::new(),
            unknown_records: 0,
            chunks: 0,
            line: String::with_capacity(320),
        })
    }

    /// Events decoded or lost so far (the next one's `seq`).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The damage found so far, each with the `seq` of the event after it; emptied.
    pub fn take_damage(&mut self) -> Vec<(u64, Damage)> {
        std::mem::take(&mut self.damage)
    }

    fn report(&mut self, d: Damage) {
        self.damage.push((self.seq, d));
    }

    /// Ends a resynchronisation: reports what it skipped.
    fn resynced(&mut self) {
        if let Some((skipped, why)) = self.skipping.take() {
            self.report(Damage::Corrupt { skipped, why });
        }
    }

    /// Skips the byte at the front and everything up to the next [`CHUNK_MAGIC`] (or the end).
    fn resync(&mut self, why: impl FnOnce() -> String) -> io::Result<()> {
        let mut skipped = 1;
        self.input.consume(1);
        loop {
            let n = self.input.ensure(CHUNK_MAGIC.len())?;
            if n < CHUNK_MAGIC.len() {
                self.input.consume(n);
                skipped += n as u64;
                break;
            }
            let p = self.input.peek();
            match p.windows(CHUNK_MAGIC.len()).position(|w| w == CHUNK_MAGIC) {
                Some(i) => {
                    self.input.consume(i);
                    skipped += i as u64;
                    break;
                }
                None => {
                    let keep = CHUNK_MAGIC.len() - 1;
                    let drop = p.len() - keep;
                    self.input.consume(drop);
                    skipped += drop as u64;
                    if self.input.eof {
                        self.input.consume(keep);
                        skipped += keep as u64;
                        break;
                    }
                }
            }
        }
        match &mut self.skipping {
            Some((total, _)) => *total += skipped,
            None => self.skipping = Some((skipped, why())),
        }
        Ok(())
    }

    /// Reads the next good chunk into `records`; `false` at the end of the input.
    fn next_chunk(&mut self) -> io::Result<bool> {
        loop {
            let avail = self.input.ensure(CHUNK_HEAD_LEN)?;
            if avail == 0 {
                self.resynced();
                return Ok(false);
            }
            let Ok((head, _)) = ChunkHead::read_from_prefix(self.input.peek()) else {
                if self.input.peek().starts_with(&CHUNK_MAGIC) || self.skipping.is_none() {
                    self.resynced();
                    self.report(Damage::Truncated(format!(
                        "chunk head cut short: {avail} of {CHUNK_HEAD_LEN} bytes (the device \
                         stopped while writing?)"
                    )));
                    self.input.consume(avail);
                    return Ok(false);
                }
                self.resync(String::new)?;
                continue;
            };
            let len = head.len.get() as usize;
            if head.magic != CHUNK_MAGIC || len > MAX_CHUNK_PAYLOAD {
                self.resync(|| {
                    if head.magic != CHUNK_MAGIC {
                        "no chunk magic where a chunk should start".into()
                    } else {
                        format!("chunk length {len} over {MAX_CHUNK_PAYLOAD}")
                    }
                })?;
                continue;
            }
            let avail = self.input.ensure(CHUNK_HEAD_LEN + len)?;
            let cut = avail < CHUNK_HEAD_LEN + len;
            let body = &self.input.peek()[CHUNK_HEAD_LEN..avail.min(CHUNK_HEAD_LEN + len)];
            if cut && body.windows(CHUNK_MAGIC.len()).any(|w| w == CHUNK_MAGIC) {
                // Not the end of a trace cut short: a length that runs over the next chunk.
                let n = head.seq.get();
                self.resync(|| format!("chunk {n}: its length runs past the next chunk"))?;
                continue;
            }
            if !cut && chunk_sum(&head, body) != head.sum.get() {
                let n = head.seq.get();
                self.resync(|| format!("chunk {n}: checksum mismatch"))?;
                continue;
            }
            self.records.clear();
            self.records.extend_from_slice(body);
            let taken = CHUNK_HEAD_LEN + self.records.len();
            self.input.consume(taken);
            self.at = 0;
            self.cut = cut.then_some((self.records.len(), len));
            self.start_chunk(&head);
            return Ok(true);
        }
    }

    /// Takes the state a good chunk starts with, and reports the chunks and events missing
    /// before it.
    fn start_chunk(&mut self, head: &ChunkHead) {
        self.resynced();
        let (n, first) = (head.seq.get(), head.first_event.get());
        if n != self.next_chunk || first != self.seq {
            let chunks = n.saturating_sub(self.next_chunk);
            let events = first.saturating_sub(self.seq);
            if n < self.next_chunk || first < self.seq {
                self.report(Damage::BadRecord(format!(
                    "chunk {n} (first event {first}) after chunk {} (event {}): out of order",
                    self.next_chunk.saturating_sub(1),
                    self.seq
                )));
            } else {
                self.report(Damage::Gap { chunks, events });
            }
        }
        self.next_chunk = n + 1;
        self.seq = first;
        self.t_ns = head.t_ns.get();
        (self.job, self.asid) = (head.job.get(), head.asid.get());
        self.chunks += 1;
    }

    /// The next event's `seq` and JSON line (without its newline), or `None` at the end of the
    /// input. Damage found on the way is kept for [`Self::take_damage`].
    pub fn next_line(&mut self) -> io::Result<Option<(u64, &str)>> {
        loop {
            if self.at >= self.records.len() {
                if let Some((got, want)) = self.cut.take() {
                    self.report(Damage::Truncated(format!(
                        "last chunk cut short: {got} of {want} bytes (the device stopped while \
                         writing?)"
                    )));
                }
                if !self.next_chunk()? {
                    return Ok(None);
                }
                continue;
            }
            if self.decode_record()? {
                return Ok(Some((self.seq - 1, &self.line)));
            }
        }
    }

    /// Decodes the record at `at` into `line`; `true` if it is an event.
    fn decode_record(&mut self) -> io::Result<bool> {
        let rest = &self.records[self.at..];
        let Ok((head, _)) = RecordHead::read_from_prefix(rest) else {
            return Ok(self.cut_record(rest.len()));
        };
        let (kind, blen) = (head.kind, head.len.get() as usize);
        let whole = size_of::<RecordHead>() + blen;
        if rest.len() < whole {
            return Ok(self.cut_record(rest.len()));
        }
        let rec = &rest[..whole];
        self.at += whole;
        let (t, s) = (self.t_ns, self.seq);
        if is_event(kind) {
            self.seq += 1;
        }
        if record_len(kind).is_some_and(|n| n != whole) {
            self.report(Damage::BadRecord(format!(
                "a record of kind {kind:#04x} with {blen} body bytes"
            )));
            return Ok(false);
        }
        self.line.clear();
        let l = &mut self.line;
        // Writing to a String cannot fail.
        let _ = match kind {
            CLOCK => {
                self.t_ns = Clock::read_from_bytes(rec).map_or(t, |r| r.t_ns.get());
                return Ok(false);
            }
            JOB => {
                if let Ok(r) = Job::read_from_bytes(rec) {
                    (self.job, self.asid) = (r.job.get(), r.asid.get());
                }
                return Ok(false);
            }
            EVENT => {
                let json = &rec[size_of::<RecordHead>()..];
                let object = std::str::from_utf8(json)
                    .ok()
                    .and_then(|j| j.strip_prefix('{'))
                    .filter(|r| r.ends_with('}'));
                let Some(rest) = object else {
                    self.report(Damage::BadRecord(format!(
                        "event {s}: not a JSON object in UTF-8"
                    )));
                    return Ok(false);
                };
                write!(l, "{{\"t_ns\":{t},\"seq\":{s},{rest}")
            }
            DMA_READ | DMA_WRITE | DMA_READ_UNJUDGED | DMA_WRITE_UNJUDGED => {
                let (judged, r, f) = if matches!(kind, DMA_READ | DMA_WRITE) {
                    let Ok(r) = JudgedDma::read_from_bytes(rec) else {
                        return Ok(false);
                    };
                    let d = (r.va.get(), r.pa.get(), r.len.get(), r.id.get());
                    (true, d, r.facts())
                } else {
                    let Ok(r) = Dma::read_from_bytes(rec) else {
                        return Ok(false);
                    };
                    let d = (r.va.get(), r.pa.get(), r.len.get(), r.id.get());
                    (false, d, DmaFacts::default())
                };
                write!(
                    l,
                    "{{\"t_ns\":{t},\"seq\":{s},\"kind\":\"dma_access\",\"job\":{},\"asid\":{},\
                     \"va\":{},\"pa\":{},\"len\":{},\"write\":{},\"id\":{},\"judged\":{judged},\
                     \"released\":{},\"cpu_pa\":{},\"cpu_w\":{},\"cpu_d\":{},\"fill_d\":{},\
                     \"after\":{},\"after_pa\":{},\"after_w\":{}}}",
                    self.job,
                    self.asid,
                    r.0,
                    r.1,
                    r.2,
                    matches!(kind, DMA_WRITE | DMA_WRITE_UNJUDGED),
                    r.3,
                    f.released,
                    OrNull(f.cpu_pa),
                    f.cpu_w,
                    f.cpu_d,
                    f.fill_d,
                    f.after,
                    OrNull(f.after_pa),
                    f.after_w,
                )
            }
            FILL_RO | FILL_RW => {
                let Ok(r) = Fill::read_from_bytes(rec) else {
                    return Ok(false);
                };
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
                let Ok(r) = Evict::read_from_bytes(rec) else {
                    return Ok(false);
                };
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
            _ => {
                // A newer writer's kind: skipped by its length.
                self.unknown_records += 1;
                return Ok(false);
            }
        };
        Ok(true)
    }

    /// A record that runs past the end of its chunk's bytes (`left` of them remain): cut by the
    /// end of the input, or corrupt. Either way the rest of the chunk is dropped.
    fn cut_record(&mut self, left: usize) -> bool {
        self.at = self.records.len();
        let d = match self.cut.take() {
            Some((got, want)) => Damage::Truncated(format!(
                "record cut short: the last chunk has {got} of {want} bytes (the device stopped \
                 while writing?)"
            )),
            None => Damage::BadRecord(format!(
                "{left} byte(s) at the end of a chunk are no record"
            )),
        };
        self.report(d);
        false
    }
}

/// A number, or `null`, as JSON writes an `Option<u64>`.
struct OrNull(Option<u64>);

impl std::fmt::Display for OrNull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("null"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{string::ToString, vec};

    type Decoded = (Vec<String>, Vec<(u64, Damage)>, u64);

    /// Chunk `seq` whose first event is `first`, holding `records`.
    fn chunk(seq: u64, first: u64, records: &[Vec<u8>]) -> Vec<u8> {
        let mut c = Vec::new();
        begin_chunk(&mut c, seq, first, 0, (0, 0));
        for r in records {
            c.extend_from_slice(r);
        }
        assert!(seal_chunk(&mut c));
        c
    }

    fn file(chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut f = FileHeader::new(0).as_bytes().to_vec();
        for c in chunks {
            f.extend_from_slice(c);
        }
        f
    }

    fn event(json: &str) -> Vec<u8> {
        let mut r = RecordHead::event(json.len())
            .expect("short")
            .as_bytes()
            .to_vec();
        r.extend_from_slice(json.as_bytes());
        r
    }

    /// A chunk of two `reset`-like events named `c<seq>e0` and `c<seq>e1`.
    fn two_events(seq: u64) -> Vec<u8> {
        let e = |i| event(&format!(r#"{{"kind":"c{seq}e{i}"}}"#));
        chunk(seq, 2 * seq, &[e(0), e(1)])
    }

    fn decode(f: &[u8]) -> Decoded {
        let mut d = Decoder::new(f).expect("header");
        let mut out = vec![];
        while let Some((seq, l)) = d.next_line().expect("read") {
            assert!(l.contains(&format!("\"seq\":{seq},")), "{l}");
            out.push(l.to_string());
        }
        (out, d.take_damage(), d.unknown_records)
    }

    fn kinds(lines: &[String]) -> Vec<String> {
        lines
            .iter()
            .map(|l| {
                l.rsplit("\"kind\":\"")
                    .next()
                    .unwrap_or("")
                    .trim_end_matches("\"}")
                    .into()
            })
            .collect()
    }

    #[test]
    fn layouts_are_packed() {
        assert_eq!(size_of::<FileHeader>(), 16);
        assert_eq!(CHUNK_HEAD_LEN, 48);
        assert_eq!(record_len(CLOCK), Some(11));
        assert_eq!(record_len(JOB), Some(15));
        assert_eq!(record_len(FILL_RW), Some(35));
        assert_eq!(record_len(EVICT), Some(27));
        assert_eq!(record_len(EVENT), None);
        assert_eq!(record_len(0), None);
        assert_eq!(Dma::new(true, 0, 0, 0, 0).head.len.get(), 28);
        assert_eq!(record_len(DMA_WRITE_UNJUDGED), Some(31));
        assert_eq!(record_len(DMA_WRITE), Some(48));
        let f = DmaFacts {
            released: false,
            cpu_pa: Some(0x2000),
            cpu_w: true,
            cpu_d: false,
            fill_d: true,
            after: true,
            after_pa: None,
            after_w: false,
        };
        assert_eq!(JudgedDma::new(true, 1, 2, 3, 4, &f).facts(), f);
        assert!(RecordHead::event(MAX_RECORD_BODY).is_some());
        assert!(RecordHead::event(MAX_RECORD_BODY + 1).is_none());
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        // Eight bytes a step agrees with a byte at a time, at every length and split.
        let data: Vec<u8> = (0..100u32).map(|i| (i * 37 + 11) as u8).collect();
        let slow = |b: &[u8]| {
            !b.iter().fold(!0u32, |c, &x| {
                CRC_TABLES[0][((c ^ u32::from(x)) & 0xff) as usize] ^ (c >> 8)
            })
        };
        for n in 0..data.len() {
            assert_eq!(crc32(&data[..n]), slow(&data[..n]), "length {n}");
            let split = crc32_finish(crc32_update(
                crc32_update(!0, &data[..n / 3]),
                &data[n / 3..n],
            ));
            assert_eq!(split, slow(&data[..n]), "length {n} split");
        }
    }

    #[test]
    fn records_decode_to_lines() {
        let clean = DmaFacts {
            cpu_pa: Some(0x2000),
            cpu_w: true,
            after: true,
            after_pa: Some(0x2000),
            after_w: true,
            ..DmaFacts::default()
        };
        let f = file(&[chunk(
            0,
            0,
            &[
                event(r#"{"kind":"reset"}"#),
                Clock::new(77).as_bytes().to_vec(),
                Job::new(5, 2).as_bytes().to_vec(),
                JudgedDma::new(true, 0x1000, 0x2000, 4096, 9, &clean)
                    .as_bytes()
                    .to_vec(),
                Dma::new(false, 0x1000, 0x2000, 4096, 9).as_bytes().to_vec(),
            ],
        )]);
        let (l, damage, _) = decode(&f);
        assert!(damage.is_empty(), "{damage:?}");
        assert_eq!(
            l,
            [
                r#"{"t_ns":0,"seq":0,"kind":"reset"}"#,
                r#"{"t_ns":77,"seq":1,"kind":"dma_access","job":5,"asid":2,"va":4096,"pa":8192,"len":4096,"write":true,"id":9,"judged":true,"released":false,"cpu_pa":8192,"cpu_w":true,"cpu_d":false,"fill_d":false,"after":true,"after_pa":8192,"after_w":true}"#,
                r#"{"t_ns":77,"seq":2,"kind":"dma_access","job":5,"asid":2,"va":4096,"pa":8192,"len":4096,"write":false,"id":9,"judged":false,"released":false,"cpu_pa":null,"cpu_w":false,"cpu_d":false,"fill_d":false,"after":false,"after_pa":null,"after_w":false}"#,
            ]
        );
    }

    /// A chunk starts with the clock and job in effect, so it decodes alone.
    #[test]
    fn a_chunk_carries_its_clock_and_job() {
        let mut c = Vec::new();
        begin_chunk(&mut c, 0, 7, 500, (3, 4));
        c.extend_from_slice(Dma::new(false, 1, 2, 3, 4).as_bytes());
        assert!(seal_chunk(&mut c));
        let (l, damage, _) = decode(&file(&[c]));
        assert_eq!(
            l,
            [
                r#"{"t_ns":500,"seq":7,"kind":"dma_access","job":3,"asid":4,"va":1,"pa":2,"len":3,"write":false,"id":4,"judged":false,"released":false,"cpu_pa":null,"cpu_w":false,"cpu_d":false,"fill_d":false,"after":false,"after_pa":null,"after_w":false}"#
            ]
        );
        assert_eq!(
            damage,
            [(
                0,
                Damage::Gap {
                    chunks: 0,
                    events: 7
                }
            )]
        );
    }

    #[test]
    fn a_missing_chunk_is_a_gap_and_numbering_goes_on() {
        let f = file(&[two_events(0), two_events(2)]);
        let (l, damage, _) = decode(&f);
        assert_eq!(kinds(&l), ["c0e0", "c0e1", "c2e0", "c2e1"]);
        assert!(l[2].contains("\"seq\":4,"), "{}", l[2]);
        assert_eq!(
            damage,
            [(
                2,
                Damage::Gap {
                    chunks: 1,
                    events: 2
                }
            )]
        );
    }

    #[test]
    fn a_corrupt_chunk_is_skipped_counted_and_its_events_lost() {
        let (c0, mut c1, c2) = (two_events(0), two_events(1), two_events(2));
        let n1 = c1.len() as u64;
        let last = c1.len() - 3;
        c1[last] ^= 0x20;
        let (l, damage, _) = decode(&file(&[c0, c1, c2]));
        assert_eq!(kinds(&l), ["c0e0", "c0e1", "c2e0", "c2e1"]);
        assert_eq!(damage.len(), 2, "{damage:?}");
        match &damage[0] {
            (2, Damage::Corrupt { skipped, why }) => {
                assert_eq!(*skipped, n1);
                assert!(why.contains("chunk 1: checksum mismatch"), "{why}");
            }
            d => panic!("{d:?}"),
        }
        assert_eq!(
            damage[1],
            (
                2,
                Damage::Gap {
                    chunks: 1,
                    events: 2
                }
            )
        );
    }

    #[test]
    fn garbage_between_chunks_is_skipped_and_counted() {
        let mut f = file(&[two_events(0)]);
        f.extend_from_slice(&[0xab; 100]);
        f.extend_from_slice(&two_events(1));
        let (l, damage, _) = decode(&f);
        assert_eq!(kinds(&l), ["c0e0", "c0e1", "c1e0", "c1e1"]);
        assert!(
            matches!(&damage[..], [(2, Damage::Corrupt { skipped: 100, .. })]),
            "{damage:?}"
        );
    }

    #[test]
    fn a_chunk_length_over_the_bound_is_corrupt() {
        let mut c1 = two_events(1);
        c1[40..44].copy_from_slice(&(MAX_CHUNK_PAYLOAD as u32 + 1).to_le_bytes());
        let (l, damage, _) = decode(&file(&[two_events(0), c1, two_events(2)]));
        assert_eq!(kinds(&l), ["c0e0", "c0e1", "c2e0", "c2e1"]);
        match &damage[0] {
            (_, Damage::Corrupt { why, .. }) => assert!(why.contains("over"), "{why}"),
            d => panic!("{d:?}"),
        }
    }

    /// A newer writer's kinds are skipped by their length: state kinds do not count as
    /// events, others do.
    #[test]
    fn unknown_kinds_are_skipped_by_length() {
        let unknown = |kind: u8, body: usize| {
            let mut r = vec![kind];
            r.extend_from_slice(&(body as u16).to_le_bytes());
            r.resize(3 + body, 0xee);
            r
        };
        let f = file(&[chunk(
            0,
            0,
            &[
                unknown(0x05, 9),
                event(r#"{"kind":"a"}"#),
                unknown(0x40, 300),
                event(r#"{"kind":"b"}"#),
            ],
        )]);
        let (l, damage, unknown) = decode(&f);
        assert!(damage.is_empty(), "{damage:?}");
        assert_eq!(unknown, 2);
        assert!(
            l[0].contains("\"seq\":0,") && l[1].contains("\"seq\":2,"),
            "{l:?}"
        );
    }

    #[test]
    fn a_known_kind_with_the_wrong_length_is_reported_and_skipped() {
        let mut bad = Clock::new(5).as_bytes().to_vec();
        bad[1] = 4;
        bad.truncate(7);
        let f = file(&[chunk(0, 0, &[bad, event(r#"{"kind":"a"}"#)])]);
        let (l, damage, _) = decode(&f);
        assert_eq!(kinds(&l), ["a"]);
        assert!(
            matches!(&damage[..], [(0, Damage::BadRecord(_))]),
            "{damage:?}"
        );
    }

    #[test]
    fn a_cut_trace_is_reported_not_a_panic() {
        let whole = file(&[two_events(0), two_events(1)]);
        let second = size_of::<FileHeader>() + two_events(0).len();
        for end in second + 1..whole.len() {
            let (l, damage, _) = decode(&whole[..end]);
            assert_eq!(&kinds(&l)[..2], ["c0e0", "c0e1"], "cut at {end}");
            assert_eq!(damage.len(), 1, "cut at {end}: {damage:?}");
            assert!(matches!(damage[0].1, Damage::Truncated(_)), "{damage:?}");
        }
        assert!(matches!(
            Decoder::new(&whole[..10]),
            Err(DecodeError::Truncated(_))
        ));
        let mut wrong = whole.clone();
        wrong[8] = 1;
        assert!(matches!(Decoder::new(&wrong[..]), Err(DecodeError::Bad(_))));
    }

    /// Any single corrupt byte: no panic, an end, the damage reported, and every event of the
    /// chunks it did not touch decoded.
    #[test]
    fn any_corrupt_byte_costs_at_most_its_chunk() {
        let chunks: Vec<Vec<u8>> = (0..4).map(two_events).collect();
        let whole = file(&chunks);
        let head = size_of::<FileHeader>();
        let mut start = head;
        for (n, c) in chunks.iter().enumerate() {
            for i in start..start + c.len() {
                let mut f = whole.clone();
                f[i] ^= 0x5a;
                let (l, damage, _) = decode(&f);
                let want: Vec<String> = (0..4)
                    .filter(|&m| m != n)
                    .flat_map(|m| [format!("c{m}e0"), format!("c{m}e1")])
                    .collect();
                let got = kinds(&l);
                for w in &want {
                    assert!(got.contains(w), "byte {i}: {w} missing from {got:?}");
                }
                assert!(!damage.is_empty(), "byte {i}: no damage reported");
            }
            start += c.len();
        }
    }
}
