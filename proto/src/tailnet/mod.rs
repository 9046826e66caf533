//! Prost-generated `coder.tailnet.v2` messages (from `proto/tailnet.proto`, compiled by build.rs).
//!
//! Why: Coder agents and clients speak these protobuf messages over dRPC; field numbers must match
//! Coder exactly. `bytes` fields are [`bytes::Bytes`] so node payloads can be forwarded without
//! copying. This module holds generated types, the RPC method names and [`encode`] (the
//! coordinator's hand-written encoder for peer updates); it never does I/O.

pub mod encode;

/// `coder.tailnet.v2` messages and enums.
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod v2 {
    include!(concat!(env!("OUT_DIR"), "/coder.tailnet.v2.rs"));

    /// Fully qualified dRPC method names of the `coder.tailnet.v2.Tailnet` service.
    pub mod methods {
        /// Server stream: `StreamDERPMapsRequest` → stream `DERPMap`.
        pub const STREAM_DERP_MAPS: &str = "/coder.tailnet.v2.Tailnet/StreamDERPMaps";
        /// Bidi stream: `CoordinateRequest` ↔ `CoordinateResponse`.
        pub const COORDINATE: &str = "/coder.tailnet.v2.Tailnet/Coordinate";
        /// Unary: `TelemetryRequest` → `TelemetryResponse`.
        pub const POST_TELEMETRY: &str = "/coder.tailnet.v2.Tailnet/PostTelemetry";
        /// Unary: `RefreshResumeTokenRequest` → `RefreshResumeTokenResponse`.
        pub const REFRESH_RESUME_TOKEN: &str = "/coder.tailnet.v2.Tailnet/RefreshResumeToken";
        /// Server stream: `WorkspaceUpdatesRequest` → stream `WorkspaceUpdate`.
        pub const WORKSPACE_UPDATES: &str = "/coder.tailnet.v2.Tailnet/WorkspaceUpdates";
    }
}
