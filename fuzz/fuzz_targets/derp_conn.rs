//! Fuzz target `derp_conn`: a DERP server connection driven by arbitrary client bytes after a valid handshake; see `derp::fuzzing::derp_conn`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    derp::fuzzing::derp_conn(data);
});
