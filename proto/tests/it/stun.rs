//! STUN: derper's binding-request acceptance rules, responses, and the client side.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use proto::stun::{self, StunError, TxId};

const TX: TxId = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

// Computed independently (Python zlib.crc32 ^ 0x5354554e) for TX above.
const REQUEST_HEX: &str =
    "000100142112a4420102030405060708090a0b0c802200087461696c6e6f646580280004b32c370f";

/// Appends a FINGERPRINT over `b` (for building test packets with other layouts).
fn with_fingerprint(mut b: Vec<u8>) -> Vec<u8> {
    let fp = crc32fast::hash(&b) ^ 0x5354_554e;
    b.extend_from_slice(&[0x80, 0x28, 0, 4]);
    b.extend_from_slice(&fp.to_be_bytes());
    b
}

fn header(typ: u16, attrs_len: u16, tx: &TxId) -> Vec<u8> {
    let mut b = typ.to_be_bytes().to_vec();
    b.extend_from_slice(&attrs_len.to_be_bytes());
    b.extend_from_slice(&stun::MAGIC_COOKIE);
    b.extend_from_slice(tx);
    b
}

#[test]
fn request_is_tailscales_exact_layout() {
    let req = stun::build_binding_request(TX);
    assert_eq!(req.len(), 40);
    assert_eq!(stun::REQUEST_LEN, 40);
    assert_eq!(hex::encode(&req), REQUEST_HEX);
    assert_eq!(stun::parse_binding_request(&req), Ok(TX));
}

#[test]
fn request_rejections() {
    let req = stun::build_binding_request(TX);
    // Any single flipped byte is rejected (txid bytes are covered by the fingerprint).
    for i in 0..req.len() {
        let mut bad = req.clone();
        bad[i] ^= 0x01;
        // Flipping byte 3 (header length low byte) changes only a field derper ignores, but it
        // is still covered by the fingerprint.
        assert!(stun::parse_binding_request(&bad).is_err(), "flip {i}");
    }
    // Not STUN.
    assert_eq!(
        stun::parse_binding_request(&req[..19]),
        Err(StunError::NotStun)
    );
    let mut top_bits = req.clone();
    top_bits[0] |= 0x40;
    assert_eq!(
        stun::parse_binding_request(&top_bits),
        Err(StunError::NotStun)
    );
    let mut cookie = req.clone();
    cookie[5] = 0;
    assert_eq!(
        stun::parse_binding_request(&cookie),
        Err(StunError::NotStun)
    );
    // Not a binding request.
    let mut typ = req.clone();
    typ[1] = 0x02;
    assert_eq!(
        stun::parse_binding_request(&typ),
        Err(StunError::NotBindingRequest)
    );
    // Wrong SOFTWARE value (fingerprint recomputed so only the software differs).
    let mut b = header(1, 20, &TX);
    b.extend_from_slice(&[0x80, 0x22, 0, 8]);
    b.extend_from_slice(b"tailnodX");
    assert_eq!(
        stun::parse_binding_request(&with_fingerprint(b)),
        Err(StunError::WrongSoftware)
    );
    // No SOFTWARE at all.
    let b = header(1, 8, &TX);
    assert_eq!(
        stun::parse_binding_request(&with_fingerprint(b)),
        Err(StunError::WrongSoftware)
    );
    // Missing fingerprint.
    assert_eq!(
        stun::parse_binding_request(&req[..32]),
        Err(StunError::NoFingerprint)
    );
    // Fingerprint not last.
    let mut not_last = req.clone();
    not_last.extend_from_slice(&[0x00, 0x24, 0, 4, 0, 0, 0, 0]);
    assert_eq!(
        stun::parse_binding_request(&not_last),
        Err(StunError::NoFingerprint)
    );
    // Wrong fingerprint value.
    let mut fp = req.clone();
    fp[39] ^= 0xff;
    assert_eq!(
        stun::parse_binding_request(&fp),
        Err(StunError::WrongFingerprint)
    );
    // Truncated attribute TLV.
    assert_eq!(
        stun::parse_binding_request(&req[..22]),
        Err(StunError::MalformedAttrs)
    );
    assert_eq!(
        stun::parse_binding_request(&req[..38]),
        Err(StunError::MalformedAttrs)
    );
}

#[test]
fn request_with_other_attributes_and_padding_is_accepted() {
    // Like derper: extra attributes (padded to 4) before FINGERPRINT are fine, and the header
    // length field is not checked.
    let mut b = header(1, 0, &TX);
    b.extend_from_slice(&[0x80, 0x23, 0, 3, b'a', b'b', b'c', 0]);
    b.extend_from_slice(&[0x80, 0x22, 0, 8]);
    b.extend_from_slice(b"tailnode");
    assert_eq!(stun::parse_binding_request(&with_fingerprint(b)), Ok(TX));
}

#[test]
fn response_vectors_from_tailscale_tests() {
    let cases: [(&str, &[u8], SocketAddr); 5] = [
        (
            "google-1",
            &[
                0x01, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42, 0x23, 0x60, 0xb1, 0x1e, 0x3e, 0xc6,
                0x8f, 0xfa, 0x93, 0xe0, 0x80, 0x07, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xc7, 0x86,
                0x69, 0x57, 0x85, 0x6f,
            ],
            "72.69.33.45:59028".parse().unwrap(),
        ),
        (
            "stun.sipgate.net (0x8020 + MAPPED-ADDRESS)",
            &[
                0x01, 0x01, 0x00, 0x44, 0x21, 0x12, 0xa4, 0x42, 0x48, 0x2e, 0xb6, 0x47, 0x15, 0xe8,
                0xb2, 0x8e, 0xae, 0xad, 0x64, 0x44, 0x00, 0x01, 0x00, 0x08, 0x00, 0x01, 0xe4, 0xab,
                0x48, 0x45, 0x21, 0x2d, 0x00, 0x04, 0x00, 0x08, 0x00, 0x01, 0x27, 0x10, 0xd9, 0x0a,
                0x44, 0x98, 0x00, 0x05, 0x00, 0x08, 0x00, 0x01, 0x27, 0x11, 0xd9, 0x74, 0x7a, 0x8a,
                0x80, 0x20, 0x00, 0x08, 0x00, 0x01, 0xc5, 0xb9, 0x69, 0x57, 0x85, 0x6f, 0x80, 0x22,
                0x00, 0x10, 0x56, 0x6f, 0x76, 0x69, 0x64, 0x61, 0x2e, 0x6f, 0x72, 0x67, 0x20, 0x30,
                0x2e, 0x39, 0x36, 0x00,
            ],
            "72.69.33.45:58539".parse().unwrap(),
        ),
        (
            "stun.powervoip.com (MAPPED-ADDRESS only)",
            &[
                0x01, 0x01, 0x00, 0x24, 0x21, 0x12, 0xa4, 0x42, 0x7e, 0x57, 0x96, 0x68, 0x29, 0xf4,
                0x44, 0x60, 0x9d, 0x1d, 0xea, 0xa6, 0x00, 0x01, 0x00, 0x08, 0x00, 0x01, 0xe9, 0xd3,
                0x48, 0x45, 0x21, 0x2d, 0x00, 0x04, 0x00, 0x08, 0x00, 0x01, 0x0d, 0x96, 0x4d, 0x48,
                0xa9, 0xd4, 0x00, 0x05, 0x00, 0x08, 0x00, 0x01, 0x0d, 0x97, 0x4d, 0x48, 0xa9, 0xd5,
            ],
            "72.69.33.45:59859".parse().unwrap(),
        ),
        (
            "pion (padding, trailing bytes)",
            &[
                0x01, 0x01, 0x00, 0x24, 0x21, 0x12, 0xa4, 0x42, 0xeb, 0xc2, 0xd3, 0x6e, 0xf4, 0x71,
                0x21, 0x7c, 0x4f, 0x3e, 0x30, 0x8e, 0x80, 0x22, 0x00, 0x0a, 0x65, 0x6e, 0x64, 0x70,
                0x6f, 0x69, 0x6e, 0x74, 0x65, 0x72, 0x00, 0x00, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01,
                0xce, 0x66, 0x5e, 0x12, 0xa4, 0x43, 0x80, 0x28, 0x00, 0x04, 0xb6, 0x99, 0xbb, 0x02,
                0x01, 0x01, 0x00, 0x24, 0x21, 0x12, 0xa4, 0x42,
            ],
            "127.0.0.1:61300".parse().unwrap(),
        ),
        (
            "stuntman ipv6",
            &[
                0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0x06, 0xf5, 0x66, 0x85, 0xd2, 0x8a,
                0xf3, 0xe6, 0x9c, 0xe3, 0x41, 0xe2, 0x00, 0x01, 0x00, 0x14, 0x00, 0x02, 0x90, 0xce,
                0x26, 0x02, 0x00, 0xd1, 0xb4, 0xcf, 0xc1, 0x00, 0x38, 0xb2, 0x31, 0xff, 0xfe, 0xef,
                0x96, 0xf6, 0x80, 0x2b, 0x00, 0x14, 0x00, 0x02, 0x0d, 0x96, 0x26, 0x04, 0xa8, 0x80,
                0x00, 0x02, 0x00, 0xd1, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc5, 0x70, 0x01, 0x00, 0x20,
                0x00, 0x14, 0x00, 0x02, 0xb1, 0xdc, 0x07, 0x10, 0xa4, 0x93, 0xb2, 0x3a, 0xa7, 0x85,
                0xea, 0x38, 0xc2, 0x19, 0x62, 0x0c, 0xd7, 0x14,
            ],
            "[2602:d1:b4cf:c100:38b2:31ff:feef:96f6]:37070"
                .parse()
                .unwrap(),
        ),
    ];
    for (name, data, want) in cases {
        let (tx, addr) =
            stun::parse_binding_response(data).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&tx[..], &data[8..20], "{name}");
        assert_eq!(addr, want, "{name}");
    }
}

#[test]
fn response_layout_v4_v6_and_v4_mapped() {
    let v4: SocketAddr = "1.2.3.4:254".parse().unwrap();
    let r = stun::build_binding_response(TX, v4);
    assert_eq!(r.len(), 32);
    assert_eq!(&r[..4], &[0x01, 0x01, 0x00, 0x0c]);
    assert_eq!(&r[4..8], &stun::MAGIC_COOKIE);
    assert_eq!(&r[8..20], &TX);
    assert_eq!(&r[20..24], &[0x00, 0x20, 0x00, 0x08]);
    assert_eq!(r[24], 0);
    assert_eq!(r[25], 1);
    assert_eq!(&r[26..28], &(254u16 ^ 0x2112).to_be_bytes());
    assert_eq!(&r[28..32], &[1 ^ 0x21, 2 ^ 0x12, 3 ^ 0xa4, 4 ^ 0x42]);
    assert_eq!(stun::parse_binding_response(&r), Ok((TX, v4)));

    let v6: SocketAddr = "[1::4]:257".parse().unwrap();
    let r6 = stun::build_binding_response(TX, v6);
    assert_eq!(r6.len(), 44);
    assert_eq!(&r6[..4], &[0x01, 0x01, 0x00, 0x18]);
    assert_eq!(r6[25], 2);
    // Address bytes 4.. are XORed with the transaction id.
    let ip = Ipv6Addr::from([0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4]).octets();
    for i in 4..16 {
        assert_eq!(r6[28 + i], ip[i] ^ TX[i - 4]);
    }
    assert_eq!(stun::parse_binding_response(&r6), Ok((TX, v6)));

    // A v4-mapped source (dual-stack socket) is answered as family 1.
    let mapped = SocketAddr::new(
        IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()),
        3478,
    );
    let rm = stun::build_binding_response(TX, mapped);
    assert_eq!(rm.len(), 32);
    assert_eq!(rm[25], 1);
    assert_eq!(
        stun::parse_binding_response(&rm),
        Ok((TX, "10.0.0.1:3478".parse().unwrap()))
    );
}

#[test]
fn response_parser_unmaps_and_rejects() {
    // Family 2 carrying a v4-mapped address (what Go derper may send) is unmapped.
    let mut b = header(0x0101, 24, &TX);
    b.extend_from_slice(&[0x00, 0x20, 0x00, 0x14, 0x00, 0x02]);
    b.extend_from_slice(&(80u16 ^ 0x2112).to_be_bytes());
    let ip = Ipv4Addr::new(9, 8, 7, 6).to_ipv6_mapped().octets();
    for i in 0..16 {
        let x = if i < 4 {
            stun::MAGIC_COOKIE[i]
        } else {
            TX[i - 4]
        };
        b.push(ip[i] ^ x);
    }
    assert_eq!(
        stun::parse_binding_response(&b),
        Ok((TX, "9.8.7.6:80".parse().unwrap()))
    );

    let good = stun::build_binding_response(TX, "1.2.3.4:5".parse().unwrap());
    assert_eq!(
        stun::parse_binding_response(&good[..19]),
        Err(StunError::NotStun)
    );
    let req = stun::build_binding_request(TX);
    assert_eq!(
        stun::parse_binding_response(&req),
        Err(StunError::NotSuccessResponse)
    );
    // Header length beyond the packet.
    assert_eq!(
        stun::parse_binding_response(&good[..31]),
        Err(StunError::MalformedAttrs)
    );
    // No address attribute.
    assert_eq!(
        stun::parse_binding_response(&header(0x0101, 0, &TX)),
        Err(StunError::MalformedAttrs)
    );
    // Bad family.
    let mut fam = good.clone();
    fam[25] = 3;
    assert_eq!(
        stun::parse_binding_response(&fam),
        Err(StunError::MalformedAttrs)
    );
    // Attribute too short for its family.
    let mut short = header(0x0101, 8, &TX);
    short.extend_from_slice(&[0x00, 0x20, 0x00, 0x04, 0x00, 0x01, 0x00, 0x00]);
    assert_eq!(
        stun::parse_binding_response(&short),
        Err(StunError::MalformedAttrs)
    );
    // A request from someone else's software is not a response either.
    assert!(!stun::is_stun(&[]));
    assert!(stun::is_stun(&good));
}

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
    ]
}

proptest! {
    #[test]
    fn request_round_trips(tx in any::<[u8; 12]>()) {
        let req = stun::build_binding_request(tx);
        prop_assert_eq!(req.len(), 40);
        prop_assert_eq!(stun::parse_binding_request(&req), Ok(tx));
    }

    #[test]
    fn response_round_trips(tx in any::<[u8; 12]>(), addr in arb_addr()) {
        let want = match addr.ip() {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
                None => addr,
            },
            IpAddr::V4(_) => addr,
        };
        let r = stun::build_binding_response(tx, addr);
        prop_assert_eq!(r.len(), if want.is_ipv4() { 32 } else { 44 });
        prop_assert_eq!(stun::parse_binding_response(&r), Ok((tx, want)));
        // A response is never mistaken for a binding request.
        prop_assert!(stun::parse_binding_request(&r).is_err());
    }

    #[test]
    fn arbitrary_packets_never_panic(data in proptest::collection::vec(any::<u8>(), 0..120)) {
        proto::fuzzing::stun(&data);
    }
}
