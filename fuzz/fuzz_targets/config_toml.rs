//! Fuzz target `config_toml`: the TOML configuration file through the binary's settings
//! resolution, for every role; see `src/config/fuzzing.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

// `tailnetd::config::fuzzing` is built under `cfg(fuzzing)`, which cargo-fuzz sets for every
// crate, and in the binary's tests, which replay this target's corpus through it.
fuzz_target!(|data: &[u8]| {
    tailnetd::config::fuzzing::config_toml(data);
});
