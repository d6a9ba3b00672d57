//! Reading zapguard device traces (written by `zapguard-dev`: binary, see [`format`], or JSON
//! Lines; schema in `zapguard-dev/src/trace.rs`) as a stream: traces can be larger than memory, so
//! every tool here looks at one event at a time and keeps only aggregates. Every tool reads
//! both formats: a binary record is decoded to the JSON line it stands for.
//!
//! - [`format`]: the binary format's record layouts and its decoder.
//! - [`reader`]: line-numbered events, malformed lines reported and skipped.
//! - [`summary`]: per-ASID and overall counts, SYNC latency distribution.
//! - [`filter`]: select events by ASID, kind, VA range, time window, command position.
//! - [`check`]: re-verify the device's invariants offline.
//! - [`perfetto`]: export a Chrome/Perfetto timeline.
//! - [`svg`]: draw a window of that timeline as an SVG.

pub mod check;
mod cmdq;
pub mod filter;
/// The binary record format, defined with the ABI (`shared-regs`): the device writes it, this
/// crate reads it.
pub use shared_regs::trace_format as format;
pub mod perfetto;
pub mod reader;
pub mod summary;
pub mod svg;

use serde_json::Value;

/// An unsigned field of an event.
pub fn field_u64(v: &Value, key: &str) -> Option<u64> {
    v.get(key)?.as_u64()
}

/// A string field of an event.
pub fn field_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key)?.as_str()
}

/// An event's `kind` ("" if absent; the reader rejects such lines).
pub fn kind(v: &Value) -> &str {
    field_str(v, "kind").unwrap_or("")
}
