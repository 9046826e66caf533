//! Shared fixtures for benchmarks and the load generator.
