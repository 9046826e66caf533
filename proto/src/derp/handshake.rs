//! Building and opening the three handshake frames: ServerKey, ClientInfo, ServerInfo.
//!
//! Why: both our server and our (mesh) client must produce and check exactly what Tailscale's
//! `Server.accept` / `derp.NewClient` do, and every rejection must be a distinct error so the
//! caller can log and count it before closing the connection. Nonces are arguments: this module
//! must never pick one itself, and must never open a box from an all-zero public key.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{Frame, FrameError};
use super::header::{FrameHeader, FrameType};
use super::info::{ClientInfo, InfoError, ServerInfo};
use super::{
    FRAME_HEADER_LEN, KEY_LEN, MAGIC, MAX_CLIENT_INFO_LEN, MAX_SERVER_INFO_LEN,
    MIN_CLIENT_INFO_LEN, SERVER_KEY_LEN,
};
use crate::key::{BoxError, NodePrivate, NodePublic, BOX_OVERHEAD, NONCE_LEN};

/// Why a handshake frame was rejected.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Payload shorter than the minimum for its frame.
    #[error("handshake frame too short: {len} bytes, need at least {min}")]
    TooShort {
        /// Length found.
        len: usize,
        /// Minimum length.
        min: usize,
    },
    /// Payload longer than the maximum for its frame.
    #[error("handshake frame too long: {len} bytes, at most {max}")]
    TooLong {
        /// Length found.
        len: usize,
        /// Maximum length.
        max: usize,
    },
    /// The peer's public key is all zeros.
    #[error("zero public key")]
    ZeroKey,
    /// The sealed box did not open (wrong key, tampering).
    #[error("cannot open box: {0}")]
    Box(#[from] BoxError),
    /// The decrypted JSON was not acceptable.
    #[error("bad info JSON: {0}")]
    Info(#[from] InfoError),
    /// A frame of another type or layout arrived where a handshake frame was required.
    #[error("bad handshake frame: {0}")]
    Frame(#[from] FrameError),
}

/// The complete ServerKey frame (45 bytes: header, magic, key).
pub fn server_key_frame(server_pub: &NodePublic) -> [u8; FRAME_HEADER_LEN + SERVER_KEY_LEN] {
    let mut out = [0u8; FRAME_HEADER_LEN + SERVER_KEY_LEN];
    let h = FrameHeader::new(FrameType::ServerKey, SERVER_KEY_LEN as u32).encode();
    out[..FRAME_HEADER_LEN].copy_from_slice(&h);
    out[FRAME_HEADER_LEN..FRAME_HEADER_LEN + MAGIC.len()].copy_from_slice(&MAGIC);
    out[FRAME_HEADER_LEN + MAGIC.len()..].copy_from_slice(server_pub.as_bytes());
    out
}

/// Checks a ServerKey payload the way `derp.NewClient` does (≥ 40 bytes, magic prefix, extra
/// bytes allowed, at most 1 KiB) and returns the server key. Zero keys are rejected.
pub fn parse_server_key(payload: &[u8]) -> Result<NodePublic, HandshakeError> {
    if payload.len() > super::MAX_SERVER_KEY_LEN {
        return Err(HandshakeError::TooLong {
            len: payload.len(),
            max: super::MAX_SERVER_KEY_LEN,
        });
    }
    if payload.len() < SERVER_KEY_LEN {
        return Err(HandshakeError::TooShort {
            len: payload.len(),
            min: SERVER_KEY_LEN,
        });
    }
    if payload[..MAGIC.len()] != MAGIC {
        return Err(FrameError::BadMagic.into());
    }
    let key = NodePublic::from_slice(&payload[MAGIC.len()..SERVER_KEY_LEN]).ok_or(
        HandshakeError::TooShort {
            len: payload.len(),
            min: SERVER_KEY_LEN,
        },
    )?;
    if key.is_zero() {
        return Err(HandshakeError::ZeroKey);
    }
    Ok(key)
}

/// The ClientInfo frame payload: the client's public key followed by the box
/// (`nonce || tag || ciphertext`) of `info`'s JSON sealed to the server.
pub fn seal_client_info(
    client_priv: &NodePrivate,
    server_pub: &NodePublic,
    info: &ClientInfo,
    nonce: [u8; NONCE_LEN],
) -> Vec<u8> {
    let json = info.to_json();
    let mut out = Vec::with_capacity(KEY_LEN + BOX_OVERHEAD + json.len());
    out.extend_from_slice(client_priv.public().as_bytes());
    client_priv.seal_to_into(server_pub, &json, nonce, &mut out);
    out
}

/// The complete ClientInfo frame (header + [`seal_client_info`] payload).
pub fn client_info_frame(
    client_priv: &NodePrivate,
    server_pub: &NodePublic,
    info: &ClientInfo,
    nonce: [u8; NONCE_LEN],
) -> Bytes {
    with_header(
        FrameType::ClientInfo,
        &seal_client_info(client_priv, server_pub, info, nonce),
    )
}

/// Opens a ClientInfo frame payload on the server: rejects payloads under 56 or over 256 KiB
/// bytes, an all-zero client key, a box that does not open and JSON that does not decode.
pub fn open_client_info(
    server_priv: &NodePrivate,
    payload: &[u8],
) -> Result<(NodePublic, ClientInfo), HandshakeError> {
    if payload.len() < MIN_CLIENT_INFO_LEN {
        return Err(HandshakeError::TooShort {
            len: payload.len(),
            min: MIN_CLIENT_INFO_LEN,
        });
    }
    if payload.len() > MAX_CLIENT_INFO_LEN {
        return Err(HandshakeError::TooLong {
            len: payload.len(),
            max: MAX_CLIENT_INFO_LEN,
        });
    }
    let (key, sealed) = payload.split_at(KEY_LEN);
    let client = NodePublic::from_slice(key).ok_or(HandshakeError::TooShort {
        len: payload.len(),
        min: MIN_CLIENT_INFO_LEN,
    })?;
    if client.is_zero() {
        return Err(HandshakeError::ZeroKey);
    }
    let json = server_priv.open_from(&client, sealed)?;
    let info = ClientInfo::from_json(&json)?;
    Ok((client, info))
}

/// The ServerInfo frame payload: the box of `info`'s JSON sealed to the client.
pub fn seal_server_info(
    server_priv: &NodePrivate,
    client_pub: &NodePublic,
    info: &ServerInfo,
    nonce: [u8; NONCE_LEN],
) -> Vec<u8> {
    server_priv.seal_to(client_pub, &info.to_json(), nonce)
}

/// The complete ServerInfo frame (header + [`seal_server_info`] payload).
pub fn server_info_frame(
    server_priv: &NodePrivate,
    client_pub: &NodePublic,
    info: &ServerInfo,
    nonce: [u8; NONCE_LEN],
) -> Bytes {
    with_header(
        FrameType::ServerInfo,
        &seal_server_info(server_priv, client_pub, info, nonce),
    )
}

/// Opens a ServerInfo frame payload on the client (payload at most 1 MiB).
pub fn open_server_info(
    client_priv: &NodePrivate,
    server_pub: &NodePublic,
    payload: &[u8],
) -> Result<ServerInfo, HandshakeError> {
    if payload.len() > MAX_SERVER_INFO_LEN {
        return Err(HandshakeError::TooLong {
            len: payload.len(),
            max: MAX_SERVER_INFO_LEN,
        });
    }
    if payload.len() < BOX_OVERHEAD {
        return Err(HandshakeError::TooShort {
            len: payload.len(),
            min: BOX_OVERHEAD,
        });
    }
    if server_pub.is_zero() {
        return Err(HandshakeError::ZeroKey);
    }
    let json = client_priv.open_from(server_pub, payload)?;
    Ok(ServerInfo::from_json(&json)?)
}

/// Decodes a complete handshake frame of the expected type (for clients reading ServerKey or
/// ServerInfo, or servers reading ClientInfo) after checking its type.
pub fn expect_frame(typ: u8, payload: Bytes, want: FrameType) -> Result<Frame, HandshakeError> {
    if typ != want.as_u8() {
        return Err(FrameError::UnexpectedType {
            got: typ,
            want: want.as_u8(),
        }
        .into());
    }
    Ok(Frame::decode(typ, payload)?)
}

fn with_header(typ: FrameType, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(FRAME_HEADER_LEN + payload.len());
    FrameHeader::new(typ, u32::try_from(payload.len()).unwrap_or(u32::MAX)).put(&mut b);
    b.put_slice(payload);
    b.freeze()
}
