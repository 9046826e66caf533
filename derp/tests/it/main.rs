//! The derp crate's integration tests, one binary. `core_*` modules drive a real `Server` over
//! loopback TCP without HTTP; `edge_*` modules go through listeners, the HTTP edge, TLS and STUN.
//! `cargo test -p derp core_` (or `edge_`) selects one side. [`harness`] holds what they share.
//!
//! The memory tests (`core_memory`, `edge_memory`) are binaries of their own: they measure the
//! resident set of their process, which other tests running alongside would distort.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

mod core_admission;
mod core_bad_input;
mod core_dup_mesh;
mod core_mesh_routes;
mod core_rate_limit;
mod core_relay;
mod core_throughput;
mod edge_http;
mod edge_keyfile;
mod edge_mesh;
mod edge_quic_mesh;
mod edge_relay;
mod edge_start;
mod edge_stun;
mod edge_tls;
