//! proto's integration tests, one binary: each module exercises one wire format through the
//! public API only (the unit tests next to the code see the internals).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod derp_frames;
mod derp_handshake;
mod derp_info;
mod derp_key;
mod derpmap_json;
mod drpc_fuzz;
mod drpc_wire;
mod fuzz_corpus;
mod stun;
mod tailnet_proto;
mod v1_fuzz;
mod v1_node;
mod yamux_header;
