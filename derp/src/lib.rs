//! The DERP relay: server, client and STUN.
//!
//! Three parts, each a directory:
//! - [`core`]: the relay itself, independent of HTTP and TLS: the [`Server`] that takes a byte
//!   stream through the DERP handshake, one task per connection, the key → connection registry,
//!   per-connection send queues, admission and metrics.
//! - [`edge`]: what faces the network in front of the core: listeners, the HTTP edge (DERP
//!   upgrade, WebSocket, fast start), TLS with certificate reload and the meta cert, STUN, the
//!   key files and the operator-facing [`EdgeConfig`]. The coordinator-only role uses the
//!   listener, HTTP edge and TLS too, without a relay behind them.
//! - [`client`]: a DERP client over any byte stream, and [`client::dial`] to reach a server by
//!   URL the way Go clients do.
//! - [`mesh`]: the outbound mesh links, derper's mesh client: one DERP client per peer relay
//!   that learns the peer's keys (WatchConns) and carries ForwardPacket frames to it. The
//!   routes and forward queues they serve are in the core ([`core::mesh`]).
//!
//! The re-exports below are what the binary, the benchmarks and the tests use most.
pub mod client;
pub mod core;
pub mod edge;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod mesh;

pub use client::dial::{dial, DialError, DialOptions, Dialed};
pub use client::{Client, ClientError, ClientOptions, ClientReader, ClientWriter, ReceivedFrame};
pub use core::admission::{Admission, AdmitAll, AdmitFn, Decision, KnownKeys};
pub use core::rate::RateConfig;
pub use core::server::{
    ClientSnapshot, ConnInfo, DropCount, MeshPeerSnapshot, QueueDepth, RelaySnapshot, Server,
    ServerConfig, ServerError,
};
pub use edge::config::EdgeConfig;
pub use edge::http::{ConnScheme, DerpHandler, HttpEdge};
