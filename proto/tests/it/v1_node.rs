//! v1 JSON Node: Go-compatible parsing/serialization and lossless conversion to/from protobuf.

use bytes::Bytes;
use proptest::prelude::*;
use proto::key::{DiscoPublic, NodePublic};
use proto::tailnet::v2;
use proto::v1::{is_valid_prefix, nodes_to_json, ConvertError, Node, Time};
use std::collections::BTreeMap;

const GO_NODE: &str = r#"{"id":4125830493962203467,"as_of":"2023-10-26T13:14:15.123456789Z","key":"nodekey:2e1d4f8c1b9a3a6e5f4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a098f7e","disco":"discokey:0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20","preferred_derp":999,"derp_latency":{"999-v4":0.0123,"999-v6":0.05},"derp_forced_websockets":{"999":"unexpected status code 403"},"addresses":["fd7a:115c:a1e0:49d6:b259:b7ac:b1b2:48f4/128"],"allowed_ips":["fd7a:115c:a1e0:49d6:b259:b7ac:b1b2:48f4/128"],"endpoints":["192.168.1.5:41641","[2001:db8::1]:41641"]}"#;

#[test]
fn parse_and_reserialize_go_node_exactly() {
    let n = Node::from_json(GO_NODE.as_bytes()).unwrap();
    assert_eq!(n.id, 4_125_830_493_962_203_467);
    assert_eq!(n.preferred_derp, 999);
    assert_eq!(n.key.as_bytes()[0], 0x2e);
    assert_eq!(n.disco.as_bytes()[31], 0x20);
    assert_eq!(n.as_of.nanos, 123_456_789);
    assert_eq!(n.derp_forced_websockets[&999], "unexpected status code 403");
    assert_eq!(n.endpoints.len(), 2);
    // Field order and formatting match Go's json.Marshal output.
    assert_eq!(String::from_utf8(n.to_json().unwrap()).unwrap(), GO_NODE);
}

#[test]
fn nil_collections_serialize_as_null_and_null_reads_back() {
    let n = Node {
        id: 1,
        ..Default::default()
    };
    let s = String::from_utf8(n.to_json().unwrap()).unwrap();
    assert_eq!(
        s,
        r#"{"id":1,"as_of":"0001-01-01T00:00:00Z","key":"nodekey:0000000000000000000000000000000000000000000000000000000000000000","disco":"discokey:0000000000000000000000000000000000000000000000000000000000000000","preferred_derp":0,"derp_latency":null,"derp_forced_websockets":null,"addresses":null,"allowed_ips":null,"endpoints":null}"#
    );
    assert_eq!(Node::from_json(s.as_bytes()).unwrap(), n);
    // Everything null or absent = zero values.
    let all_null = r#"{"id":null,"as_of":null,"key":null,"disco":null,"preferred_derp":null,"derp_latency":null,"derp_forced_websockets":null,"addresses":null,"allowed_ips":null,"endpoints":null}"#;
    assert_eq!(
        Node::from_json(all_null.as_bytes()).unwrap(),
        Node::default()
    );
    assert_eq!(Node::from_json(b"{}").unwrap(), Node::default());
    // Empty arrays/objects read as empty too.
    let empty = r#"{"addresses":[],"derp_latency":{}}"#;
    assert_eq!(Node::from_json(empty.as_bytes()).unwrap(), Node::default());
}

#[test]
fn case_insensitive_keys_and_unknown_fields() {
    let j = r#"{"ID":5,"Preferred_DERP":7,"Endpoints":["1.2.3.4:5"],"bogus":1}"#;
    let n = Node::from_json(j.as_bytes()).unwrap();
    assert_eq!((n.id, n.preferred_derp), (5, 7));
    assert_eq!(n.endpoints, vec!["1.2.3.4:5".to_string()]);
    // Exact match wins over a folded duplicate.
    let j = r#"{"ID":5,"id":6}"#;
    assert_eq!(Node::from_json(j.as_bytes()).unwrap().id, 6);
}

#[test]
fn bad_json_is_an_error() {
    for bad in [
        &b"[]"[..],
        b"not json",
        br#"{"key":"nodekey:zz"}"#,
        br#"{"key":"discokey:0000000000000000000000000000000000000000000000000000000000000000"}"#,
        br#"{"disco":"discokey:00"}"#,
        br#"{"as_of":"2023-13-01T00:00:00Z"}"#,
        br#"{"as_of":"2023-02-29T00:00:00Z"}"#,
        br#"{"as_of":"yesterday"}"#,
        br#"{"id":1.5}"#,
        br#"{"derp_forced_websockets":{"x":"y"}}"#,
    ] {
        assert!(
            matches!(Node::from_json(bad), Err(ConvertError::Json(_))),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn stream_of_concatenated_nodes() {
    let two = format!("{GO_NODE}\n{GO_NODE}");
    assert_eq!(Node::from_json_stream(two.as_bytes()).unwrap().len(), 2);
    assert!(Node::from_json_stream(b"{} {").is_err());
    let arr = nodes_to_json(&[Node::default()]).unwrap();
    assert!(arr.starts_with(b"[{") && arr.ends_with(b"}]"));
}

#[test]
fn time_parse_and_format() {
    let t = Time::parse_rfc3339("1970-01-01T00:00:00Z").unwrap();
    assert_eq!((t.seconds, t.nanos), (0, 0));
    let t = Time::parse_rfc3339("2024-02-29T23:59:59.5+01:30").unwrap();
    assert_eq!(t.format_rfc3339().unwrap(), "2024-02-29T22:29:59.5Z");
    let t = Time::parse_rfc3339("1969-12-31T23:59:59.000000001-00:00").unwrap();
    assert_eq!((t.seconds, t.nanos), (-1, 1));
    assert_eq!(
        t.format_rfc3339().unwrap(),
        "1969-12-31T23:59:59.000000001Z"
    );
    // More than 9 fraction digits are truncated (Go accepts them).
    let t = Time::parse_rfc3339("2000-01-01T00:00:00.1234567891Z").unwrap();
    assert_eq!(t.nanos, 123_456_789);
    assert_eq!(
        Time::GO_ZERO.format_rfc3339().unwrap(),
        "0001-01-01T00:00:00Z"
    );
    assert_eq!(
        Time::parse_rfc3339("0001-01-01T00:00:00Z").unwrap(),
        Time::GO_ZERO
    );
    assert_eq!(
        Time::parse_rfc3339("9999-12-31T23:59:59.999999999Z")
            .unwrap()
            .format_rfc3339()
            .unwrap(),
        "9999-12-31T23:59:59.999999999Z"
    );
    for bad in [
        "2000-01-01 00:00:00Z",
        "2000-01-01T00:00:00",
        "2000-01-01T24:00:00Z",
        "2000-01-01T00:60:00Z",
        "2000-01-01T00:00:60Z",
        "2000-01-01T00:00:00.Z",
        "2000-01-01T00:00:00+0100",
        "2000-01-01T00:00:00+24:00",
        "2000-1-01T00:00:00Z",
        "",
    ] {
        assert_eq!(Time::parse_rfc3339(bad), None, "{bad}");
    }
    assert_eq!(
        Time {
            seconds: 253_402_300_800,
            nanos: 0
        }
        .format_rfc3339(),
        None
    );
}

#[test]
fn prefix_validation() {
    for ok in ["10.0.0.1/32", "0.0.0.0/0", "fd7a:115c::1/128", "::/0"] {
        assert!(is_valid_prefix(ok), "{ok}");
    }
    for bad in [
        "10.0.0.1",
        "10.0.0.1/33",
        "::1/129",
        "10.0.0.1/08",
        "10.0.0.1/",
        "x/1",
        "10.0.0.1/+1",
        "fe80::1%eth0/64",
    ] {
        assert!(!is_valid_prefix(bad), "{bad}");
    }
}

#[test]
fn to_proto_go_node() {
    let n = Node::from_json(GO_NODE.as_bytes()).unwrap();
    let p = n.to_proto().unwrap();
    assert_eq!(p.key.len(), 34);
    assert_eq!(&p.key[..2], b"np");
    assert_eq!(&p.key[2..], n.key.as_bytes());
    assert_eq!(
        p.disco,
        "discokey:0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20"
    );
    let ts = p.as_of.unwrap();
    assert_eq!(ts.nanos, 123_456_789);
    assert_eq!(p.derp_forced_websocket[&999], "unexpected status code 403");
    assert_eq!(p.preferred_derp, 999);
    assert_eq!(Node::from_proto(&p).unwrap(), n);
}

#[test]
fn zero_time_maps_to_absent_timestamp() {
    let n = Node::default();
    let p = n.to_proto().unwrap();
    assert_eq!(p.as_of, None);
    assert_eq!(Node::from_proto(&p).unwrap().as_of, Time::GO_ZERO);
}

#[test]
fn conversion_errors() {
    let good = Node::from_json(GO_NODE.as_bytes())
        .unwrap()
        .to_proto()
        .unwrap();

    let mut p = good.clone();
    p.key = Bytes::from_static(b"np");
    assert_eq!(Node::from_proto(&p), Err(ConvertError::BadNodeKey(2)));
    let mut p = good.clone();
    let mut k = good.key.to_vec();
    k[0] = b'x';
    p.key = Bytes::from(k);
    assert_eq!(Node::from_proto(&p), Err(ConvertError::BadNodeKey(34)));
    let mut p = good.clone();
    p.disco = "nodekey:00".into();
    assert!(matches!(
        Node::from_proto(&p),
        Err(ConvertError::BadDiscoKey(_))
    ));
    let mut p = good.clone();
    p.addresses.push("not-a-prefix".into());
    assert!(matches!(
        Node::from_proto(&p),
        Err(ConvertError::BadPrefix(_))
    ));
    let mut p = good.clone();
    p.derp_latency.insert("x".into(), f64::NAN);
    assert!(matches!(
        Node::from_proto(&p),
        Err(ConvertError::NonFiniteLatency(_))
    ));
    let mut p = good.clone();
    p.as_of = Some(prost_types::Timestamp {
        seconds: 0,
        nanos: -1,
    });
    assert!(matches!(
        Node::from_proto(&p),
        Err(ConvertError::BadTimestamp { .. })
    ));
    let mut p = good.clone();
    p.as_of = Some(prost_types::Timestamp {
        seconds: i64::MAX,
        nanos: 0,
    });
    assert!(matches!(
        Node::from_proto(&p),
        Err(ConvertError::BadTimestamp { .. })
    ));

    let mut n = Node::from_proto(&good).unwrap();
    n.preferred_derp = i64::from(i32::MAX) + 1;
    assert!(matches!(n.to_proto(), Err(ConvertError::OutOfRange { .. })));
    let mut n = Node::from_proto(&good).unwrap();
    n.derp_forced_websockets.insert(1 << 40, "x".into());
    assert!(matches!(n.to_proto(), Err(ConvertError::OutOfRange { .. })));
    let mut n = Node::from_proto(&good).unwrap();
    n.allowed_ips.push("1.2.3.4/40".into());
    assert!(matches!(n.to_proto(), Err(ConvertError::BadPrefix(_))));
}

fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32)
            .prop_map(|(a, b)| format!("{}/{b}", std::net::Ipv4Addr::from(a))),
        (any::<[u8; 16]>(), 0u8..=128)
            .prop_map(|(a, b)| format!("{}/{b}", std::net::Ipv6Addr::from(a))),
    ]
}

prop_compose! {
    fn time()(seconds in -62_135_596_800i64..253_402_300_799, nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000]) -> Time {
        Time { seconds, nanos }
    }
}

prop_compose! {
    fn v1_node()(
        id in any::<i64>(),
        as_of in prop_oneof![Just(Time::GO_ZERO), time()],
        key in any::<[u8; 32]>().prop_map(NodePublic::from_bytes),
        disco in any::<[u8; 32]>().prop_map(DiscoPublic::from_bytes),
        preferred_derp in any::<i32>(),
        derp_latency in prop::collection::btree_map("[0-9]{1,4}-v[46]", -1e6f64..1e6, 0..4),
        forced in prop::collection::btree_map(any::<i32>(), ".{0,20}", 0..3),
        addresses in prop::collection::vec(prefix(), 0..3),
        allowed_ips in prop::collection::vec(prefix(), 0..3),
        endpoints in prop::collection::vec(".{0,30}", 0..3),
    ) -> Node {
        Node {
            id,
            as_of,
            key,
            disco,
            preferred_derp: i64::from(preferred_derp),
            derp_latency,
            derp_forced_websockets: forced.into_iter().map(|(k, v)| (i64::from(k), v)).collect(),
            addresses,
            allowed_ips,
            endpoints,
        }
    }
}

prop_compose! {
    fn v2_node()(
        v in v1_node(),
        as_of in prop::option::of(time().prop_filter("not the Go zero time", |t| !t.is_go_zero())),
    ) -> v2::Node {
        let mut p = v.to_proto().expect("generated v1 nodes are valid");
        p.as_of = as_of.map(Time::to_timestamp);
        p
    }
}

proptest! {
    #[test]
    fn v1_to_v2_to_v1_is_identity(n in v1_node()) {
        let p = n.to_proto().unwrap();
        prop_assert_eq!(Node::from_proto(&p).unwrap(), n.clone());
        // And through JSON text as well.
        let json = n.to_json().unwrap();
        prop_assert_eq!(Node::from_json(&json).unwrap(), n);
    }

    #[test]
    fn v2_to_v1_to_v2_is_identity(p in v2_node()) {
        let n = Node::from_proto(&p).unwrap();
        prop_assert_eq!(n.to_proto().unwrap(), p.clone());
        let via_json = Node::from_json(&n.to_json().unwrap()).unwrap().to_proto().unwrap();
        prop_assert_eq!(via_json, p);
    }

    #[test]
    fn time_text_roundtrip(t in time()) {
        let s = t.format_rfc3339().unwrap();
        prop_assert_eq!(Time::parse_rfc3339(&s), Some(t));
    }

    #[test]
    fn from_json_never_panics(data in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = Node::from_json(&data);
        let _ = Node::from_json_stream(&data);
    }
}

#[test]
fn latency_map_type() {
    let mut m = BTreeMap::new();
    m.insert("999-v4".to_string(), 0.25);
    let n = Node {
        derp_latency: m,
        ..Default::default()
    };
    let s = String::from_utf8(n.to_json().unwrap()).unwrap();
    assert!(s.contains(r#""derp_latency":{"999-v4":0.25}"#));
}

#[test]
fn forced_websocket_keys_sorted_like_go() {
    let mut n = Node::default();
    n.derp_forced_websockets.insert(999, "a".into());
    n.derp_forced_websockets.insert(1000, "b".into());
    let s = String::from_utf8(n.to_json().unwrap()).unwrap();
    assert!(
        s.contains(r#""derp_forced_websockets":{"1000":"b","999":"a"}"#),
        "{s}"
    );
}
