//! The relay's edge: everything between the network and the [`crate::core`].
//!
//! Why it is one part: the core takes a byte stream that already speaks DERP; getting there is a
//! different job with different failure modes (internet-facing sockets, HTTP heads, certificates
//! that rotate). [`listener`] accepts TCP (and TLS) with derper's socket options and limits,
//! [`http`] turns a connection into DERP (raw upgrade, fast start, [`websocket`]) or hands it to
//! an axum router, [`tls`] loads and reloads certificates with the [`metacert`] appended (or
//! [`acme`] obtains and renews them from an ACME CA), [`stun`]
//! answers netcheck, [`keyfile`] stores the relay's keys and [`config`] holds the operator's
//! settings ([`config::EdgeConfig`]), and [`fdlimit`] fits the connection caps under the open-file
//! limit. [`verify_url`] asks an admission controller URL about connecting clients (derper's
//! `--verify-client-url`). The coordinator-only role uses the listener, HTTP edge and
//! TLS without a relay behind them.
pub mod acme;
pub mod config;
pub mod fdlimit;
pub mod http;
pub mod keyfile;
pub mod listener;
pub mod metacert;
pub mod stun;
pub mod tls;
pub mod verify_url;
pub mod websocket;
