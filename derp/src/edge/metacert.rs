//! The DERP "meta cert": a throwaway self-signed certificate that carries the server's DERP public
//! key and protocol version inside the TLS handshake.
//!
//! Why: a Go client that negotiated TLS 1.3 scans the server's certificate chain for a certificate
//! whose subject CN is `derpkey<64 hex>`; if it finds one (with the serial number as the protocol
//! version), it skips waiting for the HTTP 101 response and pipelines its sealed ClientInfo right
//! behind the upgrade request ("fast start"), saving one round trip. derper appends this cert as
//! the *last* certificate of the served chain. Its own key is a fresh Ed25519 key (the DERP key is
//! Curve25519 and cannot sign); only the CN matters to clients.
//!
//! Shape (matching derper's `initMetacert`): CN `derpkey` + lowercase hex of the DERP public key,
//! serial number = protocol version (2), valid from now−30 days to now+30 days, and exactly one
//! extension: BasicConstraints (critical, not a CA), which macOS requires for subject == issuer.
//! rcgen adds a SubjectKeyIdentifier whenever it writes BasicConstraints itself, so we write
//! BasicConstraints as a custom extension instead.
//!
//! This module never touches the real serving certificate.

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Subject CN prefix of the meta cert.
pub const COMMON_NAME_PREFIX: &str = "derpkey";

/// DERP protocol version carried as the serial number.
pub const PROTOCOL_VERSION: u8 = 2;

/// BasicConstraints OID (2.5.29.19).
const BASIC_CONSTRAINTS_OID: &[u64] = &[2, 5, 29, 19];

/// Meta cert generation failed (only if the crypto backend fails).
#[derive(Debug, thiserror::Error)]
#[error("generating the DERP meta certificate: {0}")]
pub struct MetaCertError(#[from] rcgen::Error);

/// Builds the meta cert (DER) for the server whose DERP public key is `public_key`.
pub fn generate(public_key: &[u8; 32]) -> Result<CertificateDer<'static>, MetaCertError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        format!("{COMMON_NAME_PREFIX}{}", hex::encode(public_key)),
    );
    params.distinguished_name = dn;
    params.serial_number = Some(rcgen::SerialNumber::from(vec![PROTOCOL_VERSION]));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now + time::Duration::days(30);
    params.is_ca = rcgen::IsCa::NoCa;
    // DER of BasicConstraints{cA: false}: an empty SEQUENCE (cA defaults to false), critical,
    // exactly as Go's x509 encodes `BasicConstraintsValid: true`.
    let mut bc = rcgen::CustomExtension::from_oid_content(BASIC_CONSTRAINTS_OID, vec![0x30, 0x00]);
    bc.set_criticality(true);
    params.custom_extensions = vec![bc];
    let cert = params.self_signed(&key)?;
    Ok(cert.der().clone())
}

/// What a client learns from a meta cert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaCertInfo {
    /// The server's DERP public key.
    pub public_key: [u8; 32],
    /// The server's DERP protocol version (the serial number).
    pub protocol_version: u8,
}

/// Parses one certificate as a meta cert, the way the Go client does: CN must start with
/// `derpkey` followed by 64 hex digits of a non-zero key, and the serial must fit in 8 bits and be
/// non-zero. Returns `None` for any other certificate.
pub fn parse(der: &[u8]) -> Option<MetaCertInfo> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let hex_key = cn.strip_prefix(COMMON_NAME_PREFIX)?;
    let mut public_key = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut public_key).ok()?;
    let serial = cert.tbs_certificate.raw_serial();
    // Strip DER sign padding; what is left must be one byte.
    let serial: Vec<u8> = serial.iter().copied().skip_while(|b| *b == 0).collect();
    if serial.len() != 1 || serial[0] == 0 || public_key == [0u8; 32] {
        return None;
    }
    Some(MetaCertInfo {
        public_key,
        protocol_version: serial[0],
    })
}

/// Scans a served chain for a meta cert (the Go client looks at every certificate).
pub fn find_in_chain<'a>(
    chain: impl IntoIterator<Item = &'a CertificateDer<'a>>,
) -> Option<MetaCertInfo> {
    chain.into_iter().find_map(|c| parse(c.as_ref()))
}

#[cfg(test)]
mod edge_tests {
    use super::*;
    use x509_parser::extensions::ParsedExtension;

    #[test]
    fn edge_meta_cert_shape() {
        let key = [0xabu8; 32];
        let der = generate(&key).unwrap();
        let (_, cert) = X509Certificate::from_der(der.as_ref()).unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(cn, format!("derpkey{}", "ab".repeat(32)));
        assert_eq!(cert.subject(), cert.issuer());
        assert_eq!(cert.tbs_certificate.raw_serial(), &[2]);
        let exts = cert.extensions();
        assert_eq!(exts.len(), 1, "only BasicConstraints: {exts:?}");
        assert!(exts[0].critical);
        match exts[0].parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca),
            other => panic!("unexpected extension {other:?}"),
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let nb = cert.validity().not_before.timestamp();
        let na = cert.validity().not_after.timestamp();
        assert!((now - 30 * 86400 - nb).abs() < 120);
        assert!((na - now - 30 * 86400).abs() < 120);
        // Ed25519 key and signature.
        assert_eq!(
            cert.signature_algorithm.algorithm.to_id_string(),
            "1.3.101.112"
        );
        assert_eq!(
            parse(der.as_ref()),
            Some(MetaCertInfo {
                public_key: key,
                protocol_version: 2
            })
        );
    }

    #[test]
    fn edge_parse_rejects_other_certs() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        assert_eq!(parse(ck.cert.der().as_ref()), None);
        assert_eq!(parse(b"garbage"), None);
        assert_eq!(parse(generate(&[0u8; 32]).unwrap().as_ref()), None);
    }
}
