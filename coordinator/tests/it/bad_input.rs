//! Every kind of bad input ends only the session or stream it arrived on, with a log line and a
//! metric; a healthy session next to it keeps working.

use std::time::Duration;

use crate::common::v2::*;
use crate::common::*;
use bytes::{Bytes, BytesMut};
use coordinator::rpc::drpc::RpcError;
use futures_util::SinkExt;
use proto::drpc::{encode_packet, Frame, Kind as DKind};
use proto::tailnet::v2::coordinate_request::{ReadyForHandshake, UpdateSelf};
use proto::tailnet::v2::{methods, CoordinateRequest};
use proto::yamux::{Flags, Header, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// A healthy agent + client pair; asserts node exchange works (used after each bad input).
async fn healthy_pair_works(h: &Harness) {
    let agent_id = h.agent().id;
    let a = V2Conn::agent(h, 0).await;
    let mut agent = a.coordinate().await;
    let c = V2Conn::client(h, 0, "").await;
    let mut client = c.coordinate().await;
    client.add_tunnel(agent_id).await;
    let an = node(agent_id, true, 1);
    agent.update_self(an.clone()).await;
    client.expect_node(agent_id, &an).await;
    let cn = node(Uuid::nil(), false, 1);
    client.update_self(cn.clone()).await;
    agent
        .until("client node", |p| p.nodes.values().any(|n| *n == cn))
        .await;
}

/// A long-lived agent session that must survive the neighbour's bad input.
struct Witness {
    _conn: V2Conn,
    peer: TestPeer,
}

async fn witness(h: &Harness) -> Witness {
    let conn = V2Conn::agent(h, 1).await;
    let peer = conn.coordinate().await;
    peer.update_self(node(h.agents[1].id, true, 1)).await;
    Witness { _conn: conn, peer }
}

impl Witness {
    async fn still_alive(&mut self, h: &Harness) {
        let n = node(h.agents[1].id, true, 9);
        self.peer.update_self(n.clone()).await;
        self.peer.expect_quiet(Duration::from_millis(100)).await;
        assert_eq!(h.coord.graph().node(h.agents[1].id), Some(n));
    }
}

async fn raw_agent_ws(h: &Harness) -> Ws {
    h.ws(
        "/api/v2/workspaceagents/me/rpc",
        &h.agents[2].token.to_string(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn garbage_after_the_upgrade() {
    let h = Harness::start().await;
    let mut w = witness(&h).await;
    let mut ws = raw_agent_ws(&h).await;
    send_bin(
        &mut ws,
        b"GET / HTTP/1.1\r\nthis is not yamux\r\n\r\n".to_vec(),
    )
    .await;
    let (code, reason) = close_code(&mut ws).await.unwrap();
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.contains("yamux"), "{reason}");
    w.still_alive(&h).await;
    healthy_pair_works(&h).await;
    assert!(h.metric("coordinator_protocol_errors_total", &[("kind", "yamux")]) >= 1.0);
}

#[tokio::test]
async fn yamux_protocol_violations() {
    let h = Harness::start().await;
    let mut w = witness(&h).await;
    // Unknown frame type.
    let mut ws = raw_agent_ws(&h).await;
    let mut hdr = Header::new(Type::Ping, Flags::SYN, 0, 1).encode();
    hdr[1] = 9;
    send_bin(&mut ws, hdr.to_vec()).await;
    assert_eq!(close_code(&mut ws).await.unwrap().0, 1011);
    // More data than the 256 KiB window on a fresh stream.
    let mut ws = raw_agent_ws(&h).await;
    send_bin(
        &mut ws,
        Header::new(Type::WindowUpdate, Flags::SYN, 1, 0)
            .encode()
            .to_vec(),
    )
    .await;
    let len = 300 * 1024;
    let mut frame = Header::new(Type::Data, Flags::NONE, 1, len as u32)
        .encode()
        .to_vec();
    frame.extend(std::iter::repeat_n(0u8, len));
    let _ = ws.send(Message::Binary(Bytes::from(frame))).await;
    assert_eq!(close_code(&mut ws).await.unwrap().0, 1011);
    w.still_alive(&h).await;
    healthy_pair_works(&h).await;
    assert!(h.metric("coordinator_protocol_errors_total", &[("kind", "yamux")]) >= 2.0);
    assert!(h.metric("tailnetd_yamux_protocol_errors_total", &[]) >= 2.0);
}

#[tokio::test]
async fn text_message_on_a_v2_session() {
    let h = Harness::start().await;
    let mut w = witness(&h).await;
    let mut ws = raw_agent_ws(&h).await;
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(close_code(&mut ws).await.unwrap().0, 1003);
    w.still_alive(&h).await;
    assert!(
        eventually(Duration::from_secs(5), || h.metric(
            "coordinator_protocol_errors_total",
            &[("kind", "ws_text_message")]
        ) >= 1.0)
        .await
    );
}

/// Read raw dRPC frames from a yamux stream until EOF/error or `wait`; returns (kinds, eof).
async fn read_frames(
    stream: &mut coordinator::rpc::yamux::Stream,
    wait: Duration,
) -> (Vec<(DKind, Bytes)>, bool) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let end = tokio::time::Instant::now() + wait;
    loop {
        while let Ok(Some(f)) = Frame::decode(&mut buf) {
            frames.push((f.kind, f.data));
        }
        let mut chunk = [0u8; 65536];
        match tokio::time::timeout_at(end, stream.read(&mut chunk)).await {
            Err(_) => return (frames, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (frames, true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test]
async fn drpc_packet_over_4_mib() {
    let h = Harness::start().await;
    let mut w = witness(&h).await;
    let conn = V2Conn::agent(&h, 2).await;
    let mut stream = conn.rpc.session().open().await.unwrap();
    let mut out = BytesMut::new();
    encode_packet(
        1,
        1,
        DKind::Invoke,
        methods::COORDINATE.as_bytes(),
        &mut out,
    );
    let big = vec![0u8; (4 << 20) + 1024];
    encode_packet(1, 2, DKind::Message, &big, &mut out);
    let (mut rd, mut wr) = tokio::io::split(&mut stream);
    let writer = async {
        let _ = wr.write_all(&out).await;
    };
    let reader = async {
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(20), rd.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    };
    let (_, ended) = tokio::join!(writer, reader);
    assert!(ended, "transport was not closed");
    // The session survives: another call works.
    let mut p = conn.coordinate().await;
    p.update_self(node(h.agents[2].id, true, 1)).await;
    p.expect_quiet(Duration::from_millis(100)).await;
    w.still_alive(&h).await;
    assert!(h.metric("tailnetd_drpc_protocol_errors_total", &[]) >= 1.0);
}

#[tokio::test]
async fn drpc_id_going_backwards() {
    let h = Harness::start().await;
    let mut w = witness(&h).await;
    let conn = V2Conn::agent(&h, 2).await;
    let mut stream = conn.rpc.session().open().await.unwrap();
    let req = CoordinateRequest {
        update_self: Some(UpdateSelf {
            node: Some(node(h.agents[2].id, true, 1)),
        }),
        ..Default::default()
    };
    let body = prost::Message::encode_to_vec(&req);
    let mut out = BytesMut::new();
    encode_packet(
        1,
        1,
        DKind::Invoke,
        methods::COORDINATE.as_bytes(),
        &mut out,
    );
    encode_packet(1, 3, DKind::Message, &body, &mut out);
    encode_packet(1, 2, DKind::Message, &body, &mut out);
    stream.write_all(&out).await.unwrap();
    let (_, eof) = read_frames(&mut stream, Duration::from_secs(10)).await;
    assert!(eof, "transport was not closed");
    // The peer that stream had connected is gone again (LOST).
    assert!(
        eventually(Duration::from_secs(5), || h
            .coord
            .graph()
            .node(h.agents[2].id)
            .is_none())
        .await
    );
    w.still_alive(&h).await;
    healthy_pair_works(&h).await;
}

#[tokio::test]
async fn protobuf_that_fails_to_decode() {
    let h = Harness::start().await;
    let mut w = witness(&h).await;
    let conn = V2Conn::agent(&h, 2).await;
    let mut s = conn.rpc.open_stream(methods::COORDINATE).await.unwrap();
    // Field 1 (update_self), length-delimited, claims 100 bytes but has 1.
    s.send(Bytes::from_static(&[0x0a, 0x64, 0x00]))
        .await
        .unwrap();
    let err = tokio::time::timeout(WAIT, s.recv())
        .await
        .unwrap()
        .unwrap_err();
    match err {
        RpcError::Remote { message, .. } => {
            assert!(message.contains("decode CoordinateRequest"), "{message}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        h.metric(
            "coordinator_protocol_errors_total",
            &[("kind", "protobuf_decode")]
        ) >= 1.0
    );
    // Same session, new stream: fine.
    let mut p = conn.coordinate().await;
    p.update_self(node(h.agents[2].id, true, 1)).await;
    p.expect_quiet(Duration::from_millis(100)).await;
    w.still_alive(&h).await;
}

#[tokio::test]
async fn update_self_without_node() {
    let h = Harness::start().await;
    let mut w = witness(&h).await;
    let conn = V2Conn::agent(&h, 2).await;
    let mut p = conn.coordinate().await;
    p.send(CoordinateRequest {
        update_self: Some(UpdateSelf { node: None }),
        ..Default::default()
    })
    .await;
    p.expect_error("update_self without a node").await;
    p.expect_closed().await;
    assert!(
        h.metric(
            "coordinator_protocol_errors_total",
            &[("kind", "coordinate_missing_node")]
        ) >= 1.0
    );
    w.still_alive(&h).await;
}

#[tokio::test]
async fn uuid_not_16_bytes() {
    let h = Harness::start().await;
    let mut w = witness(&h).await;
    // In add_tunnel (client).
    let c = V2Conn::client(&h, 0, "").await;
    let mut p = c.coordinate().await;
    p.send(add_tunnel_req(&[1, 2, 3])).await;
    p.expect_error("invalid UUID (got 3 bytes)").await;
    p.expect_closed().await;
    // In ready_for_handshake (agent).
    let a = V2Conn::agent(&h, 2).await;
    let mut pa = a.coordinate().await;
    pa.send(CoordinateRequest {
        ready_for_handshake: vec![ReadyForHandshake {
            id: Bytes::from_static(&[9; 17]),
        }],
        ..Default::default()
    })
    .await;
    pa.expect_error("got 17 bytes").await;
    pa.expect_closed().await;
    w.still_alive(&h).await;
    healthy_pair_works(&h).await;
}

#[tokio::test]
async fn derp_map_websocket() {
    let h = Harness::start().await;
    let mut ws = h.ws("/api/v2/derp-map", "").await.unwrap();
    let first = next_binary(&mut ws).await;
    assert!(
        first.ends_with(b"\n"),
        "Go json.Encoder output ends with a newline"
    );
    let v: serde_json::Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(v["Regions"]["1"]["Nodes"][0]["HostName"], "derp1.example");
    assert_eq!(v["Regions"]["999"]["EmbeddedRelay"], true);
    assert_eq!(v["Regions"]["999"]["Nodes"][0]["STUNPort"], -1);
    std::fs::write(
        h.derp_file.as_ref().unwrap(),
        derp_map_json(5, "derp5.example"),
    )
    .unwrap();
    let second = next_binary(&mut ws).await;
    let v: serde_json::Value = serde_json::from_slice(&second).unwrap();
    assert_eq!(v["Regions"]["5"]["RegionCode"], "r5");
    assert!(v["Regions"].get("1").is_none());
    // Client data is a policy violation.
    ws.send(Message::Binary(Bytes::from_static(b"hi")))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await.unwrap().0, 1008);
    // Other subscribers are unaffected.
    let mut ws2 = h.ws("/api/v2/derp-map", "").await.unwrap();
    let m = next_binary(&mut ws2).await;
    assert!(String::from_utf8_lossy(&m).contains("derp5.example"));
}

async fn next_binary(ws: &mut Ws) -> Bytes {
    use futures_util::StreamExt;
    let fut = async {
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Binary(b) => return b,
                _ => continue,
            }
        }
    };
    tokio::time::timeout(WAIT, fut).await.unwrap()
}
