//! DERP map JSON (Tailscale/Coder field names, omitempty, case-insensitive read), conversion to
//! and from protobuf, and Coder's CompareDERPMaps semantics.

use proto::derpmap::*;
use proto::tailnet::v2;

/// A map as coderd builds it by default: embedded region 999 plus two STUN-only regions.
const CODER_MAP: &str = r#"{"Regions":{"1000":{"EmbeddedRelay":false,"RegionID":1000,"RegionCode":"coder_stun_1000","RegionName":"Coder STUN 1000","Nodes":[{"Name":"1000stun0","RegionID":1000,"HostName":"stun.l.google.com","STUNPort":19302,"STUNOnly":true}]},"1001":{"EmbeddedRelay":false,"RegionID":1001,"RegionCode":"coder_stun_1001","RegionName":"Coder STUN 1001","Nodes":[{"Name":"1001stun0","RegionID":1001,"HostName":"stun1.l.google.com","STUNPort":19302,"STUNOnly":true}]},"999":{"EmbeddedRelay":true,"RegionID":999,"RegionCode":"coder","RegionName":"Coder Embedded Relay","Nodes":[{"Name":"999b","RegionID":999,"HostName":"coder.example.com","STUNPort":-1,"DERPPort":443}]}}}"#;

fn coder_map() -> DerpMap {
    DerpMap::from_json(CODER_MAP.as_bytes()).unwrap()
}

#[test]
fn parses_realistic_coder_map() {
    let m = coder_map();
    assert_eq!(m.regions.len(), 3);
    let r = &m.regions[&999];
    assert!(r.embedded_relay);
    assert_eq!(r.region_code, "coder");
    assert_eq!(r.nodes[0].name, "999b");
    assert_eq!(r.nodes[0].stun_port, -1);
    assert_eq!(r.nodes[0].derp_port, 443);
    assert!(m.regions[&1000].nodes[0].stun_only);
    assert_eq!(m.regions[&1001].nodes[0].stun_port, 19302);
    assert_eq!(m.home_params, None);
    assert!(!m.omit_default_regions);
}

#[test]
fn writes_go_field_order_and_omitempty() {
    // Our output, in Go's struct field order with omitempty applied, equals the input.
    let m = coder_map();
    let out = String::from_utf8(m.to_json().unwrap()).unwrap();
    // Byte-identical to Go's encoding (region keys sorted as strings: "1000" < "1001" < "999").
    assert_eq!(out, CODER_MAP);
    assert_eq!(DerpMap::from_json(out.as_bytes()).unwrap(), m);
    assert!(out.contains(r#"{"Name":"999b","RegionID":999,"HostName":"coder.example.com","STUNPort":-1,"DERPPort":443}"#));
    assert!(out.contains(r#""EmbeddedRelay":true,"RegionID":999,"RegionCode":"coder","RegionName":"Coder Embedded Relay","Nodes":["#));
    assert!(!out.contains("HomeParams"));
    assert!(!out.contains("omitDefaultRegions"));

    // Required fields are written even when zero; omitempty ones are not.
    let empty_node = serde_json::to_string(&DerpNode::default()).unwrap();
    assert_eq!(empty_node, r#"{"Name":"","RegionID":0,"HostName":""}"#);
    let empty_region = serde_json::to_string(&DerpRegion::default()).unwrap();
    assert_eq!(
        empty_region,
        r#"{"EmbeddedRelay":false,"RegionID":0,"RegionCode":"","RegionName":"","Nodes":[]}"#
    );
    let full = DerpNode {
        name: "n".into(),
        region_id: 1,
        host_name: "h".into(),
        cert_name: "c".into(),
        ipv4: "1.2.3.4".into(),
        ipv6: "none".into(),
        stun_port: 3478,
        stun_only: true,
        derp_port: 8443,
        insecure_for_tests: true,
        force_http: true,
        stun_test_ip: "127.0.0.1".into(),
        can_port_80: true,
    };
    assert_eq!(
        serde_json::to_string(&full).unwrap(),
        r#"{"Name":"n","RegionID":1,"HostName":"h","CertName":"c","IPv4":"1.2.3.4","IPv6":"none","STUNPort":3478,"STUNOnly":true,"DERPPort":8443,"InsecureForTests":true,"ForceHTTP":true,"STUNTestIP":"127.0.0.1","CanPort80":true}"#
    );
    let m = DerpMap {
        home_params: Some(HomeParams {
            region_score: [(999, 0.5)].into_iter().collect(),
        }),
        omit_default_regions: true,
        ..Default::default()
    };
    assert_eq!(
        String::from_utf8(m.to_json().unwrap()).unwrap(),
        r#"{"HomeParams":{"RegionScore":{"999":0.5}},"Regions":{},"omitDefaultRegions":true}"#
    );
    let m = DerpMap {
        home_params: Some(HomeParams::default()),
        ..Default::default()
    };
    assert_eq!(
        String::from_utf8(m.to_json().unwrap()).unwrap(),
        r#"{"HomeParams":{},"Regions":{}}"#
    );
}

#[test]
fn reads_keys_case_insensitively() {
    let j = r#"{"OmitDefaultRegions":true,"homeparams":{"regionscore":{"1":2.5}},"regions":{"7":{"regionid":7,"REGIONCODE":"x","embeddedrelay":true,"latitude":1.5,"nomeasurenohome":true,"nodes":[{"name":"7a","hostname":"h","stunport":-1,"derpport":80,"forcehttp":true,"ipv4":"127.0.0.1","canport80":true,"Unknown":1}]}},"extra":[1,2]}"#;
    let m = DerpMap::from_json(j.as_bytes()).unwrap();
    assert!(m.omit_default_regions);
    assert_eq!(m.home_params.as_ref().unwrap().region_score[&1], 2.5);
    let r = &m.regions[&7];
    assert_eq!(
        (r.region_id, r.region_code.as_str(), r.embedded_relay),
        (7, "x", true)
    );
    assert_eq!(r.latitude, 1.5);
    assert!(r.no_measure_no_home);
    let n = &r.nodes[0];
    assert_eq!((n.name.as_str(), n.host_name.as_str()), ("7a", "h"));
    assert_eq!((n.stun_port, n.derp_port), (-1, 80));
    assert!(n.force_http && n.can_port_80);
    assert_eq!(n.ipv4, "127.0.0.1");
}

#[test]
fn exact_key_wins_and_nulls_are_zero() {
    let j = r#"{"Regions":{"1":{"RegionID":1,"regionid":5,"RegionCode":null,"Nodes":null}},"HomeParams":null}"#;
    let m = DerpMap::from_json(j.as_bytes()).unwrap();
    assert_eq!(m.regions[&1].region_id, 1);
    assert_eq!(m.regions[&1].region_code, "");
    assert!(m.regions[&1].nodes.is_empty());
    assert_eq!(m.home_params, None);
    let m = DerpMap::from_json(br#"{"Regions":null}"#).unwrap();
    assert!(m.regions.is_empty());
    assert_eq!(DerpMap::from_json(b"{}").unwrap(), DerpMap::default());
}

#[test]
fn bad_json_is_an_error() {
    for bad in [
        &b"[]"[..],
        b"null",
        b"{",
        br#"{"Regions":{"abc":{}}}"#,
        br#"{"Regions":{"1":{"RegionID":"1"}}}"#,
        br#"{"Regions":{"1":{"Nodes":[{"STUNPort":1.5}]}}}"#,
        br#"{"Regions":[]}"#,
    ] {
        assert!(
            matches!(DerpMap::from_json(bad), Err(DerpMapError::Json(_))),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn to_proto_always_sets_home_params() {
    let m = coder_map();
    let p = m.to_proto().unwrap();
    assert_eq!(p.home_params, Some(v2::derp_map::HomeParams::default()));
    assert_eq!(p.regions.len(), 3);
    let r = &p.regions[&999];
    assert_eq!(r.region_id, 999);
    assert!(r.embedded_relay);
    assert_eq!(r.nodes[0].stun_port, -1);
    assert_eq!(r.nodes[0].derp_port, 443);
    assert!(p.regions[&1000].nodes[0].stun_only);

    let with_scores = DerpMap {
        home_params: Some(HomeParams {
            region_score: [(1, 0.5)].into_iter().collect(),
        }),
        ..Default::default()
    };
    assert_eq!(
        with_scores
            .to_proto()
            .unwrap()
            .home_params
            .unwrap()
            .region_score[&1],
        0.5
    );
    // Empty map still carries home_params (field 1, empty).
    use prost::Message;
    assert_eq!(
        DerpMap::default().to_proto().unwrap().encode_to_vec(),
        vec![0x0a, 0x00]
    );
}

#[test]
fn proto_roundtrip() {
    let m = coder_map();
    let p = m.to_proto().unwrap();
    let back = DerpMap::from_proto(&p);
    assert!(same_map(&m, &back));
    assert_eq!(back.home_params, Some(HomeParams::default()));
    assert_eq!(back.regions, m.regions);
    assert_eq!(back.to_proto().unwrap(), p);
    // Absent home_params in protobuf stays absent.
    let mut p2 = p.clone();
    p2.home_params = None;
    assert_eq!(DerpMap::from_proto(&p2).home_params, None);
}

#[test]
fn out_of_range_ports_are_errors() {
    let mut m = coder_map();
    m.regions.get_mut(&999).unwrap().nodes[0].derp_port = 1 << 40;
    assert!(matches!(
        m.to_proto(),
        Err(DerpMapError::PortOutOfRange {
            region: 999,
            field: "DERPPort",
            ..
        })
    ));
}

#[test]
fn same_map_semantics() {
    let a = coder_map();
    assert!(same_map(&a, &a.clone()));

    // Node order within a region is ignored.
    let mut b = a.clone();
    let r = b.regions.get_mut(&999).unwrap();
    r.nodes.push(DerpNode {
        name: "999c".into(),
        region_id: 999,
        host_name: "other".into(),
        ..Default::default()
    });
    let mut c = b.clone();
    c.regions.get_mut(&999).unwrap().nodes.reverse();
    assert!(same_map(&b, &c));
    assert!(!same_map(&a, &b));

    // HomeParams, CanPort80 (and fields Coder's fork lacks) are ignored.
    let mut d = a.clone();
    d.home_params = Some(HomeParams {
        region_score: [(999, 0.1)].into_iter().collect(),
    });
    d.regions.get_mut(&999).unwrap().nodes[0].can_port_80 = true;
    d.regions.get_mut(&999).unwrap().latitude = 12.0;
    assert!(same_map(&a, &d));

    // Every compared field makes a difference.
    type Tweak = Box<dyn Fn(&mut DerpMap)>;
    let tweaks: Vec<Tweak> = vec![
        Box::new(|m| m.omit_default_regions = true),
        Box::new(|m| {
            m.regions.remove(&1001);
        }),
        Box::new(|m| {
            let r = m.regions.remove(&1001).unwrap();
            m.regions.insert(1002, r);
        }),
        Box::new(|m| m.regions.get_mut(&999).unwrap().embedded_relay = false),
        Box::new(|m| m.regions.get_mut(&999).unwrap().region_id = 998),
        Box::new(|m| m.regions.get_mut(&999).unwrap().region_code = "x".into()),
        Box::new(|m| m.regions.get_mut(&999).unwrap().region_name = "x".into()),
        Box::new(|m| m.regions.get_mut(&999).unwrap().avoid = true),
        Box::new(|m| m.regions.get_mut(&999).unwrap().nodes[0].name = "x".into()),
        Box::new(|m| m.regions.get_mut(&999).unwrap().nodes[0].region_id = 1),
        Box::new(|m| m.regions.get_mut(&999).unwrap().nodes[0].host_name = "x".into()),
        Box::new(|m| m.regions.get_mut(&999).unwrap().nodes[0].cert_name = "x".into()),
        Box::new(|m| m.regions.get_mut(&999).unwrap().nodes[0].ipv4 = "x".into()),
        Box::new(|m| m.regions.get_mut(&999).unwrap().nodes[0].ipv6 = "x".into()),
        Box::new(|m| m.regions.get_mut(&999).unwrap().nodes[0].stun_port = 1),
        Box::new(|m| m.regions.get_mut(&999).unwrap().nodes[0].stun_only = true),
        Box::new(|m| m.regions.get_mut(&999).unwrap().nodes[0].derp_port = 1),
        Box::new(|m| m.regions.get_mut(&999).unwrap().nodes[0].insecure_for_tests = true),
        Box::new(|m| m.regions.get_mut(&999).unwrap().nodes[0].force_http = true),
        Box::new(|m| m.regions.get_mut(&999).unwrap().nodes[0].stun_test_ip = "x".into()),
        Box::new(|m| m.regions.get_mut(&999).unwrap().nodes.clear()),
    ];
    for (i, t) in tweaks.iter().enumerate() {
        let mut e = a.clone();
        t(&mut e);
        assert!(!same_map(&a, &e), "tweak {i} not detected");
        assert!(!same_map(&e, &a), "tweak {i} not detected (reversed)");
    }

    // Protobuf flavour.
    let pa = a.to_proto().unwrap();
    let mut pd = d.to_proto().unwrap();
    assert!(same_proto_map(&pa, &pd));
    pd.regions.get_mut(&999).unwrap().nodes[0].host_name = "y".into();
    assert!(!same_proto_map(&pa, &pd));
}
