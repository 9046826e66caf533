//! Fuzz target `drpc`: dRPC frame parser + packet reassembler; see `proto::fuzzing::drpc`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    proto::fuzzing::drpc(data);
});
