//! A hand-written encoder for `CoordinateResponse.peer_updates` entries.
//!
//! Why: the coordinator fans one peer update out to many receivers and encodes it once, from a
//! node it shares rather than owns (prost's `PeerUpdate` owns its `Node`, so encoding through it
//! means a copy of the node per receiver). [`put_peer_update`] writes byte for byte what prost
//! writes for the same `PeerUpdate`, and the test below holds it to that. Pure: no I/O.

use bytes::{BufMut, BytesMut};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;

use super::v2::coordinate_response::peer_update::Kind;
use super::v2::Node;

/// Field number of `CoordinateResponse.peer_updates`.
pub const PEER_UPDATES_FIELD: u32 = 1;

fn len_delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// Appends one `CoordinateResponse.peer_updates` entry, byte for byte what prost writes for the
/// same `PeerUpdate` (fields in tag order, proto3 defaults omitted), without owning a copy of
/// the node. Any run of appended entries is a valid `CoordinateResponse` on its own.
pub fn put_peer_update(
    buf: &mut BytesMut,
    id: &[u8],
    node: Option<&Node>,
    kind: Kind,
    reason: &str,
) {
    let node_len = node.map(Message::encoded_len);
    let kind = kind as i32;
    let mut body = 0;
    if !id.is_empty() {
        body += len_delimited_len(1, id.len());
    }
    if let Some(n) = node_len {
        body += len_delimited_len(2, n);
    }
    if kind != 0 {
        body += key_len(3) + encoded_len_varint(i64::from(kind) as u64);
    }
    if !reason.is_empty() {
        body += len_delimited_len(4, reason.len());
    }
    buf.reserve(len_delimited_len(PEER_UPDATES_FIELD, body));
    encode_key(PEER_UPDATES_FIELD, WireType::LengthDelimited, buf);
    encode_varint(body as u64, buf);
    if !id.is_empty() {
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(id.len() as u64, buf);
        buf.put_slice(id);
    }
    if let (Some(node), Some(n)) = (node, node_len) {
        encode_key(2, WireType::LengthDelimited, buf);
        encode_varint(n as u64, buf);
        node.encode_raw(buf);
    }
    if kind != 0 {
        encode_key(3, WireType::Varint, buf);
        encode_varint(i64::from(kind) as u64, buf);
    }
    if !reason.is_empty() {
        encode_key(4, WireType::LengthDelimited, buf);
        encode_varint(reason.len() as u64, buf);
        buf.put_slice(reason.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::tailnet::v2::coordinate_response::PeerUpdate;
    use crate::tailnet::v2::CoordinateResponse;

    /// A node with every kind of field a real one carries (bytes, strings, lists, a map).
    fn full_node() -> Node {
        let mut n = Node {
            id: 7,
            ..Node::default()
        };
        n.preferred_derp = 999;
        n.key = Bytes::from_static(&[1; 34]);
        n.disco = "discokey:ab".into();
        n.addresses = vec!["fd7a:115c:a1e0::1/128".into(), "100.64.0.1/32".into()];
        n.allowed_ips = vec!["fd7a:115c:a1e0::1/128".into()];
        n.endpoints = vec!["192.0.2.1:41641".into(); 3];
        n.derp_latency.insert("1-v4".to_string(), 0.25);
        n
    }

    #[test]
    fn hand_encoded_peer_updates_are_what_prost_writes() {
        let node = full_node();
        let empty = Node::default();
        let mut big = full_node();
        big.endpoints = vec!["x".repeat(200); 1000];
        let cases: Vec<(&[u8], Option<&Node>, Kind, &str)> = vec![
            (&[9; 16], Some(&node), Kind::Node, "node update"),
            (&[9; 16], Some(&big), Kind::Node, ""),
            (&[9; 16], None, Kind::Lost, "lost"),
            (&[], None, Kind::Unspecified, ""),
            (&[1, 2], Some(&empty), Kind::ReadyForHandshake, "r"),
        ];
        let mut all = BytesMut::new();
        let mut expected = CoordinateResponse::default();
        for (id, node, kind, reason) in cases {
            let pu = PeerUpdate {
                id: Bytes::copy_from_slice(id),
                node: node.cloned(),
                kind: kind as i32,
                reason: reason.into(),
            };
            let mut one = BytesMut::new();
            put_peer_update(&mut one, id, node, kind, reason);
            let want = CoordinateResponse {
                peer_updates: vec![pu.clone()],
                error: String::new(),
            }
            .encode_to_vec();
            assert_eq!(one.as_ref(), want.as_slice());
            all.extend_from_slice(&one);
            expected.peer_updates.push(pu);
        }
        assert_eq!(all.as_ref(), expected.encode_to_vec().as_slice());
    }
}
