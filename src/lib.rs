//! The `tailnetd` binary's configuration, as a library: every setting of every role declared
//! once (see [`config`]). It is a library target only so that the fuzz crate's `config_toml`
//! target resolves TOML files through exactly the code the binary runs; the binary itself
//! (`src/main.rs`) composes the relay and the coordinator.

pub mod config;
