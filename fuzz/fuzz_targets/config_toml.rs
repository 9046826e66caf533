//! Fuzz target `config_toml`: the TOML configuration file through the binary's settings
//! resolution, for every role; see `src/config/fuzzing.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The binary crate has no library target: its `src/config.rs` is compiled in here as it is,
// through the symlinks `config.rs` -> ../../src/config.rs and `config/` -> ../../src/config/ (so
// its own submodules resolve as in the binary). Its `fuzzing` submodule (built under
// `cfg(fuzzing)`, which cargo-fuzz sets, and in the binary's tests) holds the entry point the
// corpus replay test calls too.
#[allow(dead_code, unused_imports)]
mod config;

fuzz_target!(|data: &[u8]| {
    config::fuzzing::config_toml(data);
});
