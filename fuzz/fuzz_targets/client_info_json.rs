//! Fuzz target `client_info_json`: ClientInfo/ServerInfo JSON readers; see `proto::fuzzing::client_info_json`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    proto::fuzzing::client_info_json(data);
});
