//! STUN (RFC 5389) as Tailscale uses it: derper's acceptance rules for binding requests, the
//! binding response it sends, and the client side (request builder, response parser).
//!
//! Why: Tailscale clients learn their public address by STUNning the DERP servers (UDP 3478), and
//! derper answers only requests that carry SOFTWARE `tailnode` and a valid trailing FINGERPRINT.
//! The request layout is fixed (40 bytes: header, SOFTWARE, FINGERPRINT) because Tailscale's XDP
//! server depends on it. What this module must never do: answer or accept a request derper would
//! ignore, read beyond the buffer, allocate for rejected packets, or panic on any input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// STUN transaction id.
pub type TxId = [u8; 12];

/// The RFC 5389 magic cookie, bytes 4..8 of every STUN message.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// STUN header length.
pub const HEADER_LEN: usize = 20;
/// Message type of a Binding Request.
pub const BINDING_REQUEST: u16 = 0x0001;
/// Message type of a Binding Success Response.
pub const BINDING_SUCCESS: u16 = 0x0101;
/// MAPPED-ADDRESS attribute.
pub const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
/// XOR-MAPPED-ADDRESS attribute.
pub const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// XOR-MAPPED-ADDRESS in the comprehension-optional range, sent by some servers.
pub const ATTR_XOR_MAPPED_ADDRESS_ALT: u16 = 0x8020;
/// SOFTWARE attribute.
pub const ATTR_SOFTWARE: u16 = 0x8022;
/// FINGERPRINT attribute.
pub const ATTR_FINGERPRINT: u16 = 0x8028;
/// The SOFTWARE value derper requires (8 bytes, so no padding).
pub const SOFTWARE: &[u8; 8] = b"tailnode";
/// XOR applied to the CRC-32 in FINGERPRINT ("STUN").
pub const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// Length of the FINGERPRINT attribute including its 4-byte TLV header.
const FINGERPRINT_ATTR_LEN: usize = 8;
/// Length of a Tailscale binding request.
pub const REQUEST_LEN: usize = HEADER_LEN + 4 + SOFTWARE.len() + FINGERPRINT_ATTR_LEN;

/// Why a STUN packet was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Under 20 bytes, top two bits set, or no magic cookie.
    #[error("not a STUN packet")]
    NotStun,
    /// A STUN message other than a Binding Request.
    #[error("STUN request not a binding request")]
    NotBindingRequest,
    /// A STUN message other than a Binding Success Response.
    #[error("STUN packet is not a success response")]
    NotSuccessResponse,
    /// Attributes do not parse as TLVs within the packet, or no usable address attribute.
    #[error("STUN packet has malformed attributes")]
    MalformedAttrs,
    /// No SOFTWARE attribute equal to `tailnode`.
    #[error("STUN request came from non-Tailscale software")]
    WrongSoftware,
    /// The last attribute is not FINGERPRINT.
    #[error("STUN request didn't end in fingerprint")]
    NoFingerprint,
    /// FINGERPRINT does not match the CRC-32 of the preceding bytes.
    #[error("STUN request had bogus fingerprint")]
    WrongFingerprint,
}

fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(s) => u16::from_be_bytes([s[0], s[1]]),
        None => 0,
    }
}

fn fingerprint(b: &[u8]) -> u32 {
    crc32fast::hash(b) ^ FINGERPRINT_XOR
}

/// Whether `b` looks like a STUN message: ≥ 20 bytes, top two bits of byte 0 clear, magic cookie.
pub fn is_stun(b: &[u8]) -> bool {
    b.len() >= HEADER_LEN && b[0] & 0b1100_0000 == 0 && b[4..8] == MAGIC_COOKIE
}

fn txid_of(b: &[u8]) -> TxId {
    let mut t = [0u8; 12];
    if let Some(s) = b.get(8..HEADER_LEN) {
        t.copy_from_slice(s);
    }
    t
}

/// Walks TLV attributes (value padded to 4 bytes), calling `f(type, value)` for each.
fn for_each_attr(
    mut b: &[u8],
    mut f: impl FnMut(u16, &[u8]) -> Result<(), StunError>,
) -> Result<(), StunError> {
    while !b.is_empty() {
        if b.len() < 4 {
            return Err(StunError::MalformedAttrs);
        }
        let typ = be16(b, 0);
        let len = usize::from(be16(b, 2));
        let padded = (len + 3) & !3;
        b = &b[4..];
        if padded > b.len() {
            return Err(StunError::MalformedAttrs);
        }
        f(typ, &b[..len])?;
        b = &b[padded..];
    }
    Ok(())
}

/// Parses a binding request by derper's exact rules (`stun.ParseBindingRequest`): STUN framing,
/// type 0x0001, attributes walk to the end of the packet (the header length field is ignored),
/// a SOFTWARE attribute equal to `tailnode`, the last attribute FINGERPRINT, and the last
/// 4-byte FINGERPRINT value equal to CRC-32 of all bytes before the final 8 XOR 0x5354554e.
pub fn parse_binding_request(b: &[u8]) -> Result<TxId, StunError> {
    if !is_stun(b) {
        return Err(StunError::NotStun);
    }
    if be16(b, 0) != BINDING_REQUEST {
        return Err(StunError::NotBindingRequest);
    }
    let mut software_ok = false;
    let mut last_attr = 0u16;
    let mut got_fp = 0u32;
    for_each_attr(&b[HEADER_LEN..], |typ, val| {
        last_attr = typ;
        if typ == ATTR_SOFTWARE && val == SOFTWARE {
            software_ok = true;
        }
        if typ == ATTR_FINGERPRINT && val.len() == 4 {
            got_fp = u32::from_be_bytes([val[0], val[1], val[2], val[3]]);
        }
        Ok(())
    })?;
    if !software_ok {
        return Err(StunError::WrongSoftware);
    }
    if last_attr != ATTR_FINGERPRINT {
        return Err(StunError::NoFingerprint);
    }
    // A SOFTWARE attribute was present, so the packet is at least 32 bytes long.
    let covered = b.len().saturating_sub(FINGERPRINT_ATTR_LEN);
    if got_fp != fingerprint(&b[..covered]) {
        return Err(StunError::WrongFingerprint);
    }
    Ok(txid_of(b))
}

/// Builds Tailscale's 40-byte binding request: header (type 0x0001, length 20, cookie, `txid`),
/// SOFTWARE `tailnode`, FINGERPRINT.
pub fn build_binding_request(txid: TxId) -> Vec<u8> {
    let mut b = Vec::with_capacity(REQUEST_LEN);
    b.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    let attrs_len = (REQUEST_LEN - HEADER_LEN) as u16;
    b.extend_from_slice(&attrs_len.to_be_bytes());
    b.extend_from_slice(&MAGIC_COOKIE);
    b.extend_from_slice(&txid);
    b.extend_from_slice(&ATTR_SOFTWARE.to_be_bytes());
    b.extend_from_slice(&(SOFTWARE.len() as u16).to_be_bytes());
    b.extend_from_slice(SOFTWARE);
    let fp = fingerprint(&b);
    b.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    b.extend_from_slice(&4u16.to_be_bytes());
    b.extend_from_slice(&fp.to_be_bytes());
    b
}

/// The canonical address to report: IPv4 (including v4-mapped IPv6) as IPv4, else IPv6.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Builds the binding success response derper sends: type 0x0101, the request's `txid`, and one
/// XOR-MAPPED-ADDRESS attribute (family 1 for IPv4 and v4-mapped IPv6 sources, family 2 for
/// IPv6). 32 bytes for IPv4, 44 for IPv6.
pub fn build_binding_response(txid: TxId, addr: SocketAddr) -> Vec<u8> {
    let mut ipa = [0u8; 16];
    let (family, ip_len) = match unmap(addr.ip()) {
        IpAddr::V4(v4) => {
            ipa[..4].copy_from_slice(&v4.octets());
            (1u8, 4usize)
        }
        IpAddr::V6(v6) => {
            ipa = v6.octets();
            (2u8, 16usize)
        }
    };

    let attrs_len = 8 + ip_len;
    let mut b = Vec::with_capacity(HEADER_LEN + attrs_len);
    b.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    b.extend_from_slice(&(attrs_len as u16).to_be_bytes());
    b.extend_from_slice(&MAGIC_COOKIE);
    b.extend_from_slice(&txid);
    b.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    b.extend_from_slice(&((4 + ip_len) as u16).to_be_bytes());
    b.push(0);
    b.push(family);
    b.extend_from_slice(&(addr.port() ^ 0x2112).to_be_bytes());
    for (i, o) in ipa[..ip_len].iter().enumerate() {
        let x = if i < 4 { MAGIC_COOKIE[i] } else { txid[i - 4] };
        b.push(o ^ x);
    }
    b
}

fn family_len(fam: u8) -> Option<usize> {
    match fam {
        1 => Some(4),
        2 => Some(16),
        _ => None,
    }
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(bytes);
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => None,
    }
}

fn xor_mapped(txid: &TxId, v: &[u8]) -> Result<SocketAddr, StunError> {
    if v.len() < 4 {
        return Err(StunError::MalformedAttrs);
    }
    let port = be16(v, 2) ^ 0x2112;
    let n = family_len(v[1]).ok_or(StunError::MalformedAttrs)?;
    let field = v.get(4..4 + n).ok_or(StunError::MalformedAttrs)?;
    let mut a = [0u8; 16];
    for (i, o) in field.iter().enumerate() {
        let x = if i < 4 { MAGIC_COOKIE[i] } else { txid[i - 4] };
        a[i] = o ^ x;
    }
    let ip = ip_from(&a[..n]).ok_or(StunError::MalformedAttrs)?;
    Ok(SocketAddr::new(unmap(ip), port))
}

fn mapped(v: &[u8]) -> Result<SocketAddr, StunError> {
    if v.len() < 4 {
        return Err(StunError::MalformedAttrs);
    }
    let port = be16(v, 2);
    let n = family_len(v[1]).ok_or(StunError::MalformedAttrs)?;
    let field = v.get(4..4 + n).ok_or(StunError::MalformedAttrs)?;
    let ip = ip_from(field).ok_or(StunError::MalformedAttrs)?;
    Ok(SocketAddr::new(unmap(ip), port))
}

/// Parses a binding success response like `stun.ParseResponse`: the address comes from the last
/// XOR-MAPPED-ADDRESS (0x0020 or 0x8020), else from MAPPED-ADDRESS (0x0001); v4-mapped addresses
/// are unmapped. Bytes beyond the header's length field are ignored.
pub fn parse_binding_response(b: &[u8]) -> Result<(TxId, SocketAddr), StunError> {
    if !is_stun(b) {
        return Err(StunError::NotStun);
    }
    let txid = txid_of(b);
    if be16(b, 0) != BINDING_SUCCESS {
        return Err(StunError::NotSuccessResponse);
    }
    let attrs_len = usize::from(be16(b, 2));
    let attrs = b
        .get(HEADER_LEN..HEADER_LEN + attrs_len)
        .ok_or(StunError::MalformedAttrs)?;
    let mut addr = None;
    let mut fallback = None;
    for_each_attr(attrs, |typ, v| {
        match typ {
            ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_MAPPED_ADDRESS_ALT => {
                addr = Some(xor_mapped(&txid, v)?)
            }
            ATTR_MAPPED_ADDRESS => fallback = Some(mapped(v)?),
            _ => {}
        }
        Ok(())
    })?;
    addr.or(fallback)
        .map(|a| (txid, a))
        .ok_or(StunError::MalformedAttrs)
}
