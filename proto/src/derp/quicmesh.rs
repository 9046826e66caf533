//! Wire format of the QUIC mesh between tailnetd relays (the transport is in
//! `derp::mesh::quic`, which says why it exists).
//!
//! Two kinds of units travel on a mesh connection:
//!
//! - **Control messages** on the one bidirectional stream: `type u8 | len u16 BE | payload`.
//!   Hello (both ways, first): the sender's DERP public key and its 32-byte authentication tag.
//!   Then, from the accepting relay to the dialing one only: SyncStart, Present(key)…, SyncEnd
//!   (the complete list of its local clients: on connect, and again whenever the stream of
//!   changes could not keep up), then Present(key) / Gone(key) as clients come and go. A key
//!   announced while no sync is open is added; a sync replaces the whole set at its end.
//! - **Packets**, as QUIC datagrams or (larger than the path's datagram limit) one
//!   unidirectional stream each: `dst key | RecvPacket frame` where the frame is exactly what the
//!   receiving relay writes to its client (`05 len src payload`), so the receiver delivers a
//!   slice of what it received without copying.
//!
//! Strict: an unknown message type, a wrong length or a malformed packet is an error (the
//! connection is closed); the version is the ALPN string [`ALPN`].
//!
//! Must never: allocate on decode (packets are sliced, messages are fixed-size), or panic on any
//! input.

use bytes::{BufMut, Bytes, BytesMut};

use super::header::FrameType;
use super::{FRAME_HEADER_LEN, KEY_LEN, MAX_PACKET_SIZE};
use crate::key::NodePublic;

/// ALPN protocol of the QUIC mesh; a new incompatible format gets a new one.
pub const ALPN: &[u8] = b"tailnetd-mesh/1";
/// Length of an authentication tag (HMAC-SHA256).
pub const TAG_LEN: usize = 32;
/// Length of a control message header.
pub const MSG_HEADER_LEN: usize = 3;
/// Largest control message payload.
pub const MAX_MSG_PAYLOAD: usize = KEY_LEN + TAG_LEN;
/// Smallest packet unit: destination key + RecvPacket header + source key.
pub const PACKET_UNIT_MIN: usize = KEY_LEN + FRAME_HEADER_LEN + KEY_LEN;
/// Largest packet unit (a 64 KiB packet).
pub const PACKET_UNIT_MAX: usize = PACKET_UNIT_MIN + MAX_PACKET_SIZE;

const T_HELLO: u8 = 1;
const T_PRESENT: u8 = 2;
const T_GONE: u8 = 3;
const T_SYNC_START: u8 = 4;
const T_SYNC_END: u8 = 5;

/// A control message of the mesh stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshMsg {
    /// First message each way: who the sender is and its proof of the mesh key.
    Hello {
        /// The sender relay's DERP public key.
        server_key: NodePublic,
        /// HMAC over the connection's keying material (see `derp::mesh::quic`).
        tag: [u8; TAG_LEN],
    },
    /// The sender has a local client with this key.
    Present(NodePublic),
    /// The sender's last local connection of this key left.
    Gone(NodePublic),
    /// A complete list of the sender's clients follows.
    SyncStart,
    /// The list started by [`MeshMsg::SyncStart`] is complete: keys not in it are gone.
    SyncEnd,
}

/// Malformed input on the QUIC mesh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuicMeshError {
    /// A control message of a type this version does not know.
    #[error("unknown control message type {0}")]
    UnknownType(u8),
    /// A control message whose length does not fit its type.
    #[error("control message type {typ} with {len} bytes")]
    BadLength {
        /// The type byte.
        typ: u8,
        /// The length it announced.
        len: usize,
    },
    /// A packet unit shorter than its keys and header.
    #[error("packet unit of {0} bytes is too short")]
    ShortPacket(usize),
    /// A packet unit over 64 KiB of payload.
    #[error("packet unit of {0} bytes is too large")]
    LargePacket(usize),
    /// A packet unit whose frame is not a RecvPacket of the unit's length.
    #[error("packet unit does not hold a well-formed RecvPacket frame")]
    BadFrame,
}

impl MeshMsg {
    fn type_and_len(&self) -> (u8, usize) {
        match self {
            MeshMsg::Hello { .. } => (T_HELLO, KEY_LEN + TAG_LEN),
            MeshMsg::Present(_) => (T_PRESENT, KEY_LEN),
            MeshMsg::Gone(_) => (T_GONE, KEY_LEN),
            MeshMsg::SyncStart => (T_SYNC_START, 0),
            MeshMsg::SyncEnd => (T_SYNC_END, 0),
        }
    }

    /// Bytes of the encoded message.
    pub fn encoded_len(&self) -> usize {
        MSG_HEADER_LEN + self.type_and_len().1
    }

    /// Appends the encoded message to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        let (typ, len) = self.type_and_len();
        buf.reserve(MSG_HEADER_LEN + len);
        buf.put_u8(typ);
        // At most MAX_MSG_PAYLOAD (64), so it fits.
        buf.put_u16(len as u16);
        match self {
            MeshMsg::Hello { server_key, tag } => {
                buf.put_slice(server_key.as_bytes());
                buf.put_slice(tag);
            }
            MeshMsg::Present(k) | MeshMsg::Gone(k) => buf.put_slice(k.as_bytes()),
            MeshMsg::SyncStart | MeshMsg::SyncEnd => {}
        }
    }

    /// Decodes the message at the start of `buf`: `Ok(None)` if more bytes are needed,
    /// otherwise the message and how many bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(MeshMsg, usize)>, QuicMeshError> {
        if buf.len() < MSG_HEADER_LEN {
            return Ok(None);
        }
        let typ = buf[0];
        let len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
        let want = match typ {
            T_HELLO => KEY_LEN + TAG_LEN,
            T_PRESENT | T_GONE => KEY_LEN,
            T_SYNC_START | T_SYNC_END => 0,
            t => return Err(QuicMeshError::UnknownType(t)),
        };
        if len != want {
            return Err(QuicMeshError::BadLength { typ, len });
        }
        let Some(p) = buf.get(MSG_HEADER_LEN..MSG_HEADER_LEN + len) else {
            return Ok(None);
        };
        let key = || {
            let mut k = [0u8; KEY_LEN];
            k.copy_from_slice(&p[..KEY_LEN]);
            NodePublic::from_bytes(k)
        };
        let msg = match typ {
            T_HELLO => {
                let mut tag = [0u8; TAG_LEN];
                tag.copy_from_slice(&p[KEY_LEN..]);
                MeshMsg::Hello {
                    server_key: key(),
                    tag,
                }
            }
            T_PRESENT => MeshMsg::Present(key()),
            T_GONE => MeshMsg::Gone(key()),
            T_SYNC_START => MeshMsg::SyncStart,
            _ => MeshMsg::SyncEnd,
        };
        Ok(Some((msg, MSG_HEADER_LEN + len)))
    }
}

/// Builds the packet unit for `dst` from the RecvPacket frame the sending relay built
/// (`05 len src payload`).
pub fn encode_packet(dst: &NodePublic, recv_frame: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(KEY_LEN + recv_frame.len());
    b.put_slice(dst.as_bytes());
    b.put_slice(recv_frame);
    b.freeze()
}

/// Splits a received packet unit into its destination and its RecvPacket frame (a slice of
/// `unit`), after checking the frame is one well-formed RecvPacket.
pub fn decode_packet(unit: Bytes) -> Result<(NodePublic, Bytes), QuicMeshError> {
    let n = unit.len();
    if n < PACKET_UNIT_MIN {
        return Err(QuicMeshError::ShortPacket(n));
    }
    if n > PACKET_UNIT_MAX {
        return Err(QuicMeshError::LargePacket(n));
    }
    let f = &unit[KEY_LEN..];
    let len = u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize;
    if f[0] != FrameType::RecvPacket.as_u8() || len != f.len() - FRAME_HEADER_LEN {
        return Err(QuicMeshError::BadFrame);
    }
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&unit[..KEY_LEN]);
    Ok((NodePublic::from_bytes(k), unit.slice(KEY_LEN..)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derp::fast::encode_recv_packet;

    fn key(b: u8) -> NodePublic {
        NodePublic::from_bytes([b; KEY_LEN])
    }

    #[test]
    fn messages_round_trip_and_split_anywhere() {
        let msgs = [
            MeshMsg::Hello {
                server_key: key(1),
                tag: [7; TAG_LEN],
            },
            MeshMsg::SyncStart,
            MeshMsg::Present(key(2)),
            MeshMsg::SyncEnd,
            MeshMsg::Gone(key(2)),
        ];
        let mut buf = BytesMut::new();
        for m in &msgs {
            m.encode(&mut buf);
        }
        assert_eq!(
            buf.len(),
            msgs.iter().map(MeshMsg::encoded_len).sum::<usize>()
        );
        // Every prefix decodes to a whole message or asks for more, never errs.
        for cut in 0..buf.len() {
            let mut at = 0;
            let mut got = Vec::new();
            while let Some((m, n)) = MeshMsg::decode(&buf[at..cut]).unwrap() {
                got.push(m);
                at += n;
            }
            assert_eq!(got[..], msgs[..got.len()]);
        }
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((m, n)) = MeshMsg::decode(&buf[at..]).unwrap() {
            got.push(m);
            at += n;
        }
        assert_eq!(got, msgs);
    }

    #[test]
    fn bad_messages_are_errors() {
        assert_eq!(
            MeshMsg::decode(&[9, 0, 0]),
            Err(QuicMeshError::UnknownType(9))
        );
        assert_eq!(
            MeshMsg::decode(&[T_PRESENT, 0, 31]),
            Err(QuicMeshError::BadLength {
                typ: T_PRESENT,
                len: 31
            })
        );
        assert_eq!(
            MeshMsg::decode(&[T_SYNC_END, 0, 1, 0]),
            Err(QuicMeshError::BadLength {
                typ: T_SYNC_END,
                len: 1
            })
        );
        assert_eq!(MeshMsg::decode(&[T_HELLO, 0]), Ok(None));
    }

    #[test]
    fn packets_round_trip() {
        let mut frame = BytesMut::new();
        encode_recv_packet(&mut frame, &key(3), b"hello");
        let unit = encode_packet(&key(4), &frame);
        let (dst, f) = decode_packet(unit).unwrap();
        assert_eq!(dst, key(4));
        assert_eq!(&f[..], &frame[..]);
        // Empty payload is a packet too.
        let mut frame = BytesMut::new();
        encode_recv_packet(&mut frame, &key(3), b"");
        assert!(decode_packet(encode_packet(&key(4), &frame)).is_ok());
    }

    #[test]
    fn bad_packets_are_errors() {
        let mut frame = BytesMut::new();
        encode_recv_packet(&mut frame, &key(3), b"hello");
        let unit = encode_packet(&key(4), &frame);
        assert_eq!(
            decode_packet(unit.slice(..PACKET_UNIT_MIN - 1)),
            Err(QuicMeshError::ShortPacket(PACKET_UNIT_MIN - 1))
        );
        // Truncated: the frame's length no longer matches.
        assert_eq!(
            decode_packet(unit.slice(..unit.len() - 1)),
            Err(QuicMeshError::BadFrame)
        );
        // Wrong frame type.
        let mut v = unit.to_vec();
        v[KEY_LEN] = FrameType::SendPacket.as_u8();
        assert_eq!(decode_packet(Bytes::from(v)), Err(QuicMeshError::BadFrame));
        let big = vec![0u8; PACKET_UNIT_MAX + 1];
        assert_eq!(
            decode_packet(Bytes::from(big)),
            Err(QuicMeshError::LargePacket(PACKET_UNIT_MAX + 1))
        );
    }
}
