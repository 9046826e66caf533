//! ClientInfo / ServerInfo JSON: Go-compatible encoding and case-insensitive decoding
//! (mirrors Tailscale's TestClientInfoUnmarshal).
use proptest::prelude::*;
use proto::derp::{ClientInfo, InfoError, ServerInfo};
use proto::key::MeshKey;

const MK: &str = "6d529e9d4ef632d22d4a4214cb49da8f1ba1b72697061fb24e312984c35ec8d8";

fn mk() -> MeshKey {
    MeshKey::parse(MK).unwrap()
}

#[test]
fn client_info_unmarshal_cases() {
    // "empty"
    assert_eq!(ClientInfo::from_json(b"{}").unwrap(), ClientInfo::default());
    // "valid" (Go field names)
    let j = format!(r#"{{"Version":5,"MeshKey":"{MK}"}}"#);
    let want = ClientInfo {
        mesh_key: Some(mk()),
        version: 5,
        ..Default::default()
    };
    assert_eq!(ClientInfo::from_json(j.as_bytes()).unwrap(), want);
    // "validLowerMeshKey" (JSON tag names)
    let j = format!(r#"{{"version":5,"meshKey":"{MK}"}}"#);
    assert_eq!(ClientInfo::from_json(j.as_bytes()).unwrap(), want);
    // Any case.
    let j = format!(r#"{{"VERSION":5,"meshkey":"{}"}}"#, MK.to_uppercase());
    assert_eq!(ClientInfo::from_json(j.as_bytes()).unwrap(), want);
    // "invalidMeshKeyToShort" / "invalidMeshKeyToLong"
    for bad in [
        r#"{"version":5,"meshKey":"abcdefg"}"#,
        r#"{"version":5,"meshKey":"ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"}"#,
    ] {
        let err = ClientInfo::from_json(bad.as_bytes()).unwrap_err();
        assert!(matches!(err, InfoError::InvalidMeshKey), "{bad}");
        assert_eq!(err.to_string(), "invalid mesh key");
    }
}

#[test]
fn client_info_more_decoding_rules() {
    // Non-hex, odd length (65), non-string and null mesh keys are invalid.
    for bad in [
        format!(r#"{{"meshKey":"{}zz"}}"#, &MK[..62]),
        format!(r#"{{"meshKey":"{MK}f"}}"#),
        r#"{"meshKey":123}"#.to_string(),
        r#"{"meshKey":null}"#.to_string(),
        format!(r#"{{"meshKey":" {MK}"}}"#),
    ] {
        assert!(
            matches!(
                ClientInfo::from_json(bad.as_bytes()),
                Err(InfoError::InvalidMeshKey)
            ),
            "{bad}"
        );
    }
    // Unknown fields are ignored, whatever their type.
    let j =
        br#"{"foo":[1,{"a":null}],"CanAckPings":true,"IsProber":true,"AppName":"coder","x":1.5}"#;
    assert_eq!(
        ClientInfo::from_json(j).unwrap(),
        ClientInfo {
            can_ack_pings: true,
            is_prober: true,
            app_name: "coder".into(),
            ..Default::default()
        }
    );
    // null leaves a field unchanged; a later duplicate wins.
    let j = br#"{"version":3,"Version":null,"canackpings":false,"CANACKPINGS":true}"#;
    let ci = ClientInfo::from_json(j).unwrap();
    assert_eq!(ci.version, 3);
    assert!(ci.can_ack_pings);
    // Version is not validated.
    assert_eq!(
        ClientInfo::from_json(br#"{"version":-7}"#).unwrap().version,
        -7
    );
    // Top-level null is Go's no-op.
    assert_eq!(
        ClientInfo::from_json(b"null").unwrap(),
        ClientInfo::default()
    );
    // All-zero mesh key is treated as absent.
    let zero = "0".repeat(64);
    assert_eq!(
        ClientInfo::from_json(format!(r#"{{"meshKey":"{zero}"}}"#).as_bytes())
            .unwrap()
            .mesh_key,
        None
    );
    // Type errors and syntax errors are JSON errors; syntax beats a bad mesh key (Go checks
    // the whole document first).
    for bad in [
        &br#"{"version":"2"}"#[..],
        br#"{"version":2.5}"#,
        br#"{"CanAckPings":1}"#,
        br#"{"AppName":5}"#,
        br#"[]"#,
        br#""x""#,
        br#"{"version":2"#,
        br#"{"meshKey":"abc","#,
        b"",
    ] {
        assert!(
            matches!(ClientInfo::from_json(bad), Err(InfoError::Json(_))),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn client_info_encoding_matches_go() {
    let ci = ClientInfo {
        version: 2,
        can_ack_pings: true,
        ..Default::default()
    };
    let j = ci.to_json();
    assert_eq!(j, br#"{"version":2,"CanAckPings":true}"#);
    assert_eq!(j.len(), 32);
    assert_eq!(ClientInfo::default().to_json(), br#"{"CanAckPings":false}"#);
    let full = ClientInfo {
        mesh_key: Some(mk()),
        version: 2,
        can_ack_pings: true,
        is_prober: true,
        app_name: "tail\"scale".into(),
    };
    assert_eq!(
        String::from_utf8(full.to_json()).unwrap(),
        format!(
            r#"{{"meshKey":"{MK}","version":2,"CanAckPings":true,"IsProber":true,"AppName":"tail\"scale"}}"#
        )
    );
    assert_eq!(ClientInfo::from_json(&full.to_json()).unwrap(), full);
    // A zero mesh key is omitted like Go's omitzero.
    let zero = ClientInfo {
        mesh_key: Some(MeshKey::from_bytes([0; 32])),
        ..Default::default()
    };
    assert_eq!(zero.to_json(), br#"{"CanAckPings":false}"#);
}

#[test]
fn server_info_json() {
    assert_eq!(ServerInfo::current().to_json(), br#"{"version":2}"#);
    assert_eq!(ServerInfo::default().to_json(), b"{}");
    let si = ServerInfo {
        version: 2,
        token_bucket_bytes_per_second: 1000,
        token_bucket_bytes_burst: 2000,
    };
    assert_eq!(
        si.to_json(),
        br#"{"version":2,"TokenBucketBytesPerSecond":1000,"TokenBucketBytesBurst":2000}"#
    );
    assert_eq!(ServerInfo::from_json(&si.to_json()).unwrap(), si);
    let only_burst = ServerInfo {
        token_bucket_bytes_burst: 5,
        ..Default::default()
    };
    assert_eq!(only_burst.to_json(), br#"{"TokenBucketBytesBurst":5}"#);
    assert_eq!(
        ServerInfo::from_json(br#"{"Version":2,"tokenbucketbytespersecond":9,"other":true}"#)
            .unwrap(),
        ServerInfo {
            version: 2,
            token_bucket_bytes_per_second: 9,
            token_bucket_bytes_burst: 0
        }
    );
    assert!(ServerInfo::from_json(br#"{"version":"2"}"#).is_err());
    assert!(ServerInfo::from_json(b"{").is_err());
}

proptest! {
    #[test]
    fn client_info_round_trips(
        mesh in proptest::option::of(any::<[u8; 32]>().prop_filter("non-zero", |k| k != &[0; 32])),
        version in any::<i64>(),
        can_ack_pings in any::<bool>(),
        is_prober in any::<bool>(),
        app_name in any::<String>(),
    ) {
        let ci = ClientInfo {
            mesh_key: mesh.map(MeshKey::from_bytes),
            version,
            can_ack_pings,
            is_prober,
            app_name,
        };
        prop_assert_eq!(ClientInfo::from_json(&ci.to_json()).unwrap(), ci.clone());
        // serde_json agrees it is valid JSON.
        let v: serde_json::Value = serde_json::from_slice(&ci.to_json()).unwrap();
        prop_assert!(v.is_object());
    }

    #[test]
    fn server_info_round_trips(a in any::<i64>(), b in any::<i64>(), c in any::<i64>()) {
        let si = ServerInfo { version: a, token_bucket_bytes_per_second: b, token_bucket_bytes_burst: c };
        prop_assert_eq!(ServerInfo::from_json(&si.to_json()).unwrap(), si);
    }

    #[test]
    fn arbitrary_json_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        proto::fuzzing::derp_handshake(&data);
    }
}
