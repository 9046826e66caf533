//! coder.tailnet.v2 / coder.agent.v2 protobuf byte vectors: the generated types must produce and
//! accept exactly the bytes Coder's Go code does (field numbers, types, nesting).

use bytes::Bytes;
use prost::Message;
use proto::agent::v2 as agent;
use proto::tailnet::v2::*;

const UUID: [u8; 16] = [
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
];

fn with_uuid(prefix: &[u8], suffix: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(&UUID);
    v.extend_from_slice(suffix);
    v
}

#[test]
fn coordinate_request_disconnect() {
    let req = CoordinateRequest {
        disconnect: Some(coordinate_request::Disconnect {}),
        ..Default::default()
    };
    assert_eq!(req.encode_to_vec(), vec![0x12, 0x00]);
    assert_eq!(CoordinateRequest::decode(&[0x12u8, 0x00][..]).unwrap(), req);
}

#[test]
fn coordinate_request_add_tunnel() {
    let req = CoordinateRequest {
        add_tunnel: Some(coordinate_request::Tunnel {
            id: Bytes::copy_from_slice(&UUID),
        }),
        ..Default::default()
    };
    assert_eq!(
        req.encode_to_vec(),
        with_uuid(&[0x1a, 0x12, 0x0a, 0x10], &[])
    );
    let rm = CoordinateRequest {
        remove_tunnel: req.add_tunnel.clone(),
        ..Default::default()
    };
    assert_eq!(
        rm.encode_to_vec(),
        with_uuid(&[0x22, 0x12, 0x0a, 0x10], &[])
    );
}

#[test]
fn coordinate_request_ready_for_handshake() {
    let req = CoordinateRequest {
        ready_for_handshake: vec![coordinate_request::ReadyForHandshake {
            id: Bytes::copy_from_slice(&UUID),
        }],
        ..Default::default()
    };
    let want = with_uuid(&[0x2a, 0x12, 0x0a, 0x10], &[]);
    assert_eq!(req.encode_to_vec(), want);
    assert_eq!(CoordinateRequest::decode(&want[..]).unwrap(), req);
}

#[test]
fn coordinate_response_ready_for_handshake() {
    use coordinate_response::peer_update::Kind;
    let resp = CoordinateResponse {
        peer_updates: vec![coordinate_response::PeerUpdate {
            id: Bytes::copy_from_slice(&UUID),
            node: None,
            kind: Kind::ReadyForHandshake as i32,
            reason: String::new(),
        }],
        error: String::new(),
    };
    let want = with_uuid(&[0x0a, 0x14, 0x0a, 0x10], &[0x18, 0x04]);
    assert_eq!(resp.encode_to_vec(), want);
    let back = CoordinateResponse::decode(&want[..]).unwrap();
    assert_eq!(back.peer_updates[0].kind(), Kind::ReadyForHandshake);
}

#[test]
fn coordinate_response_node_update_layout() {
    use coordinate_response::peer_update::Kind;
    let node = Node {
        id: 7,
        preferred_derp: 999,
        ..Default::default()
    };
    let node_bytes = node.encode_to_vec();
    assert_eq!(node_bytes, vec![0x08, 0x07, 0x28, 0xe7, 0x07]);
    let resp = CoordinateResponse {
        peer_updates: vec![coordinate_response::PeerUpdate {
            id: Bytes::copy_from_slice(&UUID),
            node: Some(node),
            kind: Kind::Node as i32,
            reason: "update".into(),
        }],
        error: "warn".into(),
    };
    let mut inner = with_uuid(&[0x0a, 0x10], &[0x12, node_bytes.len() as u8]);
    inner.extend_from_slice(&node_bytes);
    inner.extend_from_slice(&[0x18, 0x01, 0x22, 0x06]);
    inner.extend_from_slice(b"update");
    let mut want = vec![0x0a, inner.len() as u8];
    want.extend_from_slice(&inner);
    want.extend_from_slice(&[0x12, 0x04]);
    want.extend_from_slice(b"warn");
    assert_eq!(resp.encode_to_vec(), want);
}

#[test]
fn kind_enum_values() {
    use coordinate_response::peer_update::Kind;
    assert_eq!(Kind::Unspecified as i32, 0);
    assert_eq!(Kind::Node as i32, 1);
    assert_eq!(Kind::Disconnected as i32, 2);
    assert_eq!(Kind::Lost as i32, 3);
    assert_eq!(Kind::ReadyForHandshake as i32, 4);
    // Open enums: unknown numbers survive decoding.
    let raw = with_uuid(&[0x0a, 0x14, 0x0a, 0x10], &[0x18, 0x09]);
    let r = CoordinateResponse::decode(&raw[..]).unwrap();
    assert_eq!(r.peer_updates[0].kind, 9);
}

#[test]
fn node_field_numbers() {
    let mut node = Node {
        id: 1,
        as_of: Some(prost_types::Timestamp {
            seconds: 2,
            nanos: 0,
        }),
        key: Bytes::from_static(b"np"),
        disco: "d".into(),
        preferred_derp: 3,
        ..Default::default()
    };
    node.derp_latency.insert("a".into(), 0.5);
    node.derp_forced_websocket.insert(4, "r".into());
    node.addresses.push("x".into());
    node.allowed_ips.push("y".into());
    node.endpoints.push("z".into());
    let b = node.encode_to_vec();
    let mut want = vec![0x08, 0x01]; // 1 id
    want.extend_from_slice(&[0x12, 0x02, 0x08, 0x02]); // 2 as_of {seconds: 2}
    want.extend_from_slice(&[0x1a, 0x02, b'n', b'p']); // 3 key
    want.extend_from_slice(&[0x22, 0x01, b'd']); // 4 disco
    want.extend_from_slice(&[0x28, 0x03]); // 5 preferred_derp
                                           // 6 derp_latency entry {1: "a", 2: double 0.5}
    want.extend_from_slice(&[0x32, 0x0c, 0x0a, 0x01, b'a', 0x11]);
    want.extend_from_slice(&0.5f64.to_le_bytes());
    // 7 derp_forced_websocket entry {1: 4, 2: "r"}
    want.extend_from_slice(&[0x3a, 0x05, 0x08, 0x04, 0x12, 0x01, b'r']);
    want.extend_from_slice(&[0x42, 0x01, b'x']); // 8 addresses
    want.extend_from_slice(&[0x4a, 0x01, b'y']); // 9 allowed_ips
    want.extend_from_slice(&[0x52, 0x01, b'z']); // 10 endpoints
    assert_eq!(b, want);
    assert_eq!(Node::decode(&b[..]).unwrap(), node);
}

#[test]
fn derp_map_field_numbers() {
    let mut m = DerpMap {
        home_params: Some(derp_map::HomeParams::default()),
        ..Default::default()
    };
    m.regions.insert(
        999,
        derp_map::Region {
            region_id: 999,
            embedded_relay: true,
            region_code: "c".into(),
            region_name: "n".into(),
            avoid: true,
            nodes: vec![derp_map::region::Node {
                name: "a".into(),
                region_id: 1,
                host_name: "h".into(),
                cert_name: "c".into(),
                ipv4: "4".into(),
                ipv6: "6".into(),
                stun_port: -1,
                stun_only: true,
                derp_port: 2,
                insecure_for_tests: true,
                force_http: true,
                stun_test_ip: "t".into(),
                can_port_80: true,
            }],
        },
    );
    let b = m.encode_to_vec();
    // home_params present (empty) as field 1.
    assert_eq!(&b[..2], &[0x0a, 0x00]);
    let node = derp_map::region::Node {
        stun_port: -1,
        ..Default::default()
    };
    // int32 -1 is a 10-byte varint, like Go.
    assert_eq!(
        node.encode_to_vec(),
        vec![0x38, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
    );
    let n = derp_map::region::Node {
        can_port_80: true,
        force_http: true,
        stun_test_ip: "t".into(),
        ..Default::default()
    };
    assert_eq!(
        n.encode_to_vec(),
        vec![0x58, 0x01, 0x62, 0x01, b't', 0x68, 0x01]
    );
    assert_eq!(DerpMap::decode(&b[..]).unwrap(), m);
}

#[test]
fn refresh_resume_token_response_fields() {
    let r = RefreshResumeTokenResponse {
        token: "t".into(),
        refresh_in: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        expires_at: Some(prost_types::Timestamp {
            seconds: 2,
            nanos: 0,
        }),
    };
    assert_eq!(
        r.encode_to_vec(),
        vec![0x0a, 0x01, b't', 0x12, 0x02, 0x08, 0x01, 0x1a, 0x02, 0x08, 0x02]
    );
}

#[test]
fn telemetry_event_fields() {
    let ev = TelemetryEvent {
        client_version: "v".into(),
        client_type: telemetry_event::ClientType::Agent as i32,
        throughput_mbits: Some(1.0),
        latest_netcheck: Some(Netcheck {
            os_has_i_pv6: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let b = ev.encode_to_vec();
    // client_type = 6, latest_netcheck = 12 { OSHasIPv6 = 7 { value: true } },
    // throughput_mbits = 18 (FloatValue), client_version = 19.
    let mut want = vec![0x30, 0x01, 0x62, 0x04, 0x3a, 0x02, 0x08, 0x01];
    want.extend_from_slice(&[0x92, 0x01, 0x05, 0x0d]);
    want.extend_from_slice(&1.0f32.to_le_bytes());
    want.extend_from_slice(&[0x9a, 0x01, 0x01, b'v']);
    assert_eq!(b, want);
    assert_eq!(TelemetryEvent::decode(&b[..]).unwrap(), ev);
    // Field 5 is reserved: a stray field 5 decodes as unknown and is skipped.
    assert!(TelemetryEvent::decode(&[0x28u8, 0x01][..]).is_ok());
}

#[test]
fn workspace_updates_fields() {
    let u = WorkspaceUpdate {
        upserted_workspaces: vec![Workspace {
            id: Bytes::from_static(b"i"),
            name: "w".into(),
            status: workspace::Status::Deleted as i32,
        }],
        deleted_agents: vec![Agent {
            id: Bytes::from_static(b"a"),
            name: "n".into(),
            workspace_id: Bytes::from_static(b"w"),
        }],
        ..Default::default()
    };
    assert_eq!(
        u.encode_to_vec(),
        vec![
            0x0a, 0x08, 0x0a, 0x01, b'i', 0x12, 0x01, b'w', 0x18, 0x0a, 0x22, 0x09, 0x0a, 0x01,
            b'a', 0x12, 0x01, b'n', 0x1a, 0x01, b'w'
        ]
    );
    let req = WorkspaceUpdatesRequest {
        workspace_owner_id: Bytes::copy_from_slice(&UUID),
    };
    assert_eq!(req.encode_to_vec(), with_uuid(&[0x0a, 0x10], &[]));
}

#[test]
fn ip_fields_and_netcheck_ip() {
    let nip = netcheck::NetcheckIp {
        hash: "h".into(),
        fields: Some(IpFields {
            version: 4,
            class: ip_fields::IpClass::Loopback as i32,
        }),
    };
    assert_eq!(
        nip.encode_to_vec(),
        vec![0x0a, 0x01, b'h', 0x12, 0x04, 0x08, 0x04, 0x10, 0x03]
    );
    let n = Netcheck {
        global_v4: Some(nip),
        preferred_derp: 999,
        ..Default::default()
    };
    let b = n.encode_to_vec();
    assert_eq!(&b[..3], &[0x68, 0xe7, 0x07]); // 13 PreferredDERP
    assert_eq!(b[3], 0x8a); // 17 GlobalV4, wire type 2
    assert_eq!(b[4], 0x01);
}

#[test]
fn agent_manifest_partial_schema() {
    let m = agent::Manifest {
        agent_id: Bytes::copy_from_slice(&UUID),
        disable_direct_connections: true,
        derp_force_websockets: true,
        derp_map: Some(DerpMap {
            home_params: Some(Default::default()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut want = with_uuid(&[0x0a, 0x10], &[]);
    want.extend_from_slice(&[0x38, 0x01, 0x40, 0x01, 0x4a, 0x02, 0x0a, 0x00]);
    assert_eq!(m.encode_to_vec(), want);

    // A full Go manifest has more fields (2 git_auth_configs, 5 vs_code_port_proxy_uri,
    // 11 apps, 18 parent_id): skipped.
    let mut full = want.clone();
    full.extend_from_slice(&[0x10, 0x05, 0x2a, 0x03, b'a', b'b', b'c', 0x5a, 0x00]);
    full.extend_from_slice(&[0x92, 0x01, 0x01, 0x07]);
    assert_eq!(agent::Manifest::decode(&full[..]).unwrap(), m);

    let named = agent::Manifest {
        agent_name: "main".into(),
        owner_username: "u".into(),
        workspace_id: Bytes::copy_from_slice(&UUID),
        workspace_name: "w".into(),
        directory: "/d".into(),
        ..Default::default()
    };
    let b = named.encode_to_vec();
    let mut want = vec![0x22, 0x02, b'/', b'd']; // 4 directory
    want.extend_from_slice(&[0x6a, 0x01, b'u']); // 13 owner_username
    want.extend_from_slice(&with_uuid(&[0x72, 0x10], &[])); // 14 workspace_id
    want.extend_from_slice(&[0x7a, 0x04, b'm', b'a', b'i', b'n']); // 15 agent_name
    want.extend_from_slice(&[0x82, 0x01, 0x01, b'w']); // 16 workspace_name
    let mut sorted_b = b.clone();
    sorted_b.sort_unstable();
    let mut sorted_want = want.clone();
    sorted_want.sort_unstable();
    // prost encodes in declaration order; compare as multisets plus a decode round trip.
    assert_eq!(sorted_b, sorted_want);
    assert_eq!(agent::Manifest::decode(&want[..]).unwrap(), named);
    assert_eq!(
        agent::GetManifestRequest::default().encode_to_vec(),
        Vec::<u8>::new()
    );
    assert_eq!(
        agent::methods::GET_MANIFEST,
        "/coder.agent.v2.Agent/GetManifest"
    );
}

#[test]
fn method_names() {
    assert_eq!(methods::COORDINATE, "/coder.tailnet.v2.Tailnet/Coordinate");
    assert_eq!(methods::STREAM_DERP_MAPS.len(), 40);
    assert_eq!(methods::COORDINATE.len(), 36);
    assert_eq!(
        methods::POST_TELEMETRY,
        "/coder.tailnet.v2.Tailnet/PostTelemetry"
    );
    assert_eq!(
        methods::REFRESH_RESUME_TOKEN,
        "/coder.tailnet.v2.Tailnet/RefreshResumeToken"
    );
    assert_eq!(
        methods::WORKSPACE_UPDATES,
        "/coder.tailnet.v2.Tailnet/WorkspaceUpdates"
    );
}
