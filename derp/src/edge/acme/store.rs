//! The certificate directory (`cert_dir`): what survives a restart, in derper's layout.
//!
//! derper (`-certmode=letsencrypt`, Go's `autocert.DirCache`) keeps a host's certificate in one
//! file named after the host: the private key PEM block first, then the chain, leaf first. We
//! read and write that same file, so a directory can move between derper and tailnetd in either
//! direction without a new order (derper writes SEC1 `EC PRIVATE KEY`, we write PKCS#8
//! `PRIVATE KEY`; both read both). The ACME account key is ours alone
//! (`acme_account+key.pk8`, PKCS#8: autocert's `acme_account+key` is SEC1, which the ACME client
//! does not load), so the two never overwrite each other's account.
//!
//! Files are written to a temporary name in the same directory and renamed, so a crash leaves
//! the old file or the new one, never half of one; keys are created with mode 0600.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::timing::Validity;

/// File name of our ACME account key in the directory.
pub const ACCOUNT_KEY_FILE: &str = "acme_account+key.pk8";

/// Errors of the certificate directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file does not hold a key and a certificate chain.
    #[error("{path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A certificate with its key, as stored.
#[derive(Debug)]
pub struct StoredCert {
    /// Chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// The leaf's validity.
    pub validity: Validity,
}

/// derper's file name for a host: the host without characters outside `[a-zA-Z0-9-.]`.
pub fn cert_file(dir: &Path, hostname: &str) -> PathBuf {
    let safe: String = hostname
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect();
    dir.join(safe)
}

/// The validity window of a DER certificate.
pub fn validity_of(der: &[u8]) -> Option<Validity> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let secs = |t: i64| {
        u64::try_from(t)
            .ok()
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
    };
    Some(Validity {
        not_before: secs(cert.validity().not_before.timestamp())?,
        not_after: secs(cert.validity().not_after.timestamp())?,
    })
}

/// Parses a key-and-chain PEM text (in any order of blocks; derper writes the key first).
pub fn parse(pem: &[u8], path: &Path) -> Result<StoredCert, StoreError> {
    let bad = |reason: String| StoreError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let chain = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bad PEM: {e}")))?;
    let key = rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| bad(format!("bad PEM: {e}")))?
        .ok_or_else(|| bad("no private key".into()))?;
    let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
    let validity =
        validity_of(leaf).ok_or_else(|| bad("the leaf certificate does not parse".into()))?;
    Ok(StoredCert {
        chain,
        key,
        validity,
    })
}

/// Loads the stored certificate of `hostname`; `Ok(None)` when there is none.
pub fn load(dir: &Path, hostname: &str) -> Result<Option<StoredCert>, StoreError> {
    let path = cert_file(dir, hostname);
    match std::fs::read(&path) {
        Ok(pem) => parse(&pem, &path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io { path, source }),
    }
}

/// Stores `key_pem` followed by `chain_pem` as the certificate of `hostname`.
pub fn save(
    dir: &Path,
    hostname: &str,
    key_pem: &str,
    chain_pem: &str,
) -> Result<PathBuf, StoreError> {
    let path = cert_file(dir, hostname);
    let mut text = String::with_capacity(key_pem.len() + chain_pem.len() + 1);
    text.push_str(key_pem);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(chain_pem);
    write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

/// Loads the account key (PKCS#8 PEM); `Ok(None)` when there is none.
pub fn load_account_key(dir: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    let path = dir.join(ACCOUNT_KEY_FILE);
    let pem = match std::fs::read(&path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::Io { path, source }),
    };
    for item in rustls_pemfile::read_all(&mut &pem[..]) {
        if let Ok(rustls_pemfile::Item::Pkcs8Key(k)) = item {
            return Ok(Some(k.secret_pkcs8_der().to_vec()));
        }
    }
    Err(StoreError::Malformed {
        path,
        reason: "no PKCS#8 PRIVATE KEY block".into(),
    })
}

/// Stores the account key (PKCS#8 DER) as PEM.
pub fn save_account_key(dir: &Path, pkcs8_der: &[u8]) -> Result<(), StoreError> {
    let pem = pem_block("PRIVATE KEY", pkcs8_der);
    write_atomic(&dir.join(ACCOUNT_KEY_FILE), pem.as_bytes())
}

/// One PEM block.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("cert"),
        std::process::id()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod edge_tests {
    use super::*;

    #[test]
    fn derper_layout_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["derp.example.com".into()]).unwrap();
        let path = save(
            dir.path(),
            "derp.example.com",
            &ck.key_pair.serialize_pem(),
            &ck.cert.pem(),
        )
        .unwrap();
        assert_eq!(path, dir.path().join("derp.example.com"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("-----BEGIN PRIVATE KEY-----"),
            "key first, as autocert"
        );
        let got = load(dir.path(), "derp.example.com").unwrap().unwrap();
        assert_eq!(got.chain, vec![ck.cert.der().clone()]);
        assert!(got.validity.not_after > got.validity.not_before);
        assert!(load(dir.path(), "other.example.com").unwrap().is_none());
        // derper's hostname sanitising.
        assert_eq!(cert_file(dir.path(), "a/b:c.d"), dir.path().join("abc.d"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn junk_and_a_chain_without_its_key_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["h".into()]).unwrap();
        std::fs::write(dir.path().join("h"), "junk").unwrap();
        assert!(matches!(
            load(dir.path(), "h"),
            Err(StoreError::Malformed { .. })
        ));
        std::fs::write(dir.path().join("h"), ck.cert.pem()).unwrap();
        assert!(load(dir.path(), "h").is_err(), "a chain without its key");
    }

    #[test]
    fn account_key_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_account_key(dir.path()).unwrap().is_none());
        let der = vec![1u8, 2, 3, 4, 5];
        save_account_key(dir.path(), &der).unwrap();
        assert_eq!(load_account_key(dir.path()).unwrap(), Some(der));
    }
}
