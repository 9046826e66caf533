//! Handshake frames: ServerKey, ClientInfo and ServerInfo sealing/opening and every rejection.
use bytes::Bytes;
use proto::derp::{
    self, ClientInfo, Frame, FrameError, FrameHeader, FrameType, HandshakeError, InfoError,
    ServerInfo,
};
use proto::key::{BoxError, MeshKey, NodePrivate, NodePublic};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn keys() -> (NodePrivate, NodePrivate) {
    let mut rng = StdRng::seed_from_u64(42);
    (
        NodePrivate::generate(&mut rng),
        NodePrivate::generate(&mut rng),
    )
}

#[test]
fn server_key_frame_and_parse() {
    let (server, _) = keys();
    let f = derp::server_key_frame(&server.public());
    assert_eq!(f.len(), 45);
    assert_eq!(&f[..5], &[0x01, 0, 0, 0, 0x28]);
    assert_eq!(derp::parse_server_key(&f[5..]).unwrap(), server.public());
    // Extra bytes allowed up to 1 KiB.
    let mut longer = f[5..].to_vec();
    longer.resize(1024, 7);
    assert_eq!(derp::parse_server_key(&longer).unwrap(), server.public());
    longer.push(0);
    assert!(matches!(
        derp::parse_server_key(&longer),
        Err(HandshakeError::TooLong { max: 1024, .. })
    ));
    assert!(matches!(
        derp::parse_server_key(&f[5..44]),
        Err(HandshakeError::TooShort { min: 40, .. })
    ));
    let mut bad = f[5..].to_vec();
    bad[3] ^= 1;
    assert!(matches!(
        derp::parse_server_key(&bad),
        Err(HandshakeError::Frame(FrameError::BadMagic))
    ));
    let zero = derp::server_key_frame(&NodePublic::ZERO);
    assert!(matches!(
        derp::parse_server_key(&zero[5..]),
        Err(HandshakeError::ZeroKey)
    ));
}

#[test]
fn client_info_seal_open_round_trip() {
    let (server, client) = keys();
    let info = ClientInfo {
        mesh_key: Some(MeshKey::from_bytes([3; 32])),
        version: 2,
        can_ack_pings: true,
        is_prober: false,
        app_name: "tailnetd-test".into(),
    };
    let payload = derp::seal_client_info(&client, &server.public(), &info, [5; 24]);
    assert_eq!(&payload[..32], client.public().as_bytes());
    assert_eq!(&payload[32..56], &[5; 24]);
    assert_eq!(payload.len(), 32 + 24 + 16 + info.to_json().len());
    let (who, got) = derp::open_client_info(&server, &payload).unwrap();
    assert_eq!(who, client.public());
    assert_eq!(got, info);

    // Whole-frame form and the section 1.4 vector: header 02 00 00 00 68 for the 32-byte JSON.
    let plain = ClientInfo {
        version: 2,
        can_ack_pings: true,
        ..Default::default()
    };
    let frame = derp::client_info_frame(&client, &server.public(), &plain, [6; 24]);
    assert_eq!(&frame[..5], &[0x02, 0x00, 0x00, 0x00, 0x68]);
    let h = FrameHeader::decode(&frame).unwrap();
    assert!(h.validate_client_info().is_ok());
    match Frame::decode_frame(frame.clone()).unwrap() {
        Frame::ClientInfo { key, sealed } => {
            assert_eq!(key, client.public());
            assert_eq!(sealed.len(), 24 + 16 + 32);
        }
        other => panic!("{other:?}"),
    }
    let (_, got) = derp::open_client_info(&server, &frame[5..]).unwrap();
    assert_eq!(got, plain);
    assert!(derp::expect_frame(0x02, frame.slice(5..), FrameType::ClientInfo).is_ok());
    assert!(matches!(
        derp::expect_frame(0x04, frame.slice(5..), FrameType::ClientInfo),
        Err(HandshakeError::Frame(FrameError::UnexpectedType {
            got: 0x04,
            want: 0x02
        }))
    ));
}

#[test]
fn client_info_rejections() {
    let (server, client) = keys();
    let info = ClientInfo {
        version: 2,
        can_ack_pings: true,
        ..Default::default()
    };
    let payload = derp::seal_client_info(&client, &server.public(), &info, [1; 24]);

    // Too short (< 56).
    assert!(matches!(
        derp::open_client_info(&server, &payload[..55]),
        Err(HandshakeError::TooShort { len: 55, min: 56 })
    ));
    // 56..71 bytes: key + nonce but no room for the tag.
    assert!(matches!(
        derp::open_client_info(&server, &payload[..60]),
        Err(HandshakeError::Box(BoxError::TooShort(28)))
    ));
    // Too long (> 256 KiB).
    let mut huge = payload.clone();
    huge.resize((256 << 10) + 1, 0);
    assert!(matches!(
        derp::open_client_info(&server, &huge),
        Err(HandshakeError::TooLong { max: 262144, .. })
    ));
    // Zero client key.
    let mut zero = payload.clone();
    zero[..32].fill(0);
    assert!(matches!(
        derp::open_client_info(&server, &zero),
        Err(HandshakeError::ZeroKey)
    ));
    // Box failure: flipped ciphertext byte, wrong claimed key, wrong server.
    let mut flipped = payload.clone();
    *flipped.last_mut().unwrap() ^= 0x80;
    assert!(matches!(
        derp::open_client_info(&server, &flipped),
        Err(HandshakeError::Box(BoxError::Open))
    ));
    let mut wrong_key = payload.clone();
    wrong_key[0] ^= 1;
    assert!(matches!(
        derp::open_client_info(&server, &wrong_key),
        Err(HandshakeError::Box(BoxError::Open))
    ));
    let other = NodePrivate::from_bytes([9; 32]);
    assert!(matches!(
        derp::open_client_info(&other, &payload),
        Err(HandshakeError::Box(BoxError::Open))
    ));
    // Bad JSON inside a valid box.
    let mut bad_json = client.public().as_bytes().to_vec();
    bad_json.extend(client.seal_to(&server.public(), b"{not json", [2; 24]));
    assert!(matches!(
        derp::open_client_info(&server, &bad_json),
        Err(HandshakeError::Info(InfoError::Json(_)))
    ));
    let mut bad_mesh = client.public().as_bytes().to_vec();
    bad_mesh.extend(client.seal_to(&server.public(), br#"{"meshKey":"abc"}"#, [2; 24]));
    let err = derp::open_client_info(&server, &bad_mesh).unwrap_err();
    assert!(matches!(
        err,
        HandshakeError::Info(InfoError::InvalidMeshKey)
    ));
    assert!(err.to_string().contains("invalid mesh key"));
}

#[test]
fn server_info_seal_open() {
    let (server, client) = keys();
    let payload =
        derp::seal_server_info(&server, &client.public(), &ServerInfo::current(), [4; 24]);
    assert_eq!(payload.len(), 53);
    let frame = derp::server_info_frame(&server, &client.public(), &ServerInfo::current(), [4; 24]);
    assert_eq!(&frame[..5], &[0x03, 0x00, 0x00, 0x00, 0x35]);
    assert_eq!(&frame[5..], &payload[..]);
    assert!(matches!(
        Frame::decode_frame(frame.clone()).unwrap(),
        Frame::ServerInfo { .. }
    ));
    assert_eq!(
        derp::open_server_info(&client, &server.public(), &payload).unwrap(),
        ServerInfo::current()
    );

    // Rejections.
    assert!(matches!(
        derp::open_server_info(&client, &server.public(), &payload[..39]),
        Err(HandshakeError::TooShort { min: 40, .. })
    ));
    let mut huge = payload.clone();
    huge.resize((1 << 20) + 1, 0);
    assert!(matches!(
        derp::open_server_info(&client, &server.public(), &huge),
        Err(HandshakeError::TooLong { .. })
    ));
    assert!(matches!(
        derp::open_server_info(&client, &NodePublic::ZERO, &payload),
        Err(HandshakeError::ZeroKey)
    ));
    let mut flipped = payload.clone();
    flipped[30] ^= 1;
    assert!(matches!(
        derp::open_server_info(&client, &server.public(), &flipped),
        Err(HandshakeError::Box(BoxError::Open))
    ));
    let not_json = server.seal_to(&client.public(), b"[1]", [1; 24]);
    assert!(matches!(
        derp::open_server_info(&client, &server.public(), &not_json),
        Err(HandshakeError::Info(InfoError::Json(_)))
    ));
}

#[test]
fn full_handshake_between_two_parties() {
    let (server, client) = keys();
    // Server → client: ServerKey.
    let sk = derp::server_key_frame(&server.public());
    let h = FrameHeader::decode(&sk).unwrap();
    let server_pub = match derp::expect_frame(
        h.typ,
        Bytes::copy_from_slice(&sk[5..]),
        FrameType::ServerKey,
    )
    .unwrap()
    {
        Frame::ServerKey { key, .. } => key,
        other => panic!("{other:?}"),
    };
    // Client → server: ClientInfo.
    let ci = derp::client_info_frame(
        &client,
        &server_pub,
        &ClientInfo {
            version: 2,
            can_ack_pings: true,
            ..Default::default()
        },
        [7; 24],
    );
    let (client_pub, info) = derp::open_client_info(&server, &ci[5..]).unwrap();
    assert_eq!(client_pub, client.public());
    assert!(info.can_ack_pings);
    // Server → client: ServerInfo.
    let si = derp::server_info_frame(&server, &client_pub, &ServerInfo::current(), [8; 24]);
    assert_eq!(
        derp::open_server_info(&client, &server_pub, &si[5..])
            .unwrap()
            .version,
        2
    );
}
