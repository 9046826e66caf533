//! Fuzz target `yamux_session`: a whole yamux server session fed arbitrary bytes; see `coordinator::fuzzing::yamux_session`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coordinator::fuzzing::yamux_session(data);
});
