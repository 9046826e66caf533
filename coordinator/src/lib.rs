//! The Coder tailnet coordinator.
