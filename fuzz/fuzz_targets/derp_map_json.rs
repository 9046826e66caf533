//! Fuzz target `derp_map_json`: JSON DERP map reader and its protobuf conversion; see `proto::fuzzing::derp_map_json`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    proto::fuzzing::derp_map_json(data);
});
