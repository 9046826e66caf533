//! Relay admission: "may this node key use the relay?"
//!
//! Why a trait: `derp` must not depend on the coordinator, yet only keys announced by
//! authenticated peers should be allowed to use our relays. The binary implements [`Admission`]
//! from the coordinator's peer graph (roles `serve` and `dev`) or with derper's
//! `--verify-client-url` protocol ([`crate::edge::verify_url`], role `derp`) and hands it to
//! [`ServerConfig`](super::server::ServerConfig). Mesh peers (clients presenting the mesh key)
//! are never asked, as in derper.
//!
//! The question is asked once, during the handshake, after ClientInfo was opened and before the
//! client is registered: never on the packet path. A [`Decision::Refuse`] ends the connection
//! the way derper does (closed, no frame, no message). A [`Decision::AdmitPending`] admits a key
//! the answerer does not know *yet* (a client may reach the relay before its first node update
//! reaches the coordinator): the server asks [`Admission::confirm`] once when the grace period
//! ends and closes every connection of the key that is still unknown. That check runs in one
//! small task per pending connection, outside the connection's own task.
//!
//! An implementation must answer within the handshake deadline (the server aborts the handshake
//! when it expires) and must never block the executor thread.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use proto::key::NodePublic;

/// What an [`Admission`] decided about one connecting key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The key may connect.
    Admit,
    /// The key may not connect; the text says why (logged at debug).
    Refuse(String),
    /// The key is not known yet: admit it, and close it unless [`Admission::confirm`] says yes
    /// once `grace` has passed.
    AdmitPending {
        /// How long the key has to become known.
        grace: Duration,
    },
    /// The verifier could not answer (unreachable, timed out); `admit` is the configured
    /// fail-open policy's verdict. Counted in `derp_admission_verifier_errors_total`.
    VerifierError {
        /// Whether the connection is admitted anyway (fail open).
        admit: bool,
        /// What went wrong.
        error: String,
    },
}

/// Boxed future returned by [`Admission::admit`] (the trait must be usable as `dyn Admission`).
pub type AdmitFuture<'a> = Pin<Box<dyn Future<Output = Decision> + Send + 'a>>;

/// Decides whether a non-mesh client may complete its handshake.
pub trait Admission: Send + Sync + 'static {
    /// Decides about `key` connecting from `remote`.
    fn admit<'a>(&'a self, key: &'a NodePublic, remote: IpAddr) -> AdmitFuture<'a>;

    /// Asked once when the grace period of an [`Decision::AdmitPending`] ends: is `key` known
    /// now? `false` closes the key's pending connection. The default says no (an answerer that
    /// never returns `AdmitPending` need not implement it).
    fn confirm(&self, key: &NodePublic) -> bool {
        let _ = key;
        false
    }
}

/// Admits every key (the default when no admission is configured is to skip the check entirely;
/// this type exists for tests and explicit configuration).
#[derive(Debug, Clone, Copy, Default)]
pub struct AdmitAll;

impl Admission for AdmitAll {
    fn admit<'a>(&'a self, _key: &'a NodePublic, _remote: IpAddr) -> AdmitFuture<'a> {
        Box::pin(std::future::ready(Decision::Admit))
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
        let decision = if (self.0)(key, remote) {
            Decision::Admit
        } else {
            Decision::Refuse("not admitted".into())
        };
        Box::pin(std::future::ready(decision))
    }
}

/// Admits the keys a synchronous oracle knows, plus unknown keys for a grace period: the shape of
/// the coordinator-backed admission (the oracle is "does the peer graph hold a node with this
/// key?"), usable with any lookup.
pub struct KnownKeys<F> {
    known: F,
    grace: Duration,
}

impl<F> KnownKeys<F>
where
    F: Fn(&NodePublic) -> bool + Send + Sync + 'static,
{
    /// Admits keys for which `known` is true; other keys get `grace` to become known
    /// (`Duration::ZERO`: refused at once).
    pub fn new(known: F, grace: Duration) -> Self {
        KnownKeys { known, grace }
    }
}

impl<F> std::fmt::Debug for KnownKeys<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnownKeys")
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl<F> Admission for KnownKeys<F>
where
    F: Fn(&NodePublic) -> bool + Send + Sync + 'static,
{
    fn admit<'a>(&'a self, key: &'a NodePublic, _remote: IpAddr) -> AdmitFuture<'a> {
        let decision = if (self.known)(key) {
            Decision::Admit
        } else if self.grace.is_zero() {
            Decision::Refuse("node key not known to the coordinator".into())
        } else {
            Decision::AdmitPending { grace: self.grace }
        };
        Box::pin(std::future::ready(decision))
    }

    fn confirm(&self, key: &NodePublic) -> bool {
        (self.known)(key)
    }
}
