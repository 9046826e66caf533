//! Fuzz target `quic_mesh`: the QUIC mesh's control messages, packet units, datagrams and loss count; see `proto::fuzzing::quic_mesh`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    proto::fuzzing::quic_mesh(data);
});
