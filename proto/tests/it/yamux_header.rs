//! yamux header codec against hashicorp/yamux v0.1.2's spec (12 bytes, big-endian).

use proto::yamux::*;

#[test]
fn open_stream_window_update_bytes() {
    // Client opening stream 1: WindowUpdate, SYN, stream 1, delta 0.
    let h = Header::window_update(Flags::SYN, 1, 0);
    assert_eq!(
        h.encode(),
        [0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00]
    );
    assert_eq!(Header::decode(&h.encode()).unwrap(), Some(h));
}

#[test]
fn all_types_and_fields_roundtrip() {
    let cases = [
        Header::data(Flags::ACK | Flags::FIN, 0x0102_0304, 0xa0b0_c0d0),
        Header::window_update(Flags::RST, u32::MAX, INITIAL_WINDOW),
        Header::ping(Flags::SYN, 0xdead_beef),
        Header::ping(Flags::ACK, 7),
        Header::go_away(GO_AWAY_PROTOCOL_ERROR),
    ];
    for h in cases {
        let b = h.encode();
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(Header::decode(&b).unwrap(), Some(h));
    }
    let b = Header::data(Flags(0x1234), 0x0102_0304, 0x0506_0708).encode();
    assert_eq!(b, [0, 0, 0x12, 0x34, 1, 2, 3, 4, 5, 6, 7, 8]);
    let g = Header::go_away(GO_AWAY_INTERNAL_ERROR).encode();
    assert_eq!(g, [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    assert_eq!(GO_AWAY_NORMAL, 0);
}

#[test]
fn short_input_is_incomplete() {
    let b = Header::ping(Flags::SYN, 1).encode();
    for i in 0..HEADER_LEN {
        assert_eq!(Header::decode(&b[..i]).unwrap(), None);
    }
    // Extra trailing bytes are ignored (they belong to the payload).
    let mut long = b.to_vec();
    long.extend_from_slice(b"payload");
    assert!(Header::decode(&long).unwrap().is_some());
}

#[test]
fn bad_version_and_type() {
    let mut b = Header::ping(Flags::SYN, 1).encode();
    b[0] = 1;
    assert_eq!(Header::decode(&b), Err(HeaderError::BadVersion(1)));
    let mut b = Header::ping(Flags::SYN, 1).encode();
    b[1] = 4;
    assert_eq!(Header::decode(&b), Err(HeaderError::BadType(4)));
}

#[test]
fn flags_and_constants() {
    assert_eq!(Flags::SYN.bits(), 1);
    assert_eq!(Flags::ACK.bits(), 2);
    assert_eq!(Flags::FIN.bits(), 4);
    assert_eq!(Flags::RST.bits(), 8);
    let mut f = Flags::NONE;
    f |= Flags::SYN;
    f |= Flags::FIN;
    assert!(f.contains(Flags::SYN) && f.contains(Flags::FIN) && !f.contains(Flags::ACK));
    assert_eq!(INITIAL_WINDOW, 262_144);
    assert_eq!(VERSION, 0);
    assert_eq!(Type::from_u8(3), Some(Type::GoAway));
    assert_eq!(Type::from_u8(200), None);
}
