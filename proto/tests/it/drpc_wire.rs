//! dRPC wire tests: byte vectors from the Coder reference (§3.3.8), varints, splitting and the
//! reader rules of drpcwire (monotonic ids, kind changes, 4 MiB cap, ignored control frames).

use bytes::{Bytes, BytesMut};
use proto::drpc::*;
use proto::tailnet::v2::methods;

fn frame(stream: u64, msg: u64, kind: Kind, done: bool, data: &[u8]) -> Frame {
    Frame {
        stream_id: stream,
        message_id: msg,
        kind,
        done,
        control: false,
        data: Bytes::copy_from_slice(data),
    }
}

fn packet_bytes(stream: u64, msg: u64, kind: Kind, data: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_packet(stream, msg, kind, data, &mut out);
    out.to_vec()
}

#[test]
fn control_bytes_match_reference() {
    let cases = [
        (Kind::Invoke, false, 0x03),
        (Kind::Message, false, 0x05),
        (Kind::Error, false, 0x07),
        (Kind::Cancel, true, 0x89),
        (Kind::Close, false, 0x0b),
        (Kind::CloseSend, false, 0x0d),
        (Kind::InvokeMetadata, false, 0x0f),
    ];
    for (kind, control, byte) in cases {
        let mut f = frame(1, 1, kind, true, b"");
        f.control = control;
        assert_eq!(f.control_byte(), byte, "{kind:?}");
        f.done = false;
        assert_eq!(f.control_byte(), byte - 1, "{kind:?} fragment");
    }
}

#[test]
fn kind_bits_roundtrip() {
    for v in 0u8..64 {
        assert_eq!(Kind::from_bits(v).to_bits(), v);
    }
    assert_eq!(Kind::from_bits(0), Kind::Unknown(0));
    assert!(!Kind::Unknown(9).is_known());
    assert!(Kind::InvokeMetadata.is_known());
}

#[test]
fn invoke_coordinate_bytes() {
    let bytes = packet_bytes(1, 1, Kind::Invoke, methods::COORDINATE.as_bytes());
    assert_eq!(&bytes[..4], &[0x03, 0x01, 0x01, 0x24]);
    assert_eq!(&bytes[4..], b"/coder.tailnet.v2.Tailnet/Coordinate");
    assert_eq!(bytes.len(), 4 + 36);
}

#[test]
fn stream_derp_maps_request_sequence() {
    let mut out = BytesMut::new();
    encode_packet(
        1,
        1,
        Kind::Invoke,
        methods::STREAM_DERP_MAPS.as_bytes(),
        &mut out,
    );
    encode_packet(1, 2, Kind::Message, b"", &mut out);
    encode_packet(1, 3, Kind::CloseSend, b"", &mut out);
    let mut want = vec![0x03, 0x01, 0x01, 0x28];
    want.extend_from_slice(b"/coder.tailnet.v2.Tailnet/StreamDERPMaps");
    want.extend_from_slice(&[0x05, 0x01, 0x02, 0x00]);
    want.extend_from_slice(&[0x0d, 0x01, 0x03, 0x00]);
    assert_eq!(out.to_vec(), want);

    // And the reader reassembles the same three packets.
    let mut asm = PacketAssembler::new();
    let mut pkts = Vec::new();
    asm.feed(&mut out, |p| pkts.push(p)).unwrap();
    assert!(out.is_empty());
    assert_eq!(pkts.len(), 3);
    assert_eq!(pkts[0].kind, Kind::Invoke);
    assert_eq!(&pkts[0].data[..], methods::STREAM_DERP_MAPS.as_bytes());
    assert_eq!(
        (pkts[1].kind, pkts[1].message_id, pkts[1].data.len()),
        (Kind::Message, 2, 0)
    );
    assert_eq!(pkts[2].kind, Kind::CloseSend);
}

#[test]
fn unknown_rpc_error_bytes() {
    let name = "/coder.tailnet.v2.Tailnet/Nope";
    let msg = unknown_rpc_message(name);
    assert_eq!(
        msg,
        "protocol error: unknown rpc: \"/coder.tailnet.v2.Tailnet/Nope\""
    );
    let body = encode_error(0, &msg);
    let bytes = packet_bytes(1, 1, Kind::Error, &body);
    assert_eq!(&bytes[..3], &[0x07, 0x01, 0x01]);
    assert_eq!(bytes[3] as usize, 8 + msg.len());
    assert_eq!(&bytes[4..12], &[0u8; 8]);
    assert_eq!(&bytes[12..], msg.as_bytes());
    let (code, text) = decode_error(&body);
    assert_eq!(code, 0);
    assert!(is_unimplemented(code, &text));
}

#[test]
fn error_body_roundtrip_and_short_bodies() {
    let body = encode_error(UNIMPLEMENTED, "nope");
    assert_eq!(&body[..8], &[0, 0, 0, 0, 0, 0, 0, 12]);
    assert_eq!(decode_error(&body), (12, "nope".to_string()));
    assert!(is_unimplemented(12, ""));
    assert!(!is_unimplemented(2, "boom"));
    // Shorter than 8 bytes: code 0, whole body is the message (drpc UnmarshalError).
    assert_eq!(decode_error(b"short"), (0, "short".to_string()));
    assert_eq!(decode_error(b""), (0, String::new()));
    // Invalid UTF-8 is replaced, not rejected.
    let mut b = encode_error(1, "").to_vec();
    b.push(0xff);
    assert_eq!(decode_error(&b).0, 1);
}

#[test]
fn varints() {
    for v in [
        0u64,
        1,
        127,
        128,
        300,
        16_383,
        16_384,
        u32::MAX as u64,
        u64::MAX - 1,
        u64::MAX,
    ] {
        let mut b = BytesMut::new();
        put_varint(v, &mut b);
        assert_eq!(b.len(), varint_len(v));
        assert_eq!(read_varint(&b).unwrap(), Some((v, b.len())));
        // Every strict prefix is incomplete.
        for i in 0..b.len() {
            assert_eq!(read_varint(&b[..i]).unwrap(), None);
        }
    }
    assert_eq!(varint_len(u64::MAX), 10);
    // 10th byte may only be 0 or 1.
    let mut over = vec![0xff; 9];
    over.push(0x02);
    assert_eq!(read_varint(&over), Err(DrpcError::VarintOverflow));
    // 11-byte varint.
    let too_long = vec![0x80; 11];
    assert_eq!(read_varint(&too_long), Err(DrpcError::VarintOverflow));
    assert_eq!(read_varint(&[0x80; 10]), Err(DrpcError::VarintOverflow));
    assert_eq!(read_varint(&[0x80; 9]).unwrap(), None);
}

#[test]
fn frame_parse_incomplete_and_malformed() {
    let bytes = packet_bytes(5, 7, Kind::Message, b"hello");
    for i in 0..bytes.len() {
        assert_eq!(Frame::parse(&bytes[..i]).unwrap(), None, "prefix {i}");
        let mut b = BytesMut::from(&bytes[..i]);
        assert_eq!(Frame::decode(&mut b).unwrap(), None);
        assert_eq!(b.len(), i, "decode must not consume an incomplete frame");
    }
    let (f, n) = Frame::parse(&bytes).unwrap().unwrap();
    assert_eq!(n, bytes.len());
    assert_eq!(f, frame(5, 7, Kind::Message, true, b"hello"));
    assert_eq!(f.encoded_len(), bytes.len());

    // Overflowing varint in the stream id.
    let mut bad = vec![0x05];
    bad.extend_from_slice(&[0xff; 10]);
    assert_eq!(Frame::parse(&bad), Err(DrpcError::VarintOverflow));
    // Data length beyond the packet cap.
    let mut big = BytesMut::from(&[0x05u8, 0x01, 0x01][..]);
    put_varint((MAX_PACKET_SIZE + 1) as u64, &mut big);
    assert!(matches!(
        Frame::parse(&big),
        Err(DrpcError::FrameTooLarge(_))
    ));
}

#[test]
fn encode_packet_splits_at_64k() {
    let data: Vec<u8> = (0..(2 * MAX_FRAME_DATA + 10)).map(|i| i as u8).collect();
    let mut out = BytesMut::new();
    encode_packet(1, 1, Kind::Message, &data, &mut out);
    let mut frames = Vec::new();
    while let Some(f) = Frame::decode(&mut out).unwrap() {
        frames.push(f);
    }
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[0].data.len(), MAX_FRAME_DATA);
    assert_eq!(frames[1].data.len(), MAX_FRAME_DATA);
    assert_eq!(frames[2].data.len(), 10);
    assert!(!frames[0].done && !frames[1].done && frames[2].done);
    assert!(frames.iter().all(|f| f.kind == Kind::Message));

    // Exactly 64 KiB is one frame.
    let mut out = BytesMut::new();
    encode_packet(1, 1, Kind::Message, &data[..MAX_FRAME_DATA], &mut out);
    let f = Frame::decode(&mut out).unwrap().unwrap();
    assert!(f.done);
    assert!(out.is_empty());

    // Reassembly gives back the original.
    let mut out = BytesMut::new();
    encode_packet(1, 1, Kind::Message, &data, &mut out);
    let mut asm = PacketAssembler::new();
    let mut got = Vec::new();
    asm.feed(&mut out, |p| got.push(p)).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].data[..], &data[..]);
}

#[test]
fn assembler_first_id_and_monotonicity() {
    let mut asm = PacketAssembler::new();
    assert_eq!(asm.expected_id(), (1, 1));
    // (0, 5) < (1, 1).
    assert!(matches!(
        asm.push(frame(0, 5, Kind::Message, true, b"")),
        Err(DrpcError::MonotonicityViolation { .. })
    ));

    let mut asm = PacketAssembler::new();
    let p = asm
        .push(frame(1, 1, Kind::Invoke, true, b"x"))
        .unwrap()
        .unwrap();
    assert_eq!((p.stream_id, p.message_id), (1, 1));
    assert_eq!(asm.expected_id(), (1, 2));
    // Replaying the same id is a violation.
    assert!(matches!(
        asm.push(frame(1, 1, Kind::Message, true, b"")),
        Err(DrpcError::MonotonicityViolation {
            got_stream: 1,
            got_message: 1,
            want_stream: 1,
            want_message: 2
        })
    ));

    // Gaps are allowed; a higher stream resets the message numbering lexicographically.
    let mut asm = PacketAssembler::new();
    asm.push(frame(1, 1, Kind::Invoke, true, b""))
        .unwrap()
        .unwrap();
    asm.push(frame(1, 5, Kind::Message, true, b""))
        .unwrap()
        .unwrap();
    asm.push(frame(3, 1, Kind::Invoke, true, b""))
        .unwrap()
        .unwrap();
    assert_eq!(asm.expected_id(), (3, 2));
    assert!(asm.push(frame(2, 9, Kind::Message, true, b"")).is_err());
}

#[test]
fn assembler_new_id_discards_partial() {
    let mut asm = PacketAssembler::new();
    assert!(asm
        .push(frame(1, 1, Kind::Message, false, b"abc"))
        .unwrap()
        .is_none());
    assert_eq!(asm.buffered(), 3);
    let p = asm
        .push(frame(1, 2, Kind::Message, true, b"xyz"))
        .unwrap()
        .unwrap();
    assert_eq!(&p.data[..], b"xyz");
    assert_eq!(p.message_id, 2);
    assert_eq!(asm.discarded_partials(), 1);
    // The discarded packet's id can no longer be used.
    assert!(asm.push(frame(1, 1, Kind::Message, true, b"")).is_err());

    // After starting (1,5) partially, a frame for (1,3) is below the new expected id.
    let mut asm = PacketAssembler::new();
    asm.push(frame(1, 5, Kind::Message, false, b"a")).unwrap();
    assert_eq!(asm.expected_id(), (1, 5));
    assert!(asm.push(frame(1, 3, Kind::Message, true, b"")).is_err());
}

#[test]
fn assembler_kind_change_is_error() {
    let mut asm = PacketAssembler::new();
    asm.push(frame(1, 1, Kind::Message, false, b"a")).unwrap();
    assert_eq!(
        asm.push(frame(1, 1, Kind::Error, true, b"b")),
        Err(DrpcError::KindChange)
    );
}

#[test]
fn assembler_multi_frame_packet() {
    let mut asm = PacketAssembler::new();
    assert!(asm
        .push(frame(1, 1, Kind::Message, false, b"ab"))
        .unwrap()
        .is_none());
    assert!(asm
        .push(frame(1, 1, Kind::Message, false, b""))
        .unwrap()
        .is_none());
    let p = asm
        .push(frame(1, 1, Kind::Message, true, b"cd"))
        .unwrap()
        .unwrap();
    assert_eq!(&p.data[..], b"abcd");
    assert_eq!(asm.buffered(), 0);
}

#[test]
fn assembler_data_overflow() {
    let chunk = vec![0u8; MAX_FRAME_DATA];
    let mut asm = PacketAssembler::new();
    let frames = MAX_PACKET_SIZE / MAX_FRAME_DATA;
    for _ in 0..frames {
        assert!(asm
            .push(frame(1, 1, Kind::Message, false, &chunk))
            .unwrap()
            .is_none());
    }
    assert_eq!(asm.buffered(), MAX_PACKET_SIZE);
    assert_eq!(
        asm.push(frame(1, 1, Kind::Message, true, b"x")),
        Err(DrpcError::DataOverflow)
    );

    // Exactly 4 MiB is accepted.
    let mut asm = PacketAssembler::new();
    for _ in 0..frames - 1 {
        asm.push(frame(1, 1, Kind::Message, false, &chunk)).unwrap();
    }
    let p = asm
        .push(frame(1, 1, Kind::Message, true, &chunk))
        .unwrap()
        .unwrap();
    assert_eq!(p.data.len(), MAX_PACKET_SIZE);
}

#[test]
fn assembler_ignores_unknown_control_frames() {
    let mut asm = PacketAssembler::new();
    let mut f = frame(0, 0, Kind::Unknown(42), true, b"future");
    f.control = true;
    // Ignored even though its id is below the expected one.
    assert!(asm.push(f).unwrap().is_none());
    assert_eq!(asm.ignored_frames(), 1);
    assert_eq!(asm.expected_id(), (1, 1));

    // A known kind with the control bit (soft cancel) is delivered.
    let mut c = frame(1, 1, Kind::Cancel, true, b"");
    c.control = true;
    let p = asm.push(c).unwrap().unwrap();
    assert_eq!(p.kind, Kind::Cancel);
    assert!(p.control);

    // An unknown kind without the control bit is passed on for the consumer to reject.
    let p = asm
        .push(frame(1, 2, Kind::Unknown(9), true, b""))
        .unwrap()
        .unwrap();
    assert_eq!(p.kind, Kind::Unknown(9));
}

#[test]
fn feed_keeps_incomplete_tail() {
    let mut all = BytesMut::new();
    encode_packet(1, 1, Kind::Invoke, methods::COORDINATE.as_bytes(), &mut all);
    encode_packet(1, 2, Kind::Message, &[0x12, 0x00], &mut all);
    let all = all.freeze();
    // Feed one byte at a time.
    let mut asm = PacketAssembler::new();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in all.iter() {
        buf.extend_from_slice(&[*b]);
        asm.feed(&mut buf, |p| got.push(p)).unwrap();
    }
    assert!(buf.is_empty());
    assert_eq!(got.len(), 2);
    assert_eq!(&got[1].data[..], &[0x12, 0x00]);
}

#[test]
fn invoke_metadata_roundtrip() {
    let body = encode_metadata([("authorization", "Bearer x"), ("k", "")]);
    assert_eq!(body[0], 0x0a);
    let m = decode_metadata(&body).unwrap();
    assert_eq!(m.len(), 2);
    assert_eq!(m["authorization"], "Bearer x");
    assert_eq!(m["k"], "");
    // Hand-built: one entry with key "a" value "b", plus an unknown varint field 2.
    let raw = [0x0a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'b', 0x10, 0x07];
    let m = decode_metadata(&raw).unwrap();
    assert_eq!(m.get("a").map(String::as_str), Some("b"));
    assert!(decode_metadata(&[]).unwrap().is_empty());
    // Truncated entries are errors, not panics.
    assert!(decode_metadata(&[0x0a, 0x05, 0x0a]).is_err());
    assert!(decode_metadata(&[0x0a]).is_err());
    assert!(decode_metadata(&[0x0b]).is_err()); // wire type 3 unsupported
}

#[test]
fn cancel_with_control_bit_encodes_0x89() {
    let mut out = BytesMut::new();
    encode_packet_with(1, 4, Kind::Cancel, true, b"", &mut out);
    assert_eq!(out.to_vec(), vec![0x89, 0x01, 0x04, 0x00]);
}
