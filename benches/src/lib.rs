//! Shared pieces of the benchmark suite: message fixtures, a fixed-memory latency histogram,
//! `/proc` readers for a server's CPU time and memory, and the load generator's workloads
//! ([`relay`], [`idle`], [`coord`]) used by the `loadgen` binary and, through it, by `compare`,
//! and the coordinator capacity search ([`capacity`]) `compare` runs.
//!
//! Why a crate of its own: benchmarks must only use the public APIs of `proto`, `derp` and
//! `coordinator`, exactly as an outside user would, so that they measure what ships. Nothing here
//! may assert anything about speed: figures are reported, never enforced.

pub mod capacity;
pub mod chart;
pub mod coord;
pub mod dialer;
pub mod fixtures;
pub mod hist;
pub mod idle;
pub mod process;
pub mod procfs;
pub mod relay;
