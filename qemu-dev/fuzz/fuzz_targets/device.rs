//! The device as a hostile guest sees it: see `qemu_dev::fuzzing` for the input format and the
//! invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qemu_dev::fuzzing::run(data);
});
