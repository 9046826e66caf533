//! Replays every file in `fuzz/corpus/<target>/` (repository root) through the `proto::fuzzing`
//! function of the same name, so the corpora the fuzzer grew run in the test command on stable,
//! without nightly/cargo-fuzz. A target without a (non-empty) corpus directory fails the test;
//! that every corpus directory belongs to a target is checked by the binary crate's
//! `fuzz_corpora_match_targets` test.
//!
//! `cargo test -p proto --test it -- --ignored write_seed_corpus` regenerates the DERP
//! and STUN seeds from the codecs themselves.
use std::fs;
use std::path::{Path, PathBuf};

type Target = fn(&[u8]);

/// Fuzz target name → entry point. Add new targets here together with their corpus directory
/// and their `[[bin]]` in `fuzz/Cargo.toml`.
const TARGETS: &[(&str, Target)] = &[
    ("derp_frames", proto::fuzzing::derp_frames),
    ("derp_handshake", proto::fuzzing::derp_handshake),
    ("client_info_json", proto::fuzzing::client_info_json),
    ("stun", proto::fuzzing::stun),
    ("drpc", proto::fuzzing::drpc),
    ("v1_json", proto::fuzzing::v1_json),
    ("derp_map_json", proto::fuzzing::derp_map_json),
    ("yamux_header", proto::fuzzing::yamux_header),
    ("quic_mesh", proto::fuzzing::quic_mesh),
];

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join("corpus")
}

#[test]
fn replay_fuzz_corpora() {
    let root = corpus_root();
    for (name, f) in TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("fuzz target {name:?}: reading {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "corpus directory {name:?} is empty");
        for file in &files {
            let data = fs::read(file).unwrap();
            let res = std::panic::catch_unwind(|| f(&data));
            assert!(res.is_ok(), "{name}: {} panicked", file.display());
        }
    }
}

/// Writes the DERP/STUN seed files. Ignored: run explicitly to regenerate.
#[test]
#[ignore = "regenerates committed seed files"]
fn write_seed_corpus() {
    use bytes::{Bytes, BytesMut};
    use proto::derp::{self, ClientInfo, Frame, PeerGoneReason, PeerPresentFlags, ServerInfo};
    use proto::key::{MeshKey, NodePrivate, NodePublic};
    use proto::stun;

    let root = corpus_root();
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = root.join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), data).unwrap();
    };
    let enc = |f: &Frame| {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        b.to_vec()
    };
    // Same fixed keys as proto::fuzzing, so sealed seeds open there.
    let server = NodePrivate::from_bytes([0x11; 32]);
    let client = NodePrivate::from_bytes([0x22; 32]);
    let k = |b: u8| NodePublic::from_bytes([b; 32]);
    let mut disco = derp::DISCO_MAGIC.to_vec();
    disco.resize(62, 0xd1);

    let frames: Vec<(&str, Vec<u8>)> = vec![
        (
            "server_key",
            derp::server_key_frame(&server.public()).to_vec(),
        ),
        (
            "client_info",
            derp::client_info_frame(
                &client,
                &server.public(),
                &ClientInfo {
                    version: 2,
                    can_ack_pings: true,
                    ..Default::default()
                },
                [1; 24],
            )
            .to_vec(),
        ),
        (
            "server_info",
            derp::server_info_frame(&server, &client.public(), &ServerInfo::current(), [2; 24])
                .to_vec(),
        ),
        (
            "send_packet",
            enc(&Frame::SendPacket {
                dst: k(1),
                packet: Bytes::from(vec![0x45; 100]),
            }),
        ),
        (
            "send_disco",
            enc(&Frame::SendPacket {
                dst: k(1),
                packet: Bytes::from(disco),
            }),
        ),
        (
            "recv_packet",
            enc(&Frame::RecvPacket {
                src: k(2),
                packet: Bytes::from_static(b"wireguard"),
            }),
        ),
        (
            "forward_packet",
            enc(&Frame::ForwardPacket {
                src: k(3),
                dst: k(4),
                packet: Bytes::from_static(b"fwd"),
            }),
        ),
        ("keep_alive", enc(&Frame::KeepAlive)),
        (
            "note_preferred",
            enc(&Frame::NotePreferred { preferred: true }),
        ),
        (
            "peer_gone",
            enc(&Frame::PeerGone {
                peer: k(5),
                reason: PeerGoneReason::NotHere,
            }),
        ),
        ("peer_gone_old", {
            let mut b = vec![0x08, 0, 0, 0, 32];
            b.extend_from_slice(&[5; 32]);
            b
        }),
        (
            "peer_present",
            enc(&Frame::PeerPresent {
                peer: k(6),
                addr: Some("1.2.3.4:41641".parse().unwrap()),
                flags: PeerPresentFlags::IS_REGULAR,
            }),
        ),
        ("watch_conns", enc(&Frame::WatchConns)),
        ("close_peer", enc(&Frame::ClosePeer { peer: k(7) })),
        (
            "ping",
            enc(&Frame::Ping {
                data: [1, 2, 3, 4, 5, 6, 7, 8],
            }),
        ),
        ("pong", enc(&Frame::Pong { data: [8; 8] })),
        (
            "health",
            enc(&Frame::Health {
                problem: Bytes::from_static(b"duplicate client"),
            }),
        ),
        (
            "restarting",
            enc(&Frame::Restarting {
                reconnect_in_ms: 1000,
                try_for_ms: 30000,
            }),
        ),
        (
            "unknown",
            enc(&Frame::Unknown {
                typ: 0x0c,
                payload: Bytes::from_static(b"?"),
            }),
        ),
        (
            "truncated",
            vec![0x04, 0, 0, 0, 100, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        ),
        ("huge_length", vec![0x04, 0xff, 0xff, 0xff, 0xff, 0, 0]),
        ("short_header", vec![0x04, 0, 0]),
    ];
    let mut stream = Vec::new();
    for (name, bytes) in &frames {
        write("derp_frames", &format!("{name}.bin"), bytes);
        if !name.starts_with("truncated") && !name.starts_with("huge") && !name.starts_with("short")
        {
            stream.extend_from_slice(bytes);
        }
    }
    write("derp_frames", "stream_all.bin", &stream);

    let mesh = MeshKey::from_bytes([0x6d; 32]);
    let hs: Vec<(&str, Vec<u8>)> = vec![
        ("server_key_payload.bin", derp::server_key_frame(&server.public())[5..].to_vec()),
        (
            "client_info_payload.bin",
            derp::seal_client_info(
                &client,
                &server.public(),
                &ClientInfo {
                    mesh_key: Some(mesh),
                    version: 2,
                    can_ack_pings: true,
                    is_prober: true,
                    app_name: "seed".into(),
                },
                [3; 24],
            ),
        ),
        (
            "server_info_payload.bin",
            derp::seal_server_info(
                &server,
                &client.public(),
                &ServerInfo {
                    version: 2,
                    token_bucket_bytes_per_second: 1000,
                    token_bucket_bytes_burst: 2000,
                },
                [4; 24],
            ),
        ),
        ("json_client_info.json", br#"{"version":2,"CanAckPings":true}"#.to_vec()),
        (
            "json_go_case.json",
            br#"{"Version":5,"MeshKey":"6d529e9d4ef632d22d4a4214cb49da8f1ba1b72697061fb24e312984c35ec8d8"}"#
                .to_vec(),
        ),
        ("json_bad_mesh.json", br#"{"version":5,"meshKey":"abcdefg"}"#.to_vec()),
        (
            "json_server_info.json",
            br#"{"version":2,"TokenBucketBytesPerSecond":1,"TokenBucketBytesBurst":2,"x":[null]}"#
                .to_vec(),
        ),
        ("json_null.json", b"null".to_vec()),
        ("json_empty.json", b"{}".to_vec()),
    ];
    for (name, bytes) in &hs {
        write("derp_handshake", name, bytes);
    }

    let tx = [7u8; 12];
    let req = stun::build_binding_request(tx);
    write("stun", "request.bin", &req);
    write("stun", "request_truncated.bin", &req[..30]);
    write(
        "stun",
        "response_v4.bin",
        &stun::build_binding_response(tx, "203.0.113.9:41641".parse().unwrap()),
    );
    write(
        "stun",
        "response_v6.bin",
        &stun::build_binding_response(tx, "[2001:db8::1]:3478".parse().unwrap()),
    );
    let mut with_tail = req.clone();
    with_tail.extend_from_slice(&[0x80, 0x22, 0, 3, b'a', b'b', b'c', 0]);
    write("stun", "request_extra_attr.bin", &with_tail);
}
