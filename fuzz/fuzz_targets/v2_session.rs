//! Fuzz target `v2_session`: a v2 coordinator session (WebSocket, yamux, dRPC, Tailnet service) driven by arbitrary bytes; see `coordinator::fuzzing::v2_session`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coordinator::fuzzing::v2_session(data);
});
