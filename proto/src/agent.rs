//! A deliberately PARTIAL `coder.agent.v2` schema (from `proto/agent.proto`): just
//! `GetManifestRequest` and the `Manifest` fields tailnetd needs (agent id, direct-connection and
//! websocket flags, DERP map). Unknown fields of Coder's full Manifest are skipped on decode.
//! Never use this to re-encode a Manifest received from a real coderd: the undeclared fields would
//! be lost.

/// `coder.agent.v2` messages (partial).
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod v2 {
    include!(concat!(env!("OUT_DIR"), "/coder.agent.v2.rs"));

    /// Fully qualified dRPC method names of the `coder.agent.v2.Agent` service (partial).
    pub mod methods {
        /// Unary: `GetManifestRequest` → `Manifest`.
        pub const GET_MANIFEST: &str = "/coder.agent.v2.Agent/GetManifest";
    }
}
