//! Fuzz entry points, shared by the cargo-fuzz targets in `fuzz/` (repository root) and by the
//! corpus replay test (`tests/it/fuzz_corpus.rs`) that runs in the test command.
//!
//! Each function takes arbitrary bytes and must never panic on its own account: it only
//! `assert!`s invariants of the codecs (decode → encode → decode is stable, encoded lengths are
//! what `encoded_len` says). A failing assertion is a codec bug found by the fuzzer. This module
//! must never do I/O or read a clock; keys used here are fixed, derived from constant bytes.
//! Keep it a flat list of `pub fn name(data: &[u8])`, one per fuzz target.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};

use crate::derp::{self, ClientInfo, Frame, FrameHeader, FrameType, ServerInfo};
use crate::key::{NodePrivate, NodePublic};
use crate::stun;

fn check_frame_roundtrip(typ: u8, payload: &[u8]) {
    let Ok(frame) = Frame::decode(typ, Bytes::copy_from_slice(payload)) else {
        return;
    };
    let mut buf = BytesMut::new();
    frame.encode(&mut buf);
    assert_eq!(buf.len(), frame.encoded_len(), "encoded_len mismatch");
    let again = Frame::decode_frame(buf.freeze()).expect("re-decoding an encoded frame");
    assert_eq!(again, frame, "decode/encode/decode not stable");
}

/// Treats `data` as a DERP byte stream: splits it into frames, decodes each one, checks the
/// encode round trip, the header rules and the in-place rewrite helpers.
pub fn derp_frames(data: &[u8]) {
    let mut rest = data;
    while let Some(h) = FrameHeader::decode(rest) {
        let _ = h.validate_from_client();
        let _ = h.validate_client_info();
        let _ = h.frame_type().handled_by_server();
        assert_eq!(FrameHeader::decode(&h.encode()), Some(h));

        let avail = rest.len() - derp::FRAME_HEADER_LEN;
        let take = avail.min(h.payload_len());
        let payload = &rest[derp::FRAME_HEADER_LEN..derp::FRAME_HEADER_LEN + take];
        check_frame_roundtrip(h.typ, payload);

        let _ = derp::send_packet_dst(payload);
        let _ = derp::forward_packet_keys(payload);
        let _ = derp::looks_like_disco(payload);

        // In-place rewrites on a copy of this frame with its real (possibly truncated) length.
        let mut whole = h.encode().to_vec();
        whole.extend_from_slice(payload);
        let src = NodePublic::from_bytes([0x5a; 32]);
        let mut send = whole.clone();
        if derp::rewrite_send_to_recv(&mut send, &src).is_ok() {
            match Frame::decode_frame(Bytes::from(send)) {
                Ok(Frame::RecvPacket { src: s, packet }) => {
                    assert_eq!(s, src);
                    assert_eq!(&packet[..], &payload[32..]);
                }
                other => panic!("rewritten SendPacket is not a RecvPacket: {other:?}"),
            }
        } else {
            assert_eq!(send, whole, "failed rewrite must not touch the buffer");
        }
        let mut fwd = whole.clone();
        match derp::rewrite_forward_to_recv(&mut fwd) {
            Ok(off) => match Frame::decode_frame(Bytes::copy_from_slice(&fwd[off..])) {
                Ok(Frame::RecvPacket { src: s, packet }) => {
                    assert_eq!(s.as_bytes()[..], payload[..32]);
                    assert_eq!(&packet[..], &payload[64..]);
                }
                other => panic!("rewritten ForwardPacket is not a RecvPacket: {other:?}"),
            },
            Err(_) => assert_eq!(fwd, whole, "failed rewrite must not touch the buffer"),
        }

        if take < h.payload_len() {
            break;
        }
        rest = &rest[derp::FRAME_HEADER_LEN + take..];
    }
}

struct Keys {
    server: NodePrivate,
    client: NodePrivate,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        server: NodePrivate::from_bytes([0x11; 32]),
        client: NodePrivate::from_bytes([0x22; 32]),
    })
}

/// Feeds `data` to every handshake parser (ServerKey, ClientInfo, ServerInfo, and both JSON
/// decoders) and checks the JSON and seal/open round trips for whatever decodes.
pub fn derp_handshake(data: &[u8]) {
    let k = keys();
    let _ = derp::parse_server_key(data);
    let _ = derp::open_client_info(&k.server, data);
    let _ = derp::open_server_info(&k.client, &k.server.public(), data);
    let _ = derp::expect_frame(
        FrameType::ClientInfo.as_u8(),
        Bytes::copy_from_slice(data),
        FrameType::ClientInfo,
    );

    let mut nonce = [0u8; 24];
    let n = data.len().min(24);
    nonce[..n].copy_from_slice(&data[..n]);

    if let Ok(ci) = ClientInfo::from_json(data) {
        let again = ClientInfo::from_json(&ci.to_json()).expect("re-decoding ClientInfo JSON");
        assert_eq!(again, ci, "ClientInfo JSON round trip");
        let sealed = derp::seal_client_info(&k.client, &k.server.public(), &ci, nonce);
        let (who, opened) = derp::open_client_info(&k.server, &sealed).expect("open sealed");
        assert_eq!(who, k.client.public());
        assert_eq!(opened, ci);
    }
    if let Ok(si) = ServerInfo::from_json(data) {
        let again = ServerInfo::from_json(&si.to_json()).expect("re-decoding ServerInfo JSON");
        assert_eq!(again, si, "ServerInfo JSON round trip");
        let sealed = derp::seal_server_info(&k.server, &k.client.public(), &si, nonce);
        let opened =
            derp::open_server_info(&k.client, &k.server.public(), &sealed).expect("open sealed");
        assert_eq!(opened, si);
    }
}

/// Feeds `data` to the STUN request and response parsers, checks that whatever parses
/// re-encodes to something that parses the same, and builds a response from `data`'s bytes.
pub fn stun(data: &[u8]) {
    if let Ok(txid) = stun::parse_binding_request(data) {
        let req = stun::build_binding_request(txid);
        assert_eq!(stun::parse_binding_request(&req), Ok(txid));
    }
    if let Ok((txid, addr)) = stun::parse_binding_response(data) {
        let resp = stun::build_binding_response(txid, addr);
        assert_eq!(stun::parse_binding_response(&resp), Ok((txid, addr)));
    }
    if data.len() >= 12 + 16 + 2 {
        let mut txid = [0u8; 12];
        txid.copy_from_slice(&data[..12]);
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&data[12..28]);
        let port = u16::from_be_bytes([data[28], data[29]]);
        let ip6 = Ipv6Addr::from(ip);
        let want = match ip6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(ip6),
        };
        let resp = stun::build_binding_response(txid, SocketAddr::new(IpAddr::V6(ip6), port));
        assert_eq!(
            stun::parse_binding_response(&resp),
            Ok((txid, SocketAddr::new(want, port)))
        );
        let req = stun::build_binding_request(txid);
        assert_eq!(stun::parse_binding_request(&req), Ok(txid));
    }
}

/// Fuzz entry point (H2): feeds `data` through the dRPC frame parser into a `PacketAssembler`,
/// in chunks whose sizes come from the data itself, and checks codec invariants. Never panics.
pub fn drpc(data: &[u8]) {
    use crate::drpc::{decode_error, decode_metadata, Frame, Kind, PacketAssembler};
    use bytes::BytesMut;

    let Some((&chunk_seed, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk_seed).max(1);
    let mut asm = PacketAssembler::new();
    let mut buf = BytesMut::new();
    'outer: for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let frame = match Frame::decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => break 'outer,
            };
            // Re-encoding a parsed frame must parse back to the same frame.
            let mut enc = BytesMut::new();
            frame.encode(&mut enc);
            if let Ok(Some((again, n))) = Frame::parse(&enc) {
                assert_eq!(again, frame);
                assert_eq!(n, enc.len());
            }
            match asm.push(frame) {
                Ok(Some(pkt)) => {
                    assert!(pkt.data.len() <= crate::drpc::MAX_PACKET_SIZE);
                    match pkt.kind {
                        Kind::Error => {
                            let _ = decode_error(&pkt.data);
                        }
                        Kind::InvokeMetadata => {
                            let _ = decode_metadata(&pkt.data);
                        }
                        Kind::Message => {
                            use prost::Message as _;
                            let _ = crate::tailnet::v2::CoordinateRequest::decode(pkt.data.clone());
                        }
                        _ => {}
                    }
                }
                Ok(None) => {}
                Err(_) => break 'outer,
            }
        }
    }
}

/// Fuzz entry point (H2): parses a v1 JSON node stream, converts each node to protobuf and back,
/// and re-serializes; also parses the input as a JSON DERP map and converts it. Conversions that
/// succeed must round-trip. Never panics.
pub fn v1_json(data: &[u8]) {
    use crate::derpmap::{same_map, DerpMap};
    use crate::v1::Node;
    // The same JSON also exercises the DERP map reader (both follow Go's decoding rules).
    if let Ok(m) = DerpMap::from_json(data) {
        if let Ok(json) = m.to_json() {
            if let Ok(back) = DerpMap::from_json(&json) {
                assert!(same_map(&m, &back));
            }
        }
        if let Ok(p) = m.to_proto() {
            assert!(p.home_params.is_some());
            let mut back = DerpMap::from_proto(&p);
            // omitDefaultRegions has no protobuf field.
            back.omit_default_regions = m.omit_default_regions;
            assert!(same_map(&m, &back));
        }
    }
    let Ok(nodes) = Node::from_json_stream(data) else {
        return;
    };
    for node in nodes {
        let Ok(json) = node.to_json() else {
            continue;
        };
        if let Ok(back) = Node::from_json(&json) {
            assert_eq!(back, node);
        }
        if let Ok(p) = node.to_proto() {
            if let Ok(again) = Node::from_proto(&p) {
                assert_eq!(again, node);
            }
        }
    }
}

/// The ClientInfo/ServerInfo JSON readers alone (the handshake target also reaches them, behind
/// the NaCl box): whatever decodes must survive encode → decode unchanged.
pub fn client_info_json(data: &[u8]) {
    if let Ok(ci) = ClientInfo::from_json(data) {
        let again = ClientInfo::from_json(&ci.to_json()).expect("re-decoding ClientInfo JSON");
        assert_eq!(again, ci, "ClientInfo JSON round trip");
    }
    if let Ok(si) = ServerInfo::from_json(data) {
        let again = ServerInfo::from_json(&si.to_json()).expect("re-decoding ServerInfo JSON");
        assert_eq!(again, si, "ServerInfo JSON round trip");
    }
}

/// The JSON DERP map reader (`derp_map.file`, coderd's `/api/v2/derp-map`) and its protobuf
/// conversion (`StreamDERPMaps`): both conversions that succeed must round-trip.
pub fn derp_map_json(data: &[u8]) {
    use crate::derpmap::{same_map, same_proto_map, DerpMap};
    let Ok(m) = DerpMap::from_json(data) else {
        return;
    };
    if let Ok(json) = m.to_json() {
        let back = DerpMap::from_json(&json).expect("re-decoding an encoded DERP map");
        assert!(same_map(&m, &back), "DERP map JSON round trip");
    }
    if let Ok(p) = m.to_proto() {
        let mut back = DerpMap::from_proto(&p);
        back.omit_default_regions = m.omit_default_regions;
        assert!(same_map(&m, &back), "DERP map protobuf round trip");
        let p2 = back.to_proto().expect("a converted map converts again");
        assert!(same_proto_map(&p, &p2));
    }
}

/// A yamux byte stream as the session's reader sees it: 12-byte headers, Data payloads skipped
/// by their length. Checks that every decoded header encodes back to the same 12 bytes.
pub fn yamux_header(data: &[u8]) {
    use crate::yamux::{Header, Type, HEADER_LEN};
    let mut rest = data;
    loop {
        match Header::decode(rest) {
            Ok(Some(h)) => {
                assert_eq!(h.encode()[..], rest[..HEADER_LEN], "header round trip");
                rest = &rest[HEADER_LEN..];
                if h.typ == Type::Data {
                    let n = usize::try_from(h.length).unwrap_or(usize::MAX);
                    rest = &rest[n.min(rest.len())..];
                }
            }
            Ok(None) => return,
            Err(_) => {
                // The session ends on a bad header; resynchronise one byte later to keep going.
                rest = &rest[1..];
            }
        }
    }
}

/// The QUIC mesh between tailnetd relays: the first byte picks the unit. 0: a control stream
/// (messages split as the reader splits them; each re-encodes to the same bytes); 1: a packet
/// unit from a stream; 2: a datagram; 3: a run of 16-bit sequence steps driving the loss count,
/// whose total must equal the numbers never seen.
pub fn quic_mesh(data: &[u8]) {
    use crate::derp::quicmesh::{decode_datagram, decode_packet, encode_datagram, encode_packet};
    use crate::derp::quicmesh::{DatagramLoss, MeshMsg};
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            let mut at = 0;
            while let Ok(Some((m, n))) = MeshMsg::decode(&rest[at..]) {
                let mut buf = BytesMut::new();
                m.encode(&mut buf);
                assert_eq!(&buf[..], &rest[at..at + n], "control message round trip");
                assert_eq!(m.encoded_len(), n);
                at += n;
            }
        }
        1 => {
            if let Ok((dst, frame)) = decode_packet(Bytes::copy_from_slice(rest)) {
                assert_eq!(&encode_packet(&dst, &frame)[..], rest, "packet round trip");
            }
        }
        2 => {
            if let Ok((seq, dst, frame)) = decode_datagram(Bytes::copy_from_slice(rest)) {
                assert_eq!(
                    &encode_datagram(seq, &dst, &frame)[..],
                    rest,
                    "datagram round trip"
                );
            }
        }
        _ => {
            // Each 2 bytes: a signed step from the last number (wide jumps and going back).
            let mut loss = DatagramLoss::default();
            let mut seen = std::collections::BTreeSet::new();
            let mut seq: u64 = 0;
            let mut lost = 0;
            for step in rest.chunks_exact(2) {
                let d = i64::from(i16::from_be_bytes([step[0], step[1]])) * 3;
                seq = seq.saturating_add_signed(d);
                if step == [0x7f, 0xff] {
                    // The edge: a peer sending the largest number.
                    let _ = loss.receive(u64::MAX);
                    continue;
                }
                let late = loss.late();
                lost += loss.receive(seq);
                if loss.late() == late {
                    seen.insert(seq);
                }
            }
            lost += loss.finish();
            let highest = seen.last().map_or(0, |h| h + 1);
            assert_eq!(
                lost,
                highest - seen.len() as u64,
                "lost = numbers never seen"
            );
        }
    }
}
