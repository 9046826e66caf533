//! Fuzz target `derp_handshake`: DERP handshake payloads: ServerKey, sealed ClientInfo/ServerInfo, their JSON; see `proto::fuzzing::derp_handshake`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    proto::fuzzing::derp_handshake(data);
});
