//! derper-format key file: created once, same key across restarts, clear errors.

use derp::edge::keyfile::{load_or_create, KeyFileError};

#[test]
fn edge_key_file_created_then_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("var/lib/derper/derper.key");
    let k1 = load_or_create(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pk = v["PrivateKey"].as_str().unwrap();
    assert!(pk.starts_with("privkey:") && pk.len() == 8 + 64, "{text}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // "Restart": same key.
    let k2 = load_or_create(&path).unwrap();
    assert_eq!(k1.public(), k2.public());
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text,
        "not rewritten"
    );
}

#[test]
fn edge_key_file_reads_derper_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("derper.key");
    let hex = "08".repeat(32);
    // Go's encoding/json matches field names case-insensitively and ignores unknown fields.
    std::fs::write(
        &path,
        format!("{{\"privateKey\":\"privkey:{hex}\",\"Other\":1}}"),
    )
    .unwrap();
    let k = load_or_create(&path).unwrap();
    assert_eq!(k.to_string(), format!("privkey:{hex}"));
}

#[test]
fn edge_key_file_malformed_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("derper.key");
    for bad in [
        "not json",
        "[]",
        "{}",
        "{\"PrivateKey\": 5}",
        "{\"PrivateKey\": \"nodekey:0808080808080808080808080808080808080808080808080808080808080808\"}",
        "{\"PrivateKey\": \"privkey:1234\"}",
    ] {
        std::fs::write(&path, bad).unwrap();
        let err = load_or_create(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Malformed { .. }), "{bad}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        // Never overwritten.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), bad);
    }
}

#[test]
fn edge_mesh_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("derp-mesh.key");
    std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
    let k = derp::edge::keyfile::load_mesh_key(&path).unwrap();
    assert_eq!(k.to_string(), "ab".repeat(32));
    std::fs::write(&path, "abcd").unwrap();
    let err = derp::edge::keyfile::load_mesh_key(&path).unwrap_err();
    assert!(err.to_string().contains("derp-mesh.key"), "{err}");
    assert!(derp::edge::keyfile::load_mesh_key(&dir.path().join("missing")).is_err());
}
