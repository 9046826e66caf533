//! Fuzz target `v1_stream`: the v1 streaming JSON decoder fed in chunks; see `coordinator::fuzzing::v1_stream`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coordinator::fuzzing::v1_stream(data);
});
