//! Fuzz target `v1_json`: v1 JSON node stream and its protobuf conversion; see `proto::fuzzing::v1_json`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    proto::fuzzing::v1_json(data);
});
