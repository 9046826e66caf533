//! v1 JSON node + JSON DERP map readers and converters; see `proto::fuzzing::v1_json`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    proto::fuzzing::v1_json(data);
});
