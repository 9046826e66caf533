//! Wire formats spoken by tailnetd, kept pure so that every codec can be tested and fuzzed without
//! sockets, tasks or a clock. Anything that needs randomness (nonces, keys) takes it as an argument
//! or from the caller's RNG.
#![forbid(unsafe_code)]
pub mod agent;
pub mod tailnet;
pub mod key;
pub mod drpc;
pub mod v1;
pub mod yamux;
pub mod derp;
pub mod stun;
pub mod derpmap;
pub mod fuzzing;
