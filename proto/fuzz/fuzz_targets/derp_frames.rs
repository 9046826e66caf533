//! Fuzz target: arbitrary bytes into `proto::fuzzing::derp_frames`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    proto::fuzzing::derp_frames(data);
});
