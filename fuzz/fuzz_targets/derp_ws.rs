//! Fuzz target `derp_ws`: raw client bytes into DERP-over-WebSocket (WsByteStream) into the DERP server; see `derp::fuzzing::derp_ws`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    derp::fuzzing::derp_ws(data);
});
