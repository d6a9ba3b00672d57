// SPDX-License-Identifier: GPL-2.0

//! ioctl arguments: the extensible `/dev/zapguard` structures (uAPI 1.0's stability rules, in
//! `shared-regs`' `abi/uapi.rs`) and the fixed test_hmm ones.
//!
//! An extensible structure starts with the caller's `size`. [`read_ext`] reads it the way
//! `copy_struct_from_user()` does: at least the 1.0 size (`EINVAL`), at most
//! [`uapi::ZG_SIZE_MAX`] (`E2BIG`); the bytes the driver knows are copied and the rest of its
//! structure stays zero (an older caller); the bytes it does not know must be zero (a newer
//! caller), or the call fails with `E2BIG` and the driver's own size is written into `size`, as
//! `perf_event_open()` does. [`write_ext`] writes an answer back up to the caller's `size`.

use crate::abi::uapi::{self, Extensible};
use kernel::{
    prelude::*,
    transmute::{AsBytes, FromBytes},
    uaccess::{UserPtr, UserSlice, UserSliceReader},
};

/// `AsBytes` and `FromBytes` for uAPI structures.
macro_rules! plain_bytes {
    ($($t:ty),* $(,)?) => {$(
        // SAFETY: These uAPI structures are `repr(C)` and made only of integers laid out
        // without padding (their sizes are asserted in the ABI), so every byte is initialised
        // and any bytes are a valid value.
        unsafe impl AsBytes for $t {}
        // SAFETY: See above.
        unsafe impl FromBytes for $t {}
    )*};
}

plain_bytes!(
    uapi::ZgInfo,
    uapi::ZgMap,
    uapi::ZgDma,
    uapi::ZgSnapshot,
    uapi::ZgStats,
);

/// Reads the extensible argument at `arg` (see the module documentation).
pub(crate) fn read_ext<T: Extensible + Default + AsBytes + FromBytes>(arg: usize) -> Result<T> {
    let ptr = UserPtr::from_addr(arg);
    let size: u32 = UserSlice::new(ptr, 4).reader().read()?;
    let theirs = size as usize;
    let ours = core::mem::size_of::<T>();
    if theirs < T::SIZE_VER0 {
        return Err(EINVAL);
    }
    if theirs > uapi::ZG_SIZE_MAX {
        return Err(E2BIG);
    }
    let mut reader = UserSlice::new(ptr, theirs).reader();
    let mut v = T::default();
    reader.read_slice(&mut v.as_bytes_mut()[..theirs.min(ours)])?;
    if !rest_is_zero(&mut reader)? {
        // Best effort: the caller learns the size this driver knows (perf_event_open()'s way).
        let _ = UserSlice::new(ptr, 4).writer().write(&(ours as u32));
        return Err(E2BIG);
    }
    Ok(v)
}

/// Whether every byte left in `r` is zero.
fn rest_is_zero(r: &mut UserSliceReader) -> Result<bool> {
    let mut chunk = [0u8; 64];
    while !r.is_empty() {
        let n = r.len().min(chunk.len());
        r.read_slice(&mut chunk[..n])?;
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Writes `v` back to `arg`, up to the caller's `v.size()` bytes (which [`read_ext`] checked).
pub(crate) fn write_ext<T: Extensible + AsBytes>(arg: usize, v: &T) -> Result {
    let n = (v.size() as usize).min(core::mem::size_of::<T>());
    UserSlice::new(UserPtr::from_addr(arg), n)
        .writer()
        .write_slice(&v.as_bytes()[..n])
}

/// Answers an output-only extensible ioctl (`GET_INFO`, `STATS`): reads the caller's `size`,
/// then writes `answer` up to it.
pub(crate) fn answer_ext<T: Extensible + Default + AsBytes + FromBytes>(
    arg: usize,
    answer: impl FnOnce() -> Result<T>,
) -> Result {
    let theirs: T = read_ext(arg)?;
    let mut v = answer()?;
    v.set_size(theirs.size());
    write_ext(arg, &v)
}

/// Reads a fixed-size ioctl argument of type `T` (the test_hmm uAPI).
pub(crate) fn read_arg<T: FromBytes>(arg: usize) -> Result<T> {
    UserSlice::new(UserPtr::from_addr(arg), core::mem::size_of::<T>())
        .reader()
        .read()
}

/// Writes a fixed-size ioctl result of type `T` (the test_hmm uAPI).
pub(crate) fn write_arg<T: AsBytes>(arg: usize, v: &T) -> Result {
    UserSlice::new(UserPtr::from_addr(arg), core::mem::size_of::<T>())
        .writer()
        .write(v)
}
