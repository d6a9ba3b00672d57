//! The device as a hostile guest sees it: see `zapguard_model::fuzzing` for the input format and the
//! invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    zapguard_model::fuzzing::run(data);
});
