//! The relay's long-lived DERP private key, stored in derper's JSON key file format.
//!
//! Why: clients learn a relay's key on their first connection and some pin it; a key that changes
//! on restart breaks every cached DERP map entry and mesh peer. Using derper's exact format
//! (`{"PrivateKey":"privkey:<64 hex>"}`, keys matched case-insensitively like Go's encoding/json)
//! lets an operator move an existing derper key file to tailnetd and back.
//!
//! Rules: a missing file is created (parent directories too) with a fresh key, mode 0600, written
//! to a temporary file and renamed so a crash never leaves a truncated key; an existing file that
//! does not parse is an error naming the file and is never overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};

use proto::key::{MeshKey, NodePrivate};

/// Errors reading or creating the key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file exists but could not be read.
    #[error("reading DERP key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not `{"PrivateKey":"privkey:<64 hex>"}`.
    #[error("DERP key file {path} is malformed: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The mesh key file is not 64 hex digits.
    #[error("mesh key file {path} is malformed: want 64 hex digits")]
    BadMeshKey {
        /// The file.
        path: PathBuf,
    },
    /// The file could not be created.
    #[error("creating DERP key file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Parses the contents of a key file.
pub fn parse(path: &Path, contents: &[u8]) -> Result<NodePrivate, KeyFileError> {
    let malformed = |reason: String| KeyFileError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(contents).map_err(|e| malformed(format!("not JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| malformed("not a JSON object".into()))?;
    let raw = obj
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("PrivateKey"))
        .map(|(_, v)| v)
        .ok_or_else(|| malformed("no \"PrivateKey\" field".into()))?;
    let text = raw
        .as_str()
        .ok_or_else(|| malformed("\"PrivateKey\" is not a string".into()))?;
    let key: NodePrivate = text
        .parse()
        .map_err(|e| malformed(format!("\"PrivateKey\": {e}")))?;
    if key.is_zero() {
        return Err(malformed("\"PrivateKey\" is the zero key".into()));
    }
    Ok(key)
}

/// Encodes a key in derper's format (tab-indented like `json.MarshalIndent(cfg, "", "\t")`).
pub fn encode(key: &NodePrivate) -> String {
    format!("{{\n\t\"PrivateKey\": \"{key}\"\n}}")
}

/// Loads the key from `path`, or creates the file with a fresh key if it does not exist.
pub fn load_or_create(path: &Path) -> Result<NodePrivate, KeyFileError> {
    match std::fs::read(path) {
        Ok(contents) => parse(path, &contents),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = NodePrivate::generate(&mut rand::rngs::OsRng);
            write_new(path, &key)?;
            tracing::info!(path = %path.display(), public_key = %key.public(), "created DERP key file");
            Ok(key)
        }
        Err(source) => Err(KeyFileError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads a mesh pre-shared key file (derper's `--mesh-psk-file`): 64 hex digits, surrounding
/// whitespace ignored. Never created: every node of a region must share the same key.
pub fn load_mesh_key(path: &Path) -> Result<MeshKey, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    match MeshKey::parse(&text) {
        Ok(k) if !k.is_zero() => Ok(k),
        _ => Err(KeyFileError::BadMeshKey {
            path: path.to_path_buf(),
        }),
    }
}

fn write_new(path: &Path, key: &NodePrivate) -> Result<(), KeyFileError> {
    let werr = |source| KeyFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(werr)?;
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let result = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(encode(key).as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(werr)
}
