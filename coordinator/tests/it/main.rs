//! The coordinator's integration tests, one binary: each module drives the public API (HTTP,
//! WebSocket, dRPC, the peer graph) the way a peer or coderd would. The shared harness lives in
//! `common` (an in-process coordinator and v1/v2 clients), `fake_coder` and `upstream_harness`
//! (a fake coderd and a sidecar in front of it) and `support` (metrics, refused dials).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod fake_coder;
mod support;
mod upstream_harness;

mod agent_rpc_forward;
mod agent_rpc_sidecar;
mod api_http;
mod bad_input;
mod bridge;
mod coordinate_v1;
mod coordinate_v2;
mod fanout;
mod graph_cases;
mod ha;
mod limits;
mod liveness;
mod pg_server;
mod rpc_drpc;
mod rpc_ws;
mod rpc_yamux;
mod upstream_auth;
mod upstream_fake;
mod upstream_proxy;
