//! The coordinator as derper's admission controller: `POST /tailnetd/derp-admit`.
//!
//! Why: a fleet of separate relays (`tailnetd derp --verify-client-url
//! https://coordinator/tailnetd/derp-admit`) should admit exactly the node keys this
//! coordinator's peer graph knows — local peers, the sidecar bridge's and other replicas' —
//! through the same interface a derper (or headscale's verifier) uses, so that relays of either
//! kind work with it. The body is Tailscale's `DERPAdmitClientRequest`, the answer
//! `DERPAdmitClientResponse` ([`proto::derp::admit`]).
//!
//! Unauthenticated, like the DERP map: the answer reveals only whether a random 32-byte public
//! key is in use. A malformed body gets 400 (a relay treats any non-200 as a refusal).
//! The lookup is [`crate::graph::PeerGraph::knows_node_key`]: one small index mutex, no graph
//! shard.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use proto::derp::admit::{AdmitRequest, AdmitResponse};

use crate::Coordinator;

/// Where the coordinator answers relay admission requests.
pub const DERP_ADMIT_PATH: &str = "/tailnetd/derp-admit";

/// Largest request body read (a request is about 110 bytes).
const MAX_REQUEST_BYTES: usize = 4 << 10;

/// `POST` [`DERP_ADMIT_PATH`].
pub(super) async fn derp_admit(State(coord): State<Arc<Coordinator>>, body: Bytes) -> Response {
    if body.len() > MAX_REQUEST_BYTES {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request too large\n").into_response();
    }
    let req = match AdmitRequest::from_json(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let allow = !req.node_public.is_zero() && coord.graph().knows_node_key(&req.node_public);
    tracing::debug!(peer = %req.node_public, source = ?req.source, allow, "relay admission request");
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        AdmitResponse { allow }.to_json(),
    )
        .into_response()
}
