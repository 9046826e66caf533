//! Relay admission: "may this node key use the relay?"
//!
//! Why a trait: `derp` must not depend on the coordinator, yet only keys announced by
//! authenticated peers should be allowed to use our relays. The binary implements [`Admission`]
//! from the coordinator's peer graph and hands it to [`ServerConfig`](super::server::ServerConfig).
//! Mesh peers (clients presenting the mesh key) are never asked.
//!
//! An implementation must answer within the handshake deadline (the server aborts the handshake
//! when it expires) and must never block the executor thread.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use proto::key::NodePublic;

/// Boxed future returned by [`Admission::admit`] (the trait must be usable as `dyn Admission`).
pub type AdmitFuture<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// Decides whether a non-mesh client may complete its handshake.
pub trait Admission: Send + Sync + 'static {
    /// Returns true to admit `key` connecting from `remote`. Rejected clients are closed silently
    /// (the wire protocol has no rejection frame) and counted as `admission_denied`.
    fn admit<'a>(&'a self, key: &'a NodePublic, remote: IpAddr) -> AdmitFuture<'a>;
}

/// Admits every key (the default when no admission is configured is to skip the check entirely;
/// this type exists for tests and explicit configuration).
#[derive(Debug, Clone, Copy, Default)]
pub struct AdmitAll;

impl Admission for AdmitAll {
    fn admit<'a>(&'a self, _key: &'a NodePublic, _remote: IpAddr) -> AdmitFuture<'a> {
        Box::pin(std::future::ready(true))
    }
}

/// Admits exactly the keys for which the closure returns true (synchronous decisions, e.g. a
/// lookup in an in-memory set).
pub struct AdmitFn<F>(pub F);

impl<F> std::fmt::Debug for AdmitFn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdmitFn")
    }
}

impl<F> Admission for AdmitFn<F>
where
    F: Fn(&NodePublic, IpAddr) -> bool + Send + Sync + 'static,
{
    fn admit<'a>(&'a self, key: &'a NodePublic, remote: IpAddr) -> AdmitFuture<'a> {
        Box::pin(std::future::ready((self.0)(key, remote)))
    }
}
