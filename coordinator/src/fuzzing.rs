//! Fuzz entry points of the coordinator, shared by the cargo-fuzz targets in `fuzz/` (repository
//! root) and by the corpus replay test at the bottom of this file, which runs in `cargo test`.
//!
//! Why here: the targets drive crate-private parts (the v2 service behind its WebSocket, the
//! peer graph with a session's authorization) exactly as production does, with no second copy.
//! Built only for tests and with the `fuzzing` feature (which the fuzz crate enables): it needs
//! tokio's paused clock, so that keepalives, write deadlines and close grace periods cost no
//! wall time and every run is deterministic.
//!
//! Each function takes arbitrary bytes and must never panic, hang or grow memory without bound.
//! The stateful ones play the bytes as the peer (then end the peer's input) over an in-memory
//! duplex on a fresh current-thread runtime, and assert that the server side ends on its own
//! within [`DEADLINE`] of virtual time: a session that outlives its peer's input is a leak.
//! Keep it a flat list of `pub fn name(data: &[u8])`, one per fuzz target.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use proto::tailnet::v2::CoordinateRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

use crate::authz::CoordinateeAuth;
use crate::graph::{GraphConfig, PeerGraph};
use crate::rpc::wsio::{
    WsConfig, WsIo, RECOMMENDED_MAX_MESSAGE_SIZE, RECOMMENDED_READ_BUFFER_SIZE,
};
use crate::rpc::yamux::{self, Session};
use crate::service::{PeerKind, V2Peer};
use crate::{Coordinator, CoordinatorConfig, DerpMapConfig, DerpMapSource, StaticAuthenticator};

/// Virtual time the server side has to end after the peer's input ended (well past every
/// keepalive, write timeout and close grace of the defaults).
pub const DEADLINE: Duration = Duration::from_secs(3600);

/// The agent every stateful target's peers belong to.
pub const AGENT: Uuid = Uuid::from_u128(0x0a6e_0000_0000_4000_8000_0000_0000_0001);
/// A client of [`AGENT`].
pub const CLIENT: Uuid = Uuid::from_u128(0xc11e_0000_0000_4000_8000_0000_0000_0002);

/// The first byte picks the write chunk size (1..=256 bytes, or whole).
fn split_seed(data: &[u8]) -> Option<(u8, &[u8])> {
    let (&seed, rest) = data.split_first()?;
    Some((seed, rest))
}

fn chunk_of(seed: u8) -> usize {
    if seed == 0 {
        usize::MAX
    } else {
        usize::from(seed)
    }
}

/// `CoordinateRequest`s decoded from the bytes and applied to a peer graph holding an agent and
/// a client of it, as the `Coordinate` stream does. Framing: `[who][len:u16 BE][protobuf]...`
/// (`who` bit 0: agent or client; bit 1: reconnect that peer first). Responses are drained
/// after every request.
pub fn coordinate_request(data: &[u8]) {
    let registry = prometheus::Registry::new();
    let graph = PeerGraph::with_shards(GraphConfig::default(), 2, &registry).expect("graph");
    let connect = |who: u8| {
        if who & 1 == 0 {
            graph.connect(AGENT, "agent".into(), CoordinateeAuth::Agent { id: AGENT })
        } else {
            graph.connect(
                CLIENT,
                "client".into(),
                CoordinateeAuth::Client { agent_id: AGENT },
            )
        }
    };
    let mut peers = [connect(0), connect(1)];
    let mut rest = data;
    while let [who, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (msg, next) = tail.split_at(len);
        rest = next;
        let i = usize::from(who & 1);
        if who & 2 != 0 {
            peers[i] = connect(*who);
        }
        let Ok(req) = CoordinateRequest::decode(msg) else {
            continue;
        };
        if graph.handle(&peers[i].0, req).is_err() {
            peers[i] = connect(*who);
        }
        for (_, rx) in peers.iter_mut() {
            while rx.try_recv().is_ok() {}
        }
    }
    graph.shutdown();
}

/// A whole yamux server session fed arbitrary bytes. Every stream the peer opens is accepted,
/// read to its end and echoed back (exercising windows in both directions). The session, and
/// every stream of it, must end once the peer's input ends.
pub fn yamux_session(data: &[u8]) {
    let Some((seed, input)) = split_seed(data) else {
        return;
    };
    fuzzkit::run_bounded("yamux session", DEADLINE, async move {
        let (client, server) = tokio::io::duplex(16 * 1024);
        let mut session = Session::server(server, yamux::Config::default());
        let serve = async move {
            let mut streams = tokio::task::JoinSet::new();
            while let Ok(mut stream) = session.accept().await {
                streams.spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = stream.shutdown().await;
                });
            }
            while streams.join_next().await.is_some() {}
        };
        tokio::join!(fuzzkit::play(client, input, chunk_of(seed)), serve);
    });
}

fn server_ws_config() -> WebSocketConfig {
    // What the v2 endpoints configure on axum's upgrade (`api::upgrade_v2`).
    WebSocketConfig::default()
        .max_message_size(Some(RECOMMENDED_MAX_MESSAGE_SIZE))
        .max_frame_size(Some(RECOMMENDED_MAX_MESSAGE_SIZE))
        .read_buffer_size(RECOMMENDED_READ_BUFFER_SIZE)
}

/// Raw client bytes (WebSocket frames, masked or not) into the server's WebSocket byte stream
/// ([`WsIo`] over tungstenite, with the v2 endpoints' limits). Whatever bytes come out are
/// echoed back; the stream must end once the peer's input ends.
pub fn ws_stream(data: &[u8]) {
    let Some((seed, input)) = split_seed(data) else {
        return;
    };
    fuzzkit::run_bounded("websocket byte stream", DEADLINE, async move {
        let (client, server) = tokio::io::duplex(16 * 1024);
        let serve = async move {
            let ws =
                WebSocketStream::from_raw_socket(server, WsRole::Server, Some(server_ws_config()))
                    .await;
            let (mut io, handle) = WsIo::new(ws, WsConfig::server());
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = io.shutdown().await;
            drop(io);
            handle.ended().await;
        };
        tokio::join!(fuzzkit::play(client, input, chunk_of(seed)), serve);
    });
}

/// The v1 streaming JSON decoder fed in chunks (sizes from the first byte), each value through
/// the node conversion the v1 session applies, with a small message limit.
pub fn v1_stream(data: &[u8]) {
    let Some((seed, input)) = split_seed(data) else {
        return;
    };
    let limits = crate::graph::NodeLimits::default();
    let mut decoder = crate::v1::decoder::JsonStream::new(4096);
    for piece in input.chunks(chunk_of(seed).max(1)) {
        let Ok(values) = decoder.push(piece) else {
            return;
        };
        for v in values {
            let Ok(node) = proto::v1::Node::from_value(v).and_then(|n| n.to_proto()) else {
                return;
            };
            let _ = limits.check(&node);
        }
    }
}

/// A v2 coordinator session after the upgrade, in process: a fresh coordinator serves one peer
/// (by the first byte: an agent, or a client of that agent with resume tokens) over a WebSocket
/// on an in-memory duplex. The rest of the bytes are the peer's byte stream (yamux carrying
/// dRPC carrying `coder.tailnet.v2` messages), sent as binary messages of up to 256 bytes (the
/// second byte picks the size), then the peer closes. The session must end, and the
/// coordinator shut down cleanly, within [`DEADLINE`].
pub fn v2_session(data: &[u8]) {
    let [kind, size, input @ ..] = data else {
        return;
    };
    let peer = V2Peer {
        id: if kind & 1 == 0 { AGENT } else { CLIENT },
        name: "fuzz".into(),
        kind: if kind & 1 == 0 {
            PeerKind::Agent
        } else {
            PeerKind::Client { agent_id: AGENT }
        },
        resume: kind & 1 == 1,
        upstream: None,
        telemetry: None,
    };
    let chunk = chunk_of(*size);
    fuzzkit::run_bounded("v2 session", DEADLINE, async move {
        let coord = Coordinator::new(
            CoordinatorConfig::default(),
            Arc::new(StaticAuthenticator::default()),
            DerpMapSource::new(DerpMapConfig::default()).expect("default DERP map source"),
            &prometheus::Registry::new(),
        )
        .expect("coordinator");
        let (client, server) = tokio::io::duplex(16 * 1024);
        let session = {
            let coord = coord.clone();
            async move {
                let ws = WebSocketStream::from_raw_socket(
                    server,
                    WsRole::Server,
                    Some(server_ws_config()),
                )
                .await;
                crate::service::serve_session(coord, ws, peer).await;
            }
        };
        let peer_side = async move {
            let ws = WebSocketStream::from_raw_socket(client, WsRole::Client, None).await;
            let (mut tx, mut rx) = ws.split();
            let send = async move {
                for piece in input.chunks(chunk.max(1)) {
                    let msg = tokio_tungstenite::tungstenite::Message::Binary(
                        Bytes::copy_from_slice(piece),
                    );
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(fuzzkit::SETTLE).await;
                let _ = tx.close().await;
            };
            // Reading also answers the server's pings and close.
            let recv = async move { while let Some(Ok(_)) = rx.next().await {} };
            tokio::join!(send, recv);
        };
        tokio::join!(session, peer_side);
        coord.shutdown().await;
        assert_eq!(coord.session_count(), 0, "a session outlived its WebSocket");
    });
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    type Target = fn(&[u8]);

    /// Fuzz target name → entry point; each has `fuzz/corpus/<name>/` and a `[[bin]]` in
    /// `fuzz/Cargo.toml`.
    const TARGETS: &[(&str, Target)] = &[
        ("coordinate_request", super::coordinate_request),
        ("yamux_session", super::yamux_session),
        ("ws_stream", super::ws_stream),
        ("v1_stream", super::v1_stream),
        ("v2_session", super::v2_session),
    ];

    /// Replays every committed corpus file (seeds and what the fuzzer grew) of the coordinator's
    /// targets through the same functions the fuzz targets call.
    #[test]
    fn replay_fuzz_corpora() {
        fuzzkit::replay_corpora(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".."), TARGETS);
    }

    /// Writes the seed files of the coordinator's targets. Ignored: run explicitly
    /// (`cargo test -p coordinator --lib -- --ignored write_seed_corpus`) to regenerate them.
    #[test]
    #[ignore = "regenerates committed seed files"]
    fn write_seed_corpus() {
        use bytes::{Bytes, BytesMut};
        use prost::Message as _;
        use proto::drpc::{encode_packet, Kind};
        use proto::tailnet::v2::coordinate_request::{
            Disconnect, ReadyForHandshake, Tunnel, UpdateSelf,
        };
        use proto::tailnet::v2::{methods, CoordinateRequest, Node};
        use proto::yamux::{Flags, Header};

        use super::{AGENT, CLIENT};

        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let write = |target: &str, name: &str, data: &[u8]| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), data).unwrap();
        };
        let node = Node {
            id: 7,
            key: Bytes::from([b"np".as_slice(), &[0x42; 32]].concat()),
            disco: format!("discokey:{}", "ab".repeat(32)),
            preferred_derp: 999,
            addresses: vec!["fd7a:115c:a1e0::7/128".into()],
            allowed_ips: vec!["fd7a:115c:a1e0::7/128".into()],
            endpoints: vec!["192.0.2.7:41641".into()],
            ..Default::default()
        };
        let update = CoordinateRequest {
            update_self: Some(UpdateSelf {
                node: Some(node.clone()),
            }),
            ..Default::default()
        };
        let tunnel = |id: uuid::Uuid| Tunnel {
            id: Bytes::copy_from_slice(id.as_bytes()),
        };
        let add = CoordinateRequest {
            add_tunnel: Some(tunnel(AGENT)),
            ..Default::default()
        };
        let ready = CoordinateRequest {
            ready_for_handshake: vec![ReadyForHandshake {
                id: Bytes::copy_from_slice(CLIENT.as_bytes()),
            }],
            ..Default::default()
        };
        let remove = CoordinateRequest {
            remove_tunnel: Some(tunnel(AGENT)),
            ..Default::default()
        };
        let disconnect = CoordinateRequest {
            disconnect: Some(Disconnect {}),
            ..Default::default()
        };

        // coordinate_request: [who][len u16][protobuf]...
        let framed = |reqs: &[(u8, &CoordinateRequest)]| {
            let mut out = Vec::new();
            for (who, r) in reqs {
                let b = r.encode_to_vec();
                out.push(*who);
                out.extend_from_slice(&u16::try_from(b.len()).unwrap().to_be_bytes());
                out.extend_from_slice(&b);
            }
            out
        };
        write(
            "coordinate_request",
            "agent_and_client",
            &framed(&[
                (0, &update),
                (1, &update),
                (1, &add),
                (0, &ready),
                (1, &remove),
                (1, &disconnect),
            ]),
        );
        write(
            "coordinate_request",
            "agent_tunnel_refused",
            &framed(&[(0, &add), (2, &update)]),
        );

        // dRPC conversations, as the bytes of one yamux stream.
        let drpc = |stream: u64, method: &str, msgs: &[Vec<u8>]| {
            let mut out = BytesMut::new();
            encode_packet(stream, 1, Kind::Invoke, method.as_bytes(), &mut out);
            for (i, m) in msgs.iter().enumerate() {
                encode_packet(stream, 2 + i as u64, Kind::Message, m, &mut out);
            }
            encode_packet(
                stream,
                2 + msgs.len() as u64,
                Kind::CloseSend,
                &[],
                &mut out,
            );
            out.to_vec()
        };
        let coordinate_agent = drpc(1, methods::COORDINATE, &[update.encode_to_vec()]);
        let coordinate_client = drpc(
            1,
            methods::COORDINATE,
            &[
                update.encode_to_vec(),
                add.encode_to_vec(),
                remove.encode_to_vec(),
                disconnect.encode_to_vec(),
            ],
        );
        let derp_maps = drpc(1, methods::STREAM_DERP_MAPS, &[Vec::new()]);
        let resume = drpc(1, methods::REFRESH_RESUME_TOKEN, &[Vec::new()]);
        let telemetry = drpc(1, methods::POST_TELEMETRY, &[Vec::new()]);
        let unknown = drpc(1, "/coder.agent.v2.Agent/GetManifest", &[Vec::new()]);

        // yamux: open stream `id`, carry `payload`, half-close; then a ping.
        let yamux = |streams: &[(u32, &[u8])]| {
            let mut out = Vec::new();
            for (id, payload) in streams {
                out.extend_from_slice(&Header::window_update(Flags::SYN, *id, 0).encode());
                for piece in payload.chunks(1000) {
                    out.extend_from_slice(
                        &Header::data(Flags::NONE, *id, piece.len() as u32).encode(),
                    );
                    out.extend_from_slice(piece);
                }
                out.extend_from_slice(&Header::data(Flags::FIN, *id, 0).encode());
            }
            out.extend_from_slice(&Header::ping(Flags::SYN, 1).encode());
            out
        };
        let prefixed = |seed: &[u8], body: &[u8]| [seed, body].concat();

        write(
            "yamux_session",
            "one_stream",
            &prefixed(&[0], &yamux(&[(1, b"hello")])),
        );
        write(
            "yamux_session",
            "two_streams_chunked",
            &prefixed(&[7], &yamux(&[(1, &[0x61; 3000]), (3, b"x")])),
        );
        let mut session = yamux(&[(1, b"a")]);
        session.extend_from_slice(&Header::window_update(Flags::NONE, 1, 1 << 20).encode());
        session.extend_from_slice(&Header::data(Flags::RST, 1, 0).encode());
        session.extend_from_slice(&Header::go_away(0).encode());
        write(
            "yamux_session",
            "reset_and_go_away",
            &prefixed(&[0], &session),
        );

        for (name, kind, streams) in [
            (
                "agent_coordinate",
                0u8,
                vec![(1u32, coordinate_agent.as_slice())],
            ),
            (
                "client_coordinate",
                1,
                vec![(1, coordinate_client.as_slice())],
            ),
            (
                "client_derp_maps_and_resume",
                1,
                vec![(1, derp_maps.as_slice()), (3, resume.as_slice())],
            ),
            (
                "agent_telemetry_and_unknown",
                0,
                vec![(1, telemetry.as_slice()), (3, unknown.as_slice())],
            ),
        ] {
            write("v2_session", name, &prefixed(&[kind, 0], &yamux(&streams)));
        }
        write(
            "v2_session",
            "client_coordinate_small_messages",
            &prefixed(&[1, 13], &yamux(&[(1, &coordinate_client)])),
        );

        // ws_stream: client frames, masked with an all-zero key (payload unchanged).
        let frame = |opcode: u8, fin: bool, payload: &[u8]| {
            let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
            match payload.len() {
                n @ 0..=125 => out.push(0x80 | n as u8),
                n @ 126..=0xffff => {
                    out.push(0x80 | 126);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                }
                n => {
                    out.push(0x80 | 127);
                    out.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(payload);
            out
        };
        let close = frame(0x8, true, &[0x03, 0xe8]);
        write(
            "ws_stream",
            "binary_ping_close",
            &prefixed(
                &[0],
                &[
                    frame(0x2, true, b"yamux bytes"),
                    frame(0x9, true, b"p"),
                    close.clone(),
                ]
                .concat(),
            ),
        );
        write(
            "ws_stream",
            "fragmented",
            &prefixed(
                &[5],
                &[
                    frame(0x2, false, &[1; 200]),
                    frame(0x0, true, &[2; 300]),
                    close.clone(),
                ]
                .concat(),
            ),
        );
        write(
            "ws_stream",
            "text_message",
            &prefixed(&[0], &[frame(0x1, true, b"{}"), close].concat()),
        );
        write(
            "ws_stream",
            "unmasked",
            &prefixed(&[0], &[0x82, 0x03, b'a', b'b', b'c']),
        );

        // v1_stream: [chunk seed] + JSON nodes.
        let v1_node = br#"{"id":7,"asOf":"2024-01-01T00:00:00Z","key":"nodekey:4242424242424242424242424242424242424242424242424242424242424242","disco":"discokey:abababababababababababababababababababababababababababababababab","preferred_derp":999,"derp_latency":{"999-v4":0.01},"derp_forced_websockets":{},"addresses":["100.64.0.7/32"],"allowed_ips":["100.64.0.7/32"],"endpoints":["192.0.2.7:41641"]}"#;
        write("v1_stream", "node", &prefixed(&[0], v1_node));
        write(
            "v1_stream",
            "two_nodes_split",
            &prefixed(&[9], &[v1_node.as_slice(), b"\n", v1_node].concat()),
        );
        write(
            "v1_stream",
            "not_a_node",
            &prefixed(&[3], b"[1,2] {\"id\":\"x\"}"),
        );
    }
}
