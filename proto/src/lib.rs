//! Wire formats spoken by tailnetd, kept pure so that every codec can be tested and fuzzed without
//! sockets, tasks or a clock. Anything that needs randomness (nonces, keys) takes it as an argument
//! or from the caller's RNG.
#![forbid(unsafe_code)]
pub mod agent;
pub mod derp;
pub mod derpmap;
pub mod drpc;
pub mod fuzzing;
pub mod key;
pub mod stun;
pub mod tailnet;
pub mod v1;
pub mod yamux;
