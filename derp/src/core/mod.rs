//! The relay core: DERP connections after the byte stream is established, independent of how it
//! arrived (TCP, TLS, WebSocket; see [`crate::edge`]).
//!
//! Why it is one part: everything on the packet path lives here and nothing here knows HTTP or
//! TLS. [`server`] runs the handshake and hands each connection to `conn`, one task per
//! connection that reads, relays and writes; [`registry`] maps keys to connections; `queue` is
//! the bounded queue other connections push into; `handle` is the part of a connection the
//! others reach; [`mesh`] is a mesh peer as the packet path sees it (a bounded forward queue and
//! the keys it announced), whatever link carries it. [`admission`] decides who may connect,
//! [`rate`] how fast a client may send, and [`metrics`] counts it all.
//!
//! Dependencies point one way: `server` → `conn` → `registry` → `handle` → `queue`, and
//! `registry` → `mesh`.
pub mod admission;
pub(crate) mod conn;
pub(crate) mod handle;
pub mod mesh;
pub mod metrics;
pub(crate) mod queue;
pub mod rate;
pub mod registry;
pub mod server;
