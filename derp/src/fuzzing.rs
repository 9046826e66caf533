//! Fuzz entry points of the relay, shared by the cargo-fuzz targets in `fuzz/` (repository root)
//! and by the corpus replay test at the bottom of this file, which runs in `cargo test`.
//!
//! Why here: the targets drive the real [`Server`] connection code (handshake, the read loop's
//! in-place rewrites, queues, the registry, the WebSocket adapter) in process, exactly as the
//! edge hands it a byte stream. Built only for tests and with the `fuzzing` feature (which the
//! fuzz crate enables): it needs tokio's paused clock, so keepalives, write deadlines and the
//! handshake deadline cost no wall time and every run is deterministic.
//!
//! Each function takes arbitrary bytes and must never panic, hang or grow memory without bound:
//! the bytes are played as a client over an in-memory duplex (then the client's input ends),
//! and every connection must end within [`DEADLINE`] of virtual time.
//! Keep it a flat list of `pub fn name(data: &[u8])`, one per fuzz target.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proto::derp::{self, ClientInfo};
use proto::key::{MeshKey, NodePrivate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::WebSocketStream;

use crate::edge::websocket::{websocket_config, WsByteStream};
use crate::{ConnInfo, Server, ServerConfig};

/// Virtual time every connection has to end after its client's input ended.
pub const DEADLINE: Duration = Duration::from_secs(3600);
/// The relay's private key (its public half is what the seeds' ClientInfo is sealed to).
pub const SERVER_KEY: [u8; 32] = [0x11; 32];
/// The fuzzed client's private key.
pub const CLIENT_KEY: [u8; 32] = [0x22; 32];
/// A second, well-behaved client that packets can be relayed to.
pub const PEER_KEY: [u8; 32] = [0x33; 32];
/// The relay's mesh key (a client presenting it is a mesh peer).
pub const MESH_KEY: [u8; 32] = [0x6d; 32];

fn server() -> Arc<Server> {
    let mut config = ServerConfig::new(NodePrivate::from_bytes(SERVER_KEY));
    config.mesh_key = Some(MeshKey::from_bytes(MESH_KEY));
    Server::new(config, &prometheus::Registry::new()).expect("server")
}

fn remote(last: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, last], 41641))
}

/// A complete ClientInfo frame for `key` (mesh peer or not), as a client sends it after reading
/// the server's key.
pub fn client_info(key: [u8; 32], mesh: bool) -> Bytes {
    let info = ClientInfo {
        mesh_key: mesh.then(|| MeshKey::from_bytes(MESH_KEY)),
        version: derp::PROTOCOL_VERSION,
        can_ack_pings: true,
        ..Default::default()
    };
    derp::client_info_frame(
        &NodePrivate::from_bytes(key),
        &NodePrivate::from_bytes(SERVER_KEY).public(),
        &info,
        [7; 24],
    )
}

/// The fuzzed client's bytes: by the first byte's low bits, raw (the handshake itself is
/// fuzzed), or after a valid ClientInfo of a regular client or of a mesh peer. The second byte
/// picks the write chunk size (0: all at once).
fn client_bytes(data: &[u8]) -> Option<(Vec<u8>, usize)> {
    let [mode, chunk, rest @ ..] = data else {
        return None;
    };
    let mut input = BytesMut::new();
    match mode % 3 {
        0 => {}
        1 => input.extend_from_slice(&client_info(CLIENT_KEY, false)),
        _ => input.extend_from_slice(&client_info(CLIENT_KEY, true)),
    }
    input.extend_from_slice(rest);
    let chunk = if *chunk == 0 {
        usize::MAX
    } else {
        usize::from(*chunk)
    };
    Some((input.to_vec(), chunk))
}

/// A DERP connection driven by arbitrary client bytes, in process: one relay, one well-behaved
/// peer (so SendPacket to [`PEER_KEY`] is relayed and PeerPresent/PeerGone flow to watchers),
/// and the fuzzed client. Both connections must end once their input ends; the relay then shuts
/// down with no connection left.
pub fn derp_conn(data: &[u8]) {
    let Some((input, chunk)) = client_bytes(data) else {
        return;
    };
    fuzzkit::run_bounded("derp connection", DEADLINE, async move {
        let srv = server();
        let (peer_io, peer_server_io) = tokio::io::duplex(64 * 1024);
        let (fuzz_io, fuzz_server_io) = tokio::io::duplex(64 * 1024);
        let peer_conn = srv.accept(peer_server_io, Bytes::new(), ConnInfo::new(remote(2)));
        let fuzz_conn = srv.accept(fuzz_server_io, Bytes::new(), ConnInfo::new(remote(3)));
        let peer_hello = client_info(PEER_KEY, false);
        let fuzz_done = tokio::sync::Notify::new();
        let fuzzed = async {
            // The peer registers first (its hello is already written), then the client speaks.
            tokio::time::sleep(Duration::from_millis(1)).await;
            tokio::join!(fuzzkit::play(fuzz_io, &input, chunk), fuzz_conn);
            fuzz_done.notify_one();
        };
        let peer_side = async {
            let (mut rd, mut wr) = tokio::io::split(peer_io);
            let _ = wr.write_all(&peer_hello).await;
            // The peer stays until the fuzzed client is done, reading what is relayed to it.
            let read = async {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = rd.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let leave = async {
                fuzz_done.notified().await;
                let _ = wr.shutdown().await;
            };
            tokio::join!(read, leave);
        };
        tokio::join!(fuzzed, peer_side, peer_conn);
        srv.shutdown().await;
        assert_eq!(
            srv.connection_count(),
            0,
            "a connection outlived its client"
        );
    });
}

/// Raw client bytes into DERP over WebSocket: tungstenite (server role, the relay's limits) →
/// [`WsByteStream`] → the DERP server, as the edge wires an upgraded `/derp` request. The
/// connection must end once the client's input ends.
pub fn derp_ws(data: &[u8]) {
    let [chunk, input @ ..] = data else {
        return;
    };
    let chunk = if *chunk == 0 {
        usize::MAX
    } else {
        usize::from(*chunk)
    };
    fuzzkit::run_bounded("derp over websocket", DEADLINE, async move {
        let srv = server();
        let (client, server_io) = tokio::io::duplex(64 * 1024);
        let conn = {
            let srv = srv.clone();
            async move {
                let ws = WebSocketStream::from_raw_socket(
                    server_io,
                    WsRole::Server,
                    Some(websocket_config()),
                )
                .await;
                let info = ConnInfo {
                    websocket: true,
                    ..ConnInfo::new(remote(4))
                };
                srv.accept(WsByteStream::new(ws), Bytes::new(), info).await;
            }
        };
        tokio::join!(fuzzkit::play(client, input, chunk), conn);
        srv.shutdown().await;
        assert_eq!(
            srv.connection_count(),
            0,
            "a connection outlived its client"
        );
    });
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    type Target = fn(&[u8]);

    /// Fuzz target name → entry point; each has `fuzz/corpus/<name>/` and a `[[bin]]` in
    /// `fuzz/Cargo.toml`.
    const TARGETS: &[(&str, Target)] =
        &[("derp_conn", super::derp_conn), ("derp_ws", super::derp_ws)];

    /// Replays every committed corpus file (seeds and what the fuzzer grew) of the relay's
    /// targets through the same functions the fuzz targets call.
    #[test]
    fn replay_fuzz_corpora() {
        fuzzkit::replay_corpora(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".."), TARGETS);
    }

    /// Writes the seed files of the relay's targets. Ignored: run explicitly
    /// (`cargo test -p derp --lib -- --ignored write_seed_corpus`) to regenerate them.
    #[test]
    #[ignore = "regenerates committed seed files"]
    fn write_seed_corpus() {
        use bytes::{Bytes, BytesMut};
        use proto::derp::{Frame, DISCO_MAGIC};
        use proto::key::{NodePrivate, NodePublic};

        use super::{client_info, CLIENT_KEY, PEER_KEY};

        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let write = |target: &str, name: &str, data: &[u8]| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), data).unwrap();
        };
        let enc = |frames: &[Frame]| {
            let mut b = BytesMut::new();
            for f in frames {
                f.encode(&mut b);
            }
            b.to_vec()
        };
        let peer = NodePrivate::from_bytes(PEER_KEY).public();
        let other = NodePublic::from_bytes([0x44; 32]);
        let mut disco = DISCO_MAGIC.to_vec();
        disco.resize(62, 0xd1);
        let regular = enc(&[
            Frame::NotePreferred { preferred: true },
            Frame::SendPacket {
                dst: peer,
                packet: Bytes::from(vec![0x45; 100]),
            },
            Frame::SendPacket {
                dst: peer,
                packet: Bytes::from(disco),
            },
            Frame::SendPacket {
                dst: other,
                packet: Bytes::from_static(b"to nobody"),
            },
            Frame::Ping { data: [1; 8] },
            Frame::Pong { data: [2; 8] },
            Frame::KeepAlive,
        ]);
        let mesh = enc(&[
            Frame::WatchConns,
            Frame::ForwardPacket {
                src: other,
                dst: peer,
                packet: Bytes::from_static(b"forwarded"),
            },
            Frame::ClosePeer { peer },
        ]);
        let with = |mode: u8, chunk: u8, body: &[u8]| [&[mode, chunk][..], body].concat();
        write("derp_conn", "regular", &with(1, 0, &regular));
        write("derp_conn", "regular_chunked", &with(1, 5, &regular));
        write("derp_conn", "mesh", &with(2, 0, &mesh));
        write("derp_conn", "regular_tries_mesh_frames", &with(1, 0, &mesh));
        let hello = client_info(CLIENT_KEY, false);
        write(
            "derp_conn",
            "raw_handshake",
            &with(0, 0, &[hello.as_ref(), &regular].concat()),
        );
        write(
            "derp_conn",
            "raw_garbage",
            &with(0, 0, b"GET / HTTP/1.1\r\n\r\n"),
        );
        write(
            "derp_conn",
            "oversized_frame",
            &with(1, 0, &[0x04, 0x00, 0x10, 0x00, 0x01, 0xaa]),
        );

        // derp_ws: [chunk] + client WebSocket frames (masked with an all-zero key).
        let frame = |opcode: u8, payload: &[u8]| {
            let mut out = vec![0x80 | opcode];
            match payload.len() {
                n @ 0..=125 => out.push(0x80 | n as u8),
                n => {
                    out.push(0x80 | 126);
                    out.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
                }
            }
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(payload);
            out
        };
        let close = frame(0x8, &[0x03, 0xe8]);
        write(
            "derp_ws",
            "handshake_and_frames",
            &[
                &[0u8][..],
                &frame(0x2, &hello),
                &frame(0x2, &regular),
                &close,
            ]
            .concat(),
        );
        write(
            "derp_ws",
            "frame_split_across_messages",
            &[
                &[3u8][..],
                &frame(0x2, &hello[..10]),
                &frame(0x2, &hello[10..]),
                &frame(0x9, b"p"),
                &close,
            ]
            .concat(),
        );
        write(
            "derp_ws",
            "text_message",
            &[&[0u8][..], &frame(0x1, b"hi"), &close].concat(),
        );
    }
}
