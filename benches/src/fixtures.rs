//! Realistic tailnet v2 messages (nodes the coordinator's authorization accepts).

use bytes::Bytes;
use coordinator::authz::{addr_from_uuid, TAILSCALE_SERVICE_PREFIX};
use proto::tailnet::v2::coordinate_request::{Tunnel, UpdateSelf};
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::coordinate_response::PeerUpdate;
use proto::tailnet::v2::{CoordinateRequest, CoordinateResponse, Node};
use rand::RngCore;
use uuid::Uuid;

/// A node for `peer` that the coordinator accepts: an agent's node carries the agent's own
/// Tailscale service address, a client's any /128 in the Tailscale range. `stamp_ns` goes into
/// `as_of` (seconds + nanos), which coordinators pass through untouched, so receivers can compute
/// the delivery latency.
pub fn node(peer: Uuid, agent: bool, stamp_ns: u64) -> Node {
    let mut rng = rand::thread_rng();
    let addr = if agent {
        format!("{}/128", addr_from_uuid(TAILSCALE_SERVICE_PREFIX, peer))
    } else {
        let b = peer.as_bytes();
        format!(
            "fd7a:115c:a1e0:{:x}:{:x}::1/128",
            u16::from_be_bytes([b[0], b[1]]),
            u16::from_be_bytes([b[2], b[3]])
        )
    };
    let mut key = Vec::with_capacity(34);
    key.extend_from_slice(b"np");
    let mut k = [0u8; 32];
    rng.fill_bytes(&mut k);
    key.extend_from_slice(&k);
    let mut d = [0u8; 32];
    rng.fill_bytes(&mut d);
    Node {
        id: i64::from(rng.next_u32() & 0x7fff_ffff) + 1,
        as_of: Some(timestamp(stamp_ns)),
        key: Bytes::from(key),
        disco: format!("discokey:{}", hex_lower(&d)),
        preferred_derp: 1,
        derp_latency: [("1-v4".to_string(), 0.01), ("1-v6".to_string(), 0.012)]
            .into_iter()
            .collect(),
        derp_forced_websocket: Default::default(),
        addresses: vec![addr.clone()],
        allowed_ips: vec![addr],
        endpoints: vec!["192.0.2.10:41641".into(), "[2001:db8::10]:41641".into()],
    }
}

/// `ns` as a protobuf timestamp.
pub fn timestamp(ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX),
        nanos: i32::try_from(ns % 1_000_000_000).unwrap_or(0),
    }
}

/// Inverse of [`timestamp`] (0 for a missing or negative stamp).
pub fn timestamp_ns(ts: Option<&prost_types::Timestamp>) -> u64 {
    match ts {
        Some(t) if t.seconds >= 0 && t.nanos >= 0 => {
            (t.seconds as u64) * 1_000_000_000 + t.nanos as u64
        }
        _ => 0,
    }
}

fn hex_lower(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(H[(x >> 4) as usize] as char);
        s.push(H[(x & 15) as usize] as char);
    }
    s
}

/// `update_self` with `node`.
pub fn update_self(node: Node) -> CoordinateRequest {
    CoordinateRequest {
        update_self: Some(UpdateSelf { node: Some(node) }),
        ..Default::default()
    }
}

/// `add_tunnel` to `dst`.
pub fn add_tunnel(dst: Uuid) -> CoordinateRequest {
    CoordinateRequest {
        add_tunnel: Some(Tunnel {
            id: Bytes::copy_from_slice(dst.as_bytes()),
        }),
        ..Default::default()
    }
}

/// A response carrying `n` NODE updates (random peers).
pub fn response(n: usize) -> CoordinateResponse {
    CoordinateResponse {
        peer_updates: (0..n)
            .map(|_| {
                let id = Uuid::new_v4();
                PeerUpdate {
                    id: Bytes::copy_from_slice(id.as_bytes()),
                    node: Some(node(id, true, 1_700_000_000_000_000_000)),
                    kind: Kind::Node as i32,
                    reason: String::new(),
                }
            })
            .collect(),
        error: String::new(),
    }
}
