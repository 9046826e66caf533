//! Fuzz target `stun`: STUN binding request/response parsers; see `proto::fuzzing::stun`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    proto::fuzzing::stun(data);
});
