//! The `tailnetd` binary's integration tests, as one test binary: the binary as an operator
//! meets it (`cli`), relay admission across roles (`admission`), derper's command lines
//! (`derper_compat`) and the configuration examples an operator copies (`config_examples`), with
//! the shared process and HTTP helpers in `support`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod admission;
mod cli;
mod config_examples;
mod derper_compat;
mod limits;
mod metrics_addr;
mod operator;
mod region_health;
mod replicas;
mod support;
// The throwaway PostgreSQL server of the coordinator's replica tests.
#[path = "../../coordinator/tests/it/pg_server.rs"]
mod pg_server;
