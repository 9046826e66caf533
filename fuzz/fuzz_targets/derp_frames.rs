//! Fuzz target `derp_frames`: DERP frame stream: header rules, decode/encode round trip, in-place rewrites; see `proto::fuzzing::derp_frames`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    proto::fuzzing::derp_frames(data);
});
