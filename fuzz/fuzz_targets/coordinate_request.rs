//! Fuzz target `coordinate_request`: protobuf CoordinateRequests applied to the peer graph; see `coordinator::fuzzing::coordinate_request`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coordinator::fuzzing::coordinate_request(data);
});
