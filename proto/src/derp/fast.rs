//! Allocation-free helpers for the packet hot path.
//!
//! Why: a relay spends nearly all its time turning SendPacket frames into RecvPacket frames. A
//! SendPacket (`04 len dst packet`) and the matching RecvPacket (`05 len src packet`) have the same
//! length, so the server can rewrite the received buffer in place (type byte and key) and write it
//! out without building a [`Frame`](super::Frame) or copying the packet. ForwardPacket
//! (`0a len src dst packet`) becomes a RecvPacket 32 bytes further into the same buffer.
//!
//! What this module must never do: allocate (except the explicit `encode_*` helpers, which only
//! append to the caller's buffer), panic on any input, or rewrite a buffer that is not exactly one
//! well-formed frame of the expected type.

use bytes::{BufMut, BytesMut};

use super::frame::FrameError;
use super::header::{FrameHeader, FrameType};
use super::{DISCO_MAGIC, DISCO_MIN_LEN, FRAME_HEADER_LEN, KEY_LEN, MAX_PACKET_SIZE};
use crate::key::NodePublic;

/// Length of a Send/RecvPacket prefix: header + one key.
pub const PACKET_PREFIX_LEN: usize = FRAME_HEADER_LEN + KEY_LEN;
/// Length of a ForwardPacket prefix: header + two keys.
pub const FORWARD_PREFIX_LEN: usize = FRAME_HEADER_LEN + 2 * KEY_LEN;

/// Whether `packet` looks like a disco message: at least 62 bytes starting with
/// `54 53 F0 9F 92 AC` ("TS" + U+1F4AC). Such packets get their own queue and PeerGone(NotHere).
pub fn looks_like_disco(packet: &[u8]) -> bool {
    packet.len() >= DISCO_MIN_LEN && packet[..DISCO_MAGIC.len()] == DISCO_MAGIC
}

/// The destination key of a SendPacket payload (`dst || packet`); `None` if under 32 bytes.
pub fn send_packet_dst(payload: &[u8]) -> Option<NodePublic> {
    NodePublic::from_slice(payload.get(..KEY_LEN)?)
}

/// The `(src, dst)` keys of a ForwardPacket payload (`src || dst || packet`); `None` if under
/// 64 bytes.
pub fn forward_packet_keys(payload: &[u8]) -> Option<(NodePublic, NodePublic)> {
    let src = NodePublic::from_slice(payload.get(..KEY_LEN)?)?;
    let dst = NodePublic::from_slice(payload.get(KEY_LEN..2 * KEY_LEN)?)?;
    Some((src, dst))
}

fn check_one_frame(frame: &[u8], want: FrameType, min_payload: usize) -> Result<(), FrameError> {
    let h = FrameHeader::decode(frame).ok_or(FrameError::IncompleteHeader)?;
    if h.typ != want.as_u8() {
        return Err(FrameError::UnexpectedType {
            got: h.typ,
            want: want.as_u8(),
        });
    }
    let actual = frame.len() - FRAME_HEADER_LEN;
    if h.payload_len() != actual {
        return Err(FrameError::LengthMismatch {
            header: h.len,
            actual,
        });
    }
    if actual < min_payload {
        return Err(FrameError::TooShort {
            typ: want,
            len: actual,
            min: min_payload,
        });
    }
    if actual > min_payload + MAX_PACKET_SIZE {
        return Err(FrameError::TooLong {
            typ: want,
            len: actual,
            max: min_payload + MAX_PACKET_SIZE,
        });
    }
    Ok(())
}

/// Turns one encoded SendPacket frame (`04 len dst packet`) into the RecvPacket frame
/// `05 len src packet` in place. `frame` must be exactly one SendPacket frame with a valid
/// length; otherwise it is left untouched and an error is returned.
pub fn rewrite_send_to_recv(frame: &mut [u8], src: &NodePublic) -> Result<(), FrameError> {
    check_one_frame(frame, FrameType::SendPacket, KEY_LEN)?;
    frame[0] = FrameType::RecvPacket.as_u8();
    frame[FRAME_HEADER_LEN..PACKET_PREFIX_LEN].copy_from_slice(src.as_bytes());
    Ok(())
}

/// Turns one encoded ForwardPacket frame (`0a len src dst packet`) into a RecvPacket frame in
/// place and returns the offset (always 32) at which the RecvPacket frame starts:
/// `frame[32..]` is `05 len-32 src packet`. `frame` must be exactly one ForwardPacket frame;
/// otherwise it is left untouched and an error is returned.
pub fn rewrite_forward_to_recv(frame: &mut [u8]) -> Result<usize, FrameError> {
    check_one_frame(frame, FrameType::ForwardPacket, 2 * KEY_LEN)?;
    let payload_len = frame.len() - FORWARD_PREFIX_LEN + KEY_LEN;
    // Move src over dst, then write the new header just before it.
    frame.copy_within(FRAME_HEADER_LEN..PACKET_PREFIX_LEN, PACKET_PREFIX_LEN);
    let h = FrameHeader::new(
        FrameType::RecvPacket,
        u32::try_from(payload_len).unwrap_or(u32::MAX),
    )
    .encode();
    frame[KEY_LEN..PACKET_PREFIX_LEN].copy_from_slice(&h);
    Ok(KEY_LEN)
}

fn prefix(typ: FrameType, key: &NodePublic, packet_len: usize) -> [u8; PACKET_PREFIX_LEN] {
    let mut out = [0u8; PACKET_PREFIX_LEN];
    let len = u32::try_from(KEY_LEN + packet_len).unwrap_or(u32::MAX);
    out[..FRAME_HEADER_LEN].copy_from_slice(&FrameHeader::new(typ, len).encode());
    out[FRAME_HEADER_LEN..].copy_from_slice(key.as_bytes());
    out
}

/// Header + source key of a RecvPacket frame carrying `packet_len` bytes, for vectored writes
/// (`[prefix, packet]`) without copying the packet.
pub fn recv_packet_prefix(src: &NodePublic, packet_len: usize) -> [u8; PACKET_PREFIX_LEN] {
    prefix(FrameType::RecvPacket, src, packet_len)
}

/// Header + destination key of a SendPacket frame carrying `packet_len` bytes.
pub fn send_packet_prefix(dst: &NodePublic, packet_len: usize) -> [u8; PACKET_PREFIX_LEN] {
    prefix(FrameType::SendPacket, dst, packet_len)
}

/// Header + source + destination keys of a ForwardPacket frame carrying `packet_len` bytes.
pub fn forward_packet_prefix(
    src: &NodePublic,
    dst: &NodePublic,
    packet_len: usize,
) -> [u8; FORWARD_PREFIX_LEN] {
    let mut out = [0u8; FORWARD_PREFIX_LEN];
    let len = u32::try_from(2 * KEY_LEN + packet_len).unwrap_or(u32::MAX);
    out[..FRAME_HEADER_LEN]
        .copy_from_slice(&FrameHeader::new(FrameType::ForwardPacket, len).encode());
    out[FRAME_HEADER_LEN..PACKET_PREFIX_LEN].copy_from_slice(src.as_bytes());
    out[PACKET_PREFIX_LEN..].copy_from_slice(dst.as_bytes());
    out
}

/// Appends a complete RecvPacket frame to `buf`.
pub fn encode_recv_packet(buf: &mut BytesMut, src: &NodePublic, packet: &[u8]) {
    buf.reserve(PACKET_PREFIX_LEN + packet.len());
    buf.put_slice(&recv_packet_prefix(src, packet.len()));
    buf.put_slice(packet);
}

/// Appends a complete SendPacket frame to `buf`.
pub fn encode_send_packet(buf: &mut BytesMut, dst: &NodePublic, packet: &[u8]) {
    buf.reserve(PACKET_PREFIX_LEN + packet.len());
    buf.put_slice(&send_packet_prefix(dst, packet.len()));
    buf.put_slice(packet);
}
