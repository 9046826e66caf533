//! The 5-byte DERP frame header and the frame type numbers.
//!
//! Every frame on a DERP stream is `type(1) || big-endian u32 payload length || payload`; there is
//! no padding, checksum or flag. This module decodes/encodes that header and carries the
//! server's pre-read length rules ([`FrameHeader::validate_from_client`]) so that a server can
//! reject a bad frame before buffering its payload. It must never read past the 5 bytes it is
//! given or panic on any byte pattern.

use bytes::BufMut;

use super::frame::FrameError;
use super::{
    FRAME_HEADER_LEN, KEY_LEN, MAX_CLIENT_INFO_LEN, MAX_PACKET_SIZE, MAX_PING_LEN,
    MIN_CLIENT_INFO_LEN, PING_LEN,
};

/// A DERP frame type. Unassigned numbers (0x00, 0x0b..=0x0f, > 0x15) are `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// 0x01 S→C: magic + server public key.
    ServerKey,
    /// 0x02 C→S: client public key + sealed ClientInfo JSON.
    ClientInfo,
    /// 0x03 S→C: sealed ServerInfo JSON.
    ServerInfo,
    /// 0x04 C→S: destination key + packet.
    SendPacket,
    /// 0x05 S→C: source key + packet (v2 form).
    RecvPacket,
    /// 0x06 S→C: empty keep-alive.
    KeepAlive,
    /// 0x07 C→S: one byte, whether this is the client's home region.
    NotePreferred,
    /// 0x08 S→C: peer key + reason byte.
    PeerGone,
    /// 0x09 S→C (watchers): peer key + IP + port + flags.
    PeerPresent,
    /// 0x0a mesh C→S: source key + destination key + packet.
    ForwardPacket,
    /// 0x10 mesh C→S: subscribe to presence, empty.
    WatchConns,
    /// 0x11 mesh C→S: close the given peer's connections.
    ClosePeer,
    /// 0x12: 8 bytes to echo.
    Ping,
    /// 0x13: the echoed 8 bytes.
    Pong,
    /// 0x14 S→C: UTF-8 problem text, empty = healthy.
    Health,
    /// 0x15 S→C: two BE u32 millisecond durations.
    Restarting,
    /// Any other type byte.
    Unknown(u8),
}

impl FrameType {
    /// Maps a type byte to its frame type.
    pub const fn from_u8(b: u8) -> Self {
        match b {
            0x01 => FrameType::ServerKey,
            0x02 => FrameType::ClientInfo,
            0x03 => FrameType::ServerInfo,
            0x04 => FrameType::SendPacket,
            0x05 => FrameType::RecvPacket,
            0x06 => FrameType::KeepAlive,
            0x07 => FrameType::NotePreferred,
            0x08 => FrameType::PeerGone,
            0x09 => FrameType::PeerPresent,
            0x0a => FrameType::ForwardPacket,
            0x10 => FrameType::WatchConns,
            0x11 => FrameType::ClosePeer,
            0x12 => FrameType::Ping,
            0x13 => FrameType::Pong,
            0x14 => FrameType::Health,
            0x15 => FrameType::Restarting,
            other => FrameType::Unknown(other),
        }
    }

    /// The type byte on the wire.
    pub const fn as_u8(self) -> u8 {
        match self {
            FrameType::ServerKey => 0x01,
            FrameType::ClientInfo => 0x02,
            FrameType::ServerInfo => 0x03,
            FrameType::SendPacket => 0x04,
            FrameType::RecvPacket => 0x05,
            FrameType::KeepAlive => 0x06,
            FrameType::NotePreferred => 0x07,
            FrameType::PeerGone => 0x08,
            FrameType::PeerPresent => 0x09,
            FrameType::ForwardPacket => 0x0a,
            FrameType::WatchConns => 0x10,
            FrameType::ClosePeer => 0x11,
            FrameType::Ping => 0x12,
            FrameType::Pong => 0x13,
            FrameType::Health => 0x14,
            FrameType::Restarting => 0x15,
            FrameType::Unknown(b) => b,
        }
    }

    /// Whether a server acts on this frame type after the handshake (`sclient.run`). Every other
    /// type — including Pong, KeepAlive, a repeated ClientInfo and unassigned numbers — has its
    /// payload discarded without error and without a length limit.
    pub const fn handled_by_server(self) -> bool {
        matches!(
            self,
            FrameType::SendPacket
                | FrameType::ForwardPacket
                | FrameType::NotePreferred
                | FrameType::WatchConns
                | FrameType::ClosePeer
                | FrameType::Ping
        )
    }

    /// Whether the frame type requires the mesh key on the server (else the connection closes).
    pub const fn requires_mesh_key(self) -> bool {
        matches!(
            self,
            FrameType::ForwardPacket | FrameType::WatchConns | FrameType::ClosePeer
        )
    }
}

impl From<u8> for FrameType {
    fn from(b: u8) -> Self {
        FrameType::from_u8(b)
    }
}

impl From<FrameType> for u8 {
    fn from(t: FrameType) -> u8 {
        t.as_u8()
    }
}

/// A decoded frame header: the type byte and the payload length that follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// Raw type byte (see [`FrameType`]).
    pub typ: u8,
    /// Payload length in bytes, excluding the 5 header bytes.
    pub len: u32,
}

impl FrameHeader {
    /// Builds a header.
    pub const fn new(typ: FrameType, len: u32) -> Self {
        FrameHeader {
            typ: typ.as_u8(),
            len,
        }
    }

    /// Decodes the first 5 bytes of `buf`; `None` if fewer than 5 bytes are available.
    /// Bytes after the header are ignored.
    pub fn decode(buf: &[u8]) -> Option<FrameHeader> {
        let h: &[u8; FRAME_HEADER_LEN] = buf.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        Some(FrameHeader {
            typ: h[0],
            len: u32::from_be_bytes([h[1], h[2], h[3], h[4]]),
        })
    }

    /// The 5 header bytes.
    pub const fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let l = self.len.to_be_bytes();
        [self.typ, l[0], l[1], l[2], l[3]]
    }

    /// Appends the 5 header bytes to `buf`.
    pub fn put<B: BufMut>(&self, buf: &mut B) {
        buf.put_u8(self.typ);
        buf.put_u32(self.len);
    }

    /// The frame type.
    pub const fn frame_type(&self) -> FrameType {
        FrameType::from_u8(self.typ)
    }

    /// Payload length as `usize`.
    pub const fn payload_len(&self) -> usize {
        self.len as usize
    }

    /// The server's length rules for frames received after the handshake, checked before the
    /// payload is read (`sclient.run`): NotePreferred must be 1 byte; SendPacket 32..=32+64 KiB;
    /// ForwardPacket 64..=64+64 KiB; WatchConns 0; ClosePeer 32; Ping 8..=1000. Types the server
    /// does not handle are always `Ok` (their payload is to be discarded, with no length limit).
    /// Mesh-key permission is the caller's job ([`FrameType::requires_mesh_key`]).
    pub fn validate_from_client(&self) -> Result<(), FrameError> {
        let typ = self.frame_type();
        let len = self.payload_len();
        match typ {
            FrameType::NotePreferred => exact(typ, len, 1),
            FrameType::SendPacket => range(typ, len, KEY_LEN, KEY_LEN + MAX_PACKET_SIZE),
            FrameType::ForwardPacket => range(typ, len, 2 * KEY_LEN, 2 * KEY_LEN + MAX_PACKET_SIZE),
            FrameType::WatchConns => exact(typ, len, 0),
            FrameType::ClosePeer => exact(typ, len, KEY_LEN),
            FrameType::Ping => range(typ, len, PING_LEN, MAX_PING_LEN),
            _ => Ok(()),
        }
    }

    /// The server's rule for the first client frame: it must be ClientInfo with a payload of
    /// 56 (key + nonce) ..= 256 KiB bytes.
    pub fn validate_client_info(&self) -> Result<(), FrameError> {
        let typ = self.frame_type();
        if typ != FrameType::ClientInfo {
            return Err(FrameError::UnexpectedType {
                got: self.typ,
                want: FrameType::ClientInfo.as_u8(),
            });
        }
        range(
            typ,
            self.payload_len(),
            MIN_CLIENT_INFO_LEN,
            MAX_CLIENT_INFO_LEN,
        )
    }
}

pub(crate) fn exact(typ: FrameType, len: usize, want: usize) -> Result<(), FrameError> {
    if len == want {
        Ok(())
    } else {
        Err(FrameError::WrongLength { typ, len, want })
    }
}

pub(crate) fn range(typ: FrameType, len: usize, min: usize, max: usize) -> Result<(), FrameError> {
    if len < min {
        Err(FrameError::TooShort { typ, len, min })
    } else if len > max {
        Err(FrameError::TooLong { typ, len, max })
    } else {
        Ok(())
    }
}
