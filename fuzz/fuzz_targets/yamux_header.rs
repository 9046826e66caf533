//! Fuzz target `yamux_header`: yamux 12-byte header codec over a byte stream; see `proto::fuzzing::yamux_header`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    proto::fuzzing::yamux_header(data);
});
